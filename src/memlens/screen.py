"""The screening pass of `memlens scan --screen`: score every prompt with a cheap detector, then scan only the flagged.

A screen runs the stock pipeline on each prompt's first image (the seed `memlens scan` gives it) until the first
UNet call has returned, and stops it there (no denoising loop, no decoding):
- `D_first_step`: Wen's D at step 1, ||eps_c - eps_u|| at x_T (`quantities.difference_magnitude`): 2 evaluations, the
  same number the full scan's probe records as D[0] for that image;
- `anisotropy`: Asthana & Belagiannis' score (`field.detectors`), the same first call plus c and u at t_cos:
  4 evaluations.
A prompt is flagged when its score is >= the threshold; `run_screened_scan` writes every prompt's score to
`screen.jsonl` in the scan folder and runs `memlens.scan.run_scan` on the flagged prompts only
(`prompt_indices`), so each flagged image has the prompt_index, seed and file names a full scan gives it.

The screen is sharded and resumed like the scan: its batches are fixed slices of the prompt list; under
`accelerate launch` the processes take the batches still to do in turn, each appending whole batches to its own log
(`screen.jsonl` when alone, `screen-shards/rank-N.jsonl` when several); the main process folds the logs into one
ordered `screen.jsonl`. `screen.json` holds the screen's settings, and a rerun with others is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from memlens.errors import InputError

__all__ = ["SCREENS", "SCREEN_FILE", "SCREEN_JSON", "SCREEN_SHARDS", "ScreenedScan", "screen_scores",
           "run_screened_scan"]

SCREENS = ("D_first_step", "anisotropy")
SCREEN_FILE = "screen.jsonl"
SCREEN_JSON = "screen.json"
SCREEN_SHARDS = "screen-shards"
SCREEN_BATCH = 16  # the screen's smallest batch: its calls are short, bigger batches pay on every device


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


@dataclass(frozen=True)
class ScreenedScan:
    """What `run_screened_scan` did: the scan of the flagged prompts (None when none was flagged) and every prompt's
    row of `screen.jsonl`."""

    scan: Any  # memlens.scan.ScanResult | None
    rows: list[dict]
    is_main_process: bool = True

    @property
    def num_flagged(self) -> int:
        return sum(r["flagged"] for r in self.rows)


def _screen_options() -> dict[str, str]:
    from memlens.scan import _OPTION

    return {**_OPTION, "screen": "`screen`", "screen_threshold": "`screen_threshold`"}


def _screen_logs(out: Path) -> list[Path]:
    shards = sorted((out / SCREEN_SHARDS).glob("rank-*.jsonl")) if (out / SCREEN_SHARDS).is_dir() else []
    return [out / SCREEN_FILE, *shards]


def _screened(out: Path) -> dict[int, dict]:
    """Rows already written, by prompt_index (the first of each: a kill before a merge deleted its shards leaves
    duplicates)."""
    from memlens import rundir

    rows: dict[int, dict] = {}
    for path in _screen_logs(out):
        for n, row in enumerate(rundir.read_jsonl(path), start=1):
            index = row.get("prompt_index")
            if not isinstance(index, int) or isinstance(index, bool):
                raise InputError(f"{path} row {n}: field 'prompt_index' must be an integer, found {index!r}")
            rows.setdefault(index, row)
    return rows


def _merge_screen(out: Path) -> list[dict]:
    """Fold every screen log into one `screen.jsonl` ordered by prompt_index and drop the shards."""
    from memlens import rundir

    logs = _screen_logs(out)
    rows = [r for _, r in sorted(_screened(out).items())]
    in_main = [r["prompt_index"] for r in rundir.read_jsonl(logs[0])]
    if len(logs) > 1 or in_main != sorted(set(in_main)):
        data = "".join(json.dumps(rundir.jsonable(r)) + "\n" for r in rows).encode()
        rundir.atomic_write_bytes(out / SCREEN_FILE, data, durable=True)
        # Only after the merged file is in place: a kill before this leaves duplicates the next merge drops.
        for shard in logs[1:]:
            shard.unlink(missing_ok=True)
        try:
            (out / SCREEN_SHARDS).rmdir()
        except OSError:
            pass
    return rows


def _check_resume(out: Path, settings: dict, done: dict) -> Optional[dict]:
    """screen.json as found; refuse a screen of other settings, or screen rows without their settings."""
    from memlens import rundir

    path = out / SCREEN_JSON
    try:
        previous = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{path}: malformed JSON; move the folder aside or pick another output folder") from None
    if previous is not None and not isinstance(previous, dict):
        raise InputError(f"{path}: expected a JSON object")
    if previous is not None:
        why = rundir.settings_mismatch(previous.get("settings", {}), settings, _screen_options())
        if why:
            raise InputError(f"`out_dir` {out} holds a different screen: {why}; rerun with its settings or pick "
                             "another folder")
    elif done:
        raise InputError(f"`out_dir` {out} has {SCREEN_FILE} but no {SCREEN_JSON}; pick another folder")
    return previous


def _screen_pass(pipe, records, seeds: list[int], out: Path, settings: dict, state, *, screen: str,
                 threshold: float, batch_size: int, steps: int, guidance: float, height: int, width: int
                 ) -> list[dict]:
    """Every prompt's screen row, this process screening its share of the batches not yet done (module doc)."""
    from memlens import rundir

    alone = state.num_processes == 1
    log_path = out / SCREEN_FILE if alone else out / SCREEN_SHARDS / f"rank-{state.process_index}.jsonl"
    with rundir.Log(log_path, what="screen") as log:
        done = _screened(out)
        previous = _check_resume(out, settings, done)
        n = len(records)
        batches = [range(a, min(a + batch_size, n)) for a in range(0, n, batch_size)]
        # A batch with some rows missing is screened whole again (only the missing rows are written), so every
        # score comes from the batch it has in an uninterrupted screen.
        todo = [b for b in batches if any(p not in done for p in b)]
        state.wait_for_everyone()  # every process has read what is done before any appends
        if state.is_main_process and previous is None:
            rundir.write_json(out / SCREEN_JSON, {"kind": "screen", "settings": settings}, durable=True)
        for batch in todo[state.process_index::state.num_processes]:
            scores = screen_scores(pipe, [records[p].prompt for p in batch], [seeds[p] for p in batch],
                                   detector=screen, steps=steps, guidance=guidance, height=height, width=width,
                                   batch_size=len(batch))
            log.append([{"prompt_index": p, "prompt": records[p].prompt, "label": records[p].label,
                         "type": records[p].type, "seed": seeds[p], "screen": screen, "score": float(score),
                         "flagged": bool(score >= threshold)}
                        for p, score in zip(batch, scores) if p not in done])
    state.wait_for_everyone()
    if state.is_main_process:
        _merge_screen(out)
    state.wait_for_everyone()
    rows = [r for _, r in sorted(_screened(out).items())]
    if len(rows) != len(records):
        raise RuntimeError(f"{out / SCREEN_FILE}: {len(rows)} screen rows for {len(records)} prompts")
    return rows


