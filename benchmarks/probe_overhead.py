"""Wall time of `pipe(...)` with and without BrightEndingProbe, interleaved, same pipeline and seeds.

    python benchmarks/probe_overhead.py                 # tiny SD1-like pipeline on CPU
    python benchmarks/probe_overhead.py --sd1-512       # SD1-shaped random weights at 512 px (use on a GPU)
    python benchmarks/probe_overhead.py --family sd3    # tiny transformer pipelines: pixart, sd3, flux

Prints the median of each, their ratio (target <= 1.05) and the bytes a record retains per image.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from memlens import BrightEndingProbe
from memlens.testing import tiny_pipeline
from memlens.testing_dit import tiny_dit_pipeline

# Per tiny transformer family: image size (px) and the call arguments that give the probe an unconditional branch.
# FLUX needs true CFG (a negative prompt and true_cfg_scale > 1), which is what its D/LD cost anyway.
DIT_CALLS = {
    "pixart": (256, dict(guidance_scale=4.5)),
    "sd3": (64, dict(guidance_scale=7.0)),
    "flux": (64, dict(true_cfg_scale=3.0)),
}


def sd1_shaped_pipeline(device: str, dtype: torch.dtype):
    """Random weights with Stable Diffusion 1.x's UNet, VAE and text-encoder shapes (no download)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from memlens.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer(77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd1-512", action="store_true", help="SD1-shaped random weights at 512x512")
    parser.add_argument("--family", choices=("sd1", *DIT_CALLS), default="sd1", help="tiny pipeline family")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="prompts per call")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    if args.sd1_512:
        dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
        pipe = sd1_shaped_pipeline(args.device, dtype)
        size, steps, batch = 512, args.steps or 50, args.batch or 4
        call, label = dict(guidance_scale=7.5), "SD1-shaped 512px"
    elif args.family != "sd1":
        pipe = tiny_dit_pipeline(args.family).to(args.device)
        size, call = DIT_CALLS[args.family]
        steps, batch = args.steps or 50, args.batch or 8
        label = f"tiny {args.family} {size}px"
    else:
        pipe = tiny_pipeline("sd1").to(args.device)
        size, steps, batch = 32, args.steps or 50, args.batch or 8
        call, label = dict(guidance_scale=7.5), "tiny SD1-like 32px"
    prompts = [f"a photo of object number {i}" for i in range(batch)]
    if args.family != "sd1":
        prompts = [f"object {i}" for i in range(batch)]  # within the tiny CLIP tokenizers' 16 positions
    if args.family == "flux":
        call = dict(call, negative_prompt=[""] * batch)

    def generate(probed: bool):
        gen = torch.Generator(args.device).manual_seed(0)
        kwargs = dict(num_inference_steps=steps, generator=gen, height=size, width=size, output_type="latent",
                      **call)
        _sync(args.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        if probed:
            with BrightEndingProbe(pipe) as probe:
                pipe(prompts, **kwargs)
            records = probe.records
        else:
            pipe(prompts, **kwargs)
            records = None
        _sync(args.device)
        return (time.perf_counter() - start, time.process_time() - cpu_start), records

    generate(False), generate(True)  # warm-up: kernels, allocator, caches
    plain, probed = [], []
    for i in range(args.runs):
        # Alternate which goes first so drift in machine load hits both sides alike.
        order = (False, True) if i % 2 == 0 else (True, False)
        for flag in order:
            seconds, records = generate(flag)
            (probed if flag else plain).append(seconds)
            if records:
                kept = records
    med_plain, med_probed = (statistics.median(t[0] for t in runs) for runs in (plain, probed))
    # CPU seconds of this process: on a shared machine they move far less with other jobs' load than wall time.
    cpu_plain, cpu_probed = (statistics.median(t[1] for t in runs) for runs in (plain, probed))
    per_image = kept[0].nbytes
    print(f"pipeline: {label} on {args.device}, "
          f"{batch} images x {steps} steps, {args.runs} interleaved runs each")
    print(f"median without probe: {med_plain:.3f} s")
    print(f"median with probe:    {med_probed:.3f} s")
    print(f"ratio (with / without): {med_probed / med_plain:.3f}   (target <= 1.05)")
    if not args.device.startswith("cuda"):
        print(f"CPU-time ratio (with / without): {cpu_probed / cpu_plain:.3f}")
    print(f"bytes retained per image: {per_image} (BE map {kept[0].be_map.shape}, {steps} steps)")


if __name__ == "__main__":
    main()
