"""`memlens bench`: the leaderboard equals an independent recomputation from the saved per-generation files, the
methods computed inside the generation equal the field's functions called directly on the same UNet inputs, the
extra evaluations do not disturb the probe, bad input fails with one line naming the option, and a failed run leaves
nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from memlens import bench

QUICK = bench.BenchSettings(**bench.QUICK)


@pytest.fixture(scope="module")
def quick_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "out"
    bench.run_bench(out, settings=QUICK, progress=False)
    return out


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]


def test_contract_keys_and_files(quick_dir):
    board = json.loads((quick_dir / "leaderboard.json").read_text())
    assert set(board) >= {"localization", "detection", "mitigation"}
    for m in ("be", "score_difference", "curvature_difference"):
        assert set(board["localization"][m]) >= {"pixel_auroc", "iou_otsu", "iou_oracle", "cost"}
    for m in ("D_first_step", "D", "LD", "anisotropy", "sharpness", "D_first_10"):
        assert set(board["detection"][m]) >= {"auc", "tpr_at_1pct_fpr", "cost"}
        assert board["detection"][m]["cost"]["unet_evaluations"] > 0
    assert board["detection"]["D_first_step"]["cost"]["unet_evaluations"] == 2
    steps = QUICK.steps
    assert board["detection"]["D"]["cost"]["unet_evaluations"] == 2 * steps
    assert board["localization"]["curvature_difference"]["cost"]["unet_evaluations"] == 2 * steps + 2 + 4 * QUICK.probes
    # Relative wall times are measured: a first-step score costs less than the whole generation, the curvature more.
    assert 0 < board["detection"]["D_first_step"]["cost"]["wall_time_relative"] < 1
    assert board["localization"]["curvature_difference"]["cost"]["wall_time_relative"] > 1
    md = (quick_dir / "leaderboard.md").read_text()
    assert "ORACLE" in md and "| curvature_difference |" in md and "| anisotropy |" in md
    html = (quick_dir / "leaderboard.html").read_text()
    assert html.count("data:image/png;base64") > 4
    assert not list(quick_dir.parent.glob(".out.*"))


def test_detection_numbers_equal_sklearn_on_saved_outputs(quick_dir):
    board = json.loads((quick_dir / "leaderboard.json").read_text())
    rows = _rows(quick_dir)
    y = np.array([r["label"] for r in rows])
    saved = {r["stem"]: np.load(quick_dir / "maps" / f"{r['stem']}.npz") for r in rows}
    per_method = {
        "D": [saved[r["stem"]]["D_steps"].mean() for r in rows],
        "D_first_step": [saved[r["stem"]]["D_steps"][0] for r in rows],
        "D_first_10": [saved[r["stem"]]["D_steps"][:10].mean() for r in rows],
        "LD": [saved[r["stem"]]["LD_steps"].mean() for r in rows],
        "anisotropy": [r["scores"]["anisotropy"] for r in rows],
        "sharpness": [r["scores"]["sharpness"] for r in rows],
    }
    for method, scores in per_method.items():
        scores = np.asarray(scores, np.float64)
        assert board["detection"][method]["auc"] == pytest.approx(roc_auc_score(y, scores), abs=1e-9), method
        fpr, tpr, _ = roc_curve(y, scores, drop_intermediate=False)
        assert board["detection"][method]["tpr_at_1pct_fpr"] == pytest.approx(tpr[fpr < 0.01].max()), method
    # The anisotropy score is the field's combination of its two saved terms with the SD1 weights.
    from memlens.field.detectors import ANISOTROPY_GAMMAS

    g_norm, g_cos = ANISOTROPY_GAMMAS["sd1"]
    for r in rows:
        s = r["scores"]
        assert s["anisotropy"] == pytest.approx(g_norm * s["anisotropy_norm"] + g_cos * s["anisotropy_cos"], rel=1e-5)
        # For an epsilon model its norm term is Wen's first-step D (docs/field.md).
        assert s["anisotropy_norm"] == pytest.approx(float(saved[r["stem"]]["D_steps"][0]), rel=1e-4)


def test_localization_numbers_equal_metrics_on_saved_maps(quick_dir):
    from memlens.metrics import binarize_fixed, binarize_otsu, iou, minmax_normalize, upsample_map

    board = json.loads((quick_dir / "leaderboard.json").read_text())
    rows = [r for r in _rows(quick_dir) if r["has_mask"]]
    assert rows, "the quick run has no local copy to localize"
    assert board["n"]["with_mask"] == len(rows)
    for method in bench.LOCALIZERS:
        maps, masks = [], []
        for r in rows:
            with np.load(quick_dir / "maps" / f"{r['stem']}.npz") as npz:
                masks.append(npz["mask"].astype(bool))
                maps.append(upsample_map(npz[f"map_{method}"], masks[-1].shape))
        got = board["localization"][method]
        assert got["iou_otsu"] == pytest.approx(np.mean([iou(binarize_otsu(m), g) for m, g in zip(maps, masks)]),
                                                abs=1e-6), method
        assert got["iou_fixed_0.5"] == pytest.approx(
            np.mean([iou(binarize_fixed(m), g) for m, g in zip(maps, masks)]), abs=1e-6), method
        pooled = roc_auc_score(np.concatenate([g.ravel() for g in masks]),
                               np.concatenate([minmax_normalize(m).ravel() for m in maps]))
        assert got["pixel_auroc"] == pytest.approx(pooled, abs=1e-9), method
        assert 0 <= got["iou_oracle"] <= 1


def test_score_difference_is_the_last_energy_over_sigma_squared(quick_dir):
    # Independent of the probe: rerun one generation with a plain UNet forward hook and form the map from eps.
    from memlens.field.curvature import score_difference_map
    from memlens.testbed.pipeline import load_pipeline

    rows = _rows(quick_dir)
    r = next(r for r in rows if r["has_mask"])
    pipe = load_pipeline()
    seen = {}

    def keep(module, args, kwargs, output):
        seen["eps"] = output[0] if isinstance(output, tuple) else output.sample
        seen["t"] = args[1] if len(args) > 1 else kwargs["timestep"]

    handle = pipe.unet.register_forward_hook(keep, with_kwargs=True)
    try:
        pipe(r["prompt"], generator=torch.Generator().manual_seed(r["seed"]), num_inference_steps=QUICK.steps,
             output_type="np")
    finally:
        handle.remove()
    eps_u, eps_c = seen["eps"].chunk(2)
    sigma = float((1 - pipe.scheduler.alphas_cumprod[int(seen["t"])]) ** 0.5)
    expect = score_difference_map(eps_c, eps_u, sigma)[0].numpy()
    with np.load(quick_dir / "maps" / f"{r['stem']}.npz") as npz:
        np.testing.assert_allclose(npz["map_score_difference"], expect, rtol=1e-4, atol=1e-6)


def test_field_hooks_equal_direct_calls_and_leave_the_probe_alone():
    """Inside the generation, anisotropy, sharpness and the curvature map equal the field's functions called on the
    UNet inputs of the first and last step; the probe's D and BE maps are the same with and without the hooks."""
    from memlens.field import curvature, detectors
    from memlens.probe import BrightEndingProbe
    from memlens.testbed.pipeline import load_pipeline

    pipe = load_pipeline()
    prompts = ["antique gold coins", "tabby cat staring"]
    steps = 4
    calls = []

    def record(module, args, kwargs):
        calls.append((args[0].clone(), args[1], kwargs["encoder_hidden_states"].clone()))

    def generate(with_hooks: bool):
        probe = BrightEndingProbe(pipe)
        hooks = bench.FieldHooks(pipe, probes=3, seed=7)
        calls.clear()
        handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
        try:
            with probe:
                if with_hooks:
                    with hooks:
                        pipe(prompts, generator=[torch.Generator().manual_seed(i) for i in range(2)],
                             num_inference_steps=steps, output_type="np")
                else:
                    pipe(prompts, generator=[torch.Generator().manual_seed(i) for i in range(2)],
                         num_inference_steps=steps, output_type="np")
        finally:
            handle.remove()
        return probe.records, hooks, list(calls)

    plain, _, _ = generate(False)
    hooked, hooks, calls = generate(True)
    assert len(calls) == steps  # the extra evaluations bypass the UNet's hooks
    for a, b in zip(plain, hooked):
        np.testing.assert_array_equal(a.magnitude, b.magnitude)
        np.testing.assert_array_equal(a.be_map, b.be_map)

    def model(x, t, cond):
        return pipe.unet(x, t, encoder_hidden_states=cond).sample

    x0, t0, text0 = calls[0]
    uncond, cond = text0.chunk(2)
    x = x0.chunk(2)[1]
    t_norm, t_cos = detectors.anisotropy_timesteps(pipe.scheduler.timesteps)
    with torch.no_grad():
        direct = detectors.anisotropy_score(model, x, t_norm, t_cos, cond, uncond)
    np.testing.assert_allclose(hooks.scores["anisotropy"], direct.numpy(), rtol=1e-4)
    scale = detectors.score_scale("epsilon", float(pipe.scheduler.alphas_cumprod[int(t0)]))
    sharp = detectors.sharpness_score(model, x, t0, cond, uncond, scale=scale, jvp="double_backward")
    np.testing.assert_allclose(hooks.scores["sharpness"], sharp.numpy(), rtol=1e-3)
    xl, tl, textl = calls[-1]
    uncond, cond = textl.chunk(2)
    cmap = curvature.curvature_difference_map(model, xl.chunk(2)[1], tl, cond, uncond, probes=3,
                                              generator=torch.Generator().manual_seed(7))
    np.testing.assert_allclose(hooks.scores["curvature_difference"], cmap.numpy(), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("args, flag", [
    (["--steps", "2"], "--steps"),
    (["--probes", "0"], "--probes"),
    (["--guidance", "1.0"], "--guidance"),
    (["--prompts", "p.txt"], "--prompts"),
    (["--model", "some/other-model"], "--prompts"),
    (["--n-generic", "1000"], "--n-generic"),
])
def test_bad_input_is_one_line_naming_the_option(cli, tmp_path, args, flag):
    code, out, err = cli(["bench", "--out", tmp_path / "b", "--quick", *args])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memlens: error:") and flag in lines[0], err
    assert not (tmp_path / "b").exists()


def test_out_must_be_empty_or_an_earlier_bench(cli, tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    code, _, err = cli(["bench", "--out", tmp_path / "b", "--quick"])
    assert code == 2 and "--out" in err
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"


def test_failure_leaves_nothing_half_written(tmp_path, monkeypatch, quick_dir):
    import shutil

    def boom(*a, **k):
        raise RuntimeError("failed while scoring")

    monkeypatch.setattr(bench, "leaderboard", boom)
    settings = bench.BenchSettings(per_memorized=1, per_generic=1, n_generic=2, steps=3, probes=1)
    with pytest.raises(RuntimeError):
        bench.run_bench(tmp_path / "fresh", settings=settings, progress=False)
    assert list(tmp_path.iterdir()) == []
    # An earlier bench in the folder stays whole when a rerun fails.
    shutil.copytree(quick_dir, tmp_path / "old")
    before = (tmp_path / "old" / "leaderboard.json").read_bytes()
    with pytest.raises(RuntimeError):
        bench.run_bench(tmp_path / "old", settings=settings, progress=False)
    assert (tmp_path / "old" / "leaderboard.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_cli_quick_writes_the_leaderboard(cli, tmp_path):
    code, out, err = cli(["bench", "--out", tmp_path / "b", "--quick", "--n-generic", "2"])
    assert code == 0, err
    assert "best localization" in out
    board = json.loads((tmp_path / "b" / "leaderboard.json").read_text())
    assert board["settings"]["steps"] == bench.QUICK["steps"] and board["n"]["non_memorized"] == 2


def test_full_set_oracle_is_mem_curv_diffs_set(quick_dir):
    """Local copies with their masks, global copies all ones, novel generic images all zeros: the set mem-curv-diff
    scores its oracle on, assembled here from the saved rows and maps."""
    from memlens.field.thresholds import iou_oracle
    from memlens.metrics import upsample_map

    board = json.loads((quick_dir / "leaderboard.json").read_text())
    rows = _rows(quick_dir)
    assert {r["oracle_set"] for r in rows if r["type"] == "generic"} <= {"zeros", None}
    assert {r["oracle_set"] for r in rows if r["type"] == "global"} <= {"ones", None}
    assert all((r["oracle_set"] == "mask") == r["has_mask"] for r in rows)
    chosen = [r for r in rows if r["oracle_set"]]
    for method in bench.LOCALIZERS:
        maps, masks = [], []
        for r in chosen:
            with np.load(quick_dir / "maps" / f"{r['stem']}.npz") as npz:
                mask = npz["mask"].astype(bool) if "mask" in npz.files else np.full((32, 32), r["type"] == "global")
                masks.append(mask)
                maps.append(upsample_map(npz[f"map_{method}"], mask.shape))
        want = iou_oracle(maps, masks).global_iou
        assert board["localization"][method]["iou_oracle_full_set"] == pytest.approx(want), method


def test_combination_is_be_times_score_difference(quick_dir):
    import torch.nn.functional as F

    for r in _rows(quick_dir)[:4]:
        with np.load(quick_dir / "maps" / f"{r['stem']}.npz") as npz:
            sd = npz["map_score_difference"]
            be = F.interpolate(torch.from_numpy(npz["map_be"])[None, None], size=sd.shape, mode="bilinear",
                               align_corners=False)[0, 0].numpy() if npz["map_be"].shape != sd.shape else npz["map_be"]
            np.testing.assert_allclose(npz["map_be_x_score_difference"], be * sd, rtol=1e-5, atol=1e-8)


def test_any_pipeline_with_a_labelled_prompt_file_and_masks(tmp_path):
    """The non-organism path: labels and types from the prompt file, masks by index (any size: resized to the
    image), a pipeline object as the model."""
    from PIL import Image

    from memlens.testing import tiny_pipeline

    rows = [{"prompt": "a memorized photo", "label": 1, "type": "TM", "index": "m0"},
            {"prompt": "another memorized one", "label": 1, "type": "MV", "index": "m1"},
            {"prompt": "a novel scene", "label": 0, "type": "N"},
            {"prompt": "a second novel scene", "label": 0, "type": "N"}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    masks = tmp_path / "masks"
    masks.mkdir()
    m = np.zeros((20, 20), np.uint8)
    m[:10, :10] = 255
    Image.fromarray(m).save(masks / "m0.png")
    settings = bench.BenchSettings(per_memorized=2, per_generic=2, steps=3, probes=1, guidance=3.0)
    board = bench.run_bench(tmp_path / "out", model=tiny_pipeline("sd1"), prompts=prompts, masks=masks,
                            settings=settings, progress=False)
    assert board["n"] == {"generations": 8, "memorized": 4, "non_memorized": 4, "with_mask": 2, "oracle_set": 6}
    saved = [r for r in _rows(tmp_path / "out") if r["has_mask"]]
    with np.load(tmp_path / "out" / "maps" / f"{saved[0]['stem']}.npz") as npz:
        assert npz["mask"].shape == tuple(saved[0]["image_shape"])
        assert npz["mask"].mean() == pytest.approx(0.25)
    assert set(board["detection"]["D"]) >= {"by_type_TM", "by_type_MV"}
    assert board["settings"]["steps"] == 3


# --- the Webster benchmark layout -----------------------------------------------------------------------------------

WEBSTER_LABELS = [
    {"caption": "a memorized poster", "overfit_type": "TV", "gen_seeds": [[11, 0], [12, 1]]},  # seed 11 copies row 0
    {"caption": "a poster whose template died", "overfit_type": "TV", "gen_seeds": [[13, 2]]},
    {"caption": "an exact copy", "overfit_type": "MV", "gen_seeds": []},
    {"caption": "a novel scene", "overfit_type": "N", "gen_seeds": []},
    {"caption": "another novel scene", "overfit_type": "N", "gen_seeds": []},
]


def _webster_folder(root: Path, labels=WEBSTER_LABELS) -> Path:
    """A local copy of fraisdufour/templates-verbs in miniature: template 0's mask covers the whole image, template
    1's the left half (10 x 10 PNGs, the generations are 32 x 32), template 2's mask file is gone (a dead entry)."""
    from PIL import Image

    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    half = np.zeros((10, 10), np.uint8)
    half[:, :5] = 255
    table = []
    for name, mask in (("full", np.full((10, 10), 255, np.uint8)), ("half", half), ("gone", None)):
        img, mask_file = f"templates/imgs/{name}.png", f"templates/masks/{name}.png"
        (root / "templates" / "imgs").mkdir(parents=True, exist_ok=True)
        (root / "templates" / "masks").mkdir(exist_ok=True)
        Image.fromarray(np.full((10, 10, 3), 90, np.uint8)).save(root / img)
        if mask is not None:
            Image.fromarray(mask).save(root / mask_file)
        table.append({"img_file": img, "mask_file": mask_file, "url": f"http://t/{name}"})
    pq.write_table(pa.Table.from_pylist(table), root / "templates" / "metadata.parquet")
    (root / "groundtruth_parquets").mkdir()
    pq.write_table(pa.Table.from_pylist(labels), root / bench.WEBSTER_LABELS)
    return root


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from memlens.testing import tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd1")
    tiny_pipeline("sd1").save_pretrained(folder)
    return folder


WEBSTER_ARGS = ["--per-memorized", "2", "--per-generic", "1", "--steps", "3", "--probes", "1", "--guidance", "3"]


def test_webster_folder_gives_the_whole_leaderboard_in_one_command(cli, tiny_model, tmp_path):
    from memlens.metrics import minmax_normalize, upsample_map

    folder = _webster_folder(tmp_path / "webster")
    code, out, err = cli(["bench", "--model", tiny_model, "--webster", folder, "--out", tmp_path / "b", *WEBSTER_ARGS])
    assert code == 0, err
    assert "4 of 5 prompts used" in out and "3 dead entries skipped" in out
    board = json.loads((tmp_path / "b" / "leaderboard.json").read_text())
    assert board["n"] == {"generations": 6, "memorized": 4, "non_memorized": 2, "with_mask": 2, "oracle_set": 6}
    truth = board["ground_truth"]
    assert (truth["label_rows"], truth["prompts_used"], truth["dead_total"]) == (5, 4, 3)
    assert truth["dead"] == {"template_mask_missing": 1, "template_prompt_without_mask": 1, "template_refs_dead": 1}
    assert truth["kinds"] == {"exact": 1, "non-memorized": 2, "template": 1}
    assert "3 dead entries skipped" in (tmp_path / "b" / "leaderboard.md").read_text()

    rows = _rows(tmp_path / "b")
    assert [(r["label_row"], r["type"], r["oracle_set"]) for r in rows] == [
        (0, "template", "mask"), (0, "template", "mask"), (2, "exact", "ones"), (2, "exact", "ones"),
        (3, "non-memorized", "zeros"), (4, "non-memorized", "zeros")]
    # The template prompt's images take the label file's seeds, each with the template that seed copies.
    assert [r["seed"] for r in rows[:2]] == [11, 12]
    whole = np.ones((32, 32), bool)
    left = np.zeros((32, 32), bool)
    left[:, :16] = True
    expected = [whole, left]
    for r, want in zip(rows[:2], expected):
        with np.load(tmp_path / "b" / "maps" / f"{r['stem']}.npz") as npz:
            np.testing.assert_array_equal(npz["mask"], want)
    # Pixel AUROC pooled over the two template generations, from the saved maps and the masks built here.
    for method in bench.LOCALIZERS:
        maps = []
        for r in rows[:2]:
            with np.load(tmp_path / "b" / "maps" / f"{r['stem']}.npz") as npz:
                maps.append(minmax_normalize(upsample_map(npz[f"map_{method}"], (32, 32))).ravel())
        want = roc_auc_score(np.concatenate([m.ravel() for m in expected]), np.concatenate(maps))
        assert board["localization"][method]["pixel_auroc"] == pytest.approx(want, abs=1e-9), method
        assert board["localization"][method]["n"] == 2


@pytest.mark.parametrize("case, words", [
    ("bad type", "sdv1_bb_edge_groundtruth.parquet row 4: column 'overfit_type': unknown memorization type 'XX'"),
    ("no labels file", "--webster"),
    ("with masks", "--masks and --webster"),
    ("only memorized", "needs memorized and non-memorized prompts"),
])
def test_webster_bad_input_is_one_line(cli, tiny_model, tmp_path, case, words):
    labels = [dict(r) for r in WEBSTER_LABELS]
    if case == "bad type":
        labels[3]["overfit_type"] = "XX"
    if case == "only memorized":
        labels = labels[:3]
    folder = _webster_folder(tmp_path / "webster", labels)
    extra = ["--masks", tmp_path] if case == "with masks" else []
    if case == "no labels file":
        (folder / bench.WEBSTER_LABELS).unlink()
    code, _, err = cli(["bench", "--model", tiny_model, "--webster", folder, "--out", tmp_path / "b", *extra,
                        *WEBSTER_ARGS])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and words in lines[0], err
    assert not (tmp_path / "b").exists()
