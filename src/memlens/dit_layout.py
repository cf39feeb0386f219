"""Facts read from a diffusion-transformer pipeline that a bright-ending probe needs.

For PixArt-alpha/sigma, SD3/SD3.5 and FLUX.1 this module answers, from the model and the call rather than from a
table of checkpoint constants:

- which attention modules carry image->text attention (`text_attention_sites`), and of what kind:
  ``"cross"`` (PixArt `attn2`: image queries, text keys only), ``"joint"`` (SD3 `transformer_blocks.i.attn`, FLUX
  double-stream `transformer_blocks.i.attn`: image and text projected separately, one softmax over both) or
  ``"single"`` (FLUX `single_transformer_blocks.j.attn`: one already concatenated sequence);
- where the image and text tokens sit in each module's key sequence (`AttentionSite.key_slices`), given the image
  and text token counts of the call (read from the tensors the module receives);
- the text segments of the text sequence and where their end tokens are (`text_segments`, `end_token_positions`);
- how classifier-free guidance is arranged (`cfg_layout`) and what the model predicts (`prediction_layout`);
- the image-token grid (`image_grid`).

Every fact cites the diffusers 0.42.1 line it comes from (paths under ``diffusers/``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from memlens.errors import MemlensError

__all__ = [
    "AttentionSite",
    "TextSegment",
    "CFGLayout",
    "PredictionLayout",
    "family_of",
    "text_attention_sites",
    "text_segments",
    "end_token_positions",
    "first_index",
    "cfg_layout",
    "prediction_layout",
    "image_grid",
    "guided_prediction",
    "step_index",
    "step_timestep",
    "latent_prediction",
]

Family = Literal["pixart", "sd3", "flux"]
SiteKind = Literal["cross", "joint", "single"]

# Transformer class -> family. The class, not the pipeline, decides where text sits in attention, so a community
# pipeline that calls one of these transformers the stock way gets the same layout.
_FAMILIES = {
    "PixArtTransformer2DModel": "pixart",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
}


def family_of(pipe_or_transformer) -> Family:
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    name = type(transformer).__name__
    if name not in _FAMILIES:
        raise MemlensError(
            f"{name} is not a supported diffusion transformer (supported: {', '.join(sorted(_FAMILIES))})"
        )
    return _FAMILIES[name]


@dataclass(frozen=True)
class AttentionSite:
    """One attention module whose image queries attend to text keys."""

    name: str  # module path inside the transformer, e.g. "transformer_blocks.3.attn"
    module: torch.nn.Module
    kind: SiteKind
    # Whether the text keys come before the image keys in the module's concatenated key sequence.
    # SD3 (JointAttnProcessor2_0): cat([sample, context]) -> image first
    #   (models/attention_processor.py:1480-1482; the output is split at residual.shape[1], :1491).
    # FLUX double stream (FluxAttnProcessor): cat([encoder_query, query]) -> text first
    #   (models/transformers/transformer_flux.py:113-115; split_with_sizes([text, image]), :133).
    # FLUX single stream: the block concatenates [text, image] before calling attn
    #   (models/transformers/transformer_flux.py:391-392) and RoPE ids are cat((txt_ids, img_ids)) (:749).
    # PixArt cross-attention: keys are text only (models/attention.py:1043-1046 passes encoder_hidden_states).
    text_first: bool
    # The text stream's output is dropped after this block (SD3's last block, context_pre_only=True,
    # models/transformers/transformer_sd3.py:161); its image queries still attend to the text.
    context_pre_only: bool = False

    def key_slices(self, num_image: int, num_text: int) -> tuple[slice, slice]:
        """(image keys, text keys) as slices of this module's key sequence."""
        if self.kind == "cross":
            return slice(0, 0), slice(0, num_text)
        if self.text_first:
            return slice(num_text, num_text + num_image), slice(0, num_text)
        return slice(0, num_image), slice(num_image, num_image + num_text)

    def query_slice(self, num_image: int, num_text: int) -> slice:
        """The image queries among this module's queries (cross attention has only image queries)."""
        if self.kind == "cross":
            return slice(0, num_image)
        return self.key_slices(num_image, num_text)[0]


