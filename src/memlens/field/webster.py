"""Webster / mem-curv-diff ground truth from local files: template masks and per-prompt memorization types.

Two inputs, both local (nothing is downloaded):
- the templates table, `templates/metadata.parquet` of the `fraisdufour/templates-verbs` dataset, columns `img_file`,
  `mask_file`, `url`; the paths in it are relative to the folder holding `templates/` (Webster's
  `gather_groundtruth_labels.py` opens them from there);
- a per-prompt label file (.parquet, .jsonl, .csv or .txt): a caption column (`caption`, `prompt` or `text`), a type
  column (`overfit_type`, else `type`), and optionally `index`, `url`, `gen_seeds`, `template_indices`,
  `retrieved_urls`. Types, case-insensitive: Webster's TV / MV / RV / N and NeMo's TM / VM, or the words
  (`KIND_ALIASES`). A .txt file (one prompt a line) needs `default_kind`.

Which templates a template prompt copies, in order of preference: mem-curv-diff's `gen_seeds` pairs
`[seed, template_row]` (one template per generating seed; -1 = none), Webster's `template_indices` (rows of the
templates table), and Webster's `retrieved_urls` matched against the table's `url`.

Dead entries are counted in the returned `WebsterReport` and skipped, never fatal: a template row whose mask or image
file is missing, a template prompt none of whose templates is alive (when a templates table is given), a reference
image that is missing, unreadable or a black placeholder (what mem-curv-diff's downloader left for dead URLs).
Malformed input is an `InputError` naming the file, the row and the column.

Ground truth as mem-curv-diff evaluates it (`ground_truth_mask`): a template copy -> its template's mask, an exact or
retrieved copy -> all ones (the whole image), a non-memorized prompt -> all zeros; masks are read as grayscale,
resized NEAREST, and a pixel counts when its value / 255 > 0.5.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from memlens.errors import InputError
from memlens.prompts import has_value

__all__ = [
    "KINDS",
    "KIND_ALIASES",
    "canonical_kind",
    "Template",
    "WebsterItem",
    "WebsterReport",
    "load_templates",
    "load_webster",
    "read_mask",
    "is_placeholder",
    "ground_truth_mask",
]

KINDS = ("template", "exact", "retrieved", "exact-or-retrieved", "non-memorized")
KIND_ALIASES = {
    "template": ("tv", "tm", "template", "template verbatim"),
    "exact": ("mv", "vm", "exact", "matching verbatim", "verbatim"),
    "retrieved": ("rv", "retrieved", "retrieved verbatim"),
    "exact-or-retrieved": ("mvrv",),  # mem-curv-diff's merged split
    "non-memorized": ("n", "none", "non-memorized", "nonmemorized", "non_memorized", "nmem", "unmemorized"),
}
_ALIAS = {alias: kind for kind, aliases in KIND_ALIASES.items() for alias in aliases}
_PROMPT_KEYS = ("caption", "prompt", "text")
_TYPE_KEYS = ("overfit_type", "type")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def canonical_kind(value: Any, where: str = "type") -> str:
    """One of `KINDS` for a type value; an unknown value is an `InputError` naming `where`."""
    text = str(value).strip().lower()
    if text not in _ALIAS:
        raise InputError(f"{where}: unknown memorization type {value!r}; expected one of {sorted(_ALIAS)}")
    return _ALIAS[text]


@dataclass(frozen=True)
class Template:
    row: int  # 0-based row of the templates table
    mask: Path
    image: Path | None
    url: str | None


@dataclass
class WebsterItem:
    row: int  # 0-based position in the label file (mem-curv-diff names maps and cached images by it)
    prompt: str
    kind: str  # one of KINDS
    raw_type: str | None
    index: int | str | None = None  # LAION id when the file gives one (Wen's reference folders are named by it)
    url: str | None = None
    seeds: list[int] = field(default_factory=list)  # generating seeds the label file lists
    seed_template: dict[int, int] = field(default_factory=dict)  # seed -> template row (mem-curv-diff pairs)
    templates: list[Template] = field(default_factory=list)  # alive templates this prompt copies
    references: list[Path] = field(default_factory=list)  # alive local copies of the training image(s)

    @property
    def label(self) -> int:
        return 0 if self.kind == "non-memorized" else 1


@dataclass
class WebsterReport:
    source: str
    n_rows: int = 0
    n_items: int = 0
    kinds: Counter = field(default_factory=Counter)  # kinds among the returned items
    dead: Counter = field(default_factory=Counter)  # counted and skipped, by reason
    notes: list[str] = field(default_factory=list)  # the first few dead entries, by name

    def _dead(self, reason: str, note: str) -> None:
        self.dead[reason] += 1
        if len(self.notes) < 20:
            self.notes.append(note)


# --- reading rows --------------------------------------------------------------------------------------------------


def _rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, row) for every data row; `where` reads like "labels.jsonl row 3" (1-based data rows)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError(f"{path}: reading .parquet needs pyarrow (pip install 'memlens[parquet]')") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises many error types for damaged files
            raise InputError(f"{path}: not a readable parquet file ({err})") from None
        for i, row in enumerate(rows, start=1):
            yield f"{path} row {i}", row
        return
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if suffix == ".jsonl":
        n = 0
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            n += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                where = f"{path} row {n} (line {number})"
                raise InputError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path} row {n} (line {number}): expected a JSON object, found {type(row).__name__}")
            yield f"{path} row {n}", row
    elif suffix == ".csv":
        header = text.splitlines()[0] if text else ""
        delimiter = ";" if header.count(";") > header.count(",") else ","  # NeMo's files use ";"
        reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
        for n, row in enumerate(reader, start=1):
            if None in row:
                raise InputError(f"{path} row {n}: more cells than the {len(reader.fieldnames or [])} header columns")
            yield f"{path} row {n}", {k: v for k, v in row.items() if k}
    elif suffix == ".txt":
        n = 0
        for line in text.splitlines():
            if line.strip():
                n += 1
                yield f"{path} row {n}", {"prompt": line.strip()}
    else:
        found = suffix or "(none)"
        raise InputError(f"{path}: unknown label file extension {found!r}; expected .parquet, .jsonl, .csv or .txt")


def _column(row: dict, names: tuple[str, ...]) -> str | None:
    lower = {str(k).lower(): k for k in row}
    return next((lower[n] for n in names if n in lower), None)


def _as_list(value: Any, where: str, column: str) -> list:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    if not has_value(value):
        return []
    if isinstance(value, str):  # CSV cells hold the JSON text of a list
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, list):
            return parsed
    raise InputError(f"{where}: column {column!r} must be a list, found {value!r}")


def _int(value: Any, where: str, column: str) -> int:
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or float(value) != int(value):
        raise InputError(f"{where}: column {column!r} must hold integers, found {value!r}")
    return int(value)


def _seeds(value: Any, where: str) -> tuple[list[int], dict[int, int]]:
    # Webster: a list of seeds. mem-curv-diff: a list of [seed, template_row] pairs (-1 = no template).
    seeds, seed_template = [], {}
    for entry in _as_list(value, where, "gen_seeds"):
        if isinstance(entry, (list, tuple, np.ndarray)):
            entry = list(entry)
            if len(entry) != 2:
                expected = "a seed or a [seed, template_row] pair"
                raise InputError(f"{where}: column 'gen_seeds' entries must be {expected}, found {entry!r}")
            seed, trow = _int(entry[0], where, "gen_seeds"), _int(entry[1], where, "gen_seeds")
            if trow >= 0:
                seed_template[seed] = trow
        else:
            seed = _int(entry, where, "gen_seeds")
        seeds.append(seed)
    return seeds, seed_template


def _template_indices(value: Any, where: str) -> list[int]:
    # Webster writes [[i, j, ...]] (a list around the array of template rows); accept flat lists too.
    out = []
    for entry in _as_list(value, where, "template_indices"):
        items = entry if isinstance(entry, (list, tuple, np.ndarray)) else [entry]
        out.extend(_int(i, where, "template_indices") for i in items)
    return out


def _index(value: Any) -> int | str | None:
    if not has_value(value):
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    text = str(value).strip()
    return int(text) if text.lstrip("-").isdigit() else text


# --- templates -----------------------------------------------------------------------------------------------------


def _resolve(rel: str, metadata: Path) -> Path | None:
    p = Path(rel)
    if p.is_absolute():
        return p if p.is_file() else None
    folder = metadata.parent
    # Webster's paths start at the folder holding templates/; mem-curv-diff falls back to templates/<basename>.
    for candidate in (folder.parent / p, folder / p, folder / p.name):
        if candidate.is_file():
            return candidate
    return None


def load_templates(metadata: str | os.PathLike, report: WebsterReport | None = None) -> dict[int, Template]:
    """Alive templates by table row. Rows whose mask file is missing (or whose image is, when named) are counted in
    `report` and left out; a missing column or a non-text path is an `InputError`."""
    metadata = Path(metadata)
    if metadata.is_dir():
        inside = metadata / "metadata.parquet"
        metadata = inside if inside.is_file() else metadata / "templates" / "metadata.parquet"
    if not metadata.is_file():
        raise InputError(f"{metadata}: templates table not found (expected templates/metadata.parquet)")
    report = report if report is not None else WebsterReport(str(metadata))
    out: dict[int, Template] = {}
    for row_number, (where, row) in enumerate(_rows(metadata)):
        if row_number == 0:
            missing = [c for c in ("img_file", "mask_file", "url") if c not in row]
            if missing:
                raise InputError(f"{metadata}: missing column(s) {missing}; found {sorted(row)}")
        for column in ("img_file", "mask_file"):
            if has_value(row[column]) and not isinstance(row[column], str):
                raise InputError(f"{where}: column {column!r} must be a file path, found {row[column]!r}")
        mask = _resolve(row["mask_file"], metadata) if has_value(row["mask_file"]) else None
        if mask is None:
            report._dead("template_mask_missing", f"{where}: mask file {row['mask_file']!r} not found")
            continue
        image = _resolve(row["img_file"], metadata) if has_value(row["img_file"]) else None
        if has_value(row["img_file"]) and image is None:
            report._dead("template_image_missing", f"{where}: image file {row['img_file']!r} not found")
            continue
        url = row["url"] if has_value(row["url"]) else None
        out[row_number] = Template(row=row_number, mask=mask, image=image, url=url)
    return out


# --- references ----------------------------------------------------------------------------------------------------


def is_placeholder(path: str | os.PathLike) -> bool:
    """True for an all-black image: what mem-curv-diff's downloader saved for a dead URL."""
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("L").getextrema()[1] == 0


