"""Which token carries the bright-ending signal: names for every token position of a prompt, and the best IoU an
attention grid allows a template (small templates' IoU is bounded by the grid, not by the method).

Token names, for a prompt of n words padded to T tokens with the end token at position n + 1:
`bos` (position 0), `word_1` .. `word_n`, `word_mean`, `end` (the first EOS: the paper's token), `pad_1` ..
`pad_{T-n-2}` (the positions after it: the end token repeated in SD v1's layout, a pad token in SD v2's),
`pad_mean`, and `end+padding` (the end token and the padding together). Position-named entries pool the prompts that have that position.
"""

from __future__ import annotations

import numpy as np


def token_positions(end_index: int, num_tokens: int) -> dict[str, list[int]]:
    """Token name -> the positions whose attention is averaged for it (see the module docstring)."""
    if not 1 <= end_index < num_tokens:
        raise ValueError(f"end_index {end_index} outside 1..{num_tokens - 1}")
    names: dict[str, list[int]] = {"bos": [0]}
    words = list(range(1, end_index))
    for k, pos in enumerate(words, 1):
        names[f"word_{k}"] = [pos]
    if words:
        names["word_mean"] = words
    names["end"] = [end_index]
    pads = list(range(end_index + 1, num_tokens))
    for k, pos in enumerate(pads, 1):
        names[f"pad_{k}"] = [pos]
    if pads:
        names["pad_mean"] = pads
        names["end+padding"] = [end_index] + pads  # the probe's token="eos+padding"
    return names


def token_maps(attention: np.ndarray, end_index: int) -> dict[str, np.ndarray]:
    """Per token name, the (h, w) map: `attention` is one image's (h, w, T) attention over the prompt's tokens."""
    return {name: attention[..., pos].mean(-1) for name, pos in token_positions(end_index, attention.shape[-1]).items()}


def grid_iou_bound(mask: np.ndarray, grid: tuple[int, int]) -> float:
    """The highest IoU with `mask` that any union of attention-grid cells reaches.

    A map that is constant on each cell of an (gh, gw) grid, thresholded, selects a union of cells; taking the cells
    in order of how much of each the mask covers and keeping the best prefix finds the optimum (IoU of a prefix is
    maximised by adding cells in decreasing coverage). Bilinear upsampling softens cell edges, so this is the bound
    for the grid, not for an upsampled map.
    """
    mask = np.asarray(mask, bool)
    h, w = mask.shape
    gh, gw = grid
    if h % gh or w % gw:
        raise ValueError(f"mask {mask.shape} is not a whole number of {grid} cells")
    cells = mask.reshape(gh, h // gh, gw, w // gw).sum((1, 3)).ravel().astype(np.float64)
    cell_area = (h // gh) * (w // gw)
    total = mask.sum()
    if total == 0:
        return 0.0
    best, inter, union_cells = 0.0, 0.0, 0
    for covered in sorted(cells[cells > 0], reverse=True):
        inter += covered
        union_cells += 1
        best = max(best, inter / (union_cells * cell_area + total - inter))
    return float(best)
