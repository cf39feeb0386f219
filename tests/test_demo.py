"""`memlens demo` on the shipped organism: runs offline and writes every summary.json key external scripts read."""

import json

from memlens.testbed.demo import run_demo


def test_demo_summary_keys(tmp_path):
    s = run_demo(tmp_path, per_memorized=1, per_generic=1, n_generic=4, steps=3, verbose=False)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["settings"] == s["settings"]
    for k in ("local", "global"):
        assert 0 <= on_disk["memorization_rate"][k] <= 1
        for m in ("D", "LD"):
            for stat in ("auc", "tpr_at_1pct_fpr"):
                assert stat in on_disk["detection"][k][m]
    assert 0 <= on_disk["novelty"]["generic"] <= 1
    assert "pixel_auroc" in on_disk["localization"] and "iou" in on_disk["localization"]
    assert len(list((tmp_path / "images").glob("*.png"))) == len(on_disk["generations"]) == 8 + 4
    assert len(list((tmp_path / "be").glob("*.png"))) == 12
    assert len(list((tmp_path / "ground_truth").glob("*.png"))) == 8
