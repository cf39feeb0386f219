"""The organism's robustness study: the whole recipe (CLIP pretraining, then the UNet with the text encoder frozen)
over several training seeds and both padding layouts, each run scored by the demo.

One command (`memlens testbed study`) on any imagefolder dataset that plants items (`memorized.jsonl`), a user's
included. Every stage of every run resumes where it stopped: a finished stage is skipped, an interrupted one
continues from its last checkpoint, so rerunning the same command after an interruption finishes the study.

Layout:  OUT/study_config.json, OUT/<layout>_s<seed>/{clip,organism,eval_seed<k>,row.json}, OUT/study.json,
OUT/study.md. The tables gather every run folder's row.json, so several processes may share one study folder, each
with its own seeds or layouts (one per core, say).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from memlens.errors import InputError
from memlens.rundir import atomic_write_bytes, write_json

STUDY_CONFIG = "study_config.json"


@dataclass
class StudyConfig:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5])
    layouts: list[str] = field(default_factory=lambda: ["eos", "pad"])
    demo_seeds: list[int] = field(default_factory=lambda: [0])
    clip_steps: int = 1500
    steps: int = 4000  # UNet training steps (the organism v2 recipe)
    threads: int = 1
    evaluate: bool = True  # False: train only (score later by rerunning with it on, which skips the training)
    train: bool = True  # False: score the runs whose training has finished, skip the others

    def validate(self) -> None:
        from memlens.testbed.pipeline import PAD_CHOICES

        if not self.seeds or not self.layouts or not self.demo_seeds:
            raise InputError("seeds, layouts and demo_seeds: each needs at least one value")
        bad = [x for x in self.layouts if x not in PAD_CHOICES]
        if bad:
            raise InputError(f"layouts: expected values among {', '.join(PAD_CHOICES)}, got {bad}")
        if self.clip_steps < 1 or self.steps < 1:
            raise InputError("clip_steps and steps: expected whole numbers >= 1")


def recipe(clip_dir: str | Path, seed: int, steps: int = 4000):
    """The organism v2 UNet recipe: the v1 optimiser settings in one phase, with the text encoder frozen."""
    from memlens.testbed.train import TrainConfig

    return TrainConfig(steps=steps, seed=seed, decay_from=0.4, dropout_kinds=["generic"], unet_heads=1,
                       checkpoint_every=250, text_encoder=str(clip_dir))


def _finished_train(run: Path, steps: int) -> bool:
    log = run / "log.jsonl"
    if not log.is_file():
        return False
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    return bool(lines) and lines[-1]["step"] >= steps and (run / "unet").is_dir()


def run_one(data_dir: Path, run_dir: Path, layout: str, seed: int, config: StudyConfig, progress: bool) -> dict:
    """Train (or resume) one run of the recipe and score it; returns its row of the study."""
    from memlens.testbed.clip import ClipConfig, pretrain_clip
    from memlens.testbed.train import _checkpoint_dirs, train

    clip_dir, org_dir = run_dir / "clip", run_dir / "organism"
    if not config.train and not _finished_train(org_dir, config.steps):
        return None
    timing = {}
    if not (clip_dir / "text_encoder").is_dir():
        t0 = time.time()
        resume = bool(_checkpoint_dirs(clip_dir))
        pretrain_clip(data_dir, clip_dir, ClipConfig(steps=config.clip_steps, seed=seed, pad_token=layout,
                                                     threads=config.threads), resume=resume, progress=progress)
        timing["clip_seconds"] = round(time.time() - t0, 1)
    if not _finished_train(org_dir, config.steps):
        t0 = time.time()
        resume = bool(_checkpoint_dirs(org_dir))
        cfg = recipe(clip_dir, seed, config.steps)
        cfg.threads = config.threads
        train(data_dir, org_dir, None if resume else cfg, resume=resume, progress=progress)
        timing["train_seconds"] = round(time.time() - t0, 1)
    row = {"layout": layout, "seed": seed, **timing}
    clip_retrieval = clip_dir / "retrieval.json"
    if clip_retrieval.is_file():
        row["clip_retrieval"] = json.loads(clip_retrieval.read_text())
    row["eval"] = {}
    for demo_seed in config.demo_seeds if config.evaluate else ():
        row["eval"][str(demo_seed)] = evaluate_run(org_dir, run_dir / f"eval_seed{demo_seed}", demo_seed)
    return row


def evaluate_run(org_dir: Path, eval_dir: Path, demo_seed: int) -> dict:
    """The demo's summary for one trained run (reused if already written for these weights)."""
    from memlens.testbed.demo import run_demo

    summary_path = eval_dir / "summary.json"
    weights = org_dir / "unet" / "diffusion_pytorch_model.safetensors"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    # Reuse a summary only if it scored these weights against the organism's own ground truth.
    fresh = summary is not None and summary_path.stat().st_mtime > weights.stat().st_mtime and \
        summary.get("settings", {}).get("items_from") == "organism" and \
        set(TABLE_TOKENS) <= set(summary.get("localization_by_token", {}))
    if not fresh:
        import shutil

        shutil.rmtree(eval_dir, ignore_errors=True)  # the study's own folder, from older weights or an older demo
        summary = run_demo(eval_dir, organism=org_dir, seed=demo_seed, progress=False).summary
    return {k: summary[k] for k in ("memorization_rate", "novelty", "localization", "localization_by_token",
                                    "detection") if k in summary} | \
        {k: summary[k] for k in ("localization_by_size",) if k in summary}


