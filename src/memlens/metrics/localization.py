"""Localization metrics: how well a BE map outlines the memorized region given a ground-truth binary mask.

The paper has no intrinsic localization score (its App. 9.1 leaves it to future work), so these are ours; the
choices are fixed here, in advance, so nobody tunes them on the evaluation set:
- maps are upsampled to the mask's size BILINEARLY (half-pixel centres, i.e. `align_corners=False`; antialiased
  when shrinking), see `upsample_map`;
- fixed thresholds act on the per-image min-max normalised map: `> 0.5`, and Otsu's threshold;
- the best-threshold IoU is an ORACLE (it looks at the masks) and is named so everywhere.
Maps and masks are (H, W) arrays; masks are boolean (or 0/1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

from memlens.maps import normalize, threshold_otsu, upsample

__all__ = [
    "upsample_map",
    "minmax_normalize",
    "pixel_auroc",
    "pixel_auroc_per_image",
    "iou",
    "binarize_fixed",
    "binarize_otsu",
    "oracle_iou",
    "localization_summary",
]


# One implementation of resizing and scaling serves the probe, the pictures and the metrics, so a map scored here is
# the map a user sees.
upsample_map = upsample
minmax_normalize = normalize


def _pairs(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]):
    if len(maps) != len(masks):
        raise ValueError(f"{len(maps)} maps for {len(masks)} masks")
    for i, (m, g) in enumerate(zip(maps, masks)):
        m = np.asarray(m, dtype=np.float32)
        g = np.asarray(g).astype(bool)
        if m.shape != g.shape:
            raise ValueError(f"pair {i}: map shape {m.shape} differs from mask shape {g.shape}; upsample first")
        yield m, g


def pixel_auroc(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    """AUROC over all pixels of all images pooled together (maps compared on their own scale as given)."""
    values, truth = [], []
    for m, g in _pairs(maps, masks):
        values.append(m.ravel())
        truth.append(g.ravel())
    y = np.concatenate(truth)
    if y.all() or not y.any():
        raise ValueError("pooled masks contain only one class; pixel AUROC is undefined")
    return float(roc_auc_score(y, np.concatenate(values)))


def pixel_auroc_per_image(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[float, int]:
    """Mean of per-image pixel AUROCs over images whose mask has both classes; returns (mean, images used)."""
    scores = [float(roc_auc_score(g.ravel(), m.ravel())) for m, g in _pairs(maps, masks) if g.any() and not g.all()]
    if not scores:
        return float("nan"), 0
    return float(np.mean(scores)), len(scores)


def iou(pred: np.ndarray, mask: np.ndarray) -> float:
    """|pred AND mask| / |pred OR mask|; two empty regions agree perfectly, so that case is 1.0."""
    p = np.asarray(pred).astype(bool)
    g = np.asarray(mask).astype(bool)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from mask shape {g.shape}")
    union = np.logical_or(p, g).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(p, g).sum() / union)


def binarize_fixed(be_map: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Pixels whose min-max normalised value is strictly above `threshold`."""
    return minmax_normalize(be_map) > threshold


def binarize_otsu(be_map: np.ndarray) -> np.ndarray:
    """Pixels strictly above Otsu's threshold (`skimage.filters.threshold_otsu`); a constant map selects nothing."""
    m = np.asarray(be_map, dtype=np.float32)
    return m > threshold_otsu(m)


def oracle_iou(
    maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], thresholds: np.ndarray | None = None
) -> tuple[float, float]:
    """ORACLE: the one threshold on min-max normalised maps that maximises mean IoU over the images; (iou, threshold).

    It uses the ground truth to pick the threshold (as Kim & Lee 2026 report), so it is an upper bound for any
    fixed-threshold rule, never a number to compare with one. Default grid: 101 values 0, 0.01, ..., 1.
    """
    grid = np.linspace(0.0, 1.0, 101) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    pairs = [(minmax_normalize(m), g) for m, g in _pairs(maps, masks)]
    if not pairs:
        raise ValueError("no maps given")
    means = np.array([np.mean([iou(m > t, g) for m, g in pairs]) for t in grid])
    k = int(np.argmax(means))
    return float(means[k]), float(grid[k])


def localization_summary(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> dict:
    """`{"pixel_auroc", "iou", "n"}` of maps (any resolution; upsampled to each mask) against boolean masks: the
    pooled AUROC of per-image min-max normalised maps (`pixel_auroc_pooled_minmax` of `memlens evaluate
    localization`) and the mean Otsu IoU (`iou_otsu_mean`). None when there are no maps, or the AUROC when the
    pooled masks hold one class. The demo's `localization` numbers."""
    ups = [upsample_map(m, np.asarray(g).shape) for m, g in zip(maps, masks)]
    if not ups:
        return {"pixel_auroc": None, "iou": None, "n": 0}
    try:
        auroc = pixel_auroc([minmax_normalize(m) for m in ups], masks)
    except ValueError:
        auroc = None
    ious = [iou(binarize_otsu(m), g) for m, g in zip(ups, masks)]
    return {"pixel_auroc": auroc, "iou": float(np.mean(ious)), "n": len(ups)}
