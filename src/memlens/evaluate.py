"""Detection, localization and similarity numbers for run directories (the library behind `memlens evaluate`).

Records are read through `memlens.rundir.read_generations` (typed `Generation`s naming their file and line), scored
with the plain functions in `memlens.metrics`, and returned as results; writing goes through `memlens.rundir`'s
atomic writes, so a crash never leaves a complete-looking half result. Definitions: docs/metrics.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from memlens.errors import InputError
from memlens.rundir import Generation, atomic_write_bytes, read_generations, write_json

__all__ = ["DetectionResult", "detection_results", "localization_results", "similarity_results",
           "roc_figure_png", "reference_images", "read_mask", "mask_path", "write_detection"]

T_VALUES: tuple[int | None, ...] = (1, 10, None)  # None = all steps; the paper's Table 1 columns
SIGNALS = ("D", "LD")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# --------------------------------------------------------------------------------------------------------------
# Reading scans


def load_be_map(rec: Generation, field: str = "be_map", key: str | None = None) -> np.ndarray:
    """A record's BE map; with `key`, the map of that name in the record's `token_maps` file instead."""
    path = rec.path(field)
    try:
        if key is None:
            m = np.load(path)
        else:
            with np.load(path) as npz:
                if key not in npz.files:
                    raise InputError(f"{path} (from {rec.where()}): no map {key!r}; it has {', '.join(npz.files)}")
                m = npz[key]
    except (OSError, ValueError) as err:
        raise InputError(f"{path} (from {rec.where()}): cannot read BE map ({err})") from None
    if m.ndim != 2:
        raise InputError(f"{path} (from {rec.where()}): BE map must be 2-D (h, w), got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise InputError(f"{path} (from {rec.where()}): BE map contains NaN or infinity")
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
# Detection


def _labels(scans: list[list[Generation]]) -> tuple[np.ndarray, str]:
    """Per-record labels: the `label` fields, or (for a scan without them) 1 for the first scan and 0 for the rest."""
    labels, sources = [], set()
    for i, recs in enumerate(scans):
        have = [r.label is not None for r in recs]
        if all(have):
            labels += [int(r.label) for r in recs]
            sources.add("label field")
        elif not any(have):
            if i == 0 and len(scans) == 1:
                raise InputError(
                    f"{recs[0].source}: no 'label' fields; add them, or pass a second scan "
                    "of non-memorized prompts (the first scan then counts as memorized)"
                )
            labels += [1 if i == 0 else 0] * len(recs)
            sources.add("scan order (first scan = 1, others = 0)")
        else:
            bad = recs[have.index(False)]
            raise InputError(f"{bad.where()}: missing field 'label' (other lines of this scan have one)")
    return np.asarray(labels, dtype=np.int64), " + ".join(sorted(sources))


def _present_signals(records: list[Generation]) -> tuple[list[str], list[str]]:
    signals, notes = [], []
    for s in SIGNALS:
        have = [r.get(s) is not None for r in records]
        if all(have):
            signals.append(s)
        elif not any(have):
            notes.append(f"signal {s}: absent from every record, skipped")
        else:
            bad = records[have.index(False)]
            raise InputError(f"{bad.where()}: missing field '{s}' (other lines have it)")
    if not signals:
        raise InputError("no record has 'D' or 'LD'; nothing to evaluate")
    for r in records:
        r.check(*signals)
    return signals, notes


def _t_name(T: int | None) -> str:
    return "all" if T is None else str(T)


@dataclass
class DetectionResult:
    """`report`: the JSON document `memlens evaluate detection` writes; `curves[(signal, T, level)] = (fpr, tpr,
    auc)` for subset "all", for the ROC plot."""

    report: dict
    curves: dict = field(default_factory=dict)

    def row(self, signal: str, T: str = "all", level: str = "generation", subset: str = "all") -> dict:
        """One row of `report["results"]`; KeyError when that row was not computed."""
        for r in self.report["results"]:
            if (r["signal"], r["T"], r["level"], r["subset"]) == (signal, T, level, subset):
                return r
        raise KeyError((signal, T, level, subset))


def detection_results(scan_dirs: list[Path]) -> DetectionResult:
    """Every detection row for the given scans (the body of `memlens evaluate detection`)."""
    from memlens.metrics.detection import detection_metrics, first_steps_mean, per_prompt_scores, roc_points

    scan_dirs = [Path(d) for d in scan_dirs]
    if not scan_dirs:
        raise InputError("`scan_dirs`: give at least one scan directory")
    scans = [read_generations(d, required=("prompt_index",)) for d in scan_dirs]
    records = [r for recs in scans for r in recs]
    labels, label_source = _labels(scans)
    signals, notes = _present_signals(records)
    # Prompt identity is per scan: two scans both number their prompts from 0.
    prompt_ids = [(i, r.prompt_index) for i, recs in enumerate(scans) for r in recs]
    types = [r.type for r in records]
    n_steps = min(len(r.get(s)) for r in records for s in signals)

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
            scores = first_steps_mean([r.get(signal) for r in records], T)
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

    report = {
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
    }
    return DetectionResult(report, curves)


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


def write_detection(result: DetectionResult, out: Path) -> Path:
    """Write the detection JSON to `out` and, when there are curves, the ROC plot next to it as `*.roc.png`."""
    out = Path(out)
    report = dict(result.report)
    if result.curves:
        plot = out.with_name(out.stem + ".roc.png")
        atomic_write_bytes(plot, roc_figure_png(result.curves, "ROC, all generations/prompts"))
        report["roc_plot"] = plot.name
    write_json(out, report)
    return out


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


def mask_path(masks_dir: Path, rec: Generation) -> Path:
    """A record's mask: `<stem>.png` (one generation, e.g. `00003_05.png`) when present, else `<index>.png` (or
    `<prompt_index>.png` for a record without `index`), shared by every generation of the prompt."""
    own = Path(masks_dir) / f"{rec.stem}.png"
    return own if own.is_file() else Path(masks_dir) / f"{rec.name}.png"


def localization_results(scan_dir: Path, masks_dir: Path, token: Optional[str] = None) -> dict:
    """The body of `memlens evaluate localization`. `token` reads, instead of the BE map, the map of that name in
    each record's `token_maps` file (the demo's per-token comparison)."""
    from memlens.metrics import localization as L

    masks_dir = Path(masks_dir)
    if not masks_dir.is_dir():
        raise InputError(f"{masks_dir}: masks directory not found")
    map_field = "be_map" if token is None else "token_maps"
    records = read_generations(scan_dir, required=("prompt_index", "image"))
    maps, masks, rows, missing = [], [], [], []
    for rec in records:
        path = mask_path(masks_dir, rec)
        if not path.is_file():
            missing.append(path.name)
            continue
        rec.check(map_field)
        image_path = rec.path("image")
        h, w = image_size(image_path, f" (from {rec.where()})")
        mask = read_mask(path)
        if mask.shape != (h, w):
            raise InputError(
                f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but image {image_path} is {w}x{h}"
            )
        m = L.upsample_map(load_be_map(rec, map_field, token), (h, w))
        maps.append(m)
        masks.append(mask)
        rows.append(
            {
                "prompt_index": rec.prompt_index,
                "image_index": rec.image_index,
                "mask": path.name,
                "mask_fraction": float(mask.mean()),
                "pixel_auroc": float(_safe_auroc(m, mask)),
                "iou_fixed_0.5": L.iou(L.binarize_fixed(m), mask),
                "iou_otsu": L.iou(L.binarize_otsu(m), mask),
            }
        )
    if not maps:
        raise InputError(
            f"{masks_dir}: no mask found for any of {len(records)} records (expected <index>.png, or "
            f"<prompt_index>.png for records without 'index', or one per generation as <stem>.png; e.g. {missing[0]})"
        )
    try:
        pooled_raw = L.pixel_auroc(maps, masks)
    except ValueError:
        pooled_raw = float("nan")
    # The demo's localization numbers are this summary's, by construction.
    summary = L.localization_summary(maps, masks)
    pooled_mm = float("nan") if summary["pixel_auroc"] is None else summary["pixel_auroc"]
    per_image, n_used = L.pixel_auroc_per_image(maps, masks)
    oracle, oracle_thr = L.oracle_iou(maps, masks)
    return {
        "scan": str(scan_dir),
        "masks": str(masks_dir),
        "map": "be_map" if token is None else f"token_maps[{token}]",
        "n_evaluated": len(maps),
        "n_missing_masks": len(missing),
        "missing_masks": sorted(set(missing))[:50],
        "upsampling": "bilinear (torch interpolate, align_corners=False) from attention resolution to mask size",
        "pixel_auroc_pooled": pooled_raw,
        "pixel_auroc_pooled_minmax": pooled_mm,
        "pixel_auroc_mean_per_image": per_image,
        "pixel_auroc_images_used": n_used,
        "iou_fixed_0.5_mean": float(np.mean([r["iou_fixed_0.5"] for r in rows])),
        "iou_otsu_mean": summary["iou"],
        "oracle_iou_mean": oracle,
        "oracle_threshold": oracle_thr,
        "conventions": {
            "mask": "grayscale >= 128 is memorized",
            "iou_fixed_0.5": "map min-max normalised per image, then > 0.5",
            "iou_otsu": "map > skimage.filters.threshold_otsu(map)",
            "pixel_auroc_pooled_minmax": "all pixels of all images together, each map min-max normalised first",
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


# --------------------------------------------------------------------------------------------------------------
# Similarity


def reference_images(references_dir: Path, rec: dict) -> list[Path]:
    """Wen's layout: every image file in `references_dir/<index>/` (sorted); empty when the folder is missing."""
    folder = Path(references_dir) / rec.name
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
        raise InputError(f"`preset` must be one of {sorted(S.SSCD_PRESETS)}, got {preset!r}")
    if mask_normalize not in ("mean", "minmax", "none"):
        raise InputError(f"`mask_normalize` must be 'mean', 'minmax' or 'none', got {mask_normalize!r}")
    if (clip_model is None) != (clip_pretrained is None):
        raise InputError("`clip_model` and `clip_pretrained` go together")
    records = read_generations(scan_dir, required=("prompt_index", "image", "be_map", "prompt"))
    sscd_model = S.load_sscd(sscd) if sscd is not None else None
    clip = S.load_clip(clip_model, clip_pretrained) if clip_model is not None else None

    rows, missing = [], []
    for rec in records:
        gen = S.load_image(rec.path("image"))
        row = {"prompt_index": rec.prompt_index, "image_index": rec.image_index, "label": rec.label}
        if clip is not None:
            row["clip_score"] = float(S.clip_scores(*clip, [gen], [rec.prompt])[0])
        refs = reference_images(references_dir, rec)
        if not refs:
            missing.append(rec.name)
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
