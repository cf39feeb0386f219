"""Detection metrics: how well a per-generation (or per-prompt) score separates memorized from non-memorized.

Conventions follow Wen et al.'s `det_mem_viz.ipynb` (the only published code for these numbers) and are spelled out
in docs/metrics.md. Labels are 1 = memorized (positive), 0 = not; a larger score means "more memorized".
Every function takes plain arrays and returns plain floats, in the style of `sklearn.metrics`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

__all__ = [
    "first_steps_mean",
    "per_prompt_scores",
    "roc_points",
    "roc_auc",
    "wen_accuracy",
    "best_f1",
    "tpr_at_fpr_wen",
    "tpr_at_fpr_nearest",
    "detection_metrics",
    "separation",
]


def first_steps_mean(per_step: Sequence[Sequence[float]] | np.ndarray, T: int | None = None) -> np.ndarray:
    """Mean of each row's first `T` values (Eq. 7/8's 1/T sum); `T=None` averages every step.

    Rows may differ in length (ragged lists). A row shorter than `T` is an error rather than a silent mean over fewer
    steps, because "first 10 steps" of a 5-step run is not the number a reader of the table expects.
    """
    if T is not None and T < 1:
        raise ValueError(f"T must be >= 1 or None (all steps), got {T}")
    out = np.empty(len(per_step), dtype=np.float32)
    for i, row in enumerate(per_step):
        row = np.asarray(row, dtype=np.float64)
        if row.ndim != 1 or row.size == 0:
            raise ValueError(f"row {i}: expected a non-empty 1-D list of per-step values, got shape {row.shape}")
        if T is not None and row.size < T:
            raise ValueError(f"row {i}: has {row.size} steps, fewer than T={T}")
        out[i] = row[:T].mean() if T is not None else row.mean()
    return out


def per_prompt_scores(
    scores: np.ndarray, prompt_ids: Sequence, labels: np.ndarray | None = None
) -> tuple[list, np.ndarray, np.ndarray | None]:
    """Average generation scores per prompt (Wen's prompt-level protocol).

    Returns `(prompt_ids, mean_scores, prompt_labels)` with prompts in first-seen order. A prompt is labelled 1 when
    ANY of its generations is labelled 1: the prompt-level question is "can this prompt produce a memorized image",
    and the paper notes a memorized prompt can still yield non-memorized images under some seeds.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if len(prompt_ids) != scores.shape[0]:
        raise ValueError(f"{len(prompt_ids)} prompt ids for {scores.shape[0]} scores")
    order: dict = {}
    for i, p in enumerate(prompt_ids):
        order.setdefault(p, []).append(i)
    ids = list(order)
    means = np.array([scores[idx].mean() for idx in order.values()], dtype=np.float32)
    if labels is None:
        return ids, means, None
    labels = np.asarray(labels)
    plabels = np.array([int(labels[idx].max()) for idx in order.values()], dtype=np.int64)
    return ids, means, plabels


def _check(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels for {s.size} scores")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinity")
    if not set(np.unique(y)) <= {0, 1}:
        raise ValueError("labels must be 0 or 1")
    if np.unique(y).size < 2:
        raise ValueError("need both positive (1) and negative (0) labels")
    return y, s


def roc_points(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(fpr, tpr, thresholds)` from `sklearn.metrics.roc_curve` with every point kept (`drop_intermediate=False`)."""
    y, s = _check(labels, scores)
    return roc_curve(y, s, drop_intermediate=False)


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve (`sklearn.metrics.roc_auc_score`)."""
    y, s = _check(labels, scores)
    return float(roc_auc_score(y, s))


def wen_accuracy(labels, scores) -> float:
    """Wen's ACC: `max over ROC points of 1 - (FPR + (1 - TPR)) / 2`, i.e. the best balanced accuracy."""
    fpr, tpr, _ = roc_points(labels, scores)
    return float(np.max(1.0 - (fpr + (1.0 - tpr)) / 2.0))


def best_f1(labels, scores) -> tuple[float, float]:
    """Best F1 over all thresholds, and that threshold; a sample is called memorized when `score >= threshold`."""
    y, s = _check(labels, scores)
    precision, recall, thresholds = precision_recall_curve(y, s)
    # The last (precision=1, recall=0) point has no threshold; drop it.
    p, r = precision[:-1], recall[:-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    k = int(np.argmax(f1))
    return float(f1[k]), float(thresholds[k])


def tpr_at_fpr_wen(labels, scores, max_fpr: float = 0.01) -> float:
    """Wen's T@1%F: the TPR at the LAST ROC point whose FPR is strictly below `max_fpr`.

    The ROC always starts at (0, 0), so this is defined; it is the best TPR reachable with FPR < `max_fpr`.
    """
    fpr, tpr, _ = roc_points(labels, scores)
    return float(tpr[np.nonzero(fpr < max_fpr)[0][-1]])


def tpr_at_fpr_nearest(labels, scores, target_fpr: float = 0.01) -> tuple[float, float]:
    """TPR at the ROC point whose FPR is closest to `target_fpr` (the highest TPR among ties); returns (tpr, fpr).

    With few negatives the achievable FPRs are coarse (100 negatives: steps of 1%), and this convention may pick a
    point ABOVE the target, where Wen's convention never does; report both and say which.
    """
    fpr, tpr, _ = roc_points(labels, scores)
    gap = np.abs(fpr - target_fpr)
    at = np.nonzero(gap <= gap.min() + 1e-12)[0]  # equal gaps up to rounding (e.g. 0.5% and 1.5%) are ties
    k = at[np.argmax(tpr[at])]
    return float(tpr[k]), float(fpr[k])


def detection_metrics(labels, scores) -> dict:
    """All detection numbers for one score array at the paper's 1% FPR, as a flat dict (see docs/metrics.md)."""
    y, s = _check(labels, scores)
    f1, thr = best_f1(y, s)
    tpr_near, fpr_near = tpr_at_fpr_nearest(y, s, 0.01)
    return {
        "n_pos": int(y.sum()),
        "n_neg": int((1 - y).sum()),
        "auc": roc_auc(y, s),
        "acc_wen": wen_accuracy(y, s),
        "f1_best": f1,
        "f1_best_threshold": thr,
        "tpr_at_1pct_fpr_wen": tpr_at_fpr_wen(y, s, 0.01),
        "tpr_at_1pct_fpr_nearest": tpr_near,
        "fpr_of_nearest_point": fpr_near,
    }


def separation(pos, neg) -> dict:
    """`{"auc", "tpr_at_1pct_fpr"}` of a score that should be higher for `pos` (memorized) than for `neg`; the TPR is
    Wen's convention (`tpr_at_fpr_wen`, FPR strictly below 1%). None when either side is empty. These are the
    numbers `memlens demo` reports as `auc` and `tpr_at_1pct_fpr`, i.e. `detection_metrics`' `auc` and
    `tpr_at_1pct_fpr_wen`."""
    pos, neg = np.asarray(pos, np.float64).ravel(), np.asarray(neg, np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        return {"auc": None, "tpr_at_1pct_fpr": None}
    y = np.r_[np.ones(pos.size), np.zeros(neg.size)]
    s = np.r_[pos, neg]
    return {"auc": roc_auc(y, s), "tpr_at_1pct_fpr": tpr_at_fpr_wen(y, s, 0.01)}
