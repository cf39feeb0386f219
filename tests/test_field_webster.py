"""Webster / mem-curv-diff ground truth from tiny local fixtures (dead masks, dead URLs, malformed rows) and from the
public prompt files in ../shared/data when they are there."""

from __future__ import annotations

import ast
import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from memlens.errors import InputError
from memlens.field import webster as wb

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def _mask(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((8, 8)) > 0.5).astype(np.uint8) * 255


def _templates(root: Path) -> Path:
    """Three template rows as Webster's table lays them out; row 1's mask file is gone."""
    rows = []
    for name, alive in (("a", True), ("b", False), ("c", True)):
        img, mask = f"templates/imgs/{name}_img.png", f"templates/mask/{name}_mask.png"
        _png(root / img, np.full((8, 8, 3), 100))
        if alive:
            _png(root / mask, _mask(ord(name)))
        rows.append({"img_file": img, "mask_file": mask, "url": f"http://t/{name}"})
    path = root / "templates" / "metadata.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


LABELS = [
    {"caption": "tv pairs", "overfit_type": "TV", "index": 11, "gen_seeds": [[3, 0], [5, 2], [6, -1]]},
    {"caption": "tv dead template", "overfit_type": "TV", "gen_seeds": [[1, 1]]},
    {"caption": "exact copy", "overfit_type": "MV", "index": 13, "url": "http://dead/x.jpg"},
    {"caption": "nothing", "overfit_type": "N"},
    {"caption": "tv webster", "overfit_type": "tv", "gen_seeds": [0, 4], "template_indices": [[2]]},
    {"caption": "tv by url", "overfit_type": "TV", "retrieved_urls": ["http://t/a", "http://elsewhere"]},
    {"caption": "retrieved copy", "overfit_type": "RV"},
]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_module_imports_no_torch():
    tree = ast.parse(Path(wb.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "torch" not in names


def test_templates_table_skips_dead_masks(tmp_path):
    report = wb.WebsterReport("t")
    table = wb.load_templates(_templates(tmp_path), report)
    assert sorted(table) == [0, 2]
    assert report.dead == Counter({"template_mask_missing": 1})
    assert table[2].mask == tmp_path / "templates/mask/c_mask.png" and table[2].url == "http://t/c"
    assert wb.load_templates(tmp_path / "templates").keys() == table.keys()  # the folder works too


def test_labels_link_templates_by_pairs_indices_and_urls(tmp_path):
    meta = _templates(tmp_path)
    items, report = wb.load_webster(_jsonl(tmp_path / "labels.jsonl", LABELS), templates=meta)
    by = {i.prompt: i for i in items}
    assert "tv dead template" not in by  # its only template has no mask: counted, skipped
    assert report.n_rows == 7 and report.n_items == 6
    dead = {"template_mask_missing": 1, "template_refs_dead": 1, "template_prompt_without_mask": 1}
    assert report.dead == Counter(dead)
    assert report.kinds == Counter({"template": 3, "exact": 1, "non-memorized": 1, "retrieved": 1})
    tv = by["tv pairs"]
    assert [t.row for t in tv.templates] == [0, 2]
    assert tv.seeds == [3, 5, 6] and tv.seed_template == {3: 0, 5: 2}
    assert tv.index == 11 and tv.label == 1 and tv.raw_type == "TV"
    assert [t.row for t in by["tv webster"].templates] == [2] and by["tv webster"].seeds == [0, 4]
    assert [t.row for t in by["tv by url"].templates] == [0]
    assert by["nothing"].label == 0 and by["exact copy"].url == "http://dead/x.jpg"
    assert [i.row for i in items] == [0, 2, 3, 4, 5, 6]  # rows keep their file positions


def test_without_templates_table_nothing_is_skipped(tmp_path):
    items, report = wb.load_webster(_jsonl(tmp_path / "labels.jsonl", LABELS))
    assert report.n_items == 7 and not report.dead
    assert all(not i.templates for i in items)
    assert any("no templates table" in n for n in report.notes)


def test_parquet_labels_in_webster_layout(tmp_path):
    meta = _templates(tmp_path)
    rows = [
        {"caption": "p0", "overfit_type": "TV", "gen_seeds": [1, 2], "template_indices": [[0, 2]],
         "retrieved_urls": []},
        {"caption": "p1", "overfit_type": "N", "gen_seeds": [], "template_indices": [[]], "retrieved_urls": []},
    ]
    path = tmp_path / "gt.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    items, report = wb.load_webster(path, templates=meta)
    got = [(i.kind, [t.row for t in i.templates], i.seeds) for i in items]
    assert got == [("template", [0, 2], [1, 2]), ("non-memorized", [], [])]


def test_references_dead_urls_are_counted(tmp_path):
    refs = tmp_path / "refs"
    _png(refs / "dl_002.png", np.full((4, 4, 3), 200))  # row 2: a real image
    _png(refs / "dl_006.png", np.zeros((4, 4, 3)))  # row 6: the black placeholder of a dead URL
    _png(refs / "11" / "a.png", np.full((4, 4, 3), 50))  # row 0 by its LAION index, Wen's layout
    (refs / "dl_004.jpg").write_bytes(b"\xff\xd8 truncated download")  # row 4: not an image
    items, report = wb.load_webster(_jsonl(tmp_path / "labels.jsonl", LABELS), references=refs)
    by = {i.prompt: i for i in items}
    assert by["exact copy"].references == [refs / "dl_002.png"]
    assert by["tv pairs"].references == [refs / "11" / "a.png"]
    assert by["retrieved copy"].references == []
    # rows 1 and 5 have no file at all, row 4 a broken one, row 6 only a placeholder; row 3 (non-memorized) is not
    # looked up
    assert report.dead == Counter({"reference_missing": 2, "reference_unreadable": 1, "reference_placeholder": 1})
    assert by["tv webster"].references == []
    assert wb.is_placeholder(refs / "dl_006.png") and not wb.is_placeholder(refs / "dl_002.png")


def test_ground_truth_masks_follow_mem_curv_diff(tmp_path):
    meta = _templates(tmp_path)
    items, _ = wb.load_webster(_jsonl(tmp_path / "labels.jsonl", LABELS), templates=meta)
    by = {i.prompt: i for i in items}
    a, c = _mask(ord("a")) > 127, _mask(ord("c")) > 127
    assert np.array_equal(wb.ground_truth_mask(by["tv pairs"], (8, 8), seed=3), a)
    assert np.array_equal(wb.ground_truth_mask(by["tv pairs"], (8, 8), seed=5), c)
    assert np.array_equal(wb.ground_truth_mask(by["tv pairs"], (8, 8)), a | c)  # seed unknown: the union
    assert wb.ground_truth_mask(by["exact copy"], (8, 8)).all()
    assert wb.ground_truth_mask(by["retrieved copy"], (8, 8)).all()
    assert not wb.ground_truth_mask(by["nothing"], (8, 8)).any()
    with pytest.raises(InputError, match="b_mask.png: cannot read the mask"):
        wb.read_mask(tmp_path / "templates/mask/b_mask.png")
    big = wb.read_mask(tmp_path / "templates/mask/a_mask.png", (16, 16))
    assert np.array_equal(big, np.kron(a, np.ones((2, 2), dtype=bool)))  # nearest-neighbour upsampling


@pytest.mark.parametrize(
    "rows, message",
    [
        ([LABELS[3], "{not json"], r"labels.jsonl row 2 \(line 2\): malformed JSON"),
        ([LABELS[3], {"caption": "x", "overfit_type": "XV"}],
         r"row 2: column 'overfit_type'.*unknown memorization type 'XV'"),
        ([{"caption": "x", "overfit_type": "TV", "gen_seeds": "abc"}], r"row 1: column 'gen_seeds' must be a list"),
        ([{"caption": "x", "overfit_type": "TV", "gen_seeds": [[1, 2, 3]]}], r"row 1: column 'gen_seeds' entries"),
        ([{"caption": "x", "overfit_type": "TV", "gen_seeds": [1.5]}], r"row 1: column 'gen_seeds' must hold integers"),
        ([{"caption": "x", "overfit_type": "TV", "template_indices": [["a"]]}], r"row 1: column 'template_indices'"),
        ([{"text": "", "overfit_type": "N"}], r"row 1: column 'text' must be a non-empty caption"),
        ([{"url": "u", "overfit_type": "N"}], r"row 1: no caption column"),
        ([{"caption": "x"}], r"row 1: no memorization type"),
    ],
)
def test_malformed_labels_name_file_row_and_column(tmp_path, rows, message):
    with pytest.raises(InputError, match=message):
        wb.load_webster(_jsonl(tmp_path / "labels.jsonl", rows), templates=_templates(tmp_path))


def test_malformed_templates_table(tmp_path):
    path = tmp_path / "templates" / "metadata.parquet"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pylist([{"img_file": "a.png", "url": "u"}]), path)
    with pytest.raises(InputError, match=r"metadata.parquet: missing column\(s\) \['mask_file'\]"):
        wb.load_templates(path)
    pq.write_table(pa.Table.from_pylist([{"img_file": "a.png", "mask_file": 3, "url": "u"}]), path)
    with pytest.raises(InputError, match=r"metadata.parquet row 1: column 'mask_file' must be a file path"):
        wb.load_templates(path)
    with pytest.raises(InputError, match="templates table not found"):
        wb.load_templates(tmp_path / "nowhere")


def test_text_prompts_need_a_default_kind(tmp_path):
    path = tmp_path / "nmem.txt"
    path.write_text("a cat\n\na dog\n")
    with pytest.raises(InputError, match="pass default_kind"):
        wb.load_webster(path)
    items, report = wb.load_webster(path, default_kind="non-memorized")
    assert [(i.prompt, i.label, i.row) for i in items] == [("a cat", 0, 0), ("a dog", 0, 1)]


def test_kind_aliases():
    assert [wb.canonical_kind(v) for v in ("TV", "tm", "MV", "VM", "RV", "N", "MVRV", "Non-Memorized")] == [
        "template", "template", "exact", "exact", "retrieved", "non-memorized", "exact-or-retrieved", "non-memorized"]
    with pytest.raises(InputError, match="unknown memorization type"):
        wb.canonical_kind("copy")


# --- the public files as shipped in ../shared/data ------------------------------------------------------------------


def _shared(name: str) -> Path:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path


def test_shared_sail_sd2_types():
    path = _shared("sail_sd2_memorized.jsonl")
    raw = Counter(json.loads(line)["overfit_type"] for line in path.read_text().splitlines() if line.strip())
    items, report = wb.load_webster(path)
    assert report.n_items == sum(raw.values())
    assert report.kinds == Counter({wb.canonical_kind(k): n for k, n in raw.items()})
    assert all(isinstance(i.index, int) for i in items)


def test_shared_nemo_types_and_indices():
    path = _shared("nemo_memorized_laion_prompts.csv")
    with path.open(newline="") as fh:
        raw = list(csv.DictReader(fh, delimiter=";"))
    items, report = wb.load_webster(path)
    assert [i.kind for i in items] == [wb.canonical_kind(r["type"]) for r in raw]
    assert [i.index for i in items] == [int(r["Index"]) for r in raw]
    assert set(report.kinds) == {"template", "exact"}


def test_shared_wen_prompts_have_no_type():
    path = _shared("sdv1_500_memorized.jsonl")
    with pytest.raises(InputError, match="row 1: no memorization type"):
        wb.load_webster(path)
    items, report = wb.load_webster(path, default_kind="template")
    assert report.n_items == report.n_rows and all(i.label == 1 for i in items)


def test_shared_nonmemorized_text():
    path = _shared("sail_nonmemorized_prompts.txt")
    items, report = wb.load_webster(path, default_kind="non-memorized")
    assert report.n_items == sum(1 for line in path.read_text().splitlines() if line.strip())
    assert report.kinds == Counter({"non-memorized": report.n_items})
