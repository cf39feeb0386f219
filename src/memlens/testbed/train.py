"""Train an organism (text encoder + UNet, from scratch) on any imagefolder dataset with a `text` column.

Nothing here looks at attention maps or masks: whatever memorization and bright-ending behaviour the model shows
comes from the data (duplication) and the objective alone.

Exact resume: a checkpoint holds the model, EMA, optimizer, lr schedule, step and the training RNG; the data order
is a pure function of (seed, epoch). `--resume` from step k and training to n gives the same weights as one run to n.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from memlens.errors import InputError
from memlens.imagefolder import ImageTextData, batch_indices, load_imagefolder  # noqa: F401 (re-exported)
from memlens.testbed.pipeline import OrganismPipeline, build_pipeline, build_tokenizer, tokenize

CHECKPOINTS = "checkpoints"


@dataclass
class TrainConfig:
    steps: int = 2500
    batch_size: int = 32
    lr: float = 1.5e-3
    text_lr_mult: float = 1.0  # text-encoder lr = lr * text_lr_mult
    warmup: int = 100
    # Cosine decay to lr * 0.1 over the last (1 - decay_from) of the steps; 1.0 = constant lr. At constant 1.5e-3
    # the organism's loss jumped from 0.024 to 0.5 at step ~2300 (run rC in docs/organism.md).
    decay_from: float = 0.6
    weight_decay: float = 0.01
    seed: int = 0
    caption_dropout: float = 0.1  # probability of training on the empty prompt (classifier-free guidance)
    # If set and the dataset has a `kind` column, only rows of these kinds get caption dropout; otherwise all rows.
    dropout_kinds: list[str] | None = None
    snr_gamma: float = 5.0  # min-SNR-gamma loss weighting; 0 = plain epsilon MSE
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 50
    resolution: int = 32
    max_length: int = 16
    pad_token: str = "pad"  # what pads captions after the end token, see memlens.testbed.pipeline.PAD_CHOICES
    text_width: int = 128
    text_layers: int = 3
    unet_channels: list[int] = field(default_factory=lambda: [64, 64, 64])
    unet_heads: int = 1  # one head: the head-mean attention map is not diluted by heads that ignore the text
    factor: int = 4  # pixel-unshuffle factor of the "VAE": the UNet runs at resolution / factor
    schedule: str = "sd"  # noise schedule name, see memlens.testbed.pipeline.SCHEDULES
    threads: int = 1
    # Training-time mitigation (memlens.mitigation.training): drop samples whose D or LD exceeds filter_threshold.
    filter: str = "none"
    filter_threshold: float = float("inf")
    # Weight of a CLIP-style loss tying the text encoder's pooled end-token output to its image (0 = off). CLIP's
    # contrastive loss is what makes END the prompt's summary in Stable Diffusion's text encoder; this tries the same
    # pressure here. It reads images and captions only, never attention or masks.
    end_contrastive: float = 0.0
    # Start from the weights of an organism folder (its saved EMA pipeline) instead of a fresh init: a second,
    # low-lr phase after a first run. The architecture and the tokenizer's vocabulary must match.
    init_from: str | None = None
    # A `memlens testbed pretrain-clip` folder: its tokenizer and contrastively pretrained text encoder are used and
    # kept frozen while the UNet trains, as Stable Diffusion's CLIP is. None: the text encoder trains jointly from
    # scratch (the first organism's recipe).
    text_encoder: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def validate(self) -> None:
        """Every option checked before anything is built or written; errors name the parameter."""
        from memlens.mitigation.training import CRITERIA
        from memlens.testbed.pipeline import PAD_CHOICES, SCHEDULES

        for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every", "resolution",
                     "max_length", "text_width", "text_layers", "unet_heads", "factor", "threads"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"`{name}` must be at least 1, got {getattr(self, name)!r}")
        if not 0 <= self.ema_decay < 1:
            raise InputError(f"`ema_decay` must lie in [0, 1), got {self.ema_decay!r}")
        for name in ("lr", "text_lr_mult", "warmup", "weight_decay", "snr_gamma", "grad_clip", "end_contrastive"):
            if getattr(self, name) < 0:
                raise InputError(f"`{name}` must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.caption_dropout <= 1 or not 0 <= self.decay_from <= 1:
            raise InputError("`caption_dropout` and `decay_from` must lie in [0, 1]")
        if self.schedule not in SCHEDULES:
            raise InputError(f"`schedule` must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.pad_token not in PAD_CHOICES:
            raise InputError(f"`pad_token` must be one of {', '.join(PAD_CHOICES)}, got {self.pad_token!r}")
        if self.filter not in CRITERIA:
            raise InputError(f"`filter` must be one of {', '.join(CRITERIA)}, got {self.filter!r}")
        if not self.unet_channels or any(int(c) < 1 for c in self.unet_channels):
            raise InputError(f"`unet_channels` must be positive widths, got {self.unet_channels!r}")


# ---------------------------------------------------------------- loss
def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                    alphas_cumprod: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Weighted epsilon MSE per sample, shape (B,).

    Hook point: training-time mitigations (filtering or reweighting samples) act on this vector only.
    min-SNR-gamma (Hang et al. 2023) caps the weight of low-noise steps, which speeds up learning a lot here.
    """
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    if snr_gamma > 0:
        a = alphas_cumprod.to(timesteps.device)[timesteps]
        snr = a / (1 - a)
        mse = mse * torch.clamp(snr, max=snr_gamma) / snr
    return mse


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up, constant, then cosine decay to 0.1 from `decay_from * steps` to `steps`."""
    warm = min(1.0, (step + 1) / max(1, config.warmup))
    start = config.decay_from * config.steps
    if step < start or config.decay_from >= 1:
        return warm
    progress = min(1.0, (step - start) / max(1.0, config.steps - start))
    return warm * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress)))


# ---------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of parameters, kept outside the models so it checkpoints as a plain dict."""

    def __init__(self, named_params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in named_params.items()}

    @torch.no_grad()
    def update(self, named_params: dict[str, torch.Tensor], step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # short warm-up so early EMA is not stuck at init
        for k, v in named_params.items():
            self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)


