"""The organism's pipeline: a tiny pixel-space Stable-Diffusion-v1 look-alike that stock diffusers code can run.

Components (all saved/loaded by `save_pretrained` / `from_pretrained`):

* tokenizer: word-level `PreTrainedTokenizerFast`; ids are BOS, words, EOS, then padding: EOS again as in SD v1's
  CLIP tokenizer, or a PAD token of its own as in SD v2's. "The end token" is the first EOS either way.
* text_encoder: causal `transformers.CLIPTextModel`, trained from scratch.
* vae: `PixelShuffleVAE`, a parameter-free lossless pixel-(un)shuffle (4x4 for the shipped organism). The UNet thus
  denoises the rearranged 32x32 RGB image (48 x 8 x 8). I.i.d. Gaussian noise stays i.i.d. under a permutation, so
  this is exactly a pixel-space DDPM, only much cheaper than running the UNet at 32x32.
* unet: `UNet2DConditionModel` with cross-attention in its first two down blocks (8x8 and 4x4 for the shipped one).
* scheduler: DDIM, leading spacing with steps_offset=1, so the last step is t=1 as in SD.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from memlens.testbed import pixel_shuffle_vae
from memlens.testbed.pixel_shuffle_vae import PixelShuffleVAE

BOS, EOS, UNK, PAD = "<|startoftext|>", "<|endoftext|>", "<|unk|>", "<|pad|>"
# What fills the ids after the end token: "eos" repeats the end token (SD v1's CLIP tokenizer), "pad" uses a token of
# its own (as SD v2's tokenizer pads with "!"), so the end token is the only EOS in the sequence.
PAD_CHOICES = ("eos", "pad")
WEIGHTS_DIR = Path(__file__).parent / "weights"  # the default organism (v1)
# Shipped organisms by name, for `--model` and `load_pipeline`: v1 (the default) and v2 (docs/organism.md).
SHIPPED = {"testbed": WEIGHTS_DIR, "testbed-v1": WEIGHTS_DIR, "testbed-v2": Path(__file__).parent / "weights_v2"}


def organism_path(organism: str | Path | None) -> Path:
    """A shipped organism's folder by name (`SHIPPED`), or the given folder; None is the default organism."""
    if organism is None:
        return WEIGHTS_DIR
    return SHIPPED.get(str(organism), Path(organism))

# Recommended sampling settings for the shipped organism, chosen on a sweep (docs/organism.md, Stages 5 and 6):
# guidance 7.5 (SD's default) over-guides a model this small, and above 1.5 classifier-free guidance pushes samples
# into a neighbouring memorized item; with 50 DDIM steps a local template the first steps drew is often lost in the
# mid-noise steps, 30 keeps more of it.
DEFAULT_GUIDANCE = 1.5
DEFAULT_STEPS = 30


# ---------------------------------------------------------------- tokenizer
def split_words(text: str) -> list[str]:
    """The word-level tokenizer's notion of a word: lower-case alphanumeric runs."""
    return re.findall(r"[a-z0-9]+", text.lower())


def build_tokenizer(captions, max_length: int = 16, pad: str = "pad") -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words of `captions`; ids: BOS w1 .. wn EOS, then padding (`pad`, see
    PAD_CHOICES)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

    if pad not in PAD_CHOICES:
        from memlens.errors import InputError

        raise InputError(f"pad: expected one of {', '.join(PAD_CHOICES)}, got {pad!r}")
    words = sorted({w for c in captions for w in split_words(c)})
    vocab = {BOS: 0, EOS: 1, UNK: 2}
    if pad == "pad":
        vocab[PAD] = len(vocab)
    for w in words:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^a-z0-9]+"), behavior="removed")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS if pad == "eos" else PAD,
        unk_token=UNK,
        model_max_length=max_length,
        padding_side="right",
        truncation_side="right",
    )


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Padded input ids exactly as StableDiffusionPipeline makes them."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