def run_study(data_dir: str | Path, out_dir: str | Path, config: StudyConfig | None = None,
              progress: bool = False) -> dict:
    """Run (or resume) the whole study and write OUT/study.json and OUT/study.md."""
    data_dir, out = Path(data_dir), Path(out_dir)
    if not (data_dir / "memorized.jsonl").is_file():
        raise InputError(f"{data_dir}: no memorized.jsonl; the study needs a dataset that says which items it "
                         "plants (`memlens testbed make-data` writes one)")
    cfg_path = out / STUDY_CONFIG
    config = config or StudyConfig()
    config.validate()
    if cfg_path.is_file():
        saved = json.loads(cfg_path.read_text())
        for key in ("clip_steps", "steps"):
            if saved.get(key) != getattr(config, key):
                raise InputError(f"{out}: this study was started with {key}={saved.get(key)}, not "
                                 f"{getattr(config, key)}; use another --out or the same setting")
    elif out.exists() and any(out.iterdir()):
        raise InputError(f"{out}: not empty and not a study folder (no {STUDY_CONFIG})")
    out.mkdir(parents=True, exist_ok=True)
    if not cfg_path.is_file():
        write_json(cfg_path, {"clip_steps": config.clip_steps, "steps": config.steps, "data": str(data_dir)})
    for layout in config.layouts:
        for seed in config.seeds:
            run_dir = out / f"{layout}_s{seed}"
            with _claim(run_dir) as mine:
                if not mine:  # another process is training this run; it writes the row when done
                    continue
                row = run_one(data_dir, run_dir, layout, seed, config, progress)
                if row is None:
                    continue
                old = run_dir / "row.json"
                if old.is_file():  # keep what an earlier pass measured (its timings, its scores)
                    prev = json.loads(old.read_text())
                    row = {**prev, **row, "eval": {**prev.get("eval", {}), **row["eval"]}}
                write_json(run_dir / "row.json", row)
            _write_tables(out)
    return {"runs": _rows(out)}


@contextlib.contextmanager
def _claim(run_dir: Path):
    """An exclusive, non-blocking lock on one run, so several study processes can share a folder; the OS drops it
    when a process dies, so a killed process never leaves a run claimed."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(p.read_text()) for p in out.glob("*_s*/row.json")]
    return sorted(rows, key=lambda r: (r["layout"], r["seed"]))


def _write_tables(out: Path) -> None:
    rows = _rows(out)
    write_json(out / "study.json", {"runs": rows})
    atomic_write_bytes(out / "study.md", format_table(rows).encode())


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


# study.json keeps every token; "outer/" reads both ends of the UNet (the probe's layers="outer"), "all/" every block
# on the finest grid (layers="all")
TABLE_TOKENS = ("bos", "word_mean", "end", "pad_mean", "end+padding", "outer/end", "outer/end+padding", "all/end",
                "all/end+padding")


def _pair(d: dict | None) -> str:
    d = d or {}
    return f"{_f(d.get('pixel_auroc'))} / {_f(d.get('iou'))}"


def format_table(rows: list[dict]) -> str:
    """One line per (run, demo seed): copy rates, localization per token (pixel AUROC / Otsu IoU on the local
    copies, the probed block), the small templates' localization, and local detection by D and LD."""
    head = ["layout", "seed", "demo seed", "copies global / local", "novelty"] + \
           [f"{t} AUROC / IoU" for t in TABLE_TOKENS] + \
           ["small templates (<= 10% of the image), end AUROC / IoU", "local D AUC (TPR@1%FPR)",
            "local LD AUC (TPR@1%FPR)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        for demo_seed, e in sorted(r.get("eval", {}).items()):
            det = e["detection"]["local"]
            small = [v for v in e.get("localization_by_size", {}).values() if v.get("area_fraction", 1) <= 0.1]
            n = sum(v["n"] for v in small)
            small_cell = {"pixel_auroc": sum(v["pixel_auroc"] * v["n"] for v in small) / n if n else None,
                          "iou": sum(v["iou"] * v["n"] for v in small) / n if n else None}
            cells = [r["layout"], str(r["seed"]), demo_seed,
                     f"{_f(e['memorization_rate']['global'])} / {_f(e['memorization_rate']['local'])}",
                     _f(e["novelty"]["generic"])]
            cells += [_pair(e["localization_by_token"].get(t)) for t in TABLE_TOKENS]
            cells += [_pair(small_cell) + " (n-weighted)",
                      f"{_f(det['D']['auc'])} ({_f(det['D']['tpr_at_1pct_fpr'])})",
                      f"{_f(det['LD']['auc'])} ({_f(det['LD']['tpr_at_1pct_fpr'])})"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
