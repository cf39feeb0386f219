"""Synthetic scan directories in the `memlens scan` layout, for the evaluate/report tests (no scan code used)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


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
    """Write `root/generations.jsonl` plus images, maps and overlays; return the records as written.

    `labels=True` labels prompt p as memorized when p is even; a list gives one label per prompt; False omits them.
    `d_of(p, j, rng)` / `ld_of(...)` give the per-step lists (default: label-dependent noise).
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("images", "maps", "overlays"):
        (root / sub).mkdir(exist_ok=True)
    recs = []
    for p in range(n_prompts):
        lab = (p % 2 == 0) if labels is True else (labels[p] if isinstance(labels, list) else None)
        for j in range(per_prompt):
            name = f"p{p:03d}_i{j:02d}"
            img = (rng.random((size, size, 3)) * 255).astype(np.uint8)
            Image.fromarray(img).save(root / "images" / f"{name}.png")
            be = rng.random((map_size, map_size)).astype(np.float32) * 0.01
            np.save(root / "maps" / f"{name}.npy", be)
            Image.fromarray(255 - img).save(root / "overlays" / f"{name}.png")
            base = 3.0 if lab else 1.0
            D = d_of(p, j, rng) if d_of else list(base + rng.normal(0, 0.3, steps))
            LD = ld_of(p, j, rng) if ld_of else list(base * 1.2 + rng.normal(0, 0.3, steps))
            rec = {
                "prompt_index": p,
                "prompt": f"prompt number {p} <b>&",
                "image_index": j,
                "seed": 100 * p + j,
                "image": f"images/{name}.png",
                "be_map": f"maps/{name}.npy",
                "overlay": f"overlays/{name}.png",
                "D": [x if isinstance(x, str) else float(x) for x in D],  # strings let tests write bad values
                "LD": [float(x) for x in LD],
                "eos_index": 5,
            }
            if labels is not False:
                rec["label"] = int(lab)
            if types is not None:
                rec["type"] = types[p]
            if index_base is not None:
                rec["index"] = index_base + p
            recs.append(rec)
    with open(root / "generations.jsonl", "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    (root / "run.json").write_text(json.dumps({"model": "tiny-sd1", "steps": steps, "guidance_scale": 7.5}))
    return recs
