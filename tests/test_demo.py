"""`memlens demo`: a normal scan directory plus ground truth; `memlens evaluate` and `memlens report` on it give the
numbers in summary.json by construction; the shipped organism's seed-0 numbers are pinned (tests/golden/)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from memlens import rundir

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "demo_seed0.json"
PINNED = ("memorization_rate", "novelty", "localization", "localization_by_token", "localization_by_size",
          "detection")


def test_demo_is_a_scan_with_ground_truth_files(demo_dir):
    run = json.loads((demo_dir / "run.json").read_text())
    assert run["kind"] == "demo" and run["status"] == "complete"
    recs = rundir.read_generations(demo_dir, required=("image", "be_map", "overlay", "D", "LD", "token_maps"))
    from memlens.testbed.items import load_ground_truth
    from memlens.testbed.pipeline import WEIGHTS_DIR

    n_items = len(load_ground_truth(WEIGHTS_DIR).items)
    assert len(recs) == n_items * 8 + 64 * 2 == run["num_records"]  # the defaults: 8 per item, 64 generic x 2
    # The scan's seeds: image i of the whole list gets seed + i.
    assert [r.seed for r in recs] == list(range(len(recs)))
    assert {r.type for r in recs} == {"global", "local", "generic"}
    assert all((r.label == 1) == (r.type != "generic") for r in recs)
    for r in recs[:3]:
        for field in ("image", "be_map", "overlay", "token_maps"):
            assert r.path(field).is_file()
    copies = [json.loads(line) for line in (demo_dir / "ground_truth" / "copies.jsonl").read_text().splitlines()]
    assert [(c["prompt_index"], c["image_index"]) for c in copies] == [r.key for r in recs]
    # One mask per local generation that copies its own item, and only those.
    local_copies = {c["stem"] for c in copies if c["kind"] == "local" and c["reproduces_own"]}
    assert {p.stem for p in (demo_dir / "masks").glob("*.png")} == local_copies
    items = json.loads((demo_dir / "ground_truth" / "items.json").read_text())
    assert len(items) == 8
    for it in items:
        ref = np.asarray(Image.open(demo_dir / "ground_truth" / it["reference"]))
        assert ref.shape == (32, 32, 3)
    # A mask file is the item's box: True inside, False outside.
    some = sorted(local_copies)[0]
    rec = next(r for r in recs if r.stem == some)
    box = next(it["box"] for it in items if it["group"] == rec.index)
    mask = np.asarray(Image.open(demo_dir / "masks" / f"{some}.png")) >= 128
    expect = np.zeros((32, 32), bool)
    expect[box[1] : box[3], box[0] : box[2]] = True
    assert np.array_equal(mask, expect)


def test_evaluate_commands_print_the_summary_numbers(demo_dir, cli):
    summary = json.loads((demo_dir / "summary.json").read_text())
    code, out, err = cli(["evaluate", "localization", "--scan", demo_dir, "--masks", demo_dir / "masks"])
    assert code == 0, err
    loc = json.loads(out)
    assert summary["localization"] == {"pixel_auroc": loc["pixel_auroc_pooled_minmax"], "iou": loc["iou_otsu_mean"],
                                       "n": loc["n_evaluated"]}
    code, out, err = cli(["evaluate", "detection", "--scan", demo_dir])
    assert code == 0, err
    det = json.loads(out)
    for kind in ("global", "local"):
        for signal in ("D", "LD"):
            row = next(r for r in det["results"] if (r["signal"], r["T"], r["level"], r["subset"])
                       == (signal, "all", "generation", f"type={kind}"))
            assert summary["detection"][kind][signal] == {"auc": row["auc"], "tpr_at_1pct_fpr": row["tpr_at_1pct_fpr_wen"]}
            # ... and those are the metrics layer's numbers on the records' own mean D / LD.
            from memlens.metrics import separation

            recs = rundir.read_generations(demo_dir)
            pos = [np.float32(np.mean(r.get(signal))) for r in recs if r.type == kind]
            neg = [np.float32(np.mean(r.get(signal))) for r in recs if r.type == "generic"]
            assert separation(pos, neg)["auc"] == pytest.approx(row["auc"], abs=1e-12)


def test_end_token_map_of_the_second_reader_is_the_probes(demo_dir):
    s = json.loads((demo_dir / "summary.json").read_text())
    end, probe = s["localization_by_token"]["end"], s["localization"]
    assert end["n"] == probe["n"] > 0
    assert end["pixel_auroc"] == pytest.approx(probe["pixel_auroc"], abs=1e-3)
    recs = rundir.read_generations(demo_dir)
    with np.load(recs[0].path("token_maps")) as npz:
        np.testing.assert_allclose(npz["end"], np.load(recs[0].path("be_map")), rtol=1e-4, atol=1e-7)


def test_report_reads_the_demo_with_one_colour_scale(demo_dir):
    page = (demo_dir / "report.html").read_text()
    assert "generations.jsonl: not found" not in page
    assert "share one colour scale on this page" in page
    vmax = float(re.search(r"red = ([0-9.e+-]+), the largest", page).group(1))
    top = max(float(np.load(r.path("be_map")).max()) for r in rundir.read_generations(demo_dir))
    assert vmax == pytest.approx(top, rel=1e-3)
    assert page.count('alt="BE overlay"') == len(rundir.read_generations(demo_dir))


def test_golden_numbers_at_seed_0(demo_dir):
    """The shipped organism's demo at seed 0, pinned. After retraining the organism: rerun with
    MEMLENS_UPDATE_GOLDEN=1 and copy the new numbers into README.md's table (the next test checks it)."""
    summary = json.loads((demo_dir / "summary.json").read_text())
    got = {k: summary[k] for k in PINNED}
    if os.environ.get("MEMLENS_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"wrote {GOLDEN}")
    want = json.loads(GOLDEN.read_text())

    def compare(a, b, path=""):
        if isinstance(b, dict):
            assert set(a) == set(b), path
            for k in b:
                compare(a[k], b[k], f"{path}.{k}")
        elif b is None or isinstance(b, int):
            assert a == b, path
        else:
            # Half a unit of the README's second decimal: any drift the README would show fails, while float
            # rounding of another CPU's kernels (around 1e-6 here) does not.
            assert a == pytest.approx(b, abs=5e-3), path

    compare(got, want)


def test_readme_table_is_the_golden_numbers():
    want = json.loads(GOLDEN.read_text())
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## What the shipped organism shows"):]
    cells = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table.splitlines()
             if line.startswith("| ") and line.count("|") >= 3}

    def f(x):
        return f"{x:.2f}"

    mem = next(v for k, v in cells.items() if k.startswith("memorization rate"))
    assert mem == f"{f(want['memorization_rate']['global'])} / {f(want['memorization_rate']['local'])}"
    nov = next(v for k, v in cells.items() if k.startswith("novelty"))
    assert nov == f(want["novelty"]["generic"])
    loc = next(v for k, v in cells.items() if k.startswith("localization, end-token"))
    assert loc == f"{f(want['localization']['pixel_auroc'])} / {f(want['localization']['iou'])}"
    pad = next(v for k, v in cells.items() if k.startswith("localization, the padding"))
    p = want["localization_by_token"]["pad_mean"]
    assert pad == f"{f(p['pixel_auroc'])} / {f(p['iou'])}"
    det = next(v for k, v in cells.items() if k.startswith("detection"))
    d = want["detection"]
    parts = [f"{f(d[k][m]['auc'])} ({f(d[k][m]['tpr_at_1pct_fpr'])})" for k in ("global", "local") for m in ("D", "LD")]
    assert det == "global D " + parts[0] + ", LD " + parts[1] + "; local D " + parts[2] + ", LD " + parts[3]


