"""Turn a MODEL argument (hub id, local diffusers folder, or `testbed`) into a ready, quiet pipeline.

Loading is diffusers' job; this module only decides which of the three kinds MODEL is, turns the ways loading fails
into one-line `InputError`s, and switches off what a measurement run must not have (safety checker, progress bars).
"""

from __future__ import annotations

import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse
from typing import Any

from memlens.errors import InputError

__all__ = ["load_pipeline", "pipeline_facts", "resolve_dtype", "model_identity", "TESTBED"]

TESTBED = "testbed"
DTYPES = ("float32", "float16", "bfloat16")


def resolve_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise InputError(f"`dtype` {dtype!r} is not supported; expected one of {list(DTYPES)}")
    return getattr(torch, dtype)


def _resolve_device(device: str):
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"`device` {device!r} is not a torch device (try 'cpu' or 'cuda')") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"`device` {device!r}: CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"`device` {device!r}: MPS is not available on this machine")
    return dev


def _looks_like_path(model: str) -> bool:
    # A hub id is "org/name"; anything anchored to the filesystem, or with more than one slash, is meant as a path.
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model


def model_identity(model: str) -> str:
    """A stable name for MODEL in run.json: local folders become absolute paths so `./m` and `/abs/m` agree."""
    if model == TESTBED or model.startswith(TESTBED + "-"):
        return model
    path = Path(model).expanduser()
    if path.exists() or _looks_like_path(model):
        return str(path.resolve())
    return model


