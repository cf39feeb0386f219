"""IoU of localization maps against ground-truth masks at three threshold rules (numpy only).

- `iou_otsu`: per image, predict `map > Otsu(map)` (256-bin histogram, as `skimage.filters.threshold_otsu`);
- `iou_fixed`: per image, min-max normalise the map to [0, 1] and predict `> 0.5`;
- `iou_oracle`: mem-curv-diff's (Kim & Lee, ICML 2026) reported number. The maps of the WHOLE set are log1p'd,
  min-max normalised together, clipped to [0, 1], and binarised at each of 101 thresholds
  `linspace(-1e-6, 1 + 1e-6, 101)`; the best global IoU (sum of intersections / sum of unions), the best mean IoU and
  the best pixel accuracy over those thresholds are reported, each maximised on its own. The threshold is chosen
  by looking at the ground truth, so it is an upper bound and never comparable with the two fixed rules.

Maps and masks are (H, W) arrays of equal shape (resize before calling); a mask pixel is memorized when > 0.5,
i.e. masks may be boolean, 0/1, or [0, 1] floats. IoU of an empty prediction on an empty mask is 1: nothing to find,
nothing claimed (mem-curv-diff's convention too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["iou", "otsu_threshold", "minmax", "iou_otsu", "iou_fixed", "OracleIoU", "iou_oracle", "ORACLE_THRESHOLDS"]

# mem-curv-diff's grid: the epsilons put 0 and 1 themselves strictly inside the sweep, so "everything" and "nothing"
# are both candidate predictions.
ORACLE_THRESHOLDS = np.linspace(0.0 - 1e-6, 1.0 + 1e-6, 101)


def _pairs(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if len(maps) != len(masks):
        raise ValueError(f"{len(maps)} maps for {len(masks)} masks")
    if len(maps) == 0:
        raise ValueError("no maps given")
    m = [np.asarray(x, dtype=np.float64) for x in maps]
    g = [np.asarray(x, dtype=np.float64) > 0.5 for x in masks]
    for i, (a, b) in enumerate(zip(m, g)):
        if a.ndim != 2 or a.shape != b.shape:
            shapes = f"map shape {a.shape} and mask shape {b.shape}"
            raise ValueError(f"pair {i}: {shapes} must be equal and 2-D; resize first")
        if not np.isfinite(a).all():
            raise ValueError(f"pair {i}: map has NaN or infinite values")
    if len({a.shape for a in m}) > 1:
        raise ValueError(f"maps of different shapes {sorted({a.shape for a in m})}; resize them to one size first")
    return np.stack(m), np.stack(g)


def iou(pred: np.ndarray, mask: np.ndarray) -> float:
    """|pred AND mask| / |pred OR mask| of two boolean arrays; 1.0 when both are empty."""
    p, g = np.asarray(pred, dtype=bool), np.asarray(mask, dtype=bool)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from mask shape {g.shape}")
    union = np.logical_or(p, g).sum()
    return 1.0 if union == 0 else float(np.logical_and(p, g).sum() / union)


def otsu_threshold(values: np.ndarray, nbins: int = 256) -> float:
    """Otsu's threshold over a 256-bin histogram of the values, at a bin centre (skimage's algorithm).

    A constant input returns its value, so `values > threshold` selects nothing.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        return lo
    hist, edges = np.histogram(v, bins=nbins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    hist = hist.astype(np.float64)
    w1 = np.cumsum(hist)  # weight of the class at or below each centre
    w2 = np.cumsum(hist[::-1])[::-1]  # weight at or above
    with np.errstate(invalid="ignore", divide="ignore"):
        m1 = np.cumsum(hist * centres) / w1
        m2 = (np.cumsum((hist * centres)[::-1]) / w2[::-1])[::-1]
    between = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    return float(centres[int(np.nanargmax(between))])


def minmax(values: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by min and max; a constant array becomes all zeros (so `> 0.5` selects nothing)."""
    v = np.asarray(values, dtype=np.float64)
    lo, hi = float(v.min()), float(v.max())
    return np.zeros_like(v) if hi <= lo else (v - lo) / (hi - lo)


def iou_otsu(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> np.ndarray:
    """Per-image IoU of `map > otsu_threshold(map)`, shape (N,)."""
    m, g = _pairs(maps, masks)
    return np.array([iou(a > otsu_threshold(a), b) for a, b in zip(m, g)])


def iou_fixed(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], threshold: float = 0.5) -> np.ndarray:
    """Per-image IoU of `minmax(map) > threshold`, shape (N,)."""
    m, g = _pairs(maps, masks)
    return np.array([iou(minmax(a) > threshold, b) for a, b in zip(m, g)])


@dataclass(frozen=True)
class OracleIoU:
    """ORACLE numbers (best over thresholds chosen with the ground truth), each maximised on its own."""

    global_iou: float  # sum of intersections / sum of unions over the set: what mem-curv-diff reports as "IoU"
    global_iou_threshold: float
    mean_iou: float  # mean of per-image IoUs (empty/empty = 1)
    mean_iou_threshold: float
    accuracy: float  # fraction of pixels predicted right
    accuracy_threshold: float
    n_images: int


def iou_oracle(
    maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], *, log1p: bool = True, thresholds: np.ndarray | None = None
) -> OracleIoU:
    """mem-curv-diff's oracle IoU over a whole evaluation set (memorized AND non-memorized images together).

    Non-memorized images enter with all-zero masks and whole-image copies with all-one masks, as mem-curv-diff does;
    because normalisation is over the set, the result depends on which images are in it. Thresholds are on the
    normalised scale; `thresholds` defaults to `ORACLE_THRESHOLDS`.
    """
    m, g = _pairs(maps, masks)
    if log1p:
        if (m < 0).any():
            raise ValueError("log1p needs non-negative maps (curvature, score-difference and BE maps are)")
        m = np.log1p(m)
    lo, hi = m.min(), m.max()
    norm = np.clip((m - lo) / (hi - lo + 1e-8), 0.0, 1.0)
    grid = ORACLE_THRESHOLDS if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    g_iou, m_iou, acc = [], [], []
    for th in grid:
        pred = norm > th
        inter = np.logical_and(pred, g).sum(axis=(1, 2))
        union = np.logical_or(pred, g).sum(axis=(1, 2))
        per_image = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        g_iou.append(inter.sum() / union.sum() if union.sum() > 0 else 1.0)
        m_iou.append(per_image.mean())
        acc.append((pred == g).mean())
    # argmax keeps the first best threshold, as mem-curv-diff's strict ">" update does.
    best = [int(np.argmax(x)) for x in (g_iou, m_iou, acc)]
    return OracleIoU(
        global_iou=float(g_iou[best[0]]),
        global_iou_threshold=float(grid[best[0]]),
        mean_iou=float(m_iou[best[1]]),
        mean_iou_threshold=float(grid[best[1]]),
        accuracy=float(acc[best[2]]),
        accuracy_threshold=float(grid[best[2]]),
        n_images=len(m),
    )
