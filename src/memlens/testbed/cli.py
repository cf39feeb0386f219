"""`memlens testbed ...`: make the organism's data and train it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


@app.command("make-data")
def make_data_command(
    out: Path = typer.Option(..., "--out", help="Directory to write the imagefolder dataset into."),
    seed: int = typer.Option(0, "--seed", help="Seed; the dataset is a pure function of it and the sizes."),
    n_generic: int = typer.Option(20000, "--n-generic", help="Number of distinct generic scenes."),
    items: str = typer.Option("v2", "--items", help="Planted item set: v2 (graded sizes and copies, the default) "
                              "or v1 (the first organism's four photos and four 16-pixel templates)."),
    copies: Optional[int] = typer.Option(None, "--copies", help="Rows per memorized item (global image or local "
                                         "template); default: the item set's own counts."),
    copies_of: list[str] = typer.Option(
        [], "--copies-of", metavar="GROUP=N", help="Rows for one item group instead of --copies; repeatable."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
) -> None:
    """Write the synthetic dataset with planted global and local memorization (and ground-truth masks)."""
    from memlens.testbed.data import make_dataset

    path = make_dataset(out, seed=seed, n_generic=n_generic, copies=copies, overwrite=overwrite,
                        copies_of=_parse_copies_of(copies_of), items=items)
    typer.echo(f"wrote {path}/metadata.jsonl and {path}/memorized.jsonl")


def _parse_copies_of(values: list[str]) -> dict[str, int]:
    from memlens.errors import InputError

    parsed: dict[str, int] = {}
    for value in values:
        group, sep, count = value.partition("=")
        if not sep or not count.strip().isdigit():
            raise InputError(f"--copies-of {value!r}: expected GROUP=N with N a whole number, e.g. colorwheel=4000")
        parsed[group.strip()] = int(count)
    return parsed


@app.command("train")
def train_command(
    data: Path = typer.Option(..., "--data", help="imagefolder dataset (metadata.jsonl with file_name, text)."),
    out: Path = typer.Option(..., "--out", help="Model directory: EMA pipeline, checkpoints, log."),
    steps: int = typer.Option(2500, "--steps"),
    batch_size: int = typer.Option(32, "--batch-size"),
    lr: float = typer.Option(1.5e-3, "--lr"),
    text_lr_mult: float = typer.Option(1.0, "--text-lr-mult", help="Text-encoder lr as a multiple of --lr."),
    warmup: int = typer.Option(100, "--warmup"),
    decay_from: float = typer.Option(0.6, "--decay-from",
                                     help="Cosine lr decay (to 0.1x) starts at this fraction of --steps; 1 = none."),
    seed: int = typer.Option(0, "--seed"),
    caption_dropout: float = typer.Option(0.1, "--caption-dropout", help="Empty-prompt probability (for CFG)."),
    dropout_kinds: Optional[str] = typer.Option(
        None, "--dropout-kinds",
        help="Comma list of `kind` values that get caption dropout (e.g. generic); default: all rows."),
    snr_gamma: float = typer.Option(5.0, "--snr-gamma", help="min-SNR-gamma weighting; 0 = plain MSE."),
    ema_decay: float = typer.Option(0.995, "--ema-decay"),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every"),
    unet_channels: str = typer.Option("64,64,64", "--unet-channels"),
    schedule: str = typer.Option("sd", "--schedule", help="Noise schedule: sd (scaled-linear) or ddpm (linear)."),
    factor: int = typer.Option(4, "--factor", help="Pixel-unshuffle factor: the UNet runs at resolution/factor."),
    unet_heads: int = typer.Option(1, "--unet-heads", help="Attention heads per UNet attention layer."),
    text_width: int = typer.Option(128, "--text-width"),
    text_layers: int = typer.Option(3, "--text-layers"),
    pad_token: str = typer.Option("pad", "--pad-token", help="Padding after the end token: pad (a token of its "
                                  "own, as SD v2; the shipped organism) or eos (the end token again, as SD v1)."),
    threads: int = typer.Option(1, "--threads", help="torch threads; 1 is most robust on a shared machine."),
    filter: str = typer.Option("none", "--filter", help="Training-time mitigation: drop samples whose D or LD "
                               "(none, D, LD) is above --threshold; see docs/mitigation.md."),
    threshold: float = typer.Option(float("inf"), "--threshold", help="Magnitude above which --filter drops a sample."),
    end_contrastive: float = typer.Option(0.0, "--end-contrastive", help="Weight of a CLIP-style loss tying the "
                                          "pooled end-token output to its image (0 = off; an experiment, see "
                                          "docs/organism.md)."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start from the weights of this organism "
                                             "folder (same data and architecture) instead of a fresh init."),
    text_encoder: Optional[Path] = typer.Option(None, "--text-encoder", help="A `memlens testbed pretrain-clip` "
                                                "folder: use its tokenizer and text encoder, frozen, as SD does."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train the text encoder and UNet from scratch on an imagefolder dataset."""
    from memlens.errors import InputError
    from memlens.testbed.train import TrainConfig, train

    try:
        channels = [int(c) for c in unet_channels.split(",")]
    except ValueError:
        raise InputError(f"--unet-channels: expected comma-separated integers, got {unet_channels!r}") from None
    config = TrainConfig(
        steps=steps, batch_size=batch_size, lr=lr, text_lr_mult=text_lr_mult, warmup=warmup, decay_from=decay_from, seed=seed,
        caption_dropout=caption_dropout,
        dropout_kinds=[k.strip() for k in dropout_kinds.split(",")] if dropout_kinds else None,
        snr_gamma=snr_gamma, ema_decay=ema_decay, checkpoint_every=checkpoint_every, unet_channels=channels,
        unet_heads=unet_heads, factor=factor, schedule=schedule,
        text_width=text_width, text_layers=text_layers, pad_token=pad_token, end_contrastive=end_contrastive,
        threads=threads, filter=filter, filter_threshold=threshold,
        init_from=str(init_from) if init_from is not None else None,
        text_encoder=str(text_encoder) if text_encoder is not None else None,
    )
    import torch

    # The organism's training is bit-exact for a given thread count; one thread is also the most robust on a
    # shared machine. The library leaves the process's thread count to the entry point.
    torch.set_num_threads(threads)
    path = train(data, out, config, resume=resume, progress=progress)
    typer.echo(f"wrote {path}")


