"""Localization metrics against hand-worked values and independent numpy computations."""

import numpy as np
import pytest

from memlens.metrics import localization as L


def bilinear_half_pixel(m, out_h, out_w):
    """Separable bilinear resize with half-pixel centres and clamped edges, written from the definition."""

    def weights(n_in, n_out):
        W = np.zeros((n_out, n_in))
        for i in range(n_out):
            src = min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
            i0 = int(np.floor(src))
            i1 = min(i0 + 1, n_in - 1)
            W[i, i0] += 1 - (src - i0)
            W[i, i1] += src - i0
        return W

    return weights(m.shape[0], out_h) @ m @ weights(m.shape[1], out_w).T


def mann_whitney_auc(y, s):
    pos, neg = s[y], s[~y]
    return (np.sum(pos[:, None] > neg[None, :]) + 0.5 * np.sum(pos[:, None] == neg[None, :])) / (pos.size * neg.size)


def test_upsample_hand_values_2x2_to_4x4():
    up = L.upsample_map(np.array([[0.0, 1.0], [2.0, 3.0]]), (4, 4))
    # first column: rows are row0, .75 row0 + .25 row1, .25 row0 + .75 row1, row1
    assert up[:, 0].tolist() == pytest.approx([0.0, 0.5, 1.5, 2.0])
    assert up[0].tolist() == pytest.approx([0.0, 0.25, 0.75, 1.0])
    assert up.dtype == np.float32


def test_upsample_matches_independent_bilinear_non_square():
    m = np.random.default_rng(0).random((3, 5)).astype(np.float32)
    assert L.upsample_map(m, (12, 11)) == pytest.approx(bilinear_half_pixel(m.astype(float), 12, 11), abs=1e-6)
    assert np.array_equal(L.upsample_map(m, (3, 5)), m)
    with pytest.raises(ValueError, match="2-D"):
        L.upsample_map(np.zeros((2, 2, 2)), (4, 4))


def test_iou_hand_and_empty():
    pred = np.array([[1, 1], [0, 0]], bool)
    mask = np.array([[1, 0], [1, 0]], bool)
    assert L.iou(pred, mask) == pytest.approx(1 / 3)
    assert L.iou(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    assert L.iou(np.ones((2, 2)), np.zeros((2, 2))) == 0.0


def test_fixed_threshold_is_strict_on_minmax_map():
    m = np.array([[5.0, 6.0], [7.0, 9.0]])  # normalised: 0, .25, .5, 1
    assert L.binarize_fixed(m).tolist() == [[False, False], [False, True]]
    assert L.minmax_normalize(np.full((2, 2), 3.0)).tolist() == [[0, 0], [0, 0]]


def test_otsu_splits_clusters_like_brute_force_between_class_variance():
    # Three exact levels: skimage thresholds at a 256-bin histogram's bin centre, so values sharing the threshold's
    # bin may land on either side; exact levels keep the comparison about the criterion, not the binning.
    rng = np.random.default_rng(1)
    m = rng.permutation(np.repeat([0.1, 0.5, 0.9], [40, 30, 30])).reshape(10, 10)
    v = np.sort(m.ravel())
    u = np.unique(v)
    best, best_t = -1, None
    for t in (u[:-1] + u[1:]) / 2:  # every possible split
        a, b = v[v <= t], v[v > t]
        between = a.size * b.size * (a.mean() - b.mean()) ** 2
        if between > best:
            best, best_t = between, t
    assert 0.1 < best_t < 0.5  # 40 | 60 beats 70 | 30 on between-class variance
    assert np.array_equal(L.binarize_otsu(m), m > best_t)
    assert not L.binarize_otsu(np.ones((3, 3))).any()


def test_otsu_on_a_map_flat_to_float32_resolution():
    # An attention map whose values differ only in float32's last bits (seen on padding tokens): skimage refuses
    # 256 float32 bins over such a range; the split must still be the one between its two levels.
    base = np.float32(0.0625)
    m = np.full((8, 8), base, np.float32)
    m[:3] = np.nextafter(base, np.float32(1))
    assert np.array_equal(L.binarize_otsu(m), m > base)


def test_pixel_auroc_pooled_and_per_image():
    rng = np.random.default_rng(2)
    maps = [rng.random((6, 6)) for _ in range(3)]
    masks = [rng.random((6, 6)) > 0.6 for _ in range(2)] + [np.zeros((6, 6), bool)]
    pooled = mann_whitney_auc(np.concatenate([g.ravel() for g in masks]), np.concatenate([m.ravel() for m in maps]))
    assert L.pixel_auroc(maps, masks) == pytest.approx(pooled)
    mean, used = L.pixel_auroc_per_image(maps, masks)
    assert used == 2  # the all-zero mask has no positive pixel
    assert mean == pytest.approx(np.mean([mann_whitney_auc(g.ravel(), m.ravel()) for m, g in zip(maps[:2], masks[:2])]))
    with pytest.raises(ValueError, match="one class"):
        L.pixel_auroc(maps[2:], masks[2:])
    with pytest.raises(ValueError, match="upsample first"):
        L.pixel_auroc([np.zeros((2, 2))], [np.zeros((3, 3))])


def test_oracle_iou_finds_the_separating_threshold():
    m = np.array([[0.0, 0.25], [0.5, 1.0]])
    g = m >= 0.5
    iou, thr = L.oracle_iou([m], [g])
    assert iou == 1.0 and 0.25 <= thr < 0.5
    # with two images wanting different thresholds, the oracle is the best COMMON one, checked by sweeping
    m2 = np.array([[0.0, 0.6], [0.7, 1.0]])
    g2 = m2 >= 0.7
    grid = np.linspace(0, 1, 101)
    sweep = [np.mean([L.iou(a > t, b) for a, b in ((m, g), (m2, g2))]) for t in grid]
    iou, thr = L.oracle_iou([m, m2], [g, g2])
    assert iou == pytest.approx(max(sweep)) and thr == pytest.approx(grid[int(np.argmax(sweep))])
