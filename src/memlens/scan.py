"""`memlens scan`: generate for every prompt, record each image's BE map and per-step magnitudes, resumably.

Work is a flat list of images (prompt_index, image_index), each with its own seed, so what an image looks like
depends on neither the batch size nor which process made it. Batches are slices of that list; several processes
(under `accelerate launch`) take batches in turn, each appending to its own log, and the main process merges the
logs at the end. Durability rules live in `memlens.scanstore`.
"""

import hashlib
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, Sequence

import numpy as np
import typer

from memlens import scanstore
from memlens.errors import InputError
from memlens.prompts import PUBLIC_SETS, PromptRecord, load_prompts, load_public_set

__all__ = ["run_scan", "scan_command", "image_seed", "ScanItem"]

IMAGES, MAPS, OVERLAYS = "images", "be_maps", "overlays"
DEFAULT_STEPS, DEFAULT_GUIDANCE = 50, 7.5  # Stable Diffusion's usual settings, for pipelines that recommend none
FORMAT = 1  # bump when generations.jsonl or run.json change shape

# run.json setting -> the option a person would change; only settings that change what is generated are compared.
_OPTION = {
    "model": "--model",
    "prompts_sha256": "--prompts",
    "num_images": "--num-images",
    "steps": "--steps",
    "guidance": "--guidance",
    "seed": "--seed",
    "height": "--height",
    "width": "--width",
    "dtype": "--dtype",
    "probe": "probe options",
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
        return f"{self.prompt_index:05d}_{self.image_index:02d}"


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
        raise InputError(f"--guidance must be above 1 for a scan (D and LD need classifier-free guidance), got {guidance}")


def _check_positive(**values: Optional[int]) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


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


def _settings_mismatch(old: dict, new: dict, options: dict[str, str] = _OPTION) -> Optional[str]:
    for key, option in options.items():
        if old.get(key) != new.get(key):
            if key == "prompts_sha256":
                return "--prompts: the prompts differ from those the run was started with"
            return f"{option} is {new.get(key)!r} but the run was started with {old.get(key)!r}"
    return None


def refuse_other_run(out: Path, settings: dict, options: dict[str, str] = _OPTION) -> Optional[dict]:
    """Return the run.json already in `out` (None for a fresh folder); raise if it holds a run of other settings.

    `options` maps each compared settings key to the command-line option a user would change.
    """
    previous = scanstore.read_run_json(out)
    if previous is not None:
        why = _settings_mismatch(previous.get("settings", {}), settings, options)
        if why:
            raise InputError(f"--out {out} holds a different run: {why}; rerun with its settings or pick another --out")
    elif (out / scanstore.GENERATIONS).exists() and (out / scanstore.GENERATIONS).stat().st_size > 0:
        raise InputError(f"--out {out} has {scanstore.GENERATIONS} but no run.json; pick another --out")
    return previous


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


def run_scan(
    pipe_or_model: Any,
    prompts: Any,
    out_dir: Any,
    *,
    num_images: int = 1,
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
) -> Path:
    """Scan `prompts` with a pipeline (or a MODEL string for `memlens.models.load_pipeline`) into `out_dir`.

    `steps` / `guidance` default to the pipeline's recommended values when its config declares them
    (`default_num_inference_steps`, `default_guidance_scale`, as the organism does), else to 50 / 7.5.
    Resumes an interrupted scan of the same settings; refuses a folder holding a scan of other settings.
    Returns the output folder.
    """
    from memlens.models import pipeline_facts

    _check_positive(num_images=num_images, steps=steps, batch_size=batch_size, height=height, width=width)
    _check_guidance(guidance)
    records = resolve_prompts(prompts)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is a file; expected a folder")
    state = _partial_state()

    pipe, model_id = open_pipeline(pipe_or_model, dtype=dtype, device=device, model_name=model_name, state=state)
    facts = pipeline_facts(pipe)
    height = height or facts["height"]
    width = width or facts["width"]
    steps = steps or facts["default_steps"] or DEFAULT_STEPS
    guidance = guidance if guidance is not None else facts["default_guidance"] or DEFAULT_GUIDANCE
    _check_guidance(guidance)
    if not height or not width:
        raise InputError("this pipeline has no default image size; pass --height and --width")

    settings = {
        "model": model_id,
        **prompt_identity(records, prompts),
        "num_images": num_images,
        "steps": steps,
        "guidance": float(guidance),
        "seed": seed,
        "height": height,
        "width": width,
        "dtype": facts["dtype"],
        "probe": dict(sorted((probe_options or {}).items())),
        "batch_size": batch_size,  # recorded, not compared: it does not change the images
    }
    settings["probe"] = json.loads(json.dumps(settings["probe"]))  # tuples -> lists, as they come back from disk
    previous = refuse_other_run(out, settings)

    items = [
        ScanItem(p, i, image_seed(seed, p, i, num_images)) for p in range(len(records)) for i in range(num_images)
    ]
    log_path = (
        out / scanstore.GENERATIONS
        if state.num_processes == 1
        else out / scanstore.SHARDS / f"rank-{state.process_index}.jsonl"
    )
    # Lock first (a second scan into this folder stops here), then read what is done. Every process reads before
    # any process appends (barrier below); the torn-tail cut the Log makes is invisible to readers, who skip it.
    with scanstore.Log(log_path) as log:
        done = scanstore.done_keys(out)
        todo = [it for it in items if it.key not in done]
        batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
        mine = batches[state.process_index :: state.num_processes]
        state.wait_for_everyone()
        if not todo and (previous or {}).get("status") == "complete" and len(scanstore.log_paths(out)) == 1:
            return out  # a finished scan run again: leave every file as it is

        for sub in (IMAGES, MAPS, OVERLAYS):
            (out / sub).mkdir(parents=True, exist_ok=True)
        if state.is_main_process:
            scanstore.write_run_json(
                out,
                {
                    "format": FORMAT,
                    "status": "running",
                    "started_at": (previous or {}).get("started_at") or _now(),
                    "runs": (previous or {}).get("runs", 0) + 1,
                    "processes": state.num_processes,
                    "settings": settings,
                    "versions": library_versions(),
                    "pipeline": facts,
                },
            )

        factory = probe_factory or _default_probe_factory
        writers = max(1, min(batch_size, (os.cpu_count() or 1) // state.num_processes))
        with factory(pipe, **(probe_options or {})) as probe, ThreadPoolExecutor(writers) as pool:
            bar = _progress_bar(sum(len(b) for b in mine), progress and state.is_main_process, state.num_processes)
            for batch in mine:
                log.append(_run_batch(pipe, probe, pool, batch, records, out, steps, guidance, height, width))
                bar.update(len(batch))
            bar.close()

    state.wait_for_everyone()
    if state.is_main_process:
        merged = scanstore.merge(out)
        status = "complete" if len(merged) == len(items) else "incomplete"
        run = scanstore.read_run_json(out) or {}
        run.update(status=status, finished_at=_now(), num_records=len(merged))
        scanstore.write_run_json(out, run)
    state.wait_for_everyone()
    return out


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _progress_bar(total: int, enabled: bool, processes: int):
    from tqdm.auto import tqdm

    desc = "scan" if processes == 1 else f"scan (process 0 of {processes})"
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def _run_batch(pipe, probe, pool, batch, records, out: Path, steps, guidance, height, width) -> list[dict]:
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
    return list(pool.map(lambda args: save_generation(out, records[args[0].prompt_index], *args), zip(batch, images, measured)))


def _raised_in(err: BaseException, function: str) -> bool:
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == function:
            return True
        tb = tb.tb_next
    return False


def save_generation(out: Path, src: PromptRecord, it: ScanItem, image, rec) -> dict:
    """Write one image, its BE map and overlay under `out`; return its generations.jsonl record (not yet appended)."""
    from memlens.maps import overlay

    be_map = np.asarray(rec.be_map, dtype=np.float32)
    paths = {"image": f"{IMAGES}/{it.stem}.png", "be_map": f"{MAPS}/{it.stem}.npy", "overlay": f"{OVERLAYS}/{it.stem}.png"}
    image.save(out / paths["image"])
    np.save(out / paths["be_map"], be_map)
    overlay(image, be_map).save(out / paths["overlay"])
    line = {
        "prompt_index": it.prompt_index,
        "prompt": src.prompt,
        "image_index": it.image_index,
        "seed": it.seed,
        **paths,
        "D": np.asarray(rec.magnitude, dtype=np.float32).tolist(),
        "LD": np.asarray(rec.masked_magnitude, dtype=np.float32).tolist(),
        "eos_index": int(rec.eos_index),
    }
    for field in ("label", "type", "index"):
        if getattr(src, field) is not None:
            line[field] = getattr(src, field)
    return line


# --- the command ----------------------------------------------------------------------------------------------------


def scan_command(
    model: Annotated[str, typer.Option("--model", help="Hub id, local diffusers folder, or 'testbed'.")],
    prompts: Annotated[
        str, typer.Option("--prompts", help=f"Prompt file (.txt/.jsonl/.csv/.parquet) or one of: {', '.join(PUBLIC_SETS)}.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder; rerun the same command to resume.")],
    num_images: Annotated[int, typer.Option("--num-images", min=1, help="Images per prompt.")] = 1,
    steps: Annotated[
        Optional[int], typer.Option("--steps", min=1, help="Denoising steps. Default: the pipeline's recommended, else 50.")
    ] = None,
    guidance: Annotated[
        Optional[float],
        typer.Option("--guidance", help="Classifier-free guidance scale (> 1). Default: the pipeline's recommended, else 7.5."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Base seed; image k of prompt p uses seed + p*num_images + k.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per pipeline call.")] = 4,
    height: Annotated[Optional[int], typer.Option("--height", min=8, help="Default: the pipeline's native size.")] = None,
    width: Annotated[Optional[int], typer.Option("--width", min=8, help="Default: the pipeline's native size.")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32, float16 or bfloat16.")] = "float32",
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, mps, or auto.")] = "auto",
) -> None:
    """Generate for a prompt file and record BE maps and magnitudes per image."""
    done = run_scan(
        model,
        prompts,
        out,
        num_images=num_images,
        steps=steps,
        guidance=guidance,
        seed=seed,
        batch_size=batch_size,
        height=height,
        width=width,
        dtype=dtype,
        device=device,
    )
    run = scanstore.read_run_json(done) or {}
    if _partial_state().is_main_process:
        typer.echo(f"{run.get('status', '?')}: {run.get('num_records', 0)} images in {done}")
