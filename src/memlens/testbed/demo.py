"""`memlens demo`: the organism end to end, as a scan plus its ground truth, scored by `memlens evaluate`.

1. The prompts come from the organism folder's ground truth (`memlens.testbed.items.load_ground_truth`): its
   memorized items' captions (label 1, type global/local, index = the item's group), `per_memorized` images each,
   and the first `n_generic` captions of its non-memorized training rows (label 0, type generic), `per_generic`
   images each.
2. They are generated and probed by `memlens.scan.run_scan` with the `BrightEndingProbe` (seeds: `memlens scan`'s,
   image i of the whole list gets seed + i). A second reader on the same layers records every token's last-step map
   (`token_maps/`), for the "which token carries it" table.
3. The ground truth goes next to the scan as files: each generation's copy score (`ground_truth/copies.jsonl`:
   Pearson r >= 0.8 to its own item, inside the box for local items, see `memlens.testbed.evaluation`), the items
   (`ground_truth/items.json`), their references in Wen's layout (`ground_truth/references/<group>/`), and one mask
   per local generation that reproduces its own item (`masks/<stem>.png`).
4. `memlens evaluate detection` and `localization` (the same functions) and `memlens report` run on the folder;
   `summary.json` collects their numbers, so the two commands reprint them exactly.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memlens.errors import InputError
from memlens.testbed.items import load_ground_truth

MASKS = "masks"
GROUND_TRUTH = "ground_truth"
SUMMARY = "summary.json"
REPORT = "report.html"
DETECTION = "detection.json"
LOCALIZATION = "localization.json"
# Besides the scan's own files, what the demo keeps in its folder (a rerun may find them there).
OWN_FILES = (MASKS, GROUND_TRUTH, SUMMARY, REPORT, DETECTION, "detection.roc.png", LOCALIZATION)




@dataclass(frozen=True)
class DemoResult:
    path: Path
    summary: dict


# The probe's layer sets read beside the probed block for the per-token table (prefixes of summary.json's names).
COMBINED_LAYERS = ("outer", "all")


class _TokenMapsProbe:
    """The scan's `BrightEndingProbe`, plus every token's last-step map of the probed block on each record
    (`record.token_maps`, written by the scan to `token_maps/<stem>.npz`)."""

    def __init__(self, pipe, **options):
        from memlens.probe import BrightEndingProbe
        from memlens.testbed.analysis import FullAttention

        # The all-token reader shares the probe's capture processors; it only adds the other tokens' maps.
        self.full = FullAttention(pipe)
        self.probe = BrightEndingProbe(pipe, **options)
        self.unet = pipe.unet

    def __enter__(self):
        self.full.__enter__()
        try:
            self.probe.__enter__()
        except BaseException:
            self.full.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        try:
            self.probe.__exit__(*exc)
        finally:
            self.full.__exit__(*exc)

    def clear(self) -> None:
        self.probe.clear()
        self.full.sink.store.clear()

    @property
    def records(self):
        from memlens.testbed.tokens import token_maps

        from memlens import capture

        records = list(self.probe.records)
        # Unprefixed names read the paper's block (the probe's default layers), whatever layers the probe reads.
        block = ".".join(capture.select_layers(self.unet, None)[0].name.split(".")[:2])
        # Besides the probed block: both ends of the UNet together (the probe's layers="outer"), prefixed "outer/",
        # and every cross-attention block on the finest grid (layers="all"), prefixed "all/".
        groups = {name: sorted({".".join(layer.name.split(".")[:2])
                                for layer in capture.select_layers(self.unet, name)}) for name in COMBINED_LAYERS}
        maps = self.full.maps(groups)
        for i, rec in enumerate(records):  # (N, h, w, T) per block, same images in the same order
            rec.token_maps = token_maps(maps[block][i], rec.eos_index)
            for name in COMBINED_LAYERS:
                rec.token_maps.update({f"{name}/{k}": v for k, v in token_maps(maps[name][i], rec.eos_index).items()})
        return records


def demo_prompts(truth, n_generic: int) -> list:
    """The demo's prompt records: memorized items first, then `n_generic` generic captions."""
    from memlens.prompts import PromptRecord

    if n_generic > len(truth.generic_prompts):
        raise InputError(f"`n_generic` is {n_generic} but the organism lists {len(truth.generic_prompts)} generic "
                         "prompts")
    records = [PromptRecord(prompt=it.prompt, label=1, type=it.kind, index=it.group) for it in truth.items]
    records += [PromptRecord(prompt=p, label=0, type="generic", index=f"generic{i:02d}")
                for i, p in enumerate(truth.generic_prompts[:n_generic])]
    return records