def text_attention_sites(transformer: torch.nn.Module) -> list[AttentionSite]:
    """Every attention module of the transformer in which image queries see text keys, in module order.

    Selected by what the module is, not by its name: SD3.5's `transformer_blocks.i.attn2` is an image-only
    self-attention (called with hidden_states only, models/attention.py:715), so the UNet/PixArt rule "attn2 is
    cross-attention" would pick the wrong module there.
    """
    family = family_of(transformer)
    sites: list[AttentionSite] = []
    for name, module in transformer.named_modules():
        if not hasattr(module, "processor"):
            continue
        added = getattr(module, "added_kv_proj_dim", None) is not None
        if family == "pixart":
            # attn1 is self-attention (cross_attention_dim None); attn2 has is_cross_attention=True
            # (models/attention_processor.py:149).
            if getattr(module, "is_cross_attention", False):
                sites.append(AttentionSite(name, module, "cross", text_first=True))
        elif family == "sd3":
            # Joint attention carries the added (context) projections (models/attention.py:632-644,
            # added_kv_proj_dim=dim); the dual-attention attn2 has none.
            if added:
                pre_only = bool(getattr(module, "context_pre_only", False))
                sites.append(AttentionSite(name, module, "joint", text_first=False, context_pre_only=pre_only))
        elif family == "flux":
            if added:
                sites.append(AttentionSite(name, module, "joint", text_first=True))
            elif getattr(module, "pre_only", False):
                # Single-stream attention: no added projections, pre_only (transformer_flux.py:380); text reaches
                # it only through the concatenated sequence.
                sites.append(AttentionSite(name, module, "single", text_first=True))
    if not sites:
        raise MemlensError(f"{type(transformer).__name__} has no attention module with text keys")
    return sites


# -- text ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextSegment:
    """A run of text positions in the transformer's text sequence that one tokenizer produced."""

    name: str  # "clip" or "t5"
    start: int  # offset within the text tokens
    length: int
    tokenizer_attr: str  # the pipeline attribute holding the tokenizer whose ids fill this segment
    end_token_id: int
    # The __call__ argument whose text this tokenizer encodes when given (it falls back to `prompt`): SD3 encodes
    # prompt_3 with T5 (pipeline_stable_diffusion_3.py:433), FLUX prompt_2 (pipeline_flux.py:360).
    prompt_argument: str = "prompt"


def _call_default(pipe, argument: str):
    return inspect.signature(type(pipe).__call__).parameters[argument].default


def text_segments(pipe, num_text: int) -> list[TextSegment]:
    """The segments of a text sequence of `num_text` tokens (the transformer's encoder_hidden_states.shape[1]).

    - PixArt: T5 only (pipelines/pixart_alpha/pipeline_pixart_alpha.py:357-364 tokenizes to max_sequence_length).
    - SD3: CLIP then T5: cat([clip_prompt_embeds, t5_prompt_embed], dim=-2)
      (pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py:463); the CLIP part is tokenizer_max_length long
      (:311, = tokenizer.model_max_length, :221-223) and holds CLIP-L|CLIP-G on channels, zero-padded (:459).
    - FLUX: T5 only (tokenizer_2); CLIP gives just the pooled vector (pipelines/flux/pipeline_flux.py:303).
    """
    family = family_of(pipe)
    if family == "pixart":
        tok = pipe.tokenizer
        return [TextSegment("t5", 0, num_text, "tokenizer", tok.eos_token_id)]
    if family == "flux":
        tok = pipe.tokenizer_2
        return [TextSegment("t5", 0, num_text, "tokenizer_2", tok.eos_token_id, "prompt_2")]
    clip_len = pipe.tokenizer_max_length
    if num_text < clip_len:
        raise MemlensError(f"SD3 text sequence of {num_text} tokens is shorter than its CLIP part ({clip_len})")
    t5_tok = pipe.tokenizer_3
    # Without text_encoder_3 the pipeline still appends max_sequence_length zero rows (pipeline_stable_diffusion_3.py
    # :247-256); they are part of the key sequence, but there is no </s> among them.
    segments = [TextSegment("clip", 0, clip_len, "tokenizer", pipe.tokenizer.eos_token_id)]
    if t5_tok is not None:
        segments.append(
            TextSegment("t5", clip_len, num_text - clip_len, "tokenizer_3", t5_tok.eos_token_id, "prompt_3")
        )
    return segments


def first_index(ids: Sequence[int], token_id: int) -> int:
    """The first position of `token_id`; the last position if it is absent (then the sequence was cut)."""
    for i, tok in enumerate(ids):
        if int(tok) == token_id:
            return i
    return len(ids) - 1


