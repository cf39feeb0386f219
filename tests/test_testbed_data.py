"""The organism's synthetic dataset: deterministic, masks exact, memorized vocabulary disjoint from generic."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from memlens.errors import InputError
from memlens.testbed.data import COPIES_V2, ITEM_SETS, ITEMS, ITEMS_V2, item_content, make_dataset, memorized_items


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module", params=sorted(ITEM_SETS))
def item_set_name(request):
    return request.param


@pytest.fixture(scope="module")
def small(tmp_path_factory, item_set_name):
    return make_dataset(tmp_path_factory.mktemp("d") / "a", seed=3, n_generic=40, copies=4, items=item_set_name)


@pytest.fixture(scope="module")
def items(item_set_name):
    return ITEM_SETS[item_set_name]


def _rows(root):
    return [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]


def test_deterministic(small, tmp_path, item_set_name):
    again = make_dataset(tmp_path / "b", seed=3, n_generic=40, copies=4, items=item_set_name)
    assert _digest(small) == _digest(again)
    other = make_dataset(tmp_path / "c", seed=4, n_generic=40, copies=4, items=item_set_name)
    assert _digest(small) != _digest(other)


def test_layout_and_counts(small, items):
    rows = _rows(small)
    kinds = [r["kind"] for r in rows]
    assert kinds.count("generic") == 40
    assert kinds.count("global") == 4 * sum(it.kind == "global" for it in items)
    assert kinds.count("local") == 4 * sum(it.kind == "local" for it in items)
    for r in rows:
        assert (small / r["file_name"]).is_file() and r["text"]
        assert ("mask" in r) == (r["kind"] == "local")
    mem = [json.loads(line) for line in (small / "memorized.jsonl").read_text().splitlines()]
    assert [m["group"] for m in mem] == [it.group for it in items]
    for m in mem:
        assert (small / m["reference"]).is_file() and (small / m["mask"]).is_file()


def test_masks_and_content_exact(small, items):
    items = {it.group: it for it in items}
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


def test_local_backgrounds_vary(small, items):
    rows = [r for r in _rows(small) if r["group"] == items[-1].group]
    imgs = [np.asarray(Image.open(small / r["file_name"])) for r in rows]
    assert len({im.tobytes() for im in imgs}) == len(imgs)


def test_memorized_vocabulary_is_disjoint(small, items):
    generic_words = {w for r in _rows(small) if r["kind"] == "generic" for w in r["text"].split()}
    seen = set()
    for it in items:
        words = set(it.prompt.split())
        assert not words & generic_words and not words & seen
        seen |= words


def test_memorized_items_api(item_set_name, items):
    listed = memorized_items(item_set_name)
    assert [it["group"] for it in listed] == [it.group for it in items]
    for it in listed:
        assert it["reference"].shape == it["mask"].shape + (3,)
        if it["kind"] == "global":
            assert it["mask"].all()
        else:
            assert 0 < it["mask"].mean() < 1


def test_refuses_non_empty_dir(small):
    with pytest.raises(InputError, match="not empty"):
        make_dataset(small, seed=3, n_generic=1, copies=1)


def test_copies_of_overrides_one_group(small, tmp_path, item_set_name, items):
    from collections import Counter

    out = make_dataset(tmp_path / "w", seed=3, n_generic=40, copies=4, copies_of={"colorwheel": 9},
                       items=item_set_name)
    per_group = Counter(r["group"] for r in _rows(out) if r["kind"] != "generic")
    assert per_group == {it.group: 9 if it.group == "colorwheel" else 4 for it in items}
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
        make_dataset(tmp_path / "y", seed=3, n_generic=2, copies=2, copies_of={"brick": 0}, items="v1")
    with pytest.raises(InputError, match="items: expected one of v1, v2, got 'v3'"):
        make_dataset(tmp_path / "z", seed=3, n_generic=2, copies=2, items="v3")
    assert not any((tmp_path / d).exists() for d in "xyz")


def test_copies_of_cli(tmp_path, capsys):
    from memlens.cli import main

    out = tmp_path / "cli"
    main(["testbed", "make-data", "--out", str(out), "--n-generic", "3", "--copies", "2", "--items", "v1",
          "--copies-of", "rocket=5", "--copies-of", "logo=1"])
    rows = _rows(out)
    assert sum(r["group"] == "rocket" for r in rows) == 5 and sum(r["group"] == "logo" for r in rows) == 1
    with pytest.raises(SystemExit) as exit_info:
        main(["testbed", "make-data", "--out", str(tmp_path / "bad"), "--copies-of", "rocket5"])
    assert exit_info.value.code == 2
    assert "--copies-of 'rocket5': expected GROUP=N" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_v2_grades_size_position_and_copies(tmp_path):
    """v2 plants templates of several sizes (some at most about a tenth of the image), at offsets off the 4-pixel
    attention grid, with two different copy counts; its defaults write exactly COPIES_V2 rows per item."""
    local = [it for it in ITEMS_V2 if it.kind == "local"]
    sides = sorted({it.box[2] - it.box[0] for it in local})
    assert len(sides) >= 3 and min(sides) <= 10
    masks = {it["group"]: it["mask"] for it in memorized_items("v2")}
    small = [it for it in local if masks[it.group].mean() <= 0.1]
    assert len(small) >= 2
    assert any(it.box[0] % 4 or it.box[1] % 4 for it in local)
    assert len({COPIES_V2[it.group] for it in local}) >= 2
    for it in local:  # content has the box's size, the mask is the box
        x0, y0, x1, y1 = it.box
        assert item_content(it).shape == (y1 - y0, x1 - x0, 3)
        assert masks[it.group].sum() == (x1 - x0) * (y1 - y0)
    from collections import Counter

    out = make_dataset(tmp_path / "v2", seed=1, n_generic=5, copies_of={"checker": 3, "astronaut": 2})
    per_group = Counter(r["group"] for r in _rows(out) if r["kind"] != "generic")
    assert per_group == {**COPIES_V2, "checker": 3, "astronaut": 2}
