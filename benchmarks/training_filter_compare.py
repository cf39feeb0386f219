"""Compare organisms trained with and without the training-time filter: memorization against generic quality.

    python benchmarks/training_filter_compare.py none=runs/rQ D=runs/rQ_D LD=runs/rQ_LD --out runs/filter_compare

For each model (each `name=path` argument):
- `memlens demo` on it (same prompts and criteria as the shipped numbers, 8 images per memorized prompt instead of
  4): memorization rate per subset, novelty, per-item correlation, detection;
- generic quality: background accuracy and palette distance over 64 generic captions x 1 image
  (`memlens.testbed.evaluation`), and the held-out generic denoising loss on 256 fresh scenes (identical inputs for
  every model);
- the filter's record from the training log: the fraction of samples it kept.
Writes `compare.json` and `compare.md` (a table) to `--out`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _kept(model: Path) -> float | None:
    log = model / "log.jsonl"
    if not log.is_file():
        return None
    kept = seen = 0
    for line in log.read_text().splitlines():
        row = json.loads(line)
        if "kept" in row:
            kept += row["kept"]
            seen += row["seen"]
    return kept / seen if seen else None


def evaluate(model: Path, out: Path, seed: int = 0, per_memorized: int = 8) -> dict:
    import torch

    from memlens.testbed.demo import run_demo
    from memlens.testbed.evaluation import background_accuracy, heldout_generic_loss, palette_distance, prompt_set
    from memlens.testbed.pipeline import load_pipeline

    summary = run_demo(out, organism=model, seed=seed, per_memorized=per_memorized, progress=False).summary
    pipe = load_pipeline(model)
    generic = [p.text for p in prompt_set(64) if p.kind == "generic"]
    images = pipe(generic, generator=torch.Generator().manual_seed(seed + 7)).images
    cfg = json.loads((model / "train_config.json").read_text()) if (model / "train_config.json").is_file() else {}
    gens = summary["generations"]
    return {
        "model": str(model),
        "filter": cfg.get("filter", "none"), "threshold": cfg.get("filter_threshold"),
        "kept_fraction": _kept(model),
        "memorization_rate": summary["memorization_rate"],
        "novelty": summary["novelty"]["generic"],
        "own_corr": {k: float(np.mean([g["own_corr"] for g in gens if g["kind"] == k])) for k in ("global", "local")},
        "per_item_copies": {grp: int(sum(g["reproduces_own"] for g in gens if g["group"] == grp))
                            for grp in sorted({g["group"] for g in gens if g["group"]})},
        "background_accuracy": background_accuracy(images, generic),
        "palette_distance": palette_distance(images),
        "heldout_generic_loss": heldout_generic_loss(pipe),
        "detection_local_LD_auc": summary["detection"]["local"]["LD"]["auc"],
    }


def _table(results: dict) -> list[str]:
    header = ["model", "filter (threshold)", "samples kept", "memorization global", "memorization local",
              "own corr global / local", "novelty generic", "background accuracy", "palette distance",
              "held-out generic loss"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, r in results.items():
        thr = "" if r["filter"] == "none" else f" ({r['threshold']:.2f})"
        kept = "-" if r["kept_fraction"] is None else f"{r['kept_fraction']:.3f}"
        lines.append(f"| {name} | {r['filter']}{thr} | {kept} | {r['memorization_rate']['global']:.2f} | "
                     f"{r['memorization_rate']['local']:.2f} | {r['own_corr']['global']:.2f} / "
                     f"{r['own_corr']['local']:.2f} | {r['novelty']:.2f} | "
                     f"{r['background_accuracy']['accuracy']:.2f} (n={r['background_accuracy']['n']}) | "
                     f"{r['palette_distance']:.1f} | "
                     f"{r['heldout_generic_loss']:.4f} |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="name=path pairs")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-memorized", type=int, default=8, help="images per memorized prompt (demo default: 4)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    results = {}
    for spec in args.models:
        name, _, path = spec.partition("=")
        if not path:
            ap.error(f"{spec!r}: expected name=path")
        results[name] = evaluate(Path(path), out / name, args.seed, args.per_memorized)
        print(name, json.dumps(results[name]), flush=True)
    (out / "compare.json").write_text(json.dumps(results, indent=1))
    lines = _table(results)
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
