"""`memlens scan --screen`: the screen's first-step D is the full scan's D[0] for the same image, anisotropy is the
field's function on the first UNet inputs, and only flagged prompts are scanned."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

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


# --- seeds, resume, several processes -------------------------------------------------------------------------------

TINY_PROMPTS = ["a red cat on a mat", "a blue dog", "the green frog sings", "an old brass key", "two grey owls",
                "a yellow kite in wind"]
TINY = dict(steps=2, guidance=7.5, seed=3)


@pytest.fixture(scope="module")
def tiny():
    from memlens.testing import tiny_pipeline

    return tiny_pipeline("sd1")


def _first_step_d(out):
    return {r.prompt_index: float(np.asarray(r.D)[0]) for r in rundir.read_generations(out) if r.image_index == 0}


def _threshold_flagging_a_non_prefix(scores: dict[int, float]) -> float:
    """A threshold whose flagged set (the top k) is not prompts 0..k-1, so a flagged prompt's position in the full
    list differs from its position among the flagged: the case where seeds of "their own list" would go wrong."""
    order = sorted(scores, key=scores.get, reverse=True)
    for k in range(1, len(order)):
        if set(order[:k]) != set(range(k)):
            return (scores[order[k - 1]] + scores[order[k]]) / 2
    raise AssertionError("the scores fall in prompt order; pick other prompts")


def test_flagged_prompts_get_the_full_scans_seeds_and_records(tiny, tmp_path):
    from memlens.scan import run_scan
    from memlens.screen import run_screened_scan

    # batch_size = num_images: every batch is one prompt's images in both runs, so bit-equality is expected.
    run_scan(tiny, TINY_PROMPTS, tmp_path / "full", num_images=2, batch_size=2, progress=False, **TINY)
    cut = _threshold_flagging_a_non_prefix(_first_step_d(tmp_path / "full"))
    got = run_screened_scan(tiny, TINY_PROMPTS, tmp_path / "s", screen="D_first_step", screen_threshold=cut,
                            num_images=2, batch_size=2, progress=False, **TINY)
    flagged = {r["prompt_index"] for r in got.rows if r["flagged"]}
    assert flagged and flagged != set(range(len(flagged)))
    assert got.scan.status == "complete" and got.scan.num_records == 2 * len(flagged)
    full = [json.loads(x) for x in (tmp_path / "full" / "generations.jsonl").read_text().splitlines()]
    screened = [json.loads(x) for x in (tmp_path / "s" / "generations.jsonl").read_text().splitlines()]
    assert screened == [r for r in full if r["prompt_index"] in flagged]  # D and LD lists included, exactly
    for r in screened:
        for key in ("image", "be_map", "overlay"):
            assert (tmp_path / "s" / r[key]).read_bytes() == (tmp_path / "full" / r[key]).read_bytes(), r[key]
    # The screen row's seed is the seed of the prompt's first image in the full scan.
    first = {r["prompt_index"]: r["seed"] for r in full if r["image_index"] == 0}
    assert {r["prompt_index"]: r["seed"] for r in got.rows} == first


class _Killed(Exception):
    pass


def test_interrupted_screen_resumes_its_missing_batches_only(tiny, tmp_path, monkeypatch):
    from memlens import screen as screen_mod

    opts = dict(screen="D_first_step", screen_threshold=1e9, screen_batch_size=2, progress=False, **TINY)
    ref = screen_mod.run_screened_scan(tiny, TINY_PROMPTS, tmp_path / "ref", **opts)
    assert ref.scan is None and not (tmp_path / "ref" / "run.json").exists()  # nothing flagged: no scan

    real, calls, kill = screen_mod.screen_scores, [], [True]

    def dies_on_the_second_batch(pipe, prompts, seeds, **kw):
        calls.append(list(prompts))
        if kill[0] and len(calls) == 2:
            raise _Killed
        return real(pipe, prompts, seeds, **kw)

    monkeypatch.setattr(screen_mod, "screen_scores", dies_on_the_second_batch)
    with pytest.raises(_Killed):
        screen_mod.run_screened_scan(tiny, TINY_PROMPTS, tmp_path / "s", **opts)
    assert len(rundir.read_jsonl(tmp_path / "s" / SCREEN_FILE)) == 2
    with open(tmp_path / "s" / SCREEN_FILE, "a") as fh:
        fh.write('{"prompt_index": 2, "sco')  # a torn line, as a kill mid-append leaves
    calls.clear()
    kill[0] = False
    again = screen_mod.run_screened_scan(tiny, TINY_PROMPTS, tmp_path / "s", **opts)
    assert calls == [TINY_PROMPTS[2:4], TINY_PROMPTS[4:6]]  # the first batch was not screened again
    assert again.rows == ref.rows
    assert (tmp_path / "s" / SCREEN_FILE).read_bytes() == (tmp_path / "ref" / SCREEN_FILE).read_bytes()


def test_a_screen_of_other_settings_is_refused(tiny, tmp_path):
    from memlens.errors import InputError
    from memlens.scan import run_scan
    from memlens.screen import run_screened_scan

    opts = dict(screen="D_first_step", screen_batch_size=3, progress=False, **TINY)
    run_screened_scan(tiny, TINY_PROMPTS, tmp_path / "s", screen_threshold=1e9, **opts)
    before = (tmp_path / "s" / SCREEN_FILE).read_bytes()
    with pytest.raises(InputError, match="`screen_threshold` is 0.0 but the run was started with 1000000000.0"):
        run_screened_scan(tiny, TINY_PROMPTS, tmp_path / "s", screen_threshold=0.0, **opts)
    with pytest.raises(InputError, match="`prompts`: the prompts differ"):
        run_screened_scan(tiny, TINY_PROMPTS[:3], tmp_path / "s", screen_threshold=1e9, **opts)
    assert (tmp_path / "s" / SCREEN_FILE).read_bytes() == before
    (tmp_path / "s" / "screen.json").write_text("{not json")
    with pytest.raises(InputError, match="screen.json: malformed JSON"):
        run_screened_scan(tiny, TINY_PROMPTS, tmp_path / "s", screen_threshold=1e9, **opts)
    run_scan(tiny, TINY_PROMPTS, tmp_path / "plain", progress=False, **TINY)
    with pytest.raises(InputError, match="holds a scan without a screen"):
        run_screened_scan(tiny, TINY_PROMPTS, tmp_path / "plain", screen_threshold=1e9, **opts)
    assert not (tmp_path / "plain" / SCREEN_FILE).exists()


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="no accelerate CLI")
def test_two_processes_shard_and_resume_the_screen(tiny, tmp_path):
    """A screen left part done (rows in the main log, rows and a torn line in a shard) finished by two processes
    under `accelerate launch`: the merged screen and the scan of the flagged prompts equal one process's."""
    from memlens.screen import SCREEN_JSON, SCREEN_SHARDS, run_screened_scan

    model = tmp_path / "tiny-sd1"
    tiny.save_pretrained(model)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(TINY_PROMPTS) + "\n")
    run_scan_args = dict(num_images=2, batch_size=2, device="cpu", **TINY)
    scores = dict(enumerate(screen_scores(tiny, TINY_PROMPTS, [3 + 2 * p for p in range(6)], steps=2, guidance=7.5,
                                          height=32, width=32)))
    cut = float(_threshold_flagging_a_non_prefix(scores))
    ref = run_screened_scan(str(model), prompts, tmp_path / "ref", screen="D_first_step", screen_threshold=cut,
                            screen_batch_size=1, progress=False, **run_scan_args)
    assert 0 < ref.num_flagged < 6

    out = tmp_path / "s"
    out.mkdir()
    (out / SCREEN_JSON).write_bytes((tmp_path / "ref" / SCREEN_JSON).read_bytes())
    # Rows of the earlier run carry a marker: a resume keeps them rather than screening their prompts again.
    rows = [json.dumps({**r, "earlier": True}) + "\n" for r in ref.rows]
    (out / SCREEN_FILE).write_text(rows[0] + rows[1])
    (out / SCREEN_SHARDS).mkdir()
    (out / SCREEN_SHARDS / "rank-1.jsonl").write_text(rows[3] + rows[4][:30])

    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "-m", "memlens", "scan", "--model", str(model), "--prompts", str(prompts),
           "--out", str(out), "--num-images", "2", "--batch-size", "2", "--steps", "2", "--seed", "3",
           "--device", "cpu", "--screen", "D_first_step", "--screen-threshold", repr(cut),
           "--screen-batch-size", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("screen: ") == 1  # the main process alone reports
    merged = rundir.read_jsonl(out / SCREEN_FILE)
    assert [r["prompt_index"] for r in merged] == list(range(6)) and not (out / SCREEN_SHARDS).exists()
    assert [p for p, r in enumerate(merged) if r.get("earlier")] == [0, 1, 3]
    assert [r["flagged"] for r in merged] == [r["flagged"] for r in ref.rows]
    np.testing.assert_allclose([r["score"] for r in merged], [r["score"] for r in ref.rows], rtol=1e-5)
    a = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "ref" / "generations.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k not in ("D", "LD")} for r in a] == \
        [{k: v for k, v in r.items() if k not in ("D", "LD")} for r in b]
    for x, y in zip(a, b):
        np.testing.assert_allclose(x["D"], y["D"], rtol=1e-4)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["processes"] == 2
