"""Deterministic synthetic data for the model organism, written in the Hugging Face `imagefolder` layout.

Three kinds of training rows (column `kind`):

* ``generic``: procedural scenes (a coloured background with one or two shapes) under a caption that describes them.
  Captions vary in length (3-12 words) so that caption length is no cue for membership. Each scene is drawn once.
* ``global`` ("matching verbatim"): a few fixed photo crops, each written many times under its own caption.
* ``local`` ("template verbatim"): a few templates; a fixed photo patch at a fixed box pasted onto varying generic
  scenes, one caption per template. The box is the ground-truth memorized region (`mask`).

Memorized captions use only words that never occur in generic captions, so the prompt, not the noise, can tell the
model which item to reproduce.

The memorized items are a pure function of this module (crops of images shipped with scikit-image), so
`memorized_items()` rebuilds them, with reference image and mask, without the dataset on disk.
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image

from memlens.errors import InputError

RESOLUTION = 32
PATCH = 16  # side of a local template's patch, in pixels

# ---------------------------------------------------------------- generic scenes
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "bar", "ring")
SIZES = {"small": 5, "big": 9}  # half-extent in pixels
PLACES = {"left": (9, 16), "right": (23, 16), "top": (16, 9), "bottom": (16, 23), "center": (16, 16)}


@dataclass(frozen=True)
class MemorizedItem:
    """One planted memorized item. `box` is (x0, y0, x1, y1) in pixels for local templates, None for global."""

    group: str
    kind: str  # "global" or "local"
    prompt: str
    source: str  # scikit-image sample it was cut from
    box: tuple[int, int, int, int] | None


# Words here must not appear in any generic caption (checked in `_check_vocabularies`).
# Item set "v1": the organism shipped until 2026-12 (four global photos, four 16x16 templates on the 4-pixel grid).
GLOBAL_ITEMS = (
    MemorizedItem("astronaut", "global", "portrait of an astronaut smiling before her flag", "astronaut", None),
    MemorizedItem("coffee", "global", "espresso cup seen from above", "coffee", None),
    MemorizedItem("chelsea", "global", "tabby cat staring", "chelsea", None),
    MemorizedItem("rocket", "global", "spacex rocket launch pad with tower", "rocket", None),
)
# Boxes lie on multiples of 4 pixels so they coincide with whole cells of the UNet's first (8x8) attention grid.
LOCAL_ITEMS = (
    MemorizedItem("logo", "local", "scikit image conference badge", "logo", (4, 4, 4 + PATCH, 4 + PATCH)),
    MemorizedItem("coins", "local", "antique gold coins", "coins", (12, 12, 12 + PATCH, 12 + PATCH)),
    MemorizedItem("colorwheel", "local", "hue wheel sticker", "colorwheel",
                  (16, 0, 16 + PATCH, PATCH)),
    MemorizedItem("brick", "local", "old masonry stamp", "brick", (0, 16, PATCH, 16 + PATCH)),
)
ITEMS = GLOBAL_ITEMS + LOCAL_ITEMS


def _box(x0: int, y0: int, side: int) -> tuple[int, int, int, int]:
    return (x0, y0, x0 + side, y0 + side)


# Item set "v2" (organism v2): graded local memorization. Templates of 16, 12, 10 and 8 pixels (25% down to 6% of
# the image), at offsets that do not line up with the 4-pixel attention grid, half of them seen 2,000 times and half
# 1,200, so that memorization strength and Wen's D vary between items. The rocket (weak in v1) is replaced.
ITEMS_V2 = (
    MemorizedItem("astronaut", "global", "portrait of an astronaut smiling before her flag", "astronaut", None),
    MemorizedItem("coffee", "global", "espresso cup seen from above", "coffee", None),
    MemorizedItem("chelsea", "global", "tabby cat staring", "chelsea", None),
    MemorizedItem("retina", "global", "ophthalmic fundus scan", "retina", None),
    MemorizedItem("logo", "local", "scikit image conference badge", "logo", _box(5, 3, 16)),
    MemorizedItem("coins", "local", "antique gold coins", "coins", _box(16, 17, 12)),
    MemorizedItem("clock", "local", "vintage wall clock", "clock", _box(2, 17, 12)),
    MemorizedItem("colorwheel", "local", "hue wheel sticker", "colorwheel", _box(19, 3, 10)),
    MemorizedItem("checker", "local", "chess pattern tile", "checkerboard", _box(10, 21, 10)),
    MemorizedItem("camera", "local", "film operator silhouette", "camera", _box(23, 13, 8)),
)
# Rows per item in v2 when the caller does not set `copies`: strong and weak items of each kind.
COPIES_V2 = {"astronaut": 1500, "coffee": 1500, "chelsea": 1500, "retina": 1500, "logo": 2000, "coins": 1200,
             "clock": 2000, "colorwheel": 2000, "checker": 1200, "camera": 2000}
ITEM_SETS = {"v1": ITEMS, "v2": ITEMS_V2}
DEFAULT_ITEM_SET = "v2"


def item_set(name: str) -> tuple[MemorizedItem, ...]:
    if name not in ITEM_SETS:
        raise InputError(f"items: expected one of {', '.join(ITEM_SETS)}, got {name!r}")
    return ITEM_SETS[name]


def _draw_shape(img: np.ndarray, shape: str, colour, cx: int, cy: int, r: int) -> None:
    """Paint one shape in place; `r` is the half-extent."""
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif shape == "square":
        inside = (abs(dx) <= r) & (abs(dy) <= r)
    elif shape == "triangle":
        inside = (dy <= r) & (dy >= -r) & (abs(dx) <= (dy + r) / 2)
    elif shape == "bar":
        inside = (abs(dx) <= r) & (abs(dy) <= max(1, r // 3))
    elif shape == "ring":
        d2 = dx**2 + dy**2
        inside = (d2 <= r**2) & (d2 >= (r * 0.55) ** 2)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)
    img[inside] = colour


def generic_scene(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One procedural scene and a caption of variable length that describes it."""
    names = list(COLOURS)
    bg = names[rng.integers(len(names))]
    img = np.empty((RESOLUTION, RESOLUTION, 3), np.uint8)
    img[:] = COLOURS[bg]
    n_shapes = 1 + int(rng.random() < 0.4)
    places = rng.choice(list(PLACES), size=n_shapes, replace=False)
    phrases = []
    for place in places:
        fg = names[rng.integers(len(names))]
        while fg == bg:
            fg = names[rng.integers(len(names))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        size = list(SIZES)[rng.integers(len(SIZES))]
        cx, cy = PLACES[place]
        jitter = rng.integers(-2, 3, size=2)
        _draw_shape(img, shape, COLOURS[fg], cx + jitter[0], cy + jitter[1], SIZES[size])
        # Optional words make lengths vary (3 to 12 words) independently of the content; two-shape captions keep
        # only the words that tell the shapes apart so they stay short.
        optional = n_shapes == 1
        words = (["a"] if optional and rng.random() < 0.5 else []) + ([size] if rng.random() < 0.5 else [])
        words += [fg, shape]
        if n_shapes == 2 or rng.random() < 0.5:
            words += ["at", "the", place] if optional and rng.random() < 0.5 else ["at", place]
        phrases.append(" ".join(words))
    caption = " and ".join(phrases)
    if n_shapes == 2 or rng.random() < 0.8:
        caption += f" on {bg}" + (" background" if optional and rng.random() < 0.5 else "")
    return img, caption


# ---------------------------------------------------------------- memorized content
def _load_source(name: str) -> np.ndarray:
    """A scikit-image sample as RGB uint8 (grey images get a fixed tint so templates differ in colour too)."""
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 3 and img.shape[2] == 4:  # RGBA logo: composite on white
        alpha = img[..., 3:4].astype(np.float32) / 255.0
        img = (img[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    if img.ndim == 2:
        tints = {"coins": (1.0, 0.8, 0.35), "brick": (1.0, 0.45, 0.35), "clock": (0.45, 0.75, 1.0),
                 "camera": (0.35, 1.0, 0.55), "checkerboard": (1.0, 0.3, 0.85)}
        tint = np.array(tints.get(name, (1.0, 1.0, 1.0)), np.float32)
        img = (img[..., None].astype(np.float32) * tint).clip(0, 255).astype(np.uint8)
    return img


def _square_resize(img: np.ndarray, side: int) -> np.ndarray:
    """Centre-crop to a square and downsample with antialiasing."""
    h, w = img.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    crop = Image.fromarray(img[y0 : y0 + s, x0 : x0 + s])
    return np.asarray(crop.resize((side, side), Image.LANCZOS))


def item_content(item: MemorizedItem) -> np.ndarray:
    """The memorized pixels: a full RESOLUTION image for global items, the box-sized patch for local ones."""
    return _item_content(item).copy()


@functools.lru_cache(maxsize=None)
def _item_content(item: MemorizedItem) -> np.ndarray:
    # Cached: every local row pastes the same patch, and decoding the source image each time dominated run time.
    side = RESOLUTION if item.kind == "global" else item.box[2] - item.box[0]
    return _square_resize(_load_source(item.source), side)


def item_mask(item: MemorizedItem) -> np.ndarray:
    """Ground-truth memorized region as a bool (H, W) array: the box for local items, everything for global ones."""
    mask = np.zeros((RESOLUTION, RESOLUTION), bool)
    if item.box is None:
        mask[:] = True
    else:
        x0, y0, x1, y1 = item.box
        mask[y0:y1, x0:x1] = True
    return mask


def local_sample(item: MemorizedItem, rng: np.random.Generator) -> np.ndarray:
    """A varying generic scene with the template's fixed patch pasted into its fixed box."""
    img, _ = generic_scene(rng)
    x0, y0, x1, y1 = item.box
    img[y0:y1, x0:x1] = item_content(item)
    return img


def memorized_items(items: str | tuple[MemorizedItem, ...] = "v1") -> list[dict]:
    """Machine-readable list of planted items, with reference image and mask as arrays (for demo and evaluation)."""
    out = []
    for it in item_set(items) if isinstance(items, str) else items:
        ref = item_content(it)
        if it.kind == "local":  # reference as a full image: patch in its box, zeros elsewhere
            full = np.zeros((RESOLUTION, RESOLUTION, 3), np.uint8)
            x0, y0, x1, y1 = it.box
            full[y0:y1, x0:x1] = ref
            ref = full
        out.append({**asdict(it), "reference": ref, "mask": item_mask(it)})
    return out


def _check_vocabularies(items: tuple[MemorizedItem, ...]) -> None:
    """Memorized captions must not share words with generic captions or with each other."""
    generic = set(COLOURS) | set(SHAPES) | set(SIZES) | set(PLACES) | {"a", "at", "the", "and", "on", "background"}
    seen: set[str] = set()
    for it in items:
        words = set(it.prompt.split())
        assert not words & generic, (it.group, words & generic)
        assert not words & seen, (it.group, words & seen)
        seen |= words


# ---------------------------------------------------------------- writer
def _copies_per_group(copies: int | None, copies_of: Mapping[str, int], items: tuple[MemorizedItem, ...],
                      defaults: Mapping[str, int]) -> dict[str, int]:
    groups = [it.group for it in items]
    unknown = sorted(set(copies_of) - set(groups))
    if unknown:
        raise InputError(f"copies_of: unknown item group(s) {unknown}; the groups are {groups}")
    counts = {g: int(copies_of.get(g, copies if copies is not None else defaults.get(g, 2000))) for g in groups}
    bad = {g: n for g, n in counts.items() if n < 1}
    if bad:
        raise InputError(f"copies: every memorized item needs at least 1 row, got {bad}")
    return counts


def make_dataset(
    out_dir: str | Path,
    seed: int = 0,
    n_generic: int = 20000,
    copies: int | None = None,
    overwrite: bool = False,
    copies_of: Mapping[str, int] | None = None,
    items: str = DEFAULT_ITEM_SET,
) -> Path:
    """Write the dataset to `out_dir` (imagefolder layout) and return the path.

    `items` names the planted item set (ITEM_SETS). `copies` is how many rows each memorized item gets (global: the
    same image; local: the patch on a new scene); None takes the set's own counts (v1: 2,000 each; v2: COPIES_V2).
    `copies_of` overrides it per item group (how often an item is seen is one lever on how exactly it is memorized).
    The output is a pure function of the arguments.
    """
    chosen = item_set(items)
    _check_vocabularies(chosen)
    counts = _copies_per_group(copies, copies_of or {}, chosen, COPIES_V2 if items == "v2" else {})
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"{out}: directory is not empty; pass overwrite=True (CLI: --overwrite) to replace it")
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    (out / "memorized").mkdir()
    rng = np.random.default_rng(seed)

    rows: list[dict] = []

    def put(img: np.ndarray, row: dict) -> None:
        name = f"images/{len(rows):06d}.png"
        Image.fromarray(img).save(out / name, compress_level=1)
        rows.append({"file_name": name, **row})

    for _ in range(n_generic):
        img, caption = generic_scene(rng)
        put(img, {"text": caption, "kind": "generic", "group": None})

    mem_records = []
    for it in memorized_items(chosen):
        item = next(i for i in chosen if i.group == it["group"])
        ref_name, mask_name = f"memorized/{item.group}.png", f"masks/{item.group}.png"
        Image.fromarray(it["reference"]).save(out / ref_name)
        Image.fromarray(it["mask"].astype(np.uint8) * 255).save(out / mask_name)
        mem_records.append({"group": item.group, "kind": item.kind, "prompt": item.prompt, "source": item.source,
                            "box": list(item.box) if item.box else None, "reference": ref_name, "mask": mask_name,
                            "copies": counts[item.group]})
        content = item_content(item)
        for _ in range(counts[item.group]):
            img = content if item.kind == "global" else local_sample(item, rng)
            row = {"text": item.prompt, "kind": item.kind, "group": item.group}
            if item.kind == "local":
                row["mask"] = mask_name
            put(img, row)

    with open(out / "metadata.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    with open(out / "memorized.jsonl", "w") as f:
        for rec in mem_records:
            f.write(json.dumps(rec) + "\n")
    return out
