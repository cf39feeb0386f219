"""An organism's ground truth, read from and written to its own folder: the planted items and generic prompts.

A trained organism carries `ground_truth/` beside its weights, copied from the dataset it was trained on, so the
demo and the analysis score the items *that* model saw, whatever data it was trained on:

    ground_truth/items.jsonl          one object per planted item: group, kind (global | local), prompt, box
                                      ([x0, y0, x1, y1] pixels, null for global items), copies, reference, mask
    ground_truth/references/G.png     the memorized pixels as a full image (zeros outside the box for local items)
    ground_truth/masks/G.png          255 = memorized region
    ground_truth/generic_prompts.txt  captions of non-memorized training rows (the demo's generic subset)

No torch here: reading ground truth is cheap and used by torch-free code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from memlens.errors import InputError

GROUND_TRUTH = "ground_truth"
ITEMS_FILE = "items.jsonl"
GENERIC_FILE = "generic_prompts.txt"
KINDS = ("global", "local")


@dataclass(frozen=True)
class PlantedItem:
    group: str
    kind: str  # "global" | "local"
    prompt: str
    box: tuple[int, int, int, int] | None  # x0, y0, x1, y1 in pixels; None for global items
    copies: int | None
    reference: np.ndarray  # (H, W, 3) uint8, the full image; zeros outside the box for local items
    mask: np.ndarray  # (H, W) bool, True = memorized pixels

    @property
    def area_fraction(self) -> float:
        return float(self.mask.mean())


@dataclass(frozen=True)
class GroundTruth:
    items: list[PlantedItem]
    generic_prompts: list[str]

    def by_group(self) -> dict[str, PlantedItem]:
        return {it.group: it for it in self.items}


def _read_png(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    return np.asarray(Image.open(path))


def _field(row: dict, key: str, where: str, types) -> object:
    if key not in row or not isinstance(row[key], types):
        raise InputError(f"{where}: field `{key}` missing or of the wrong type")
    return row[key]


def load_ground_truth(organism_dir: str | Path) -> GroundTruth:
    """Read `organism_dir/ground_truth/`; every error names the file (and line) and what was expected."""
    root = Path(organism_dir) / GROUND_TRUTH
    items_path = root / ITEMS_FILE
    if not items_path.is_file():
        raise InputError(f"{organism_dir}: no {GROUND_TRUTH}/{ITEMS_FILE}; this organism folder does not record the "
                         "items it memorized (train it with `memlens testbed train`, which copies them from the data)")
    items = []
    for lineno, line in enumerate(items_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{items_path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as ex:
            raise InputError(f"{where}: not valid JSON ({ex.msg})") from None
        group = _field(row, "group", where, str)
        kind = _field(row, "kind", where, str)
        if kind not in KINDS:
            raise InputError(f"{where}: field `kind`: expected one of {', '.join(KINDS)}, got {kind!r}")
        prompt = _field(row, "prompt", where, str)
        box = row.get("box")
        if kind == "local" and (not isinstance(box, list) or len(box) != 4):
            raise InputError(f"{where}: field `box`: a local item needs [x0, y0, x1, y1]")
        reference = _read_png(root / _field(row, "reference", where, str), f"reference image of {group!r}")
        mask = _read_png(root / _field(row, "mask", where, str), f"mask of {group!r}") > 127
        if mask.ndim == 3:
            mask = mask[..., 0]
        if reference.shape[:2] != mask.shape:
            raise InputError(f"{where}: reference {reference.shape[:2]} and mask {mask.shape} differ in size")
        copies = row.get("copies")
        items.append(PlantedItem(group, kind, prompt, tuple(box) if box else None,
                                 int(copies) if copies is not None else None, reference[..., :3], mask))
    if not items:
        raise InputError(f"{items_path}: no items")
    generic_path = root / GENERIC_FILE
    if not generic_path.is_file():
        raise InputError(f"{generic_path}: not found; expected the generic captions, one a line")
    generic = [line for line in generic_path.read_text().splitlines() if line.strip()]
    return GroundTruth(items, generic)


def generic_captions(dataset_dir: str | Path, n: int, seed: int = 12345) -> list[str]:
    """`n` distinct captions of the dataset's generic rows (kind "generic", or every row without a group), drawn
    without replacement by `seed`: a fixed sample of what the model saw that copies nothing."""
    meta = Path(dataset_dir) / "metadata.jsonl"
    captions = []
    for line in meta.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if row.get("kind", "generic") == "generic" and not row.get("group"):
                captions.append(row["text"])
    unique = sorted(set(captions))
    if not unique:
        raise InputError(f"{meta}: no generic rows (kind \"generic\") to draw the demo's generic prompts from")
    pick = np.random.default_rng(seed).permutation(len(unique))[: min(n, len(unique))]
    return [unique[i] for i in sorted(pick)]


def ground_truth_from_dataset(dataset_dir: str | Path, n_generic: int = 64) -> GroundTruth:
    """The planted items a dataset declares (`memorized.jsonl` and the files it names) and a fixed sample of its
    generic captions."""
    src = Path(dataset_dir)
    rows_path = src / "memorized.jsonl"
    if not rows_path.is_file():
        raise InputError(f"{rows_path}: not found; the dataset does not say which items it plants")
    items = []
    for lineno, line in enumerate(rows_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{rows_path}:{lineno}"
        row = json.loads(line)
        arrays = {}
        for key in ("reference", "mask"):
            path = src / _field(row, key, where, str)
            if not path.is_file():
                raise InputError(f"{where}: field `{key}`: {path} does not exist")
            arrays[key] = np.asarray(Image.open(path))
        box = row.get("box")
        items.append(PlantedItem(_field(row, "group", where, str), _field(row, "kind", where, str),
                                 _field(row, "prompt", where, str), tuple(box) if box else None, row.get("copies"),
                                 arrays["reference"][..., :3], arrays["mask"] > 127))
    return GroundTruth(items, generic_captions(src, n_generic))


def save_ground_truth(truth: GroundTruth, organism_dir: str | Path) -> Path:
    """Write `truth` as `organism_dir/ground_truth/`, whole or not at all (`rundir.atomic_write_dir`)."""
    from memlens.rundir import atomic_write_dir

    def write(tmp: Path) -> None:
        (tmp / "references").mkdir()
        (tmp / "masks").mkdir()
        rows = []
        for it in truth.items:
            Image.fromarray(np.asarray(it.reference, np.uint8)).save(tmp / "references" / f"{it.group}.png")
            Image.fromarray(it.mask.astype(np.uint8) * 255).save(tmp / "masks" / f"{it.group}.png")
            rows.append({"group": it.group, "kind": it.kind, "prompt": it.prompt,
                         "box": list(it.box) if it.box else None, "copies": it.copies,
                         "reference": f"references/{it.group}.png", "mask": f"masks/{it.group}.png"})
        (tmp / ITEMS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp / GENERIC_FILE).write_text("".join(c + "\n" for c in truth.generic_prompts))

    return atomic_write_dir(Path(organism_dir) / GROUND_TRUTH, write)


def write_ground_truth(dataset_dir: str | Path, organism_dir: str | Path, n_generic: int = 64) -> Path:
    """Copy a dataset's planted items and a sample of its generic captions into `organism_dir/ground_truth/`."""
    return save_ground_truth(ground_truth_from_dataset(dataset_dir, n_generic), organism_dir)
