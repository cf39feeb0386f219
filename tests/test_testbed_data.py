"""The organism's synthetic dataset: deterministic, masks exact, memorized vocabulary disjoint from generic."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from memlens.errors import InputError
from memlens.testbed.data import ITEMS, item_content, make_dataset, memorized_items


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("d") / "a", seed=3, n_generic=40, copies=4)


def _rows(root):
    return [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]


def test_deterministic(small, tmp_path):
    again = make_dataset(tmp_path / "b", seed=3, n_generic=40, copies=4)
    assert _digest(small) == _digest(again)
    other = make_dataset(tmp_path / "c", seed=4, n_generic=40, copies=4)
    assert _digest(small) != _digest(other)


def test_layout_and_counts(small):
    rows = _rows(small)
    kinds = [r["kind"] for r in rows]
    assert kinds.count("generic") == 40
    assert kinds.count("global") == 4 * sum(it.kind == "global" for it in ITEMS)
    assert kinds.count("local") == 4 * sum(it.kind == "local" for it in ITEMS)
    for r in rows:
        assert (small / r["file_name"]).is_file() and r["text"]
        assert ("mask" in r) == (r["kind"] == "local")
    mem = [json.loads(line) for line in (small / "memorized.jsonl").read_text().splitlines()]
    assert [m["group"] for m in mem] == [it.group for it in ITEMS]
    for m in mem:
        assert (small / m["reference"]).is_file() and (small / m["mask"]).is_file()


def test_masks_and_content_exact(small):
    items = {it.group: it for it in ITEMS}
    for r in _rows(small):
        if r["kind"] == "generic":
            continue
        it = items[r["group"]]
        img = np.asarray(Image.open(small / r["file_name"]))
        assert r["text"] == it.prompt
        if r["kind"] == "global":
            assert np.array_equal(img, item_content(it))
            continue
        mask = np.asarray(Image.open(small / r["mask"])) > 0
        x0, y0, x1, y1 = it.box
        expected = np.zeros_like(mask)
        expected[y0:y1, x0:x1] = True
        assert np.array_equal(mask, expected)
        assert np.array_equal(img[y0:y1, x0:x1], item_content(it))


def test_local_backgrounds_vary(small):
    rows = [r for r in _rows(small) if r["group"] == ITEMS[-1].group]
    imgs = [np.asarray(Image.open(small / r["file_name"])) for r in rows]
    assert len({im.tobytes() for im in imgs}) == len(imgs)


def test_memorized_vocabulary_is_disjoint(small):
    generic_words = {w for r in _rows(small) if r["kind"] == "generic" for w in r["text"].split()}
    seen = set()
    for it in ITEMS:
        words = set(it.prompt.split())
        assert not words & generic_words and not words & seen
        seen |= words


def test_memorized_items_api():
    items = memorized_items()
    assert len(items) == len(ITEMS)
    for it in items:
        assert it["reference"].shape == it["mask"].shape + (3,)
        if it["kind"] == "global":
            assert it["mask"].all()
        else:
            assert 0 < it["mask"].mean() < 1


def test_refuses_non_empty_dir(small):
    with pytest.raises(InputError, match="not empty"):
        make_dataset(small, seed=3, n_generic=1, copies=1)


def test_copies_of_overrides_one_group(small, tmp_path):
    from collections import Counter

    out = make_dataset(tmp_path / "w", seed=3, n_generic=40, copies=4, copies_of={"colorwheel": 9})
    per_group = Counter(r["group"] for r in _rows(out) if r["kind"] != "generic")
    assert per_group == {it.group: 9 if it.group == "colorwheel" else 4 for it in ITEMS}
    mem = {m["group"]: m["copies"] for m in map(json.loads, (out / "memorized.jsonl").read_text().splitlines())}
    assert mem == dict(per_group)
    # Rows written before the overridden item are those of the plain dataset, byte for byte.
    first_changed = next(i for i, r in enumerate(_rows(out)) if r["group"] == "colorwheel")
    for r in _rows(small)[:first_changed]:
        assert (out / r["file_name"]).read_bytes() == (small / r["file_name"]).read_bytes()


def test_copies_of_errors_name_the_field(tmp_path):
    with pytest.raises(InputError, match=r"unknown item group\(s\) \['wheel'\].*colorwheel"):
        make_dataset(tmp_path / "x", seed=3, n_generic=2, copies=2, copies_of={"wheel": 3})
    with pytest.raises(InputError, match="at least 1 row.*'brick': 0"):
        make_dataset(tmp_path / "y", seed=3, n_generic=2, copies=2, copies_of={"brick": 0})
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_copies_of_cli(tmp_path, capsys):
    from memlens.cli import main

    out = tmp_path / "cli"
    main(["testbed", "make-data", "--out", str(out), "--n-generic", "3", "--copies", "2",
          "--copies-of", "rocket=5", "--copies-of", "logo=1"])
    rows = _rows(out)
    assert sum(r["group"] == "rocket" for r in rows) == 5 and sum(r["group"] == "logo" for r in rows) == 1
    with pytest.raises(SystemExit) as exit_info:
        main(["testbed", "make-data", "--out", str(tmp_path / "bad"), "--copies-of", "rocket5"])
    assert exit_info.value.code == 2
    assert "--copies-of 'rocket5': expected GROUP=N" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
