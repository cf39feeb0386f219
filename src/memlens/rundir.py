"""The run directory: the one module that knows how a scan (or mitigate, or demo) folder looks on disk.

It owns the layout (file and folder names), the record schema (`Generation`, one line of `generations.jsonl`), reading
(`read_generations`, `read_run_json`), writing (`Log`, `merge`, `write_run_json`) and atomic writes
(`atomic_write`, used by everything in memlens that writes a file a user may open), plus the run skeleton every
producer shares (`check_output` before the model loads, then `open_run`: lock first, then read state).

Invariants (docs/scan.md):
- A record line is appended only after every file it names is written, and a whole batch's lines go in one
  write + flush + fsync. A kill can therefore leave at most one torn *last* line, which `Log` cuts off and readers
  skip.
- `generations.jsonl` and `run.json` are rewritten only by write-to-temp + fsync + rename, so readers never see half.
- Each process appends to its own log (`generations.jsonl` when alone, `shards/rank-N.jsonl` when several).

Imports numpy and the standard library only, so readers (evaluate, report, scripts) never pay for torch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from memlens.errors import InputError

__all__ = [
    "GENERATIONS", "RUN_JSON", "SHARDS", "IMAGES", "MAPS", "OVERLAYS", "TOKEN_MAPS", "FORMAT",
    "Generation", "Key", "Run", "Log",
    "atomic_write", "atomic_write_bytes", "write_json", "jsonable",
    "read_jsonl", "read_log", "read_generations", "log_paths", "done_keys", "merge", "read_run_json", "write_run_json",
    "check_output", "check_output_file", "open_run", "settings_mismatch", "stem",
]

# --- layout -----------------------------------------------------------------------------------------------------------
GENERATIONS = "generations.jsonl"
RUN_JSON = "run.json"
SHARDS = "shards"
IMAGES, MAPS, OVERLAYS = "images", "be_maps", "overlays"
TOKEN_MAPS = "token_maps"  # optional: per-token maps of the probed layers (the demo's "which token" table)
FORMAT = 1  # bump when generations.jsonl or run.json change shape

# What a producer may find in its own folder besides its log and run.json. Anything else in a folder without a
# run.json means the folder belongs to someone else.
_OWN_NAMES = {GENERATIONS, RUN_JSON, SHARDS, IMAGES, MAPS, OVERLAYS, TOKEN_MAPS}

Key = tuple[int, int]  # (prompt_index, image_index)


def stem(prompt_index: int, image_index: int) -> str:
    """The file name stem of one generation's files, e.g. `00012_01`."""
    return f"{prompt_index:05d}_{image_index:02d}"


# --- atomic writes ----------------------------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
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


def atomic_write(path: str | Path, write: Callable[[Any], None], *, durable: bool = False) -> Path:
    """Write `path` through a temp file in the same folder and a rename: readers see the old file or the new one,
    never a truncated one. `write(fh)` gets a binary file. `durable=True` also fsyncs the file and its folder, for
    files whose loss after a power cut would lose data (the log, run.json), not for ones that can be redone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        # mkstemp creates 0600; give the result the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_write_dir(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write a whole folder through a temp folder beside it, then swap it in: a crash leaves the old folder or
    nothing, never a half-written one that looks complete. `write(tmp_dir)` fills the (existing, empty) folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():  # a folder cannot be replaced by rename; the old one goes first
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = False) -> Path:
    return atomic_write(path, lambda fh: fh.write(data), durable=durable)


def jsonable(x):
    """`x` with numpy scalars, paths and tuples turned into JSON types; NaN and infinity become null (undefined)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item") and getattr(x, "ndim", None) == 0:  # numpy scalar
        x = x.item()
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x


def write_json(path: str | Path, obj: Any, *, durable: bool = False) -> Path:
    return atomic_write_bytes(path, (json.dumps(jsonable(obj), indent=2, ensure_ascii=False) + "\n").encode("utf-8"),
                              durable=durable)


# --- the record -------------------------------------------------------------------------------------------------------


