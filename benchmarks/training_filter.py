"""Training-time filter on the organism: does D / LD at a training sample's own timestep separate memorized rows from
generic ones, does the BE map read there (or at t = 1) find the planted box, and what does the filter cost?

For a fixed set of training rows (local, global, generic kinds of the organism's dataset) and a few timesteps:
- AUC of D and LD (memorized kind vs generic), which decides whether a threshold can drop memorized samples;
- pixel AUROC of the end-token map against the ground-truth box for local rows, for the map read at the sample's
  own t (free, same evaluation) and at t = 1 on the same image and noise (one extra conditional pass);
- seconds per call of the filter (D, LD, LD at t = 1) against one training step (forward + backward) of the batch.

    python benchmarks/training_filter.py --model runs/r1 --data runs/data

With `--calibrate`, instead: draw each row's timestep uniformly as a training step does, and print the quantiles of
D and LD per kind and, for thresholds at quantiles of the generic rows, the fraction of each kind a filter at that
threshold would drop. This is how the thresholds of the organism's filtered trainings were chosen (on the model of
the unfiltered run, with the dataset's `kind` labels; a user without labels would take quantiles over data they
trust to be clean).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def _rows(data: Path, per_kind: int, seed: int):
    by_kind: dict[str, list[dict]] = {}
    with open(data / "metadata.jsonl") as fh:
        for line in fh:
            row = json.loads(line)
            by_kind.setdefault(row.get("kind") or "generic", []).append(row)
    rng = np.random.default_rng(seed)
    picked = []
    for kind in ("local", "global", "generic"):
        rows = by_kind.get(kind, [])
        for i in rng.choice(len(rows), size=min(per_kind, len(rows)), replace=False):
            picked.append(rows[i])
    return picked


def _auc(pos, neg):
    from sklearn.metrics import roc_auc_score

    if len(pos) == 0 or len(neg) == 0:
        return None
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    return float(roc_auc_score(y, np.r_[pos, neg]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--per-kind", type=int, default=16)
    ap.add_argument("--timesteps", default="1,50,200,500,800")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calibrate", action="store_true", help="threshold calibration at training-like random t")
    ap.add_argument("--quantiles", default="0.9,0.95,0.99")
    args = ap.parse_args(argv)

    import torch
    from PIL import Image

    from memlens.maps import normalize, upsample
    from memlens.mitigation.training import eos_positions, sample_magnitudes
    from memlens.testbed.data import ITEMS, item_mask
    from memlens.testbed.pipeline import load_pipeline, tokenize

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    pipe = load_pipeline(args.model)
    unet, te, tok = pipe.unet, pipe.text_encoder, pipe.tokenizer
    rows = _rows(Path(args.data), args.per_kind, args.seed)
    x0 = torch.stack([torch.from_numpy(np.asarray(Image.open(Path(args.data) / r["file_name"]).convert("RGB")).copy())
                      for r in rows]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    ids = tokenize(tok, [r["text"] for r in rows])
    with torch.no_grad():
        latents = pipe.vae.encode(x0).latent_dist.sample()
        cond = te(ids)[0]
        uncond = te(tokenize(tok, [""]))[0]
    eos = eos_positions(ids, tok.eos_token_id)
    kinds = np.array([r.get("kind") or "generic" for r in rows])
    masks = {it.group: item_mask(it) for it in ITEMS}
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(latents.shape, generator=gen)
    sched = pipe.scheduler
    if args.calibrate:
        return _calibrate(args, unet, sched, latents, noise, cond, uncond, eos, kinds, gen)
    result = {"model": args.model, "rows": {k: int((kinds == k).sum()) for k in ("local", "global", "generic")},
              "by_timestep": []}
    for t_val in [int(t) for t in args.timesteps.split(",")]:
        t = torch.full((len(rows),), t_val, dtype=torch.long)
        noisy = sched.add_noise(latents, noise, t)
        low = sched.add_noise(latents, noise, torch.ones_like(t))
        own = sample_magnitudes(unet, noisy, t, cond, uncond, masked=True, eos_indices=eos)
        at1 = sample_magnitudes(unet, noisy, t, cond, uncond, masked=True, eos_indices=eos, mask_inputs=(low, torch.ones_like(t)))
        entry = {"t": t_val}
        for kind in ("local", "global"):
            for name, v in (("D", own.D), ("LD_own_t", own.LD), ("LD_mask_t1", at1.LD)):
                v = v.numpy()
                entry[f"auc_{kind}_{name}"] = _auc(v[kinds == kind], v[kinds == "generic"])
        from sklearn.metrics import roc_auc_score

        for name, maps in (("own_t", own.masks), ("t1", at1.masks)):
            scores, labels = [], []
            for i in np.flatnonzero(kinds == "local"):
                gt = masks[rows[i]["group"]]
                scores.append(normalize(upsample(maps[i].numpy(), gt.shape)).ravel())
                labels.append(gt.ravel())
            if scores:
                entry[f"pixel_auroc_local_map_{name}"] = float(roc_auc_score(np.concatenate(labels), np.concatenate(scores)))
        result["by_timestep"].append(entry)
        print(json.dumps(entry), flush=True)

    # Cost: one filter call vs one training step on the same batch.
    t = torch.randint(0, sched.config.num_train_timesteps, (len(rows),), generator=gen)
    noisy = sched.add_noise(latents, noise, t)

    def timed(fn, reps=3):
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps

    def train_step():
        unet.train()
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
        (pred - noise).pow(2).mean().backward()
        unet.zero_grad(set_to_none=True)

    low = sched.add_noise(latents, noise, torch.ones_like(t))
    cost = {
        "batch": len(rows),
        "train_step_s": timed(train_step),
        "filter_D_s": timed(lambda: sample_magnitudes(unet, noisy, t, cond, uncond)),
        "filter_LD_s": timed(lambda: sample_magnitudes(unet, noisy, t, cond, uncond, masked=True, eos_indices=eos)),
        "filter_LD_t1_s": timed(lambda: sample_magnitudes(unet, noisy, t, cond, uncond, masked=True, eos_indices=eos,
                                                          mask_inputs=(low, torch.ones_like(t)))),
    }
    for k in ("filter_D_s", "filter_LD_s", "filter_LD_t1_s"):
        cost[k.replace("_s", "_vs_step")] = round(cost[k] / cost["train_step_s"], 3)
    result["cost"] = cost
    print(json.dumps(result, indent=1))
    return 0


def _calibrate(args, unet, sched, latents, noise, cond, uncond, eos, kinds, gen):
    import torch

    from memlens.mitigation.training import sample_magnitudes

    t = torch.randint(0, sched.config.num_train_timesteps, (len(kinds),), generator=gen)
    noisy = sched.add_noise(latents, noise, t)
    mags = sample_magnitudes(unet, noisy, t, cond, uncond, masked=True, eos_indices=eos)
    qs = [float(q) for q in args.quantiles.split(",")]
    result = {"model": args.model, "rows": {k: int((kinds == k).sum()) for k in ("local", "global", "generic")}}
    for name, values in (("D", mags.D.numpy()), ("LD", mags.LD.numpy())):
        entry = {"quantiles": {k: [round(float(x), 4) for x in np.quantile(values[kinds == k], [0.5] + qs)]
                               for k in ("local", "global", "generic")},
                 "auc_local": _auc(values[kinds == "local"], values[kinds == "generic"]),
                 "auc_global": _auc(values[kinds == "global"], values[kinds == "generic"]),
                 "thresholds": []}
        for q in qs:
            thr = float(np.quantile(values[kinds == "generic"], q))
            entry["thresholds"].append({"generic_quantile": q, "threshold": round(thr, 4),
                                        **{f"dropped_{k}": round(float((values[kinds == k] > thr).mean()), 3)
                                           for k in ("local", "global", "generic")}})
        result[name] = entry
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
