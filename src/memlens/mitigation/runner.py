"""One batch of images through one mitigation method: decide per image, then generate with the stock pipeline.

Order of work for a batch (each image has its own seed, so its x_T does not depend on the batch):
1. encode the prompts and draw x_T as the pipeline would;
2. `-be` methods: an unmitigated pass under the probe gives each image's BE map (and, at full length, IS the
   unmitigated generation, kept for comparison);
3. the method decides per image (first-step evaluations only) whether it triggers and what to generate with;
4. generation:
   - when an unmitigated full pass exists, untriggered images are taken from it and only triggered ones are generated
     again;
   - otherwise one call on the whole batch, untriggered rows with their original inputs. Same batch shape and same
     row inputs give bit-identical rows (checked in the tests), so untriggered images equal the `none` method's;
   - PR adds rows to the UNet batch, which would change the other rows' floating-point results, so a batch in which
     only some images trigger PR is first generated unmitigated as a whole, then its triggered images again with PR.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from memlens import rundir

from memlens.errors import InputError
from memlens.mitigation import baselines
from memlens.mitigation.conditioning import (Conditioning, draw_noise, encode, first_step, image_magnitude,
                                             mask_tensor)
from memlens.mitigation.prompt_embedding import DEFAULT_ITERS, DEFAULT_LR, optimize_embeddings
from memlens.mitigation.prss import PromptReanchor, choose_candidates, validate_pr

__all__ = ["METHODS", "Settings", "Job", "Outcome", "mitigate_batch", "run_mitigation", "MitigationResult"]

METHODS = ("none", "pe", "pe-be", "prss", "prss-be", "rt", "rna", "cwr", "gni")
MASKED = ("pe-be", "prss-be")


@dataclass
class Settings:
    method: str = "none"
    steps: int | None = None  # None: the pipeline's recommendation (`default_num_inference_steps`), else 50
    guidance: float | None = None  # None: the pipeline's `default_guidance_scale`, else 7.5
    height: int | None = None
    width: int | None = None
    target: float = 1.0  # pe / pe-be: per-image magnitude to reach (n = 1 scale of the reference's README)
    lr: float = DEFAULT_LR
    max_iters: int = DEFAULT_ITERS
    l_target_ss: float = 1.0
    l_target_pr: float | None = 3.0  # None switches PR off (SS only)
    mag_thres_pr: float = 5.0
    noise_lambda: float = 0.1
    repeat: int = baselines.DEFAULT_REPEAT
    mask_steps: int | None = None  # -be: steps of the mask pass; None = a full unmitigated generation

    def validate(self) -> None:
        """Raise an `InputError` naming the first setting out of range (unresolved steps/guidance are skipped)."""
        if self.method not in METHODS:
            raise InputError(f"`method` {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.steps is not None and self.steps < 1:
            raise InputError(f"`steps` must be at least 1, got {self.steps}")
        if self.guidance is not None and self.guidance <= 1:
            raise InputError(f"`guidance` must be > 1 (the magnitudes need classifier-free guidance), got {self.guidance}")
        if not self.target > 0:
            # A magnitude is a norm: a target at or below 0 can never be reached and would optimise every image.
            raise InputError(f"`target` must be > 0, got {self.target}")
        if self.method.startswith("prss") and self.l_target_pr is not None:
            if not self.mag_thres_pr > self.l_target_pr:
                raise InputError(f"`mag_thres_pr` ({self.mag_thres_pr}) must be greater than `l_target_pr` "
                                 f"({self.l_target_pr}): the re-anchoring strength rises from 1 at l to g at M")
            if self.guidance is not None:
                validate_pr(self.l_target_pr, self.mag_thres_pr, self.guidance)
        if self.max_iters < 0:
            raise InputError(f"`max_iters` must be >= 0, got {self.max_iters}")
        if self.repeat < 1:
            raise InputError(f"`repeat` must be at least 1, got {self.repeat}")
        if self.mask_steps is not None and not 1 <= self.mask_steps <= (self.steps or self.mask_steps):
            raise InputError(f"`mask_steps` must be between 1 and `steps` ({self.steps}), got {self.mask_steps}")

    def resolved(self, pipe) -> "Settings":
        """These settings with steps, guidance and size taken from the pipeline where they were left unset: its
        recommendation (`default_num_inference_steps`, `default_guidance_scale`, as `memlens scan` does), else
        50 / 7.5, and its native size."""
        from dataclasses import replace

        from memlens.models import pipeline_facts
        from memlens.scan import DEFAULT_GUIDANCE, DEFAULT_STEPS

        facts = pipeline_facts(pipe)
        out = replace(
            self,
            steps=self.steps or facts["default_steps"] or DEFAULT_STEPS,
            guidance=self.guidance if self.guidance is not None else facts["default_guidance"] or DEFAULT_GUIDANCE,
            height=self.height or facts["height"],
            width=self.width or facts["width"],
        )
        out.validate()
        return out


@dataclass
class Job:
    prompt: str
    seed: int
    captions: Sequence[str] = ()


@dataclass
class Outcome:
    image: Any  # PIL image
    record: Any  # memlens.probe.ImageRecord of the generation that produced `image`
    triggered: bool
    used_prompt: str
    initial_magnitude: float | None
    final_magnitude: float | None
    iterations: int = 0
    reanchored_steps: int = 0
    unmitigated_image: Any = None  # when an unmitigated full pass was made
    unmitigated_record: Any = None
    extra: dict = field(default_factory=dict)


def _generate(pipe, probe_options: dict, cond: Conditioning, noise: torch.Tensor, prompts: list[str], steps: int,
              s: Settings, reanchor=None):
    # The probe is attached for generation calls only: the decision passes call the UNet directly, which its hooks
    # would take for a pipeline run.
    from memlens.probe import BrightEndingProbe

    # PR is entered after the probe: its batch-expanding pre-hook must run after the probe's, which reads the
    # pipeline's own [u, c] batch (see memlens.mitigation.prss).
    with BrightEndingProbe(pipe, prompts=list(prompts), **probe_options) as probe, (reanchor or nullcontext()):
        out = pipe(**cond.pipe_kwargs(), latents=noise, num_inference_steps=steps, guidance_scale=s.guidance,
                   height=s.height, width=s.width)
    records = list(probe.records)
    if len(records) != len(prompts):
        raise RuntimeError(f"the probe recorded {len(records)} images for {len(prompts)}")
    return list(out.images), records


def _merge_rows(cond: Conditioning, mod: Conditioning, rows: Sequence[int]) -> Conditioning:
    """`cond` with the given rows taken from `mod` (other rows stay the very same tensors' values)."""
    out = Conditioning(cond.embeds.clone(), cond.negative, None if cond.pooled is None else cond.pooled.clone(),
                       cond.negative_pooled)
    for i in rows:
        out.embeds[i] = mod.embeds[i]
        if out.pooled is not None:
            out.pooled[i] = mod.pooled[i]
    return out


def _with_size(pipe, s: Settings) -> Settings:
    # The pipelines' own default: the UNet's sample size times the VAE's scale factor.
    if s.height and s.width:
        return s
    from dataclasses import replace

    sample = pipe.unet.config.sample_size
    h, w = (sample, sample) if isinstance(sample, int) else tuple(sample)
    return replace(s, height=s.height or h * pipe.vae_scale_factor, width=s.width or w * pipe.vae_scale_factor)


def _latent_size(noise: torch.Tensor) -> tuple[int, int]:
    return noise.shape[-2], noise.shape[-1]


@dataclass
class _Decision:
    """What a method decided for each image of a batch, before generation."""

    triggered: list[bool]
    used: list[str]  # prompt per image (the probe finds the end token in it)
    mod: Conditioning  # conditioning to generate triggered images with
    initial: list[float | None]
    final: list[float | None]
    iterations: list[int]
    extra: list[dict]
    reanchor: tuple[float, float] | None = None  # PR's (l, M) when PR is on


def _undecided(prompts: list[str], cond: Conditioning) -> _Decision:
    n = len(prompts)
    return _Decision([False] * n, list(prompts), cond, [None] * n, [None] * n, [0] * n, [{} for _ in range(n)])


def _decide_pe(first, cond, masks, s: Settings, d: _Decision) -> None:
    res = optimize_embeddings(first(cond), cond.embeds, s.target, masks=masks, lr=s.lr, max_iters=s.max_iters)
    d.triggered, d.initial, d.final, d.iterations = res.triggered, res.initial, res.final, res.iterations
    d.mod = cond.with_embeds(res.embeds)


def _decide_prss(pipe, first, jobs, noise, masks, s: Settings, d: _Decision) -> None:
    # One first-step evaluation per image, its candidates batched, all from the image's own x_T.
    scores, encoded = [], []
    for i, job in enumerate(jobs):
        cands = [job.prompt, *job.captions]
        cc = encode(pipe, cands)
        m = None if masks is None else masks[i : i + 1].expand(len(cands), *masks.shape[1:])
        with torch.no_grad():
            diff = first(cc, noise[i : i + 1].expand(len(cands), *noise.shape[1:]).contiguous()).eps_diff()
            scores.append(image_magnitude(diff, m).tolist())
        encoded.append(cc)
    search = choose_candidates(scores, s.l_target_ss)
    d.triggered = search.triggered
    for i, k in enumerate(search.chosen):
        d.initial[i], d.final[i] = scores[i][0], scores[i][k]
        d.used[i] = [jobs[i].prompt, *jobs[i].captions][k]
        d.extra[i]["candidate_magnitudes"] = scores[i]
    d.mod = Conditioning.cat([cc.rows([k]) for cc, k in zip(encoded, search.chosen)])
    if s.l_target_pr is not None and any(d.triggered):
        d.reanchor = (s.l_target_pr, s.mag_thres_pr)


def _decide_baseline(pipe, first, cond, prompts, seeds, s: Settings, d: _Decision) -> None:
    with torch.no_grad():
        d.initial = image_magnitude(first(cond).eps_diff()).tolist()  # for comparison only: no detector
    d.triggered = [True] * len(prompts)
    if s.method == "gni":
        d.mod = cond.with_embeds(baselines.gaussian_noise(cond.embeds, s.noise_lambda, seeds))
    else:
        d.used = [baselines.augment_prompt(s.method, p, seed, pipe.tokenizer, s.repeat) for p, seed in zip(prompts, seeds)]
        d.mod = encode(pipe, d.used)


def mitigate_batch(pipe, jobs: Sequence[Job], s: Settings, probe_options: dict | None = None) -> list[Outcome]:
    """Run `s.method` for `jobs` as one batch; every generation is recorded by a `BrightEndingProbe(pipe,
    **probe_options)`. Returns one `Outcome` per job, in order."""
    s.validate()
    opts = dict(probe_options or {})
    if s.steps is None or s.guidance is None:
        s = s.resolved(pipe)
    s = _with_size(pipe, s)
    n = len(jobs)
    prompts = [j.prompt for j in jobs]
    seeds = [j.seed for j in jobs]
    cond = encode(pipe, prompts)
    noise = draw_noise(pipe, seeds, s.height, s.width, dtype=cond.embeds.dtype)

    def first(c: Conditioning, x: torch.Tensor = noise):
        return first_step(pipe, c, x, steps=s.steps, guidance=s.guidance, height=s.height, width=s.width)

    base = None  # (images, records) of an unmitigated pass
    base_full = False  # ... and whether it ran the full number of steps (then it IS the unmitigated generation)
    masks = None
    if s.method in MASKED:
        mask_steps = s.mask_steps or s.steps
        base = _generate(pipe, opts, cond, noise, prompts, mask_steps, s)
        base_full = mask_steps == s.steps
        masks = mask_tensor([r.be_map for r in base[1]], _latent_size(noise), cond.embeds.device)

    d = _undecided(prompts, cond)
    if s.method in ("pe", "pe-be"):
        _decide_pe(first, cond, masks, s, d)
    elif s.method in ("prss", "prss-be"):
        _decide_prss(pipe, first, jobs, noise, masks, s, d)
    elif s.method != "none":
        _decide_baseline(pipe, first, cond, prompts, seeds, s, d)

    hit = [i for i in range(n) if d.triggered[i]]
    # Untriggered rows keep their original inputs exactly, even where the method re-encoded them.
    mod = _merge_rows(cond, d.mod, hit)
    if d.reanchor is not None and 0 < len(hit) < n and not base_full:
        base = _generate(pipe, opts, cond, noise, prompts, s.steps, s)
        base_full = True

    images: list[Any] = [None] * n
    records: list[Any] = [None] * n
    reanchored = [0] * n
    todo = hit if base_full else list(range(n))
    if base_full:
        for i in range(n):
            if not d.triggered[i]:
                images[i], records[i] = base[0][i], base[1][i]
    if todo:
        hooks = None
        if d.reanchor is not None:
            hooks = PromptReanchor(pipe, cond.rows(todo), *d.reanchor, masks=None if masks is None else masks[todo],
                                   active=[d.triggered[i] for i in todo])
        imgs, recs = _generate(pipe, opts, mod.rows(todo), noise[todo], [d.used[i] for i in todo], s.steps, s,
                               reanchor=hooks)
        for j, i in enumerate(todo):
            images[i], records[i] = imgs[j], recs[j]
            reanchored[i] = hooks.reanchored_steps[j] if hooks is not None else 0

    outcomes = []
    for i in range(n):
        rec = records[i]
        criterion = rec.masked_magnitude if s.method in MASKED else rec.magnitude
        keep_base = base_full and d.triggered[i]
        outcomes.append(Outcome(
            image=images[i], record=rec, triggered=bool(d.triggered[i]), used_prompt=d.used[i],
            # Where the method measured nothing itself, the generation's own first-step value stands in.
            initial_magnitude=float(d.initial[i] if d.initial[i] is not None else rec.magnitude[0]),
            final_magnitude=float(d.final[i] if d.final[i] is not None else criterion[0]),
            iterations=int(d.iterations[i]),
            reanchored_steps=int(reanchored[i]),
            unmitigated_image=base[0][i] if keep_base else None,
            unmitigated_record=base[1][i] if keep_base else None,
            extra=d.extra[i],
        ))
    return outcomes


# --- a prompt file through one method, into a run directory ----------------------------------------------------------

UNMITIGATED = "unmitigated"

# Settings a resume must share with the run in the folder, and the parameter a user would change for each.
_COMPARED = {
    "model": "`model`", "prompts_sha256": "`prompts`", "num_images": "`num_images`", "seed": "`seed`",
    "height": "`height`", "width": "`width`", "dtype": "`dtype`", "mitigation": "`settings` (method and options)",
}


def _method_settings(s: Settings) -> dict:
    from dataclasses import asdict

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


@dataclass(frozen=True)
class MitigationResult:
    """What a mitigation run left in its folder, and the settings it resolved (steps and guidance included)."""

    path: Path
    status: str
    num_records: int
    num_images: int
    resumed_from: int
    settings: Settings


def run_mitigation(pipe_or_model: Any, prompts: Any, out_dir: Any, settings: Settings, *, num_images: int = 1,
                   seed: int = 0, batch_size: int = 4, dtype: str = "float32", device: str | None = "auto",
                   model_name: str | None = None, progress: bool = True) -> MitigationResult:
    """Mitigate every image of `prompts` into `out_dir` (the scan's layout, `kind: "mitigate"`); `pipe_or_model` is a
    pipeline or a MODEL string. Rerunning with the same settings resumes. Seeds and batches are the scan's."""
    from memlens.models import pipeline_facts
    from memlens.scan import (_check_positive, _progress_bar, batches_of, library_versions, open_pipeline,
                              prompt_identity, resolve_prompts, scan_items)

    _check_positive(num_images=num_images, batch_size=batch_size)
    settings.validate()
    records = resolve_prompts(prompts)
    out = rundir.check_output(out_dir, "mitigate", own=(UNMITIGATED,))
    pipe, model_id = open_pipeline(pipe_or_model, dtype=dtype, device=device, model_name=model_name)
    facts = pipeline_facts(pipe)
    settings = settings.resolved(pipe)

    run_settings = json.loads(json.dumps({
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
    }))
    items = scan_items([num_images] * len(records), seed)
    t0 = time.perf_counter()
    run = rundir.open_run(out, "mitigate", run_settings, _COMPARED)
    with run.log as log:
        done, previous = run.done, run.previous
        already = sum(it.key in done for it in items)
        for sub in (rundir.IMAGES, rundir.MAPS, rundir.OVERLAYS, UNMITIGATED):
            (out / sub).mkdir(parents=True, exist_ok=True)
        rundir.write_run_json(out, {
            "format": rundir.FORMAT, "kind": "mitigate", "status": "running",
            "started_at": (previous or {}).get("started_at") or _now(), "runs": (previous or {}).get("runs", 0) + 1,
            "settings": run_settings, "versions": library_versions(), "pipeline": facts,
        })
        bar = _progress_bar(len(items), already, progress, 1)
        for batch in batches_of(items, batch_size):
            if all(it.key in done for it in batch):
                continue
            # The whole batch again, so every image comes from the batch it would have in an uninterrupted run.
            jobs = [Job(records[it.prompt_index].prompt, it.seed, tuple(records[it.prompt_index].captions))
                    for it in batch]
            outcomes = mitigate_batch(pipe, jobs, settings)
            lines = [_write(out, it, records[it.prompt_index], o, settings.method)
                     for it, o in zip(batch, outcomes) if it.key not in done]
            log.append(lines)
            bar.update(len(lines))
        bar.close()
    merged = rundir.merge(out)
    info = rundir.read_run_json(out) or {}
    status = "complete" if len(merged) == len(items) else "incomplete"
    info.update(status=status, finished_at=_now(), num_records=len(merged), seconds=round(time.perf_counter() - t0, 2))
    rundir.write_run_json(out, info)
    return MitigationResult(Path(out), status, len(merged), len(items), already, settings)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _write(out: Path, item, src, o: Outcome, method: str):
    # The scan's own writer gives the image, map and overlay files and every scan key; mitigation adds its own.
    from memlens.maps import save_png
    from memlens.scan import save_generation

    gen = save_generation(out, src, item, o.image, o.record)
    extra = {
        "method": method,
        "triggered": o.triggered,
        "initial_magnitude": o.initial_magnitude,
        "final_magnitude": o.final_magnitude,
        "iterations": o.iterations,
        "used_prompt": o.used_prompt,
    }
    if method.startswith("prss"):
        extra["reanchored_steps"] = o.reanchored_steps
        extra["candidate_magnitudes"] = o.extra.get("candidate_magnitudes")
    if o.unmitigated_image is not None:
        extra["unmitigated_image"] = f"{UNMITIGATED}/{item.stem}.png"
        save_png(o.unmitigated_image, out / extra["unmitigated_image"])
        extra["unmitigated_D"] = np.asarray(o.unmitigated_record.magnitude, dtype=np.float32).tolist()
        extra["unmitigated_LD"] = np.asarray(o.unmitigated_record.masked_magnitude, dtype=np.float32).tolist()
    gen.extra.update(extra)
    return gen
