"""The `memlens` command line: every Typer command of memlens lives here or in a sub-package's `cli.py`
(`memlens.mitigation.cli`, `memlens.testbed.cli`).

A command maps its flags to a library call's parameters and prints what came back. Process-wide state (torch's thread
count, log output) is set here, never in the library. Library errors name parameters in backticks (`` `out_dir` ``);
`main` prints them on one line with the flag a user typed (`--out`) and exits with status 2.
Nothing heavy is imported at module level, so `memlens --help` answers at once and imports no torch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from memlens.errors import MemlensError

app = typer.Typer(
    name="memlens",
    help="Find, outline and remove training-data memorization in text-to-image diffusion models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
evaluate_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

# Library parameter -> the flag that sets it, where the flag is not simply `--the-name`.
_FLAGS = {
    "out_dir": "--out",
    "scan_dirs": "--scan",
    "masks_dir": "--masks",
    "references_dir": "--references",
    "probe_options": "probe options",
    "settings` (method and options": "--method and its options",
    "organism": "--model",
    "pipe_or_model": "--model",
    "out_json": "out_json",
    "out_path": "--out",
    "model_dir": "model_dir",
}


# Library parameters whose flag is `--the-name` (dashes for underscores). Only these and `_FLAGS` are rewritten:
# other backticked words in a message (a file's field names) stay as they are.
_PARAMS = {
    "model", "prompts", "num_images", "steps", "guidance", "seed", "batch_size", "height", "width", "dtype", "device",
    "threads", "method", "target", "max_iters", "repeat", "mask_steps", "l_target_ss", "l_target_pr", "mag_thres_pr",
    "noise_lambda", "per_memorized", "per_generic", "n_generic", "preset", "mask_normalize", "clip_model",
    "clip_pretrained", "max_side", "out", "trajectory", "per_prompt", "init_from", "filter", "schedule",
    "pad_token", "end_contrastive", "negative_prompt", "true_cfg_scale", "text_encoder", "lr", "text_lr_mult", "warmup", "decay_from", "caption_dropout",
    "snr_gamma", "ema_decay", "checkpoint_every", "unet_heads", "unet_channels", "text_width", "text_layers",
    "factor", "probes", "masks", "screen", "screen_threshold", "screen_batch_size", "prompt_indices", "webster",
}


def flag_message(message: str) -> str:
    """A library message with each `` `parameter` `` replaced by the flag that sets it."""

    def flag(m: re.Match) -> str:
        name = m.group(1)
        if name in _FLAGS:
            return _FLAGS[name]
        return "--" + name.replace("_", "-") if name in _PARAMS else m.group(0)

    return re.sub(r"`([^`]+)`", flag, message)


PUBLIC_SETS_HELP = "wen-sd1-memorized, nemo-memorized, nemo-unmemorized, sail-nonmemorized, sd2-memorized, memattn-gpt500"
THREADS_HELP = ("torch CPU threads; default 1 on a CPU (measured: on a busy 2-core machine a 12-image scan took "
                "4.6-61 s with torch's default and 2.1 s with one thread), torch's default on a GPU.")


def set_threads(threads: Optional[int], device: Optional[str] = None) -> None:
    """Entry points only: torch's thread count for this process."""
    import torch

    if threads is not None and threads < 1:
        raise MemlensError(f"--threads must be at least 1, got {threads}")
    on_gpu = (device or "auto") not in ("cpu",) and (torch.cuda.is_available() or (device or "").startswith("mps"))
    if threads is None and on_gpu:
        return
    # The organism's ops are tiny; with 2+ threads on a shared machine OpenMP spin-waiting made generation 6-16x
    # slower in our measurements, while one thread degrades gracefully.
    torch.set_num_threads(threads or 1)


# --- scan -----------------------------------------------------------------------------------------------------------


# What the BE map reads, for every command that probes (scan, demo); `probe_options` turns them into probe options.
LayersOption = Annotated[Optional[str], typer.Option(
    "--layers", help="Cross-attention layers the BE map reads: the paper's first down block (default), 'outer' "
    "(both ends of the UNet), 'all' (every layer, on the finest grid), or comma-separated module names/prefixes.")]
TokenOption = Annotated[str, typer.Option(
    "--token", help="Token the BE map reads: eos (the paper's end token), padding, eos+padding, or a position.")]