@app.command("analyze")
def analyze_command(
    model_dir: Path = typer.Argument(..., help="Organism folder (e.g. src/memlens/testbed/weights)."),
    out_json: Path = typer.Argument(..., help="Result JSON; a grid of images and END maps goes beside it (.png)."),
    per_prompt: int = typer.Option(4, "--per-prompt", min=1, help="Images per prompt."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Default: the organism's recommendation."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="DDIM steps; default: the organism's."),
    seed: int = typer.Option(0, "--seed"),
    trajectory: Optional[str] = typer.Option(
        None, "--trajectory", metavar="GROUP", help="Instead: follow GROUP's prompt through sampling and report, "
        "every 5 steps, the x0 prediction's mean correlation with each memorized item of its kind."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads (default 1 on a CPU)."),
) -> None:
    """Which token and which block carry the bright-ending signal in an organism (docs/organism.md)."""
    import json

    from memlens.cli import set_threads
    from memlens.rundir import check_output_file, write_json
    from memlens.testbed import analysis

    check_output_file(out_json, "out_json")
    set_threads(threads, "cpu")
    if trajectory:
        result = analysis.trajectory(model_dir, trajectory, per_prompt=per_prompt, steps=steps, guidance=guidance,
                                     seed=seed)
        write_json(out_json, result)
        for row in result["rows"]:
            typer.echo(json.dumps(row))
        return
    grid = str(out_json).removesuffix(".json") + ".png"
    result = analysis.analyse(model_dir, per_prompt=per_prompt, steps=steps, guidance=guidance, seed=seed, grid=grid)
    write_json(out_json, result)
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "blocks"}, indent=1))
    for block, res in result.get("blocks", {}).items():
        typer.echo(f"{block} " + json.dumps({t: (None if v["pixel_auroc"] is None else round(v["pixel_auroc"], 3))
                                              for t, v in res.items()}))


