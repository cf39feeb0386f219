"""`memlens bench`: every localizer and detector of the field on the same generations, in one generation pass.

One pipeline call per batch does all the work:
- three `BrightEndingProbe`s (end token; the padding after it; the end token on the outer blocks; they share the
  capture processors) record the BE maps, D and LD per step, and keep the per-step energy maps (`keep_energy=True`), which give the score-difference
  map for free;
- `FieldHooks`, a forward hook on the UNet registered after the probes, reads the step from the scheduler
  (`unet_call.step_index`) and, on the generation's own inputs, adds at the first step the anisotropy cosine term's
  two evaluations and SAIL's two JVPs, and at the last step Kim & Lee's Hutchinson curvature map. It calls
  `unet.forward` directly, so neither the probes' hooks nor its own see those extra evaluations; the probes' attention
  sinks are idle by then (they capture only between their own pre- and post-hooks).
Formulas come from `memlens.quantities` and `memlens.field`, numbers from `memlens.metrics` and
`memlens.field.thresholds`; nothing is re-implemented here.

Cost is measured in the same run: the wall time of each UNet step and of each extra computation, so a method's
relative wall time is (the generation steps it needs + its own extra work) / (the plain generation's time).

Outputs (written to a temporary sibling folder and swapped in by `rundir.atomic_write_dir`: OUT is whole or absent):
    OUT/leaderboard.json   {"localization": {...}, "detection": {...}, "mitigation": {}, "settings", "n"}
    OUT/leaderboard.md     the table
    OUT/leaderboard.html   ROC curves and example maps side by side
    OUT/generations.jsonl  one row per generation: stem, prompt, label, type, has_mask, oracle_set, scores (and
                           label_row, the label file's row, with a Webster folder)
    OUT/maps/<stem>.npz    per-generation maps (latent / attention resolution), per-step D and LD, and the mask
    OUT/images/<stem>.png  the generated image
"""

from __future__ import annotations

import base64
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memlens.errors import InputError

__all__ = ["LOCALIZERS", "DETECTORS", "BenchSettings", "run_bench", "leaderboard", "QUICK", "WEBSTER_LABELS",
           "webster_line"]

LOCALIZERS = ("be", "be_padding", "be_outer", "score_difference", "curvature_difference", "be_x_score_difference")
DETECTORS = ("D", "D_first_step", "D_first_10", "LD", "anisotropy", "sharpness")
LEADERBOARD = "leaderboard.json"
FIRST_K = 10

# --quick: a CI-sized run (every organism item once, a few generic prompts, few steps and probes).
QUICK = {"per_memorized": 1, "per_generic": 1, "n_generic": 6, "steps": 6, "probes": 2}
# An epsilon model uses the anisotropy weights of the SD1 path of their code, a v model those of the SD2 path.
_GAMMAS_BY_PREDICTION = {"epsilon": "sd1", "v_prediction": "sd2"}