def run_demo(out_dir: str | Path, organism: str | Path | None = None, *, per_memorized: int = 8,
             per_generic: int = 2, n_generic: int = 64, steps: int | None = None, guidance: float | None = None,
             seed: int = 0, batch_size: int = 16, progress: bool = True,
             probe_options: dict | None = None) -> DemoResult:
    """Scan the organism's prompts into `out_dir`, write its ground truth, evaluate, report; see the module doc.
    `probe_options` go to the `BrightEndingProbe` (e.g. ``{"layers": "all"}``): its map is the one localization,
    LD and the report use; the per-token table reads the same generations either way."""
    from memlens import rundir
    from memlens.scan import _check_positive, run_scan
    from memlens.testbed.pipeline import load_pipeline, organism_path

    t0 = time.time()
    _check_positive(per_memorized=per_memorized, per_generic=per_generic, n_generic=n_generic, steps=steps,
                    batch_size=batch_size)
    organism = organism_path(organism)
    out = rundir.check_output(out_dir, "demo", own=OWN_FILES)
    if not (organism / "model_index.json").is_file():
        raise InputError(f"{organism}: no model_index.json; expected an organism folder written by "
                         "`memlens testbed train`")
    truth = load_ground_truth(organism)
    prompts = demo_prompts(truth, n_generic)
    counts = [per_memorized] * len(truth.items) + [per_generic] * n_generic
    pipe = load_pipeline(organism)
    scan = run_scan(pipe, prompts, out, num_images=counts, steps=steps, guidance=guidance, seed=seed,
                    batch_size=batch_size, model_name=str(organism.resolve()), progress=progress,
                    probe_factory=_TokenMapsProbe, probe_options=probe_options, kind="demo", own_files=OWN_FILES)
    if scan.status != "complete":
        raise InputError(f"`out_dir` {out}: the scan is incomplete ({scan.num_records} of {scan.num_images})")
    settings = (rundir.read_run_json(out) or {})["settings"]

    copies = write_ground_truth(out, truth)
    summary = evaluate_demo(out, copies, truth.by_group())
    summary["settings"] = {
        "steps": settings["steps"], "guidance_scale": settings["guidance"], "seed": seed,
        "per_memorized": per_memorized, "per_generic": per_generic, "n_generic_prompts": n_generic,
        "model": str(organism), "items_from": "organism", "probe": dict(probe_options or {}), "match_corr": _match_corr(), "iou_threshold": "otsu",
        "localization_subset": "local generations that reproduce their own patch",
    }
    summary["generations"] = copies
    summary["seconds"] = round(time.time() - t0, 1)
    from memlens.report import write_report

    write_report(out, out / REPORT, references=out / GROUND_TRUTH / "references")
    # Last: a summary.json on disk means every other file of the demo is there too.
    rundir.write_json(out / SUMMARY, summary)
    return DemoResult(out, summary)


def _match_corr() -> float:
    from memlens.testbed.evaluation import MATCH_CORR

    return MATCH_CORR


