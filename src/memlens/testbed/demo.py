"""`memlens demo`: run the shipped organism offline, outline memorization with the bright-ending probe, and write
pictures plus `summary.json`.

Prompts (fixed): the 8 memorized training captions (4 global, 4 local), `per_memorized` images each, and 16 generic
captions drawn from the training caption distribution with seed 12345, `per_generic` images each. Per-generation
criteria are those of `memlens.testbed.evaluation` (Pearson correlation >= 0.8 to the prompt's own item, inside its
box for local items).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import typer

from memlens.testbed.analysis import token_maps
from memlens.testbed.evaluation import (MATCH_CORR, _items_by_group, detection, localization, prompt_set,
                                        score_generation)


def _generate(pipe, prompts: list[str], per_prompt: int, steps: int, guidance: float, seed: int):
    """Images, probe records (in image order) and the probed block's all-token last-step attention (N, h, w, T)."""
    from memlens import BrightEndingProbe
    from memlens.testbed.analysis import FullAttention

    gen = torch.Generator(device="cpu").manual_seed(seed)
    # FullAttention goes on first so that the probe wraps it; it only adds the other tokens' maps for comparison.
    with FullAttention(pipe) as full, BrightEndingProbe(pipe) as probe:
        out = pipe(prompts, num_images_per_prompt=per_prompt, num_inference_steps=steps, guidance_scale=guidance,
                   generator=gen)
    block = ".".join(probe.layer_names[0].split(".")[:2])
    return out.images, probe.records, full.maps()[block]


def _gt_picture(item: dict) -> "Image.Image":
    """Reference pixels with everything outside the ground-truth mask darkened."""
    from PIL import Image

    ref = item["reference"].astype(np.float32)
    shade = np.where(item["mask"][..., None], 1.0, 0.25)
    return Image.fromarray((ref * shade).astype(np.uint8))