def segment_input_ids(
    pipe, segment: TextSegment, prompts: Sequence[str], clean_caption: bool | None = None
) -> list[list[int]]:
    """The ids the segment's text encoder receives for `prompts`, tokenised exactly as the pipeline's encode_prompt.

    PixArt first lower-cases/strips the prompt in `_text_preprocessing`
    (pipeline_pixart_alpha.py:356; with bs4 + ftfy and clean_caption=True it rewrites much more), then pads to
    max_length with truncation and T5's appended </s>.
    """
    tok = getattr(pipe, segment.tokenizer_attr)
    text = list(prompts)
    if family_of(pipe) == "pixart":
        # The call's own clean_caption when known: with bs4 + ftfy installed it changes the ids.
        clean = _call_default(pipe, "clean_caption") if clean_caption is None else clean_caption
        text = pipe._text_preprocessing(text, clean_caption=clean)
    return tok(
        text, padding="max_length", max_length=segment.length, truncation=True, add_special_tokens=True
    ).input_ids


def end_token_positions(
    pipe, segment: TextSegment, prompts: Sequence[str], clean_caption: bool | None = None
) -> list[int]:
    """Per prompt, the end token's index in the transformer's TEXT sequence (segment.start included).

    CLIP: the first <|endoftext|> (SD3 CLIP-L and CLIP-G put it at the same position; CLIP-G pads with "!").
    T5: the first </s> (T5 has no BOS; it appends </s>, then pads with <pad>).
    """
    ids = segment_input_ids(pipe, segment, prompts, clean_caption)
    return [segment.start + first_index(row, segment.end_token_id) for row in ids]