def write_ground_truth(out: Path, truth) -> list[dict]:
    """Score every generation against the items and write the ground-truth files; returns the per-generation rows."""
    from PIL import Image

    from memlens import rundir
    from memlens.maps import save_png
    from memlens.testbed.evaluation import score_generation

    items = {it.group: it for it in truth.items}
    gt = out / GROUND_TRUTH
    rows = []
    for it in truth.items:
        save_png(Image.fromarray(np.asarray(it.reference, np.uint8)), gt / "references" / it.group / "reference.png")
        save_png(Image.fromarray(np.asarray(it.mask, bool).astype(np.uint8) * 255), gt / "item_masks" / f"{it.group}.png")
    rundir.write_json(gt / "items.json", [
        {"group": it.group, "kind": it.kind, "prompt": it.prompt, "box": list(it.box) if it.box else None,
         "copies": it.copies, "reference": f"references/{it.group}/reference.png",
         "mask": f"item_masks/{it.group}.png"} for it in truth.items])

    masks = out / MASKS
    masks.mkdir(exist_ok=True)
    for old in masks.glob("*.png"):  # a rerun rescoring the same images writes the same set; start clean
        old.unlink()
    for rec in rundir.read_generations(out, required=("image",)):
        with Image.open(rec.path("image")) as im:
            img = np.asarray(im.convert("RGB"))
        kind = rec.type
        group = rec.index if kind in ("global", "local") else None
        score = score_generation(img, kind, group, items)
        rows.append({"prompt_index": rec.prompt_index, "image_index": rec.image_index, "stem": rec.stem,
                     "prompt": rec.prompt, "kind": kind, "group": group,
                     "D": float(np.mean(rec.D)), "LD": float(np.mean(rec.LD)), **score})
        if kind == "local" and score["reproduces_own"]:
            save_png(Image.fromarray(np.asarray(items[group].mask, bool).astype(np.uint8) * 255),
                     masks / f"{rec.stem}.png")
    rundir.atomic_write_bytes(gt / "copies.jsonl", "".join(json.dumps(rundir.jsonable(r)) + "\n" for r in rows).encode())
    return rows


def _layer_group(token_name: str) -> int:
    """0 for the probed block's names, then the COMBINED_LAYERS prefixes in order."""
    prefix = token_name.split("/")[0] if "/" in token_name else None
    return 0 if prefix is None else 1 + COMBINED_LAYERS.index(prefix)


def localization_breakdown(out: Path, items: dict) -> tuple[dict, dict]:
    """Over the generations that have a mask (local copies of their own item): per token name (see
    `memlens.testbed.tokens`) the localization of that token's map, and per template size the probe map's, with
    the best IoU the attention grid allows (`grid_iou_bound`, mean over the generations)."""
    from memlens.evaluate import load_be_map, mask_path, read_mask
    from memlens.metrics import localization_summary
    from memlens.rundir import read_generations
    from memlens.testbed.tokens import grid_iou_bound

    per_token: dict[str, tuple[list, list]] = {}
    per_size: dict[str, tuple[list, list, list]] = {}
    for rec in read_generations(out, required=("be_map", "token_maps")):
        path = mask_path(out / MASKS, rec)
        if not path.is_file():
            continue
        mask = read_mask(path)
        with np.load(rec.path("token_maps")) as npz:
            for name in npz.files:
                maps, masks = per_token.setdefault(name, ([], []))
                maps.append(npz[name])
                masks.append(mask)
        be = load_be_map(rec)
        x0, y0, x1, y1 = items[rec.index].box
        maps, masks, bounds = per_size.setdefault(f"{x1 - x0}x{y1 - y0}", ([], [], []))
        maps.append(be)
        masks.append(mask)
        bounds.append(grid_iou_bound(mask, be.shape))
    order = {"bos": 0, "word": 1, "end": 2, "pad": 3}
    by_token = {name: localization_summary(*per_token[name])
                for name in sorted(per_token, key=lambda n: (_layer_group(n),
                                                             order.get(n.split("/")[-1].split("_")[0][:3], 9), n))}
    by_size = {}
    for size in sorted(per_size, key=lambda k: -int(k.split("x")[0])):
        maps, masks, bounds = per_size[size]
        by_size[size] = {**localization_summary(maps, masks), "iou_grid_bound": float(np.mean(bounds)),
                         "area_fraction": float(np.mean([m.mean() for m in masks]))}
    return by_token, by_size


