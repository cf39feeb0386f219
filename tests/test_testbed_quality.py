"""Generic-quality measures used to compare trained organisms (memlens.testbed.evaluation)."""

import numpy as np
import torch

from memlens.testbed.data import COLOURS, generic_scene
from memlens.testbed.evaluation import (background_accuracy, border_colour, caption_background,
                                        heldout_generic_loss, palette_distance)


def test_caption_background_parses_the_generator_grammar():
    assert caption_background("small red circle at left on blue") == "blue"
    assert caption_background("a green ring on white background") == "white"
    assert caption_background("big red square at the top") is None
    assert caption_background("espresso cup seen from above") is None


def test_border_colour_snaps_to_palette_and_takes_the_majority():
    img = np.zeros((32, 32, 3), np.uint8)
    img[:] = np.array(COLOURS["purple"]) + 10  # near, not equal, to the palette colour
    img[0, :10] = COLOURS["yellow"]  # a shape touching the border: a minority of the ring
    assert border_colour(img) == "purple"


def test_background_accuracy_is_one_on_training_scenes_and_low_on_noise():
    rng = np.random.default_rng(3)
    scenes = [generic_scene(rng) for _ in range(60)]
    caps = [c for _, c in scenes]
    acc = background_accuracy([i for i, _ in scenes], caps)
    named = sum(caption_background(c) is not None for c in caps)
    assert acc == {"accuracy": 1.0, "n": named} and named > 30
    flipped = [np.full((32, 32, 3), COLOURS["black" if caption_background(c) != "black" else "white"], np.uint8)
               for c in caps]
    assert background_accuracy(flipped, caps)["accuracy"] == 0.0


def test_heldout_loss_is_deterministic_and_tracks_the_model():
    from memlens.testbed.pipeline import build_pipeline, build_tokenizer

    tok = build_tokenizer(["a red circle on blue"], max_length=16)
    torch.manual_seed(0)
    pipe = build_pipeline(tok, text_width=32, text_layers=1, unet_channels=(8, 16, 16), unet_heads=1)
    a = heldout_generic_loss(pipe, n=8)
    assert a == heldout_generic_loss(pipe, n=8) and np.isfinite(a)
    with torch.no_grad():  # a UNet that predicts zero noise has loss E[noise^2] = 1 on the same fixed inputs
        pipe.unet.conv_out.weight.zero_()
        pipe.unet.conv_out.bias.zero_()
    assert abs(heldout_generic_loss(pipe, n=8) - 1.0) < 0.05


def test_palette_distance_is_zero_on_scenes_and_exact_on_an_offset():
    rng = np.random.default_rng(4)
    scenes = [generic_scene(rng)[0] for _ in range(5)]
    assert palette_distance(scenes) == 0.0
    grey = np.full((4, 4, 3), 20, np.uint8)
    grey[..., 0] = 23  # black is (20, 20, 20): every pixel is exactly 3 away
    assert abs(palette_distance([grey]) - 3.0) < 1e-6
