"""`BrightEndingProbe`: attach to a stock diffusers pipeline and record, in the generation the user runs anyway,
each image's bright-ending map and its per-step noise magnitudes D and LD.

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
LD do not exist in that pass and the probe raises instead of inventing them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from memlens import capture, quantities, unet_call
from memlens.errors import MemlensError

__all__ = ["BrightEndingProbe", "ImageRecord", "TOKEN_CHOICES", "token_weights"]


@dataclass
class ImageRecord:
    """What the probe keeps of one generated image. O(h*w + steps) memory."""

    prompt: str
    eos_index: int
    be_map: np.ndarray  # float32 (h, w): attention on the chosen token, captured layers' resolution
    magnitude: np.ndarray  # float32 (steps,): D_t
    masked_magnitude: np.ndarray  # float32 (steps,): LD_t with mask = be_map
    timesteps: np.ndarray  # the scheduler timesteps of those steps
    prompt_index: int = 0  # position of the prompt within its pipeline call
    image_index: int = 0  # position of the image among that prompt's images
    energy: np.ndarray | None = field(default=None, repr=False)  # float32 (steps, H, W) when keep_energy=True

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
        ld = quantities.magnitude(e, quantities.mask_to_latent(m, self.energy.shape[-2:]))
        return ld[:, 0].numpy().astype(np.float32)


TOKEN_CHOICES = ("eos", "padding", "eos+padding")


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
                 token: str | int):
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

    def token_weights(self, num_tokens: int) -> torch.Tensor:
        if self.weights is None or self.weights.shape[1] != num_tokens:
            self.weights = token_weights(self.token, self.eos, num_tokens)
        return self.weights


class BrightEndingProbe(capture.AttentionSink):
    """Records bright-ending maps and noise magnitudes from ordinary ``pipe(...)`` calls.

    Args:
        pipe: a diffusers text-to-image pipeline whose UNet has cross-attention (StableDiffusionPipeline,
            StableDiffusionXLPipeline, or any pipeline that calls its UNet the same way).
        layers: cross-attention layers to read, as module names or prefixes; default: every ``attn2`` of the first
            down block that has cross-attention (``down_blocks.0`` in SD1/SD2, ``down_blocks.1`` in SDXL).
            ``"outer"``: that block and the last up block with cross-attention, the same attention resolution at
            both ends of the UNet (``down_blocks.0`` + ``up_blocks.3`` in SD1/SD2); see docs/organism.md.
        steps: step indices at which attention is read, negative counting from the end; maps of several steps are
            averaged. Default: the last step, as in the paper.
        token: ``"eos"`` (the first EOS of the padded ids, the paper's end token), ``"padding"`` (the mean attention
            over every position after the end token, the padding), ``"eos+padding"`` (the mean over the end token
            and the padding after it), or a fixed token position.
        prompts / eos_indices: needed only when the pipeline is called with ``prompt_embeds`` instead of prompts;
            they apply to every such call until changed (set ``probe.prompts`` / ``probe.eos_indices``).
        keep_energy: keep each image's per-step energy maps (steps x H x W) so that other masks can be applied later
            with `ImageRecord.masked_magnitude_with`. Off by default, to keep records small.
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
    ):
        self.pipe = pipe
        unet = getattr(pipe, "unet", None)
        if unet is None:
            raise MemlensError(f"{type(pipe).__name__} has no `unet`; the probe attaches to UNet-based pipelines")
        self.unet = unet
        self.layers = capture.select_layers(unet, layers)
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

    def _finish(self, call: _Call) -> None:
        self._call = None
        if not call.columns.sums:
            raise MemlensError(
                f"the run ended without reaching a captured step {self.steps} (it ran steps {call.steps[0]}.."
                f"{call.steps[-1]} of {len(call.timesteps)})"
            )
        maps = call.columns.mean()
        h, w = capture.attention_grid(*call.latent_hw, maps.shape[1])
        be_maps = maps.view(-1, h, w)
        energy = torch.stack(call.energy)  # (steps, n, H, W)
        d = quantities.magnitude(energy)
        ld = quantities.magnitude(energy, quantities.mask_to_latent(be_maps, call.latent_hw))
        be_np = be_maps.cpu().numpy().astype(np.float32)
        d_np = d.T.cpu().numpy().astype(np.float32)
        ld_np = ld.T.cpu().numpy().astype(np.float32)
        energy_np = energy.transpose(0, 1).cpu().numpy().astype(np.float32) if self.keep_energy else None
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
                )
            )