def evaluate_demo(out: Path, copies: list[dict], items: dict) -> dict:
    """summary.json's numbers: copy rates from the ground truth, the rest from `memlens.evaluate` on the folder."""
    from memlens.evaluate import detection_results, localization_results, write_detection
    from memlens.rundir import write_json

    def rate(kind: str, key: str):
        vals = [bool(r[key]) for r in copies if r["kind"] == kind]
        return float(np.mean(vals)) if vals else None

    detection = detection_results([out])
    write_detection(detection, out / DETECTION)

    def det(kind: str, signal: str) -> dict:
        try:
            row = detection.row(signal, "all", "generation", f"type={kind}")
        except KeyError:
            return {"auc": None, "tpr_at_1pct_fpr": None}
        return {"auc": row.get("auc"), "tpr_at_1pct_fpr": row.get("tpr_at_1pct_fpr_wen")}

    def loc() -> dict:
        if not any((out / MASKS).glob("*.png")):
            return {"pixel_auroc": None, "iou": None, "n": 0}
        res = localization_results(out, out / MASKS)
        write_json(out / LOCALIZATION, res)
        auroc = res["pixel_auroc_pooled_minmax"]
        return {"pixel_auroc": None if auroc != auroc else auroc, "iou": res["iou_otsu_mean"], "n": res["n_evaluated"]}

    by_token, by_size = localization_breakdown(out, items)

    return {
        "memorization_rate": {k: rate(k, "reproduces_own") for k in ("local", "global")},
        "novelty": {"generic": rate("generic", "novel")},
        "localization": loc(),
        # Same generations and masks, every token of the same layers: where the signal lives in this model.
        "localization_by_token": by_token,
        # The probe's map again, per template size; small templates' IoU is bounded by the attention grid.
        "localization_by_size": by_size,
        "detection": {k: {m: det(k, m) for m in ("D", "LD")} for k in ("local", "global")},
        "evaluation": {
            "localization": f"memlens evaluate localization --scan {out} --masks {out / MASKS}: pixel_auroc = "
                            "pixel_auroc_pooled_minmax, iou = iou_otsu_mean, n = n_evaluated",
            "detection": f"memlens evaluate detection --scan {out}: signal D/LD, T=all, level generation, subset "
                         "type=global/local; auc = auc, tpr_at_1pct_fpr = tpr_at_1pct_fpr_wen",
        },
    }


# The terminal line's selection; summary.json has every token, of the probed block, of "outer/" (both ends) and of
# "all/" (every block on the finest grid).
SUMMARY_TOKENS = ("bos", "word_mean", "end", "pad_mean", "end+padding", "outer/end", "outer/end+padding", "all/end",
                  "all/end+padding")


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def format_summary(s: dict, out: Path) -> str:
    loc, det = s["localization"], s["detection"]
    lines = [
        f"memorization rate: global {_fmt(s['memorization_rate']['global'])}, "
        f"local {_fmt(s['memorization_rate']['local'])}; generic novelty {_fmt(s['novelty']['generic'])}",
        f"localization (BE map vs ground truth, {loc['n']} local copies): pixel AUROC {_fmt(loc['pixel_auroc'])}, "
        f"IoU {_fmt(loc['iou'])}",
        "  same generations, token by token: " + ", ".join(
            f"{t} {_fmt(v['pixel_auroc'])}/{_fmt(v['iou'])}" for t, v in s["localization_by_token"].items()
            if t in SUMMARY_TOKENS),
        "  by template size (AUROC/IoU, the grid's IoU bound): " + ", ".join(
            f"{k} {_fmt(v['pixel_auroc'])}/{_fmt(v['iou'])} ({_fmt(v['iou_grid_bound'])})"
            for k, v in s.get("localization_by_size", {}).items()),
    ]
    for k in ("global", "local"):
        lines.append(f"detection {k} vs generic: " + ", ".join(
            f"{m} AUC {_fmt(det[k][m]['auc'])} TPR@1%FPR {_fmt(det[k][m]['tpr_at_1pct_fpr'])}" for m in ("D", "LD")))
    lines.append(f"wrote {out}/{SUMMARY} and {out}/{REPORT} in {s['seconds']:.0f} s; the same numbers: "
                 f"memlens evaluate detection --scan {out}; memlens evaluate localization --scan {out} "
                 f"--masks {out}/{MASKS}")
    return "\n".join(lines)
