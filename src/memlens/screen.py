"""The screening pass of `memlens scan --screen`: score every prompt with a cheap detector, then scan only the flagged.

A screen runs the stock pipeline on each prompt's first image (the seed `memlens scan` gives it) until the first
UNet call has returned, and stops it there (no denoising loop, no decoding):
- `D_first_step`: Wen's D at step 1, ||eps_c - eps_u|| at x_T (`quantities.difference_magnitude`): 2 evaluations, the
  same number the full scan's probe records as D[0] for that image;
- `anisotropy`: Asthana & Belagiannis' score (`field.detectors`), the same first call plus c and u at t_cos:
  4 evaluations.
A prompt is flagged when its score is >= the threshold; `run_screened_scan` writes every prompt's score to
`screen.jsonl` in the scan folder and runs `memlens.scan.run_scan` on the flagged prompts only, so a rerun with the
same settings resumes like any scan (the screen itself is recomputed: it is the cheap part).
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

import numpy as np

from memlens.errors import InputError

__all__ = ["SCREENS", "SCREEN_FILE", "screen_scores", "run_screened_scan"]

SCREENS = ("D_first_step", "anisotropy")
SCREEN_FILE = "screen.jsonl"


class _Stop(Exception):
    """Raised from the UNet's forward hook once the first call's scores are taken: the loop need not go on."""


def screen_scores(pipe, prompts: Sequence[str], seeds: Sequence[int], *, detector: str = "D_first_step",
                  steps: int, guidance: float, height: int, width: int, batch_size: int = 16) -> np.ndarray:
    """One score per prompt (larger = more memorized) from the first UNet call of its image with seed `seeds[i]`."""
    import torch

    from memlens import quantities, unet_call
    from memlens.field import detectors

    if detector not in SCREENS:
        raise InputError(f"`screen` must be one of {', '.join(SCREENS)}, got {detector!r}")
    if guidance <= 1:
        raise InputError(f"`guidance` must be above 1 for a screen (it compares eps_c with eps_u), got {guidance}")
    scores: list[np.ndarray] = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start:start + batch_size])
        got: dict = {}

        def after(module, args, kwargs, output):
            sample, timestep = unet_call.sample_and_timestep(args, kwargs)
            channels = sample.shape[1]
            eps = unet_call.prediction(output)
            if detector == "D_first_step":
                got["s"] = quantities.difference_magnitude(quantities.guidance_difference(eps, channels))
            else:
                u_rows, c_rows = unet_call.cfg_rows(sample.shape[0])
                extra = {k: v for k, v in kwargs.items() if k not in ("sample", "timestep")}
                if len(args) > 2:
                    extra["encoder_hidden_states"] = args[2]
                extra["return_dict"] = False
                _, t_cos = detectors.anisotropy_timesteps(pipe.scheduler.timesteps)
                # forward(), not __call__: this hook must not see its own extra evaluation.
                out_cos = module.forward(sample, t_cos, **extra)[0][:, :channels]
                prediction_type = pipe.scheduler.config.prediction_type
                a_t = float(pipe.scheduler.alphas_cumprod[int(timestep.flatten()[0]) if torch.is_tensor(timestep)
                                                          else int(timestep)])
                gamma_key = "sd1" if prediction_type == "epsilon" else "sd2"
                norm, cos = detectors.anisotropy_terms(
                    eps[c_rows, :channels], eps[u_rows, :channels], out_cos[c_rows], out_cos[u_rows],
                    norm_scale=detectors.anisotropy_norm_scale(prediction_type, a_t))
                got["s"] = detectors.anisotropy_combine(norm, cos, *detectors.ANISOTROPY_GAMMAS[gamma_key])
            raise _Stop

        handle = pipe.unet.register_forward_hook(after, with_kwargs=True)
        try:
            with torch.no_grad():
                pipe(batch, generator=[torch.Generator().manual_seed(int(s)) for s in seeds[start:start + len(batch)]],
                     num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                     output_type="latent")
        except _Stop:
            pass
        finally:
            handle.remove()
        if "s" not in got:
            raise InputError(f"{type(pipe).__name__} finished without calling its UNet; nothing to screen")
        scores.append(got["s"].float().cpu().numpy())
    return np.concatenate(scores)


def run_screened_scan(pipe_or_model: Any, prompts: Any, out_dir: Any, *, screen: str, screen_threshold: float,
                      num_images: int = 1, steps: Optional[int] = None, guidance: Optional[float] = None,
                      seed: int = 0, batch_size: int = 4, height: Optional[int] = None, width: Optional[int] = None,
                      dtype: str = "float32", device: Optional[str] = None, progress: bool = True):
    """Screen every prompt, write `screen.jsonl`, and scan the flagged prompts into `out_dir` (see the module doc).

    Returns (ScanResult or None when nothing was flagged, the per-prompt rows of `screen.jsonl`). The flagged
    prompts are scanned as their own prompt list (prompt_index counts among them; `screen.jsonl` maps each back to
    its position in the full list), so their seeds are those of a scan of that list.
    """
    from memlens import rundir
    from memlens.models import pipeline_facts
    from memlens.scan import (DEFAULT_GUIDANCE, DEFAULT_STEPS, _check_guidance, _check_positive, image_seed,
                              open_pipeline, resolve_prompts, run_scan)

    if screen not in SCREENS:
        raise InputError(f"`screen` must be one of {', '.join(SCREENS)}, got {screen!r}")
    if screen_threshold is None or not np.isfinite(screen_threshold):
        raise InputError("`screen_threshold` must be a finite number (prompts scoring >= it are scanned)")
    _check_positive(steps=steps, batch_size=batch_size, num_images=num_images, height=height, width=width)
    _check_guidance(guidance)
    records = resolve_prompts(prompts)
    out = rundir.check_output(out_dir, "scan", own=(SCREEN_FILE,))
    pipe, model_id = open_pipeline(pipe_or_model, dtype=dtype, device=device)
    facts = pipeline_facts(pipe)
    steps = steps or facts["default_steps"] or DEFAULT_STEPS
    guidance = guidance if guidance is not None else facts["default_guidance"] or DEFAULT_GUIDANCE
    height, width = height or facts["height"], width or facts["width"]
    seeds = [image_seed(seed, p, 0, num_images) for p in range(len(records))]
    scores = screen_scores(pipe, [r.prompt for r in records], seeds, detector=screen, steps=steps, guidance=guidance,
                           height=height, width=width, batch_size=max(batch_size, 16))
    rows = [{"prompt_index": p, "prompt": r.prompt, "label": r.label, "type": r.type, "seed": seeds[p],
             "screen": screen, "score": float(scores[p]), "flagged": bool(scores[p] >= screen_threshold)}
            for p, r in enumerate(records)]
    out.mkdir(parents=True, exist_ok=True)
    rundir.atomic_write_bytes(out / SCREEN_FILE, "".join(json.dumps(rundir.jsonable(r)) + "\n" for r in rows).encode())
    flagged = [records[r["prompt_index"]] for r in rows if r["flagged"]]
    if not flagged:
        return None, rows
    result = run_scan(pipe, flagged, out, num_images=num_images, steps=steps, guidance=guidance, seed=seed,
                      batch_size=batch_size, height=height, width=width, dtype=dtype, device=device,
                      model_name=model_id, progress=progress, own_files=(SCREEN_FILE,))
    return result, rows