@dataclass
class BenchSettings:
    # memlens demo's set: 8 images per planted item, 2 per each of 64 generic prompts (128 negatives, so a 1% FPR
    # point exists).
    per_memorized: int = 8
    per_generic: int = 2
    n_generic: int = 64
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    batch_size: int = 16
    probes: int = 16

    def check(self) -> None:
        for name in ("per_memorized", "per_generic", "n_generic", "batch_size", "probes"):
            if getattr(self, name) < 1:
                raise InputError(f"`{name}` must be at least 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 3:
            # The anisotropy cosine term reads timesteps[-3].
            raise InputError(f"`steps` must be at least 3 (anisotropy uses the third-to-last step), got {self.steps}")
        if self.guidance is not None and self.guidance <= 1:
            raise InputError(f"`guidance` must be above 1 (every method compares eps_c with eps_u), "
                             f"got {self.guidance}")


@dataclass
class Item:
    """One generation to make: its prompt, label (1 memorized), type, seed, and how to get its mask."""

    prompt: str
    label: int
    type: str
    seed: int
    prompt_index: int
    image_index: int
    group: str | None = None
    mask: np.ndarray | None = None  # (H, W) bool, fixed in advance (prompt files); organism masks come after scoring
    truth: Any = None  # a field.webster.WebsterItem: its mask is read at the generated image's size

    @property
    def stem(self) -> str:
        from memlens.rundir import stem

        return stem(self.prompt_index, self.image_index)


# --------------------------------------------------------------------------------------------------------------
# The extra work inside the generation


class FieldHooks:
    """A UNet forward hook computing the field's methods on the generation's own inputs (see the module doc)."""

    def __init__(self, pipe, *, probes: int, seed: int):
        self.pipe = pipe
        self.unet = pipe.unet
        self.probes = probes
        import torch

        self.generator = torch.Generator().manual_seed(seed)
        self.prediction_type = pipe.scheduler.config.prediction_type
        self.handles: list = []
        self.reset()

    def reset(self) -> None:
        self.step_seconds: list[float] = []
        self.extra_seconds = {"anisotropy": 0.0, "sharpness": 0.0, "curvature_difference": 0.0}
        self.scores: dict[str, Any] = {}
        self._t0 = 0.0

    def __enter__(self):
        self.handles = [self.unet.register_forward_pre_hook(self._before, with_kwargs=True),
                        self.unet.register_forward_hook(self._after, with_kwargs=True)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _before(self, module, args, kwargs):
        self._t0 = time.perf_counter()

    def _model(self, kwargs: dict, rows, batch: int, channels: int):
        import torch

        from memlens import unet_call

        index = torch.as_tensor(rows)
        cond = {k: unet_call.select_rows(v, index, batch) for k, v in kwargs.items() if k not in ("sample", "timestep")}
        cond["return_dict"] = False

        def model(x, t, c=cond):
            # forward(), not __call__: the extra evaluations must not reach the probes' hooks.
            return self.unet.forward(x, t, **c)[0][:, :channels]

        return model

    def _after(self, module, args, kwargs, output):
        import torch

        from memlens import unet_call
        from memlens.field import curvature, detectors

        self.step_seconds.append(time.perf_counter() - self._t0)
        sample, timestep = unet_call.sample_and_timestep(args, kwargs)
        kwargs = dict(kwargs)
        if len(args) > 2:
            kwargs["encoder_hidden_states"] = args[2]
        timesteps = self.pipe.scheduler.timesteps
        step = unet_call.step_index(timestep, timesteps)
        batch, channels = sample.shape[0], sample.shape[1]
        u_rows, c_rows = unet_call.cfg_rows(batch)
        cond_model = self._model(kwargs, range(c_rows.start, c_rows.stop), batch, channels)
        uncond_model = self._model(kwargs, range(u_rows.start, u_rows.stop), batch, channels)
        # The denoiser interface of memlens.field: model(x, t, cond) with cond naming the half.
        model = lambda x, t, which: (cond_model if which == "c" else uncond_model)(x, t)  # noqa: E731
        eps = unet_call.prediction(output)[:, :channels]
        eps_u, eps_c = eps[u_rows], eps[c_rows]
        x = sample[c_rows]  # both halves share the latents
        alphas = self.pipe.scheduler.alphas_cumprod
        t_int = int(timestep.flatten()[0]) if torch.is_tensor(timestep) else int(timestep)
        a_t = float(alphas[t_int])
        if step == 0:
            t0 = time.perf_counter()
            t_norm, t_cos = detectors.anisotropy_timesteps(timesteps)
            gammas = detectors.ANISOTROPY_GAMMAS[_GAMMAS_BY_PREDICTION.get(self.prediction_type, "sd1")]
            with torch.no_grad():
                # DDIM and DDPM do not scale inputs per timestep, so x_T is the t_cos input too (their code's case).
                out_c_cos, out_u_cos = model(x, t_cos, "c"), model(x, t_cos, "u")
            norm, cos = detectors.anisotropy_terms(
                eps_c, eps_u, out_c_cos, out_u_cos,
                norm_scale=detectors.anisotropy_norm_scale(self.prediction_type, a_t))
            self.scores["anisotropy"] = detectors.anisotropy_combine(norm, cos, *gammas).cpu().numpy()
            self.scores["anisotropy_norm"] = norm.cpu().numpy()
            self.scores["anisotropy_cos"] = cos.cpu().numpy()
            t1 = time.perf_counter()
            sharp = detectors.sharpness_score(model, x, timestep, "c", "u",
                                              scale=detectors.score_scale(self.prediction_type, a_t),
                                              outputs=(eps_c, eps_u), jvp="double_backward")
            self.scores["sharpness"] = sharp.cpu().numpy()
            t2 = time.perf_counter()
            self.extra_seconds["anisotropy"] += t1 - t0
            self.extra_seconds["sharpness"] += t2 - t1
        if step == len(timesteps) - 1:
            t0 = time.perf_counter()
            cmap = curvature.curvature_difference_map(model, x, timestep, "c", "u", probes=self.probes,
                                                      generator=self.generator)
            self.scores["curvature_difference"] = cmap.cpu().numpy()
            self.scores["alpha_bar_last"] = a_t
            self.extra_seconds["curvature_difference"] += time.perf_counter() - t0
        return None


# --------------------------------------------------------------------------------------------------------------
# Inputs


def _organism_items(organism: Path, s: BenchSettings):
    from memlens.scan import scan_items
    from memlens.testbed.demo import demo_prompts
    from memlens.testbed.items import load_ground_truth

    truth = load_ground_truth(organism)
    if s.n_generic > len(truth.generic_prompts):
        raise InputError(f"`n_generic` is {s.n_generic} but the organism lists {len(truth.generic_prompts)} generic "
                         "prompts")
    records = demo_prompts(truth, s.n_generic)
    counts = [s.per_memorized if r.label == 1 else s.per_generic for r in records]
    items = [Item(records[it.prompt_index].prompt, int(records[it.prompt_index].label), records[it.prompt_index].type,
                  it.seed, it.prompt_index, it.image_index,
                  group=records[it.prompt_index].index if records[it.prompt_index].label == 1 else None)
             for it in scan_items(counts, s.seed)]
    return items, truth.by_group()


def _file_items(prompts: Path, masks: Path | None, s: BenchSettings) -> list[Item]:
    from memlens.evaluate import read_mask
    from memlens.prompts import load_prompts
    from memlens.scan import scan_items

    records = load_prompts(prompts)
    for i, r in enumerate(records):
        if r.label not in (0, 1):
            raise InputError(f"`prompts` {prompts}: row {i + 1} has no 0/1 label; the bench needs labelled prompts")
    if len({r.label for r in records}) < 2:
        raise InputError(f"`prompts` {prompts}: needs both memorized (1) and non-memorized (0) prompts")
    if masks is not None and not Path(masks).is_dir():
        raise InputError(f"`masks` {masks}: not a folder")
    counts = [s.per_memorized if r.label == 1 else s.per_generic for r in records]
    items = []
    for it in scan_items(counts, s.seed):
        r = records[it.prompt_index]
        mask = None
        if masks is not None and r.label == 1:
            name = r.index if r.index is not None else it.prompt_index
            path = Path(masks) / f"{name}.png"
            mask = read_mask(path) if path.is_file() else None
        items.append(Item(r.prompt, int(r.label), r.type or ("memorized" if r.label else "non-memorized"), it.seed,
                          it.prompt_index, it.image_index, mask=mask))
    return items


# The label file a local copy of Webster's `fraisdufour/templates-verbs` holds for SD v1 (beside `templates/`).
WEBSTER_LABELS = "groundtruth_parquets/sdv1_bb_edge_groundtruth.parquet"


def _webster_items(folder: Path, labels: Path | None, s: BenchSettings):
    """Items of a Webster / mem-curv-diff label file with the folder's template masks, and the loader's report.

    A memorized prompt's image k takes the k-th seed of the file's `gen_seeds` when it lists one (the seeds the
    copies were found with; a mem-curv-diff pair also names the template that seed copies), else the bench's seed."""
    from memlens.field.webster import load_webster
    from memlens.scan import scan_items

    if not folder.is_dir():
        raise InputError(f"`webster` {folder}: not a folder (expected a local copy of fraisdufour/templates-verbs)")
    if labels is None:
        labels = folder / WEBSTER_LABELS
        if not labels.is_file():
            raise InputError(f"`webster` {folder}: no {WEBSTER_LABELS}; pass the label file with `prompts`")
    truths, report = load_webster(labels, templates=folder)
    kinds = {t.label for t in truths}
    if kinds != {0, 1}:
        found = ", ".join(sorted(report.kinds)) or "no rows left"
        raise InputError(f"`prompts` {labels}: needs memorized and non-memorized prompts; found {found}")
    counts = [s.per_memorized if t.label == 1 else s.per_generic for t in truths]
    items = []
    for it in scan_items(counts, s.seed):
        t = truths[it.prompt_index]
        seed = t.seeds[it.image_index] if t.label == 1 and it.image_index < len(t.seeds) else it.seed
        items.append(Item(t.prompt, t.label, t.kind, seed, it.prompt_index, it.image_index, truth=t))
    return items, _webster_summary(folder, labels, report)


def _webster_summary(folder: Path, labels: Path, report) -> dict:
    """What leaderboard.json says of the ground truth: where it came from, what was used, what was dead."""
    return {"source": "webster", "folder": str(folder), "labels": str(labels), "label_rows": report.n_rows,
            "prompts_used": report.n_items, "kinds": dict(sorted(report.kinds.items())),
            "dead": dict(sorted(report.dead.items())), "dead_total": sum(report.dead.values()),
            "dead_examples": list(report.notes)}


def _webster_mask(it: Item, shape: tuple[int, int]) -> tuple[np.ndarray | None, str]:
    """mem-curv-diff's ground truth at the generated size: a template copy has its template's mask (the localization
    set), an exact or retrieved copy is all memorized ("ones"), a non-memorized prompt nothing ("zeros")."""
    from memlens.field.webster import ground_truth_mask

    if it.truth.kind == "template":
        return ground_truth_mask(it.truth, shape, it.seed), "mask"
    return None, "zeros" if it.label == 0 else "ones"


# --------------------------------------------------------------------------------------------------------------
# The run


def _generate(pipe, items: list[Item], s: BenchSettings, progress: bool):
    """One pipeline call per batch, probes and field hooks attached; yields per-batch (items, images, records,
    field scores, timings)."""
    import torch

    from memlens.probe import BrightEndingProbe

    steps = s.steps
    kwargs = {} if s.guidance is None else {"guidance_scale": s.guidance}
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    for start in range(0, len(items), s.batch_size):
        batch = items[start:start + s.batch_size]
        eos_probe = BrightEndingProbe(pipe, keep_energy=True)
        pad_probe = BrightEndingProbe(pipe, token="padding")
        outer_probe = BrightEndingProbe(pipe, layers="outer")
        hooks = FieldHooks(pipe, probes=s.probes, seed=s.seed + start)
        t0 = time.perf_counter()
        with eos_probe, pad_probe, outer_probe, hooks:
            gens = [torch.Generator().manual_seed(it.seed) for it in batch]
            out = pipe([it.prompt for it in batch], generator=gens, output_type="np", **kwargs)
        total = time.perf_counter() - t0
        if progress:
            print(f"bench: {start + len(batch)}/{len(items)} images", flush=True)
        images = (np.clip(np.asarray(out.images), 0, 1) * 255).round().astype(np.uint8)
        yield batch, images, eos_probe.records, pad_probe.records, outer_probe.records, hooks, total


def _method_costs(steps: int, probes: int, timing: dict) -> dict:
    """Cost per image in UNet evaluations (one forward of one image under one condition; a JVP or VJP counted as 2,
    docs/field.md) and in wall time relative to the plain generation, both from this run's measurements."""
    T = steps
    k = min(FIRST_K, T)
    gen = timing["generation_s"]
    steps_s = timing["step_s"]  # mean wall time of each step's UNet call, per image
    extra = timing["extra_s"]

    def rel(seconds: float) -> float:
        return float(seconds / gen)

    full = {"unet_evaluations": 2 * T, "needs_generation": "full", "wall_time_relative": 1.0}
    return {
        "be": dict(full, breakdown=f"the generation's {2 * T} evaluations; map read at the last step"),
        "be_padding": dict(full, breakdown="as be (same generation and capture)"),
        "be_outer": dict(full, breakdown="as be, read on the first down and the last up block with cross-attention"),
        "score_difference": dict(full, breakdown="the probe's last-step energy map / sigma_t^2; no extra work"),
        "be_x_score_difference": dict(full, breakdown="the BE map (bilinear to latent size) x the score difference"),
        "curvature_difference": {
            "unet_evaluations": 2 * T + 2 + 4 * probes, "needs_generation": "full",
            "breakdown": f"generation {2 * T} + 2 evaluations with a graph at the last step + {probes} VJPs through "
                         f"both branches (x 2 each)",
            "wall_time_relative": rel(gen + extra["curvature_difference"])},
        "D": dict(full, breakdown=f"mean over all {T} steps"),
        "LD": dict(full, breakdown="needs the last-step BE map as its mask"),
        "D_first_step": {"unet_evaluations": 2, "needs_generation": "step 1",
                         "breakdown": "the first step's c and u evaluations", "wall_time_relative": rel(steps_s[0])},
        f"D_first_{FIRST_K}": {"unet_evaluations": 2 * k, "needs_generation": f"steps 1-{k}",
                               "breakdown": f"the first {k} steps", "wall_time_relative": rel(sum(steps_s[:k]))},
        "anisotropy": {"unet_evaluations": 4, "needs_generation": "no (pure noise)",
                       "breakdown": "c and u at t_norm (the first step's) + c and u at t_cos",
                       "wall_time_relative": rel(steps_s[0] + extra["anisotropy"])},
        "sharpness": {"unet_evaluations": 6, "needs_generation": "no (first step)",
                      "breakdown": "the first step's c and u + 2 JVPs (x 2 each)",
                      "wall_time_relative": rel(steps_s[0] + extra["sharpness"])},
    }


def _resolve_out(out_dir: Path) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"`out_dir` {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / LEADERBOARD).is_file():
        raise InputError(f"`out_dir` {out}: not empty and not an earlier bench; choose a new folder")
    if not out.parent.is_dir():
        raise InputError(f"`out_dir` {out}: its parent folder does not exist")
    return out


def run_bench(out_dir: str | Path, *, model: str | Any = "testbed", prompts: str | Path | None = None,
              masks: str | Path | None = None, webster: str | Path | None = None,
              settings: BenchSettings | None = None, dtype: str = "float32", device: str = "cpu",
              progress: bool = True) -> dict:
    """Run every method on one set of generations and write the leaderboard to `out_dir`; returns the leaderboard.

    `model="testbed"` (or another shipped organism's name, `testbed.pipeline.SHIPPED`, or an organism folder holding
    `ground_truth/`) takes prompts, labels, types and masks from the
    organism's ground truth; a local item's mask is then used only for generations that reproduce the item (as
    `memlens demo`). Any other model needs `prompts`: a prompt file with 0/1 labels (and types), plus optionally
    `masks`, a folder of `<index>.png` (or `<prompt_index>.png`) masks for memorized prompts.
    `webster`, a local copy of Webster's `fraisdufour/templates-verbs` (`templates/metadata.parquet` and the masks),
    takes labels and types from a Webster / mem-curv-diff label file (`prompts`, default `WEBSTER_LABELS` in that
    folder) and localization masks from the templates; dead entries are counted in `leaderboard.json`'s
    `ground_truth`.
    """
    s = settings or BenchSettings()
    s.check()
    out = _resolve_out(Path(out_dir))
    organism, truth = None, None
    from memlens.testbed.pipeline import SHIPPED

    if isinstance(model, str) and (model in SHIPPED or (Path(model) / "ground_truth").is_dir()):
        organism = Path(SHIPPED.get(model, model))
        if prompts is not None:
            raise InputError("`prompts` is only for other models: the organism's ground truth gives its prompts")
        if webster is not None:
            raise InputError("`webster` is only for other models: the organism's ground truth gives its masks")
        items, groups = _organism_items(organism, s)
    elif webster is not None:
        if masks is not None:
            raise InputError("`masks` and `webster` both give masks; the Webster folder's templates are the masks")
        items, truth = _webster_items(Path(webster), Path(prompts) if prompts is not None else None, s)
        groups = {}
    else:
        if prompts is None:
            raise InputError("`prompts` is needed for a model other than the organism (a file with 0/1 labels)")
        items, groups = _file_items(Path(prompts), Path(masks) if masks else None, s), {}

    from memlens import rundir

    board: dict = {}

    def write(tmp: Path) -> None:
        (tmp / "maps").mkdir()
        (tmp / "images").mkdir()
        board.update(_run_into(tmp, model, organism, items, groups, s, dtype, device, progress, truth))

    # The whole folder is swapped in at the end: an earlier bench stays whole until the new one is complete.
    rundir.atomic_write_dir(out, write)
    return board


def _load_pipe(model, organism: Path | None, dtype: str, device: str):
    if organism is not None:
        from memlens.testbed.pipeline import load_pipeline

        return load_pipeline(organism)
    if not isinstance(model, str):
        return model
    from memlens.models import load_pipeline

    return load_pipeline(model, dtype=dtype, device=device)


def _run_into(tmp: Path, model, organism, items, groups, s: BenchSettings, dtype, device, progress,
              truth: dict | None = None) -> dict:
    import torch
    from PIL import Image

    from memlens import quantities, rundir
    from memlens.maps import save_png

    pipe = _load_pipe(model, organism, dtype, device)
    rows = []
    step_sum = None
    gen_s, n_images = 0.0, 0
    extra_s = {"anisotropy": 0.0, "sharpness": 0.0, "curvature_difference": 0.0}
    steps_used = None
    for batch, images, eos_recs, pad_recs, outer_recs, hooks, total in _generate(pipe, items, s, progress):
        nb = len(batch)
        extra = sum(hooks.extra_seconds.values())
        gen_s += total - extra
        for key, v in hooks.extra_seconds.items():
            extra_s[key] += v
        per_step = np.asarray(hooks.step_seconds)
        step_sum = per_step if step_sum is None else step_sum + per_step
        n_images += nb
        a_last = hooks.scores["alpha_bar_last"]
        for i, it in enumerate(batch):
            rec, pad = eos_recs[i], pad_recs[i]
            steps_used = len(rec.magnitude)
            # Kim & Lee's score difference: the last step's energy over sigma_t^2 = 1 - alpha_bar_t.
            score_diff = rec.energy[-1] / (1.0 - a_last)
            if organism is not None:
                mask, oracle_role = _organism_mask(images[i], it, groups)
            elif it.truth is not None:
                mask, oracle_role = _webster_mask(it, images[i].shape[:2])
            else:
                mask = None if it.mask is None else _at_size(it.mask, images[i].shape[:2])
                oracle_role = "mask" if mask is not None else ("zeros" if it.label == 0 else None)
            # A combination, declared before the full run: BE says where within the image, the score difference's
            # absolute size says whether anything there is memorized at all (BE maps are attention, on the same
            # scale for a copy and for a novel image).
            be_latent = quantities.mask_to_latent(torch.from_numpy(rec.be_map)[None], score_diff.shape)[0].numpy()
            maps = {"be": rec.be_map, "be_padding": pad.be_map, "be_outer": outer_recs[i].be_map,
                    "score_difference": score_diff.astype(np.float32),
                    "curvature_difference": hooks.scores["curvature_difference"][i].astype(np.float32),
                    "be_x_score_difference": (be_latent * score_diff).astype(np.float32)}
            arrays = {f"map_{k}": v for k, v in maps.items()}
            arrays.update(D_steps=rec.magnitude, LD_steps=rec.masked_magnitude, timesteps=rec.timesteps)
            if mask is not None:
                arrays["mask"] = mask
            rundir.atomic_write(tmp / "maps" / f"{it.stem}.npz", lambda fh, a=arrays: np.savez_compressed(fh, **a))
            save_png(Image.fromarray(images[i]), tmp / "images" / f"{it.stem}.png")
            rows.append({
                "stem": it.stem, "prompt": it.prompt, "prompt_index": it.prompt_index, "image_index": it.image_index,
                "seed": it.seed, "label": it.label, "type": it.type, "group": it.group, "has_mask": mask is not None,
                "image_shape": list(images[i].shape[:2]), "oracle_set": oracle_role,
                # the label file's own row (mem-curv-diff names its maps and cached images by it)
                **({"label_row": it.truth.row} if it.truth is not None else {}),
                "scores": {
                    "D": float(np.mean(rec.magnitude)), "D_first_step": float(rec.magnitude[0]),
                    f"D_first_{FIRST_K}": float(np.mean(rec.magnitude[:FIRST_K])),
                    "LD": float(np.mean(rec.masked_magnitude)),
                    "anisotropy": float(hooks.scores["anisotropy"][i]),
                    "anisotropy_norm": float(hooks.scores["anisotropy_norm"][i]),
                    "anisotropy_cos": float(hooks.scores["anisotropy_cos"][i]),
                    "sharpness": float(hooks.scores["sharpness"][i]),
                }})
    # Batches run one after another, so a step's summed wall time over batches divided by the images is per image.
    timing = {"generation_s": gen_s / n_images, "step_s": (step_sum / n_images).tolist(),
              "extra_s": {k: v / n_images for k, v in extra_s.items()}}
    rundir.atomic_write_bytes(tmp / "generations.jsonl",
                              "".join(json.dumps(rundir.jsonable(r)) + "\n" for r in rows).encode())
    board = leaderboard(tmp, costs=_method_costs(steps_used, s.probes, timing))
    board["settings"] = {**s.__dict__, "steps": steps_used, "model": str(model),
                         "timing_per_image_s": timing}
    if truth is not None:
        board["ground_truth"] = truth
    rundir.write_json(tmp / LEADERBOARD, board)
    rundir.atomic_write_bytes(tmp / "leaderboard.md", format_markdown(board).encode())
    rundir.atomic_write_bytes(tmp / "leaderboard.html", format_html(tmp, board).encode())
    return board


def _at_size(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A user's mask at the generated image's size (nearest neighbour, as mem-curv-diff resizes masks), so every
    mask of the oracle set shares one size."""
    from PIL import Image

    if mask.shape == tuple(shape):
        return mask
    im = Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255)
    return np.asarray(im.resize((shape[1], shape[0]), Image.NEAREST)) >= 128


def _organism_mask(image: np.ndarray, it: Item, groups: dict) -> tuple[np.ndarray | None, str | None]:
    """The ground truth of an organism generation, as `memlens demo` fixes it, and its role in mem-curv-diff's
    oracle set: a local generation that reproduces its item has the item's mask ("mask"); a global copy is all
    memorized ("ones"); a novel generic image nothing ("zeros"); anything else (a failed copy, a generic image that
    copies an item) has no ground truth (None)."""
    from memlens.testbed.evaluation import score_generation

    score = score_generation(image, it.type, it.group, groups)
    if it.type == "local" and score["reproduces_own"]:
        return np.asarray(groups[it.group].mask, bool), "mask"
    if it.type == "global":
        return None, "ones" if score["reproduces_own"] else None
    if it.label == 0:
        return None, "zeros" if score["novel"] else None
    return None, None


# --------------------------------------------------------------------------------------------------------------
# Scoring (from the saved per-generation files only, so anyone can recompute it)


def read_bench(out: Path) -> tuple[list[dict], dict[str, dict[str, np.ndarray]]]:
    rows = [json.loads(line) for line in (Path(out) / "generations.jsonl").read_text().splitlines() if line.strip()]
    arrays = {}
    for r in rows:
        with np.load(Path(out) / "maps" / f"{r['stem']}.npz") as npz:
            arrays[r["stem"]] = {k: npz[k] for k in npz.files}
    return rows, arrays


def _detection_row(labels: np.ndarray, scores: np.ndarray) -> dict:
    from memlens.metrics import detection_metrics

    m = detection_metrics(labels, scores)
    return {"auc": m["auc"], "tpr_at_1pct_fpr": m["tpr_at_1pct_fpr_wen"],
            "tpr_at_1pct_fpr_nearest": m["tpr_at_1pct_fpr_nearest"], "n_pos": m["n_pos"], "n_neg": m["n_neg"]}


def _localization_row(maps: list[np.ndarray], masks: list[np.ndarray]) -> dict:
    from memlens.field import thresholds
    from memlens.metrics import localization_summary, upsample_map

    summary = localization_summary(maps, masks)
    ups = [upsample_map(m, g.shape) for m, g in zip(maps, masks)]
    return {
        "pixel_auroc": summary["pixel_auroc"],
        "iou_otsu": float(np.mean(thresholds.iou_otsu(ups, masks))),
        "iou_fixed_0.5": float(np.mean(thresholds.iou_fixed(ups, masks, 0.5))),
        # ORACLE: the threshold is chosen with the masks (mem-curv-diff's rule); an upper bound, not a rule.
        "iou_oracle": thresholds.iou_oracle(ups, masks).global_iou,
        "n": len(maps),
    }


def _full_set_oracle(rows: list[dict], arrays: dict, method: str) -> float:
    """ORACLE over mem-curv-diff's kind of set: local copies with their masks, global copies with all-one masks,
    novel non-memorized images with all-zero masks; maps upsampled to the image size."""
    from memlens.field import thresholds
    from memlens.metrics import upsample_map

    maps, masks = [], []
    for r in rows:
        shape = tuple(r["image_shape"])
        a = arrays[r["stem"]]
        role = r["oracle_set"]
        masks.append(a["mask"].astype(bool) if role == "mask" else np.full(shape, role == "ones"))
        maps.append(upsample_map(a[f"map_{method}"], masks[-1].shape))
    return thresholds.iou_oracle(maps, masks).global_iou


def leaderboard(out: str | Path, costs: dict | None = None) -> dict:
    """The leaderboard from a bench folder's `generations.jsonl` and `maps/` (numbers only; `costs` are added)."""
    rows, arrays = read_bench(Path(out))
    labels = np.array([r["label"] for r in rows])
    detection = {}
    for method in DETECTORS:
        scores = np.array([r["scores"][method] for r in rows])
        row = _detection_row(labels, scores)
        for kind in sorted({r["type"] for r in rows if r["label"] == 1}):
            keep = np.array([r["label"] == 0 or r["type"] == kind for r in rows])
            sub = _detection_row(labels[keep], scores[keep])
            row[f"by_type_{kind}"] = {"auc": sub["auc"], "tpr_at_1pct_fpr": sub["tpr_at_1pct_fpr"]}
        detection[method] = row
    localization = {}
    with_mask = [r for r in rows if r["has_mask"]]
    for method in LOCALIZERS:
        if not with_mask:
            localization[method] = {"pixel_auroc": None, "iou_otsu": None, "iou_fixed_0.5": None, "iou_oracle": None,
                                    "n": 0}
            continue
        maps = [arrays[r["stem"]][f"map_{method}"] for r in with_mask]
        masks = [arrays[r["stem"]]["mask"].astype(bool) for r in with_mask]
        localization[method] = _localization_row(maps, masks)
    full = [r for r in rows if r["oracle_set"]]
    if with_mask and full:
        for method in LOCALIZERS:
            localization[method]["iou_oracle_full_set"] = _full_set_oracle(full, arrays, method)
    if costs:
        for table in (detection, localization):
            for method in table:
                table[method]["cost"] = costs[method]
    return {"localization": localization, "detection": detection,
            "mitigation": {}, "mitigation_note": "not benchmarked yet (issue 14 item 3): `memlens mitigate` runs them",
            "n": {"generations": len(rows), "memorized": int(labels.sum()), "non_memorized": int((1 - labels).sum()),
                  "with_mask": len(with_mask), "oracle_set": len(full)},
            "conventions": {
                "tpr_at_1pct_fpr": "Wen's: the last ROC point with FPR strictly below 1%; "
                                   "tpr_at_1pct_fpr_nearest: the point nearest 1% (may lie above it)",
                "iou_otsu / iou_fixed_0.5": "mean per-image IoU, maps upsampled bilinearly to the mask",
                "iou_oracle": "ORACLE (threshold chosen with the masks): mem-curv-diff's global IoU over the "
                              "localization set, log1p and set-wide min-max",
                "iou_oracle_full_set": "the same ORACLE over mem-curv-diff's kind of set: local copies (masks), "
                                       "global copies (all ones), novel non-memorized images (all zeros)",
                "pixel_auroc": "pooled over pixels of per-image min-max maps",
                "cost": "per image; unet_evaluations counts a JVP/VJP as 2; wall_time_relative = (steps needed + "
                        "extra work) / plain generation, measured in this run"}}


# --------------------------------------------------------------------------------------------------------------
# Tables and page


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def format_markdown(board: dict) -> str:
    lines = ["## Localization", "",
             "| method | pixel AUROC | IoU (Otsu) | IoU (0.5) | IoU (ORACLE threshold) | IoU (ORACLE, full set) | "
             "UNet evals / image | wall time vs generation |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m, r in board["localization"].items():
        c = r.get("cost", {})
        lines.append(f"| {m} | {_f(r['pixel_auroc'])} | {_f(r['iou_otsu'])} | {_f(r['iou_fixed_0.5'])} | "
                     f"{_f(r['iou_oracle'])} | {_f(r.get('iou_oracle_full_set'))} | "
                     f"{c.get('unet_evaluations', 'n/a')} | "
                     f"{_f(c.get('wall_time_relative'))} |")
    n = board["n"]
    added = n["oracle_set"] - n["with_mask"]
    lines += ["", f"{n['with_mask']} generations with a mask; the full-set ORACLE adds {added} "
              "generations: global copies (all-one masks) and novel non-memorized images (all-zero masks).",
              "", "## Detection", "",
              "| method | AUC | TPR@1%FPR (Wen: < 1%) | TPR@1%FPR (nearest) | UNet evals / image | "
              "wall time vs generation |", "| --- | --- | --- | --- | --- | --- |"]
    for m, r in board["detection"].items():
        c = r.get("cost", {})
        lines.append(f"| {m} | {_f(r['auc'])} | {_f(r['tpr_at_1pct_fpr'])} | {_f(r['tpr_at_1pct_fpr_nearest'])} | "
                     f"{c.get('unet_evaluations', 'n/a')} | {_f(c.get('wall_time_relative'))} |")
    lines += ["", f"{n['memorized']} memorized vs {n['non_memorized']} non-memorized generations.", "",
              "Mitigation: " + board.get("mitigation_note", ""), ""]
    if "ground_truth" in board:
        lines += [webster_line(board["ground_truth"]), ""]
    return "\n".join(lines)


def webster_line(truth: dict) -> str:
    """One line on a Webster ground truth: what was used and what was dead (the CLI prints it too)."""
    kinds = ", ".join(f"{v} {k}" for k, v in truth["kinds"].items())
    dead = ", ".join(f"{v} {k}" for k, v in truth["dead"].items()) or "none"
    return (f"Ground truth: {truth['labels']}: {truth['prompts_used']} of {truth['label_rows']} prompts used "
            f"({kinds}); {truth['dead_total']} dead entries skipped ({dead}).")


def _png_b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def format_html(out: Path, board: dict) -> str:
    from PIL import Image

    from memlens.evaluate import roc_figure_png
    from memlens.maps import heatmap
    from memlens.metrics import roc_points

    rows, arrays = read_bench(out)
    labels = np.array([r["label"] for r in rows])
    panel = {"D_first_step": "1", f"D_first_{FIRST_K}": "10", "anisotropy": "1", "sharpness": "1", "D": "all",
             "LD": "all"}
    curves = {}
    for method, t in panel.items():
        scores = np.array([r["scores"][method] for r in rows])
        fpr, tpr, _ = roc_points(labels, scores)
        curves[(method, t, "generation")] = (fpr, tpr, board["detection"][method]["auc"])
    roc = _png_b64(roc_figure_png(curves, "ROC per generation (panels: steps each method needs)"))

    def img_tag(arr) -> str:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(arr)).save(buf, format="PNG")
        return f'<img src="{_png_b64(buf.getvalue())}" width="96" height="96" style="image-rendering:pixelated">'

    examples = [r for r in rows if r["has_mask"]][:6] or [r for r in rows if r["label"] == 1][:6]
    trs = []
    for r in examples:
        a = arrays[r["stem"]]
        with Image.open(out / "images" / f"{r['stem']}.png") as im:
            image = np.asarray(im.convert("RGB"))
        size = image.shape[:2]
        cells = [img_tag(image)]
        cells.append(img_tag((a["mask"].astype(np.uint8) * 255)) if "mask" in a else "no mask")
        cells += [img_tag(np.asarray(heatmap(a[f"map_{m}"], size))) for m in LOCALIZERS]
        trs.append(f"<tr><td>{r['prompt']}<br>{r['stem']}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ["prompt", "image", "mask", *LOCALIZERS])
    table = format_markdown(board)
    return ("<!doctype html><meta charset='utf-8'><title>memlens bench</title>"
            "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:3px}table{border-collapse:"
            "collapse}</style><h1>memlens bench</h1>"
            f"<h2>ROC curves</h2><img src='{roc}'>"
            f"<h2>Example maps (per-image min-max colouring)</h2><table><tr>{head}</tr>{''.join(trs)}</table>"
            f"<h2>Leaderboard</h2><pre>{table}</pre>")
