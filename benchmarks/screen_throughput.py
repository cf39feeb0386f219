"""Is the screening pass of `memlens scan --screen` worth it? Prompts/s of the screen against the full scan, and the
screen's recall of the full scan's detections, on the shipped organism.

1. The full scan: `run_scan` on every organism prompt (planted items + generic captions, one image each), timed.
   Its detections: prompts whose D (mean over all steps) is above every one of the calibration prompts' D (the
   first half of the generic captions: prompts known to be clean), i.e. FPR 0 on the calibration set.
2. The screen: `screen_scores` on the same prompts and seeds, timed, for each detector. Its threshold is fixed from
   the same calibration prompts, deliberately loose: their 50th percentile, so the screen errs towards scanning.
3. Reported: prompts/s of each, their ratio (target >= 20), the screen's recall of the full scan's detections
   (target >= 0.95), the fraction of prompts it passes on, and the end-to-end time of screen + scan of the flagged.

    python benchmarks/screen_throughput.py            # every organism prompt, the organism's steps
    python benchmarks/screen_throughput.py --quick    # 16 generic captions, 10 steps
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="screen timings: best of this many")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from memlens import rundir
    from memlens.scan import run_scan
    from memlens.screen import SCREENS, screen_scores
    from memlens.testbed.demo import demo_prompts
    from memlens.testbed.items import load_ground_truth
    from memlens.testbed.pipeline import WEIGHTS_DIR, load_pipeline

    truth = load_ground_truth(WEIGHTS_DIR)
    n_generic = 16 if args.quick else len(truth.generic_prompts)
    records = demo_prompts(truth, n_generic)
    pipe = load_pipeline()
    steps = 10 if args.quick else pipe.config.default_num_inference_steps
    guidance = pipe.config.default_guidance_scale
    calib = [i for i, r in enumerate(records) if r.label == 0][: n_generic // 2]

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run_scan(pipe, records, Path(tmp) / "full", steps=steps, guidance=guidance, batch_size=16, progress=False)
        full_s = time.perf_counter() - t0
        recs = sorted(rundir.read_generations(Path(tmp) / "full"), key=lambda r: r.prompt_index)
    seeds = [r.seed for r in recs]
    d_full = np.array([float(np.mean(r.D)) for r in recs])
    detected = d_full > d_full[calib].max()
    result = {"prompts": len(records), "steps": steps, "full_scan_s": full_s,
              "full_scan_prompts_per_s": len(records) / full_s, "full_scan_detections": int(detected.sum()),
              "detections_calibration": "D (all steps) above every calibration prompt's (first half of the generic "
                                        "captions)", "screens": {}}
    for detector in SCREENS:
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            scores = screen_scores(pipe, [r.prompt for r in records], seeds, detector=detector, steps=steps,
                                   guidance=guidance, height=32, width=32, batch_size=64)
            times.append(time.perf_counter() - t0)
        threshold = float(np.percentile(scores[calib], 50))
        flagged = scores >= threshold
        screen_s = min(times)
        # The flagged prompts' share of the full scan's time: images are generated in fixed batches of equal cost.
        end_to_end = screen_s + full_s * flagged.mean()
        result["screens"][detector] = {
            "threshold": threshold, "threshold_rule": "median of the calibration prompts' screen scores",
            "screen_s": screen_s, "prompts_per_s": len(records) / screen_s,
            "speedup_vs_full_scan": full_s / screen_s,
            "recall_of_full_scan_detections": float(flagged[detected].mean()) if detected.any() else None,
            "fraction_flagged": float(flagged.mean()),
            "end_to_end_s_estimate": end_to_end, "end_to_end_speedup": full_s / end_to_end,
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        rundir.write_json(args.out, result)
    ok = all(s["speedup_vs_full_scan"] >= 20 and (s["recall_of_full_scan_detections"] or 0) >= 0.95
             for s in result["screens"].values())
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
