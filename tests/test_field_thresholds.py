"""IoU threshold rules against brute force written out pixel by pixel, and Otsu against skimage."""

from __future__ import annotations

import ast
import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from memlens.field import thresholds as th


def _set(rng, n=5, size=(6, 7)):
    maps = [rng.gamma(2.0, 1.0, size=size) for _ in range(n)]
    masks = [rng.random(size) > 0.6 for _ in range(n)]
    masks[1][:] = False  # a non-memorized image: all-zero ground truth
    masks[2][:] = True  # a whole-image copy: all-one ground truth
    return maps, masks


def _brute_iou(pred_pixels: set, true_pixels: set) -> float:
    union = pred_pixels | true_pixels
    return 1.0 if not union else len(pred_pixels & true_pixels) / len(union)


def _pixels(arr, rule):
    h, w = arr.shape
    return {(i, j) for i in range(h) for j in range(w) if rule(arr[i, j])}


def test_module_imports_no_torch():
    tree = ast.parse(Path(th.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "torch" not in names


def test_iou_fixed_matches_pixelwise_brute_force():
    rng = np.random.default_rng(0)
    maps, masks = _set(rng)
    got = th.iou_fixed(maps, masks, threshold=0.5)
    for k, (m, g) in enumerate(zip(maps, masks)):
        lo, hi = m.min(), m.max()
        pred = _pixels(m, lambda v: (v - lo) / (hi - lo) > 0.5)
        assert got[k] == pytest.approx(_brute_iou(pred, _pixels(g, bool)))


def test_constant_map_predicts_nothing():
    flat = np.full((4, 4), 3.0)
    empty, full = np.zeros((4, 4), bool), np.ones((4, 4), bool)
    assert th.iou_fixed([flat, flat], [empty, full]).tolist() == [1.0, 0.0]
    assert th.iou_otsu([flat, flat], [empty, full]).tolist() == [1.0, 0.0]


def _brute_otsu(values, nbins=256):
    # Between-class variance written from its definition for each split after bin k, values placed by their bin.
    v = np.asarray(values, float).ravel()
    lo, hi = v.min(), v.max()
    width = (hi - lo) / nbins
    bins = np.minimum(((v - lo) / width).astype(int), nbins - 1)
    centres = lo + width * (np.arange(nbins) + 0.5)
    best, best_k = -1.0, None
    for k in range(nbins - 1):
        a, b = centres[bins[bins <= k]], centres[bins[bins > k]]
        if len(a) == 0 or len(b) == 0:
            continue
        var = len(a) * len(b) * (a.mean() - b.mean()) ** 2
        if var > best + 1e-9 * abs(best):
            best, best_k = var, k
    return centres[best_k]


def test_otsu_matches_definition_and_skimage():
    skimage_filters = pytest.importorskip("skimage.filters")
    rng = np.random.default_rng(1)
    for _ in range(5):
        x = np.concatenate([rng.normal(0, 1, 300), rng.normal(rng.uniform(3, 6), 0.7, 200)])
        t = th.otsu_threshold(x)
        assert t == pytest.approx(_brute_otsu(x), abs=1e-9)
        assert t == pytest.approx(float(skimage_filters.threshold_otsu(x)), abs=1e-9)
        assert 0.0 < t < x.max()  # separates the two modes


def test_iou_otsu_uses_each_maps_own_threshold():
    rng = np.random.default_rng(2)
    maps, masks = _set(rng)
    got = th.iou_otsu(maps, masks)
    for k, (m, g) in enumerate(zip(maps, masks)):
        t = _brute_otsu(m)
        assert got[k] == pytest.approx(_brute_iou(_pixels(m, lambda v: v > t), _pixels(g, bool)))


def test_iou_oracle_matches_brute_force_sweep():
    rng = np.random.default_rng(3)
    maps, masks = _set(rng, n=6)
    got = th.iou_oracle(maps, masks)
    logs = [np.log1p(m) for m in maps]
    lo = min(x.min() for x in logs)
    hi = max(x.max() for x in logs)
    best = {"g": (-1, None), "m": (-1, None), "a": (-1, None)}
    for k in range(101):
        t = -1e-6 + k * (1 + 2e-6) / 100
        inter = union = right = total = 0
        per_image = []
        for x, g in zip(logs, masks):
            pred = _pixels(x, lambda v: min(max((v - lo) / (hi - lo + 1e-8), 0), 1) > t)
            true = _pixels(g, bool)
            inter += len(pred & true)
            union += len(pred | true)
            per_image.append(_brute_iou(pred, true))
            h, w = g.shape
            right += sum(((i, j) in pred) == ((i, j) in true) for i, j in itertools.product(range(h), range(w)))
            total += h * w
        values = {"g": inter / union if union else 1.0, "m": sum(per_image) / len(per_image), "a": right / total}
        for key, value in values.items():
            if value > best[key][0]:
                best[key] = (value, t)
    assert got.global_iou == pytest.approx(best["g"][0])
    assert got.global_iou_threshold == pytest.approx(best["g"][1])
    assert got.mean_iou == pytest.approx(best["m"][0])
    assert got.mean_iou_threshold == pytest.approx(best["m"][1])
    assert got.accuracy == pytest.approx(best["a"][0])
    assert got.n_images == 6


def test_oracle_normalises_over_the_set_not_per_image():
    # Two perfectly informative maps: one threshold separates both, until one map is scaled up so that its
    # background outshines the other's foreground. Per-image min-max would be blind to the scaling; the set-level
    # normalisation is not.
    masks = [np.zeros((4, 4), bool), np.zeros((4, 4), bool)]
    masks[0][:2] = True
    masks[1][:, :1] = True
    maps = [m + 0.1 for m in masks]
    assert th.iou_oracle(maps, masks).global_iou == pytest.approx(1.0)
    maps[1] = maps[1] * 100
    assert th.iou_oracle(maps, masks).global_iou < 0.99
    assert th.iou_fixed(maps, masks).tolist() == [1.0, 1.0]


def test_oracle_is_an_upper_bound_of_any_single_grid_threshold():
    rng = np.random.default_rng(5)
    maps, masks = _set(rng)
    got = th.iou_oracle(maps, masks, thresholds=np.array([0.3]))
    full = th.iou_oracle(maps, masks)
    assert full.global_iou >= got.global_iou and full.mean_iou >= got.mean_iou


def test_errors_name_the_pair():
    with pytest.raises(ValueError, match="pair 1"):
        th.iou_fixed([np.zeros((2, 2)), np.zeros((2, 3))], [np.zeros((2, 2)), np.zeros((2, 2))])
    with pytest.raises(ValueError, match="non-negative"):
        th.iou_oracle([-np.ones((2, 2))], [np.zeros((2, 2))])
    with pytest.raises(ValueError, match="2 maps for 1 masks"):
        th.iou_otsu([np.zeros((2, 2))] * 2, [np.zeros((2, 2))])
    assert math.isclose(th.iou(np.zeros(3, bool), np.zeros(3, bool)), 1.0)