def test_demo_with_a_missing_model_names_it_and_writes_nothing(tmp_path, cli):
    code, _, err = cli(["demo", "--model", tmp_path / "nomodel", "--out", tmp_path / "out"])
    assert code == 2 and "nomodel: no model_index.json" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_demo_refuses_an_organism_without_ground_truth(tmp_path, cli):
    from memlens.testbed.pipeline import WEIGHTS_DIR

    org = tmp_path / "org"
    shutil.copytree(WEIGHTS_DIR, org, ignore=shutil.ignore_patterns("ground_truth"))
    code, _, err = cli(["demo", "--model", org, "--out", tmp_path / "out"])
    assert code == 2 and "ground_truth" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_demo_refuses_zero_steps_before_writing(tmp_path, cli):
    # 0 used to fall through to the organism's default silently; it is a usage error naming the option.
    code, _, err = cli(["demo", "--steps", "0", "--out", tmp_path / "out"])
    assert code == 2 and "--steps" in err
    assert not (tmp_path / "out").exists()


def test_demo_and_scan_refuse_each_others_folders(demo_dir, tmp_path, cli):
    (tmp_path / "p.txt").write_text("a\n")
    code, _, err = cli(["scan", "--model", "testbed", "--prompts", tmp_path / "p.txt", "--out", demo_dir])
    assert code == 2 and "holds a demo run, not a scan" in err and err.count("\n") == 1


def test_out_of_range_options_are_usage_errors_in_every_command(cli):
    # Typer's own (vendored) click exceptions once escaped `main` as tracebacks; each command must print usage.
    for argv in (["scan", "--prompts", "p.txt", "--model", "m", "--out", "o", "--steps", "0"],
                 ["testbed", "make-data", "--out", "o", "--seed", "x"],
                 ["mitigate", "--prompts", "p.txt", "--model", "m", "--out", "o", "--threads", "0"]):
        code, _, err = cli(argv)
        assert code == 2
        assert "Invalid value for '--" in err