def load_pipeline(model: str, dtype: str = "float32", device: str = "cpu"):
    """Load MODEL on `device` in `dtype`, safety checker off and progress bars quiet."""
    torch_dtype = resolve_dtype(dtype)
    dev = _resolve_device(device)
    with _quiet_libraries():
        if model == TESTBED or model.startswith(TESTBED + "-"):
            pipe = _load_testbed(model)
        else:
            path = Path(model).expanduser()
            if path.exists():
                pipe = _load_local(path, torch_dtype)
            elif _looks_like_path(model):
                raise InputError(f"`model` {model}: no such folder")
            else:
                pipe = _load_hub(model, torch_dtype)
        pipe = pipe.to(dev, torch_dtype)  # diffusers logs a dtype notice here too
    _disable_safety_checker(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def _quiet_libraries():
    """While loading: no "Loading pipeline components" bars or per-component info lines (they would interleave with
    the scan's own bar). The libraries' settings are restored afterwards: a library does not change process-wide
    logging."""
    from diffusers.utils import logging as dlog

    saved = [(dlog, dlog.get_verbosity(), dlog.is_progress_bar_enabled())]
    try:
        from transformers.utils import logging as tlog

        saved.append((tlog, tlog.get_verbosity(), tlog.is_progress_bar_enabled()))
    except ImportError:
        pass
    try:
        for lib, _, _ in saved:
            lib.set_verbosity_error()
            lib.disable_progress_bar()
        yield
    finally:
        for lib, level, bars in saved:
            lib.set_verbosity(level)
            (lib.enable_progress_bar if bars else lib.disable_progress_bar)()


def _load_testbed(name: str = TESTBED):
    try:
        import memlens.testbed as testbed
    except ImportError as err:
        raise InputError(f"`model` testbed: the model organism is not available in this install ({err})") from None
    loader = getattr(testbed, "load_pipeline", None)
    if loader is None:  # the package may not re-export its loader yet
        try:
            from memlens.testbed.pipeline import load_pipeline as loader
        except ImportError as err:
            raise InputError(f"`model` testbed: the model organism is not available in this install ({err})") from None
    from memlens.testbed.pipeline import SHIPPED

    if name not in SHIPPED:
        raise InputError(f"`model` {name}: not a shipped organism; expected one of {', '.join(SHIPPED)}")
    return loader(name)


def _dtype_kwarg(torch_dtype) -> dict:
    # diffusers renamed `torch_dtype` to `dtype` (0.36-ish) and warns on the old name; use whichever it knows.
    from diffusers.utils import deprecation_utils

    key = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    return {key: torch_dtype}


def _no_safety_kwargs(components: dict) -> dict:
    # Only pipelines that declare a safety checker accept these; others would log "unexpected kwargs".
    if "safety_checker" in components:
        return {"safety_checker": None, "requires_safety_checker": False}
    return {}


def _load_local(path: Path, torch_dtype):
    if not path.is_dir():
        raise InputError(f"`model` {path}: is a file; expected a diffusers pipeline folder with model_index.json")
    index = path / "model_index.json"
    if not index.is_file():
        raise InputError(
            f"`model` {path}: not a diffusers pipeline folder (no model_index.json); "
            "save one with pipe.save_pretrained(folder)"
        )
    try:
        components = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{index}: malformed JSON ({err})") from None
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(
            str(path), **_dtype_kwarg(torch_dtype), **_no_safety_kwargs(components)
        )
    except (OSError, ValueError, KeyError, ImportError) as err:
        raise InputError(f"`model` {path}: could not load the pipeline ({_first_line(err)})") from None


def _load_hub(model: str, torch_dtype):
    from diffusers import DiffusionPipeline
    from huggingface_hub import constants as hub

    kwargs = _dtype_kwarg(torch_dtype)
    # The local cache first: offline machines with a cached model should not wait out the hub's retries.
    try:
        components = DiffusionPipeline.load_config(model, local_files_only=True)
    except Exception:
        components = None
    if components is not None:
        try:
            return DiffusionPipeline.from_pretrained(
                model, local_files_only=True, **kwargs, **_no_safety_kwargs(components)
            )
        except Exception:
            pass  # partly cached: let the hub fill the gaps below
    if hub.HF_HUB_OFFLINE:
        raise InputError(
            f"`model` {model}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            "pass a local diffusers folder instead"
        )
    if not hub_reachable(hub.ENDPOINT):
        # Without this check the hub client spends 25-40 s on retries and prints a dozen lines before failing.
        raise InputError(
            f"`model` {model}: not in the local Hugging Face cache and {hub.ENDPOINT} cannot be reached; "
            "pass a local diffusers folder instead"
        )
    try:
        components = DiffusionPipeline.load_config(model)
        return DiffusionPipeline.from_pretrained(model, **kwargs, **_no_safety_kwargs(components))
    except Exception as err:  # huggingface_hub's offline/not-found/gated errors share no useful base class
        if _is_connection_error(err):
            raise InputError(
                f"`model` {model}: cannot reach the Hugging Face hub and the model is not in the local cache; "
                "pass a local diffusers folder instead"
            ) from None
        raise InputError(f"`model` {model}: could not load from the Hugging Face hub ({_first_line(err)})") from None


def hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's host opens within `timeout` seconds (a proxy counts as reachable)."""
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return True  # the proxy decides; let the client try
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _is_connection_error(err: BaseException) -> bool:
    # diffusers rewraps the transport error as "does not appear to have a file named ..."; the cause chain keeps it.
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if "Connect" in type(err).__name__ or "Timeout" in type(err).__name__ or type(err).__name__ == "gaierror":
            return True
        if type(err).__name__ == "LocalEntryNotFoundError":
            return True
        err = err.__cause__ or err.__context__
    return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _disable_safety_checker(pipe) -> None:
    # Memorized training images are exactly what a safety checker may black out; a scan must see them as generated.
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    if hasattr(pipe, "config") and getattr(pipe.config, "requires_safety_checker", False):
        pipe.register_to_config(requires_safety_checker=False)


def _family(pipe) -> str:
    if getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is not None:
        from memlens.dit_layout import family_of

        return family_of(pipe)  # "pixart", "sd3" or "flux"
    if getattr(pipe, "text_encoder_2", None) is not None or "XL" in type(pipe).__name__:
        return "sdxl"
    tok = getattr(pipe, "tokenizer", None)
    # SD 2.x pads with "!" while SD 1.x pads with EOS; v-prediction is the other SD2 hallmark (not for sd2-base).
    if tok is not None and tok.pad_token is not None and tok.pad_token != tok.eos_token:
        return "sd2"
    if getattr(pipe.scheduler.config, "prediction_type", None) == "v_prediction":
        return "sd2"
    return "sd1"


def pipeline_facts(pipe) -> dict[str, Any]:
    """What run.json records about the pipeline, and where scan takes its default image size from."""
    unet = getattr(pipe, "unet", None)
    if unet is None:  # diffusion transformers; FLUX's transformer has no sample_size, its pipeline a default
        unet = getattr(pipe, "transformer", None)
    sample = getattr(unet.config, "sample_size", None) if unet is not None else None
    sample = sample or getattr(pipe, "default_sample_size", None)
    scale = getattr(pipe, "vae_scale_factor", None)
    if isinstance(sample, (list, tuple)):
        height, width = (int(s * scale) for s in sample) if scale else (None, None)
    else:
        height = width = int(sample * scale) if sample and scale else None
    first = next((p for p in (unet.parameters() if unet is not None else [])), None)
    return {
        "class": type(pipe).__name__,
        "family": _family(pipe),
        "name_or_path": getattr(pipe.config, "_name_or_path", None) if hasattr(pipe, "config") else None,
        "height": height,
        "width": width,
        "vae_scale_factor": scale,
        # Pipelines that recommend their own sampling settings (the organism does) say so in their config.
        "default_steps": getattr(getattr(pipe, "config", None), "default_num_inference_steps", None),
        "default_guidance": getattr(getattr(pipe, "config", None), "default_guidance_scale", None),
        "scheduler": type(pipe.scheduler).__name__,
        "prediction_type": getattr(pipe.scheduler.config, "prediction_type", None),
        "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
        "device": str(first.device) if first is not None else None,
    }
