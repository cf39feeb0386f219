"""Privacy-utility curves of the inference-time mitigations on the model organism (the paper's Figs. 6/7, offline).

For every method and strength, each memorized prompt (global and local items) and a few generic prompts are generated
with the same seeds as the unmitigated run, and scored with criteria that need no downloaded model:

- privacy (lower = less memorized):
  `own_corr`  Pearson correlation with the item's reference inside its region (the organism's pixel criterion,
              `memlens.testbed.evaluation.item_similarity`); `reproduced` = own_corr >= 0.8;
  `LS`        BE-masked L2 distance to the reference (`memlens.metrics.similarity.masked_l2`, mask = the
              generation's own BE map, weights / mean), reported as -L2 so that, like the paper's LS, higher = closer.
- utility (higher = better):
  `keep_generic`  mean correlation of generic prompts' images with their unmitigated versions (1.0 = untouched:
                  a mitigation should not fire on prompts that are not memorized);
  `keep_context`  for local items, correlation with the unmitigated image OUTSIDE the memorized box (the part of the
                  picture the user asked for and nobody owns).
  There is no CLIP score offline; these proxies measure what the organism can measure.

Strengths: `pe`/`pe-be` targets and `prss`/`prss-be` l_target_ss are fractions of the median first-step magnitude of
the memorized prompts in the unmitigated run (so the script adapts to any checkpoint); PR uses l = target,
M = 5/3 * target (the reference's 3/5 ratio). SS paraphrases: the prompt with one word dropped, one per word (the
organism has no human paraphrases). `rt` strengths are insertion counts, `gni` strengths are lambda.

    python benchmarks/mitigation_curves.py --model runs/r1 --steps 20 --seeds 2 --out runs/mitigation_curves
    python benchmarks/mitigation_curves.py --smoke      # a random-weight organism, a few steps: checks it runs
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

FRACTIONS = (0.8, 0.6, 0.4, 0.2)
RT_COUNTS = (1, 4)
GNI_LAMBDAS = (0.1, 0.3)


def _pipeline(args):
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.smoke:
        from memlens.testbed.data import ITEMS
        from memlens.testbed.pipeline import build_pipeline, build_tokenizer

        torch.manual_seed(0)
        return build_pipeline(build_tokenizer([it.prompt for it in ITEMS] + ["a red circle on the left"]))
    from memlens.testbed.pipeline import load_pipeline

    return load_pipeline(args.model) if args.model else load_pipeline()


def _items_and_prompts(args, n_generic: int):
    """The organism's own items (its ground_truth/) and prompts; the smoke pipeline uses the v1 item set."""
    from memlens.testbed.evaluation import prompt_set

    if args.smoke:
        from memlens.testbed.data import memorized_items

        return {it["group"]: it for it in memorized_items("v1")}, prompt_set(n_generic=n_generic)
    from memlens.testbed.analysis import organism_items
    from memlens.testbed.pipeline import WEIGHTS_DIR

    items, prompts = organism_items(args.model or WEIGHTS_DIR, n_generic)
    return {g: {"group": g, "reference": it.reference, "box": it.box, "mask": it.mask} for g, it in items.items()}, \
        prompts


def _paraphrases(prompt: str) -> tuple[str, ...]:
    words = prompt.split()
    return tuple(" ".join(words[:i] + words[i + 1 :]) for i in range(len(words))) if len(words) > 1 else ()


def _run(pipe, prompts, seeds, settings, batch: int):
    from memlens.mitigation import Job, mitigate_batch

    jobs = [Job(p.text, s, _paraphrases(p.text)) for p in prompts for s in seeds]
    outs = []
    t0 = time.perf_counter()
    for i in range(0, len(jobs), batch):
        outs += mitigate_batch(pipe, jobs[i : i + batch], settings)
    return outs, time.perf_counter() - t0


def _score(items, prompts, seeds, outs, base_outs):
    from memlens.metrics.similarity import masked_l2
    from memlens.testbed.evaluation import item_similarity, pearson

    rows = []
    k = 0
    for p in prompts:
        for _ in seeds:
            o, b = outs[k], base_outs[k]
            k += 1
            img = np.asarray(o.image.convert("RGB"))
            ref_img = np.asarray(b.image.convert("RGB"))
            row = {"kind": p.kind, "triggered": o.triggered, "final": o.final_magnitude}
            if p.kind == "generic":
                row["keep"] = pearson(img, ref_img)
            else:
                it = items[p.group]
                row["own_corr"] = item_similarity(img, it)
                row["LS"] = -masked_l2(img.astype(np.float32) / 255, it["reference"].astype(np.float32) / 255,
                                       o.record.be_map)
                if p.kind == "local":
                    outside = ~it["mask"]
                    row["keep"] = pearson(img[outside], ref_img[outside])
            rows.append(row)
    return rows


