"""An independent numpy (float64) computation of the bright-ending quantities, written from their definitions, for
tests of `memlens.quantities` (it was `memlens.magnitude` before the core moved to torch). No memlens code.

    D  = ||eps_c - eps_u||_2                 = sqrt(sum_hw E),  E = sum_c (eps_c - eps_u)^2
    LD = ||(eps_c - eps_u) * m||_2 / mean(m) = sqrt(sum_hw E m^2) / mean(m)
"""

from __future__ import annotations

import numpy as np


def bilinear(m: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Separable bilinear resize with half-pixel centres (align_corners=False) and clamped edges, no antialiasing."""

    def weights(n_in, n_out):
        w = np.zeros((n_out, n_in))
        for i in range(n_out):
            src = min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
            i0 = int(np.floor(src))
            i1 = min(i0 + 1, n_in - 1)
            w[i, i0] += 1 - (src - i0)
            w[i, i1] += src - i0
        return w

    m = np.asarray(m, dtype=np.float64)
    return weights(m.shape[0], out_h) @ m @ weights(m.shape[1], out_w).T


def guidance_difference(eps: np.ndarray, latent_channels: int) -> np.ndarray:
    """(2n, C', H, W) [unconditional, conditional] -> (n, C, H, W), noise channels only."""
    eps = np.asarray(eps, dtype=np.float64)
    n = eps.shape[0] // 2
    return eps[n:, :latent_channels] - eps[:n, :latent_channels]


def energy(diff: np.ndarray) -> np.ndarray:
    return (np.asarray(diff, dtype=np.float64) ** 2).sum(axis=1)


def magnitude(energy: np.ndarray) -> np.ndarray:
    """D per map from energy maps (k, h, w)."""
    energy = np.asarray(energy, dtype=np.float64)
    return np.sqrt(energy.reshape(energy.shape[0], -1).sum(axis=1))


def masked_magnitude(energy: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """LD per map for energy maps (k, H, W) and one mask (h, w), resized bilinearly to (H, W) first."""
    energy = np.asarray(energy, dtype=np.float64)
    mask = np.asarray(mask, dtype=np.float64)
    if mask.shape != energy.shape[1:]:
        mask = bilinear(mask, *energy.shape[1:])
    weighted = (energy * mask[None] ** 2).reshape(energy.shape[0], -1).sum(axis=1)
    return np.sqrt(weighted) / mask.mean()


def first_eos(ids, eos_token_id: int) -> list[int]:
    out = []
    for row in ids:
        row = list(row)
        out.append(row.index(eos_token_id) if eos_token_id in row else len(row) - 1)
    return out