def probe_options(layers: Optional[str], token: str) -> dict:
    """--layers / --token as `BrightEndingProbe` options; only what differs from the probe's defaults, so a run
    recorded before these flags existed resumes under the same settings."""
    from memlens.probe import TOKEN_CHOICES

    options: dict = {}
    if layers is not None:
        names = [x.strip() for x in layers.split(",") if x.strip()]
        if not names:
            raise MemlensError(f"--layers {layers!r}: expected 'outer', 'all' or module names")
        options["layers"] = names[0] if len(names) == 1 and names[0] in ("outer", "all") else names
    if token != "eos":
        if token in TOKEN_CHOICES:
            options["token"] = token
        else:
            try:
                options["token"] = int(token)
            except ValueError:
                raise MemlensError(f"--token {token!r}: expected one of {', '.join(TOKEN_CHOICES)} or a whole "
                                   "number (a token position)") from None
    return options


@app.command("scan")
def scan_command(
    model: Annotated[str, typer.Option("--model", help="Hub id, local diffusers folder, or 'testbed'.")],
    prompts: Annotated[
        str, typer.Option("--prompts", help=f"Prompt file (.txt/.jsonl/.csv/.parquet) or one of: {PUBLIC_SETS_HELP}.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder; rerun the same command to resume.")],
    num_images: Annotated[int, typer.Option("--num-images", min=1, help="Images per prompt.")] = 1,
    steps: Annotated[
        Optional[int], typer.Option("--steps", min=1, help="Denoising steps. Default: the pipeline's recommended, else 50.")
    ] = None,
    guidance: Annotated[
        Optional[float],
        typer.Option("--guidance", help="Classifier-free guidance scale (> 1). Default: the pipeline's recommended, else 7.5."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Base seed; image k of prompt p uses seed + p*num_images + k.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per pipeline call.")] = 4,
    height: Annotated[Optional[int], typer.Option("--height", min=8, help="Default: the pipeline's native size.")] = None,
    width: Annotated[Optional[int], typer.Option("--width", min=8, help="Default: the pipeline's native size.")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32, float16 or bfloat16.")] = "float32",
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, mps, or auto.")] = "auto",
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help=THREADS_HELP)] = None,
    negative_prompt: Annotated[Optional[str], typer.Option(
        "--negative-prompt", help="Passed to the pipeline; with --true-cfg-scale it gives FLUX (guidance-distilled) "
        "the unconditional branch D and LD need.")] = None,
    true_cfg_scale: Annotated[Optional[float], typer.Option(
        "--true-cfg-scale", help="FLUX: true classifier-free guidance (> 1, with --negative-prompt; two transformer "
        "calls per step).")] = None,
    screen: Annotated[Optional[str], typer.Option(
        "--screen", help="Score every prompt first with a cheap detector (D_first_step or anisotropy: the first "
                         "UNet call only) and scan only those scoring >= --screen-threshold; scores in screen.jsonl.")
    ] = None,
    screen_threshold: Annotated[Optional[float], typer.Option(
        "--screen-threshold", help="Screen score at or above which a prompt is scanned (with --screen).")] = None,
    screen_batch_size: Annotated[Optional[int], typer.Option(
        "--screen-batch-size", min=1, help="Prompts per screen call (with --screen). Default: max(--batch-size, 16)."
    )] = None,
    layers: LayersOption = None,
    token: TokenOption = "eos",
) -> None:
    """Generate for a prompt file and record BE maps and magnitudes per image."""
    from memlens.scan import run_scan

    set_threads(threads, device)
    if screen is None and (screen_threshold is not None or screen_batch_size is not None):
        flag = "--screen-threshold" if screen_threshold is not None else "--screen-batch-size"
        raise MemlensError(f"{flag} needs --screen")
    if screen is not None:
        from memlens.screen import run_screened_scan

        if screen_threshold is None:
            raise MemlensError("--screen needs --screen-threshold")
        if negative_prompt is not None or true_cfg_scale is not None:
            raise MemlensError("--screen does not take --negative-prompt or --true-cfg-scale yet")
        if layers is not None or token != "eos":
            raise MemlensError("--screen does not take --layers or --token yet")
        screened = run_screened_scan(model, prompts, out, screen=screen, screen_threshold=screen_threshold,
                                     num_images=num_images, steps=steps, guidance=guidance, seed=seed,
                                     batch_size=batch_size, screen_batch_size=screen_batch_size, height=height,
                                     width=width, dtype=dtype, device=device)
        if screened.is_main_process:
            typer.echo(f"screen: {screened.num_flagged} of {len(screened.rows)} prompts flagged by {screen} >= "
                       f"{screen_threshold:g}")
        res = screened.scan
        if res is None:
            return
    else:
        res = run_scan(model, prompts, out, num_images=num_images, steps=steps, guidance=guidance, seed=seed,
                       batch_size=batch_size, height=height, width=width, dtype=dtype, device=device,
                       negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale,
                       probe_options=probe_options(layers, token))
    if res.is_main_process:
        typer.echo(f"{res.status}: {res.num_records} images in {res.path}")


# --- evaluate -------------------------------------------------------------------------------------------------------


def _check_out(out: Optional[Path]) -> None:
    from memlens.rundir import check_output_file

    if out is not None:
        check_output_file(out)


def _emit(result: dict, out: Optional[Path], summary: str) -> None:
    from memlens.rundir import jsonable, write_json

    if out is None:
        typer.echo(json.dumps(jsonable(result), indent=2))
    else:
        write_json(out, result)
        typer.echo(f"{summary}; wrote {out}")


@evaluate_app.command("detection")
def detection_command(
    scan: Annotated[list[Path], typer.Option("--scan", help="Scan directory; repeat for a negative scan.")],
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Result JSON; the ROC plot goes next to it as *.roc.png. Default: print the JSON.")] = None,
) -> None:
    """AUC, Wen's ACC, best F1 and TPR@1%FPR (two conventions) for D and LD, T = 1, 10, all, per generation and
    per prompt."""
    from memlens.evaluate import detection_results, write_detection
    from memlens.rundir import check_output_file

    if out is not None:
        check_output_file(out)
    result = detection_results(list(scan))
    best = [r for r in result.report["results"] if r["subset"] == "all" and r["level"] == "generation" and "auc" in r]
    summary = ", ".join(f"{r['signal']} T={r['T']} AUC {r['auc']:.3f}" for r in best)
    if out is None:
        _emit(result.report, None, "")
        return
    write_detection(result, out)
    typer.echo(f"detection: {result.report['n_generations']} generations; {summary}; wrote {out}")


@evaluate_app.command("localization")
def localization_command(
    scan: Annotated[Path, typer.Option("--scan", help="Scan directory.")],
    masks: Annotated[Path, typer.Option(
        "--masks", help="Folder of masks: <stem>.png per generation, or <index>.png / <prompt_index>.png per prompt.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Result JSON (default: print it).")] = None,
) -> None:
    """Pixel AUROC, IoU at fixed thresholds (0.5 on min-max maps, Otsu) and the oracle IoU of BE maps vs masks."""
    from memlens.evaluate import localization_results

    _check_out(out)
    result = localization_results(scan, masks)
    summary = (
        f"localization: {result['n_evaluated']} images ({result['n_missing_masks']} without a mask); "
        f"IoU@0.5 {result['iou_fixed_0.5_mean']:.3f}, Otsu {result['iou_otsu_mean']:.3f}"
    )
    _emit(result, out, summary)


@evaluate_app.command("similarity")
def similarity_command(
    scan: Annotated[Path, typer.Option("--scan", help="Scan directory.")],
    references: Annotated[Path, typer.Option("--references", help="Folder of <index>/*.png training images.")],
    sscd: Annotated[Optional[Path], typer.Option("--sscd", help="SSCD TorchScript file.")] = None,
    preset: Annotated[str, typer.Option("--preset", help="SSCD preprocessing: 'sscd' (README) or 'wen'.")] = "sscd",
    clip_model: Annotated[Optional[str], typer.Option("--clip-model", help="open_clip architecture name.")] = None,
    clip_pretrained: Annotated[
        Optional[Path], typer.Option("--clip-pretrained", help="Local open_clip weights file.")
    ] = None,
    mask_normalize: Annotated[
        str, typer.Option("--mask-normalize", help="BE mask weights for LS: 'mean' (default), 'minmax' or 'none'.")
    ] = "mean",
    out: Annotated[Optional[Path], typer.Option("--out", help="Result JSON (default: print it).")] = None,
) -> None:
    """SSCD, S and LS (paper Eqs. 9-10) against reference images, and CLIP score against the prompt."""
    from memlens.evaluate import similarity_results

    _check_out(out)
    result = similarity_results(scan, references, sscd, preset, clip_model, clip_pretrained, mask_normalize)
    s = result["summary"]
    parts = [f"{k} {s[k + '_mean']:.3f}" for k in ("sscd", "S", "LS", "clip_score") if k + "_mean" in s]
    summary = (
        f"similarity: {result['n_with_references']}/{result['n_generations']} generations with references"
        + (f"; {', '.join(parts)}" if parts else "")
    )
    _emit(result, out, summary)


# --- report ---------------------------------------------------------------------------------------------------------


@app.command("report")
def report_command(
    scan_dir: Annotated[Path, typer.Argument(help="Scan directory (holds generations.jsonl).")],
    out: Annotated[Optional[Path], typer.Option("--out", help="HTML file (default: DIR/report.html).")] = None,
    references: Annotated[
        Optional[Path], typer.Option("--references", help="Training images as <index>/*.png, shown per prompt.")
    ] = None,
    link: Annotated[
        bool, typer.Option("--link", help="Refer to images by relative path instead of inlining.")
    ] = False,
    max_side: Annotated[int, typer.Option("--max-side", help="Downscale inlined images to this many pixels.")] = 256,
) -> None:
    """Write one self-contained HTML page: images, BE overlays, scores, sortable, with ROC curves when labelled."""
    from memlens.report import write_report

    path = write_report(scan_dir, out, references, inline=not link, max_side=max_side)
    typer.echo(f"report: wrote {path}")


# --- demo -----------------------------------------------------------------------------------------------------------


@app.command("demo")
def demo_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for the scan, ground truth, summary.json, report.html.")],
    model: Annotated[Optional[Path], typer.Option(
        "--model", help="Organism folder (with ground_truth/), or a shipped one: testbed (v1, the default) or "
        "testbed-v2 (docs/organism.md).")] = None,
    per_memorized: Annotated[int, typer.Option("--per-memorized", min=1, help="Images per memorized prompt.")] = 8,
    per_generic: Annotated[int, typer.Option("--per-generic", min=1, help="Images per generic prompt.")] = 2,
    n_generic: Annotated[int, typer.Option("--n-generic", min=1, help="Generic prompts (from the organism).")] = 64,
    steps: Annotated[Optional[int], typer.Option(
        "--steps", min=1, help="DDIM steps (default: the organism's recommendation).")] = None,
    guidance: Annotated[Optional[float], typer.Option("--guidance", help="Guidance scale (default: the organism's).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Base seed, as in `memlens scan`.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per pipeline call.")] = 16,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help=THREADS_HELP)] = None,
    layers: LayersOption = None,
    token: TokenOption = "eos",
) -> None:
    """Scan the organism's memorized and generic prompts, score them against its ground truth, write summary.json
    and report.html."""
    from memlens.testbed.demo import format_summary, run_demo

    set_threads(threads, "cpu")
    result = run_demo(out, organism=model, per_memorized=per_memorized, per_generic=per_generic, n_generic=n_generic,
                      steps=steps, guidance=guidance, seed=seed, batch_size=batch_size,
                      probe_options=probe_options(layers, token))
    typer.echo(format_summary(result.summary, result.path))


