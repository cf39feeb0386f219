"""`memlens evaluate ...` end to end on synthetic scan directories: numbers, files written, and the errors users see."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _scan_factory import make_scan
from memlens import evaluate as E
from memlens import rundir
from memlens.cli import main


def run_cli(args, capsys):
    """Run the real CLI; return (exit status, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as ex:
        code = ex.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def pair_auc(y, s):
    y, s = np.asarray(y), np.asarray(s)
    pos, neg = s[y == 1], s[y == 0]
    return (np.sum(pos[:, None] > neg[None, :]) + 0.5 * np.sum(pos[:, None] == neg[None, :])) / (pos.size * neg.size)


def row(result, **key):
    hits = [r for r in result["results"] if all(r[k] == v for k, v in key.items())]
    assert len(hits) == 1, (key, hits)
    return hits[0]


# ---------------------------------------------------------------------------------------------------- detection


def test_detection_numbers_files_and_types(tmp_path, capsys):
    rng = np.random.default_rng(3)
    # overlapping classes so the AUC is not trivially 1
    recs = make_scan(
        tmp_path / "scan",
        n_prompts=8,
        per_prompt=3,
        steps=12,
        types=["VM", "N", "TM", "N", "VM", "N", "TM", "N"],
        d_of=lambda p, j, r: list(rng.normal(1.0 + 0.5 * (p % 2 == 0), 0.6, 12)),
        ld_of=lambda p, j, r: list(rng.normal(1.0 + 0.8 * (p % 2 == 0), 0.6, 12)),
    )
    out = tmp_path / "res" / "det.json"
    code, stdout, stderr = run_cli(["evaluate", "detection", "--scan", str(tmp_path / "scan"), "--out", str(out)],
                                   capsys)
    assert code == 0, stderr
    assert "D T=all AUC" in stdout
    res = json.loads(out.read_text())
    png = out.with_name("det.roc.png")
    assert res["roc_plot"] == png.name and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(out.parent)) == ["det.json", "det.roc.png"]  # no temp files left
    assert res["labels_from"] == "label field" and res["n_generations"] == 24 and res["n_prompts"] == 8

    y = np.array([r["label"] for r in recs])
    for signal in ("D", "LD"):
        for T, sl in (("1", slice(0, 1)), ("10", slice(0, 10)), ("all", slice(None))):
            s = np.array([np.mean(r[signal][sl]) for r in recs])
            got = row(res, signal=signal, T=T, level="generation", subset="all")
            assert got["auc"] == pytest.approx(pair_auc(y, s), abs=1e-6)
            # prompt level: mean of the 3 generations of each prompt
            ps = s.reshape(8, 3).mean(axis=1)
            got = row(res, signal=signal, T=T, level="prompt", subset="all")
            assert got["auc"] == pytest.approx(pair_auc(np.arange(8) % 2 == 0, ps), abs=1e-6)
            assert (got["n_pos"], got["n_neg"]) == (4, 4)
    # per type: the VM positives (prompts 0 and 4) against all 12 negative generations
    s = np.array([np.mean(r["D"]) for r in recs])
    keep = np.array([r["type"] == "VM" or r["label"] == 0 for r in recs])
    got = row(res, signal="D", T="all", level="generation", subset="type=VM")
    assert (got["n_pos"], got["n_neg"]) == (6, 12)
    assert got["auc"] == pytest.approx(pair_auc(y[keep], s[keep]), abs=1e-6)
    assert row(res, signal="D", T="all", level="prompt", subset="type=TM")["n_pos"] == 2


def test_detection_positive_and_negative_scans_without_labels(tmp_path, capsys):
    make_scan(tmp_path / "mem", n_prompts=2, per_prompt=2, labels=False, d_of=lambda p, j, r: [5.0, 5.0])
    make_scan(tmp_path / "non", n_prompts=3, per_prompt=2, labels=False, d_of=lambda p, j, r: [1.0 + p, 1.0])
    res = E.detection_results([tmp_path / "mem", tmp_path / "non"]).report
    assert res["labels_from"].startswith("scan order")
    assert res["n_prompts"] == 5  # prompt 0 of each scan is a different prompt
    r = row(res, signal="D", T="1", level="generation", subset="all")
    assert (r["n_pos"], r["n_neg"]) == (4, 6) and r["auc"] == 1.0
    # only 2 steps recorded: T=10 cannot be computed and says so instead of silently averaging 2 steps
    assert not [x for x in res["results"] if x["T"] == "10"]
    assert any("T=10 skipped" in n for n in res["notes"])


def detect(scan_dir, out, capsys):
    return run_cli(["evaluate", "detection", "--scan", str(scan_dir), "--out", str(out)], capsys)


