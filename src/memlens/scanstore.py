"""The on-disk state of a scan directory, kept so that a kill at any instant leaves it resumable.

Invariants (see docs/scan.md):
- A record line is appended only after every file it names is written, and a whole batch's lines go in one
  write + flush + fsync. A kill can therefore leave at most one torn *last* line, which `open_log` cuts off.
- `generations.jsonl` is rewritten only by write-to-temp + fsync + rename, so readers never see half of it.
- Each process appends to its own log (`generations.jsonl` when alone, `shards/rank-N.jsonl` when several), so no two
  processes ever write the same file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from memlens.errors import InputError

GENERATIONS = "generations.jsonl"
RUN_JSON = "run.json"
SHARDS = "shards"

Key = tuple[int, int]  # (prompt_index, image_index)


def key_of(record: dict) -> Key:
    return int(record["prompt_index"]), int(record["image_index"])


def _fsync_dir(path: Path) -> None:
    # Makes a rename or a new file's directory entry survive a crash, not just a process kill.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_log(path: Path) -> list[dict]:
    """Every complete record in a log. A last line without its newline is a torn write and is ignored."""
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete = lines[:-1]  # the part after the last newline is empty, or torn
    records = []
    for number, raw in enumerate(complete, start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            key_of(rec)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            raise InputError(f"{path} line {number}: not a scan record; was this file edited by hand?") from None
        records.append(rec)
    return records


def log_paths(out: Path) -> list[Path]:
    shard_dir = out / SHARDS
    shards = sorted(shard_dir.glob("rank-*.jsonl")) if shard_dir.is_dir() else []
    return [out / GENERATIONS, *shards]


def done_keys(out: Path) -> set[Key]:
    return {key_of(r) for p in log_paths(out) for r in read_log(p)}


class Log:
    """An append-only JSONL log owned by one process."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        self._fh = path.open("ab")
        self._lock()
        self._cut_torn_tail()
        if not existed:
            _fsync_dir(path.parent)

    def _lock(self) -> None:
        # Two scans appending to one log would interleave records; the kernel drops the lock when a process dies,
        # so a killed scan never leaves a stale lock behind.
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; run one scan per folder
            return
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.close()
            raise InputError(f"{self.path}: another scan is writing to this folder right now") from None

    def _cut_torn_tail(self) -> None:
        size = self._fh.seek(0, os.SEEK_END)
        if size == 0:
            return
        with self.path.open("rb") as rd:
            # Walk back in blocks to the last newline; a torn tail is at most one batch long.
            pos, block = size, 1 << 16
            while pos > 0:
                start = max(0, pos - block)
                rd.seek(start)
                chunk = rd.read(pos - start)
                nl = chunk.rfind(b"\n")
                if nl >= 0:
                    keep = start + nl + 1
                    break
                pos = start
            else:
                keep = 0
        if keep != size:
            self._fh.truncate(keep)
            os.fsync(self._fh.fileno())

    def append(self, records: Iterable[dict]) -> None:
        payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        if not payload:
            return
        self._fh.write(payload)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "Log":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def merge(out: Path) -> list[dict]:
    """Fold every log into one ordered, duplicate-free `generations.jsonl` and drop the shards."""
    paths = log_paths(out)
    logs = [read_log(p) for p in paths]
    by_key: dict[Key, dict] = {}
    for log in logs:
        for rec in log:
            by_key.setdefault(key_of(rec), rec)
    records = [by_key[k] for k in sorted(by_key)]
    main = out / GENERATIONS
    main_keys = [key_of(r) for r in logs[0]]
    torn = main.exists() and main.stat().st_size > 0 and not main.read_bytes().endswith(b"\n")
    if len(paths) > 1 or torn or main_keys != sorted(set(main_keys)):
        tmp = main.with_name(GENERATIONS + ".tmp")
        with tmp.open("wb") as fh:
            fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, main)
        _fsync_dir(out)
        # Only now may the shards go: a kill before this line leaves duplicates that the next merge drops.
        for shard in paths[1:]:
            shard.unlink(missing_ok=True)
        try:
            (out / SHARDS).rmdir()
        except OSError:
            pass
    return records


def read_run_json(out: Path) -> dict[str, Any] | None:
    path = out / RUN_JSON
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{path}: malformed JSON; move the folder aside or pick another --out") from None


def write_run_json(out: Path, data: dict[str, Any]) -> None:
    path = out / RUN_JSON
    tmp = path.with_name(RUN_JSON + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with tmp.open("rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(out)