# ---------------------------------------------------------------- pipeline
class OrganismPipeline(StableDiffusionPipeline):
    """StableDiffusionPipeline with the organism's recommended defaults; the denoising loop is the stock one."""

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None, feature_extractor=None,
                 image_encoder=None, requires_safety_checker: bool = False,
                 default_guidance_scale: float = DEFAULT_GUIDANCE, default_num_inference_steps: int = DEFAULT_STEPS):
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                         safety_checker=None, feature_extractor=None, image_encoder=None,
                         requires_safety_checker=False)
        self.register_to_config(default_guidance_scale=default_guidance_scale,
                                default_num_inference_steps=default_num_inference_steps)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as usual, but so that stock diffusers reads the folder without memlens: model_index.json names the
        stock StableDiffusionPipeline, and the VAE's self-contained module is copied into `vae/` as a custom
        component (`StableDiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`). `load_pipeline`
        restores this class and takes the VAE class from memlens itself, running no code from the folder."""
        super().save_pretrained(save_directory, *args, **kwargs)
        module = Path(pixel_shuffle_vae.__file__)
        shutil.copyfile(module, Path(save_directory) / "vae" / module.name)
        index = Path(save_directory) / "model_index.json"
        config = json.loads(index.read_text())
        config["_class_name"] = StableDiffusionPipeline.__name__
        config["vae"] = [module.stem, PixelShuffleVAE.__name__]
        index.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def __call__(self, prompt=None, *args, guidance_scale: float | None = None,
                 num_inference_steps: int | None = None, **kwargs):
        if guidance_scale is None:
            guidance_scale = self.config.default_guidance_scale
        if num_inference_steps is None:
            num_inference_steps = self.config.default_num_inference_steps
        return super().__call__(prompt, *args, guidance_scale=guidance_scale,
                                num_inference_steps=num_inference_steps, **kwargs)


# Noise schedules by name: "sd" is Stable Diffusion v1's (scaled-linear betas 0.00085..0.012), "ddpm" the pixel-space
# DDPM one (linear 1e-4..0.02). With "ddpm", sqrt(alpha_bar) at t=981 is 0.006, so an undertrained UNet's small
# epsilon errors become huge x0 errors and sampling drifts off the data; "sd" ends at 0.07 and is far better
# conditioned for a model trained for minutes.
SCHEDULES = {
    "sd": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "ddpm": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
}


def make_scheduler(schedule: str = "sd") -> DDIMScheduler:
    """DDIM sampling as in SD (leading spacing, steps_offset=1, so the last step is t=1), epsilon prediction."""
    return DDIMScheduler(
        num_train_timesteps=1000, **SCHEDULES[schedule],
        prediction_type="epsilon", set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
        # Pixel space needs the predicted x0 kept in [-1, 1]. StableDiffusionPipeline forces `clip_sample` off (it
        # is wrong for latents), so clip via thresholding, which with sample_max_value=1 is exactly that clamp.
        clip_sample=False, thresholding=True, sample_max_value=1.0, dynamic_thresholding_ratio=0.995,
    )


def build_text_encoder(tokenizer, width: int = 128, layers: int = 3, heads: int = 4) -> CLIPTextModel:
    """A freshly initialised causal CLIP text encoder over `tokenizer`'s vocabulary; its pooled output is the
    hidden state at the first EOS (the end token), as in CLIP."""
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
        num_hidden_layers=layers, num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length, projection_dim=width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))


def build_pipeline(tokenizer, resolution: int = 32, text_width: int = 128, text_layers: int = 3,
                   text_heads: int = 4, unet_channels: tuple = (64, 64, 64), unet_heads: int = 4,
                   factor: int = 4, schedule: str = "sd") -> OrganismPipeline:
    """A freshly initialised organism around `tokenizer`."""
    text_encoder = build_text_encoder(tokenizer, text_width, text_layers, text_heads)
    vae = PixelShuffleVAE(in_channels=3, factor=factor,
                          block_out_channels=tuple(3 * 4**i for i in range(int(factor).bit_length())))
    latent_channels = vae.latent_channels
    unet = UNet2DConditionModel(
        sample_size=resolution // factor, in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=tuple(unet_channels), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_width, attention_head_dim=unet_heads, norm_num_groups=8,
    )
    pipe = OrganismPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=make_scheduler(schedule))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(path: str | Path | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> OrganismPipeline:
    """Load an organism offline: a folder, a shipped one by name (`SHIPPED`), or by default the shipped v1."""
    path = organism_path(path)
    if not (path / "model_index.json").is_file():
        from memlens.errors import InputError

        raise InputError(f"{path}: no model_index.json; expected a directory written by OrganismPipeline.save_pretrained")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    # Loading bars would interleave with the caller's own output; this loads a few MB in well under a second.
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    index = json.loads((path / "model_index.json").read_text())
    # Component by component, with memlens' own classes: no code from the folder runs, whichever layout it has
    # (folders saved before 2026-12 name memlens' module as the VAE's library, later ones a copy in vae/).
    pipe = OrganismPipeline(
        vae=PixelShuffleVAE.from_pretrained(str(path / "vae"), dtype=dtype),
        text_encoder=CLIPTextModel.from_pretrained(str(path / "text_encoder"), local_files_only=True, dtype=dtype),
        tokenizer=PreTrainedTokenizerFast.from_pretrained(str(path / "tokenizer"), local_files_only=True),
        unet=UNet2DConditionModel.from_pretrained(str(path / "unet"), local_files_only=True, dtype=dtype),
        scheduler=DDIMScheduler.from_pretrained(str(path / "scheduler"), local_files_only=True),
        default_guidance_scale=index.get("default_guidance_scale", DEFAULT_GUIDANCE),
        default_num_inference_steps=index.get("default_num_inference_steps", DEFAULT_STEPS),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
