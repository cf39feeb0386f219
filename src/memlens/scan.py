"""`memlens scan`: generate for every prompt, record each image's BE map and per-step magnitudes, resumably.

Work is a flat list of images (prompt_index, image_index), each with its own seed, so what an image looks like
depends on neither the batch size nor which process made it. Batches are slices of that list; several processes
(under `accelerate launch`) take batches in turn, each appending to its own log, and the main process merges the
logs at the end. The folder's layout, records and durability rules live in `memlens.rundir`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from memlens import rundir
from memlens.errors import InputError
from memlens.prompts import PUBLIC_SETS, PromptRecord, load_prompts, load_public_set
from memlens.rundir import FORMAT, IMAGES, MAPS, OVERLAYS, TOKEN_MAPS, Generation

__all__ = ["run_scan", "image_seed", "ScanItem", "ScanResult"]

DEFAULT_STEPS, DEFAULT_GUIDANCE = 50, 7.5  # Stable Diffusion's usual settings, for pipelines that recommend none
log = logging.getLogger("memlens.scan")

# run.json setting -> the parameter a person would change; only settings that change what is generated are compared.
_OPTION = {
    "model": "`model`",
    "prompts_sha256": "`prompts`",
    "num_images": "`num_images`",
    "steps": "`steps`",
    "guidance": "`guidance`",
    "seed": "`seed`",
    "height": "`height`",
    "width": "`width`",
    "dtype": "`dtype`",
    "probe": "`probe_options`",
    "negative_prompt": "`negative_prompt`",
    "true_cfg_scale": "`true_cfg_scale`",
    "prompt_subset": "`prompt_indices`",
}


@dataclass(frozen=True)
class ScanItem:
    prompt_index: int
    image_index: int
    seed: int

    @property
    def key(self) -> tuple[int, int]:
        return self.prompt_index, self.image_index

    @property
    def stem(self) -> str:
        return rundir.stem(self.prompt_index, self.image_index)


def image_seed(seed: int, prompt_index: int, image_index: int, num_images: int) -> int:
    """One seed per image, so an image can be regenerated alone: `pipe(p, generator=Generator().manual_seed(s))`."""
    return seed + prompt_index * num_images + image_index


# --- inputs ---------------------------------------------------------------------------------------------------------


def resolve_prompts(prompts: Any) -> list[PromptRecord]:
    """A prompt file path, a public set name (see `memlens.prompts.PUBLIC_SETS`), or records/strings in memory."""
    if isinstance(prompts, (str, Path)):
        if not Path(prompts).exists() and str(prompts) in PUBLIC_SETS:
            return load_public_set(str(prompts))
        return load_prompts(prompts)
    records = [p if isinstance(p, PromptRecord) else PromptRecord(prompt=str(p)) for p in prompts]
    for i, rec in enumerate(records):
        if not rec.prompt.strip():
            raise InputError(f"prompt {i}: empty prompt")
    if not records:
        raise InputError("no prompts given")
    return records


def prompts_digest(records: Sequence[PromptRecord]) -> str:
    """SHA-256 of the prompts' content, the identity a resume checks."""
    # Content, not path: moving the prompt file must not block a resume; editing it must.
    canon = json.dumps([[r.prompt, r.label, r.type, r.index] for r in records], ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def _check_guidance(guidance: Optional[float]) -> None:
    if guidance is not None and guidance <= 1:
        # At guidance <= 1 diffusers skips the unconditional pass, and D/LD compare exactly those two predictions.
        raise InputError(f"`guidance` must be above 1 for a scan (D and LD need classifier-free guidance), got {guidance}")


def _check_positive(**values: Optional[int]) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise InputError(f"`{name}` must be at least 1, got {value}")


def images_per_prompt(num_images: int | Sequence[int], n_prompts: int) -> list[int]:
    """`num_images` as one count per prompt (an int is the same count for every prompt)."""
    if isinstance(num_images, int):
        _check_positive(num_images=num_images)
        return [num_images] * n_prompts
    counts = [int(n) for n in num_images]
    if len(counts) != n_prompts:
        raise InputError(f"`num_images`: {len(counts)} counts for {n_prompts} prompts")
    if any(n < 1 for n in counts):
        raise InputError(f"`num_images` must be at least 1 for every prompt, got {min(counts)}")
    return counts


def scan_items(counts: Sequence[int], seed: int) -> list[ScanItem]:
    """Every image of a scan in order, each with its seed: `seed` + the image's position in that order (with the
    same count n for every prompt that is `seed + p * n + k`, see `image_seed`)."""
    items, pos = [], seed
    for p, n in enumerate(counts):
        for k in range(n):
            items.append(ScanItem(p, k, pos))
            pos += 1
    return items


def subset_items(items: Sequence[ScanItem], prompt_indices: Optional[Sequence[int]], n_prompts: int) -> list[ScanItem]:
    """The images of the chosen prompts only, each keeping the prompt_index, stem and seed it has in the full list
    (so a prompt scanned alone or among all gives the same files and records)."""
    if prompt_indices is None:
        return list(items)
    chosen = [int(p) for p in prompt_indices]
    if not chosen:
        raise InputError("`prompt_indices` is empty: no prompt to scan")
    bad = [p for p in chosen if not 0 <= p < n_prompts]
    if bad:
        raise InputError(f"`prompt_indices`: {bad[0]} is not a position in the {n_prompts} prompts")
    if len(set(chosen)) != len(chosen):
        raise InputError("`prompt_indices`: a prompt is listed twice")
    keep = set(chosen)
    return [it for it in items if it.prompt_index in keep]


def subset_identity(prompt_indices: Optional[Sequence[int]]) -> Optional[dict]:
    """run.json's record of which prompts a partial scan covers: their count and a digest (not the list itself: a
    screen of a million prompts may pass on a hundred thousand)."""
    if prompt_indices is None:
        return None
    chosen = sorted(int(p) for p in prompt_indices)
    return {"count": len(chosen), "sha256": hashlib.sha256(json.dumps(chosen).encode()).hexdigest()}


def batches_of(items: Sequence[ScanItem], batch_size: int) -> list[list[ScanItem]]:
    """The scan's batches: fixed slices of the full image list, so a resumed run batches exactly as a fresh one."""
    return [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape the numbers, for run.json."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("memlens", "torch", "diffusers", "transformers", "accelerate", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def prompt_identity(records: Sequence[PromptRecord], prompts) -> dict:
    """The run.json keys that identify a prompt set."""
    return {
        "prompts_sha256": prompts_digest(records),
        "prompts_source": str(prompts) if isinstance(prompts, (str, Path)) else "in memory",
        "num_prompts": len(records),
    }


def open_pipeline(pipe_or_model, *, dtype: str, device: Optional[str], model_name: Optional[str] = None, state=None):
    """(pipeline, model id): load a MODEL string with `memlens.models.load_pipeline`, or take a pipeline as given."""
    from memlens.models import load_pipeline, model_identity

    if isinstance(pipe_or_model, str):
        state = state if state is not None else _partial_state()
        return load_pipeline(pipe_or_model, dtype=dtype, device=_pick_device(device, state)), model_identity(pipe_or_model)
    pipe = pipe_or_model
    model_id = model_name or getattr(getattr(pipe, "config", None), "_name_or_path", None) or type(pipe).__name__
    return pipe, model_id


def warn_truncated(pipe, prompts: Sequence[str]) -> int:
    """Log one warning naming how many prompts are longer than the text encoder's context (they get cut to it);
    returns that count."""
    tok = getattr(pipe, "tokenizer", None)
    limit = getattr(tok, "model_max_length", None)
    if tok is None or not limit or limit > 100_000:
        return 0
    unique = sorted(set(prompts))
    lengths = [len(ids) for ids in tok(unique, truncation=False, add_special_tokens=True)["input_ids"]]
    long = {p for p, n in zip(unique, lengths) if n > limit}
    count = sum(p in long for p in prompts)
    if count:
        log.warning("%d of %d prompts are longer than the model's %d-token context and are cut to it "
                    "(the end token then sits at the last position)", count, len(prompts), limit)
    return count


# --- the probe ------------------------------------------------------------------------------------------------------


def _default_probe_factory(pipe, **options):
    from memlens.probe import BrightEndingProbe

    return BrightEndingProbe(pipe, **options)


# --- the run --------------------------------------------------------------------------------------------------------


def _partial_state():
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # PartialState only forms a CPU process group when told `cpu=True`; without a GPU, torchrun-launched
    # processes (`accelerate launch --multi_gpu --num_processes N` on a CPU box) would each think they are alone.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (world > 1 and not torch.cuda.is_available())
    return PartialState(cpu=cpu)


def _pick_device(device: Optional[str], state) -> str:
    import torch

    if device in (None, "auto"):
        return str(state.device)
    try:
        wanted = torch.device(device)
    except (RuntimeError, ValueError):
        return device  # load_pipeline words the error
    # Under `accelerate launch` each process owns one accelerator; "cuda" means "mine", not cuda:0 for all.
    if state.num_processes > 1 and wanted.type == state.device.type and wanted.index is None:
        return str(state.device)
    return device


@dataclass(frozen=True)
class ScanResult:
    """What a scan left in its folder."""

    path: Path
    status: str  # "complete" | "incomplete"
    num_records: int
    num_images: int  # images the scan asks for
    resumed_from: int  # images already recorded when this run started
    is_main_process: bool = True


def run_scan(
    pipe_or_model: Any,
    prompts: Any,
    out_dir: Any,
    *,
    num_images: int | Sequence[int] = 1,
    steps: Optional[int] = None,
    guidance: Optional[float] = None,
    seed: int = 0,
    batch_size: int = 4,
    height: Optional[int] = None,
    width: Optional[int] = None,
    dtype: str = "float32",
    device: Optional[str] = None,
    probe_options: Optional[dict] = None,
    model_name: Optional[str] = None,
    progress: bool = True,
    probe_factory: Optional[Callable] = None,
    kind: str = "scan",
    own_files: Sequence[str] = (),
    negative_prompt: Optional[str] = None,
    true_cfg_scale: Optional[float] = None,
    prompt_indices: Optional[Sequence[int]] = None,
) -> ScanResult:
    """Scan `prompts` with a pipeline (or a MODEL string for `memlens.models.load_pipeline`) into `out_dir`.

    `num_images` is the count per prompt, or one count per prompt in order; image k of prompt p gets the seed
    `seed` + its position among all images (`seed + p * num_images + k` for a single count).
    `steps` / `guidance` default to the pipeline's recommended values when its config declares them
    (`default_num_inference_steps`, `default_guidance_scale`, as the organism does), else to 50 / 7.5.
    Resumes an interrupted scan of the same settings; refuses a folder holding a scan of other settings, a run of
    another `kind` or unrelated files (checked before the model loads; `own_files` are names a caller such as the
    demo keeps in the folder besides the scan's own).
    `negative_prompt` and `true_cfg_scale` go to every pipeline call when set (FLUX's true CFG: without it a
    guidance-distilled model has no unconditional branch and the probe refuses D/LD).
    `prompt_indices` scans only those positions of `prompts` (`memlens scan --screen`'s flagged prompts); their
    images keep the prompt_index, seed and file names a scan of every prompt gives them.
    """
    from memlens.models import pipeline_facts

    _check_positive(steps=steps, batch_size=batch_size, height=height, width=width)
    _check_guidance(guidance)
    if true_cfg_scale is not None and not true_cfg_scale > 1:
        raise InputError(f"`true_cfg_scale` must be > 1 (1 means no unconditional branch), got {true_cfg_scale}")
    extra_call = {k: v for k, v in (("negative_prompt", negative_prompt), ("true_cfg_scale", true_cfg_scale))
                  if v is not None}
    records = resolve_prompts(prompts)
    counts = images_per_prompt(num_images, len(records))
    items = subset_items(scan_items(counts, seed), prompt_indices, len(records))
    out = rundir.check_output(out_dir, kind, own=own_files)
    state = _partial_state()

    pipe, model_id = open_pipeline(pipe_or_model, dtype=dtype, device=device, model_name=model_name, state=state)
    facts = pipeline_facts(pipe)
    height = height or facts["height"]
    width = width or facts["width"]
    steps = steps or facts["default_steps"] or DEFAULT_STEPS
    guidance = guidance if guidance is not None else facts["default_guidance"] or DEFAULT_GUIDANCE
    _check_guidance(guidance)
    if not height or not width:
        raise InputError("this pipeline has no default image size; pass `height` and `width`")

    settings = {
        "model": model_id,
        **prompt_identity(records, prompts),
        "num_images": num_images if isinstance(num_images, int) else counts,
        "steps": steps,
        "guidance": float(guidance),
        "seed": seed,
        "height": height,
        "width": width,
        "dtype": facts["dtype"],
        "probe": dict(sorted((probe_options or {}).items())),
        **extra_call,
        **({"prompt_subset": subset_identity(prompt_indices)} if prompt_indices is not None else {}),
        "batch_size": batch_size,  # recorded, not compared: it does not change the images
    }
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as they come back from disk

    # Lock first (a second scan into this folder stops here), then read what is done. Every process reads before
    # any process appends (barrier below); the torn-tail cut the Log makes is invisible to readers, who skip it.
    run = rundir.open_run(out, kind, settings, _OPTION, process_index=state.process_index,
                          num_processes=state.num_processes)
    with run.log as log_file:
        done, previous = run.done, run.previous
        # A batch with some images done is generated whole again (only its missing images are written), so every
        # image comes from the same batch it would have in an uninterrupted run: resumed results are bit-identical.
        batches = [b for b in batches_of(items, batch_size) if any(it.key not in done for it in b)]
        mine = batches[state.process_index :: state.num_processes]
        state.wait_for_everyone()
        already = sum(it.key in done for it in items)
        if already == len(items) and (previous or {}).get("status") == "complete" and len(rundir.log_paths(out)) == 1:
            # a finished scan run again: leave every file as it is
            return ScanResult(out, "complete", len(items), len(items), already, state.is_main_process)

        for sub in (IMAGES, MAPS, OVERLAYS):
            (out / sub).mkdir(parents=True, exist_ok=True)
        if state.is_main_process:
            rundir.write_run_json(
                out,
                {
                    "format": FORMAT,
                    "kind": kind,
                    "status": "running",
                    "started_at": (previous or {}).get("started_at") or _now(),
                    "runs": (previous or {}).get("runs", 0) + 1,
                    "processes": state.num_processes,
                    "settings": settings,
                    "versions": library_versions(),
                    "pipeline": facts,
                },
            )
            left = sorted({it.prompt_index for b in batches for it in b if it.key not in done})
            warn_truncated(pipe, [records[p].prompt for p in left])

        factory = probe_factory or _default_probe_factory
        writers = max(1, min(batch_size, (os.cpu_count() or 1) // state.num_processes))
        with factory(pipe, **(probe_options or {})) as probe, ThreadPoolExecutor(writers) as pool:
            single = state.num_processes == 1
            todo_mine = sum(it.key not in done for b in mine for it in b)
            bar = _progress_bar(len(items) if single else todo_mine, already if single else 0,
                                progress and state.is_main_process, state.num_processes)
            for batch in mine:
                lines = _run_batch(pipe, probe, pool, batch, done, records, out, steps, guidance, height, width,
                                   extra_call)
                log_file.append(lines)
                bar.update(len(lines))
            bar.close()

    state.wait_for_everyone()
    status, n = "incomplete", 0
    if state.is_main_process:
        merged = rundir.merge(out)
        n = len(merged)
        status = "complete" if n == len(items) else "incomplete"
        info = rundir.read_run_json(out) or {}
        info.update(status=status, finished_at=_now(), num_records=n)
        rundir.write_run_json(out, info)
    state.wait_for_everyone()
    return ScanResult(out, status, n, len(items), already, state.is_main_process)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _progress_bar(total: int, initial: int, enabled: bool, processes: int):
    from tqdm.auto import tqdm

    desc = "scan" if processes == 1 else f"scan (process 0 of {processes})"
    if enabled and initial:
        print(f"resuming: {initial} of {total} images already recorded", file=sys.stderr)
    return tqdm(total=total, initial=initial, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True,
                file=sys.stderr)


def _run_batch(pipe, probe, pool, batch, done, records, out: Path, steps, guidance, height, width,
               extra_call: Optional[dict] = None) -> list[Generation]:
    import torch

    # CPU generators: the same seed gives the same starting noise on any device.
    gens = [torch.Generator("cpu").manual_seed(it.seed) for it in batch]
    probe.clear()
    try:
        result = pipe(
            prompt=[records[it.prompt_index].prompt for it in batch],
            num_images_per_prompt=1,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            height=height,
            width=width,
            **(extra_call or {}),
        )
    except ValueError as err:
        if not _raised_in(err, "check_inputs"):
            raise  # a fault in the model or the probe, not in the settings: keep the traceback
        # diffusers' own validation: sizes not divisible by the VAE factor and the like.
        lines = str(err).strip().splitlines() or [type(err).__name__]
        raise InputError(f"the pipeline refused these settings: {lines[0]}") from err
    images = result.images
    measured = list(probe.records)
    if len(measured) != len(batch) or len(images) != len(batch):
        raise RuntimeError(f"probe gave {len(measured)} records and the pipeline {len(images)} images for {len(batch)}")

    # PNG encoding (zlib) releases the GIL, so a batch's files are written side by side; the batch's lines are only
    # built and appended after every file is on disk.
    missing = [(it, img, rec) for it, img, rec in zip(batch, images, measured) if it.key not in done]
    return list(pool.map(lambda args: save_generation(out, records[args[0].prompt_index], *args), missing))


def _raised_in(err: BaseException, function: str) -> bool:
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == function:
            return True
        tb = tb.tb_next
    return False


def save_generation(out: Path, src: PromptRecord, it: ScanItem, image, rec) -> Generation:
    """Write one image, its BE map and overlay under `out`; return its record (not yet appended to the log).

    A probe record with a `token_maps` attribute ({name: (h, w) map}) also gets `token_maps/<stem>.npz`."""
    from memlens.maps import overlay

    be_map = np.asarray(rec.be_map, dtype=np.float32)
    gen = Generation(
        prompt_index=it.prompt_index,
        prompt=src.prompt,
        image_index=it.image_index,
        seed=it.seed,
        image=f"{IMAGES}/{it.stem}.png",
        be_map=f"{MAPS}/{it.stem}.npy",
        overlay=f"{OVERLAYS}/{it.stem}.png",
        D=np.asarray(rec.magnitude, dtype=np.float32).tolist(),
        LD=np.asarray(rec.masked_magnitude, dtype=np.float32).tolist(),
        eos_index=int(rec.eos_index),
        label=src.label,
        type=src.type,
        index=src.index,
    )
    # Plain writes: these files are listed only once the batch's line is appended, after all of them exist.
    image.save(out / gen.image)
    np.save(out / gen.be_map, be_map)
    overlay(image, be_map).save(out / gen.overlay)
    token_maps = getattr(rec, "token_maps", None)
    if token_maps:
        gen.token_maps = f"{TOKEN_MAPS}/{it.stem}.npz"
        (out / TOKEN_MAPS).mkdir(exist_ok=True)
        np.savez(out / gen.token_maps, **{k: np.asarray(v, np.float32) for k, v in token_maps.items()})
    return gen
