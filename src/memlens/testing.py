"""Tiny random-weight pipelines with the structure of real Stable Diffusion checkpoints.

They use exactly the classes a hub checkpoint loads (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`,
`UNet2DConditionModel`, `AutoencoderKL`, `CLIPTextModel`, `CLIPTokenizer`, `DDIMScheduler`), shrunk so a full
generation takes well under a second on a CPU. Nothing is downloaded: the tokenizer's vocabulary is built here
(byte-level characters, no merges), so every character is one token and truncation is easy to reach.

Family facts mirrored from the real configs:
- SD 1.x: pad token = EOS, epsilon prediction, one head count for every level.
- SD 2.x: pad token "!", v-prediction, linear projections, per-level head counts.
- SDXL: two text encoders (the second with a projection, padding with "!"), `text_time` added conditions, and a
  first down block without cross-attention, so the highest-resolution cross-attention sits in `down_blocks.1`.
"""

from __future__ import annotations

import torch

__all__ = ["tiny_tokenizer", "tiny_sd1_pipeline", "tiny_sd2_pipeline", "tiny_sdxl_pipeline", "tiny_pipeline"]


def _byte_unicode_alphabet() -> list[str]:
    # The byte-to-printable-character table of GPT-2/CLIP byte-level BPE, so any UTF-8 text is representable.
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def tiny_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A `CLIPTokenizer` with a character-level vocabulary; SD1 pads with EOS, SD2/SDXL-2 with "!"."""
    from transformers import CLIPTokenizer

    alphabet = _byte_unicode_alphabet()
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token=pad_token, model_max_length=model_max_length)


def _text_encoder(tokenizer, hidden: int, projection_dim: int | None = None, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection_dim or hidden,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection_dim else CLIPTextModel
    return cls(config).eval()


def _vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # Two levels: vae_scale_factor 2, so a 32x32 image has a 16x16 latent.
    return AutoencoderKL(
        block_out_channels=[8, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ).eval()


def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    # SD's own DDIM settings: leading spacing with steps_offset 1, so the last step is t=1.
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def _randomize_(module: torch.nn.Module, seed: int) -> None:
    # Fresh diffusers UNets zero their output convolutions, which makes eps_c == eps_u and D identically zero.
    # Random non-zero weights everywhere give the probe something real to measure.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight") and p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))


def _own_rng(build):
    """Run a builder under `torch.random.fork_rng`: the weights come from its own seeds (the `torch.manual_seed`
    calls inside), and the caller's global RNG state is exactly as it was afterwards."""
    import functools

    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return build(*args, **kwargs)

    return wrapper


def _tiny_sd_pipeline(seed, model_max_length, pad_token, prediction_type, unet_family_kwargs):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = tiny_tokenizer(model_max_length, pad_token=pad_token)
    text_encoder = _text_encoder(tokenizer, hidden=32, seed=seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=4,
        **unet_family_kwargs,
    ).eval()
    _randomize_(unet, seed)
    pipe = StableDiffusionPipeline(
        vae=_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@_own_rng
def tiny_sd1_pipeline(seed: int = 0, model_max_length: int = 77):
    """SD 1.x structure: cross-attention in down_blocks.0/1, 2 layers per block, pad = EOS, epsilon prediction."""
    # SD1 configs put the head COUNT in attention_head_dim (8 in the real one).
    family = dict(attention_head_dim=4)
    return _tiny_sd_pipeline(seed, model_max_length, "<|endoftext|>", "epsilon", family)


@_own_rng
def tiny_sd2_pipeline(seed: int = 0, model_max_length: int = 77):
    """SD 2.x structure: pad token "!", v-prediction, linear projections, a different head count per level."""
    # diffusers reads attention_head_dim as the head count (a legacy name); SD2 has a different count per level.
    family = dict(attention_head_dim=(4, 8, 8), use_linear_projection=True)
    return _tiny_sd_pipeline(seed, model_max_length, "!", "v_prediction", family)


@_own_rng
def tiny_sdxl_pipeline(seed: int = 0, model_max_length: int = 77):
    """SDXL structure: two text encoders, added time/text conditions, first cross-attention in down_blocks.1."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = tiny_tokenizer(model_max_length)
    tokenizer_2 = tiny_tokenizer(model_max_length, pad_token="!")
    text_encoder = _text_encoder(tokenizer, hidden=32, seed=seed)
    text_encoder_2 = _text_encoder(tokenizer_2, hidden=32, projection_dim=32, seed=seed + 1)
    time_embed_dim = 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2),
        attention_head_dim=(4, 8, 8),
        use_linear_projection=True,
        cross_attention_dim=64,  # the two encoders' widths concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + 32,
        norm_num_groups=4,
    ).eval()
    _randomize_(unet, seed)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(seed),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_scheduler("epsilon"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline(family: str, seed: int = 0, model_max_length: int = 77):
    """One of "sd1", "sd2", "sdxl"."""
    builders = {"sd1": tiny_sd1_pipeline, "sd2": tiny_sd2_pipeline, "sdxl": tiny_sdxl_pipeline}
    if family not in builders:
        raise ValueError(f"unknown tiny pipeline family {family!r}; expected one of {sorted(builders)}")
    return builders[family](seed=seed, model_max_length=model_max_length)
