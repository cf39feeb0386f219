"""The run-directory layer: records round-trip, torn tails, errors naming file and line, the output checks and the
lock-first run skeleton every producer (scan, mitigate, demo) uses."""

from __future__ import annotations

import json

import pytest

from memlens import rundir
from memlens.errors import InputError
from memlens.rundir import Generation


def gen(p, i, **kw):
    return Generation(prompt_index=p, image_index=i, prompt=f"p{p}", seed=p * 10 + i, D=[1.0, 2.0], LD=[1.5, 2.5],
                      **kw)


def test_record_round_trip_keeps_order_absent_fields_and_extras(tmp_path):
    a = gen(0, 1, label=1, type="VM", index="x7", extra={"method": "pe", "triggered": True})
    line = a.to_line()
    assert list(line)[:4] == ["prompt_index", "image_index", "prompt", "seed"]
    assert "overlay" not in line and line["method"] == "pe"
    with rundir.Log(tmp_path / rundir.GENERATIONS) as log:
        log.append([a, gen(1, 0)])
    back = rundir.read_generations(tmp_path)
    assert back[0] == a and back[0].extra == {"method": "pe", "triggered": True}
    assert back[1].where() == f"{tmp_path / rundir.GENERATIONS} line 2" and back[1].stem == "00001_00"
    assert back[0].name == "x7" and back[1].name == "1"  # mask / reference key: index, else prompt_index


def test_torn_last_line_is_skipped_and_cut_by_the_next_writer(tmp_path):
    log_path = tmp_path / rundir.GENERATIONS
    with rundir.Log(log_path) as log:
        log.append([gen(0, 0), gen(0, 1)])
    data = log_path.read_bytes()
    log_path.write_bytes(data[: len(data) - 7])  # the second line loses its end, newline included
    assert [r.key for r in rundir.read_generations(tmp_path)] == [(0, 0)]
    with rundir.Log(log_path) as log:  # opening cuts the torn tail before anything is appended
        log.append([gen(0, 1)])
    assert [r.key for r in rundir.read_generations(tmp_path)] == [(0, 0), (0, 1)]
    assert log_path.read_bytes().endswith(b"\n")


@pytest.mark.parametrize("bad, message", [
    (b"{not json\n", "line 2: not valid JSON"),
    (b"[1, 2]\n", "line 2: expected a JSON object, got list"),
    (b'{"prompt_index": 1}\n', "line 2: missing field 'image_index'"),
    (b'{"prompt_index": "1", "image_index": 0}\n', "line 2: field 'prompt_index' must be an integer"),
    (b'{"prompt_index": 1, "image_index": 0, "label": 3}\n', "line 2: field 'label' must be 0 or 1"),
])
def test_bad_lines_are_named(tmp_path, bad, message):
    log_path = tmp_path / rundir.GENERATIONS
    log_path.write_bytes(json.dumps(gen(0, 0).to_line()).encode() + b"\n" + bad)
    with pytest.raises(InputError, match=message):
        rundir.read_generations(tmp_path)


def test_check_names_file_line_and_field(tmp_path):
    with rundir.Log(tmp_path / rundir.GENERATIONS) as log:
        log.append([gen(0, 0), Generation(prompt_index=1, image_index=0, D=[1.0, float("nan")])])
    with pytest.raises(InputError, match="line 2: field 'D' must be a non-empty list of finite numbers"):
        rundir.read_generations(tmp_path, required=("D",))
    with pytest.raises(InputError, match="line 1: missing field 'image'"):
        rundir.read_generations(tmp_path, required=("image",))


def test_merge_orders_drops_duplicates_and_removes_shards(tmp_path):
    with rundir.Log(tmp_path / rundir.GENERATIONS) as log:
        log.append([gen(1, 0)])
    with rundir.Log(tmp_path / rundir.SHARDS / "rank-1.jsonl") as log:
        log.append([gen(0, 0), gen(1, 0)])
    merged = rundir.merge(tmp_path)
    assert [r.key for r in merged] == [(0, 0), (1, 0)]
    assert not (tmp_path / rundir.SHARDS).exists()
    assert [r.key for r in rundir.read_generations(tmp_path)] == [(0, 0), (1, 0)]


def test_check_output(tmp_path):
    assert rundir.check_output(tmp_path / "new" / "deeper", "scan") == tmp_path / "new" / "deeper"
    assert rundir.check_output(tmp_path, "scan") == tmp_path  # empty folder
    (tmp_path / rundir.GENERATIONS).write_bytes(b"")  # a run killed before its run.json: still ours
    rundir.check_output(tmp_path, "scan")
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(InputError, match=r"`out_dir` .* is not empty and holds no memlens run \(summary.json\)"):
        rundir.check_output(tmp_path, "scan")
    rundir.check_output(tmp_path, "demo", own=("summary.json",))  # a demo keeps one there
    rundir.write_run_json(tmp_path, {"kind": "mitigate"})
    with pytest.raises(InputError, match="holds a mitigate run, not a scan"):
        rundir.check_output(tmp_path, "scan")
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is a file; expected a folder"):
        rundir.check_output(tmp_path / "f", "scan")
    with pytest.raises(InputError, match="f is a file, not a folder"):
        rundir.check_output_file(tmp_path / "f" / "x.json")
    with pytest.raises(InputError, match="is a folder; expected a file name"):
        rundir.check_output_file(tmp_path)


def test_open_run_locks_before_reading_state(tmp_path):
    rundir.write_run_json(tmp_path, {"kind": "scan", "settings": {"steps": 5}})
    with rundir.Log(tmp_path / rundir.GENERATIONS):  # another producer holds the folder
        before = (tmp_path / rundir.RUN_JSON).read_bytes()
        # Refused at the lock, even though its settings differ: it never got to read (or judge) the state.
        with pytest.raises(InputError, match="another scan is writing to this folder"):
            rundir.open_run(tmp_path, "scan", {"steps": 9}, {"steps": "`steps`"})
        assert (tmp_path / rundir.RUN_JSON).read_bytes() == before
    with pytest.raises(InputError, match=r"holds a different run: `steps` is 9 but the run was started with 5"):
        rundir.open_run(tmp_path, "scan", {"steps": 9}, {"steps": "`steps`"})
    run = rundir.open_run(tmp_path, "scan", {"steps": 5}, {"steps": "`steps`"})
    with run.log:
        assert run.previous["settings"] == {"steps": 5} and run.done == set()


def test_atomic_write_keeps_permissions_and_leaves_no_temp(tmp_path):
    import os

    target = rundir.write_json(tmp_path / "a" / "r.json", {"x": float("nan"), "p": tmp_path})
    assert json.loads(target.read_text()) == {"x": None, "p": str(tmp_path)}
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert os.listdir(tmp_path / "a") == ["r.json"]
