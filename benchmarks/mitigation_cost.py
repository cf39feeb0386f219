"""What each mitigation costs, in UNet work and seconds, and how well a cheap few-step BE mask agrees with the full one.

Cost is counted, not only timed: a forward pre-hook on the UNet adds up the batch rows it evaluates, split into rows
evaluated without gradients and rows evaluated with gradients (PE's optimisation; each of those also pays a backward,
roughly twice a forward). A plain generation of one image with CFG is 2 x steps rows, the unit used in the table.

Mask agreement: for each memorized organism prompt, the BE map of a k-step unmitigated pass (same x_T) against the
map of the full-length pass: Pearson correlation, IoU of their Otsu-thresholded masks, and for the local items the
pixel AUROC of either map against the planted box.

    python benchmarks/mitigation_cost.py --model runs/rt --steps 50
    python benchmarks/mitigation_cost.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


class RowCounter:
    def __init__(self, unet):
        import torch

        self.torch = torch
        self.no_grad = 0
        self.with_grad = 0
        # On the UNet's first layer, not the UNet: hooks that reshape the UNet's batch (PR adds rows) run before it.
        self.handle = unet.conv_in.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        rows = args[0].shape[0]
        if self.torch.is_grad_enabled():
            self.with_grad += rows
        else:
            self.no_grad += rows

    def close(self):
        self.handle.remove()


def _pipeline(args):
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.smoke:
        from memlens.testbed.data import ITEMS
        from memlens.testbed.pipeline import build_pipeline, build_tokenizer

        torch.manual_seed(0)
        return build_pipeline(build_tokenizer([it.prompt for it in ITEMS]))
    from memlens.testbed.pipeline import load_pipeline

    return load_pipeline(args.model) if args.model else load_pipeline()


def costs(pipe, prompts, args, guidance):
    from memlens.mitigation import Job, Settings, mitigate_batch

    unit = 2 * args.steps
    rows = []
    configs = [
        ("none", {}),
        ("pe (never triggers)", dict(method="pe", target=1e9)),
        ("pe (always, 10 it)", dict(method="pe", target=0.0)),
        ("pe-be (always, 10 it)", dict(method="pe-be", target=0.0)),
        (f"pe-be mask {min(5, args.steps)} steps", dict(method="pe-be", target=0.0, mask_steps=min(5, args.steps))),
        ("prss (K=1+words, PR on)", dict(method="prss", l_target_ss=0.0, l_target_pr=0.0, mag_thres_pr=1.0)),
        ("prss-be (PR on)", dict(method="prss-be", l_target_ss=0.0, l_target_pr=0.0, mag_thres_pr=1.0)),
        ("rt", dict(method="rt")),
        ("gni", dict(method="gni")),
    ]
    for name, kw in configs:
        if args.only and not any(name.startswith(o) for o in args.only.split(",")):
            continue
        s = Settings(steps=args.steps, guidance=guidance, **{"method": "none", **kw})
        counter = RowCounter(pipe.unet)
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            words = p.split()
            caps = tuple(" ".join(words[:j] + words[j + 1 :]) for j in range(len(words)))
            mitigate_batch(pipe, [Job(p, i, caps)], s)  # n = 1, as the paper's mitigation runs
        sec = (time.perf_counter() - t0) / len(prompts)
        counter.close()
        n = len(prompts)
        rows.append({"method": name, "rows_no_grad": counter.no_grad / n, "rows_grad": counter.with_grad / n,
                     "generations_equiv": round((counter.no_grad + 3 * counter.with_grad) / n / unit, 2),
                     "seconds_per_image": round(sec, 3)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def mask_agreement(pipe, prompts, args, guidance):
    import torch

    from memlens import BrightEndingProbe
    from memlens.maps import threshold_otsu
    from memlens.testbed.evaluation import pearson

    def maps(steps):
        gens = [torch.Generator().manual_seed(1000 + i) for i in range(len(prompts))]
        with BrightEndingProbe(pipe) as probe:
            pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens)
        return [r.be_map for r in probe.records]

    from sklearn.metrics import roc_auc_score

    from memlens.maps import normalize, upsample
    from memlens.testbed.data import ITEMS, item_mask

    def box_auroc(ms):
        # Pixel AUROC of the maps of the local items against their planted boxes (is the mask where it should be?).
        scores, labels = [], []
        for it, m in zip(ITEMS, ms):
            if it.kind == "local":
                gt = item_mask(it)
                scores.append(normalize(upsample(m, gt.shape)).ravel())
                labels.append(gt.ravel())
        return float(roc_auc_score(np.concatenate(labels), np.concatenate(scores))) if labels else None

    full = maps(args.steps)
    out = [{"mask_steps": args.steps, "local_box_auroc": box_auroc(full)}]
    print(json.dumps(out[-1]), flush=True)
    for k in args.mask_steps:
        few = maps(k)
        corr = [pearson(a, b) for a, b in zip(few, full)]
        ious = []
        for a, b in zip(few, full):
            ma, mb = a > threshold_otsu(a), b > threshold_otsu(b)
            union = (ma | mb).sum()
            ious.append(float((ma & mb).sum() / union) if union else 1.0)
        out.append({"mask_steps": k, "pearson_mean": float(np.mean(corr)), "pearson_min": float(np.min(corr)),
                    "otsu_iou_mean": float(np.mean(ious)), "cost_vs_full": round(k / args.steps, 3),
                    "local_box_auroc": box_auroc(few)})
        print(json.dumps(out[-1]), flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--mask-steps", type=lambda s: [int(x) for x in s.split(",")], default=[5, 10, 25])
    ap.add_argument("--skip-costs", action="store_true")
    ap.add_argument("--skip-masks", action="store_true")
    ap.add_argument("--only", default=None, help="comma list of method-name prefixes to cost")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.mask_steps = 4, [2]
    from memlens.testbed.data import ITEMS

    pipe = _pipeline(args)
    guidance = args.guidance or getattr(pipe.config, "default_guidance_scale", 2.0)
    prompts = [it.prompt for it in ITEMS]
    result = {"steps": args.steps, "guidance": guidance, "model": args.model or "shipped"}
    if not args.skip_masks:
        result["mask_agreement"] = mask_agreement(pipe, prompts, args, guidance)
    if not args.skip_costs:
        result["costs"] = costs(pipe, prompts[:2] if args.smoke else prompts[:4], args, guidance)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