@dataclass
class Generation:
    """One generated image: one line of `generations.jsonl`.

    Values are kept as read; `check` validates the fields a reader needs, naming file, line and field. Keys this
    class does not know (mitigation's `method`, `triggered`, ...) are kept in `extra` and written back unchanged.
    `source`, `line` and `root` say where the record was read from (None for a record not read from disk).
    """

    prompt_index: int
    image_index: int
    prompt: Optional[str] = None
    seed: Optional[int] = None
    image: Optional[str] = None
    be_map: Optional[str] = None
    overlay: Optional[str] = None
    D: Optional[list] = None
    LD: Optional[list] = None
    eos_index: Optional[int] = None
    label: Optional[int] = None
    type: Optional[str] = None
    index: Any = None
    token_maps: Optional[str] = None
    extra: dict = field(default_factory=dict)
    source: Optional[Path] = field(default=None, compare=False, repr=False)
    line: Optional[int] = field(default=None, compare=False, repr=False)
    root: Optional[Path] = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> Key:
        return int(self.prompt_index), int(self.image_index)

    @property
    def stem(self) -> str:
        return stem(self.prompt_index, self.image_index)

    @property
    def name(self) -> str:
        """What names this record's mask file / reference folder: the dataset `index` if any, else `prompt_index`."""
        return str(self.index) if self.index is not None else str(self.prompt_index)

    def where(self) -> str:
        """'DIR/generations.jsonl line N', for error messages."""
        return f"{self.source} line {self.line}" if self.source is not None else f"record {self.key}"

    def path(self, name: str) -> Path:
        """The file a path field (`image`, `be_map`, `overlay`, ...) points to."""
        value = self.get(name)
        return Path(self.root or ".") / str(value)

    def get(self, name: str, default=None):
        """A field or an extra key by name (None counts as absent)."""
        value = getattr(self, name, None) if name in _FIELDS else self.extra.get(name)
        return default if value is None else value

    def to_line(self) -> dict:
        """The JSON object written to the log: known fields in a fixed order, absent ones left out, then extras."""
        out = {}
        for name in _FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        out.update(self.extra)
        return out

    @classmethod
    def from_line(cls, obj: dict, source: Path | None = None, line: int | None = None,
                  root: Path | None = None) -> "Generation":
        where = f"{source} line {line}"
        for name in ("prompt_index", "image_index"):
            if name not in obj:
                raise InputError(f"{where}: missing field '{name}'")
            if not isinstance(obj[name], int) or isinstance(obj[name], bool):
                raise InputError(f"{where}: field '{name}' must be an integer, got {obj[name]!r}")
        known = {k: v for k, v in obj.items() if k in _FIELDS}
        extra = {k: v for k, v in obj.items() if k not in _FIELDS}
        rec = cls(**known, extra=extra, source=source, line=line, root=root)
        if rec.label is not None and rec.label not in (0, 1):
            raise InputError(f"{where}: field 'label' must be 0 or 1, got {rec.label!r}")
        return rec

    def check(self, *names: str) -> "Generation":
        """Raise an `InputError` naming file, line and field unless every named field is present and well-typed."""
        for name in names:
            value = self.get(name)
            if value is None:
                raise InputError(f"{self.where()}: missing field '{name}'")
            if name in ("D", "LD"):
                ok = isinstance(value, list) and len(value) > 0 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
                if not ok:
                    raise InputError(f"{self.where()}: field '{name}' must be a non-empty list of finite numbers")
            elif name in ("image", "be_map", "overlay", "prompt", "token_maps"):
                if not isinstance(value, str) or not value:
                    raise InputError(f"{self.where()}: field '{name}' must be a non-empty string")
        return self


_FIELDS = [f.name for f in fields(Generation) if f.name not in ("extra", "source", "line", "root")]


# --- reading ----------------------------------------------------------------------------------------------------------


def _lines(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every complete line; a last line without its newline is a torn write and skipped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err})") from None
    lines = data.split(b"\n")
    for n, raw in enumerate(lines[:-1], start=1):  # the part after the last newline is empty, or torn
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            why = f"{err.msg} at column {err.colno}" if isinstance(err, json.JSONDecodeError) else "not UTF-8"
            raise InputError(f"{path} line {n}: not valid JSON ({why}); was this file edited by hand?") from None
        if not isinstance(obj, dict):
            raise InputError(f"{path} line {n}: expected a JSON object, got {type(obj).__name__}")
        yield n, obj


def read_jsonl(path: str | Path) -> list[dict]:
    """Every complete line of a JSONL log a producer appends to (`Log`), in file order; a torn last line is skipped."""
    return [obj for _, obj in _lines(Path(path))]


def read_log(path: Path, root: Path | None = None) -> list[Generation]:
    """Every complete record of one log file, in file order."""
    path = Path(path)
    root = root if root is not None else path.parent
    return [Generation.from_line(obj, path, n, root) for n, obj in _lines(path)]