# -- guidance and prediction -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CFGLayout:
    """How the unconditional and conditional predictions of one denoising step are produced.

    mode ``"batch"``: one call per step, rows [uncond ; cond] (SD3 :998 and :1085, PixArt :861 and :943).
    mode ``"calls"``: FLUX true CFG: two calls per step with the same latents and timestep, cond first, then uncond
    (pipelines/flux/pipeline_flux.py:900-929).
    mode ``"none"``: no unconditional prediction is ever made (guidance_scale <= 1; FLUX without true CFG).
    ``extra_cond_steps``: SD3 skip-layer guidance adds a cond-only call (batch = images, `skip_layers` set) after the
    CFG call at these step indices (pipeline_stable_diffusion_3.py:1086-1105).
    """

    mode: Literal["batch", "calls", "none"]
    cond_first: bool = False
    extra_cond_steps: tuple[int, ...] = ()

    def calls_per_step(self, step: int) -> int:
        return len(self.call_roles(step))

    def call_roles(self, step: int) -> list[str]:
        """What each transformer call of step `step` is, in call order: "uncond+cond" (a CFG batch), "cond",
        "uncond", or "cond_skip_layers" (SD3 SLG's extra call; its attention is of a truncated network)."""
        if self.mode == "batch":
            roles = ["uncond+cond"]
        elif self.mode == "calls":
            roles = ["cond", "uncond"] if self.cond_first else ["uncond", "cond"]
        else:
            roles = ["cond"]
        if step in self.extra_cond_steps:
            roles.append("cond_skip_layers")
        return roles

    @staticmethod
    def conditional_rows(role: str, batch: int) -> slice | None:
        """The rows of a call with this role that hold the conditional images (None: the call has none to read)."""
        if role == "uncond+cond":
            return slice(batch // 2, batch)
        if role == "cond":
            return slice(0, batch)
        return None


def cfg_layout(pipe, num_inference_steps: int, **call_kwargs) -> CFGLayout:
    """The CFG arrangement `pipe(..., **call_kwargs)` will use, decided by the pipeline's own conditions."""
    family = family_of(pipe)

    def arg(name):
        return call_kwargs[name] if name in call_kwargs else _call_default(pipe, name)

    if family == "flux":
        # do_true_cfg = true_cfg_scale > 1 and has_neg_prompt (pipeline_flux.py:768-771): a true_cfg_scale without
        # a negative prompt silently runs without an unconditional branch.
        has_neg = arg("negative_prompt") is not None or (
            arg("negative_prompt_embeds") is not None and arg("negative_pooled_prompt_embeds") is not None
        )
        if arg("true_cfg_scale") > 1 and has_neg:
            return CFGLayout("calls", cond_first=True)
        return CFGLayout("none")
    if not arg("guidance_scale") > 1:  # do_classifier_free_guidance (SD3 :680-681, PixArt :839)
        return CFGLayout("none")
    extra: tuple[int, ...] = ()
    if family == "sd3" and arg("skip_guidance_layers") is not None:
        start, stop = arg("skip_layer_guidance_start"), arg("skip_layer_guidance_stop")
        extra = tuple(
            i for i in range(num_inference_steps) if num_inference_steps * start < i < num_inference_steps * stop
        )
    return CFGLayout("batch", cond_first=False, extra_cond_steps=extra)


@dataclass(frozen=True)
class PredictionLayout:
    """What the transformer predicts and which of its output channels guidance uses."""

    kind: Literal["epsilon", "flow_velocity"]
    guided_channels: int  # leading channels of the output that enter guidance (PixArt drops its variance channels)
    packed: bool  # FLUX: output (B, tokens, 4C) in 2x2 patches, not (B, C, H, W)


def prediction_layout(pipe) -> PredictionLayout:
    """PixArt: epsilon with learned sigma: out_channels = 2 * in_channels and the pipeline keeps
    noise_pred.chunk(2, dim=1)[0] (pipeline_pixart_alpha.py:947-948). SD3/FLUX: flow-matching velocity; their
    scheduler is a FlowMatch scheduler whose step integrates the model output as dx/dsigma."""
    transformer = pipe.transformer
    family = family_of(transformer)
    in_channels = transformer.config.in_channels
    out_channels = getattr(transformer.config, "out_channels", None) or in_channels
    scheduler_name = type(pipe.scheduler).__name__
    if scheduler_name.startswith("FlowMatch"):
        kind = "flow_velocity"
    else:
        kind = getattr(pipe.scheduler.config, "prediction_type", "epsilon")
        if kind != "epsilon":
            raise MemlensError(f"{scheduler_name} with prediction_type={kind!r} is not a layout memlens knows")
    if family == "pixart" and out_channels // 2 == in_channels:
        return PredictionLayout(kind, guided_channels=in_channels, packed=False)
    return PredictionLayout(kind, guided_channels=out_channels, packed=family == "flux")


def guided_prediction(output: torch.Tensor, layout: PredictionLayout) -> torch.Tensor:
    """The part of the transformer's output that guidance combines: (B, C, H, W), or (B, tokens, 4C) packed."""
    if layout.packed:
        return output
    return output[:, : layout.guided_channels]


def image_grid(family: Family, hidden_states: torch.Tensor, patch_size: int, img_ids: torch.Tensor | None = None):
    """(h, w) of image tokens for one transformer call, from its inputs.

    PixArt/SD3: PatchEmbed over the (B, C, H, W) latent, row-major over (H/p, W/p). For PixArt the latent already
    has the aspect-ratio-binned size (the requested size is restored only after decoding), so this is the binned
    grid. FLUX: the latent comes packed (B, tokens, 4C); the grid is read from img_ids = (0, row, col)
    (pipeline_flux.py:510-511).
    """
    if family == "flux":
        if img_ids is None:
            raise MemlensError("FLUX's image grid is read from img_ids; pass the transformer's img_ids")
        ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    height, width = hidden_states.shape[-2:]
    return height // patch_size, width // patch_size


def step_timestep(pipe, timestep):
    """The tensor that names the step of a transformer call: the call's own timestep, except for FLUX, which passes
    ``timestep / 1000``, a fresh tensor (pipeline_flux.py:903), but keeps the loop's own ``t``, a view of the
    scheduler's timesteps, in ``pipe._current_timestep`` (:894)."""
    if family_of(pipe) == "flux":
        return getattr(pipe, "_current_timestep", None)
    return timestep


def step_index(pipe, timestep: torch.Tensor) -> int | None:
    """The index in ``pipe.scheduler.timesteps`` of the step a transformer call belongs to; None if unknowable.

    Read from storage, not by counting calls (SD3 skip-layer guidance and FLUX true CFG make several calls per
    step). PixArt and SD3 pass ``t.expand(batch)``, a view of the scheduler's timesteps
    (pipeline_pixart_alpha.py:917-929, pipeline_stable_diffusion_3.py:1069); FLUX see `step_timestep`.
    """
    from memlens.unet_call import storage_step

    return storage_step(step_timestep(pipe, timestep), pipe.scheduler.timesteps)


def latent_prediction(pipe, output: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The guided part of the transformer's output as a latent (B, C, H, W). FLUX predicts packed 2x2 patches
    (B, h*w, 4C); they are unpacked with the pipeline's own `_unpack_latents`, which takes the pixel size
    (latent = 2 * (pixels // (vae_scale_factor * 2)), pipeline_flux.py:532-545)."""
    layout = prediction_layout(pipe)
    guided = guided_prediction(output, layout)
    if not layout.packed:
        return guided
    h, w = grid
    factor = pipe.vae_scale_factor
    return pipe._unpack_latents(guided, 2 * h * factor, 2 * w * factor, factor)