def test_detection_user_errors(tmp_path, capsys):
    make_scan(tmp_path / "a", n_prompts=2, per_prompt=1, labels=False)
    code, _, err = detect(tmp_path / "a", tmp_path / "o.json", capsys)
    assert code == 2 and err.count("\n") == 1 and "no 'label' fields" in err
    assert not (tmp_path / "o.json").exists()

    make_scan(tmp_path / "b", n_prompts=2, per_prompt=2)
    lines = (tmp_path / "b" / "generations.jsonl").read_text().splitlines()
    lines[2] = json.dumps({k: v for k, v in json.loads(lines[2]).items() if k != "label"})
    (tmp_path / "b" / "generations.jsonl").write_text("\n".join(lines) + "\n")
    code, _, err = detect(tmp_path / "b", tmp_path / "o.json", capsys)
    assert code == 2 and "generations.jsonl line 3: missing field 'label'" in err

    lines[2] = lines[2][:-5]  # truncated JSON
    (tmp_path / "b" / "generations.jsonl").write_text("\n".join(lines) + "\n")
    code, _, err = detect(tmp_path / "b", tmp_path / "o.json", capsys)
    assert code == 2 and "line 3: not valid JSON" in err

    make_scan(tmp_path / "c", n_prompts=2, per_prompt=1, d_of=lambda p, j, r: [1.0, "x"])
    with pytest.raises(E.InputError, match="line 1: field 'D' must be a non-empty list of finite numbers"):
        E.detection_results([tmp_path / "c"])
    with pytest.raises(E.InputError, match="generations.jsonl: not found"):
        E.detection_results([tmp_path / "nowhere"])


def test_reads_a_scan_in_progress_like_the_scan_writer_leaves_it(tmp_path):
    recs = make_scan(tmp_path / "s", n_prompts=3, per_prompt=1)
    main_log = tmp_path / "s" / "generations.jsonl"
    lines = main_log.read_text().splitlines()
    # generations.jsonl has prompt 0, a shard has prompts 0 (duplicate) and 1, and a torn write of prompt 2
    main_log.write_text(lines[0] + "\n")
    (tmp_path / "s" / "shards").mkdir()
    (tmp_path / "s" / "shards" / "rank-1.jsonl").write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:40])
    got = rundir.read_generations(tmp_path / "s")
    assert [r.prompt_index for r in got] == [0, 1]
    assert got[1].source.name == "rank-1.jsonl" and got[1].line == 2
    assert len(recs) == 3


def test_crash_during_write_leaves_no_complete_looking_file(tmp_path, monkeypatch):
    target = tmp_path / "res.json"
    target.write_text("old\n")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(rundir.os, "replace", boom)
    with pytest.raises(OSError):
        E.write_json(target, {"a": 1})
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["res.json"]


# ---------------------------------------------------------------------------------------------------- localization


def write_masks(masks_dir, recs, size, which):
    masks_dir.mkdir(exist_ok=True)
    truth = {}
    for r in recs:
        key = r["index"]
        if key in which and key not in truth:
            g = np.zeros((size, size), bool)
            g[: size // 2, : size // 2 + key % 3] = True
            Image.fromarray((g * 255).astype(np.uint8)).save(masks_dir / f"{key}.png")
            truth[key] = g
    return truth


def test_localization_numbers_and_missing_masks(tmp_path, capsys):
    # maps at image size, so the numbers can be checked without any resampling
    recs = make_scan(tmp_path / "scan", n_prompts=3, per_prompt=2, size=8, map_size=8)
    truth = write_masks(tmp_path / "masks", recs, 8, which={1000, 1002})
    out = tmp_path / "loc.json"
    code, stdout, err = run_cli(
        ["evaluate", "localization", "--scan", str(tmp_path / "scan"), "--masks", str(tmp_path / "masks"),
         "--out", str(out)],
        capsys,
    )
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["n_evaluated"] == 4 and res["n_missing_masks"] == 2 and res["missing_masks"] == ["1001.png"]
    used = [r for r in recs if r["index"] in truth]
    maps = [np.load(tmp_path / "scan" / r["be_map"]) for r in used]
    masks = [truth[r["index"]] for r in used]
    y = np.concatenate([g.ravel() for g in masks])
    assert res["pixel_auroc_pooled"] == pytest.approx(pair_auc(y, np.concatenate([m.ravel() for m in maps])))
    ious = []
    for m, g in zip(maps, masks):
        p = (m - m.min()) / (m.max() - m.min()) > 0.5
        ious.append((p & g).sum() / (p | g).sum())
    assert res["iou_fixed_0.5_mean"] == pytest.approx(np.mean(ious))
    assert res["oracle_iou_mean"] >= res["iou_fixed_0.5_mean"] - 1e-9  # the oracle's grid contains 0.5
    assert "bilinear" in res["upsampling"]


def test_localization_upsamples_small_maps_and_rejects_wrong_mask_size(tmp_path, capsys):
    recs = make_scan(tmp_path / "scan", n_prompts=2, per_prompt=1, size=16, map_size=4)
    write_masks(tmp_path / "masks", recs, 16, which={1000, 1001})
    res = E.localization_results(tmp_path / "scan", tmp_path / "masks")
    assert res["n_evaluated"] == 2 and res["n_missing_masks"] == 0

    Image.new("L", (12, 16)).save(tmp_path / "masks" / "1001.png")
    code, _, err = run_cli(
        ["evaluate", "localization", "--scan", str(tmp_path / "scan"), "--masks", str(tmp_path / "masks")], capsys
    )
    assert code == 2
    assert "1001.png: mask is 12x16 (WxH) but image" in err and "00001_00.png is 16x16" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(E.InputError, match="no mask found for any of 2 records"):
        E.localization_results(tmp_path / "scan", empty)


def test_localization_falls_back_to_prompt_index(tmp_path):
    recs = make_scan(tmp_path / "scan", n_prompts=2, per_prompt=1, size=8, map_size=8, index_base=None)
    Image.fromarray(np.eye(8, dtype=np.uint8) * 255).save(tmp_path / "m1.png")
    (tmp_path / "masks").mkdir()
    os.replace(tmp_path / "m1.png", tmp_path / "masks" / "1.png")
    res = E.localization_results(tmp_path / "scan", tmp_path / "masks")
    assert res["n_evaluated"] == 1 and res["per_image"][0]["prompt_index"] == 1 and len(recs) == 2


# ---------------------------------------------------------------------------------------------------- similarity


class TinyDescriptor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3, stride=4)

    def forward(self, x):
        return torch.tanh(self.conv(x)).mean(dim=(2, 3)) + 0.05


