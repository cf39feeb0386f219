"""Training-time mitigation: drop samples whose text-conditional noise magnitude is above a threshold.

Wen et al.'s filter, generalised to BE's masked magnitude. For each training sample (x_t, t, c), with the UNet being
trained but evaluated without gradients and in eval mode (the reference used train mode, so dropout would leak into
the decision):

    D_i  = ||eps(x_t, t, c) - eps(x_t, t, "")||_2
    LD_i = ||(eps(x_t, t, c) - eps(x_t, t, "")) * m_i||_2 / mean(m_i)

How m_i is obtained during training: BE's map is defined at the end of sampling (t ~ 1), which a training step never
visits. We read the same quantity the probe reads -- the head-averaged attention of the first cross-attention block
on the first end token -- from `memlens.capture`'s processor, either
- `mask_inputs=None` (default): during the very same no-grad [uncond, cond] evaluation, at the sample's own t
  (free: no extra UNet call), or
- `mask_inputs=(x_low, t_low)`: from one extra conditional-only evaluation on the training image noised to a low
  timestep (e.g. t = 1 with the sample's own noise), closest to BE's definition; costs B more UNet rows.
Measured costs and how well the two agree are in docs/mitigation.md.

A sample is kept when its value is <= threshold (the reference dropped n >= tau; equality is kept here so that a
threshold of exactly a sample's value does not remove it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from memlens import capture, quantities
from memlens.errors import InputError
from memlens.probe import token_weights

__all__ = ["SampleMagnitudes", "sample_magnitudes", "filter_mask", "eos_positions", "TrainingFilter", "finetune", "CRITERIA"]

CRITERIA = ("none", "D", "LD")


@dataclass
class SampleMagnitudes:
    D: torch.Tensor  # (B,) float32
    LD: torch.Tensor | None = None  # (B,) float32 when masks were requested
    masks: torch.Tensor | None = None  # (B, h, w) float32 BE maps at the captured layers' resolution


# The end-token position of each row of padded ids, under the name training scripts import.
eos_positions = quantities.first_eos


def _end_token_sink(rows: slice, tokens: torch.Tensor) -> capture.TokenColumns:
    """The probe's sink, reading each sample's end-token column from `rows` of the batch."""
    eos = tokens.tolist()
    return capture.TokenColumns(lambda num_tokens: token_weights("eos", eos, num_tokens), rows)


def _expand(x: torch.Tensor | None, b: int) -> torch.Tensor | None:
    if x is None:
        return None
    return x.expand(b, *x.shape[1:]) if x.shape[0] == 1 else x


@torch.no_grad()
def sample_magnitudes(
    unet,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    masked: bool = False,
    eos_indices: torch.Tensor | Sequence[int] | None = None,
    layers: Sequence[str] | str | None = None,
    mask_inputs: tuple[torch.Tensor, torch.Tensor] | None = None,
    added_cond_kwargs: dict | None = None,
    uncond_added_cond_kwargs: dict | None = None,
) -> SampleMagnitudes:
    """Per-sample D (and LD with its masks when `masked`) for a training batch.

    Args:
        unet: the UNet being trained (a DDP/accelerate wrapper is fine).
        noisy, timesteps: x_t (B, C, H, W) and t (B,) of the batch.
        cond, uncond: text embeddings (B, L, D) and the empty prompt's (1 or B, L, D).
        eos_indices: (B,) end-token positions in `cond`'s ids (see `eos_positions`); needed when `masked`.
        layers: cross-attention layers for the mask (default: the first down block that has any, as the probe).
        mask_inputs: optional (x_low, t_low) to read the mask at another timestep (see the module docstring).
        added_cond_kwargs / uncond_added_cond_kwargs: SDXL-style added conditions for the conditional and
            unconditional rows.
    """
    model = getattr(unet, "module", unet)
    b = noisy.shape[0]
    if masked and eos_indices is None:
        raise InputError("LD needs eos_indices: the end-token position of each sample's caption")
    tokens = None if eos_indices is None else torch.as_tensor(eos_indices, dtype=torch.long).view(-1)
    was_training = model.training
    model.eval()
    installed = None
    sink = None
    try:
        if masked and mask_inputs is None:
            sink = _end_token_sink(slice(b, 2 * b), tokens)
            installed = capture.attach(capture.select_layers(model, layers), sink)
        added = None
        if added_cond_kwargs is not None:
            un = uncond_added_cond_kwargs or added_cond_kwargs
            added = {k: torch.cat([_expand(un[k], b), added_cond_kwargs[k]]) for k in added_cond_kwargs}
        eps = model(
            torch.cat([noisy, noisy]),
            torch.cat([timesteps, timesteps]) if timesteps.dim() else timesteps,
            encoder_hidden_states=torch.cat([_expand(uncond, b).to(cond), cond]),
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        if installed is not None:
            installed.remove()
            installed = None
        diff = quantities.guidance_difference(eps, noisy.shape[1])
        d = quantities.difference_magnitude(diff)
        if not masked:
            return SampleMagnitudes(d)
        if mask_inputs is not None:
            x_low, t_low = mask_inputs
            sink = _end_token_sink(slice(0, b), tokens)
            installed = capture.attach(capture.select_layers(model, layers), sink)
            model(x_low, t_low, encoder_hidden_states=cond, added_cond_kwargs=added_cond_kwargs, return_dict=False)
            installed.remove()
            installed = None
        # (B, h, w), averaged over the captured layers on the finest of their grids
        maps = sink.mean(lambda queries: capture.attention_grid(noisy.shape[-2], noisy.shape[-1], queries)).float()
        ld = quantities.difference_magnitude(diff, quantities.mask_to_latent(maps, noisy.shape[-2:]))
        return SampleMagnitudes(d, ld, maps)
    finally:
        if installed is not None:
            installed.remove()
        model.train(was_training)


def filter_mask(
    unet,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    threshold: float,
    criterion: str = "D",
    **kwargs,
) -> torch.Tensor:
    """Bool (B,) of the samples to keep: criterion value <= threshold. `criterion` is "none", "D" or "LD"; extra
    keyword arguments go to `sample_magnitudes` (LD needs `eos_indices`)."""
    if criterion not in CRITERIA:
        raise InputError(f"`filter` {criterion!r}: expected one of {', '.join(CRITERIA)}")
    if criterion == "none":
        return torch.ones(noisy.shape[0], dtype=torch.bool, device=noisy.device)
    mags = sample_magnitudes(unet, noisy, timesteps, cond, uncond, masked=criterion == "LD", **kwargs)
    value = mags.D if criterion == "D" else mags.LD
    return (value <= threshold).to(noisy.device)


class TrainingFilter:
    """The filter as a training loop calls it: `keep = f(unet, text_encoder, noisy, timesteps, cond, input_ids)`.

    The empty prompt's embedding is recomputed at every call from the text encoder as it is now (it may be training
    too), without gradients and in eval mode; end-token positions come from the batch's padded ids.
    """

    def __init__(self, criterion: str, threshold: float, empty_ids: torch.Tensor, eos_token_id: int,
                 layers: Sequence[str] | str | None = None):
        if criterion not in CRITERIA:
            raise InputError(f"`filter` {criterion!r}: expected one of {', '.join(CRITERIA)}")
        self.criterion, self.threshold = criterion, float(threshold)
        self.empty_ids = empty_ids.view(1, -1)
        self.eos_token_id = eos_token_id
        self.layers = layers

    @torch.no_grad()
    def __call__(self, unet, text_encoder, noisy, timesteps, cond, input_ids) -> torch.Tensor:
        if self.criterion == "none":
            return torch.ones(noisy.shape[0], dtype=torch.bool, device=noisy.device)
        encoder = getattr(text_encoder, "module", text_encoder)
        was_training = encoder.training
        encoder.eval()
        try:
            uncond = encoder(self.empty_ids.to(input_ids.device))[0]
        finally:
            encoder.train(was_training)
        extra = {}
        if self.criterion == "LD":
            extra = {"eos_indices": quantities.first_eos(input_ids, self.eos_token_id), "layers": self.layers}
        return filter_mask(unet, noisy, timesteps, cond.detach(), uncond, self.threshold, self.criterion, **extra)


def finetune(
    pipeline_dir,
    imagefolder_dir,
    out_dir,
    *,
    steps: int = 1000,
    batch_size: int = 4,
    lr: float = 1e-5,
    criterion: str = "none",
    threshold: float = float("inf"),
    resolution: int | None = None,
    seed: int = 0,
    log_every: int = 50,
    device: str | None = None,
):
    """Fine-tune the UNet of a single-text-encoder diffusers pipeline (SD 1.x/2.x, the organism) on an imagefolder
    dataset (`metadata.jsonl` with `file_name` and `text`), dropping samples the magnitude filter rejects.

    Rejected samples are removed before the gradient forward pass (the reference computed the prediction for the
    whole batch first), so filtering saves the cost of the samples it drops. A step whose every sample is dropped
    changes nothing (no optimizer or EMA update). Writes the pipeline and `finetune_log.jsonl` to `out_dir`.
    """
    import json
    import math
    from pathlib import Path

    from diffusers import DDPMScheduler, DiffusionPipeline

    from memlens.imagefolder import batch_indices, load_imagefolder

    if steps < 0 or batch_size < 1:
        raise InputError("steps must be >= 0 and batch_size >= 1")
    pipe = DiffusionPipeline.from_pretrained(str(pipeline_dir))
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise InputError(f"{pipeline_dir}: two text encoders (SDXL); finetune supports single-encoder pipelines")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe.to(dev)
    unet, vae, text_encoder, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    res = resolution or unet.config.sample_size * pipe.vae_scale_factor
    data = load_imagefolder(imagefolder_dir, res)
    ids = tok(data.captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids[0]
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    keep_filter = TrainingFilter(criterion, threshold, empty, tok.eos_token_id)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    text_encoder.eval()
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    scale = getattr(vae.config, "scaling_factor", 1.0) or 1.0
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "finetune_log.jsonl").open("a")
    running, kept_total, seen_total = [], 0, 0
    for step in range(steps):
        idx = torch.from_numpy(batch_indices(len(ids), batch_size, step, seed))
        x0 = data.images[idx].float().div(127.5).sub(1.0).to(dev)
        batch_ids = ids[idx].to(dev)
        with torch.no_grad():
            latents = vae.encode(x0).latent_dist.sample() * scale
            cond = text_encoder(batch_ids)[0]
        noise = torch.randn(latents.shape, generator=gen).to(dev)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen).to(dev)
        noisy = sched.add_noise(latents, noise, t)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        keep = keep_filter(unet, text_encoder, noisy, t, cond, batch_ids)
        kept_total += int(keep.sum())
        seen_total += int(keep.numel())
        if keep.any():
            pred = unet(noisy[keep], t[keep], encoder_hidden_states=cond[keep]).sample
            loss = torch.nn.functional.mse_loss(pred.float(), target[keep].float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log.write(json.dumps({"step": step + 1, "loss": float(sum(running) / len(running)) if running else math.nan,
                                  "kept": kept_total, "seen": seen_total}) + "\n")
            log.flush()
            running, kept_total, seen_total = [], 0, 0
    log.close()
    unet.eval()
    pipe.save_pretrained(str(out))
    return out
