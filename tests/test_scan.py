"""`memlens scan`: records and files, seeds independent of batching, resume after SIGKILL, refusal of changed
settings, one-line CLI errors, and two processes under `accelerate launch` merging into one ordered log."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from memlens.errors import InputError, MemlensError
from memlens.scan import image_seed, run_scan
from memlens.testing import tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
FAST = dict(steps=2, guidance=7.5, seed=3)


def read(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "generations.jsonl").read_text(encoding="utf-8").splitlines()]


def run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text(encoding="utf-8"))


def assert_same_records(a: list[dict], b: list[dict], rtol: float = 0.0) -> None:
    """Same images in the same order with the same metadata; D/LD equal (to `rtol` when batching differs)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in ("D", "LD")} == {k: v for k, v in y.items() if k not in ("D", "LD")}
        for k in ("D", "LD"):
            np.testing.assert_allclose(x[k], y[k], rtol=rtol, atol=1e-6 if rtol else 0)


def pixels(out: Path, rec: dict) -> np.ndarray:
    return np.asarray(Image.open(out / rec["image"]), dtype=np.int16)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd1")


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    rows = [
        {"caption": "a red cat on a mat", "label": 1, "type": "VM", "index": 101},
        {"caption": "a blue dog", "label": 0},
        {"caption": "the green frog sings", "label": 1, "type": "TM", "index": 103},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(pipe, prompt_file, tmp_path_factory) -> Path:
    """One uninterrupted scan: 3 prompts x 2 images, batch 4 (so prompt 1's images straddle two batches)."""
    out = tmp_path_factory.mktemp("ref") / "scan"
    run_scan(pipe, prompt_file, out, num_images=2, batch_size=4, progress=False, **FAST)
    return out


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-sd1")
    tiny_pipeline("sd1").save_pretrained(folder)
    return folder


# --- what a scan writes ---------------------------------------------------------------------------------------------


def test_records_files_and_run_json(reference, pipe):
    recs = read(reference)
    assert [(r["prompt_index"], r["image_index"]) for r in recs] == [(p, i) for p in range(3) for i in range(2)]
    assert [r["seed"] for r in recs] == [image_seed(3, p, i, 2) for p in range(3) for i in range(2)]
    first = recs[0]
    assert (first["prompt"], first["label"], first["type"], first["index"]) == ("a red cat on a mat", 1, "VM", 101)
    assert "type" not in recs[2] and "index" not in recs[2] and recs[2]["label"] == 0
    for r in recs:
        assert len(r["D"]) == len(r["LD"]) == FAST["steps"] and isinstance(r["eos_index"], int)
        assert Image.open(reference / r["image"]).size == (32, 32)  # the pipeline's native size, not a constant
        assert Image.open(reference / r["overlay"]).size == (32, 32)
        be = np.load(reference / r["be_map"])
        assert be.dtype == np.float32 and be.ndim == 2
    run = run_json(reference)
    assert run["status"] == "complete" and run["num_records"] == 6
    assert run["settings"]["steps"] == 2 and run["settings"]["height"] == 32
    assert {"memlens", "torch", "diffusers", "transformers"} <= set(run["versions"])
    assert run["pipeline"]["class"] == "StableDiffusionPipeline" and run["pipeline"]["family"] == "sd1"


def test_image_matches_a_plain_pipeline_call_with_its_seed(reference, pipe):
    import torch

    rec = read(reference)[3]
    plain = pipe(
        rec["prompt"], num_inference_steps=FAST["steps"], guidance_scale=FAST["guidance"],
        generator=torch.Generator("cpu").manual_seed(rec["seed"]),
    ).images[0]
    assert np.abs(np.asarray(plain, dtype=np.int16) - pixels(reference, rec)).max() <= 1


def test_batch_size_does_not_change_results(reference, pipe, prompt_file, tmp_path):
    one = run_scan(pipe, prompt_file, tmp_path / "b1", num_images=2, batch_size=1, progress=False, **FAST).path
    a, b = read(reference), read(one)
    # Batched float32 kernels round differently from single ones, hence a tolerance instead of equality.
    assert_same_records(a, b, rtol=1e-4)
    for x, y in zip(a, b):
        assert np.abs(pixels(reference, x) - pixels(one, y)).max() <= 1
        np.testing.assert_allclose(np.load(reference / x["be_map"]), np.load(one / y["be_map"]), rtol=1e-3, atol=1e-6)


# --- resume and refusal ---------------------------------------------------------------------------------------------


class CountingProbe:
    """Wraps the real probe and counts the pipeline calls a scan makes."""

    calls = 0

    def __init__(self, pipe, **options):
        from memlens.probe import BrightEndingProbe

        self.inner = BrightEndingProbe(pipe, **options)

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        self.inner.__exit__(*exc)

    def clear(self):
        CountingProbe.calls += 1
        self.inner.clear()

    @property
    def records(self):
        return self.inner.records


def test_torn_tail_dropped_and_rest_resumed(reference, pipe, prompt_file, tmp_path):
    out = tmp_path / "scan"
    shutil.copytree(reference, out)
    lines = (out / "generations.jsonl").read_bytes().splitlines(keepends=True)
    # Two complete records, then the first half of a third: what a kill inside the write leaves behind.
    (out / "generations.jsonl").write_bytes(b"".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    run = run_json(out)
    run["status"] = "running"
    (out / "run.json").write_text(json.dumps(run))

    CountingProbe.calls = 0
    res = run_scan(pipe, prompt_file, out, num_images=2, batch_size=4, progress=False, probe_factory=CountingProbe,
                   **FAST)
    # The documented batch boundaries are kept: batch 0 (2 of its 4 images done) is generated whole again and
    # batch 1 once, so every image comes from the same batch as in the uninterrupted run: bit-identical records.
    assert CountingProbe.calls == 2 and res.resumed_from == 2
    assert_same_records(read(out), read(reference), rtol=0.0)
    for x, y in zip(read(out), read(reference)):
        assert np.array_equal(pixels(out, x), pixels(reference, y))
    assert run_json(out)["status"] == "complete" and run_json(out)["runs"] == 2

    CountingProbe.calls = 0  # a complete scan reruns as a no-op that touches nothing
    before = {p: p.read_bytes() for p in (out / "run.json", out / "generations.jsonl")}
    run_scan(pipe, prompt_file, out, num_images=2, batch_size=4, progress=False, probe_factory=CountingProbe, **FAST)
    assert CountingProbe.calls == 0 and all(p.read_bytes() == b for p, b in before.items())


@pytest.mark.parametrize(
    "change, option",
    [({"steps": 3}, "`steps`"), ({"seed": 4}, "`seed`"), ({"num_images": 1}, "`num_images`"), ({"guidance": 5.0}, "`guidance`"), ({"height": 64}, "`height`")],
)
def test_other_settings_refused_with_the_setting_named(reference, pipe, prompt_file, change, option):
    before = (reference / "generations.jsonl").read_bytes()
    kwargs = {**FAST, "num_images": 2, **change}
    with pytest.raises(InputError) as info:
        run_scan(pipe, prompt_file, reference, batch_size=4, progress=False, **kwargs)
    assert option in str(info.value) and "\n" not in str(info.value)
    assert (reference / "generations.jsonl").read_bytes() == before


def test_changed_prompts_refused(reference, pipe, tmp_path):
    other = tmp_path / "p.txt"
    other.write_text("a red cat on a mat\na blue dog\nsomething else\n")
    with pytest.raises(InputError, match="`prompts`"):
        run_scan(pipe, other, reference, num_images=2, progress=False, **FAST)


def test_batch_size_may_change_on_resume(reference, pipe, prompt_file):
    run_scan(pipe, prompt_file, reference, num_images=2, batch_size=1, progress=False, **FAST)
    assert len(read(reference)) == 6


def test_sigkill_mid_run_then_resume_equals_uninterrupted(model_folder, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt number {i} with a {['cat', 'dog', 'tree'][i % 3]}\n" for i in range(24)))
    out = tmp_path / "killed"
    settings = dict(num_images=1, batch_size=1, device="cpu", progress=False, **FAST)
    # `python -m memlens scan`, killed with SIGKILL once a few batches are on disk.
    cmd = [
        sys.executable, "-m", "memlens", "scan", "--model", model_folder, "--prompts", prompts, "--out", out,
        "--batch-size", 1, "--steps", FAST["steps"], "--guidance", FAST["guidance"], "--seed", FAST["seed"],
        "--device", "cpu",
    ]
    proc = subprocess.Popen([str(c) for c in cmd], env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path,
                            stderr=subprocess.DEVNULL)
    log = out / "generations.jsonl"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if log.exists() and log.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the scan finished (or failed) before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    partial = log.read_bytes().count(b"\n")
    assert 3 <= partial < 24
    assert run_json(out)["status"] == "running"  # nothing claims completeness

    run_scan(str(model_folder), prompts, out, **settings)
    whole = run_scan(str(model_folder), prompts, tmp_path / "whole", **settings).path
    resumed = read(out)
    assert len({(r["prompt_index"], r["image_index"]) for r in resumed}) == len(resumed) == 24
    assert_same_records(resumed, read(whole), rtol=1e-5)
    assert run_json(out)["status"] == "complete"


# --- the command line -----------------------------------------------------------------------------------------------


def cli(argv: list[str]) -> int:
    from memlens.cli import main

    try:
        main([str(a) for a in argv])
    except SystemExit as ex:
        return int(ex.code or 0)
    return 0


def test_cli_scan_writes_a_complete_scan(model_folder, prompt_file, tmp_path, capsys):
    out = tmp_path / "scan"
    args = ["scan", "--model", model_folder, "--prompts", prompt_file, "--out", out, "--steps", 2, "--batch-size", 2]
    assert cli(args) == 0
    assert len(read(out)) == 3 and run_json(out)["status"] == "complete"
    assert run_json(out)["settings"]["model"] == str(model_folder.resolve())
    assert cli(args) == 0  # resume of a complete scan: nothing to do, still fine


@pytest.mark.parametrize(
    "prompt_text, model, expected",
    [
        ('{"caption": "ok"}\n', "missing-folder/", "no such folder"),
        ('{"caption": "ok"}\n{"caption": "unterminated\n', None, "p.jsonl line 2: malformed JSON"),
        ('{"caption": "ok"}\n{"caption": ""}\n', None, "p.jsonl line 2: field 'caption' is an empty prompt"),
        ('{"title": "x"}\n', None, "p.jsonl line 1: no prompt column"),
    ],
)
def test_cli_errors_are_one_line_and_write_nothing(model_folder, tmp_path, capsys, prompt_text, model, expected):
    (tmp_path / "p.jsonl").write_text(prompt_text)
    model_arg = tmp_path / model if model else model_folder
    out = tmp_path / "scan"
    assert cli(["scan", "--model", model_arg, "--prompts", tmp_path / "p.jsonl", "--out", out, "--steps", 2]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memlens: error:") and expected in err
    assert "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_cli_refuses_a_different_scan_in_the_same_folder(reference, model_folder, capsys):
    args = ["scan", "--model", model_folder, "--prompts", "x.txt", "--out", reference, "--steps", 9]
    Path(reference.parent / "x.txt").write_text("a\n")
    assert cli([*args[:4], reference.parent / "x.txt", *args[5:]]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds a different run: --model is" in err and "\n" not in err


def test_public_set_name_as_prompts(monkeypatch):
    from memlens.scan import resolve_prompts

    data = REPO.parent / "shared" / "data"
    if not data.is_dir():
        pytest.skip(f"{data} not present")
    monkeypatch.chdir(REPO)  # public sets resolve from ../shared/data unless MEMLENS_DATA says otherwise
    recs = resolve_prompts("sd2-memorized")
    assert len(recs) == 219 and recs[0].label == 1 and recs[0].type == "MV"


# --- several processes ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(), reason="no accelerate CLI")
def test_two_processes_resume_shards_and_merge_in_order(model_folder, prompt_file, tmp_path):
    ref = tmp_path / "ref"
    run_scan(str(model_folder), prompt_file, ref, num_images=3, batch_size=2, progress=False, device="cpu", **FAST)
    whole = read(ref)

    # A scan left half done by an earlier two-process run: some records in the main log, one in a shard, and a torn
    # line at the end of that shard.
    out = tmp_path / "scan"
    shutil.copytree(ref, out)
    (out / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in whole[:3]))
    (out / "shards").mkdir()
    (out / "shards" / "rank-1.jsonl").write_text(json.dumps(whole[5]) + "\n" + json.dumps(whole[6])[:40])
    run = run_json(out)
    run["status"] = "running"
    (out / "run.json").write_text(json.dumps(run))
    for r in whole[3:5] + whole[6:]:
        (out / r["image"]).unlink()

    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    # On a CPU-only machine accelerate's `--cpu` flag picks its single-process launcher; `--multi_gpu` is the one
    # that starts N torchrun workers, and memlens gives them a CPU process group.
    cmd = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "-m", "memlens", "scan", "--model", str(model_folder), "--prompts", str(prompt_file),
        "--out", str(out), "--num-images", "3", "--batch-size", "2", "--steps", "2", "--seed", "3", "--device", "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    merged = read(out)
    assert_same_records(merged, whole, rtol=1e-4)
    assert all((out / r["image"]).exists() for r in merged)
    assert not (out / "shards").exists()
    run = run_json(out)
    assert run["status"] == "complete" and run["processes"] == 2


def test_second_scan_into_a_busy_folder_is_refused(reference, pipe, prompt_file):
    from memlens.rundir import Log

    with Log(reference / "generations.jsonl"):  # stands for a scan still running in another process
        with pytest.raises(InputError, match="another scan is writing to this folder"):
            run_scan(pipe, prompt_file, reference, num_images=2, progress=False, **FAST)


def test_guidance_without_cfg_refused_before_writing(pipe, prompt_file, tmp_path):
    with pytest.raises(InputError, match="`guidance` must be above 1"):
        run_scan(pipe, prompt_file, tmp_path / "scan", guidance=1.0, steps=2, progress=False)
    assert not (tmp_path / "scan").exists()


def test_pipeline_refusal_is_an_input_error(pipe, prompt_file, tmp_path):
    with pytest.raises(InputError, match="the pipeline refused these settings: .*divisible"):
        run_scan(pipe, prompt_file, tmp_path / "scan", height=36, width=36, progress=False, **FAST)
    assert run_json(tmp_path / "scan")["status"] == "running"  # never "complete"


def test_steps_and_guidance_default_to_what_the_pipeline_recommends(recommending_pipe, prompt_file, tmp_path):
    pipe = recommending_pipe
    out = run_scan(pipe, prompt_file, tmp_path / "scan", progress=False).path
    settings = run_json(out)["settings"]
    assert (settings["steps"], settings["guidance"]) == (2, 3.0)
    assert all(len(r["D"]) == 2 for r in read(out))


# --- what a newcomer hit --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["parent is a file", "unrelated files", "a demo run", "not writable"])
def test_output_folder_checked_before_the_model_loads(case, model_folder, prompt_file, tmp_path, monkeypatch,
                                                      capsys):
    import memlens.models
    from memlens import rundir

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(memlens.models, "load_pipeline", no_loading)
    (tmp_path / "one.txt").write_text("x")
    out, expected = {
        "parent is a file": (tmp_path / "one.txt" / "sub", "one.txt is a file, not a folder"),
        "unrelated files": (tmp_path, "is not empty and holds no memlens run (one.txt)"),
        "a demo run": (tmp_path / "demo", "holds a demo run, not a scan"),
        "not writable": (tmp_path / "new", "is not writable"),
    }[case]
    if case == "a demo run":
        out.mkdir()
        (out / "run.json").write_text(json.dumps({"kind": "demo", "settings": {}}))
    if case == "not writable":  # root ignores permission bits, so the check's view of them stands in
        monkeypatch.setattr(rundir.os, "access", lambda path, mode: False)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert cli(["scan", "--model", model_folder, "--prompts", prompt_file, "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memlens: error: --out ") and expected in err and err.count("\n") == 1
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_long_prompts_warned_once_with_their_count(pipe, tmp_path, caplog):
    long = " ".join(["word"] * 120)
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"short one\n{long}\n{long} again\n")
    with caplog.at_level("WARNING", logger="memlens"):
        run_scan(pipe, prompts, tmp_path / "scan", num_images=2, batch_size=1, progress=False, **FAST)
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("memlens")]
    assert len(warnings) == 1 and warnings[0].startswith("2 of 3 prompts are longer than the model's 77-token context")


def test_progress_counts_what_a_resume_found_done(reference, pipe, prompt_file, tmp_path, capsys):
    out = tmp_path / "scan"
    shutil.copytree(reference, out)
    lines = (out / "generations.jsonl").read_bytes().splitlines(keepends=True)
    (out / "generations.jsonl").write_bytes(b"".join(lines[:4]))
    run_scan(pipe, prompt_file, out, num_images=2, batch_size=4, progress=True, **FAST)
    err = capsys.readouterr().err
    assert "resuming: 4 of 6 images already recorded" in err
    assert "6/6" in err and "2/2" not in err  # the bar counts the whole scan, starting at what was done


def test_threads_default_to_one_on_cpu_and_follow_the_option(model_folder, prompt_file, tmp_path, monkeypatch):
    import torch

    import memlens.scan
    from memlens.scan import ScanResult

    seen = []

    def fake_scan(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return ScanResult(tmp_path, "complete", 0, 0, 0)

    monkeypatch.setattr(memlens.scan, "run_scan", fake_scan)
    try:
        torch.set_num_threads(2)
        assert cli(["scan", "--model", model_folder, "--prompts", prompt_file, "--out", tmp_path / "a",
                    "--device", "cpu"]) == 0
        assert cli(["scan", "--model", model_folder, "--prompts", prompt_file, "--out", tmp_path / "b",
                    "--device", "cpu", "--threads", "2"]) == 0
    finally:
        torch.set_num_threads(1)
    assert seen == [1, 2]


@pytest.mark.parametrize("indices, words", [([5], "5 is not a position in the 3 prompts"), ([], "is empty"),
                                            ([0, 0], "listed twice")])
def test_bad_prompt_indices_refused_before_writing(pipe, prompt_file, tmp_path, indices, words):
    with pytest.raises(InputError, match=words):
        run_scan(pipe, prompt_file, tmp_path / "s", prompt_indices=indices, progress=False, **FAST)
    assert not (tmp_path / "s").exists()


def test_layers_and_token_flags_become_probe_options():
    from memlens.cli import probe_options

    assert probe_options(None, "eos") == {}  # the defaults add nothing, so older runs resume unchanged
    assert probe_options("all", "eos+padding") == {"layers": "all", "token": "eos+padding"}
    assert probe_options("down_blocks.0, up_blocks.2", "3") == {"layers": ["down_blocks.0", "up_blocks.2"],
                                                                "token": 3}
    with pytest.raises(MemlensError, match="--token 'end'"):
        probe_options(None, "end")
    with pytest.raises(MemlensError, match="--layers"):
        probe_options(" , ", "eos")