def _reference_files(folder: Path, row: int, index: Any) -> list[Path]:
    # mem-curv-diff's cache names files by label-file row (dl_000.jpg); Wen's layout is <index>/*.png.
    files = [folder / f"dl_{row:03d}{s}" for s in _IMAGE_SUFFIXES]
    found = [f for f in files if f.is_file()]
    if index is not None and (folder / str(index)).is_dir():
        found += sorted(f for f in (folder / str(index)).iterdir() if f.suffix.lower() in _IMAGE_SUFFIXES)
    return found


# --- the whole thing -----------------------------------------------------------------------------------------------


def load_webster(
    labels: str | os.PathLike,
    *,
    templates: str | os.PathLike | dict[int, Template] | None = None,
    references: str | os.PathLike | None = None,
    default_kind: str | None = None,
    require_template_masks: bool = True,
) -> tuple[list[WebsterItem], WebsterReport]:
    """Items of a label file with their alive templates and reference images, and what was skipped.

    templates: the templates table (path to metadata.parquet or its folder) or `load_templates`'s result.
    references: a folder of training images (`dl_NNN.jpg` by row, or `<index>/*.png`); optional.
    default_kind: the kind of rows without a type (required when the file has no type column, e.g. a .txt file).
    require_template_masks: with a templates table, skip template prompts none of whose templates is alive.
    """
    labels = Path(labels)
    if not labels.is_file():
        raise InputError(f"{labels}: label file not found")
    report = WebsterReport(str(labels))
    table = templates if isinstance(templates, dict) or templates is None else load_templates(templates, report)
    by_url: dict[str, list[int]] = {}
    for t in (table or {}).values():
        if t.url:
            by_url.setdefault(t.url, []).append(t.row)
    ref_dir = Path(references) if references is not None else None
    if ref_dir is not None and not ref_dir.is_dir():
        raise InputError(f"{ref_dir}: reference folder not found")
    default = canonical_kind(default_kind, "default_kind") if default_kind is not None else None

    items: list[WebsterItem] = []
    for row, (where, data) in enumerate(_rows(labels)):
        report.n_rows += 1
        prompt_key = _column(data, _PROMPT_KEYS)
        if prompt_key is None:
            raise InputError(f"{where}: no caption column; expected one of {list(_PROMPT_KEYS)}, found {sorted(data)}")
        prompt = data[prompt_key]
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{where}: column {prompt_key!r} must be a non-empty caption, found {prompt!r}")
        type_key = _column(data, _TYPE_KEYS)
        raw = data[type_key] if type_key is not None and has_value(data[type_key]) else None
        if raw is None and default is None:
            raise InputError(f"{where}: no memorization type (column 'overfit_type' or 'type'); pass default_kind")
        kind = canonical_kind(raw, f"{where}: column {type_key!r}") if raw is not None else default
        url_key = _column(data, ("url",))
        item = WebsterItem(
            row=row, prompt=prompt.strip(), kind=kind, raw_type=None if raw is None else str(raw),
            index=_index(data[index_key]) if (index_key := _column(data, ("index",))) is not None else None,
            url=data[url_key] if url_key is not None and has_value(data[url_key]) else None,
        )
        seed_key = _column(data, ("gen_seeds",))
        if seed_key is not None:
            item.seeds, item.seed_template = _seeds(data[seed_key], where)
        if kind == "template" and table is not None:
            rows = list(item.seed_template.values())
            ti_key = _column(data, ("template_indices",))
            if ti_key is not None:
                rows += _template_indices(data[ti_key], where)
            ru_key = _column(data, ("retrieved_urls",))
            if ru_key is not None:
                rows += [r for u in _as_list(data[ru_key], where, ru_key) for r in by_url.get(str(u), [])]
            item.templates = [table[r] for r in sorted(set(rows)) if r in table]
            lost = sorted(set(rows) - set(table))
            if lost:
                note = f"{where}: template row(s) {lost} are not alive rows of the templates table"
                report._dead("template_refs_dead", note)
            if require_template_masks and not item.templates:
                report._dead("template_prompt_without_mask", f"{where}: no alive template for {item.prompt[:60]!r}")
                continue
        if ref_dir is not None and kind != "non-memorized":
            found = _reference_files(ref_dir, row, item.index)
            alive, unreadable = [], []
            for f in found:
                try:
                    if not is_placeholder(f):
                        alive.append(f)
                except OSError:  # PIL's UnidentifiedImageError included: a truncated download
                    unreadable.append(f)
            if not found:
                report._dead("reference_missing", f"{where}: no reference image for row {row} / index {item.index}")
            elif unreadable and not alive:
                report._dead("reference_unreadable", f"{where}: reference image {unreadable[0]} cannot be read")
            elif not alive:
                report._dead("reference_placeholder", f"{where}: reference image(s) are black placeholders (dead URL)")
            item.references = alive
        items.append(item)
    report.n_items = len(items)
    report.kinds = Counter(i.kind for i in items)
    if table is None and any(i.kind == "template" for i in items):
        report.notes.append("no templates table given: template prompts carry no masks")
    return items, report


