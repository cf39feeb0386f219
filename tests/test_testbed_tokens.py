"""Token naming for the per-token tables, and the attention grid's IoU bound against brute force."""

import itertools

import numpy as np
import pytest

from memlens.testbed.tokens import grid_iou_bound, token_maps, token_positions


def test_token_positions_cover_every_position_once():
    names = token_positions(end_index=4, num_tokens=8)  # BOS, three words, END, three pads
    assert names["bos"] == [0] and names["end"] == [4]
    assert [names[f"word_{k}"] for k in (1, 2, 3)] == [[1], [2], [3]] and names["word_mean"] == [1, 2, 3]
    assert [names[f"pad_{k}"] for k in (1, 2, 3)] == [[5], [6], [7]] and names["pad_mean"] == [5, 6, 7]
    assert names["end+padding"] == [4, 5, 6, 7]
    singles = sorted(p for n, pos in names.items() if not n.endswith("_mean") and n != "end+padding" for p in pos)
    assert singles == list(range(8))
    assert "pad_mean" not in token_positions(7, 8) and "word_mean" not in token_positions(1, 8)
    with pytest.raises(ValueError):
        token_positions(8, 8)


def test_token_maps_average_the_named_positions():
    att = np.random.default_rng(0).random((2, 3, 6))
    maps = token_maps(att, end_index=3)
    np.testing.assert_allclose(maps["word_mean"], (att[..., 1] + att[..., 2]) / 2)
    np.testing.assert_allclose(maps["pad_mean"], (att[..., 4] + att[..., 5]) / 2)
    np.testing.assert_array_equal(maps["end"], att[..., 3])


def _brute_force(mask, grid):
    h, w = mask.shape
    ch, cw = h // grid[0], w // grid[1]
    best = 0.0
    cells = list(itertools.product(range(grid[0]), range(grid[1])))
    for r in range(1, len(cells) + 1):
        for subset in itertools.combinations(cells, r):
            sel = np.zeros_like(mask)
            for i, j in subset:
                sel[i * ch:(i + 1) * ch, j * cw:(j + 1) * cw] = True
            best = max(best, (sel & mask).sum() / (sel | mask).sum())
    return best


@pytest.mark.parametrize("box", [(0, 0, 4, 4), (1, 2, 6, 7), (3, 3, 5, 5), (0, 5, 8, 8)])
def test_grid_iou_bound_equals_brute_force(box):
    mask = np.zeros((8, 8), bool)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = True
    for grid in ((2, 2), (2, 4), (4, 2)):
        assert grid_iou_bound(mask, grid) == pytest.approx(_brute_force(mask, grid))


def test_grid_iou_bound_on_the_organism_grid():
    aligned = np.zeros((32, 32), bool)
    aligned[4:20, 4:20] = True
    assert grid_iou_bound(aligned, (8, 8)) == 1.0
    small = np.zeros((32, 32), bool)
    small[13:21, 23:31] = True  # an 8-pixel template two pixels off the 4-pixel grid
    assert grid_iou_bound(small, (8, 8)) < 0.75
