"""Tiny random-weight diffusion-transformer pipelines with the structure of real checkpoints.

They use exactly the classes a hub checkpoint of each family loads, shrunk so that ``pipe(prompt,
num_inference_steps=2)`` takes about a second on a CPU:

- ``"pixart"`` / ``"pixart-sigma"``: `PixArtAlphaPipeline` / `PixArtSigmaPipeline`, `PixArtTransformer2DModel`,
  `T5EncoderModel` + `T5TokenizerFast`, `AutoencoderKL` with an x8 factor, `DPMSolverMultistepScheduler`.
- ``"sd3"`` / ``"sd3.5"``: `StableDiffusion3Pipeline`, `SD3Transformer2DModel` (SD3.5: ``dual_attention_layers`` and
  RMS q/k norms), two `CLIPTextModelWithProjection` + `CLIPTokenizer`, `T5EncoderModel` + `T5TokenizerFast`,
  `FlowMatchEulerDiscreteScheduler`.
- ``"flux"``: `FluxPipeline`, `FluxTransformer2DModel` with ``guidance_embeds`` (FLUX.1-dev), `CLIPTextModel` +
  `CLIPTokenizer`, `T5EncoderModel` + `T5TokenizerFast`, a dynamically shifted `FlowMatchEulerDiscreteScheduler`.

Nothing is downloaded. The CLIP tokenizers are `memlens.testing.tiny_tokenizer` (character level); the T5 tokenizers
are tokenizers-backed Unigram models over single characters, built from a vocabulary list, so `<pad>`=0, `</s>`=1,
`<unk>`=2 as in the real T5 vocabulary. Weights are drawn from generators seeded by ``seed`` inside
`torch.random.fork_rng`, so building a pipeline never changes the caller's global RNG state.

Family facts mirrored from the real configs: PixArt's learned sigma (``out_channels = 2 * in_channels``) and
``sample_size`` in {32, 64, 128} (its resolution binning refuses anything else); SD3's CLIP-L/CLIP-G pair whose
penultimate states are concatenated and zero-padded to the T5 width, its last block ``context_pre_only``; FLUX's
packed 2x2 latents (``in_channels = 4 * latent channels``) and RoPE axes that sum to the head dimension.
"""

from __future__ import annotations

import string

import torch

from memlens.testing import _randomize_, tiny_tokenizer

__all__ = [
    "DIT_FAMILIES",
    "tiny_t5_tokenizer",
    "tiny_pixart_pipeline",
    "tiny_pixart_sigma_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sd35_pipeline",
    "tiny_flux_pipeline",
    "tiny_dit_pipeline",
]

DIT_FAMILIES = ("pixart", "pixart-sigma", "sd3", "sd3.5", "flux")


def tiny_t5_tokenizer(model_max_length: int = 512):
    """A `T5TokenizerFast` over single characters: `<pad>`=0, `</s>`=1, `<unk>`=2; appends `</s>`, pads right."""
    from transformers import T5TokenizerFast

    chars = string.ascii_letters + string.digits + string.punctuation
    # Word-initial pieces score higher than bare characters so "a cat" splits as "▁a", "▁c", "a", "t" like a real
    # sentencepiece model would (one piece per word start).
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def _seeded(seed: int, build):
    # Construct under a forked RNG: module constructors draw from the global generator, and a test helper must not
    # change the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build()
    return module