def run_demo(out_dir: str | Path, model: str | Path | None = None, per_memorized: int = 8, per_generic: int = 2,
             n_generic: int = 16, steps: int | None = None, guidance: float | None = None, seed: int = 0,
             threads: int | None = 1, verbose: bool = True) -> dict:
    """Generate, probe, score; write images, BE overlays, ground truth and summary.json to `out_dir`."""
    from memlens.maps import overlay, save_png
    from memlens.testbed.pipeline import load_pipeline

    t0 = time.time()
    if threads:
        # This model's ops are tiny; with 2+ threads on a machine where other jobs run, OpenMP spin-waiting made
        # generation 6-16x slower in our measurements, while 1 thread degrades gracefully.
        torch.set_num_threads(threads)
    out = Path(out_dir)
    pipe = load_pipeline(model)  # before anything is written: a bad --model leaves no output folder behind
    out.mkdir(parents=True, exist_ok=True)
    steps = steps or pipe.config.default_num_inference_steps
    guidance = guidance if guidance is not None else pipe.config.default_guidance_scale
    items = _items_by_group()
    prompts = prompt_set(n_generic)
    memorized = [p for p in prompts if p.kind != "generic"]
    generic = [p for p in prompts if p.kind == "generic"]

    rows = []
    for group, per, call_seed in ((memorized, per_memorized, seed), (generic, per_generic, seed + 1)):
        images, records, attention = _generate(pipe, [p.text for p in group], per, steps, guidance, call_seed)
        for i, (img, rec) in enumerate(zip(images, records)):
            p = group[i // per]
            label = p.group if p.kind != "generic" else f"{i // per:02d}"
            rows.append({"prompt": p, "image": img, "record": rec, "name": f"{p.kind}_{label}_{i % per}",
                         "tokens": token_maps(attention[i], rec.eos_index)})

    per_gen, loc_maps, loc_masks, loc_tokens = [], [], [], []
    for r in rows:
        p, rec, img, name = r["prompt"], r["record"], r["image"], r["name"]
        save_png(img, out / "images" / f"{name}.png")
        save_png(overlay(img, rec.be_map), out / "be" / f"{name}.png")
        score = score_generation(np.asarray(img), p.kind, p.group, items)
        entry = {"name": name, "prompt": p.text, "kind": p.kind, "group": p.group,
                 "D": float(np.mean(rec.magnitude)), "LD": float(np.mean(rec.masked_magnitude)),
                 "be_mean": float(rec.be_map.mean()), **score}
        per_gen.append(entry)
        if p.kind == "local" and score["reproduces_own"]:
            loc_maps.append(rec.be_map)
            loc_masks.append(items[p.group]["mask"])
            loc_tokens.append(r["tokens"])
    for group, item in items.items():
        save_png(_gt_picture(item), out / "ground_truth" / f"{item['kind']}_{group}.png")

    def subset(kind):
        return [e for e in per_gen if e["kind"] == kind]

    summary = {
        "memorization_rate": {k: float(np.mean([e["reproduces_own"] for e in subset(k)])) for k in ("local", "global")},
        "novelty": {"generic": float(np.mean([e["novel"] for e in subset("generic")]))},
        "localization": localization(loc_maps, loc_masks),
        # Same generations and rule, other tokens of the same layers: where the signal lives in this model.
        "localization_by_token": {tok: localization([t[tok] for t in loc_tokens], loc_masks)
                                  for tok in ("END", "padding", "BOS", "word_mean")},
        "detection": {
            k: {m: detection([e[m] for e in subset(k)], [e[m] for e in subset("generic")]) for m in ("D", "LD")}
            for k in ("local", "global")
        },
        "settings": {"steps": steps, "guidance_scale": guidance, "seed": seed, "per_memorized": per_memorized,
                     "per_generic": per_generic, "n_generic_prompts": n_generic, "match_corr": MATCH_CORR,
                     "model": str(model) if model else "shipped", "iou_threshold": "otsu",
                     "localization_subset": "local generations that reproduce their own patch"},
        "generations": per_gen,
        "seconds": round(time.time() - t0, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    if verbose:
        typer.echo(format_summary(summary, out))
    return summary


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def format_summary(s: dict, out: Path) -> str:
    loc, det = s["localization"], s["detection"]
    lines = [
        f"memorization rate: global {_fmt(s['memorization_rate']['global'])}, "
        f"local {_fmt(s['memorization_rate']['local'])}; generic novelty {_fmt(s['novelty']['generic'])}",
        f"localization (BE map vs ground truth, {loc['n']} local copies): pixel AUROC {_fmt(loc['pixel_auroc'])}, "
        f"IoU {_fmt(loc['iou'])}",
        "  same, other tokens: " + ", ".join(f"{t} AUROC {_fmt(v['pixel_auroc'])} IoU {_fmt(v['iou'])}"
                                           for t, v in s["localization_by_token"].items() if t != "END"),
    ]
    for k in ("global", "local"):
        lines.append(f"detection {k} vs generic: " + ", ".join(
            f"{m} AUC {_fmt(det[k][m]['auc'])} TPR@1%FPR {_fmt(det[k][m]['tpr_at_1pct_fpr'])}" for m in ("D", "LD")))
    lines.append(f"wrote {out}/summary.json and pictures in {s['seconds']:.0f} s")
    return "\n".join(lines)


def demo_command(
    out: Path = typer.Option(..., "--out", help="Directory for pictures and summary.json."),
    model: Path = typer.Option(None, "--model", help="Organism directory; default: the one shipped in memlens."),
    per_memorized: int = typer.Option(8, "--per-memorized", help="Images per memorized prompt (32 per subset at 8)."),
    per_generic: int = typer.Option(2, "--per-generic", help="Images per generic prompt."),
    steps: int = typer.Option(None, "--steps", min=1, help="DDIM steps (default: the organism's recommendation)."),
    guidance: float = typer.Option(None, "--guidance", help="Guidance scale (default: the organism's)."),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(1, "--threads", help="torch threads; 1 (default) is fastest on a busy machine."),
) -> None:
    """Generate with the shipped organism, outline memorization with the BE probe, write pictures + summary.json."""
    run_demo(out, model=model, per_memorized=per_memorized, per_generic=per_generic, steps=steps,
             guidance=guidance, seed=seed, threads=threads)
