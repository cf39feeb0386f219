"""What a hook on a pipeline's UNet reads from one call: the sample and timestep, which denoising step it is, which
rows of the batch are conditional, and the prediction. One place, used by the probe, the analysis capture and the
mitigations, so that they all agree on the batch layout of classifier-free guidance.

diffusers' text-to-image pipelines stack the CFG batch as ``[unconditional x n, conditional x n]`` along dim 0, and
every tensor argument with 2n rows (sample, text states, SDXL's added conditions) follows that layout.
"""

from __future__ import annotations

from typing import Sequence

import torch

from memlens.errors import MemlensError

__all__ = ["sample_and_timestep", "prediction", "with_prediction", "step_index", "storage_step", "cfg_rows",
           "read_rows", "paired_rows", "select_rows"]


def sample_and_timestep(args: tuple, kwargs: dict) -> tuple[torch.Tensor, object]:
    """The UNet's ``sample`` and ``timestep`` arguments, positional or by keyword."""
    sample = args[0] if args else kwargs["sample"]
    timestep = args[1] if len(args) > 1 else kwargs["timestep"]
    return sample, timestep


def prediction(output) -> torch.Tensor:
    """The predicted noise (or v) of a UNet output, whether ``return_dict`` was True or False."""
    return output[0] if isinstance(output, (tuple, list)) else output.sample


def with_prediction(output, new: torch.Tensor):
    """`output` of the same kind with its prediction replaced (for forward hooks that change it)."""
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    return type(output)(sample=new)


def storage_step(timestep, timesteps) -> int | None:
    """The index of the element of `timesteps` that `timestep` is a view of; None if it is not one.

    UNet pipelines pass the element itself (0-d); PixArt and SD3 pass ``t.expand(batch)``, every entry aliasing the
    one element (stride 0), so the storage offset names the step in both cases.
    """
    if not (torch.is_tensor(timestep) and torch.is_tensor(timesteps)) or timestep.numel() == 0:
        return None
    if timesteps.dim() != 1 or timesteps.stride(0) == 0:
        return None
    if any(stride != 0 for stride, size in zip(timestep.stride(), timestep.shape) if size > 1):
        return None
    if timestep.untyped_storage().data_ptr() != timesteps.untyped_storage().data_ptr():
        return None
    offset = timestep.storage_offset() - timesteps.storage_offset()
    if offset % timesteps.stride(0) or not 0 <= offset // timesteps.stride(0) < len(timesteps):
        return None
    return offset // timesteps.stride(0)


def step_index(timestep, timesteps: torch.Tensor, after: int = -1) -> int:
    """Position of the denoiser's `timestep` in the scheduler's `timesteps`, never a count of calls.

    The pipelines pass an element of ``scheduler.timesteps`` itself (or an expanded view of it), so its storage
    offset is the index, and repeated values (PLMS repeats one) stay distinct. A copy is matched by value at the
    first position after `after`. FLUX passes a fresh t / 1000: give it ``pipe._current_timestep`` instead
    (`memlens.dit_layout.step_timestep`).
    """
    step = storage_step(timestep, timesteps)
    if step is not None:
        return step
    value = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
    values = timesteps.detach().cpu().double().tolist()
    for i in range(max(after + 1, 0), len(values)):
        if values[i] == value:
            return i
    raise MemlensError(
        f"the UNet was called with timestep {value}, which is not among pipe.scheduler.timesteps after step "
        f"{after}; memlens reads the step from the pipeline's scheduler"
    )


def cfg_rows(batch: int) -> tuple[slice, slice]:
    """(unconditional, conditional) rows of a CFG batch of `batch` rows."""
    if batch % 2:
        raise MemlensError(f"a classifier-free-guidance batch has an even number of rows, got {batch}")
    n = batch // 2
    return slice(0, n), slice(n, batch)


def read_rows(batch: int, cfg: bool) -> slice:
    """The rows whose text is the prompt: the conditional half under CFG, else every row."""
    return cfg_rows(batch)[1] if cfg else slice(0, batch)


def paired_rows(rows: Sequence[int], n: int) -> torch.Tensor:
    """Indices into a CFG batch of n images that keep, for each chosen image, its unconditional and conditional row:
    ``[u_r for r in rows] + [c_r for r in rows]``, so the result is again a CFG batch."""
    idx = torch.as_tensor(list(rows), dtype=torch.long)
    return torch.cat([idx, idx + n])


def select_rows(value, index: torch.Tensor, batch: int):
    """`value` with rows `index` of every tensor whose first dimension is `batch` (recursing into dicts); anything
    else (a scalar timestep, None, a flag) is passed through unchanged."""
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch:
        return value.index_select(0, index.to(value.device))
    if isinstance(value, dict):
        return {k: select_rows(v, index, batch) for k, v in value.items()}
    return value
