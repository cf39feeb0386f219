"""How much does `memlens scan` cost on top of plain generation, and does its memory grow with the scan's length?

1. Throughput: images/s of `run_scan` (probe + PNG/NPY/overlay files + fsync'd log) against plain `pipe(...)` calls
   with the same prompts, seeds, batches and settings, run alternately so machine load hits both alike. Target:
   scan/plain >= 0.9.
2. Memory: peak RSS of a scan of N vs 10*N generations, each in a fresh subprocess (resource.getrusage). A scan
   that holds nothing per image beyond its batch has the same peak for both.

Uses the shipped model organism (`memlens.testbed`), or a tiny random SD1 pipeline when the organism is absent.

    python benchmarks/scan_throughput.py            # 64 prompts x 5 reps; RSS at 100 vs 1000 generations
    python benchmarks/scan_throughput.py --quick    # 16 prompts x 3 reps; RSS at 50 vs 500
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def load(model: str):
    from memlens.errors import InputError
    from memlens.models import load_pipeline

    if model == "auto":
        try:
            return "testbed", load_pipeline("testbed")
        except InputError as err:
            print(f"(organism unavailable: {err}; using a tiny random SD1 pipeline)", file=sys.stderr)
            model = "tiny"
    if model == "tiny":
        from memlens.testing import tiny_pipeline

        return "tiny-sd1", tiny_pipeline("sd1")
    return model, load_pipeline(model)


def prompts_for(n: int) -> list[str]:
    subjects = ["a red cat", "a small house", "the green frog", "an old car", "a mountain lake", "a blue bird"]
    return [f"{subjects[i % len(subjects)]} number {i}" for i in range(n)]


def plain(pipe, prompts, *, steps, guidance, batch, height, width, seed) -> float:
    import torch

    start = _clock()
    for b in range(0, len(prompts), batch):
        chunk = prompts[b : b + batch]
        gens = [torch.Generator("cpu").manual_seed(seed + b + i) for i in range(len(chunk))]
        pipe(
            prompt=chunk, num_images_per_prompt=1, num_inference_steps=steps, guidance_scale=guidance,
            generator=gens, height=height, width=width,
        )
    return _since(start)


def scan(pipe, prompts, *, steps, guidance, batch, height, width, seed) -> float:
    from memlens.scan import run_scan

    with tempfile.TemporaryDirectory(prefix="memlens-bench-") as tmp:
        start = _clock()
        run_scan(
            pipe, prompts, Path(tmp) / "scan", steps=steps, guidance=guidance, batch_size=batch, height=height,
            width=width, seed=seed, progress=False,
        )
        return _since(start)


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    # Wall time is what a user waits; CPU time of this process (all its threads) is what the scan costs, and it is
    # what stays readable on a machine shared with other jobs, where wall time swings by tens of percent.
    return time.perf_counter() - start[0], time.process_time() - start[1]


def throughput(args) -> dict:
    from memlens.models import pipeline_facts

    name, pipe = load(args.model)
    facts = pipeline_facts(pipe)
    prompts = prompts_for(args.prompts)
    kw = dict(steps=args.steps, guidance=args.guidance, batch=args.batch, height=facts["height"],
              width=facts["width"], seed=0)
    plain(pipe, prompts[: args.batch], **kw)  # warm-up: first-call allocations, lazy imports
    scan(pipe, prompts[: args.batch], **kw)
    wall = {"plain": [], "scan": []}
    cpu = {"plain": [], "scan": []}
    for rep in range(args.reps):
        order = (("plain", plain), ("scan", scan)) if rep % 2 == 0 else (("scan", scan), ("plain", plain))
        for label, fn in order:
            w, c = fn(pipe, prompts, **kw)
            wall[label].append(len(prompts) / w)
            cpu[label].append(len(prompts) / c)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    result = {
        "model": name,
        "size": f"{facts['height']}x{facts['width']}",
        "prompts": len(prompts),
        "steps": args.steps,
        "batch": args.batch,
        "reps": args.reps,
        "plain_img_per_s": round(med["plain"], 3),
        "scan_img_per_s": round(med["scan"], 3),
        "ratio": round(med["scan"] / med["plain"], 3),
        "ratio_per_rep": [round(s / p, 3) for s, p in zip(wall["scan"], wall["plain"])],
        "plain_img_per_cpu_s": round(med_cpu["plain"], 3),
        "scan_img_per_cpu_s": round(med_cpu["scan"], 3),
        "cpu_ratio": round(med_cpu["scan"] / med_cpu["plain"], 3),
    }
    print(
        f"throughput ({name}, {result['size']}, {len(prompts)} prompts, {args.steps} steps, batch {args.batch}, "
        f"median of {args.reps}): plain {med['plain']:.2f} img/s, scan {med['scan']:.2f} img/s, "
        f"ratio {result['ratio']:.3f} (target >= 0.9); per rep {result['ratio_per_rep']}; "
        f"per CPU-second: plain {med_cpu['plain']:.2f}, scan {med_cpu['scan']:.2f}, ratio {result['cpu_ratio']:.3f}"
    )
    return result


def rss_child(args) -> None:
    """Run in a fresh process: one scan of `args.rss_child` generations; print peak RSS in MiB as JSON."""
    from memlens.scan import run_scan

    name, pipe = load(args.model)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory(prefix="memlens-rss-") as tmp:
        # 10 images per prompt keeps the prompt list itself from being what grows.
        n_prompts = max(1, args.rss_child // 10)
        run_scan(pipe, prompts_for(n_prompts), Path(tmp) / "scan", num_images=args.rss_child // n_prompts,
                 steps=args.rss_steps, guidance=args.guidance, batch_size=args.batch, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux, bytes on macOS.
    unit = 1024 * 1024 if sys.platform == "darwin" else 1024
    result = {"generations": args.rss_child, "peak_mib": peak / unit, "after_load_mib": before / unit}
    try:  # the resident size now, which shows growth even while it stays under the load-time peak
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        result["end_mib"] = pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        pass
    print(json.dumps(result))


def rss(args, counts: tuple[int, int]) -> dict:
    out = {}
    for n in counts:
        cmd = [sys.executable, __file__, "--rss-child", str(n), "--model", args.model, "--batch", str(args.batch),
               "--rss-steps", str(args.rss_steps)]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, check=True)
        out[n] = json.loads(done.stdout.strip().splitlines()[-1])
        out[n]["seconds"] = round(time.perf_counter() - start, 1)
    a, b = (out[n] for n in counts)
    print(
        f"peak RSS: {a['peak_mib']:.0f} MiB at {counts[0]} generations, {b['peak_mib']:.0f} MiB at {counts[1]} "
        f"(+{b['peak_mib'] - a['peak_mib']:.0f} MiB; after model load {a['after_load_mib']:.0f} MiB)"
        + (f"; resident at the end {a['end_mib']:.0f} vs {b['end_mib']:.0f} MiB" if "end_mib" in a else "")
    )
    return {str(k): v for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer prompts, reps and generations")
    ap.add_argument("--model", default="auto", help="auto (organism, else tiny), tiny, testbed, or a MODEL")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rss-steps", type=int, default=2, help="steps per generation in the RSS runs")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args)
        return
    args.prompts = args.prompts or (16 if args.quick else 64)
    args.reps = args.reps or (3 if args.quick else 5)
    result = {"throughput": throughput(args)}
    if not args.skip_rss:
        result["rss"] = rss(args, (50, 500) if args.quick else (100, 1000))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
