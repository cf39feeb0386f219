"""`memlens mitigate`: the command; the work is `memlens.mitigation.runner.run_mitigation`.

The output folder has the scan's layout (`generations.jsonl`, `run.json`, `images/`, `be_maps/`, `overlays/`; one line
per image with the scan's keys), written through `memlens.rundir`, so every scan reader works on it. Each line adds
`method`, `triggered`, `initial_magnitude`, `final_magnitude`, `iterations`, `used_prompt`, and where they apply
`reanchored_steps`, `candidate_magnitudes` and `unmitigated_image`. Seeds and batches are the scan's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from memlens.cli import THREADS_HELP, set_threads

METHODS_HELP = "none, pe, pe-be, prss, prss-be, rt, rna, cwr, gni"


def mitigate_command(
    model: Annotated[str, typer.Option("--model", help="Hub id, local diffusers folder, or 'testbed'.")],
    prompts: Annotated[str, typer.Option("--prompts", help="Prompt file; caption1..captionK columns are SS paraphrases.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder; rerun the same command to resume.")],
    method: Annotated[str, typer.Option("--method", help=f"One of: {METHODS_HELP}.")] = "pe-be",
    target: Annotated[float, typer.Option("--target", help="pe/pe-be: per-image magnitude to optimise down to (> 0).")] = 1.0,
    l_target_ss: Annotated[float, typer.Option("--l-target-ss", help="prss: trigger and paraphrase acceptance level.")] = 1.0,
    l_target_pr: Annotated[float, typer.Option("--l-target-pr", help="prss: re-anchoring starts above this magnitude.")] = 3.0,
    mag_thres_pr: Annotated[float, typer.Option("--mag-thres-pr", help="prss: full re-anchoring (s = g) from here; > l.")] = 5.0,
    no_pr: Annotated[bool, typer.Option("--no-pr", help="prss: semantic search only.")] = False,
    noise_lambda: Annotated[float, typer.Option("--noise-lambda", help="gni: noise scale on the text embedding.")] = 0.1,
    repeat: Annotated[int, typer.Option("--repeat", min=1, help="rt/rna/cwr: insertions per prompt.")] = 4,
    mask_steps: Annotated[Optional[int], typer.Option("--mask-steps", min=1, help="-be: steps of the BE-mask pass (default: a full unmitigated generation).")] = None,
    num_images: Annotated[int, typer.Option("--num-images", min=1, help="Images per prompt.")] = 1,
    steps: Annotated[Optional[int], typer.Option(
        "--steps", min=1, help="Denoising steps. Default: the pipeline's recommended, else 50.")] = None,
    guidance: Annotated[Optional[float], typer.Option(
        "--guidance", help="Classifier-free guidance scale (> 1). Default: the pipeline's recommended, else 7.5.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Base seed; image k of prompt p uses seed + p*num_images + k.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")] = 4,
    dtype: Annotated[str, typer.Option("--dtype", help="float32, float16 or bfloat16.")] = "float32",
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, mps, or auto.")] = "auto",
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help=THREADS_HELP)] = None,
) -> None:
    """Generate with inference-time mitigation and record what changed."""
    from memlens.mitigation.runner import Settings, run_mitigation

    settings = Settings(method=method, steps=steps, guidance=guidance, target=target, l_target_ss=l_target_ss,
                        l_target_pr=None if no_pr else l_target_pr, mag_thres_pr=mag_thres_pr,
                        noise_lambda=noise_lambda, repeat=repeat, mask_steps=mask_steps)
    settings.validate()  # before the model loads
    set_threads(threads, device)
    res = run_mitigation(model, prompts, out, settings, num_images=num_images, seed=seed, batch_size=batch_size,
                         dtype=dtype, device=device)
    typer.echo(f"{res.status}: {res.num_records} images in {res.path} "
               f"({res.settings.steps} steps, guidance {res.settings.guidance})")
