"""`memlens scan --screen`: the screen's first-step D is the full scan's D[0] for the same image, anisotropy is the
field's function on the first UNet inputs, and only flagged prompts are scanned."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memlens import rundir
from memlens.screen import SCREEN_FILE, screen_scores

PROMPTS = ["antique gold coins", "tabby cat staring", "a red circle on blue", "a green square on yellow"]


@pytest.fixture(scope="module")
def pipe():
    from memlens.testbed.pipeline import load_pipeline

    return load_pipeline()


def test_first_step_d_equals_the_scans_d0(pipe, tmp_path):
    from memlens.scan import run_scan

    run_scan(pipe, PROMPTS, tmp_path / "full", steps=4, progress=False)
    recs = rundir.read_generations(tmp_path / "full")
    seeds = [r.seed for r in recs]
    got = screen_scores(pipe, PROMPTS, seeds, steps=4, guidance=pipe.config.default_guidance_scale, height=32,
                        width=32, batch_size=3)
    np.testing.assert_allclose(got, [float(np.asarray(r.D)[0]) for r in recs], rtol=1e-5)


def test_anisotropy_screen_equals_the_field_function(pipe):
    from memlens.field import detectors
    from memlens.mitigation import conditioning

    got = screen_scores(pipe, PROMPTS[:2], [0, 1], detector="anisotropy", steps=5, guidance=1.5, height=32, width=32)
    cond = conditioning.encode(pipe, PROMPTS[:2])
    noise = conditioning.draw_noise(pipe, [0, 1], 32, 32)
    first = conditioning.first_step(pipe, cond, noise, steps=5, guidance=1.5, height=32, width=32)
    x = first.args[0][2:] if first.args else first.kwargs["sample"][2:]
    pipe.scheduler.set_timesteps(5)
    t_norm, t_cos = detectors.anisotropy_timesteps(pipe.scheduler.timesteps)

    def model(x, t, c):
        return pipe.unet(x, t, encoder_hidden_states=c).sample

    want = detectors.anisotropy_score(model, x, t_norm, t_cos, cond.embeds, cond.negative)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4)


def test_only_flagged_prompts_are_scanned(cli, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    code, out, err = cli(["scan", "--model", "testbed", "--prompts", prompts, "--out", tmp_path / "s", "--steps", "3",
                          "--screen", "D_first_step", "--screen-threshold", "0"])
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "s" / SCREEN_FILE).read_text().splitlines()]
    assert len(rows) == 4 and all(r["flagged"] for r in rows)
    assert len(rundir.read_generations(tmp_path / "s")) == 4
    # A threshold between the scores scans exactly the prompts at or above it.
    scores = sorted(r["score"] for r in rows)
    cut = (scores[1] + scores[2]) / 2
    code, out, err = cli(["scan", "--model", "testbed", "--prompts", prompts, "--out", tmp_path / "t", "--steps", "3",
                          "--screen", "D_first_step", "--screen-threshold", str(cut)])
    assert code == 0, err
    kept = {r.prompt for r in rundir.read_generations(tmp_path / "t")}
    assert kept == {r["prompt"] for r in rows if r["score"] >= cut} and len(kept) == 2


@pytest.mark.parametrize("args, flag", [(["--screen", "nope", "--screen-threshold", "1"], "--screen"),
                                        (["--screen", "D_first_step"], "--screen-threshold"),
                                        (["--screen-threshold", "1"], "--screen")])
def test_bad_screen_options(cli, tmp_path, args, flag):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    code, _, err = cli(["scan", "--model", "testbed", "--prompts", prompts, "--out", tmp_path / "s", *args])
    assert code == 2 and len(err.strip().splitlines()) == 1 and flag in err, err
