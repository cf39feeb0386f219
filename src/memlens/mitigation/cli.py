"""`memlens mitigate`: generate a prompt file with one mitigation method and record, per image, what it changed.

The output folder has the scan's layout (`generations.jsonl`, `run.json`, `images/`, `be_maps/`, `overlays/`; one line
per image with the scan's keys), written with the scan's per-image writer and durable log (`memlens.scanstore`), so every scan reader works
on it. Each line adds `method`, `triggered`, `initial_magnitude`, `final_magnitude`, `iterations`, `used_prompt`, and
where they apply `reanchored_steps`, `candidate_magnitudes` and `unmitigated_image` (the unmitigated generation of a
triggered image, when the method made one). Seeds are the scan's: image k of prompt p uses seed + p*num_images + k,
so `memlens scan` with the same settings gives the same unmitigated images. Rerunning the same command resumes.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer

from memlens import scanstore
from memlens.errors import InputError
from memlens.mitigation.runner import METHODS, Job, Settings, mitigate_batch

__all__ = ["run_mitigation", "mitigate_command"]

UNMITIGATED = "unmitigated"
FORMAT = 1

# Settings that change which images come out; a resume must match them all.
# Settings a resume must share with the run in --out, and the option a user would change for each.
_COMPARED = {
    "model": "--model", "prompts_sha256": "--prompts", "num_images": "--num-images", "seed": "--seed",
    "height": "--height", "width": "--width", "dtype": "--dtype", "mitigation": "--method and its options",
}


def _method_settings(s: Settings) -> dict:
    keep = {"method", "steps", "guidance"}
    per_method = {
        "pe": {"target", "lr", "max_iters"},
        "pe-be": {"target", "lr", "max_iters", "mask_steps"},
        "prss": {"l_target_ss", "l_target_pr", "mag_thres_pr"},
        "prss-be": {"l_target_ss", "l_target_pr", "mag_thres_pr", "mask_steps"},
        "rt": {"repeat"}, "rna": {"repeat"}, "cwr": {"repeat"},
        "gni": {"noise_lambda"},
    }
    keep |= per_method.get(s.method, set())
    return {k: v for k, v in asdict(s).items() if k in keep}


def run_mitigation(
    pipe_or_model: Any,
    prompts: Any,
    out_dir: Any,
    settings: Settings,
    *,
    num_images: int = 1,
    seed: int = 0,
    batch_size: int = 4,
    dtype: str = "float32",
    device: Optional[str] = "auto",
    model_name: Optional[str] = None,
    progress: bool = True,
) -> Path:
    """Mitigate every image of `prompts` into `out_dir`; `pipe_or_model` is a pipeline or a MODEL string."""
    from memlens.models import pipeline_facts
    from memlens.scan import (
        ScanItem, image_seed, library_versions, open_pipeline, prompt_identity, refuse_other_run, resolve_prompts,
    )

    if num_images < 1 or batch_size < 1:
        raise InputError("--num-images and --batch-size must be at least 1")
    records = resolve_prompts(prompts)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is a file; expected a folder")
    pipe, model_id = open_pipeline(pipe_or_model, dtype=dtype, device=device, model_name=model_name)
    facts = pipeline_facts(pipe)
    from dataclasses import replace

    settings = replace(settings, height=settings.height or facts["height"], width=settings.width or facts["width"])
    settings.validate()

    run_settings = {
        "model": model_id,
        **prompt_identity(records, prompts),
        "num_images": num_images,
        "seed": seed,
        "height": settings.height,
        "width": settings.width,
        "dtype": facts["dtype"],
        "mitigation": _method_settings(settings),
        "steps": settings.steps,
        "guidance": float(settings.guidance),
        "batch_size": batch_size,
    }
    run_settings = json.loads(json.dumps(run_settings))
    previous = refuse_other_run(out, run_settings, _COMPARED)

    items = [ScanItem(p, i, image_seed(seed, p, i, num_images)) for p in range(len(records)) for i in range(num_images)]
    done = scanstore.done_keys(out)
    todo = [it for it in items if it.key not in done]
    from memlens.scan import IMAGES, MAPS, OVERLAYS

    for sub in (IMAGES, MAPS, OVERLAYS, UNMITIGATED):
        (out / sub).mkdir(parents=True, exist_ok=True)
    scanstore.write_run_json(out, {
        "format": FORMAT, "kind": "mitigate", "status": "running",
        "started_at": (previous or {}).get("started_at") or _now(), "settings": run_settings,
        "versions": library_versions(), "pipeline": facts,
    })
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc=f"mitigate {settings.method}", unit="img", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    with scanstore.Log(out / scanstore.GENERATIONS) as log:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            jobs = [Job(records[it.prompt_index].prompt, it.seed, tuple(records[it.prompt_index].captions)) for it in batch]
            outcomes = mitigate_batch(pipe, jobs, settings)
            log.append([_write(out, it, records[it.prompt_index], o, settings.method) for it, o in zip(batch, outcomes)])
            bar.update(len(batch))
    bar.close()
    merged = scanstore.merge(out)
    run = scanstore.read_run_json(out) or {}
    run.update(status="complete" if len(merged) == len(items) else "incomplete", finished_at=_now(),
               num_records=len(merged), seconds=round(time.perf_counter() - t0, 2))
    scanstore.write_run_json(out, run)
    return out


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _write(out: Path, item, src, o, method: str) -> dict:
    # The scan's own writer gives the image, map and overlay files and every scan key; mitigation adds its own.
    from memlens.maps import save_png
    from memlens.scan import save_generation

    line = save_generation(out, src, item, o.image, o.record)
    line.update({
        "method": method,
        "triggered": o.triggered,
        "initial_magnitude": o.initial_magnitude,
        "final_magnitude": o.final_magnitude,
        "iterations": o.iterations,
        "used_prompt": o.used_prompt,
    })
    if method.startswith("prss"):
        line["reanchored_steps"] = o.reanchored_steps
        line["candidate_magnitudes"] = o.extra.get("candidate_magnitudes")
    if o.unmitigated_image is not None:
        line["unmitigated_image"] = f"{UNMITIGATED}/{item.stem}.png"
        save_png(o.unmitigated_image, out / line["unmitigated_image"])
        line["unmitigated_D"] = np.asarray(o.unmitigated_record.magnitude, dtype=np.float32).tolist()
        line["unmitigated_LD"] = np.asarray(o.unmitigated_record.masked_magnitude, dtype=np.float32).tolist()
    return line


def mitigate_command(
    model: Annotated[str, typer.Option("--model", help="Hub id, local diffusers folder, or 'testbed'.")],
    prompts: Annotated[str, typer.Option("--prompts", help="Prompt file; caption1..captionK columns are SS paraphrases.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder; rerun the same command to resume.")],
    method: Annotated[str, typer.Option("--method", help=f"One of: {', '.join(METHODS)}.")] = "pe-be",
    target: Annotated[float, typer.Option("--target", help="pe/pe-be: per-image magnitude to optimise down to.")] = 1.0,
    l_target_ss: Annotated[float, typer.Option("--l-target-ss", help="prss: trigger and paraphrase acceptance level.")] = 1.0,
    l_target_pr: Annotated[float, typer.Option("--l-target-pr", help="prss: re-anchoring starts above this magnitude.")] = 3.0,
    mag_thres_pr: Annotated[float, typer.Option("--mag-thres-pr", help="prss: full re-anchoring (s = g) from here; > l.")] = 5.0,
    no_pr: Annotated[bool, typer.Option("--no-pr", help="prss: semantic search only.")] = False,
    noise_lambda: Annotated[float, typer.Option("--noise-lambda", help="gni: noise scale on the text embedding.")] = 0.1,
    repeat: Annotated[int, typer.Option("--repeat", min=1, help="rt/rna/cwr: insertions per prompt.")] = 4,
    mask_steps: Annotated[Optional[int], typer.Option("--mask-steps", min=1, help="-be: steps of the BE-mask pass (default: a full unmitigated generation).")] = None,
    num_images: Annotated[int, typer.Option("--num-images", min=1, help="Images per prompt.")] = 1,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Denoising steps.")] = 50,
    guidance: Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale (> 1).")] = 7.5,
    seed: Annotated[int, typer.Option("--seed", help="Base seed; image k of prompt p uses seed + p*num_images + k.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")] = 4,
    dtype: Annotated[str, typer.Option("--dtype", help="float32, float16 or bfloat16.")] = "float32",
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, mps, or auto.")] = "auto",
) -> None:
    """Generate with inference-time mitigation and record what changed."""
    settings = Settings(method=method, steps=steps, guidance=guidance, target=target, l_target_ss=l_target_ss,
                        l_target_pr=None if no_pr else l_target_pr, mag_thres_pr=mag_thres_pr,
                        noise_lambda=noise_lambda, repeat=repeat, mask_steps=mask_steps)
    settings.validate()
    done = run_mitigation(model, prompts, out, settings, num_images=num_images, seed=seed, batch_size=batch_size,
                          dtype=dtype, device=device)
    run = scanstore.read_run_json(done) or {}
    typer.echo(f"{run.get('status', '?')}: {run.get('num_records', 0)} images in {done}")
