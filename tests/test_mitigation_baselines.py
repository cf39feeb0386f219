"""RT / RNA / CWR / GNI baselines, and the `mitigate` command's output folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from memlens import InputError
from memlens.mitigation import Job, Settings, mitigate_batch
from memlens.mitigation.baselines import (augment_prompt, caption_word_repetition, gaussian_noise,
                                          random_number_insertion, random_token_insertion)
from memlens.mitigation.runner import run_mitigation
from memlens.testing import tiny_pipeline, tiny_tokenizer

PROMPT = "the great wave off kanagawa by hokusai"


@pytest.fixture(scope="module")
def sd1():
    return tiny_pipeline("sd1")


@pytest.mark.parametrize("method", ["rt", "rna", "cwr"])
def test_text_baselines_are_seeded_and_only_insert(method):
    tok = tiny_tokenizer()
    a = augment_prompt(method, PROMPT, 7, tok, count=4)
    assert a == augment_prompt(method, PROMPT, 7, tok, count=4)
    assert any(augment_prompt(method, PROMPT, s, tok, count=4) != a for s in range(8, 12))
    words, orig = a.split(), PROMPT.split()
    assert len(words) >= len(orig) + 1
    it = iter(words)
    assert all(w in it for w in orig)  # the original words survive, in order


def test_rna_numbers_and_cwr_words():
    words = random_number_insertion(PROMPT, 3, count=5).split()
    numbers = [w for w in words if w.isdigit()]
    assert len(numbers) == 5 and all(0 <= int(w) < 100000 for w in numbers)
    cwr = caption_word_repetition(PROMPT, 3, count=3).split()
    assert len(cwr) == len(PROMPT.split()) + 3 and set(cwr) == set(PROMPT.split())
    rt = random_token_insertion(PROMPT, tiny_tokenizer(), 3, count=2)
    assert "<|endoftext|>" not in rt and "<|startoftext|>" not in rt


def test_gni_is_seeded_per_row_and_scaled():
    e = torch.zeros(2, 77, 64)
    a = gaussian_noise(e, 0.5, [1, 2])
    assert torch.equal(a, gaussian_noise(e, 0.5, [1, 2]))
    assert torch.equal(a[0], gaussian_noise(e[:1], 0.5, [1])[0])  # a row's noise does not depend on its batch
    assert not torch.equal(a[0], a[1])
    assert float(a.std()) == pytest.approx(0.5, rel=0.05)
    assert torch.equal(gaussian_noise(e, 0.0, [1, 2]), e)


@pytest.mark.parametrize("method", ["rt", "gni"])
def test_baselines_generate_deterministically(sd1, method):
    jobs = [Job("a cat", 1), Job("a dog", 2)]
    s = Settings(method=method, steps=2, guidance=3.0, height=32, width=32, noise_lambda=0.3)
    a, b = mitigate_batch(sd1, jobs, s), mitigate_batch(sd1, jobs, s)
    for x, y in zip(a, b):
        assert x.triggered and x.used_prompt == y.used_prompt
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
    if method == "rt":
        assert a[0].used_prompt != "a cat" and a[0].record.prompt == a[0].used_prompt


def test_mitigate_writes_scan_layout_and_resumes(sd1, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a cat", "caption1": "a kitten", "label": 1}\n{"prompt": "hello"}\n')
    s = Settings(method="prss-be", steps=2, guidance=3.0, l_target_ss=0.0, l_target_pr=0.0, mag_thres_pr=1.0)
    out = run_mitigation(sd1, str(prompts), tmp_path / "out", s, num_images=2, batch_size=3, progress=False).path
    lines = [json.loads(l) for l in (out / "generations.jsonl").read_text().splitlines()]
    assert [(l["prompt_index"], l["image_index"], l["seed"]) for l in lines] == [(0, 0, 0), (0, 1, 1), (1, 0, 2), (1, 1, 3)]
    for l in lines:
        for key in ("image", "be_map", "overlay", "D", "LD", "eos_index", "method", "triggered", "initial_magnitude",
                    "final_magnitude", "iterations", "used_prompt", "unmitigated_image"):
            assert key in l, key
        for key in ("image", "be_map", "overlay", "unmitigated_image"):
            assert (out / l[key]).is_file()
    assert lines[0]["label"] == 1 and lines[0]["used_prompt"] in ("a cat", "a kitten")
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["settings"]["mitigation"]["method"] == "prss-be"
    before = (out / "generations.jsonl").read_bytes()
    run_mitigation(sd1, str(prompts), tmp_path / "out", s, num_images=2, batch_size=3, progress=False)
    assert (out / "generations.jsonl").read_bytes() == before  # nothing left to do
    with pytest.raises(InputError, match="`settings` \\(method and options\\)"):
        run_mitigation(sd1, str(prompts), tmp_path / "out", Settings(method="pe", steps=2, guidance=3.0),
                       num_images=2, progress=False)


def test_mitigate_takes_steps_and_guidance_from_the_pipeline(recommending_pipe, tmp_path):
    pipe = recommending_pipe
    res = run_mitigation(pipe, ["a cat"], tmp_path / "out", Settings(method="none"), progress=False)
    run = json.loads((res.path / "run.json").read_text())
    assert (run["settings"]["steps"], run["settings"]["guidance"]) == (2, 3.0)
    line = json.loads((res.path / "generations.jsonl").read_text())
    assert len(line["D"]) == 2


@pytest.mark.parametrize("target", [0.0, -1.0])
def test_target_must_be_positive(target, tmp_path, capsys):
    from memlens.cli import main

    with pytest.raises(InputError, match="`target` must be > 0"):
        Settings(method="pe", target=target).validate()
    with pytest.raises(SystemExit) as ex:  # refused before any model loads: the model does not even exist
        main(["mitigate", "--model", str(tmp_path / "none"), "--prompts", "p.txt", "--out", str(tmp_path / "o"),
              "--method", "pe", "--target", str(target)])
    err = capsys.readouterr().err
    assert ex.value.code == 2 and "--target must be > 0" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_mitigate_takes_the_lock_before_reading_or_writing(sd1, tmp_path):
    from memlens import rundir

    out = tmp_path / "out"
    out.mkdir()
    with rundir.Log(out / rundir.GENERATIONS):  # a mitigation still running in another process
        with pytest.raises(InputError, match="another mitigate is writing to this folder"):
            run_mitigation(sd1, ["a cat"], out, Settings(method="none", steps=2, guidance=3.0), progress=False)
    assert not (out / rundir.RUN_JSON).exists()  # it wrote nothing before the lock refused it
