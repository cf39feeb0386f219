"""Prompt files: every format, every documented error, and the public sets as shipped in ../shared/data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memlens.errors import InputError
from memlens.prompts import PUBLIC_SETS, PromptRecord, load_prompts, load_public_set

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} not present")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- formats --------------------------------------------------------------------------------------------------------


def test_txt_one_prompt_per_line_blank_lines_skipped(tmp_path):
    recs = load_prompts(write(tmp_path / "p.txt", "a cat\n\n  \r\nthe dog  \nlast without newline"))
    assert [r.prompt for r in recs] == ["a cat", "the dog", "last without newline"]
    assert all(r.label is None and r.type is None and r.index is None and r.captions == [] for r in recs)


def test_jsonl_keys_labels_paraphrases_and_extra(tmp_path):
    rows = [
        {"caption": "one", "label": 1, "type": "VM", "index": 12, "url": "u", "caption2": "one b", "caption1": "one a"},
        {"prompt": "two", "label": "0"},
        {"text": "three", "index": "abc"},
    ]
    recs = load_prompts(write(tmp_path / "p.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n"))
    assert recs[0] == PromptRecord("one", 1, "VM", 12, ["one a", "one b"], {"url": "u"})
    assert (recs[1].prompt, recs[1].label) == ("two", 0)
    assert (recs[2].prompt, recs[2].index, recs[2].label) == ("three", "abc", None)


def test_csv_semicolon_and_comma_detected_from_header(tmp_path):
    semi = load_prompts(write(tmp_path / "s.csv", ";Caption;type;Index\n0;a, b, c;VM;42\n1;d;TM;7\n"))
    assert [(r.prompt, r.type, r.index) for r in semi] == [("a, b, c", "VM", 42), ("d", "TM", 7)]
    comma = load_prompts(write(tmp_path / "c.csv", 'prompt,label\n"x; y",1\nz,0\n'))
    assert [(r.prompt, r.label) for r in comma] == [("x; y", 1), ("z", 0)]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p0", "p1"], "label": [1, 0], "score": [0.5, 0.25]}), tmp_path / "p.parquet")
    recs = load_prompts(tmp_path / "p.parquet")
    assert [(r.prompt, r.label, r.extra) for r in recs] == [("p0", 1, {"score": 0.5}), ("p1", 0, {"score": 0.25})]


def test_default_label_fills_only_missing_labels(tmp_path):
    path = write(tmp_path / "p.jsonl", '{"caption": "a", "label": 0}\n{"caption": "b"}\n')
    assert [r.label for r in load_prompts(path, label=1)] == [0, 1]


# --- errors: each names the file, the line and the field --------------------------------------------------------


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("bad.jsonl", '{"caption": "ok"}\n{"caption": "broken"\n', ["bad.jsonl line 2", "malformed JSON"]),
        ("arr.jsonl", '{"caption": "ok"}\n[1, 2]\n', ["arr.jsonl line 2", "expected a JSON object"]),
        ("empty.jsonl", '{"caption": "ok"}\n{"caption": "   "}\n', ["empty.jsonl line 2", "'caption'", "empty prompt"]),
        ("col.jsonl", '{"title": "x", "url": "u"}\n', ["col.jsonl line 1", "no prompt column", "'title', 'url'"]),
        ("col.csv", "title;url\nx;u\n", ["col.csv line 2", "no prompt column", "'title', 'url'"]),
        ("empty.csv", "caption,label\nok,1\n,0\n", ["empty.csv line 3", "'caption'", "empty prompt"]),
        ("lab.jsonl", '{"caption": "x", "label": "yes"}\n', ["lab.jsonl line 1", "'label'", "0 or 1"]),
        ("nothing.txt", "\n\n", ["nothing.txt", "no prompts"]),
        ("p.yaml", "caption: x\n", ["p.yaml", "unknown prompt file extension", ".jsonl"]),
    ],
)
def test_errors_name_file_line_field(tmp_path, name, text, expected):
    with pytest.raises(InputError) as info:
        load_prompts(write(tmp_path / name, text))
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="nope.jsonl: prompt file not found"):
        load_prompts(tmp_path / "nope.jsonl")


def test_not_utf8(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(InputError, match="not UTF-8"):
        load_prompts(tmp_path / "p.txt")


# --- the public sets, read where they live -------------------------------------------------------------------------


@needs_data
def test_public_sets_sizes_labels_types():
    expect = {
        "wen-sd1-memorized": (500, 1, set()),
        "nemo-memorized": (500, 1, {"VM", "TM"}),
        "nemo-unmemorized": (500, 0, set()),
        "sail-nonmemorized": (500, 0, set()),
        "sd2-memorized": (219, 1, {"MV", "TV"}),
        "memattn-gpt500": (500, 0, set()),
    }
    assert set(expect) == set(PUBLIC_SETS)
    for name, (n, label, types) in expect.items():
        recs = load_public_set(name, DATA)
        assert len(recs) == n, name
        assert {r.label for r in recs} == {label}, name
        assert {r.type for r in recs} - {None} == types, name
        assert all(r.prompt and r.prompt == r.prompt.strip() for r in recs), name


@needs_data
def test_nemo_and_wen_are_the_same_prompts_in_the_same_order():
    wen = load_public_set("wen-sd1-memorized", DATA)
    nemo = load_public_set("nemo-memorized", DATA)
    assert [r.index for r in wen] == [r.index for r in nemo]  # LAION ids: ints in JSONL, text in the CSV
    assert isinstance(wen[0].index, int) and wen[0].extra["url"].startswith("http")
    assert sum(r.type == "VM" for r in nemo) == 112 and sum(r.type == "TM" for r in nemo) == 388
    assert sum(a.prompt == b.prompt for a, b in zip(wen, nemo)) >= 490  # a few differ only in whitespace


@needs_data
def test_generic_loader_reads_the_raw_files_too():
    sd2 = load_prompts(DATA / "sail_sd2_memorized.jsonl", type_key="overfit_type")
    assert sum(r.type == "TV" for r in sd2) == 215
    assert load_prompts(DATA / "nemo_unmemorized_laion_prompts.csv")[0].prompt.startswith("Photo pour Japanese pagoda")


def test_unknown_public_set():
    with pytest.raises(InputError, match="unknown public prompt set 'nope'"):
        load_public_set("nope")