def _t5_encoder(tokenizer, d_model: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return _seeded(seed, lambda: T5EncoderModel(config).eval())


def _clip_encoder(tokenizer, hidden: int, seed: int, projection_dim: int | None = None):
    from memlens.testing import _text_encoder

    # memlens.testing's builder seeds the global RNG itself; _seeded keeps that inside fork_rng.
    return _seeded(seed, lambda: _text_encoder(tokenizer, hidden, projection_dim, seed))


def _vae(levels: int, seed: int, latent_channels: int = 4, **config):
    from diffusers import AutoencoderKL

    # vae_scale_factor = 2 ** (levels - 1); the channel width is kept tiny because decoding dominates the run time.
    return _seeded(
        seed,
        lambda: AutoencoderKL(
            block_out_channels=[8] * levels,
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * levels,
            up_block_types=["UpDecoderBlock2D"] * levels,
            latent_channels=latent_channels,
            norm_num_groups=4,
            layers_per_block=1,
            sample_size=32,
            **config,
        ).eval(),
    )


def _random_transformer(build, seed: int):
    model = _seeded(seed, build)
    # DiTs zero-initialise their output projections and adaLN gates, which would make every prediction (and so D)
    # zero; random non-zero weights give the probe something real to measure.
    _randomize_(model, seed)
    return model


# -- PixArt ----------------------------------------------------------------------------------------------------------


def _tiny_pixart(pipeline_cls, seed: int, max_sequence_length: int, **transformer_config):
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

    tokenizer = tiny_t5_tokenizer(max_sequence_length)
    text_encoder = _t5_encoder(tokenizer, d_model=32, seed=seed)
    transformer = _random_transformer(
        lambda: PixArtTransformer2DModel(
            # The pipeline's resolution binning accepts only sample_size 32/64/128 (256/512/1024 px with an x8 VAE).
            sample_size=32,
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,  # learned sigma: noise and variance channels
            num_layers=2,
            cross_attention_dim=16,
            caption_channels=32,
            patch_size=2,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            **transformer_config,
        ).eval(),
        seed,
    )
    pipe = pipeline_cls(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_vae(4, seed),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pixart_pipeline(seed: int = 0):
    """PixArt-alpha structure: cross-attention `attn2` to T5 tokens with the T5 attention mask, learned sigma."""
    from diffusers import PixArtAlphaPipeline

    return _tiny_pixart(PixArtAlphaPipeline, seed, max_sequence_length=120)


def tiny_pixart_sigma_pipeline(seed: int = 0):
    """PixArt-sigma structure: the same transformer class, 300 T5 tokens by default, interpolation scale from config."""
    from diffusers import PixArtSigmaPipeline

    return _tiny_pixart(PixArtSigmaPipeline, seed, max_sequence_length=300, interpolation_scale=1)


# -- SD3 / SD3.5 -----------------------------------------------------------------------------------------------------


def _tiny_sd3(seed: int, model_max_length: int, **transformer_config):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    clip_l, clip_g = 16, 16
    t5_width = 32
    tokenizer = tiny_tokenizer(model_max_length)
    tokenizer_2 = tiny_tokenizer(model_max_length, pad_token="!")  # CLIP-G pads with "!"
    tokenizer_3 = tiny_t5_tokenizer(512)
    text_encoder = _clip_encoder(tokenizer, clip_l, seed, projection_dim=clip_l)
    text_encoder_2 = _clip_encoder(tokenizer_2, clip_g, seed + 1, projection_dim=clip_g)
    text_encoder_3 = _t5_encoder(tokenizer_3, t5_width, seed + 2)
    transformer = _random_transformer(
        lambda: SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=t5_width,  # the CLIP-L|CLIP-G concatenation is zero-padded up to this width
            caption_projection_dim=16,
            pooled_projection_dim=clip_l + clip_g,
            pos_embed_max_size=32,  # room for non-square latents up to 64 px on a side
            **transformer_config,
        ).eval(),
        seed,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(2, seed, shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(seed: int = 0, model_max_length: int = 16):
    """SD3 (medium) structure: joint attention in every `transformer_blocks.i.attn`, the last block context_pre_only."""
    return _tiny_sd3(seed, model_max_length)


def tiny_sd35_pipeline(seed: int = 0, model_max_length: int = 16):
    """SD3.5 (medium) structure: as SD3 plus an image-only `attn2` in the `dual_attention_layers` and RMS q/k norms."""
    return _tiny_sd3(seed, model_max_length, dual_attention_layers=(0,), qk_norm="rms_norm")


# -- FLUX ------------------------------------------------------------------------------------------------------------


def tiny_flux_pipeline(seed: int = 0, model_max_length: int = 16):
    """FLUX.1-dev structure: double-stream then single-stream blocks, guidance embedding, T5 text in the sequence."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    t5_width = 32
    tokenizer = tiny_tokenizer(model_max_length)
    tokenizer_2 = tiny_t5_tokenizer(512)
    text_encoder = _clip_encoder(tokenizer, 16, seed)
    text_encoder_2 = _t5_encoder(tokenizer_2, t5_width, seed + 1)
    transformer = _random_transformer(
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels packed 2x2
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=t5_width,
            pooled_projection_dim=16,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),  # (index, row, col) RoPE axes; they must sum to attention_head_dim
        ).eval(),
        seed,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=16, max_image_seq_len=256
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=_vae(2, seed, shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    # FluxPipeline hard-codes default_sample_size = 128 (a 1024 px default for the real VAE). On this x2 VAE that
    # would be a 256 px image with 4096 image tokens; a 32 px default keeps pipe(prompt) as quick as the others.
    pipe.default_sample_size = 16
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_dit_pipeline(family: str, seed: int = 0):
    """One of "pixart", "pixart-sigma", "sd3", "sd3.5", "flux"."""
    builders = {
        "pixart": tiny_pixart_pipeline,
        "pixart-sigma": tiny_pixart_sigma_pipeline,
        "sd3": tiny_sd3_pipeline,
        "sd3.5": tiny_sd35_pipeline,
        "flux": tiny_flux_pipeline,
    }
    if family not in builders:
        raise ValueError(f"unknown tiny transformer family {family!r}; expected one of {sorted(builders)}")
    return builders[family](seed=seed)
