"""What every inference-time mitigation needs from a stock pipeline, without copying its loop.

- `encode`: the pipeline's own `encode_prompt`, so embeddings passed back as `prompt_embeds` reproduce `pipe(prompt)`
  bit for bit (checked in the tests).
- `draw_noise`: x_T drawn exactly as the pipeline draws it (its `randn_tensor`, one CPU generator per image), so the
  decision pass and the final `pipe(latents=...)` start from the same point.
- `first_step`: runs the stock pipeline until its first UNet call and keeps that call's arguments (scaled latents,
  first timestep, SDXL's added conditions ...), then stops it. A mitigation re-evaluates the UNet on those arguments
  with other text embeddings; nothing about the model (timestep spacing, time ids, scaling) is re-derived here.
- `image_magnitude` and `mask_tensor`: per-image D or LD and the masks for it, from `memlens.quantities`, the same
  functions the probe records with.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from memlens import quantities, unet_call
from memlens.errors import MemlensError

__all__ = ["Conditioning", "encode", "draw_noise", "first_step", "FirstStep", "image_magnitude", "mask_tensor"]


@dataclass
class Conditioning:
    """Text conditioning for n images, one row each, as the pipeline's `*_embeds` arguments take it."""

    embeds: torch.Tensor  # (n, L, D)
    negative: torch.Tensor  # (n, L, D)
    pooled: torch.Tensor | None = None  # (n, P), SDXL only
    negative_pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def rows(self, index: Sequence[int]) -> "Conditioning":
        idx = torch.as_tensor(list(index), dtype=torch.long, device=self.embeds.device)
        pick = lambda t: None if t is None else t.index_select(0, idx.to(t.device))  # noqa: E731
        return Conditioning(pick(self.embeds), pick(self.negative), pick(self.pooled), pick(self.negative_pooled))

    def with_embeds(self, embeds: torch.Tensor) -> "Conditioning":
        return replace(self, embeds=embeds.to(self.embeds.dtype))

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        cat = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
        return Conditioning(
            cat([p.embeds for p in parts]),
            cat([p.negative for p in parts]),
            cat([p.pooled for p in parts]),
            cat([p.negative_pooled for p in parts]),
        )

    def pipe_kwargs(self) -> dict:
        kw = {"prompt_embeds": self.embeds, "negative_prompt_embeds": self.negative}
        if self.pooled is not None:
            kw["pooled_prompt_embeds"] = self.pooled
            kw["negative_pooled_prompt_embeds"] = self.negative_pooled
        return kw


def encode(pipe, prompts: Sequence[str]) -> Conditioning:
    """Encode with the pipeline's own `encode_prompt` and the negative prompt a plain `pipe(prompt)` call uses."""
    with torch.no_grad():
        out = pipe.encode_prompt(
            prompt=list(prompts),
            device=pipe._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=None,  # what pipe(prompt) passes: "" for SD1/2, zeros for SDXL's force_zeros config
        )
    if len(out) == 4:
        return Conditioning(out[0], out[1], out[2], out[3])
    return Conditioning(out[0], out[1])


def draw_noise(pipe, seeds: Sequence[int], height: int, width: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Unscaled x_T for each seed, identical to what `pipe(..., generator=[Generator().manual_seed(s) ...])` draws."""
    from diffusers.utils.torch_utils import randn_tensor

    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    shape = (len(gens), pipe.unet.config.in_channels, int(height) // pipe.vae_scale_factor, int(width) // pipe.vae_scale_factor)
    dtype = dtype or pipe.unet.dtype
    return randn_tensor(shape, generator=gens, device=pipe._execution_device, dtype=dtype)


class _Stop(Exception):
    """Raised from a UNet pre-hook to end a pipeline call once its first UNet arguments are known."""


@dataclass
class FirstStep:
    """The arguments of a pipeline's first UNet call on a [unconditional x n, conditional x n] batch."""

    unet: torch.nn.Module
    args: tuple
    kwargs: dict
    n: int
    latent_channels: int

    def eps_diff(self, embeds: torch.Tensor | None = None, rows: Sequence[int] | None = None) -> torch.Tensor:
        """eps_c - eps_u of the chosen rows (all by default), float32 (k, C, H, W), with the conditional text
        embeddings replaced by `embeds` (k, L, D) when given. Differentiable in `embeds`."""
        rows = list(range(self.n)) if rows is None else list(rows)
        k = len(rows)
        index = unet_call.paired_rows(rows, self.n)
        args = tuple(unet_call.select_rows(a, index, 2 * self.n) for a in self.args)
        kwargs = {key: unet_call.select_rows(v, index, 2 * self.n) for key, v in self.kwargs.items()}
        if embeds is not None:
            text = kwargs["encoder_hidden_states"]
            kwargs["encoder_hidden_states"] = torch.cat([text[:k], embeds.to(text.dtype)])
        kwargs["return_dict"] = False
        return quantities.guidance_difference(self.unet(*args, **kwargs)[0], self.latent_channels)


def first_step(pipe, cond: Conditioning, noise: torch.Tensor, *, steps: int, guidance: float, height: int, width: int) -> FirstStep:
    """Run `pipe` on `cond` and `noise` up to its first UNet call and return that call's arguments."""
    if guidance <= 1:
        raise MemlensError("mitigation measures eps_c - eps_u and so needs classifier-free guidance (--guidance > 1)")
    seen: dict = {}

    def grab(module, args, kwargs):  # the first UNet call; the rest of the loop is never run
        seen["args"], seen["kwargs"] = args, dict(kwargs)
        raise _Stop

    handle = pipe.unet.register_forward_pre_hook(grab, with_kwargs=True, prepend=True)
    try:
        pipe(**cond.pipe_kwargs(), latents=noise, num_inference_steps=steps, guidance_scale=guidance,
             height=height, width=width, output_type="latent")
    except _Stop:
        pass
    finally:
        handle.remove()
    if "args" not in seen:
        raise MemlensError(f"{type(pipe).__name__} finished without calling its UNet")
    args, kwargs = seen["args"], seen["kwargs"]
    sample, _ = unet_call.sample_and_timestep(args, kwargs)
    n = len(cond)
    if sample.shape[0] != 2 * n:
        raise MemlensError(f"the pipeline's first UNet batch has {sample.shape[0]} rows, expected {2 * n} ([u, c] x {n})")
    return FirstStep(pipe.unet, tuple(args), kwargs, n, sample.shape[1])


def mask_tensor(masks: Sequence[np.ndarray] | np.ndarray, size: tuple[int, int], device, dtype=torch.float32) -> torch.Tensor:
    """BE maps (k, h, w) as numpy, brought to the latent size (k, H, W) by `quantities.mask_to_latent`."""
    m = torch.as_tensor(np.stack([np.asarray(x, dtype=np.float32) for x in masks]), device=device)
    return quantities.mask_to_latent(m, size).to(dtype)


# Per-image D (masks None) or LD (masks (k, H, W) at the latent size) of eps_c - eps_u, shape (k,).
image_magnitude = quantities.difference_magnitude
