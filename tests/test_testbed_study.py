"""The organism study: one command trains every (layout, seed) run of the recipe, resumes, shares a folder between
processes, and tabulates what the demo measured."""

import json

import pytest

from memlens.cli import main
from memlens.errors import InputError
from memlens.testbed.data import make_dataset
from memlens.testbed.study import StudyConfig, _claim, format_table, run_study


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("d") / "data", seed=4, n_generic=20, copies=2)


def _config(**kw):
    return StudyConfig(**{**dict(seeds=[0], layouts=["eos", "pad"], clip_steps=2, steps=2, evaluate=False), **kw})


def test_trains_every_run_with_the_recipe_and_skips_finished_ones(data, tmp_path):
    out = tmp_path / "study"
    run_study(data, out, _config())
    for layout in ("eos", "pad"):
        run = out / f"{layout}_s0"
        clip_cfg = json.loads((run / "clip" / "clip_config.json").read_text())
        train_cfg = json.loads((run / "organism" / "train_config.json").read_text())
        assert clip_cfg["pad_token"] == layout and clip_cfg["steps"] == 2
        assert train_cfg["text_encoder"] == str(run / "clip") and train_cfg["steps"] == 2
        assert train_cfg["pad_token"] == layout and (run / "organism" / "ground_truth" / "items.jsonl").is_file()
        assert json.loads((run / "row.json").read_text())["layout"] == layout
    rows = json.loads((out / "study.json").read_text())["runs"]
    assert [(r["layout"], r["seed"]) for r in rows] == [("eos", 0), ("pad", 0)]
    weights = out / "eos_s0" / "organism" / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    run_study(data, out, _config())  # finished: nothing is trained again
    assert weights.stat().st_mtime_ns == before
    with pytest.raises(InputError, match="started with steps=2, not 3"):
        run_study(data, out, _config(steps=3))


def test_no_train_scores_only_finished_runs_and_a_claimed_run_is_left_alone(data, tmp_path):
    out = tmp_path / "study"
    run_study(data, out, _config(train=False))
    assert not (out / "eos_s0" / "organism").exists() and not (out / "pad_s0" / "organism").exists()
    with _claim(out / "eos_s0") as mine:  # as if another process were training it
        assert mine
        run_study(data, out, _config())
    assert not (out / "eos_s0" / "organism").exists() and (out / "pad_s0" / "organism" / "unet").is_dir()


def test_refusals_name_the_problem(data, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "other.txt").write_text("a")
    with pytest.raises(InputError, match="not empty and not a study folder"):
        run_study(data, tmp_path / "x", _config())
    with pytest.raises(InputError, match="no memorized.jsonl"):
        run_study(tmp_path, tmp_path / "y", _config())
    with pytest.raises(InputError, match="layouts: expected values among eos, pad"):
        run_study(data, tmp_path / "z", _config(layouts=["sd3"]))
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_table_reports_tokens_small_templates_and_detection():
    loc = {"pixel_auroc": 0.9, "iou": 0.5, "n": 4}
    row = {"layout": "eos", "seed": 3, "eval": {"0": {
        "memorization_rate": {"global": 1.0, "local": 0.75}, "novelty": {"generic": 0.97},
        "localization": loc,
        "localization_by_token": {"bos": {"pixel_auroc": 0.1, "iou": 0.0, "n": 4}, "end": loc},
        "localization_by_size": {"16x16": {**loc, "area_fraction": 0.25},
                                 "8x8": {"pixel_auroc": 0.8, "iou": 0.2, "n": 1, "area_fraction": 0.0625},
                                 "10x10": {"pixel_auroc": 0.6, "iou": 0.4, "n": 3, "area_fraction": 0.098}},
        "detection": {"local": {"D": {"auc": 1.0, "tpr_at_1pct_fpr": 0.5}, "LD": {"auc": 0.99, "tpr_at_1pct_fpr": 0.8}}},
    }}}
    table = format_table([row]).splitlines()
    cells = [c.strip() for c in table[2].split("|")[1:-1]]
    head = [c.strip() for c in table[0].split("|")[1:-1]]
    got = dict(zip(head, cells))
    assert got["copies global / local"] == "1.00 / 0.75" and got["bos AUROC / IoU"] == "0.10 / 0.00"
    assert got["pad_1 AUROC / IoU"] == "n/a / n/a"
    assert got["small templates (<= 10% of the image), end AUROC / IoU"].startswith("0.65 / 0.35")
    assert got["local D AUC (TPR@1%FPR)"] == "1.00 (0.50)" and got["local LD AUC (TPR@1%FPR)"] == "0.99 (0.80)"


def test_cli_study_train_only(data, tmp_path):
    main(["testbed", "study", "--data", str(data), "--out", str(tmp_path / "s"), "--seeds", "1", "--layouts", "pad",
          "--clip-steps", "1", "--steps", "1", "--no-eval"])
    assert (tmp_path / "s" / "pad_s1" / "organism" / "unet").is_dir()
    with pytest.raises(SystemExit) as info:
        main(["testbed", "study", "--data", str(data), "--out", str(tmp_path / "t"), "--seeds", "one"])
    assert info.value.code == 2 and not (tmp_path / "t").exists()