def _named_params(pipe: OrganismPipeline) -> dict[str, torch.Tensor]:
    """The trained parameters: the UNet's, and the text encoder's unless it is frozen."""
    out = {f"unet.{k}": v for k, v in pipe.unet.named_parameters()}
    out.update({f"text_encoder.{k}": v for k, v in pipe.text_encoder.named_parameters() if v.requires_grad})
    return out


# ---------------------------------------------------------------- checkpoints
def _checkpoint_dirs(out: Path) -> list[Path]:
    return sorted((out / CHECKPOINTS).glob("step_*"))


def _save_checkpoint(out: Path, state: dict, keep: int) -> None:
    d = out / CHECKPOINTS / f"step_{state['step']:07d}"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "state.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(d / "state.pt")  # atomic: a killed job never leaves a half-written checkpoint
    for old in _checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(old)


def save_ema_pipeline(pipe: OrganismPipeline, ema: EMA, target: Path) -> None:
    """Write the EMA weights as a loadable pipeline (the raw weights stay in the checkpoint)."""
    raw = {k: v.detach().clone() for k, v in _named_params(pipe).items()}
    with torch.no_grad():
        for k, v in _named_params(pipe).items():
            v.copy_(ema.shadow[k])
        pipe.save_pretrained(str(target))
        for k, v in _named_params(pipe).items():
            v.copy_(raw[k])


def _load_initial_weights(pipe: OrganismPipeline, tokenizer, source: Path) -> None:
    """Copy UNet and text-encoder weights from the organism in `source` into `pipe`, checking they fit."""
    from memlens.testbed.pipeline import load_pipeline

    try:
        init = load_pipeline(source)
    except InputError as ex:  # load_pipeline names the folder; say which option it came from
        raise InputError(f"`init_from` {ex}") from None
    if init.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise InputError(f"`init_from` {source}: its tokenizer's vocabulary differs from the one built from this "
                         "dataset's captions; continue training on the data the model was trained on")
    for name in ("unet", "text_encoder"):
        mine, theirs = getattr(pipe, name).state_dict(), getattr(init, name).state_dict()
        bad = [k for k in mine if k not in theirs or theirs[k].shape != mine[k].shape] + \
              [k for k in theirs if k not in mine]
        if bad:
            raise InputError(f"`init_from` {source}: {name} does not fit this run's architecture options "
                             f"(first mismatch: {bad[0]}); use the options the model was trained with")
        getattr(pipe, name).load_state_dict(theirs)


def _encode_once(text_encoder, ids: torch.Tensor, empty_ids: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row -> caption index, (captions + 1, T, D) hidden states); the last entry is the empty prompt's."""
    distinct, row_caption = torch.unique(ids, dim=0, return_inverse=True)
    distinct = torch.cat([distinct, empty_ids[None]])
    with torch.no_grad():
        states = torch.cat([text_encoder(chunk.to(device))[0] for chunk in distinct.split(1024)])
    return row_caption, states


