"""Prompt files in, a list of `PromptRecord` out.

One reader per format (.txt, .jsonl, .csv, .parquet) and named loaders for the public prompt sets the memorization
literature uses. Every reader funnels rows through `_record`, so the rules for which key is the prompt, what a label
looks like and how errors are worded live in one place.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from memlens.errors import InputError

__all__ = ["PromptRecord", "load_prompts", "PUBLIC_SETS", "load_public_set", "public_data_dir"]

# First match wins; NeMo's CSV capitalises "Caption".
PROMPT_KEYS = ("caption", "prompt", "text")
_PARAPHRASE = re.compile(r"^caption(\d+)$", re.IGNORECASE)


@dataclass
class PromptRecord:
    prompt: str
    label: int | None = None  # 1 memorized, 0 not, None unknown
    type: str | None = None  # e.g. VM/TM (NeMo), MV/TV (SD2 set)
    index: str | int | None = None  # the training-set id (LAION index) when the file gives one
    captions: list[str] = field(default_factory=list)  # paraphrases caption1..captionK, in order
    extra: dict[str, Any] = field(default_factory=dict)  # every other column, untouched


def load_prompts(path: str | os.PathLike, *, label: int | None = None, type_key: str = "type") -> list[PromptRecord]:
    """Read a prompt file; `label` fills in records whose file has no label; `type_key` names the type column."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: prompt file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a folder; expected a prompt file (.txt, .jsonl, .csv or .parquet)")
    suffix = path.suffix.lower()
    readers: dict[str, Callable[[Path], Iterable[tuple[str, dict]]]] = {
        ".txt": _read_txt,
        ".jsonl": _read_jsonl,
        ".csv": _read_csv,
        ".parquet": _read_parquet,
    }
    if suffix not in readers:
        raise InputError(f"{path}: unknown prompt file extension {suffix or '(none)'!r}; expected one of {sorted(readers)}")
    records = [_record(row, where, label, type_key) for where, row in readers[suffix](path)]
    if not records:
        raise InputError(f"{path}: holds no prompts")
    return records


# --- readers: each yields (where, row) with `where` like "file.jsonl line 7" ---------------------------------------


def _open_text(path: Path):
    try:
        return path.open("r", encoding="utf-8-sig", newline="")
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with _open_text(path) as fh:
        try:
            for number, line in enumerate(fh, start=1):
                yield number, line.rstrip("\r\n")
        except UnicodeDecodeError as err:
            raise InputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _read_txt(path: Path) -> Iterator[tuple[str, dict]]:
    for number, line in _lines(path):
        if line.strip():
            yield f"{path} line {number}", {"prompt": line.strip()}


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    for number, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: malformed JSON ({err.msg} at column {err.colno}); expected one object per line") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object, found {type(row).__name__}")
        yield where, row


def _read_csv(path: Path) -> Iterator[tuple[str, dict]]:
    with _open_text(path) as fh:
        try:
            header_line = fh.readline()
            # Decide on the header alone: captions are free text full of commas, headers are not.
            delimiter = ";" if header_line.count(";") > header_line.count(",") else ","
            fh.seek(0)
            reader = csv.DictReader(fh, delimiter=delimiter)
            if not reader.fieldnames:
                return
            for row in reader:
                where = f"{path} line {reader.line_num}"
                if None in row:  # more cells than header columns
                    raise InputError(f"{where}: {len(reader.fieldnames) + len(row[None])} cells for {len(reader.fieldnames)} columns")
                yield where, {k: v for k, v in row.items() if k}  # drop the unnamed pandas index column
        except UnicodeDecodeError as err:
            raise InputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        except csv.Error as err:
            raise InputError(f"{path}: malformed CSV ({err})") from None


def _read_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading .parquet needs pyarrow (pip install 'memlens[parquet]')") from None
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises its own zoo of errors for damaged files
        raise InputError(f"{path}: not a readable parquet file ({err})") from None
    for number, row in enumerate(table.to_pylist(), start=1):
        yield f"{path} row {number}", row


# --- one row to one record ------------------------------------------------------------------------------------------


