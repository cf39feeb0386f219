"""The token/block analysis behind docs/organism.md: attention capture and the named token maps."""

import json

import numpy as np
import pytest

from pathlib import Path

from memlens.cli import main
from memlens.testbed.analysis import FullAttention


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_full_attention_keeps_the_conditional_last_step(guidance):
    import torch

    from memlens.testbed import load_pipeline

    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    with FullAttention(pipe) as full:
        pipe(["antique gold coins", "red circle"], num_inference_steps=3, guidance_scale=guidance,
             generator=torch.Generator().manual_seed(0), output_type="np")
    maps = full.maps()
    n_tokens = pipe.tokenizer.model_max_length
    assert {"down_blocks.0", "down_blocks.1"} <= set(maps)
    side = pipe.unet.config.sample_size
    assert maps["down_blocks.0"].shape == (2, side, side, n_tokens)  # one map per prompt, not per CFG branch
    for arr in maps.values():  # softmax rows over the tokens
        np.testing.assert_allclose(arr.sum(-1), 1.0, atol=1e-5)
    # processors are restored on exit
    assert not any(type(p).__name__ == "CaptureProcessor" for p in pipe.unet.attn_processors.values())


def analyze(argv, capsys=None) -> int:
    """`memlens testbed analyze ...`; returns the exit status."""
    try:
        main(["testbed", "analyze", *[str(a) for a in argv]])
    except SystemExit as ex:
        return int(ex.code or 0)
    return 0


def test_cli_writes_json_and_grid(tmp_path, monkeypatch):
    import memlens.testbed.analysis as analysis

    calls = {}

    def fake_analyse(model_dir, per_prompt, steps, guidance, seed, grid):
        calls.update(model_dir=model_dir, per_prompt=per_prompt, steps=steps, guidance=guidance, seed=seed, grid=grid)
        return {"reproduce": {"global": 1.0}, "blocks": {}}

    monkeypatch.setattr(analysis, "analyse", fake_analyse)
    out = tmp_path / "an.json"
    assert analyze(["MODEL", out, "--per-prompt", "3", "--guidance", "1.5"]) == 0
    assert json.loads(out.read_text())["reproduce"] == {"global": 1.0}
    grid = str(tmp_path / "an.png")
    # Unset steps and guidance reach analyse as None, so it takes the pipeline's recommendation.
    assert calls == {"model_dir": Path("MODEL"), "per_prompt": 3, "steps": None, "guidance": 1.5, "seed": 0,
                     "grid": grid}
    assert analyze(["MODEL", out, "--steps", "7"]) == 0
    assert calls["steps"] == 7 and calls["guidance"] is None


def test_cli_without_arguments_prints_usage(capsys):
    assert analyze([]) == 2
    assert "Missing argument 'model_dir'" in capsys.readouterr().err


def test_x0_trajectory_ends_at_the_pipelines_image():
    import torch
    from diffusers import DDIMScheduler

    from memlens.testbed import load_pipeline
    from memlens.testbed.analysis import x0_trajectory

    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    # With alpha_bar = 1 after the last step, DDIM's last step returns its (clamped) x0 prediction exactly.
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True)
    ts, x0 = x0_trajectory(pipe, "antique gold coins", per_prompt=2, steps=4, seed=3)
    assert ts == [int(t) for t in pipe.scheduler.timesteps] and x0.shape == (4, 2, 32, 32, 3)
    out = pipe(["antique gold coins"], num_images_per_prompt=2, num_inference_steps=4,
               generator=torch.Generator().manual_seed(3), output_type="np").images
    img = out * 255
    assert np.abs(x0[-1] - img).max() <= 1  # rounding
    assert np.abs(x0[0] - img).mean() > 10  # while the first prediction is still far from it


def test_trajectory_cli_rejects_an_unknown_group(tmp_path, capsys):
    from memlens.testbed.pipeline import WEIGHTS_DIR

    assert analyze([WEIGHTS_DIR, tmp_path / "t.json", "--trajectory", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown group 'nope'" in err and err.count("\n") == 1
    assert not (tmp_path / "t.json").exists()


def test_cli_with_a_folder_that_is_no_model_names_it(tmp_path, capsys):
    out = tmp_path / "an.json"
    assert analyze([tmp_path / "nomodel", out]) == 2
    assert "nomodel: no model_index.json" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("bad", ["0", "-3", "ten"])
def test_cli_refuses_steps_below_one(bad, tmp_path, capsys):
    assert analyze(["MODEL", tmp_path / "an.json", "--steps", bad]) == 2
    assert "Invalid value for '--steps'" in capsys.readouterr().err
    assert not (tmp_path / "an.json").exists()


def test_analysis_module_has_no_second_cli():
    import memlens.testbed.analysis as analysis

    # One CLI framework: the analysis is `memlens testbed analyze`, not an argparse script of its own.
    assert not hasattr(analysis, "main") and "argparse" not in analysis.__dict__