# ---------------------------------------------------------------- main loop
def train(data_dir: str | Path, out_dir: str | Path, config: TrainConfig | None = None, resume: bool = False,
          progress: bool = True, stop_after: int | None = None) -> Path:
    """Train and write the EMA pipeline to `out_dir` (plus checkpoints, config and a loss log). Returns `out_dir`.

    `stop_after` ends the run early at that step (with a checkpoint), as if it had been interrupted there; the lr
    schedule still follows `config.steps`, so `resume=True` later continues the same run exactly.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    out = Path(out_dir)
    cfg_path = out / "train_config.json"
    if resume:
        ckpts = _checkpoint_dirs(out)
        if not ckpts or not cfg_path.is_file():
            raise InputError(f"{out}: --resume given but no checkpoint ({CHECKPOINTS}/step_*/state.pt) found")
        # Steps may be extended on resume; everything else must stay as the run was started.
        saved = TrainConfig.from_dict(json.loads(cfg_path.read_text()))
        if config is not None:
            saved.steps = config.steps
        config = saved
    config = config or TrainConfig()
    config.validate()
    pretrained = None
    if config.text_encoder:
        if config.init_from or config.end_contrastive > 0:
            raise InputError("text_encoder: a frozen pretrained text encoder cannot be combined with init_from or "
                             "end_contrastive (both change the text encoder)")
        from memlens.testbed.clip import load_pretrained_text

        pretrained = load_pretrained_text(config.text_encoder)
        clip_cfg = pretrained[2]
        # The text pathway is the pretrained one's; record its shape so the config says what was trained.
        config.text_width, config.text_layers = clip_cfg.text_width, clip_cfg.text_layers
        config.max_length, config.pad_token = clip_cfg.max_length, clip_cfg.pad_token

    data = load_imagefolder(data_dir, config.resolution)
    tok_dir = out / "tokenizer_train"
    if resume:
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    elif pretrained is not None:
        tokenizer = pretrained[0]
    else:
        tokenizer = build_tokenizer(data.captions, config.max_length, config.pad_token)

    # Initial weights are a function of the seed; the caller's global RNG state is left as it was.
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        pipe = build_pipeline(tokenizer, resolution=config.resolution, text_width=config.text_width,
                              text_layers=config.text_layers, unet_channels=tuple(config.unet_channels),
                              unet_heads=config.unet_heads, factor=config.factor,
                              schedule=config.schedule,
                              **({"text_heads": pretrained[2].text_heads} if pretrained is not None else {}))
        after_build = torch.get_rng_state()  # the optional contrastive head is drawn from here, as it always was
    if pretrained is not None:
        pipe.text_encoder.load_state_dict(pretrained[1].state_dict())
        pipe.text_encoder.requires_grad_(False).eval()
    if not resume:
        if config.init_from:
            _load_initial_weights(pipe, tokenizer, Path(config.init_from))
        # Only now, with the inputs checked, does the run leave anything in `out`.
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(tok_dir))
        cfg_path.write_text(json.dumps(asdict(config), indent=1))
        if (Path(data_dir) / "memorized.jsonl").is_file():
            from memlens.testbed.items import write_ground_truth

            write_ground_truth(data_dir, out)
    unet, text_encoder, vae, sched = pipe.unet, pipe.text_encoder, pipe.vae, pipe.scheduler
    ids = tokenize(tokenizer, data.captions)
    empty_ids = tokenize(tokenizer, [""])[0]
    keep_filter = None
    if config.filter != "none":
        from memlens.mitigation.training import TrainingFilter

        keep_filter = TrainingFilter(config.filter, config.filter_threshold, empty_ids, tokenizer.eos_token_id)
    droppable = torch.ones(len(ids), dtype=torch.bool)
    if config.dropout_kinds and data.kinds is not None:
        droppable = torch.tensor([k in config.dropout_kinds for k in data.kinds])

    # Built after the pipeline, so that the pipeline's initial weights do not depend on this option.
    matcher = None
    if config.end_contrastive > 0:
        from memlens.testbed.clip import ContrastiveHead

        with torch.random.fork_rng():
            torch.set_rng_state(after_build)
            matcher = ContrastiveHead(config.text_width)
    frozen_text = pretrained is not None
    groups = [{"params": unet.parameters(), "lr": config.lr}]
    if not frozen_text:
        groups.append({"params": text_encoder.parameters(), "lr": config.lr * config.text_lr_mult})
    if matcher is not None:
        groups.append({"params": matcher.parameters(), "lr": config.lr})
    clipped = list(unet.parameters()) + ([] if frozen_text else list(text_encoder.parameters()))
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    ema = EMA(_named_params(pipe), config.ema_decay)
    gen = torch.Generator().manual_seed(config.seed)
    step = 0
    if resume:
        state = torch.load(_checkpoint_dirs(out)[-1] / "state.pt", weights_only=False)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_sched"])
        ema.shadow = state["ema"]
        if matcher is not None:
            matcher.load_state_dict(state["matcher"])
        gen.set_state(state["gen"])
        step = state["step"]

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    device = accelerator.device
    if matcher is not None:
        matcher.to(device).train()
    alphas_cumprod = sched.alphas_cumprod
    unet.train()
    cond_table = row_caption = None
    if frozen_text:
        # A frozen encoder gives every caption the same states at every step: encode each distinct caption once.
        row_caption, cond_table = _encode_once(text_encoder, ids, empty_ids, device)
    else:
        text_encoder.train()

    log_f = open_log(out / "log.jsonl", step)
    bar = tqdm(total=config.steps, initial=step, disable=not progress, desc="train", dynamic_ncols=True)
    running, running_match, t0 = [], [], time.time()
    kept = seen = 0
    end = min(config.steps, stop_after) if stop_after else config.steps
    while step < end:
        idx = torch.from_numpy(batch_indices(len(ids), config.batch_size, step, config.seed))
        x0 = data.images[idx].float().div(127.5).sub(1.0)
        latents = vae.encode(x0).latent_dist.sample()
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=gen)
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=gen)
        drop = (torch.rand(b, generator=gen) < config.caption_dropout) & droppable[idx]
        batch_ids = torch.where(drop[:, None], empty_ids[None], ids[idx])
        noisy = sched.add_noise(latents, noise, timesteps)

        if cond_table is not None:
            cond = cond_table[torch.where(drop, -1, row_caption[idx]).to(device)]
        else:
            encoded = text_encoder(batch_ids.to(device))
            cond = encoded[0]
        match_loss = None
        if matcher is not None and int((~drop).sum()) > 1:
            # Empty-prompt rows (caption dropout) have no caption to match.
            rows = (~drop).to(device)
            match_loss = matcher(x0.to(device)[rows], encoded[1][rows], batch_ids.to(device)[rows])
        if keep_filter is not None:
            # Dropped samples leave the batch before the gradient pass; a batch with none left updates nothing.
            keep = keep_filter(unet, text_encoder, noisy.to(device), timesteps.to(device), cond, batch_ids.to(device))
            kept += int(keep.sum())
            seen += int(keep.numel())
            keep = keep.cpu()
            noisy, noise, timesteps, cond = noisy[keep], noise[keep], timesteps[keep], cond[keep.to(cond.device)]
        if noisy.shape[0]:
            pred = unet(noisy.to(device), timesteps.to(device), encoder_hidden_states=cond).sample
            loss = per_sample_loss(pred, noise.to(device), timesteps.to(device), alphas_cumprod, config.snr_gamma).mean()
            running.append(loss.item())  # the log's `loss` is the diffusion loss alone, comparable across runs
            if match_loss is not None:
                running_match.append(match_loss.item())
                loss = loss + config.end_contrastive * match_loss
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(clipped, config.grad_clip)
            optimizer.step()
        with warnings.catch_warnings():
            # A batch the filter emptied skips optimizer.step() on purpose; the schedule still follows the step count.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(_named_params(pipe), step)
        step += 1
        bar.update(1)
        if step % config.log_every == 0 or step == end:
            rec = {"step": step, "loss": float(np.mean(running)) if running else float("nan"),
                   "lr": lr_sched.get_last_lr()[0], "sec": round(time.time() - t0, 1)}
            if running_match:
                rec["end_contrastive"] = float(np.mean(running_match))
                running_match = []
            if keep_filter is not None:
                rec["kept"], rec["seen"] = kept, seen
                kept = seen = 0
            log_f.write(json.dumps(rec) + "\n")
            log_f.flush()
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            running = []
        if step % config.checkpoint_every == 0 or step == end:
            _save_checkpoint(out, {
                "step": step,
                "unet": accelerator.unwrap_model(unet).state_dict(),
                "text_encoder": accelerator.unwrap_model(text_encoder).state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_sched": lr_sched.state_dict(),
                "ema": ema.shadow,
                "gen": gen.get_state(),
                **({"matcher": matcher.state_dict()} if matcher is not None else {}),
            }, config.keep_checkpoints)
            save_ema_pipeline(pipe, ema, out)
    bar.close()
    log_f.close()
    return out


def open_log(path: Path, step: int):
    """The loss log, opened for appending after dropping lines past `step`: a run killed after logging but before
    its next checkpoint logged steps its resumed run will log again."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))
    return open(path, "a")


def read_log(out_dir: str | Path) -> list[dict]:
    """The loss log written during training."""
    path = Path(out_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