def run_screened_scan(pipe_or_model: Any, prompts: Any, out_dir: Any, *, screen: str, screen_threshold: float,
                      num_images: int = 1, steps: Optional[int] = None, guidance: Optional[float] = None,
                      seed: int = 0, batch_size: int = 4, screen_batch_size: Optional[int] = None,
                      height: Optional[int] = None, width: Optional[int] = None, dtype: str = "float32",
                      device: Optional[str] = None, progress: bool = True) -> ScreenedScan:
    """Screen every prompt into `screen.jsonl`, then scan the flagged prompts into `out_dir` (see the module doc).

    `screen_batch_size` (default max(`batch_size`, 16)) is the prompts per screen call. A flagged prompt's images
    get the prompt_index, seeds and file names the full scan of `prompts` gives them, so their records equal the
    full scan's (bit for bit where the batches hold the same images, e.g. `batch_size` dividing `num_images`).
    """
    from memlens import rundir
    from memlens.models import pipeline_facts
    from memlens.scan import (DEFAULT_GUIDANCE, DEFAULT_STEPS, _check_guidance, _check_positive, _partial_state,
                              open_pipeline, prompt_identity, resolve_prompts, run_scan, scan_items)

    if screen not in SCREENS:
        raise InputError(f"`screen` must be one of {', '.join(SCREENS)}, got {screen!r}")
    if screen_threshold is None or not np.isfinite(screen_threshold):
        raise InputError("`screen_threshold` must be a finite number (prompts scoring >= it are scanned)")
    _check_positive(steps=steps, batch_size=batch_size, screen_batch_size=screen_batch_size, num_images=num_images,
                    height=height, width=width)
    _check_guidance(guidance)
    records = resolve_prompts(prompts)
    own = (SCREEN_FILE, SCREEN_JSON, SCREEN_SHARDS)
    out = rundir.check_output(out_dir, "scan", own=own)
    if rundir.read_run_json(out) is not None and not (out / SCREEN_JSON).is_file():
        # Checked before the model loads and before any screen file is made in someone's finished scan.
        raise InputError(f"`out_dir` {out} holds a scan without a screen; pick another folder")
    state = _partial_state()
    pipe, model_id = open_pipeline(pipe_or_model, dtype=dtype, device=device, state=state)
    facts = pipeline_facts(pipe)
    steps = steps or facts["default_steps"] or DEFAULT_STEPS
    guidance = guidance if guidance is not None else facts["default_guidance"] or DEFAULT_GUIDANCE
    height, width = height or facts["height"], width or facts["width"]
    if not height or not width:
        raise InputError("this pipeline has no default image size; pass `height` and `width`")
    # Each prompt's first image, with the seed the full scan gives it.
    seeds = [it.seed for it in scan_items([num_images] * len(records), seed) if it.image_index == 0]
    settings = json.loads(json.dumps({
        "model": model_id, **prompt_identity(records, prompts), "num_images": num_images, "steps": steps,
        "guidance": float(guidance), "seed": seed, "height": height, "width": width, "dtype": facts["dtype"],
        "screen": screen, "screen_threshold": float(screen_threshold)}))
    out.mkdir(parents=True, exist_ok=True)
    rows = _screen_pass(pipe, records, seeds, out, settings, state, screen=screen, threshold=screen_threshold,
                        batch_size=screen_batch_size or max(batch_size, SCREEN_BATCH), steps=steps,
                        guidance=guidance, height=height, width=width)
    flagged = [r["prompt_index"] for r in rows if r["flagged"]]
    if not flagged:
        return ScreenedScan(None, rows, state.is_main_process)
    result = run_scan(pipe, prompts, out, num_images=num_images, steps=steps, guidance=guidance, seed=seed,
                      batch_size=batch_size, height=height, width=width, dtype=dtype, device=device,
                      model_name=model_id, progress=progress, own_files=own, prompt_indices=flagged)
    return ScreenedScan(result, rows, state.is_main_process)