def log_paths(out: Path) -> list[Path]:
    """The main log and any process shards, main first."""
    out = Path(out)
    shard_dir = out / SHARDS
    shards = sorted(shard_dir.glob("rank-*.jsonl")) if shard_dir.is_dir() else []
    return [out / GENERATIONS, *shards]


def read_generations(run_dir: str | Path, required: Iterable[str] = ()) -> list[Generation]:
    """The records of a run directory: `generations.jsonl` plus, for a multi-process scan not merged yet, its shards,
    keeping the first record of each (prompt_index, image_index). Each record is checked for `required` fields."""
    run_dir = Path(run_dir)
    paths = log_paths(run_dir)
    main = paths[0]
    if not any(p.is_file() for p in paths):
        raise InputError(f"{main}: not found (is {run_dir} a `memlens scan` output directory?)")
    records, seen = [], set()
    for path in paths:
        for rec in read_log(path, root=run_dir):
            rec.check(*required)
            if rec.key in seen:
                continue
            seen.add(rec.key)
            records.append(rec)
    if not records:
        raise InputError(f"{main}: holds no generations")
    return records


def done_keys(out: Path) -> set[Key]:
    return {rec.key for p in log_paths(out) for rec in read_log(p, root=out)}


def read_run_json(out: str | Path) -> Optional[dict[str, Any]]:
    path = Path(out) / RUN_JSON
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{path}: malformed JSON; move the folder aside or pick another output folder") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def write_run_json(out: str | Path, data: dict[str, Any]) -> None:
    write_json(Path(out) / RUN_JSON, data, durable=True)


# --- writing ----------------------------------------------------------------------------------------------------------


def _encode(records: Iterable[Generation | dict]) -> bytes:
    return "".join(json.dumps(jsonable(r.to_line() if isinstance(r, Generation) else r), ensure_ascii=False) + "\n"
                   for r in records).encode("utf-8")


