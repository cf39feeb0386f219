"""`BrightEndingProbe`: attach to a stock diffusers pipeline and record, in the generation the user runs anyway,
each image's bright-ending map and its per-step noise magnitudes D and LD.

UNet pipelines (SD 1.x/2.x, SDXL) and diffusion-transformer pipelines (PixArt-alpha/sigma, SD3/SD3.5, FLUX.1) are
attached the same way; "UNet" below stands for the denoiser (``pipe.unet`` or ``pipe.transformer``). What differs
per transformer family is read from the model by `memlens.dit_layout` (sites, text segments, CFG arrangement, what
is predicted); see docs/probe.md.

How one pass works
------------------
- A forward pre-hook on the UNet reads which denoising step is running from the pipeline's own loop: the timestep
  tensor the pipeline passes is an element of ``pipe.scheduler.timesteps``, so its storage offset is the step index
  (no call counting; repeated timestep values, as in PLMS, stay distinct).
- At the captured step(s) the `CaptureProcessor`s on the chosen ``attn2`` layers add the head-averaged attention on
  the end token of each conditional row.
- A forward hook on the UNet splits its output into eps_u and eps_c and keeps, per step, the channel-summed energy
  map E_t = sum_c (eps_c - eps_u)^2 at latent resolution, on the device and without synchronising.
- After the last step the map is final, so D_t = sqrt(sum E_t) and LD_t = sqrt(sum E_t m^2) / mean(m) are computed
  for every step at once, moved to the CPU in one transfer, and the energy maps are dropped (unless keep_energy).

Classifier-free guidance is required: with guidance_scale <= 1 the pipeline never evaluates eps(x_t, ""), so D and
LD do not exist in that pass and the probe raises instead of inventing them. (FLUX without true CFG is the same
case; ``require_guidance=False`` records its BE maps with D/LD set to NaN instead.)

Transformer calls: a step may take several calls (FLUX true CFG: cond, then uncond; SD3 skip-layer guidance: an
extra cond-only call of a truncated network). `dit_layout.cfg_layout` says what each call of a step is; attention is
read from the call that holds the conditional rows of the full network, and the guidance difference from the CFG
batch or from the paired cond/uncond calls. Skip-layer calls are ignored.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from memlens import capture, dit_layout, quantities, unet_call
from memlens.errors import MemlensError

__all__ = ["BrightEndingProbe", "ImageRecord", "TOKEN_CHOICES", "token_weights"]


@dataclass
class ImageRecord:
    """What the probe keeps of one generated image. O(h*w + steps) memory."""

    prompt: str
    eos_index: int
    be_map: np.ndarray  # float32 (h, w): attention on the chosen token, the finest captured layer's grid
    magnitude: np.ndarray  # float32 (steps,): D_t
    masked_magnitude: np.ndarray  # float32 (steps,): LD_t with mask = be_map
    timesteps: np.ndarray  # the scheduler timesteps of those steps
    prompt_index: int = 0  # position of the prompt within its pipeline call
    image_index: int = 0  # position of the image among that prompt's images
    energy: np.ndarray | None = field(default=None, repr=False)  # float32 (steps, H, W) when keep_energy=True
    # How the map is brought to the latent for LD: "bilinear" (UNets), "patch" (transformers: each token's footprint).
    mask_resize: str = "bilinear"

    @property
    def nbytes(self) -> int:
        arrays = (self.be_map, self.magnitude, self.masked_magnitude, self.timesteps, self.energy)
        return sum(a.nbytes for a in arrays if a is not None)

    def masked_magnitude_with(self, mask: np.ndarray) -> np.ndarray:
        """LD_t (steps,) with another mask (h, w), brought to latent size as the BE map is; needs keep_energy=True."""
        if self.energy is None:
            raise MemlensError("this record has no energy maps; record with BrightEndingProbe(..., keep_energy=True)")
        m = torch.as_tensor(np.asarray(mask, dtype=np.float32))[None]
        if not float(m.mean()) > 0:
            raise MemlensError("mask has no positive mass; LD is undefined for an all-zero mask")
        e = torch.from_numpy(self.energy)[:, None]  # (steps, 1, H, W): one image
        ld = quantities.magnitude(e, quantities.mask_to_latent(m, self.energy.shape[-2:], self.mask_resize))
        return ld[:, 0].numpy().astype(np.float32)


TOKEN_CHOICES = ("eos", "padding", "eos+padding")
SEGMENT_CHOICES = ("clip", "t5", "both")


def token_weights(token: str | int, eos: Sequence[int], num_tokens: int) -> torch.Tensor:
    """(images, num_tokens) weights that read `token` for images whose end token sits at `eos`."""
    weights = torch.zeros(len(eos), num_tokens)
    for i, e in enumerate(eos):
        if token == "eos":
            weights[i, e] = 1.0
        elif token == "padding":
            # The positions after the end token; a prompt that fills the context has none, so read the end token.
            start = e + 1 if e + 1 < num_tokens else e
            weights[i, start:] = 1.0 / (num_tokens - start)
        elif token == "eos+padding":
            # The end token and every position after it: in SD v1's layout these are all the end token.
            weights[i, e:] = 1.0 / (num_tokens - e)
        else:
            if not -num_tokens <= int(token) < num_tokens:
                raise MemlensError(f"token position {token} is outside the {num_tokens} text tokens")
            weights[i, int(token)] = 1.0
    return weights


class _Call:
    """State of one pipeline call, from its first UNet evaluation to its last."""

    def __init__(self, timesteps: torch.Tensor, prompts: list[str], eos: list[int], per_prompt: int, cfg: bool,
                 token: str | int, weights=None):
        self.timesteps = timesteps
        self.token = token
        self.prompts = prompts
        self.eos = eos
        self.per_prompt = per_prompt
        self.cfg = cfg
        self.last_step = -1
        self.current_step = -1
        self.latent_channels = 0
        self.steps: list[int] = []
        self.energy: list[torch.Tensor] = []  # per step (n, H, W) float32, on the UNet's device
        self.latent_hw: tuple[int, int] = (0, 0)
        self.capture_now = False
        self.weights: torch.Tensor | None = None
        # layer -> (n, queries) float32, summed over the captured steps
        self.columns = capture.TokenColumns(self.token_weights, unet_call.read_rows(2 * len(eos), cfg))
        self.expect_layers: set[str] = set()
        self.seen_layers: set[str] = set()
        self._weights_for = weights  # transformers: num_tokens -> weights over the text segments
        # Transformer calls only:
        self.layout: dit_layout.CFGLayout | None = None
        self.call_in_step = -1
        self.role = ""
        self.num_text = 0
        self.grid: tuple[int, int] = (0, 0)
        self.pending_cond: torch.Tensor | None = None

    def token_weights(self, num_tokens: int) -> torch.Tensor:
        if self.weights is None or self.weights.shape[1] != num_tokens:
            make = self._weights_for or (lambda n: token_weights(self.token, self.eos, n))
            self.weights = make(num_tokens)
        return self.weights


class BrightEndingProbe(capture.AttentionSink):
    """Records bright-ending maps and noise magnitudes from ordinary ``pipe(...)`` calls.

    Args:
        pipe: a diffusers text-to-image pipeline whose UNet has cross-attention (StableDiffusionPipeline,
            StableDiffusionXLPipeline, or any pipeline that calls its UNet the same way), or a PixArt-alpha/sigma,
            StableDiffusion3 or Flux pipeline (a `pipe.transformer` that `memlens.dit_layout` knows).
        layers: text-attention layers to read, as module names or prefixes; default: every ``attn2`` of the first
            down block that has cross-attention (``down_blocks.0`` in SD1/SD2, ``down_blocks.1`` in SDXL); for
            transformers every text-attention site (provisional, docs/probe.md), e.g. ``"transformer_blocks.3"``
            or ``"single_transformer_blocks"`` to choose blocks. ``"outer"`` (UNets): the first down block and the
            last up block with cross-attention, the same attention resolution at both ends of the UNet
            (``down_blocks.0`` + ``up_blocks.3`` in SD1/SD2); ``"all"``: every text-attention layer, the coarser
            maps upsampled bilinearly to the finest grid and averaged with one vote per attention query
            (`capture.on_one_grid`), so the map has the finest layer's resolution. With ``token="eos+padding"``
            this is the rule that localized in every training seed of the organism (docs/organism.md); the
            default stays the paper's.
        steps: step indices at which attention is read, negative counting from the end; maps of several steps are
            averaged. Default: the last step, as in the paper.
        token: ``"eos"`` (the first EOS of the padded ids, the paper's end token), ``"padding"`` (the mean attention
            over every position after the end token, the padding), ``"eos+padding"`` (the mean over the end token
            and the padding after it), or a fixed token position.
        prompts / eos_indices: needed only when the pipeline is called with ``prompt_embeds`` instead of prompts;
            they apply to every such call until changed (set ``probe.prompts`` / ``probe.eos_indices``).
        keep_energy: keep each image's per-step energy maps (steps x H x W) so that other masks can be applied later
            with `ImageRecord.masked_magnitude_with`. Off by default, to keep records small.
        segment: transformers only, which text encoder's end token: ``"clip"`` (SD3's default), ``"t5"`` (the only
            one of PixArt and FLUX) or ``"both"`` (the mean of the two maps' token weights, SD3).
        normalisation: transformers with joint attention: ``"text_renormalised"`` (default: the image query's
            attention over text keys only, what cross-attention gives) or ``"joint"`` (the raw probability of the
            softmax over image and text keys; computes every image x image logit at the captured step).
        require_guidance: when the call evaluates no unconditional branch (FLUX without true CFG), raise (default)
            or, with False, record the BE maps and set D/LD to NaN.
    """

    def __init__(
        self,
        pipe,
        *,
        layers: Sequence[str] | str | None = None,
        steps: Sequence[int] = (-1,),
        token: str | int = "eos",
        prompts: Sequence[str] | None = None,
        eos_indices: Sequence[int] | None = None,
        keep_energy: bool = False,
        segment: str | None = None,
        normalisation: str = "text_renormalised",
        require_guidance: bool = True,
    ):
        self.pipe = pipe
        unet = getattr(pipe, "unet", None)
        if unet is None:
            unet = getattr(pipe, "transformer", None)
        if unet is None:
            raise MemlensError(
                f"{type(pipe).__name__} has neither a `unet` nor a `transformer`; the probe attaches to UNet and "
                "diffusion-transformer pipelines"
            )
        self.unet = unet  # the denoiser
        self.transformer = capture.is_transformer(unet)
        self.layers = capture.select_layers(unet, layers)
        if normalisation not in capture.NORMALISATIONS:
            raise MemlensError(f"normalisation must be one of {capture.NORMALISATIONS}, got {normalisation!r}")
        self.normalisation = normalisation
        if segment is not None and (not self.transformer or segment not in SEGMENT_CHOICES):
            allowed = SEGMENT_CHOICES if self.transformer else "None (UNet pipelines have one text encoder layout)"
            raise MemlensError(f"segment must be one of {allowed}, got {segment!r}")
        self.segment = segment
        self.require_guidance = require_guidance
        if not steps:
            raise MemlensError("steps must name at least one step index")
        self.steps = tuple(int(s) for s in steps)
        if token not in TOKEN_CHOICES and not isinstance(token, int):
            raise MemlensError(f"token must be one of {TOKEN_CHOICES} or an int position, got {token!r}")
        self.token = token
        self.prompts = list(prompts) if prompts is not None else None
        self.eos_indices = list(eos_indices) if eos_indices is not None else None
        self.keep_energy = keep_energy
        self.records: list[ImageRecord] = []
        self._installed: capture.Attachment | None = None
        self._hooks: list = []
        self._call: _Call | None = None

    # -- context manager -------------------------------------------------------------------------------------------
    def __enter__(self) -> "BrightEndingProbe":
        if self._installed is not None:
            raise MemlensError("this BrightEndingProbe is already attached")
        self._installed = capture.attach(self.layers, self)
        try:
            self._hooks = [
                self.unet.register_forward_pre_hook(self._before_unet, with_kwargs=True),
                self.unet.register_forward_hook(self._after_unet, with_kwargs=True),
            ]
        except BaseException:
            self._installed.remove()
            self._installed = None
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._installed is not None:
            self._installed.remove()
            self._installed = None
        self._call = None

    def clear(self) -> None:
        """Forget the records gathered so far (a long scan calls this after saving each batch)."""
        self.records = []

    @property
    def layer_names(self) -> list[str]:
        return [l.name for l in self.layers]

    # -- AttentionSink ---------------------------------------------------------------------------------------------
    def rows(self) -> slice | None:
        call = self._call
        return call.columns.rows() if call is not None and call.capture_now else None

    def add(self, layer: str, probs: torch.Tensor) -> None:
        self._call.columns.add(layer, probs)
        self._call.seen_layers.add(layer)

    def text_length(self) -> int | None:
        return self._call.num_text if self._call is not None else None

    # -- hooks -----------------------------------------------------------------------------------------------------
    def _pipeline_call_arguments(self) -> dict:
        # The prompts a user passed are arguments of the pipeline's __call__, a few frames above this hook. Reading
        # them (never writing) keeps the probe attachable to a stock pipeline without wrapping its methods.
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_locals.get("self") is self.pipe and frame.f_code.co_name == "__call__":
                return dict(frame.f_locals)
            frame = frame.f_back
        return {}

    def _tokenizer(self):
        tok = getattr(self.pipe, "tokenizer", None) or getattr(self.pipe, "tokenizer_2", None)
        if tok is None:
            raise MemlensError(f"{type(self.pipe).__name__} has no tokenizer; pass eos_indices= to the probe")
        return tok

    def _eos_positions(self, prompts: list[str]) -> list[int]:
        tok = self._tokenizer()
        # Tokenise exactly as the pipelines' encode_prompt does, including textual-inversion expansion.
        text = prompts
        if hasattr(self.pipe, "maybe_convert_prompt"):
            text = self.pipe.maybe_convert_prompt(list(prompts), tok)
        ids = tok(list(text), padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
        return quantities.first_eos(ids, tok.eos_token_id).tolist()

    def _start_call(self, timesteps: torch.Tensor, rows: int) -> _Call:
        args = self._pipeline_call_arguments()
        prompt = args.get("prompt")
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt is not None:
            prompts = list(prompt)
            eos = self._eos_positions(prompts)
        elif self.prompts is not None or self.eos_indices is not None:
            prompts = list(self.prompts) if self.prompts is not None else [""] * len(self.eos_indices)
            eos = list(self.eos_indices) if self.eos_indices is not None else self._eos_positions(prompts)
            if len(eos) != len(prompts):
                raise MemlensError(f"probe has {len(prompts)} prompts but {len(eos)} eos_indices")
        else:
            raise MemlensError(
                "the pipeline was called without prompts (prompt_embeds?), so the probe cannot find the end token: "
                "pass prompts=[...] or eos_indices=[...] to BrightEndingProbe, or set probe.prompts before the call"
            )
        cfg = getattr(self.pipe, "do_classifier_free_guidance", None)
        if cfg is None:
            per_image = args.get("num_images_per_prompt") or 1
            cfg = rows == 2 * len(prompts) * per_image
        if not cfg:
            raise MemlensError(
                "BrightEndingProbe needs classifier-free guidance (guidance_scale > 1): with guidance <= 1 the "
                "pipeline never computes eps(x_t, '') and D/LD are undefined in that pass"
            )
        images = rows // 2
        if images % len(prompts) != 0 or rows % 2:
            raise MemlensError(
                f"the UNet batch of {rows} rows does not split into [unconditional, conditional] halves of "
                f"{len(prompts)} prompt(s) x images per prompt"
            )
        per_prompt = images // len(prompts)
        eos_per_image = [e for e in eos for _ in range(per_prompt)]
        return _Call(timesteps, prompts, eos_per_image, per_prompt, cfg, self.token)

    def _before_unet(self, module, args, kwargs):
        if self.transformer:
            return self._before_transformer(args, kwargs)
        sample, timestep = unet_call.sample_and_timestep(args, kwargs)
        timesteps = self.pipe.scheduler.timesteps
        if self._call is None or self._call.timesteps is not timesteps:
            # set_timesteps makes a new tensor each pipeline call; a new one means a new call (any unfinished
            # previous call was interrupted and is dropped).
            self._call = self._start_call(timesteps, sample.shape[0])
        call = self._call
        step = unet_call.step_index(timestep, timesteps, after=call.last_step)
        if step <= call.last_step:
            raise MemlensError(
                f"the UNet ran step {step} again after step {call.last_step}; the probe supports one UNet evaluation "
                "per scheduler timestep"
            )
        n_steps = len(timesteps)
        call.capture_now = step in {s % n_steps for s in self.steps}
        call.current_step = step
        call.latent_hw = (sample.shape[-2], sample.shape[-1])
        call.latent_channels = sample.shape[1]
        if call.capture_now:
            self._expect_capture(call)

    def _expect_capture(self, call: _Call) -> None:
        """At a captured step: our processors must still be installed, and every probed layer must then report."""
        replaced = self._installed.replaced_layers()
        if replaced:
            raise MemlensError(
                "the probe's attention processors were replaced during the run (e.g. by "
                f"enable_attention_slicing or set_attn_processor) on {', '.join(replaced)}; attach the probe "
                "after changing processors"
            )
        call.seen_layers = set()
        call.expect_layers = set(self.layer_names)

    def _after_unet(self, module, args, kwargs, output):
        call = self._call
        if call is None:
            return None
        if self.transformer:
            return self._after_transformer(call, output)
        diff = quantities.guidance_difference(unet_call.prediction(output), call.latent_channels)
        call.energy.append(quantities.energy(diff))
        call.steps.append(call.current_step)
        call.last_step = call.current_step
        if call.capture_now and call.seen_layers != call.expect_layers:
            missing = sorted(call.expect_layers - call.seen_layers)
            raise MemlensError(
                f"no attention was captured from {', '.join(missing)} at step {call.current_step}: their processors "
                "were bypassed or replaced during the run"
            )
        call.capture_now = False
        if call.current_step == len(call.timesteps) - 1:
            self._finish(call)
        return None

    # -- transformer calls -----------------------------------------------------------------------------------------
    def _transformer_arguments(self, args, kwargs) -> dict:
        # Bound by name: the transformers' forward signatures order their arguments differently (PixArt's timestep
        # is third, SD3's fourth), and the pipelines mix positional and keyword arguments.
        if getattr(self, "_forward_signature", None) is None:
            self._forward_signature = inspect.signature(self.unet.forward)
        return self._forward_signature.bind_partial(*args, **kwargs).arguments

    def _segments(self, segments: list) -> list:
        if self.segment is None:
            return segments[:1]
        if self.segment == "both":
            if len(segments) < 2:
                raise MemlensError(
                    f"segment='both' needs two text encoders in the sequence; this pipeline has "
                    f"{', '.join(s.name for s in segments)}"
                )
            return segments
        chosen = [s for s in segments if s.name == self.segment]
        if not chosen:
            raise MemlensError(
                f"segment={self.segment!r}: the text sequence of {type(self.pipe).__name__} holds "
                f"{', '.join(s.name for s in segments)}"
            )
        return chosen

    def _start_transformer_call(self, timesteps: torch.Tensor, batch: int, num_text: int) -> _Call:
        pipe = self.pipe
        args = self._pipeline_call_arguments()
        parameters = inspect.signature(type(pipe).__call__).parameters
        call_kwargs = {k: v for k, v in args.items() if k in parameters and k not in ("self", "num_inference_steps")}
        layout = dit_layout.cfg_layout(pipe, len(timesteps), **call_kwargs)
        if layout.mode == "none" and self.require_guidance:
            what = (
                "FLUX is guidance-distilled: it evaluates an unconditional branch only with true CFG, i.e. "
                "true_cfg_scale > 1 AND a negative prompt (negative_prompt='' works; a list of one per prompt), "
                "which doubles the transformer cost"
                if dit_layout.family_of(pipe) == "flux"
                else "this call has guidance_scale <= 1"
            )
            raise MemlensError(
                f"BrightEndingProbe: no unconditional prediction in this call, so D/LD do not exist ({what}); "
                "pass require_guidance=False to record BE maps with D/LD as NaN"
            )
        segments = self._segments(dit_layout.text_segments(pipe, num_text))
        prompt = args.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else None if prompt is None else list(prompt)
        positions: dict[str, list[int]] | None = None
        if prompts is not None:
            positions = {}
            for seg in segments:
                text = args.get(seg.prompt_argument) or prompts
                text = [text] if isinstance(text, str) else list(text)
                if len(text) != len(prompts):
                    raise MemlensError(f"{seg.prompt_argument} has {len(text)} entries for {len(prompts)} prompts")
                positions[seg.name] = dit_layout.end_token_positions(pipe, seg, text, args.get("clean_caption"))
        elif self.eos_indices is not None:
            prompts = list(self.prompts) if self.prompts is not None else [""] * len(self.eos_indices)
            if len(self.eos_indices) != len(prompts):
                raise MemlensError(f"probe has {len(prompts)} prompts but {len(self.eos_indices)} eos_indices")
        elif self.prompts is not None:
            prompts = list(self.prompts)
            positions = {seg.name: dit_layout.end_token_positions(pipe, seg, prompts) for seg in segments}
        else:
            raise MemlensError(
                "the pipeline was called without prompts (prompt_embeds?), so the probe cannot find the end token: "
                "pass prompts=[...] or eos_indices=[...] to BrightEndingProbe, or set probe.prompts before the call"
            )
        images = batch // 2 if layout.mode == "batch" else batch
        if images % len(prompts) or (layout.mode == "batch" and batch % 2):
            raise MemlensError(
                f"the transformer batch of {batch} rows does not hold {len(prompts)} prompt(s) x images per prompt "
                f"in the {layout.mode!r} guidance layout"
            )
        per_prompt = images // len(prompts)

        def per_image(values):
            return [v for v in values for _ in range(per_prompt)]

        if positions is None:
            eos = per_image(self.eos_indices)

            def weights(n: int) -> torch.Tensor:
                return token_weights(self.token, eos, n)
        else:
            eos = per_image(positions[segments[0].name])
            ends = {seg.name: per_image(positions[seg.name]) for seg in segments}

            def weights(n: int) -> torch.Tensor:
                if not isinstance(self.token, str):  # a fixed position of the whole text sequence
                    return token_weights(self.token, eos, n)
                w = torch.zeros(len(eos), n)
                for seg in segments:
                    local = [e - seg.start for e in ends[seg.name]]
                    w[:, seg.start : seg.start + seg.length] += token_weights(self.token, local, seg.length)
                return w / len(segments)

        call = _Call(timesteps, prompts, eos, per_prompt, layout.mode != "none", self.token, weights)
        call.layout = layout
        return call

    def _before_transformer(self, args, kwargs):
        bound = self._transformer_arguments(args, kwargs)
        sample, timestep = bound["hidden_states"], bound.get("timestep")
        text = bound["encoder_hidden_states"]
        timesteps = self.pipe.scheduler.timesteps
        if self._call is None or self._call.timesteps is not timesteps:
            self._call = self._start_transformer_call(timesteps, sample.shape[0], text.shape[1])
        call = self._call
        step_t = dit_layout.step_timestep(self.pipe, timestep)
        if step_t is None:
            raise MemlensError(f"{type(self.pipe).__name__} did not expose the loop's timestep; cannot tell the step")
        # Steps whose calls all ran are done; a later call of the current step is found after them.
        step = unet_call.step_index(step_t, timesteps, after=call.last_step)
        if step == call.current_step:
            call.call_in_step += 1
        elif step > call.current_step and call.last_step == call.current_step:
            call.current_step, call.call_in_step = step, 0
        else:
            raise MemlensError(
                f"the transformer ran step {step} after step {call.current_step} had "
                f"{call.call_in_step + 1} of {len(call.layout.call_roles(call.current_step))} calls"
            )
        roles = call.layout.call_roles(step)
        if call.call_in_step >= len(roles):
            raise MemlensError(
                f"the transformer ran {call.call_in_step + 1} times at step {step}; this call's guidance layout "
                f"makes {len(roles)} ({', '.join(roles)})"
            )
        role = roles[call.call_in_step]
        if (role == "cond_skip_layers") != (bound.get("skip_layers") is not None):
            raise MemlensError(f"call {call.call_in_step} of step {step} was expected to be {role!r}")
        batch = sample.shape[0]
        images = len(call.eos)
        if batch != (2 * images if role == "uncond+cond" else images):
            raise MemlensError(f"a {role!r} call of {images} images came with a batch of {batch} rows")
        call.role = role
        call.num_text = text.shape[1]
        family = dit_layout.family_of(self.unet)
        call.grid = dit_layout.image_grid(
            family, sample, getattr(self.unet.config, "patch_size", 1), img_ids=bound.get("img_ids")
        )
        rows = call.layout.conditional_rows(role, batch)
        n_steps = len(timesteps)
        call.capture_now = rows is not None and step in {s % n_steps for s in self.steps}
        call.columns.wanted = rows
        if call.capture_now:
            self._expect_capture(call)

    def _after_transformer(self, call: _Call, output):
        role = call.role
        diff = None
        if role != "cond_skip_layers" and call.layout.mode != "none":
            latent = dit_layout.latent_prediction(self.pipe, unet_call.prediction(output), call.grid)
            channels = latent.shape[1]
            call.latent_hw = (latent.shape[-2], latent.shape[-1])
            if role == "uncond+cond":
                diff = quantities.guidance_difference(latent, channels)
            elif role == "cond":
                call.pending_cond = latent
            elif role == "uncond":
                diff = quantities.paired_difference(call.pending_cond, latent, channels)
                call.pending_cond = None
        if diff is not None:
            call.energy.append(quantities.energy(diff))
        if call.capture_now and call.seen_layers != call.expect_layers:
            missing = sorted(call.expect_layers - call.seen_layers)
            raise MemlensError(
                f"no attention was captured from {', '.join(missing)} at step {call.current_step}: their processors "
                "were bypassed or replaced during the run"
            )
        call.capture_now = False
        if call.call_in_step == len(call.layout.call_roles(call.current_step)) - 1:
            call.steps.append(call.current_step)
            call.last_step = call.current_step
            if call.current_step == len(call.timesteps) - 1:
                self._finish(call)
        return None

    def _finish(self, call: _Call) -> None:
        self._call = None
        if not call.columns.sums:
            raise MemlensError(
                f"the run ended without reaching a captured step {self.steps} (it ran steps {call.steps[0]}.."
                f"{call.steps[-1]} of {len(call.timesteps)})"
            )
        if self.transformer:  # every site of a transformer sees the same token grid
            be_maps = call.columns.mean(lambda queries: call.grid)
        else:
            be_maps = call.columns.mean(lambda queries: capture.attention_grid(*call.latent_hw, queries))
        be_np = be_maps.cpu().numpy().astype(np.float32)
        # Transformer tokens each cover one p x p latent patch, so the map goes to the latent by that footprint.
        mask_resize = "patch" if self.transformer else "bilinear"
        if call.energy:
            energy = torch.stack(call.energy)  # (steps, n, H, W)
            d = quantities.magnitude(energy)
            ld = quantities.magnitude(energy, quantities.mask_to_latent(be_maps, call.latent_hw, mask_resize))
            d_np = d.T.cpu().numpy().astype(np.float32)
            ld_np = ld.T.cpu().numpy().astype(np.float32)
            energy_np = energy.transpose(0, 1).cpu().numpy().astype(np.float32) if self.keep_energy else None
        else:  # no unconditional branch and require_guidance=False: D/LD do not exist
            d_np = ld_np = np.full((be_np.shape[0], len(call.steps)), np.nan, dtype=np.float32)
            energy_np = None
        timesteps = call.timesteps.detach().cpu().numpy()[call.steps]
        for i in range(be_np.shape[0]):
            self.records.append(
                ImageRecord(
                    prompt=call.prompts[i // call.per_prompt],
                    eos_index=int(call.eos[i]),
                    be_map=be_np[i],
                    magnitude=d_np[i],
                    masked_magnitude=ld_np[i],
                    timesteps=timesteps,
                    prompt_index=i // call.per_prompt,
                    image_index=i % call.per_prompt,
                    energy=None if energy_np is None else energy_np[i],
                    mask_resize=mask_resize,
                )
            )
