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
    # The probe's END map and the all-token capture read the same layers: their END numbers must agree.
    end, probe = on_disk["localization_by_token"]["END"], on_disk["localization"]
    assert end["n"] == probe["n"]
    if probe["pixel_auroc"] is not None:
        assert abs(end["pixel_auroc"] - probe["pixel_auroc"]) < 1e-3
    assert len(list((tmp_path / "images").glob("*.png"))) == len(on_disk["generations"]) == 8 + 4
    assert len(list((tmp_path / "be").glob("*.png"))) == 12
    assert len(list((tmp_path / "ground_truth").glob("*.png"))) == 8


def test_demo_with_a_missing_model_names_it_and_writes_nothing(tmp_path, capsys):
    import pytest

    from memlens.cli import main

    with pytest.raises(SystemExit) as ex:
        main(["demo", "--model", str(tmp_path / "nomodel"), "--out", str(tmp_path / "out")])
    assert ex.value.code == 2 and "nomodel: no model_index.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_demo_refuses_zero_steps_before_writing(tmp_path, capsys):
    import pytest

    from memlens.cli import main

    # 0 used to fall through to the organism's default silently; it is a usage error naming the option.
    with pytest.raises(SystemExit) as ex:
        main(["demo", "--steps", "0", "--out", str(tmp_path / "out")])
    assert ex.value.code == 2 and "--steps" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_out_of_range_options_are_usage_errors_in_every_command(capsys):
    import pytest

    from memlens.cli import main

    # Typer's own (vendored) click exceptions once escaped `main` as tracebacks; each command must print usage.
    for argv in (["scan", "--prompts", "p.txt", "--model", "m", "--out", "o", "--steps", "0"],
                 ["testbed", "make-data", "--out", "o", "--seed", "x"]):
        with pytest.raises(SystemExit) as ex:
            main(argv)
        assert ex.value.code == 2
        assert "Invalid value for '--" in capsys.readouterr().err
