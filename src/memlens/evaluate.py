"""`memlens evaluate`: detection, localization and similarity numbers for scan directories.

A scan directory holds `generations.jsonl` (one line per generated image; see `load_generations`) and the files its
lines point to. Each command reads scans, calls the plain functions in `memlens.metrics`, and writes one JSON file
(plus a ROC plot for detection) through a temporary file and a rename, so a crash never leaves a complete-looking
half result. Definitions: docs/metrics.md.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from memlens.errors import InputError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

T_VALUES: tuple[int | None, ...] = (1, 10, None)  # None = all steps; the paper's Table 1 columns
SIGNALS = ("D", "LD")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# --------------------------------------------------------------------------------------------------------------
# Reading scans


def load_generations(scan_dir: Path, required: Iterable[str] = ()) -> list[dict]:
    """The records of a scan directory, each with `_file`, `_line` (1-based) and `_dir` added.

    Reads `generations.jsonl` and, for a multi-process scan not merged yet, `shards/rank-*.jsonl`, keeping the first
    record of each (prompt_index, image_index). As the scan writer guarantees, only a LAST line without its newline
    can be a torn write of a scan in progress; it is skipped. Any other bad line, and a missing or mistyped field
    in `required`, is an `InputError` naming file and line.
    """
    scan_dir = Path(scan_dir)
    main = scan_dir / "generations.jsonl"
    shard_dir = scan_dir / "shards"
    paths = [main, *(sorted(shard_dir.glob("rank-*.jsonl")) if shard_dir.is_dir() else [])]
    if not any(p.is_file() for p in paths):
        raise InputError(f"{main}: not found (is {scan_dir} a `memlens scan` output directory?)")
    records, seen = [], set()
    for path in paths:
        for n, rec in _read_jsonl(path):
            for field in required:
                _check_field(rec, field, path, n)
            if "label" in rec and rec["label"] not in (0, 1):
                raise InputError(f"{path} line {n}: field 'label' must be 0 or 1, got {rec['label']!r}")
            key = (rec.get("prompt_index"), rec.get("image_index"))
            if None not in key:
                if key in seen:
                    continue
                seen.add(key)
            rec.update(_file=path, _line=n, _dir=scan_dir)
            records.append(rec)
    if not records:
        raise InputError(f"{main}: holds no generations")
    return records


def _read_jsonl(path: Path) -> Iterable[tuple[int, dict]]:
    if not path.is_file():
        return
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err})") from None
    lines = data.split(b"\n")
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            if n == len(lines):  # no newline after it: a torn write of a scan in progress
                return
            why = f"{err.msg} at column {err.colno}" if isinstance(err, json.JSONDecodeError) else "not UTF-8"
            raise InputError(f"{path} line {n}: not valid JSON ({why})") from None
        if not isinstance(rec, dict):
            raise InputError(f"{path} line {n}: expected a JSON object, got {type(rec).__name__}")
        yield n, rec


def _check_field(rec: dict, field: str, path: Path, n: int) -> None:
    if field not in rec:
        raise InputError(f"{path} line {n}: missing field '{field}'")
    value = rec[field]
    if field in ("D", "LD"):
        ok = (
            isinstance(value, list)
            and len(value) > 0
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        )
        if not ok:
            raise InputError(f"{path} line {n}: field '{field}' must be a non-empty list of finite numbers")
    elif field in ("prompt_index", "image_index"):
        if not isinstance(value, int) or isinstance(value, bool):
            raise InputError(f"{path} line {n}: field '{field}' must be an integer, got {value!r}")
    elif field in ("image", "be_map", "overlay", "prompt"):
        if not isinstance(value, str) or not value:
            raise InputError(f"{path} line {n}: field '{field}' must be a non-empty string")


def where(rec: dict) -> str:
    """'DIR/generations.jsonl line N', for error messages."""
    return f"{rec['_file']} line {rec['_line']}"


def record_key(rec: dict) -> str:
    """The name of a record's mask file / reference folder: dataset `index` if present, else `prompt_index`."""
    return str(rec["index"]) if rec.get("index") is not None else str(rec["prompt_index"])