def _record(row: dict, where: str, default_label: int | None, type_key: str) -> PromptRecord:
    lower = {str(k).lower(): k for k in row}
    prompt_key = next((lower[k] for k in PROMPT_KEYS if k in lower), None)
    if prompt_key is None:
        found = ", ".join(repr(k) for k in row) or "none"
        raise InputError(f"{where}: no prompt column; expected one of {list(PROMPT_KEYS)}, found {found}")
    prompt = row[prompt_key]
    if not isinstance(prompt, str):
        raise InputError(f"{where}: field {prompt_key!r} must be text, found {type(prompt).__name__}")
    if not prompt.strip():
        raise InputError(f"{where}: field {prompt_key!r} is an empty prompt")

    label = _label(row.get(lower["label"]) if "label" in lower else None, where)
    type_ = row.get(lower[type_key.lower()]) if type_key.lower() in lower else None
    index = _index(row.get(lower["index"])) if "index" in lower else None

    paraphrases = sorted(
        ((int(m.group(1)), k) for k in row if (m := _PARAPHRASE.match(str(k)))),
    )
    captions = [str(row[k]) for _, k in paraphrases if has_value(row[k])]

    used = {prompt_key, *(k for _, k in paraphrases)}
    used.update(lower[k] for k in ("label", "index", type_key.lower()) if k in lower)
    return PromptRecord(
        prompt=prompt.strip(),
        label=default_label if label is None else label,
        type=str(type_) if has_value(type_) else None,
        index=index,
        captions=captions,
        extra={k: v for k, v in row.items() if k not in used},
    )


def has_value(value: Any) -> bool:
    """False for a missing cell: None, NaN, or a blank string (how CSV, JSONL and parquet leave one empty)."""
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return not (isinstance(value, str) and not value.strip())


def _label(value: Any, where: str) -> int | None:
    if not has_value(value):
        return None
    if isinstance(value, bool):
        return int(value)
    text = str(value).strip().lower()
    known = {"1": 1, "0": 0, "1.0": 1, "0.0": 0, "true": 1, "false": 0}
    if text not in known:
        raise InputError(f"{where}: field 'label' must be 0 or 1, found {value!r}")
    return known[text]


def _index(value: Any) -> str | int | None:
    if not has_value(value):
        return None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    text = str(value).strip()
    # CSVs give LAION ids as text; JSONL as numbers. Make the same id compare equal across both.
    return int(text) if re.fullmatch(r"-?\d+", text) else text


# --- the public sets ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublicSet:
    filename: str
    label: int
    type_key: str = "type"
    about: str = ""


PUBLIC_SETS: dict[str, PublicSet] = {
    "wen-sd1-memorized": PublicSet(
        "sdv1_500_memorized.jsonl", 1, about="Wen et al.'s 500 memorized SD v1 prompts (Webster 2023)"
    ),
    "nemo-memorized": PublicSet(
        "nemo_memorized_laion_prompts.csv", 1, about="the same 500 prompts with NeMo's VM/TM type"
    ),
    "nemo-unmemorized": PublicSet("nemo_unmemorized_laion_prompts.csv", 0, about="500 non-memorized LAION prompts"),
    "sail-nonmemorized": PublicSet(
        "sail_nonmemorized_prompts.txt", 0, about="SAIL's non-memorized mix: COCO, Lexica, Tuxemon, GPT-4"
    ),
    "sd2-memorized": PublicSet(
        "sail_sd2_memorized.jsonl", 1, type_key="overfit_type", about="219 memorized SD v2 prompts, MV/TV type"
    ),
    "memattn-gpt500": PublicSet(
        "memattn_nonmemorized_gpt500.txt", 0, about="MemAttn's 500 GPT-style non-memorized prompts"
    ),
}


def public_data_dir() -> Path:
    """Where the public prompt files live: $MEMLENS_DATA, else ../shared/data next to the working directory."""
    return Path(os.environ.get("MEMLENS_DATA", Path.cwd().parent / "shared" / "data"))


def load_public_set(name: str, data_dir: str | os.PathLike | None = None) -> list[PromptRecord]:
    """Load one of `PUBLIC_SETS` by name, with its label (and type column) filled in."""
    if name not in PUBLIC_SETS:
        raise InputError(f"unknown public prompt set {name!r}; expected one of {sorted(PUBLIC_SETS)}")
    spec = PUBLIC_SETS[name]
    folder = Path(data_dir) if data_dir is not None else public_data_dir()
    records = load_prompts(folder / spec.filename, type_key=spec.type_key)
    for rec in records:
        rec.label = spec.label  # the set's membership is the label, whatever the file says
    return records