def read_mask(path: str | os.PathLike, size: tuple[int, int] | None = (256, 256)) -> np.ndarray:
    """A ground-truth mask as bool (H, W): grayscale, resized NEAREST to size=(H, W), value / 255 > 0.5."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            gray = img.convert("L")
    except OSError as err:  # missing, unreadable or not an image
        raise InputError(f"{path}: cannot read the mask ({err})") from None
    if size is not None and gray.size != (size[1], size[0]):
        gray = gray.resize((size[1], size[0]), Image.NEAREST)
    return np.asarray(gray, dtype=np.float32) / 255.0 > 0.5


def ground_truth_mask(item: WebsterItem, size: tuple[int, int] = (256, 256), seed: int | None = None) -> np.ndarray:
    """mem-curv-diff's ground truth for one generation of `item`, bool (H, W).

    Template copies: the mask of the template this seed copies when the label file pairs them, otherwise the union
    of the item's template masks. Exact / retrieved copies: all ones. Non-memorized: all zeros.
    """
    if item.kind == "non-memorized":
        return np.zeros(size, dtype=bool)
    if item.kind != "template":
        return np.ones(size, dtype=bool)
    if not item.templates:
        raise InputError(f"row {item.row} ({item.prompt[:60]!r}): a template copy without a template mask")
    chosen = [t for t in item.templates if seed is not None and item.seed_template.get(seed) == t.row] or item.templates
    out = np.zeros(size, dtype=bool)
    for t in chosen:
        out |= read_mask(t.mask, size)
    return out
