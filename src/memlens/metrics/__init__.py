"""Plain-array metrics for detection, localization and similarity (definitions in docs/metrics.md).

Submodules import only numpy, scikit-learn and scikit-image at import time; torch and open_clip are imported inside
the functions that need them.
"""

from memlens.metrics.detection import (
    best_f1,
    detection_metrics,
    first_steps_mean,
    per_prompt_scores,
    roc_auc,
    roc_points,
    separation,
    tpr_at_fpr_nearest,
    tpr_at_fpr_wen,
    wen_accuracy,
)
from memlens.metrics.localization import (
    binarize_fixed,
    binarize_otsu,
    iou,
    localization_summary,
    minmax_normalize,
    oracle_iou,
    pixel_auroc,
    pixel_auroc_per_image,
    upsample_map,
)

__all__ = [
    "best_f1",
    "detection_metrics",
    "first_steps_mean",
    "per_prompt_scores",
    "roc_auc",
    "roc_points",
    "separation",
    "tpr_at_fpr_nearest",
    "tpr_at_fpr_wen",
    "wen_accuracy",
    "binarize_fixed",
    "binarize_otsu",
    "iou",
    "localization_summary",
    "minmax_normalize",
    "oracle_iou",
    "pixel_auroc",
    "pixel_auroc_per_image",
    "upsample_map",
]