def _summary(method, strength, rows, seconds):
    def mean(kind, key):
        vals = [r[key] for r in rows if r["kind"] == kind and key in r]
        return float(np.mean(vals)) if vals else None

    out = {"method": method, "strength": strength, "seconds": round(seconds, 2)}
    for kind in ("local", "global"):
        out[f"{kind}_own_corr"] = mean(kind, "own_corr")
        out[f"{kind}_reproduced"] = float(np.mean([r["own_corr"] >= 0.8 for r in rows if r["kind"] == kind]))
        out[f"{kind}_LS"] = mean(kind, "LS")
        out[f"{kind}_triggered"] = float(np.mean([r["triggered"] for r in rows if r["kind"] == kind]))
    out["local_keep_context"] = mean("local", "keep")
    out["generic_keep"] = mean("generic", "keep")
    out["generic_triggered"] = float(np.mean([r["triggered"] for r in rows if r["kind"] == "generic"]))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="organism folder (default: the shipped weights)")
    ap.add_argument("--smoke", action="store_true", help="random-weight organism, 3 steps, few strengths")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=None, help="default: the organism's recommended scale")
    ap.add_argument("--seeds", type=int, default=2, help="images per prompt")
    ap.add_argument("--generic", type=int, default=4, help="generic prompts")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--methods", default="none,pe,pe-be,prss,prss-be,rt,gni")
    ap.add_argument("--out", default="runs/mitigation_curves")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.seeds, args.generic = 3, 1, 2

    from memlens.mitigation import Settings
    from memlens.errors import InputError

    try:
        pipe = _pipeline(args)
    except InputError as err:
        print(f"organism not available ({err}); train one with `memlens testbed train` or pass --smoke")
        return 1
    guidance = args.guidance or getattr(pipe.config, "default_guidance_scale", 2.0)
    items, prompts = _items_and_prompts(args, args.generic)
    seeds = list(range(1000, 1000 + args.seeds))
    base = Settings(method="none", steps=args.steps, guidance=guidance)
    base_outs, secs = _run(pipe, prompts, seeds, base, args.batch)
    mem = [o.initial_magnitude for o, p in zip(base_outs, [p for p in prompts for _ in seeds]) if p.kind != "generic"]
    scale = float(np.median(mem))
    fractions = FRACTIONS[1::2] if args.smoke else FRACTIONS
    results = [_summary("none", 0.0, _score(items, prompts, seeds, base_outs, base_outs), secs)]
    methods = args.methods.split(",")
    grid = []
    for m in methods:
        if m in ("pe", "pe-be"):
            grid += [(m, f, dict(target=f * scale)) for f in fractions]
        elif m in ("prss", "prss-be"):
            grid += [(m, f, dict(l_target_ss=f * scale, l_target_pr=f * scale, mag_thres_pr=f * scale * 5 / 3))
                     for f in fractions]
        elif m in ("rt", "rna", "cwr"):
            grid += [(m, c, dict(repeat=c)) for c in RT_COUNTS[: 1 if args.smoke else None]]
        elif m == "gni":
            grid += [(m, lam, dict(noise_lambda=lam)) for lam in GNI_LAMBDAS[: 1 if args.smoke else None]]
    for m, strength, kw in grid:
        s = Settings(method=m, steps=args.steps, guidance=guidance, **kw)
        outs, secs = _run(pipe, prompts, seeds, s, args.batch)
        results.append(_summary(m, strength, _score(items, prompts, seeds, outs, base_outs), secs))
        print(json.dumps(results[-1]), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model or ("random (smoke)" if args.smoke else "shipped"), "steps": args.steps,
            "guidance": guidance, "seeds": seeds, "magnitude_scale": scale, "results": results}
    (out / "curves.json").write_text(json.dumps(meta, indent=1))
    table = _table(results, scale)
    (out / "curves.md").write_text(table)
    print(table)
    _plot(results, out / "curves.png")
    return 0


def _fmt(v):
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _table(results, scale) -> str:
    cols = ["method", "strength", "local_triggered", "local_own_corr", "local_reproduced", "local_LS",
            "local_keep_context", "global_triggered", "global_own_corr", "global_reproduced", "global_LS",
            "generic_triggered", "generic_keep", "seconds"]
    lines = [f"magnitude scale (median first-step magnitude of memorized prompts, unmitigated): {scale:.3f}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _plot(results, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind, utility in ((axes[0], "local", "local_keep_context"), (axes[1], "global", "generic_keep")):
        for m in dict.fromkeys(r["method"] for r in results):
            pts = [(r[utility], r[f"{kind}_own_corr"]) for r in results if r["method"] == m
                   and r[utility] is not None and r[f"{kind}_own_corr"] is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, "o-" if len(pts) > 1 else "*", label=m)
        ax.set_xlabel(utility + " (utility, higher better)")
        ax.set_ylabel(f"{kind} own_corr (memorization, lower better)")
        ax.set_title(f"{kind} memorization")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
