"""Synthetic scan directories for the evaluate/report tests, written with the real writer (`memlens.rundir`): the
same `Generation` records, log and run.json a scan writes, with random images and maps instead of a pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from memlens import rundir
from memlens.rundir import Generation


def make_scan(
    root: Path,
    n_prompts: int = 3,
    per_prompt: int = 2,
    steps: int = 12,
    size: int = 16,
    map_size: int = 4,
    labels: bool | list[int] = True,
    types: list[str] | None = None,
    index_base: int | None = 1000,
    seed: int = 0,
    d_of=None,
    ld_of=None,
) -> list[dict]:
    """Write a complete scan into `root`; return its records as the JSON objects on disk.

    `labels=True` labels prompt p as memorized when p is even; a list gives one label per prompt; False omits them.
    `d_of(p, j, rng)` / `ld_of(...)` give the per-step lists (default: label-dependent noise; strings let tests write
    bad values, which the writer passes through as a buggy producer would).
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for sub in (rundir.IMAGES, rundir.MAPS, rundir.OVERLAYS):
        (root / sub).mkdir(exist_ok=True)
    recs = []
    for p in range(n_prompts):
        lab = (p % 2 == 0) if labels is True else (labels[p] if isinstance(labels, list) else None)
        for j in range(per_prompt):
            name = rundir.stem(p, j)
            img = (rng.random((size, size, 3)) * 255).astype(np.uint8)
            be = rng.random((map_size, map_size)).astype(np.float32) * 0.01
            base = 3.0 if lab else 1.0
            D = d_of(p, j, rng) if d_of else list(base + rng.normal(0, 0.3, steps))
            LD = ld_of(p, j, rng) if ld_of else list(base * 1.2 + rng.normal(0, 0.3, steps))
            gen = Generation(
                prompt_index=p,
                prompt=f"prompt number {p} <b>&",
                image_index=j,
                seed=100 * p + j,
                image=f"{rundir.IMAGES}/{name}.png",
                be_map=f"{rundir.MAPS}/{name}.npy",
                overlay=f"{rundir.OVERLAYS}/{name}.png",
                D=[x if isinstance(x, str) else float(x) for x in D],
                LD=[float(x) for x in LD],
                eos_index=5,
                label=None if labels is False else int(lab),
                type=types[p] if types is not None else None,
                index=index_base + p if index_base is not None else None,
            )
            Image.fromarray(img).save(gen.path("image") if gen.root else root / gen.image)
            np.save(root / gen.be_map, be)
            Image.fromarray(255 - img).save(root / gen.overlay)
            recs.append(gen)
    rundir.write_run_json(root, {"format": rundir.FORMAT, "kind": "scan", "status": "running",
                                 "settings": {"model": "tiny-sd1", "steps": steps, "guidance": 7.5}})
    with rundir.Log(root / rundir.GENERATIONS) as log:
        log.append(recs)
    rundir.merge(root)
    info = rundir.read_run_json(root)
    info.update(status="complete", num_records=len(recs))
    rundir.write_run_json(root, info)
    return [r.to_line() for r in recs]
