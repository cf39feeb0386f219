"""Contrastive pretraining of the organism's text encoder, as CLIP pretrains Stable Diffusion's.

Stable Diffusion's text encoder is CLIP's: trained contrastively on image/caption pairs, its output at the end token
(the first EOS) is the caption's summary, and it stays frozen while the UNet trains. The organism's first recipe
trained its text encoder jointly with the UNet from scratch, so nothing gave the end token that role, and which
token carried the bright-ending signal became a draw of the training seed (docs/organism.md). This module gives the
organism the same text pathway as SD: a small `CLIPTextModel` and a small image encoder trained with CLIP's
symmetric in-batch InfoNCE loss on the pooled end-token output, then `memlens testbed train --text-encoder DIR`
freezes it.

Output folder: `tokenizer/` and `text_encoder/` (loadable with `from_pretrained`), `clip_config.json`, `log.jsonl`,
`retrieval.json` (caption -> image retrieval on the training data, a sanity check that it learned), checkpoints.
Exact resume and a pure function of the seed, like `memlens.testbed.train`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from memlens.errors import InputError

CLIP_CONFIG = "clip_config.json"


@dataclass
class ClipConfig:
    steps: int = 1500
    batch_size: int = 256
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    max_length: int = 16
    # SD v1's layout by default (the end token repeated as padding): the paper's numbers are SD v1.4's.
    pad_token: str = "eos"
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    resolution: int = 32
    threads: int = 1
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 50

    @classmethod
    def from_dict(cls, d: dict) -> "ClipConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def validate(self) -> None:
        from memlens.testbed.pipeline import PAD_CHOICES

        for name in ("steps", "batch_size", "max_length", "text_width", "text_layers", "text_heads", "resolution",
                     "threads", "checkpoint_every", "keep_checkpoints", "log_every"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name}: expected a whole number >= 1, got {getattr(self, name)!r}")
        if self.batch_size < 2:
            raise InputError(f"batch_size: a contrastive loss needs at least 2 rows a batch, got {self.batch_size}")
        if not self.lr > 0:
            raise InputError(f"lr: expected > 0, got {self.lr}")
        if self.warmup < 0 or self.weight_decay < 0:
            raise InputError("warmup and weight_decay: expected >= 0")
        if self.pad_token not in PAD_CHOICES:
            raise InputError(f"pad_token: expected one of {', '.join(PAD_CHOICES)}, got {self.pad_token!r}")
        if self.text_width % self.text_heads:
            raise InputError(f"text_width {self.text_width} is not divisible by text_heads {self.text_heads}")


class ContrastiveHead(torch.nn.Module):
    """A small image encoder and a projection of the text encoder's pooled end-token output, scored CLIP-style.

    Rows with the same caption (copies of a memorized item) are all positives of each other, so duplicates are not
    pushed apart. Training-only: the organism keeps the text encoder, not this head.
    """

    def __init__(self, width: int):
        super().__init__()
        act = torch.nn.SiLU
        self.image = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, stride=2, padding=1), act(), torch.nn.Conv2d(32, 64, 3, stride=2, padding=1),
            act(), torch.nn.Conv2d(64, 128, 3, stride=2, padding=1), act(), torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(), torch.nn.Linear(128, width))
        self.text = torch.nn.Linear(width, width, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def logits(self, images: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """(texts, images) similarity logits."""
        img = torch.nn.functional.normalize(self.image(images), dim=-1)
        txt = torch.nn.functional.normalize(self.text(pooled), dim=-1)
        return self.logit_scale.exp().clamp(max=100) * txt @ img.T

    def forward(self, images: torch.Tensor, pooled: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.logits(images, pooled)
        same = (input_ids[:, None, :] == input_ids[None, :, :]).all(-1).float()
        rows = -(same / same.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        cols = -(same / same.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
        return 0.5 * (rows + cols)


def _lr_factor(step: int, config: ClipConfig) -> float:
    """Linear warm-up, then cosine decay to zero, as CLIP."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.5 * (1 + np.cos(np.pi * min(1.0, progress)))


def _retrieval(text_encoder, head, data, ids: torch.Tensor) -> dict:
    """Caption -> image retrieval among the distinct captions' first images: top-1 accuracy, overall and for the
    memorized captions (rows with a `kind` other than generic), on at most 1,024 captions."""
    first: dict[str, int] = {}
    for i, c in enumerate(data.captions):
        first.setdefault(c, i)
    rows = list(first.values())
    kinds = data.kinds or ["generic"] * len(data.captions)
    memorized = [r for r in rows if kinds[r] != "generic"]
    generic = [r for r in rows if kinds[r] == "generic"][: max(0, 1024 - len(memorized))]
    pick = torch.tensor(memorized + generic)
    with torch.no_grad():
        pooled = text_encoder(ids[pick])[1]
        x = data.images[pick].float().div(127.5).sub(1.0)
        hit = (head.logits(x, pooled).argmax(1) == torch.arange(len(pick))).numpy()
    return {"captions": len(pick), "top1": float(hit.mean()),
            "memorized_captions": len(memorized), "memorized_top1": float(hit[: len(memorized)].mean())
            if memorized else None}


