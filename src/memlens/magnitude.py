"""Wen's magnitude D and BE's masked magnitude LD from stored per-step energy maps.

The energy of step t is the channel-summed squared text-conditional noise prediction,
E_t(h, w) = sum_c (eps_c - eps_u)^2, so that for any mask m broadcast over channels

    D_t  = ||eps_c - eps_u||_2          = sqrt(sum_hw E_t)
    LD_t = ||(eps_c - eps_u) * m||_2 / mean(m) = sqrt(sum_hw E_t * m^2) / mean(m)

exactly. Keeping E (steps x h x w) instead of the noise predictions is what lets one generation give LD with a mask
that only exists after its last step.
"""

from __future__ import annotations

import numpy as np

from memlens.maps import upsample

__all__ = ["magnitude", "masked_magnitude"]


def magnitude(energy: np.ndarray) -> np.ndarray:
    """D per step from energy maps of shape (steps, h, w); returns float32 (steps,)."""
    energy = np.asarray(energy, dtype=np.float64)
    return np.sqrt(energy.reshape(energy.shape[0], -1).sum(axis=1)).astype(np.float32)


def masked_magnitude(energy: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """LD per step for energy maps (steps, H, W) and a mask (h, w); the mask is resized to (H, W) bilinearly first.

    The normalisation by mean(m) makes LD of a constant mask equal D, whatever the constant.
    """
    energy = np.asarray(energy, dtype=np.float64)
    mask = np.asarray(mask, dtype=np.float32)
    if mask.shape != energy.shape[1:]:
        mask = upsample(mask, energy.shape[1:])
    mask = mask.astype(np.float64)
    mean = mask.mean()
    if not mean > 0:
        raise ValueError("mask has no positive mass; LD is undefined for an all-zero mask")
    weighted = (energy * mask[None] ** 2).reshape(energy.shape[0], -1).sum(axis=1)
    return (np.sqrt(weighted) / mean).astype(np.float32)