# --- bench ----------------------------------------------------------------------------------------------------------


@app.command("bench")
def bench_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for leaderboard.json/.md/.html and per-generation maps.")],
    model: Annotated[str, typer.Option(
        "--model", help="'testbed' (the shipped organism and its ground truth; 'testbed-v2' the other shipped one), "
                        "an organism folder, or any model with --prompts.")] = "testbed",
    prompts: Annotated[Optional[Path], typer.Option(
        "--prompts", help="Prompt file with 0/1 labels and types (models other than the organism); with --webster, "
                          "a Webster / mem-curv-diff label file (default: the folder's "
                          "groundtruth_parquets/sdv1_bb_edge_groundtruth.parquet).")] = None,
    masks: Annotated[Optional[Path], typer.Option(
        "--masks", help="Folder of <index>.png masks for memorized prompts (with --prompts).")] = None,
    webster: Annotated[Optional[Path], typer.Option(
        "--webster", help="Local copy of Webster's fraisdufour/templates-verbs (templates/metadata.parquet and the "
                          "masks): labels and types from its label file, template masks for localization; dead "
                          "entries counted and skipped.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="CI size: one image per item, 6 generic prompts, 6 steps, "
                                                        "2 Hutchinson probes.")] = False,
    per_memorized: Annotated[Optional[int], typer.Option("--per-memorized", help="Images per memorized prompt.")] = None,
    per_generic: Annotated[Optional[int], typer.Option("--per-generic", help="Images per non-memorized prompt.")] = None,
    n_generic: Annotated[Optional[int], typer.Option("--n-generic", help="Generic prompts (organism only).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Denoising steps (default: the pipeline's).")] = None,
    guidance: Annotated[Optional[float], typer.Option("--guidance", help="Guidance scale (> 1).")] = None,
    probes: Annotated[Optional[int], typer.Option("--probes", help="Hutchinson probes for the curvature map.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Base seed, as in `memlens scan`.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per pipeline call.")] = 16,
    dtype: Annotated[str, typer.Option("--dtype", help="float32, float16 or bfloat16 (models other than the "
                                                       "organism).")] = "float32",
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, ... (models other than the organism).")] = "cpu",
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help=THREADS_HELP)] = None,
) -> None:
    """Every localizer and detector (BE, score difference, curvature difference; D, LD, anisotropy, sharpness) on
    the same generations, one generation pass; writes the leaderboard with costs."""
    from memlens.bench import QUICK, BenchSettings, run_bench

    set_threads(threads, device)
    given = {"per_memorized": per_memorized, "per_generic": per_generic, "n_generic": n_generic, "steps": steps,
             "probes": probes}
    base = dict(QUICK) if quick else {}
    base.update({k: v for k, v in given.items() if v is not None})
    settings = BenchSettings(**base, guidance=guidance, seed=seed, batch_size=batch_size)
    board = run_bench(out, model=model, prompts=prompts, masks=masks, webster=webster, settings=settings, dtype=dtype,
                      device=device, progress=False)
    best_loc = max(board["localization"], key=lambda m: board["localization"][m]["iou_otsu"] or -1)
    best_det = max(board["detection"], key=lambda m: board["detection"][m]["auc"])
    typer.echo(f"bench: {board['n']['generations']} generations; best localization at Otsu: {best_loc} "
               f"(IoU {board['localization'][best_loc]['iou_otsu'] or float('nan'):.3f}); best detection: {best_det} "
               f"(AUC {board['detection'][best_det]['auc']:.3f}); wrote {Path(out) / 'leaderboard.json'}")
    if "ground_truth" in board:
        from memlens.bench import webster_line

        typer.echo(webster_line(board["ground_truth"]))


