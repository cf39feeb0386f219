"""Detection metrics against hand-worked examples and a brute-force threshold sweep written independently of sklearn."""

import numpy as np
import pytest

from memlens.metrics import detection as det


def brute(labels, scores):
    """Every number by sweeping `score >= t` over all distinct scores plus +inf (the ROC's (0, 0) point)."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=float)
    pos, neg = s[y == 1], s[y == 0]
    auc = (np.sum(pos[:, None] > neg[None, :]) + 0.5 * np.sum(pos[:, None] == neg[None, :])) / (pos.size * neg.size)
    pts = []
    for t in np.append(np.unique(s), np.inf):
        pred = s >= t
        tp, fp = np.sum(pred & (y == 1)), np.sum(pred & (y == 0))
        tpr, fpr = tp / pos.size, fp / neg.size
        f1 = 2 * tp / (2 * tp + fp + (pos.size - tp)) if tp else 0.0
        pts.append((t, tpr, fpr, f1))
    acc = max(1 - (fpr + 1 - tpr) / 2 for _, tpr, fpr, _ in pts)
    f1_best = max(p[3] for p in pts)
    wen = max(tpr for _, tpr, fpr, _ in pts if fpr < 0.01)
    gap = min(abs(fpr - 0.01) for _, _, fpr, _ in pts)
    near = max((tpr, fpr) for _, tpr, fpr, _ in pts if abs(abs(fpr - 0.01) - gap) < 1e-12)
    return auc, acc, f1_best, wen, near


def test_hand_worked_four_samples():
    # labels 1,1,0,0 with scores .9,.4,.6,.1: pairs pos>neg = 3 of 4; F1 best 0.8 at t=.4 (P 2/3, R 1).
    y, s = [1, 1, 0, 0], [0.9, 0.4, 0.6, 0.1]
    assert det.roc_auc(y, s) == pytest.approx(0.75)
    assert det.wen_accuracy(y, s) == pytest.approx(0.75)
    f1, thr = det.best_f1(y, s)
    assert f1 == pytest.approx(0.8) and thr == pytest.approx(0.4)
    assert det.tpr_at_fpr_wen(y, s) == pytest.approx(0.5)
    assert det.tpr_at_fpr_nearest(y, s) == (pytest.approx(0.5), pytest.approx(0.0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(70, int), np.zeros(150, int)]
    s = np.round(np.r_[rng.normal(1.5, 1, 70), rng.normal(0, 1, 150)], 1)  # rounding makes ties
    auc, acc, f1, wen, (near_tpr, near_fpr) = brute(y, s)
    m = det.detection_metrics(y, s)
    assert m["auc"] == pytest.approx(auc)
    assert m["acc_wen"] == pytest.approx(acc)
    assert m["f1_best"] == pytest.approx(f1)
    assert m["tpr_at_1pct_fpr_wen"] == pytest.approx(wen)
    assert m["tpr_at_1pct_fpr_nearest"] == pytest.approx(near_tpr)
    assert m["fpr_of_nearest_point"] == pytest.approx(near_fpr)
    assert (m["n_pos"], m["n_neg"]) == (70, 150)
    # the returned F1 threshold reproduces the F1
    pred = s >= m["f1_best_threshold"]
    tp = np.sum(pred & (y == 1))
    assert 2 * tp / (pred.sum() + 70) == pytest.approx(f1)


def test_two_tpr_conventions_differ_at_exactly_one_percent():
    # 100 negatives 0..99 (FPR moves in 1% steps). 10 positives above all, 10 between negatives 98 and 99.
    neg = np.arange(100.0)
    pos = np.r_[np.full(10, 200.0), np.full(10, 98.5), np.full(80, -1.0)]
    y = np.r_[np.ones(100, int), np.zeros(100, int)]
    s = np.r_[pos, neg]
    assert det.tpr_at_fpr_wen(y, s) == pytest.approx(0.10)  # strictly below 1% FPR: only the 200s
    tpr, fpr = det.tpr_at_fpr_nearest(y, s)
    assert (tpr, fpr) == (pytest.approx(0.20), pytest.approx(0.01))


def test_nearest_convention_can_land_above_one_percent():
    # 60 negatives: achievable FPRs 0, 1/60 (1.67%), ...; 1/60 is nearer to 1% than 0 is.
    y = np.r_[np.ones(5, int), np.zeros(60, int)]
    s = np.r_[[10, 10, 5, 5, 5], np.r_[[7.0], np.zeros(59)]]
    assert det.tpr_at_fpr_wen(y, s) == pytest.approx(0.4)
    tpr, fpr = det.tpr_at_fpr_nearest(y, s)
    # at FPR 1/60 (only the negative at 7 passes) every positive is above threshold 5
    assert fpr == pytest.approx(1 / 60) and tpr == pytest.approx(1.0)


def test_first_steps_mean_ragged_and_T():
    rows = [[1.0, 3.0, 5.0], [2.0, 4.0]]
    assert det.first_steps_mean(rows, 1).tolist() == [1.0, 2.0]
    assert det.first_steps_mean(rows, 2).tolist() == [2.0, 3.0]
    assert det.first_steps_mean(rows, None).tolist() == [3.0, 3.0]
    assert det.first_steps_mean(rows).dtype == np.float32
    with pytest.raises(ValueError, match="row 1: has 2 steps, fewer than T=3"):
        det.first_steps_mean(rows, 3)
    with pytest.raises(ValueError, match="T must be"):
        det.first_steps_mean(rows, 0)


def test_per_prompt_mean_and_any_label():
    ids, means, labels = det.per_prompt_scores(
        np.array([1.0, 3.0, 10.0, 2.0]), ["b", "b", "a", "b"], np.array([0, 1, 0, 0])
    )
    assert ids == ["b", "a"]
    assert means.tolist() == [2.0, 10.0]
    assert labels.tolist() == [1, 0]  # "b" has one memorized generation


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="both positive"):
        det.roc_auc([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="3 labels for 2 scores"):
        det.roc_auc([1, 0, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        det.roc_auc([1, 0], [np.nan, 0.3])
