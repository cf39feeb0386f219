"""The bright-ending quantities, in one place: every part of memlens that measures D, LD or a BE mask calls these.

For one image with text-conditional difference d = eps_c - eps_u (C latent channels x H x W) and a mask m (H x W)
broadcast over channels:

    energy E(h, w) = sum_c d^2
    D  = ||d||_2               = sqrt(sum_hw E)
    LD = ||d * m||_2 / mean(m) = sqrt(sum_hw E m^2) / mean(m)

LD is computed from E, never from d: the probe keeps E per step (so that a mask known only after the last step
still gives LD of every step, exactly), and the mitigations' D/LD go through the same lines so that the two agree.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from memlens.unet_call import cfg_rows

__all__ = ["guidance_difference", "paired_difference", "energy", "magnitude", "difference_magnitude", "mask_to_latent", "first_eos"]


def guidance_difference(eps: torch.Tensor, latent_channels: int) -> torch.Tensor:
    """eps_c - eps_u of a CFG batch (2n, C', H, W) as float32 (n, C, H, W), C = `latent_channels`.

    Models that also predict a variance (SD 2.x upscalers, DeepFloyd: C' = 2C) put it after the noise channels; only
    the first C are noise. The subtraction runs in the model's dtype, as in the pipeline's own guidance line.
    """
    uncond, cond = cfg_rows(eps.shape[0])
    return paired_difference(eps[cond], eps[uncond], latent_channels)


def paired_difference(cond: torch.Tensor, uncond: torch.Tensor, latent_channels: int) -> torch.Tensor:
    """eps_c - eps_u as float32 (n, C, H, W) from separately evaluated branches (n, C', H, W) each: FLUX's true CFG
    evaluates them in two calls. For an epsilon model eps is noise; for a flow model it is the velocity."""
    return (cond[:, :latent_channels] - uncond[:, :latent_channels]).float()


def energy(diff: torch.Tensor) -> torch.Tensor:
    """Channel-summed squared difference: (n, C, H, W) -> (n, H, W)."""
    return diff.pow(2).sum(dim=1)


def magnitude(energy: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """D (no mask) or LD from energy maps (..., n, H, W); `mask` is (n, H, W) at the same resolution (see
    `mask_to_latent`). Returns (..., n). The normalisation by mean(m) makes a constant mask give D."""
    if mask is None:
        return energy.flatten(-2).sum(dim=-1).sqrt()
    mask = mask.to(energy)
    return (energy * mask.pow(2)).flatten(-2).sum(dim=-1).sqrt() / mask.flatten(-2).mean(dim=-1)


def difference_magnitude(diff: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image D or LD of eps_c - eps_u (n, C, H, W), shape (n,). Differentiable (PE optimises it)."""
    return magnitude(energy(diff), mask)


MASK_RESIZES = ("bilinear", "patch")


def mask_to_latent(maps: torch.Tensor, size: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """BE maps (n, h, w) brought to the latent size (n, H, W). Maps already at that size (SD 1.x/2.x's first block)
    are returned as they are.

    ``"bilinear"`` (align_corners=False) is what the reference does for UNets. ``"patch"`` repeats each value over
    the (H/h) x (W/w) latent pixels it covers: a transformer's image token is made from exactly one p x p patch of
    the latent, so this is the token's own footprint (LD then equals a token-level computation).
    """
    size = tuple(int(s) for s in size)
    if tuple(maps.shape[-2:]) == size:
        return maps
    if mode == "patch":
        fh, fw = size[0] // maps.shape[-2], size[1] // maps.shape[-1]
        if (fh * maps.shape[-2], fw * maps.shape[-1]) != size:
            raise ValueError(f"a {tuple(maps.shape[-2:])} token grid does not tile a {size} latent")
        return maps.repeat_interleave(fh, dim=-2).repeat_interleave(fw, dim=-1)
    if mode != "bilinear":
        raise ValueError(f"mask resize must be one of {MASK_RESIZES}, got {mode!r}")
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def first_eos(input_ids, eos_token_id: int) -> torch.Tensor:
    """Position of the first end token in each row of padded ids (B, L), as a long tensor (B,).

    A row without one (a prompt cut at the context length by a tokenizer that does not re-append it) gets the last
    position, where the end token would have been.
    """
    ids = torch.as_tensor(input_ids)
    hit = ids == eos_token_id
    last = torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)
    return torch.where(hit.any(dim=1), hit.long().argmax(dim=1), last)