def pretrain_clip(data_dir: str | Path, out_dir: str | Path, config: ClipConfig | None = None, resume: bool = False,
                  progress: bool = True, stop_after: int | None = None) -> Path:
    """Pretrain the tokenizer's text encoder contrastively on an imagefolder dataset; write it to `out_dir`.

    The caller sets torch's thread count (the CLI does); results are bit-identical for a given thread count.
    """
    from tqdm.auto import tqdm
    from transformers import PreTrainedTokenizerFast

    from memlens.testbed.pipeline import build_text_encoder, build_tokenizer, tokenize
    from memlens.testbed.train import _checkpoint_dirs, _save_checkpoint, batch_indices, load_imagefolder, open_log

    out = Path(out_dir)
    cfg_path = out / CLIP_CONFIG
    if resume:
        if not _checkpoint_dirs(out) or not cfg_path.is_file():
            raise InputError(f"{out}: resume asked for but no checkpoint (checkpoints/step_*/state.pt) found")
        saved = ClipConfig.from_dict(json.loads(cfg_path.read_text()))
        if config is not None:
            saved.steps = config.steps
        config = saved
    elif out.exists() and any(out.iterdir()):
        raise InputError(f"{out}: directory is not empty; pass resume=True (CLI: --resume) to continue a run there")
    config = config or ClipConfig()
    config.validate()
    data = load_imagefolder(data_dir, config.resolution)
    tok_dir = out / "tokenizer"
    if resume:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    else:
        tokenizer = build_tokenizer(data.captions, config.max_length, config.pad_token)
    ids = tokenize(tokenizer, data.captions)

    # Both modules are seeded from their own generators, so the text encoder's initial weights do not depend on
    # the head, and nothing here touches torch's global RNG state for the caller.
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        text_encoder = build_text_encoder(tokenizer, config.text_width, config.text_layers, config.text_heads)
        torch.manual_seed(config.seed + 1)
        head = ContrastiveHead(config.text_width)
    params = list(text_encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    step = 0
    if resume:
        state = torch.load(_checkpoint_dirs(out)[-1] / "state.pt", weights_only=False)
        text_encoder.load_state_dict(state["text_encoder"])
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_sched"])
        step = state["step"]
    else:
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(tok_dir))
        cfg_path.write_text(json.dumps(asdict(config), indent=1))

    text_encoder.train()
    head.train()
    log_f = open_log(out / "log.jsonl", step)
    bar = tqdm(total=config.steps, initial=step, disable=not progress, desc="clip", dynamic_ncols=True)
    running, t0 = [], time.time()
    end = min(config.steps, stop_after) if stop_after else config.steps
    while step < end:
        idx = torch.from_numpy(batch_indices(len(ids), config.batch_size, step, config.seed))
        x = data.images[idx].float().div(127.5).sub(1.0)
        loss = head(x, text_encoder(ids[idx])[1], ids[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        running.append(loss.item())
        step += 1
        bar.update(1)
        if step % config.log_every == 0 or step == end:
            log_f.write(json.dumps({"step": step, "loss": float(np.mean(running)), "lr": lr_sched.get_last_lr()[0],
                                    "sec": round(time.time() - t0, 1)}) + "\n")
            log_f.flush()
            bar.set_postfix(loss=f"{np.mean(running):.3f}")
            running = []
        if step % config.checkpoint_every == 0 or step == end:
            _save_checkpoint(out, {"step": step, "text_encoder": text_encoder.state_dict(), "head": head.state_dict(),
                                   "optimizer": optimizer.state_dict(), "lr_sched": lr_sched.state_dict()},
                             config.keep_checkpoints)
    bar.close()
    log_f.close()
    if step >= config.steps:
        text_encoder.eval()
        head.eval()
        from memlens.rundir import atomic_write_dir, write_json

        atomic_write_dir(out / "text_encoder", lambda d: text_encoder.save_pretrained(str(d)))
        write_json(out / "retrieval.json", _retrieval(text_encoder, head, data, ids))
    return out


def load_pretrained_text(clip_dir: str | Path):
    """(tokenizer, frozen text encoder, its ClipConfig) from a finished `pretrain_clip` folder."""
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

    clip_dir = Path(clip_dir)
    for part in ("tokenizer", "text_encoder", CLIP_CONFIG):
        if not (clip_dir / part).exists():
            raise InputError(f"{clip_dir}: no {part}; expected a finished `memlens testbed pretrain-clip` folder")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(clip_dir / "tokenizer"))
    text_encoder = CLIPTextModel.from_pretrained(str(clip_dir / "text_encoder"))
    text_encoder.requires_grad_(False).eval()
    return tokenizer, text_encoder, ClipConfig.from_dict(json.loads((clip_dir / CLIP_CONFIG).read_text()))
