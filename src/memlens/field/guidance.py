"""Inference-time mitigations that change only the guidance or the text embeddings, as pure functions.

Jain et al. (CVPR 2025), `SonyResearch/mitigating_memorization` @c6e813c8e1: classifier-free guidance applied while
the sample is still inside the memorized image's "attraction basin" causes the copy; withhold it until then.
- **cfg-delay, static transition** (`generate_test_dataset_stp.py`, README: `--guidance_change_step 500
  --guidance_scale 0.0 --guidance_scale_later 7.5`): scale `early` while the timestep t > change, `late` from the
  first t <= change. With early = 0 the early steps are purely UNCONDITIONAL (eps_u).
- **opposite guidance** (same script, README: `--guidance_change_step 650 --guidance_scale -2.0
  --guidance_scale_later 7.5`): the same schedule with a negative early scale, pushing away from the prompt early.
- **cfg-delay, dynamic transition** (`generate_test_dataset_dtp.py`): d_j = ||eps_u - eps_c||_2 at step j; guidance
  switches on at the first step j with d_j > d_{j-1} and d_{j-2} > d_{j-1} (d_{j-1} a strict local minimum; j >= 2),
  decided from the current step's own predictions, and stays on. Before it the scale is 1.0: purely CONDITIONAL
  (eps_c), unlike the static variant's 0.0.
Differences from their scripts: their batch is one image and d_j the norm over it; here d_j is per sample. The static
script switches the scheduler to 200 steps when t equals the change timestep exactly; that sampler change is not
reproduced (a schedule of scales cannot change the step count). Their dynamic opposite-guidance script flips the
sign of the scale at every step and exits at the transition, so only the static opposite guidance is implemented.
Cost: none beyond plain generation (the static rule could skip the unused branch before the transition; the
dynamic rule needs both).

Kim & No (2026, arXiv 2605.02908; from the abstract): SD's padding positions repeat the end-of-text (EOT) embedding
and drive memorization; mitigation: pad with another token instead of EOT and mask the EOT embedding, or mask part of
the padding. `mask_end_token` zeroes the chosen positions of the conditional embeddings (or replaces them with given
rows, e.g. the unconditional ones); `end_token_mask` gives the same positions as a cross-attention key mask;
`repad_input_ids` re-pads token ids for a re-encode. Cost: none (one text-encoder pass when re-padding).

Attaching to a stock pipeline: a pipeline combines eps = u + G (c - u) with its own fixed G and changes its batch
layout when G <= 1, so scales of 0, 1 or -2 cannot go through `guidance_scale`; `retarget_conditional` rewrites the
conditional half of the UNet output (in a forward hook) so the pipeline's own combination yields u + s (c - u).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

__all__ = [
    "guided",
    "retarget_conditional",
    "StaticTransition",
    "CFG_DELAY",
    "OPPOSITE_GUIDANCE",
    "dynamic_transition_step",
    "dynamic_transition_scales",
    "DynamicTransition",
    "end_token_positions",
    "end_token_mask",
    "mask_end_token",
    "repad_input_ids",
]


def _per_sample(value, like: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return v.reshape(-1, *([1] * (like.dim() - 1))) if v.dim() else v


def guided(eps_u: torch.Tensor, eps_c: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """eps_u + scale * (eps_c - eps_u); scale a float or one value per sample (B,)."""
    return eps_u + _per_sample(scale, eps_u) * (eps_c - eps_u)


def retarget_conditional(
    eps_u: torch.Tensor, eps_c: torch.Tensor, scale: float | torch.Tensor, pipeline_scale: float
) -> torch.Tensor:
    """The conditional output c' with u + pipeline_scale * (c' - u) == u + scale * (c - u).

    Assumes the pipeline's plain CFG combination (no guidance_rescale).
    """
    if pipeline_scale == 0:
        raise ValueError("pipeline_scale must be non-zero: the pipeline must run classifier-free guidance")
    return eps_u + _per_sample(scale, eps_u) / pipeline_scale * (eps_c - eps_u)


@dataclass(frozen=True)
class StaticTransition:
    """Scale `early` while t > change_timestep, `late` from the first t <= change_timestep (Jain et al.'s STP)."""

    early: float
    late: float
    change_timestep: float

    def scale(self, t: Any) -> float:
        return self.early if float(t) > self.change_timestep else self.late

    def schedule(self, timesteps: Sequence) -> list[float]:
        """Per-step scales for a scheduler's timesteps (in sampling order)."""
        return [self.scale(t) for t in timesteps]

    def combine(self, eps_u: torch.Tensor, eps_c: torch.Tensor, step: int, timesteps: Sequence) -> torch.Tensor:
        """The guided prediction at sampling step `step` of `timesteps`."""
        return guided(eps_u, eps_c, self.scale(timesteps[step]))


CFG_DELAY = StaticTransition(early=0.0, late=7.5, change_timestep=500)  # their README's cfg-delay command
OPPOSITE_GUIDANCE = StaticTransition(early=-2.0, late=7.5, change_timestep=650)  # their README's opposite guidance


def dynamic_transition_step(norms: Sequence[float]) -> int | None:
    """The first step j >= 2 with norms[j] > norms[j-1] < norms[j-2] (guidance on from j), or None."""
    for j in range(2, len(norms)):
        if norms[j] > norms[j - 1] and norms[j - 2] > norms[j - 1]:
            return j
    return None


def dynamic_transition_scales(norms: Sequence[float], early: float = 1.0, late: float = 7.5) -> list[float]:
    """Per-step scales of one sample's trajectory of d_j = ||eps_u - eps_c||; step j uses d_0..d_j only."""
    j = dynamic_transition_step(norms)
    return [early if j is None or i < j else late for i in range(len(norms))]


@dataclass
class DynamicTransition:
    """Stateful per-sample DTP for use inside a sampling loop: call `scale` once per step, in order."""

    early: float = 1.0
    late: float = 7.5
    _prev: torch.Tensor | None = field(default=None, repr=False)
    _prev_prev: torch.Tensor | None = field(default=None, repr=False)
    _on: torch.Tensor | None = field(default=None, repr=False)

    def scale(self, eps_u: torch.Tensor, eps_c: torch.Tensor) -> torch.Tensor:
        """This step's scale per sample (B,), from this step's predictions and the two steps before."""
        d = (eps_u - eps_c).flatten(1).double().norm(dim=1)
        if self._on is None:
            # Their script starts both remembered norms at -1, so no switch can happen before the third step.
            self._prev = self._prev_prev = torch.full_like(d, -1.0)
            self._on = torch.zeros_like(d, dtype=torch.bool)
        self._on = self._on | ((d > self._prev) & (self._prev_prev > self._prev))
        self._prev_prev, self._prev = self._prev, d
        return torch.where(self._on, self.late, self.early).to(eps_u.dtype)

    def combine(self, eps_u: torch.Tensor, eps_c: torch.Tensor) -> torch.Tensor:
        return guided(eps_u, eps_c, self.scale(eps_u, eps_c))

    @property
    def switched(self) -> torch.Tensor | None:
        """Which samples have guidance on (None before the first step)."""
        return self._on


# --- Kim & No: the end token ---------------------------------------------------------------------------------------

_MASK_MODES = ("eot", "padding", "eot+padding")


def end_token_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Position of the first end token in each row, (B,) long. A row without one is an error naming the row."""
    from memlens.quantities import first_eos

    ids = torch.as_tensor(input_ids)
    pos = first_eos(ids, eos_token_id)
    # first_eos falls back to the last position for a row without one; masking that would hide a real token.
    missing = (ids.gather(1, pos[:, None])[:, 0] != eos_token_id).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"row {missing[0]} of input_ids has no end token (id {eos_token_id})")
    return pos


def end_token_mask(input_ids: torch.Tensor, eos_token_id: int, mode: str = "eot") -> torch.Tensor:
    """(B, L) bool, True at the positions `mode` masks: "eot" (the first end token), "padding" (every position
    after it), "eot+padding" (both)."""
    if mode not in _MASK_MODES:
        raise ValueError(f"mode must be one of {_MASK_MODES}, got {mode!r}")
    ids = torch.as_tensor(input_ids)
    pos = end_token_positions(ids, eos_token_id)[:, None]
    col = torch.arange(ids.shape[1], device=ids.device)[None]
    return {"eot": col == pos, "padding": col > pos, "eot+padding": col >= pos}[mode]


def mask_end_token(
    prompt_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    eos_token_id: int,
    mode: str = "eot",
    fill: torch.Tensor | None = None,
) -> torch.Tensor:
    """Conditional embeddings (B, L, D) with the `mode` positions zeroed, or taken from `fill` ((L, D) or
    (B, L, D), e.g. the unconditional embeddings). Returns a new tensor."""
    if prompt_embeds.shape[:2] != torch.as_tensor(input_ids).shape:
        shapes = f"prompt_embeds {tuple(prompt_embeds.shape)} and input_ids {tuple(input_ids.shape)}"
        raise ValueError(f"{shapes} disagree on (B, L)")
    m = end_token_mask(input_ids, eos_token_id, mode).to(prompt_embeds.device)[..., None]
    other = torch.zeros_like(prompt_embeds) if fill is None else fill.to(prompt_embeds).expand_as(prompt_embeds)
    return torch.where(m, other, prompt_embeds)


def repad_input_ids(input_ids: torch.Tensor, eos_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Token ids with every position after the first end token set to pad_token_id (SD 1.x pads with the end token
    itself; Kim & No pad with another, e.g. "!"). Encode the result with the text encoder to get the embeddings."""
    ids = torch.as_tensor(input_ids)
    return torch.where(end_token_mask(ids, eos_token_id, "padding"), torch.full_like(ids, pad_token_id), ids)