def _mount() -> None:
    from memlens.mitigation.cli import mitigate_command
    from memlens.testbed.cli import app as testbed_app

    app.add_typer(evaluate_app, name="evaluate", help="Detection, localization and similarity metrics.")
    app.command("mitigate", help="Generate with inference-time mitigation and record what changed.")(mitigate_command)
    app.add_typer(testbed_app, name="testbed", help="The model organism: make its data, train it, analyze it.")


_mount()


def _configure_output() -> None:
    # Library warnings (e.g. prompts cut to the context) reach the terminal as one "memlens: warning:" line each.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("memlens: warning: %(message)s"))
    root = logging.getLogger("memlens")
    if not root.handlers:
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    # transformers warns at import about optional image-processor backends memlens never uses; keep the terminal
    # for what the user asked about. An explicit TRANSFORMERS_VERBOSITY still wins.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; a `MemlensError` becomes one line on stderr and exit status 2."""
    _configure_output()
    try:
        app(args=argv, standalone_mode=False)
    except MemlensError as err:
        print(f"memlens: error: {flag_message(str(err))}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as ex:  # raised by commands that exit early on purpose
        sys.exit(ex.exit_code)
    except KeyboardInterrupt:
        print("memlens: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as ex:  # usage errors (bad option values): a message, not a traceback
        # Recent Typer releases raise their own vendored copy of click's exceptions, which are not
        # click.ClickException; both kinds carry click's `show()` and `exit_code`.
        if callable(getattr(ex, "show", None)) and isinstance(getattr(ex, "exit_code", None), int):
            ex.show()
            sys.exit(ex.exit_code)
        raise


if __name__ == "__main__":
    main()
