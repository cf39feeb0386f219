"""Training-time mitigation: drop samples whose text-conditional noise magnitude is above a threshold.

Wen et al.'s filter, generalised to BE's masked magnitude. For each training sample (x_t, t, c), with the UNet being
trained but evaluated without gradients and in eval mode (the reference used train mode, so dropout would leak into
the decision):

    D_i  = ||eps(x_t, t, c) - eps(x_t, t, "")||_2
    LD_i = ||(eps(x_t, t, c) - eps(x_t, t, "")) * m_i||_2 / mean(m_i)

How m_i is obtained during training: BE's map is defined at the end of sampling (t ~ 1), which a training step never
visits. We read the same quantity the probe reads -- the head-averaged attention of the first cross-attention block
on the first end token -- from `memlens.capture`'s processor, either
- `mask_inputs=None` (default): during the very same no-grad [uncond, cond] evaluation, at the sample's own t
  (free: no extra UNet call), or
- `mask_inputs=(x_low, t_low)`: from one extra conditional-only evaluation on the training image noised to a low
  timestep (e.g. t = 1 with the sample's own noise), closest to BE's definition; costs B more UNet rows.
Measured costs and how well the two agree are in docs/mitigation.md.

A sample is kept when its value is <= threshold (the reference dropped n >= tau; equality is kept here so that a
threshold of exactly a sample's value does not remove it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from memlens import capture
from memlens.errors import InputError

__all__ = ["SampleMagnitudes", "sample_magnitudes", "filter_mask", "eos_positions", "CRITERIA"]

CRITERIA = ("none", "D", "LD")


@dataclass
class SampleMagnitudes:
    D: torch.Tensor  # (B,) float32
    LD: torch.Tensor | None = None  # (B,) float32 when masks were requested
    masks: torch.Tensor | None = None  # (B, h, w) float32 BE maps at the captured layers' resolution


def eos_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Index of the first end token in each row of padded ids (the last position if a row has none)."""
    hit = input_ids == eos_token_id
    last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, dtype=torch.long, device=input_ids.device)
    return torch.where(hit.any(dim=1), hit.float().argmax(dim=1), last)


class _Sink(capture.CaptureSink):
    """Collects the end-token attention column of the conditional rows of one UNet call."""

    def __init__(self, rows: slice, tokens: torch.Tensor):
        self.rows, self.tokens = rows, tokens
        self.columns: list[torch.Tensor] = []

    def wants_attention(self) -> bool:
        return True

    def conditional_rows(self) -> slice:
        return self.rows

    def token_indices(self) -> torch.Tensor:
        return self.tokens

    def add_attention(self, layer: str, column: torch.Tensor) -> None:
        self.columns.append(column)


def _grid(queries: int, height: int, width: int) -> tuple[int, int]:
    # Downsamplers map n to ceil(n / 2) per level, as in memlens.probe.
    h, w = height, width
    while h * w > queries and h > 1:
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def _expand(x: torch.Tensor | None, b: int) -> torch.Tensor | None:
    if x is None:
        return None
    return x.expand(b, *x.shape[1:]) if x.shape[0] == 1 else x


@torch.no_grad()
def sample_magnitudes(
    unet,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    masked: bool = False,
    eos_indices: torch.Tensor | Sequence[int] | None = None,
    layers: Sequence[str] | str | None = None,
    mask_inputs: tuple[torch.Tensor, torch.Tensor] | None = None,
    added_cond_kwargs: dict | None = None,
    uncond_added_cond_kwargs: dict | None = None,
) -> SampleMagnitudes:
    """Per-sample D (and LD with its masks when `masked`) for a training batch.

    Args:
        unet: the UNet being trained (a DDP/accelerate wrapper is fine).
        noisy, timesteps: x_t (B, C, H, W) and t (B,) of the batch.
        cond, uncond: text embeddings (B, L, D) and the empty prompt's (1 or B, L, D).
        eos_indices: (B,) end-token positions in `cond`'s ids (see `eos_positions`); needed when `masked`.
        layers: cross-attention layers for the mask (default: the first down block that has any, as the probe).
        mask_inputs: optional (x_low, t_low) to read the mask at another timestep (see the module docstring).
        added_cond_kwargs / uncond_added_cond_kwargs: SDXL-style added conditions for the conditional and
            unconditional rows.
    """
    model = getattr(unet, "module", unet)
    b = noisy.shape[0]
    if masked and eos_indices is None:
        raise InputError("LD needs eos_indices: the end-token position of each sample's caption")
    tokens = None if eos_indices is None else torch.as_tensor(eos_indices, dtype=torch.long).view(-1)
    was_training = model.training
    model.eval()
    installed = None
    sink = None
    try:
        if masked and mask_inputs is None:
            sink = _Sink(slice(b, 2 * b), tokens)
            installed = capture.install(capture.select_layers(model, layers), sink)
        added = None
        if added_cond_kwargs is not None:
            un = uncond_added_cond_kwargs or added_cond_kwargs
            added = {k: torch.cat([_expand(un[k], b), added_cond_kwargs[k]]) for k in added_cond_kwargs}
        eps = model(
            torch.cat([noisy, noisy]),
            torch.cat([timesteps, timesteps]) if timesteps.dim() else timesteps,
            encoder_hidden_states=torch.cat([_expand(uncond, b).to(cond), cond]),
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        if installed is not None:
            installed.remove()
            installed = None
        channels = noisy.shape[1]
        diff = (eps[b:, :channels] - eps[:b, :channels]).float()
        d = diff.flatten(1).norm(dim=1)
        if not masked:
            return SampleMagnitudes(d)
        if mask_inputs is not None:
            x_low, t_low = mask_inputs
            sink = _Sink(slice(0, b), tokens)
            installed = capture.install(capture.select_layers(model, layers), sink)
            model(x_low, t_low, encoder_hidden_states=cond, added_cond_kwargs=added_cond_kwargs, return_dict=False)
            installed.remove()
            installed = None
        columns = torch.stack(sink.columns).mean(dim=0)  # (B, queries), averaged over the captured layers
        h, w = _grid(columns.shape[1], noisy.shape[-2], noisy.shape[-1])
        maps = columns.view(b, h, w).float()
        m = maps if (h, w) == tuple(noisy.shape[-2:]) else F.interpolate(
            maps[:, None], size=noisy.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        ld = (diff * m[:, None]).flatten(1).norm(dim=1) / m.flatten(1).mean(dim=1)
        return SampleMagnitudes(d, ld, maps)
    finally:
        if installed is not None:
            installed.remove()
        model.train(was_training)


def filter_mask(
    unet,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    threshold: float,
    criterion: str = "D",
    **kwargs,
) -> torch.Tensor:
    """Bool (B,) of the samples to keep: criterion value <= threshold. `criterion` is "none", "D" or "LD"; extra
    keyword arguments go to `sample_magnitudes` (LD needs `eos_indices`)."""
    if criterion not in CRITERIA:
        raise InputError(f"--filter {criterion!r}: expected one of {', '.join(CRITERIA)}")
    if criterion == "none":
        return torch.ones(noisy.shape[0], dtype=torch.bool, device=noisy.device)
    mags = sample_magnitudes(unet, noisy, timesteps, cond, uncond, masked=criterion == "LD", **kwargs)
    value = mags.D if criterion == "D" else mags.LD
    return (value <= threshold).to(noisy.device)