@app.command("pretrain-clip")
def pretrain_clip_command(
    data: Path = typer.Option(..., "--data", help="imagefolder dataset (metadata.jsonl with file_name, text)."),
    out: Path = typer.Option(..., "--out", help="Folder for the tokenizer, text encoder, log and checkpoints."),
    steps: int = typer.Option(1500, "--steps", min=1),
    batch_size: int = typer.Option(256, "--batch-size", min=2),
    lr: float = typer.Option(1e-3, "--lr"),
    seed: int = typer.Option(0, "--seed"),
    pad_token: str = typer.Option("eos", "--pad-token", help="Padding after the end token: eos (the end token "
                                  "again, SD v1's layout, the default) or pad (a token of its own, SD v2's)."),
    text_width: int = typer.Option(128, "--text-width", min=1),
    text_layers: int = typer.Option(3, "--text-layers", min=1),
    checkpoint_every: int = typer.Option(250, "--checkpoint-every", min=1),
    threads: int = typer.Option(1, "--threads", min=1, help="torch threads; 1 is most robust on a shared machine."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Pretrain the organism's text encoder contrastively (CLIP's in-batch InfoNCE on the end token's output)."""
    import torch

    from memlens.testbed.clip import ClipConfig, pretrain_clip

    torch.set_num_threads(threads)
    config = ClipConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, pad_token=pad_token,
                        text_width=text_width, text_layers=text_layers, checkpoint_every=checkpoint_every,
                        threads=threads)
    path = pretrain_clip(data, out, config, resume=resume, progress=progress)
    typer.echo(f"wrote {path}")


def _int_list(option: str, text: str) -> list[int]:
    from memlens.errors import InputError

    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{option}: expected comma-separated whole numbers, got {text!r}") from None


@app.command("study")
def study_command(
    data: Path = typer.Option(..., "--data", help="imagefolder dataset that plants items (memorized.jsonl)."),
    out: Path = typer.Option(..., "--out", help="Study folder; rerun the same command to resume it."),
    seeds: str = typer.Option("0,1,2,3,4,5", "--seeds", help="Training seeds, comma-separated."),
    layouts: str = typer.Option("eos,pad", "--layouts", help="Padding layouts: eos (SD v1), pad (SD v2)."),
    demo_seeds: str = typer.Option("0", "--demo-seeds", help="Demo seeds each run is scored at."),
    clip_steps: int = typer.Option(1500, "--clip-steps", min=1),
    steps: int = typer.Option(4000, "--steps", min=1, help="UNet training steps."),
    threads: int = typer.Option(1, "--threads", min=1),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Score each run with the demo (--no-eval: train "
                                  "only; rerun with --eval later, which skips finished training)."),
    train: bool = typer.Option(True, "--train/--no-train", help="--no-train: only score runs whose training has "
                               "finished (e.g. beside processes that train)."),
    progress: bool = typer.Option(False, "--progress/--no-progress"),
) -> None:
    """Train the organism recipe over seeds and padding layouts and tabulate, per token, where BE sits."""
    import torch

    from memlens.testbed.study import StudyConfig, run_study

    torch.set_num_threads(threads)
    config = StudyConfig(seeds=_int_list("--seeds", seeds), layouts=[x.strip() for x in layouts.split(",")],
                         demo_seeds=_int_list("--demo-seeds", demo_seeds), clip_steps=clip_steps, steps=steps,
                         threads=threads, evaluate=evaluate, train=train)
    run_study(data, out, config, progress=progress)
    typer.echo(f"wrote {out}/study.json and {out}/study.md")