class Log:
    """An append-only JSONL log owned by one process, locked while open."""

    def __init__(self, path: Path, what: str = "scan"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = self.path.exists()
        self._fh = self.path.open("ab")
        self._lock(what)
        self._cut_torn_tail()
        if not existed:
            fsync_dir(self.path.parent)

    def _lock(self, what: str) -> None:
        # Two runs appending to one log would interleave records; the kernel drops the lock when a process dies,
        # so a killed run never leaves a stale lock behind.
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; run one scan per folder
            return
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.close()
            raise InputError(f"{self.path}: another {what} is writing to this folder right now") from None

    def _cut_torn_tail(self) -> None:
        size = self._fh.seek(0, os.SEEK_END)
        if size == 0:
            return
        with self.path.open("rb") as rd:
            # Walk back in blocks to the last newline; a torn tail is at most one batch long.
            pos, block = size, 1 << 16
            keep = 0
            while pos > 0:
                start = max(0, pos - block)
                rd.seek(start)
                chunk = rd.read(pos - start)
                nl = chunk.rfind(b"\n")
                if nl >= 0:
                    keep = start + nl + 1
                    break
                pos = start
        if keep != size:
            self._fh.truncate(keep)
            os.fsync(self._fh.fileno())

    def append(self, records: Iterable[Generation | dict]) -> None:
        """Append a whole batch in one write, then flush and fsync."""
        payload = _encode(records)
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


def merge(out: Path) -> list[Generation]:
    """Fold every log into one ordered, duplicate-free `generations.jsonl` and drop the shards."""
    out = Path(out)
    paths = log_paths(out)
    logs = [read_log(p, root=out) for p in paths]
    by_key: dict[Key, Generation] = {}
    for log in logs:
        for rec in log:
            by_key.setdefault(rec.key, rec)
    records = [by_key[k] for k in sorted(by_key)]
    main = out / GENERATIONS
    main_keys = [r.key for r in logs[0]]
    torn = main.exists() and main.stat().st_size > 0 and not main.read_bytes().endswith(b"\n")
    if len(paths) > 1 or torn or main_keys != sorted(set(main_keys)):
        atomic_write_bytes(main, _encode(records), durable=True)
        # Only now may the shards go: a kill before this line leaves duplicates that the next merge drops.
        for shard in paths[1:]:
            shard.unlink(missing_ok=True)
        try:
            (out / SHARDS).rmdir()
        except OSError:
            pass
    return records


# --- the run skeleton -------------------------------------------------------------------------------------------------


def _is_leftover(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")  # a temp file of an interrupted atomic write


def _check_creatable(path: Path, param: str) -> None:
    parent = next((p for p in path.parents if p.exists() or p == Path(p.anchor)), Path("."))
    if not parent.is_dir():
        raise InputError(f"`{param}` {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"`{param}` {path}: cannot create it, {parent} is not writable")


def check_output_file(path: str | Path, param: str = "out") -> Path:
    """Refuse, before any work, an output file that cannot be written: a folder, a path under a file, a folder that
    is not writable."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"`{param}` {path}: is a folder; expected a file name")
    if path.exists():
        if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
            raise InputError(f"`{param}` {path}: not writable")
        return path
    _check_creatable(path, param)
    return path


def check_output(out: str | Path, kind: str, *, own: Iterable[str] = (), param: str = "out_dir") -> Path:
    """Refuse, before any model loads and before anything is written, an output folder a run of `kind` cannot use:
    a path whose parent is a file, a folder that cannot be written, a folder holding a run of another kind, or a
    non-empty folder that is not a run at all (unrelated files). `own` names extra files the producer itself writes
    (e.g. the demo's `summary.json`). Returns the path."""
    out = Path(out)
    if not out.exists():
        _check_creatable(out, param)
        return out
    if not out.is_dir():
        raise InputError(f"`{param}` {out}: is a file; expected a folder")
    if not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"`{param}` {out}: folder is not writable")
    run = read_run_json(out)
    if run is not None:
        found = run.get("kind", "scan")
        if found != kind:
            raise InputError(f"`{param}` {out} holds a {found} run, not a {kind}; pick another folder")
        return out
    allowed = _OWN_NAMES | set(own)
    strangers = sorted(n for n in os.listdir(out) if n not in allowed and not _is_leftover(n))
    log = out / GENERATIONS
    if log.exists() and log.stat().st_size > 0:
        raise InputError(f"`{param}` {out} has {GENERATIONS} but no {RUN_JSON}; pick another folder")
    if strangers:
        shown = ", ".join(strangers[:3]) + (", ..." if len(strangers) > 3 else "")
        raise InputError(f"`{param}` {out} is not empty and holds no memlens run ({shown}); pick an empty or new folder")
    return out


def settings_mismatch(old: dict, new: dict, options: dict[str, str]) -> Optional[str]:
    """The first compared setting that differs, worded for the user (None when all agree)."""
    for key, option in options.items():
        if old.get(key) != new.get(key):
            if key == "prompts_sha256":
                return f"{option}: the prompts differ from those the run was started with"
            return f"{option} is {new.get(key)!r} but the run was started with {old.get(key)!r}"
    return None


@dataclass
class Run:
    """An open run directory: its lock is held (through `log`), and its state was read after taking it."""

    path: Path
    log: Log
    previous: Optional[dict]  # run.json as found (None for a fresh folder)
    done: set  # keys already recorded, in every log


def open_run(out: str | Path, kind: str, settings: dict, options: dict[str, str], *, process_index: int = 0,
             num_processes: int = 1, param: str = "out_dir") -> Run:
    """Lock the run's log, then read its state: run.json (refusing one of another kind or other settings; `options`
    maps each compared settings key to the name a user would change) and the keys already done.

    Lock first: a second producer stops before it reads anything, and no one reads state another is changing.
    The caller closes `run.log` (use it as a context manager) and writes run.json when it starts writing files.
    """
    out = Path(out)
    log_path = out / GENERATIONS if num_processes == 1 else out / SHARDS / f"rank-{process_index}.jsonl"
    log = Log(log_path, what=kind)
    try:
        previous = read_run_json(out)
        if previous is not None:
            found = previous.get("kind", "scan")
            if found != kind:
                raise InputError(f"`{param}` {out} holds a {found} run, not a {kind}; pick another folder")
            why = settings_mismatch(previous.get("settings", {}), settings, options)
            if why:
                raise InputError(f"`{param}` {out} holds a different run: {why}; rerun with its settings or pick "
                                 "another folder")
        elif (out / GENERATIONS).exists() and (out / GENERATIONS).stat().st_size > 0:
            raise InputError(f"`{param}` {out} has {GENERATIONS} but no {RUN_JSON}; pick another folder")
        done = done_keys(out)
    except BaseException:
        log.close()
        raise
    return Run(out, log, previous, done)