def load_be_map(rec: dict) -> np.ndarray:
    path = rec["_dir"] / rec["be_map"]
    try:
        m = np.load(path)
    except (OSError, ValueError) as err:
        raise InputError(f"{path} (from {where(rec)}): cannot read BE map ({err})") from None
    if m.ndim != 2:
        raise InputError(f"{path} (from {where(rec)}): BE map must be 2-D (h, w), got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise InputError(f"{path} (from {where(rec)}): BE map contains NaN or infinity")
    return m.astype(np.float32)


def image_size(path: Path, context: str = "") -> tuple[int, int]:
    """(height, width) of an image file without decoding it all."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, ValueError) as err:
        raise InputError(f"{path}{context}: cannot read image ({err})") from None
    return h, w


# --------------------------------------------------------------------------------------------------------------
# Writing results


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write through a temp file in the same folder and rename, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp creates 0600; give the result the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)  # JSON has no NaN; null means "undefined"
    return x


def write_json(path: Path, obj: dict) -> None:
    atomic_write_bytes(path, (json.dumps(_jsonable(obj), indent=2) + "\n").encode("utf-8"))


def _emit(result: dict, out: Optional[Path], summary: str) -> None:
    if out is None:
        typer.echo(json.dumps(_jsonable(result), indent=2))
    else:
        write_json(out, result)
        typer.echo(f"{summary}; wrote {out}")


# --------------------------------------------------------------------------------------------------------------
# Detection


def _labels(scans: list[list[dict]]) -> tuple[np.ndarray, str]:
    """Per-record labels: the `label` fields, or (for a scan without them) 1 for the first scan and 0 for the rest."""
    labels, sources = [], set()
    for i, recs in enumerate(scans):
        have = ["label" in r for r in recs]
        if all(have):
            labels += [int(r["label"]) for r in recs]
            sources.add("label field")
        elif not any(have):
            if i == 0 and len(scans) == 1:
                raise InputError(
                    f"{recs[0]['_file']}: no 'label' fields; add them, or pass a second --scan "
                    "of non-memorized prompts (the first --scan then counts as memorized)"
                )
            labels += [1 if i == 0 else 0] * len(recs)
            sources.add("scan order (first --scan = 1, others = 0)")
        else:
            bad = recs[have.index(False)]
            raise InputError(f"{where(bad)}: missing field 'label' (other lines of this scan have one)")
    return np.asarray(labels, dtype=np.int64), " + ".join(sorted(sources))


def _present_signals(records: list[dict]) -> tuple[list[str], list[str]]:
    signals, notes = [], []
    for s in SIGNALS:
        have = [s in r for r in records]
        if all(have):
            signals.append(s)
        elif not any(have):
            notes.append(f"signal {s}: absent from every record, skipped")
        else:
            bad = records[have.index(False)]
            raise InputError(f"{where(bad)}: missing field '{s}' (other lines have it)")
    if not signals:
        raise InputError("no record has 'D' or 'LD'; nothing to evaluate")
    for r in records:
        for s in signals:
            _check_field(r, s, r["_file"], r["_line"])
    return signals, notes


def _t_name(T: int | None) -> str:
    return "all" if T is None else str(T)


def detection_results(scan_dirs: list[Path]) -> dict:
    """Every detection row for the given scans (the body of `memlens evaluate detection`)."""
    from memlens.metrics.detection import detection_metrics, first_steps_mean, per_prompt_scores, roc_points

    if not scan_dirs:
        raise InputError("give at least one --scan DIR")
    scans = [load_generations(d, required=("prompt_index",)) for d in scan_dirs]
    records = [r for recs in scans for r in recs]
    labels, label_source = _labels(scans)
    signals, notes = _present_signals(records)
    # Prompt identity is per scan: two scans both number their prompts from 0.
    prompt_ids = [(i, r["prompt_index"]) for i, recs in enumerate(scans) for r in recs]
    types = [r.get("type") for r in records]
    n_steps = min(len(r[s]) for r in records for s in signals)

    subsets: list[tuple[str, np.ndarray]] = [("all", np.ones(len(records), dtype=bool))]
    pos_types = sorted({str(t) for t, y in zip(types, labels) if y == 1 and t is not None})
    for t in pos_types:
        # The paper's per-type rows: positives of this type against ALL negatives.
        subsets.append((f"type={t}", np.array([(y == 0) or (str(tt) == t) for tt, y in zip(types, labels)])))

    rows, curves = [], {}
    for signal in signals:
        for T in T_VALUES:
            if T is not None and T > n_steps:
                notes.append(f"T={T} skipped for {signal}: the shortest record has {n_steps} steps")
                continue
            scores = first_steps_mean([r[signal] for r in records], T)
            for level in ("generation", "prompt"):
                for subset, keep in subsets:
                    row = {"signal": signal, "T": _t_name(T), "level": level, "subset": subset}
                    idx = np.nonzero(keep)[0]
                    y, s = labels[idx], scores[idx]
                    if level == "prompt":
                        pids = [prompt_ids[i] for i in idx]
                        if subset != "all" and not _type_per_prompt(pids, [types[i] for i in idx], y):
                            notes.append(f"{subset} at prompt level skipped: a prompt's generations differ in type")
                            continue
                        _, s, y = per_prompt_scores(s, pids, y)
                    try:
                        row.update(detection_metrics(y, s))
                    except ValueError as err:
                        row.update({"n_pos": int(np.sum(y == 1)), "n_neg": int(np.sum(y == 0)), "undefined": str(err)})
                    rows.append(row)
                    if subset == "all" and "auc" in row:
                        fpr, tpr, _ = roc_points(y, s)
                        curves[(signal, _t_name(T), level)] = (fpr, tpr, row["auc"])

    return {
        "command": "detection",
        "scans": [str(d) for d in scan_dirs],
        "n_generations": len(records),
        "n_prompts": len(set(prompt_ids)),
        "labels_from": label_source,
        "n_steps_min": n_steps,
        "conventions": {
            "score": "mean of the per-step values over the first T steps (T='all': every step)",
            "prompt_level": "mean score over a prompt's generations; prompt label = 1 if any generation is 1",
            "type_subsets": "positives of that type vs. all negatives",
            "acc_wen": "max over ROC points of 1 - (FPR + 1 - TPR) / 2",
            "f1_best": "best F1 over thresholds, positive when score >= f1_best_threshold",
            "tpr_at_1pct_fpr_wen": "TPR at the last ROC point with FPR < 1% (Wen's notebook)",
            "tpr_at_1pct_fpr_nearest": "TPR at the ROC point whose FPR is closest to 1% (may exceed 1%; see "
            "fpr_of_nearest_point)",
        },
        "results": rows,
        "notes": sorted(set(notes), key=notes.index),
        "_curves": curves,
    }


def _type_per_prompt(pids: list, types: list, labels: np.ndarray) -> bool:
    seen: dict = {}
    for p, t, y in zip(pids, types, labels):
        key = t if y == 1 else None
        if seen.setdefault(p, key) != key:
            return False
    return True


def roc_figure_png(curves: dict, title: str = "") -> bytes:
    """PNG bytes of ROC curves: one panel per T, one line per signal and level; `curves[(signal, T, level)] =
    (fpr, tpr, auc)`."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ts = [t for t in ("1", "10", "all") if any(k[1] == t for k in curves)]
    fig, axes = plt.subplots(1, max(len(ts), 1), figsize=(4 * max(len(ts), 1), 4), squeeze=False)
    styles = {"generation": "-", "prompt": "--"}
    for ax, t in zip(axes[0], ts):
        for (signal, tt, level), (fpr, tpr, auc) in sorted(curves.items()):
            if tt == t:
                # D drawn wider underneath, so identical D and LD curves stay visible as two lines.
                width = 3.0 if signal == "D" else 1.4
                ax.plot(fpr, tpr, styles.get(level, "-"), lw=width, label=f"{signal} {level} (AUC {auc:.3f})")
        ax.plot([0, 1], [0, 1], ":", color="grey", linewidth=0.8)
        ax.axvline(0.01, color="red", linewidth=0.6, alpha=0.5)
        ax.set_title(f"T = {t} steps" if t != "all" else "T = all steps")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.legend(loc="lower right", fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


@app.command("detection")
def detection_command(
    scan: Annotated[list[Path], typer.Option("--scan", help="Scan directory; repeat for a negative scan.")],
    out: Annotated[Path, typer.Option("--out", help="Result JSON; the ROC plot goes next to it as *.roc.png.")],
) -> None:
    """AUC, Wen's ACC, best F1 and TPR@1%FPR (two conventions) for D and LD, T = 1, 10, all, per generation and
    per prompt."""
    result = detection_results(list(scan))
    curves = result.pop("_curves")
    plot = out.with_name(out.stem + ".roc.png")
    if curves:
        atomic_write_bytes(plot, roc_figure_png(curves, "ROC, all generations/prompts"))
        result["roc_plot"] = plot.name
    write_json(out, result)
    best = [r for r in result["results"] if r["subset"] == "all" and r["level"] == "generation" and "auc" in r]
    summary = ", ".join(f"{r['signal']} T={r['T']} AUC {r['auc']:.3f}" for r in best)
    typer.echo(f"detection: {result['n_generations']} generations; {summary}; wrote {out}")


# --------------------------------------------------------------------------------------------------------------
# Localization


def read_mask(path: Path) -> np.ndarray:
    """A mask image as bool (H, W): pixels >= 128 in grayscale are "memorized"."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L")) >= 128
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read mask ({err})") from None


def localization_results(scan_dir: Path, masks_dir: Path) -> dict:
    """The body of `memlens evaluate localization`."""
    from memlens.metrics import localization as L

    masks_dir = Path(masks_dir)
    if not masks_dir.is_dir():
        raise InputError(f"{masks_dir}: masks directory not found")
    records = load_generations(scan_dir, required=("prompt_index", "image", "be_map"))
    maps, masks, rows, missing = [], [], [], []
    for rec in records:
        mask_path = masks_dir / f"{record_key(rec)}.png"
        if not mask_path.is_file():
            missing.append(mask_path.name)
            continue
        image_path = rec["_dir"] / rec["image"]
        h, w = image_size(image_path, f" (from {where(rec)})")
        mask = read_mask(mask_path)
        if mask.shape != (h, w):
            raise InputError(
                f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but image {image_path} is {w}x{h}"
            )
        m = L.upsample_map(load_be_map(rec), (h, w))
        maps.append(m)
        masks.append(mask)
        rows.append(
            {
                "prompt_index": rec["prompt_index"],
                "image_index": rec.get("image_index"),
                "mask": mask_path.name,
                "mask_fraction": float(mask.mean()),
                "pixel_auroc": float(_safe_auroc(m, mask)),
                "iou_fixed_0.5": L.iou(L.binarize_fixed(m), mask),
                "iou_otsu": L.iou(L.binarize_otsu(m), mask),
            }
        )
    if not maps:
        raise InputError(
            f"{masks_dir}: no mask found for any of {len(records)} records (expected <index>.png, or "
            f"<prompt_index>.png for records without 'index'; e.g. {missing[0]})"
        )
    try:
        pooled_raw = L.pixel_auroc(maps, masks)
        pooled_mm = L.pixel_auroc([L.minmax_normalize(m) for m in maps], masks)
    except ValueError:
        pooled_raw = pooled_mm = float("nan")
    per_image, n_used = L.pixel_auroc_per_image(maps, masks)
    oracle, oracle_thr = L.oracle_iou(maps, masks)
    return {
        "command": "localization",
        "scan": str(scan_dir),
        "masks": str(masks_dir),
        "n_evaluated": len(maps),
        "n_missing_masks": len(missing),
        "missing_masks": sorted(set(missing))[:50],
        "upsampling": "bilinear (torch interpolate, align_corners=False) from attention resolution to mask size",
        "pixel_auroc_pooled": pooled_raw,
        "pixel_auroc_pooled_minmax": pooled_mm,
        "pixel_auroc_mean_per_image": per_image,
        "pixel_auroc_images_used": n_used,
        "iou_fixed_0.5_mean": float(np.mean([r["iou_fixed_0.5"] for r in rows])),
        "iou_otsu_mean": float(np.mean([r["iou_otsu"] for r in rows])),
        "oracle_iou_mean": oracle,
        "oracle_threshold": oracle_thr,
        "conventions": {
            "mask": "grayscale >= 128 is memorized",
            "iou_fixed_0.5": "map min-max normalised per image, then > 0.5",
            "iou_otsu": "map > skimage.filters.threshold_otsu(map)",
            "oracle_iou": "ORACLE: one threshold on min-max maps chosen on these masks to maximise mean IoU",
            "iou_empty": "IoU of an empty prediction against an empty mask is 1",
            "pixel_auroc_pooled": "all pixels of all images together, maps as given (raw attention)",
            "pixel_auroc_mean_per_image": "mean over images whose mask has both classes",
        },
        "per_image": rows,
    }


def _safe_auroc(m: np.ndarray, mask: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if mask.all() or not mask.any():
        return float("nan")
    return float(roc_auc_score(mask.ravel(), m.ravel()))


@app.command("localization")
def localization_command(
    scan: Annotated[Path, typer.Option("--scan", help="Scan directory.")],
    masks: Annotated[Path, typer.Option("--masks", help="Folder of <index>.png (or <prompt_index>.png) masks.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Result JSON (default: print it).")] = None,
) -> None:
    """Pixel AUROC, IoU at fixed thresholds (0.5 on min-max maps, Otsu) and the oracle IoU of BE maps vs masks."""
    result = localization_results(scan, masks)
    summary = (
        f"localization: {result['n_evaluated']} images ({result['n_missing_masks']} without a mask); "
        f"IoU@0.5 {result['iou_fixed_0.5_mean']:.3f}, Otsu {result['iou_otsu_mean']:.3f}"
    )
    _emit(result, out, summary)


# --------------------------------------------------------------------------------------------------------------
# Similarity


def reference_images(references_dir: Path, rec: dict) -> list[Path]:
    """Wen's layout: every image file in `references_dir/<index>/` (sorted); empty when the folder is missing."""
    folder = Path(references_dir) / record_key(rec)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def similarity_results(
    scan_dir: Path,
    references_dir: Path,
    sscd: Optional[Path] = None,
    preset: str = "sscd",
    clip_model: Optional[str] = None,
    clip_pretrained: Optional[Path] = None,
    mask_normalize: str = "mean",
) -> dict:
    """The body of `memlens evaluate similarity`."""
    from memlens.metrics import similarity as S

    references_dir = Path(references_dir)
    if not references_dir.is_dir():
        raise InputError(f"{references_dir}: references directory not found")
    if preset not in S.SSCD_PRESETS:
        raise InputError(f"--preset must be one of {sorted(S.SSCD_PRESETS)}, got {preset!r}")
    if mask_normalize not in ("mean", "minmax", "none"):
        raise InputError(f"--mask-normalize must be 'mean', 'minmax' or 'none', got {mask_normalize!r}")
    if (clip_model is None) != (clip_pretrained is None):
        raise InputError("--clip-model and --clip-pretrained go together")
    records = load_generations(scan_dir, required=("prompt_index", "image", "be_map", "prompt"))
    sscd_model = S.load_sscd(sscd) if sscd is not None else None
    clip = S.load_clip(clip_model, clip_pretrained) if clip_model is not None else None

    rows, missing = [], []
    for rec in records:
        gen = S.load_image(rec["_dir"] / rec["image"])
        row = {"prompt_index": rec["prompt_index"], "image_index": rec.get("image_index"), "label": rec.get("label")}
        if clip is not None:
            row["clip_score"] = float(S.clip_scores(*clip, [gen], [rec["prompt"]])[0])
        refs = reference_images(references_dir, rec)
        if not refs:
            missing.append(record_key(rec))
            rows.append(row)
            continue
        ref_images = [S.load_image(p) for p in refs]
        be_map = load_be_map(rec)
        l2 = [S.masked_l2(gen, x) for x in ref_images]
        l2m = [S.masked_l2(gen, x, be_map, mask_normalize) for x in ref_images]
        row.update({"n_references": len(refs), "l2_min": min(l2), "l2_masked_min": min(l2m)})
        if sscd_model is not None:
            emb = S.sscd_embeddings(sscd_model, [gen, *ref_images], preset)
            sims = S.cosine_similarity(emb[:1], emb[1:])[0]
            # Max over references, per pair first: each pair's own SSCD decides its indicator.
            row["sscd"] = float(sims.max())
            row["S"] = max(S.s_score(float(c), d) for c, d in zip(sims, l2))
            row["LS"] = max(S.ls_score(float(c), d) for c, d in zip(sims, l2m))
        rows.append(row)

    result = {
        "command": "similarity",
        "scan": str(scan_dir),
        "references": str(references_dir),
        "n_generations": len(records),
        "n_with_references": len(records) - len(missing),
        "n_missing_references": len(missing),
        "missing_references": sorted(set(missing))[:50],
        "sscd_model": str(sscd) if sscd is not None else None,
        "sscd_preset": preset if sscd is not None else None,
        "clip_model": clip_model,
        "clip_pretrained": str(clip_pretrained) if clip_pretrained is not None else None,
        "conventions": {
            "pixels": "RGB in [0, 1]; a reference of another size is resized (PIL bilinear) to the generation's",
            "mask": f"BE map upsampled bilinearly to image size, normalised '{mask_normalize}', same on all channels",
            "S": "-1[SSCD < 0.5] * ||x_hat - x||_2, max over references",
            "LS": "-1[SSCD < 0.5] * ||(x_hat - x) * m||_2, max over references",
            "sscd": "cosine of L2-normalised SSCD descriptors, max over references",
            "clip_score": "cosine of CLIP image and prompt features (no x100)",
            "f1_fixed": "memorized when SSCD >= 0.5, S > -50, LS > -50 (the paper's Table 2 thresholds)",
        },
        "summary": _similarity_summary(rows),
        "per_generation": rows,
    }
    return result


def _similarity_summary(rows: list[dict]) -> dict:
    from sklearn.metrics import f1_score

    summary: dict = {}
    for key in ("sscd", "S", "LS", "l2_min", "l2_masked_min", "clip_score"):
        vals = [r[key] for r in rows if key in r]
        if vals:
            summary[f"{key}_mean"] = float(np.mean(vals))
            by_prompt: dict = {}
            for r in rows:
                if key in r:
                    by_prompt.setdefault(r["prompt_index"], []).append(r[key])
            summary[f"{key}_mean_of_prompt_means"] = float(np.mean([np.mean(v) for v in by_prompt.values()]))
    rules = {"sscd": lambda v: v >= 0.5, "S": lambda v: v > -50, "LS": lambda v: v > -50}
    for key, rule in rules.items():
        pairs = [(r["label"], rule(r[key])) for r in rows if key in r and r.get("label") in (0, 1)]
        if pairs and len({p[0] for p in pairs}) == 2:
            y, pred = zip(*pairs)
            summary[f"{key}_f1_fixed"] = float(f1_score(list(y), list(pred)))
    return summary


@app.command("similarity")
def similarity_command(
    scan: Annotated[Path, typer.Option("--scan", help="Scan directory.")],
    references: Annotated[Path, typer.Option("--references", help="Folder of <index>/*.png training images.")],
    sscd: Annotated[Optional[Path], typer.Option("--sscd", help="SSCD TorchScript file.")] = None,
    preset: Annotated[str, typer.Option("--preset", help="SSCD preprocessing: 'sscd' (README) or 'wen'.")] = "sscd",
    clip_model: Annotated[Optional[str], typer.Option("--clip-model", help="open_clip architecture name.")] = None,
    clip_pretrained: Annotated[
        Optional[Path], typer.Option("--clip-pretrained", help="Local open_clip weights file.")
    ] = None,
    mask_normalize: Annotated[
        str, typer.Option("--mask-normalize", help="BE mask weights for LS: 'mean' (default), 'minmax' or 'none'.")
    ] = "mean",
    out: Annotated[Optional[Path], typer.Option("--out", help="Result JSON (default: print it).")] = None,
) -> None:
    """SSCD, S and LS (paper Eqs. 9-10) against reference images, and CLIP score against the prompt."""
    result = similarity_results(scan, references, sscd, preset, clip_model, clip_pretrained, mask_normalize)
    s = result["summary"]
    parts = [f"{k} {s[k + '_mean']:.3f}" for k in ("sscd", "S", "LS", "clip_score") if k + "_mean" in s]
    summary = (
        f"similarity: {result['n_with_references']}/{result['n_generations']} generations with references"
        + (f"; {', '.join(parts)}" if parts else "")
    )
    _emit(result, out, summary)
