"""memlens.quantities against an independent numpy computation (tests/_magnitude_oracle.py), and the promise that it
is the only place in src/ that computes LD, resizes a mask to the latent or looks up the end token."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import _magnitude_oracle as oracle
from memlens import MemlensError, quantities as q

SRC = Path(__file__).resolve().parents[1] / "src" / "memlens"


def _rel(actual, expected, rtol=1e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.mark.parametrize("extra_channels", [0, 4])  # 4: a learned-variance model (out_channels = 2 x in_channels)
def test_guidance_difference_keeps_the_noise_channels_of_the_conditional_minus_unconditional(extra_channels):
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(6, 4 + extra_channels, 5, 7, generator=gen)
    diff = q.guidance_difference(eps, 4)
    assert diff.dtype == torch.float32 and diff.shape == (3, 4, 5, 7)
    _rel(diff, oracle.guidance_difference(eps.numpy(), 4))
    with pytest.raises(MemlensError, match="even number of rows"):
        q.guidance_difference(eps[:5], 4)


def test_guidance_difference_subtracts_in_the_model_dtype():
    eps = torch.randn(4, 4, 3, 3, dtype=torch.float16)
    expected = (eps[2:] - eps[:2]).float()
    assert torch.equal(q.guidance_difference(eps, 4), expected)


def test_d_and_ld_from_energy_maps_match_numpy_for_masks_at_any_resolution():
    rng = np.random.default_rng(1)
    steps, n, H, W = 5, 3, 12, 20
    energy = rng.random((steps, n, H, W)).astype(np.float32) * 4
    d = q.magnitude(torch.from_numpy(energy))
    assert d.shape == (steps, n)
    for mask_hw in [(H, W), (3, 5), (7, 6)]:  # latent size, a downsampled block, a non-integer factor
        masks = rng.random((n, *mask_hw)).astype(np.float32)
        ld = q.magnitude(torch.from_numpy(energy), q.mask_to_latent(torch.from_numpy(masks), (H, W)))
        for i in range(n):
            _rel(d[:, i], oracle.magnitude(energy[:, i]))
            _rel(ld[:, i], oracle.masked_magnitude(energy[:, i], masks[i]))


def test_difference_magnitude_is_d_and_ld_of_the_difference_and_differentiable():
    gen = torch.Generator().manual_seed(2)
    eps = torch.randn(4, 8, 6, 6, generator=gen)  # 2 images, 4 noise + 4 variance channels
    diff = q.guidance_difference(eps, 4)
    e = oracle.energy(oracle.guidance_difference(eps.numpy(), 4))
    _rel(q.difference_magnitude(diff), oracle.magnitude(e))
    mask = torch.rand(2, 3, 3, generator=gen)
    ld = q.difference_magnitude(diff, q.mask_to_latent(mask, (6, 6)))
    _rel(ld, [oracle.masked_magnitude(e[i : i + 1], mask[i].numpy())[0] for i in range(2)])
    # A constant mask of any level gives D.
    _rel(q.difference_magnitude(diff, torch.full((2, 6, 6), 0.3)), q.difference_magnitude(diff))
    x = diff.clone().requires_grad_(True)
    q.difference_magnitude(x, q.mask_to_latent(mask, (6, 6))).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_mask_to_latent_is_half_pixel_bilinear_and_leaves_latent_sized_maps_alone():
    rng = np.random.default_rng(3)
    maps = rng.random((2, 3, 5)).astype(np.float32)
    up = q.mask_to_latent(torch.from_numpy(maps), (12, 11))
    assert up.shape == (2, 12, 11)
    for i in range(2):
        _rel(up[i], oracle.bilinear(maps[i], 12, 11))
    same = torch.from_numpy(maps)
    assert q.mask_to_latent(same, (3, 5)) is same


def test_first_eos_matches_a_plain_search_and_takes_the_last_position_without_one():
    eos = 9
    ids = [[0, 4, 5, 9, 9, 9], [0, 9, 1, 1, 1, 1], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 9]]
    expected = oracle.first_eos(ids, eos)
    assert expected == [3, 1, 5, 5]
    got = q.first_eos(ids, eos)  # the tokenizer's lists
    assert got.dtype == torch.long and got.tolist() == expected
    assert q.first_eos(torch.tensor(ids), eos).tolist() == expected  # a batch of input ids


def _source_lines(pattern: str) -> dict[str, int]:
    hits = {}
    for path in sorted(SRC.rglob("*.py")):
        n = len(re.findall(pattern, path.read_text()))
        if n:
            hits[str(path.relative_to(SRC))] = n
    return hits


def test_one_implementation_each_in_src():
    # LD: the masked norm divided by the mask's mean
    assert _source_lines(r"/\s*\w+\.flatten\([^)]*\)\.mean\(") == {"quantities.py": 1}
    # resizing a map to the latent (maps.upsample is the numpy resize to image size for pictures and metrics)
    assert set(_source_lines(r"F\.interpolate\(")) == {"quantities.py", "maps.py"}
    assert _source_lines(r"F\.interpolate\(")["quantities.py"] == 1
    # the first-EOS lookup
    assert _source_lines(r"==\s*[\w.]*eos_token_id") == {"quantities.py": 1}
    assert "magnitude.py" not in {p.name for p in SRC.glob("*.py")}