def test_similarity_end_to_end(tmp_path, capsys):
    recs = make_scan(tmp_path / "scan", n_prompts=3, per_prompt=2, size=32, map_size=4)
    refs = tmp_path / "refs"
    # prompt 0: its own first generation is a training image (a copy); prompt 1: a random image; prompt 2: none
    (refs / "1000").mkdir(parents=True)
    Image.open(tmp_path / "scan" / recs[0]["image"]).save(refs / "1000" / "copy.png")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(refs / "1000" / "black.png")
    (refs / "1001").mkdir()
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(refs / "1001" / "grey.png")
    sscd = tmp_path / "sscd.pt"
    torch.jit.script(TinyDescriptor().eval()).save(str(sscd))
    out = tmp_path / "sim.json"
    code, stdout, err = run_cli(
        ["evaluate", "similarity", "--scan", str(tmp_path / "scan"), "--references", str(refs), "--sscd", str(sscd),
         "--preset", "wen", "--out", str(out)],
        capsys,
    )
    assert code == 0, err
    assert "4/6 generations with references" in stdout
    res = json.loads(out.read_text())
    assert res["n_missing_references"] == 2 and res["missing_references"] == ["1002"]
    rows = res["per_generation"]
    # the exact copy: SSCD 1 (so S = LS = 0) and zero pixel distance
    assert rows[0]["sscd"] == pytest.approx(1.0, abs=1e-5)
    assert rows[0]["S"] == 0.0 and rows[0]["LS"] == 0.0 and rows[0]["l2_min"] == 0.0
    # a generation against the flat grey image, recomputed independently
    gen = np.asarray(Image.open(tmp_path / "scan" / recs[2]["image"]), np.float64) / 255
    l2 = np.sqrt(np.sum((gen - 200 / 255) ** 2))
    assert rows[2]["l2_min"] == pytest.approx(l2, rel=1e-5)
    want_s = -l2 if rows[2]["sscd"] < 0.5 else 0.0
    assert rows[2]["S"] == pytest.approx(want_s, rel=1e-5)
    assert "sscd" not in rows[4] and "S" not in rows[4]
    assert res["sscd_preset"] == "wen"


def test_similarity_user_errors(tmp_path, capsys, monkeypatch):
    recs = make_scan(tmp_path / "scan", n_prompts=1, per_prompt=1, size=16)
    refs = tmp_path / "refs"
    (refs / "1000").mkdir(parents=True)
    (refs / "1000" / "bad.png").write_bytes(b"not a png")
    base = ["evaluate", "similarity", "--scan", str(tmp_path / "scan"), "--references", str(refs)]
    code, _, err = run_cli(base, capsys)
    assert code == 2 and "1000/bad.png: cannot read image" in err

    import sys

    monkeypatch.setitem(sys.modules, "open_clip", None)
    code, _, err = run_cli(
        ["evaluate", "similarity", "--scan", str(tmp_path / "scan"), "--references", str(refs),
         "--clip-model", "ViT-g-14", "--clip-pretrained", str(tmp_path / "w.bin")],
        capsys,
    )
    assert code == 2 and "open_clip, which is not installed" in err
    code, _, err = run_cli(
        ["evaluate", "similarity", "--scan", str(tmp_path / "scan"), "--references", str(refs), "--preset", "imagenet"],
        capsys,
    )
    assert code == 2 and "--preset must be one of ['sscd', 'wen']" in err
    assert len(recs) == 1
