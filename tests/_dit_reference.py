"""An independent eager computation of what a bright-ending probe should report on a diffusion transformer.

Nothing here wraps or replaces a processor. `CallRecorder` keeps, with plain forward (pre-)hooks, the inputs and
outputs of the transformer and of each text-attention module for every transformer call of a pipeline run. From
those, `site_attention` recomputes q and k with the module's own projections and q/k norms, applies FLUX's rotary
embedding with its own formula, and takes softmax(Q K^T / sqrt(head_dim)) over the FULL key sequence in float64
(PixArt: the text keys plus its additive mask). Returned per site call:

- ``joint``: the image-query x text-key block of those probabilities, heads averaged, (B, Ni, Nt);
- ``text_renormalised``: the same block renormalised over the text keys per head, then heads averaged (equal to a
  softmax over the text logits only);
- ``image_output`` / ``text_output``: softmax(QK^T)V pushed through the module's output projections, to be compared
  with what the module really returned (the parity that proves the recomputation is the model's attention).

`guidance_split` pairs the conditional and unconditional predictions of each denoising step per family, and
`magnitudes` gives D and LD from them. For PixArt these are epsilon predictions (first in_channels channels); for SD3
and FLUX they are flow velocities, so D_t = ||v_c - v_u||: the guidance difference of what the model predicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from memlens import dit_layout
from memlens.dit_layout import AttentionSite
from memlens.errors import MemlensError

__all__ = [
    "SiteCall",
    "TransformerCall",
    "CallRecorder",
    "SiteAttention",
    "site_attention",
    "steps_of",
    "end_token_map",
    "guidance_split",
    "unpack_flux",
    "magnitudes",
]


@dataclass
class SiteCall:
    hidden_states: torch.Tensor
    encoder_hidden_states: torch.Tensor | None
    attention_mask: torch.Tensor | None
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None
    output: object = None


@dataclass
class TransformerCall:
    index: int
    timestep: float
    hidden_states_shape: tuple[int, ...]
    num_text: int  # encoder_hidden_states.shape[1] at the transformer's input
    encoder_hidden_states: torch.Tensor
    img_ids: torch.Tensor | None
    skip_layers: list[int] | None
    output: torch.Tensor | None = None
    sites: dict[str, SiteCall] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.hidden_states_shape[0]


def _arg(args, kwargs, position: int, name: str, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else default


def _detach(x):
    if torch.is_tensor(x):
        return x.detach().clone()
    if isinstance(x, (tuple, list)):
        return type(x)(_detach(v) for v in x)
    return x


class CallRecorder:
    """Records every transformer call of a run, with the inputs/outputs of the given sites (plain hooks only)."""

    def __init__(self, transformer: torch.nn.Module, sites: list[AttentionSite]):
        self.transformer = transformer
        self.sites = sites
        self.calls: list[TransformerCall] = []
        self._hooks: list = []

    def __enter__(self) -> "CallRecorder":
        t = self.transformer
        self._hooks.append(t.register_forward_pre_hook(self._before, with_kwargs=True))
        self._hooks.append(t.register_forward_hook(self._after, with_kwargs=True))
        for site in self.sites:
            self._hooks.append(site.module.register_forward_pre_hook(self._site_before(site.name), with_kwargs=True))
            self._hooks.append(site.module.register_forward_hook(self._site_after(site.name)))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _before(self, module, args, kwargs):
        hidden = _arg(args, kwargs, 0, "hidden_states")
        text = _arg(args, kwargs, 1, "encoder_hidden_states")
        timestep = kwargs["timestep"]
        self.calls.append(
            TransformerCall(
                index=len(self.calls),
                timestep=float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep),
                hidden_states_shape=tuple(hidden.shape),
                num_text=text.shape[1],
                encoder_hidden_states=_detach(text),
                img_ids=_detach(kwargs.get("img_ids")),
                skip_layers=kwargs.get("skip_layers"),
            )
        )

    def _after(self, module, args, kwargs, output):
        out = output[0] if isinstance(output, (tuple, list)) else output.sample
        self.calls[-1].output = _detach(out)

    def _site_before(self, name):
        def hook(module, args, kwargs):
            self.calls[-1].sites[name] = SiteCall(
                hidden_states=_detach(_arg(args, kwargs, 0, "hidden_states")),
                encoder_hidden_states=_detach(_arg(args, kwargs, 1, "encoder_hidden_states")),
                attention_mask=_detach(_arg(args, kwargs, 2, "attention_mask")),
                image_rotary_emb=_detach(_arg(args, kwargs, 3, "image_rotary_emb")),
            )

        return hook

    def _site_after(self, name):
        def hook(module, args, output):
            self.calls[-1].sites[name].output = _detach(output)

        return hook


def steps_of(calls: list[TransformerCall]) -> list[list[TransformerCall]]:
    """Calls grouped into denoising steps: consecutive calls with the same timestep value belong to one step.

    Grouping by value, not by count, keeps SD3's skip-layer calls and FLUX's true-CFG calls with their step.
    """
    steps: list[list[TransformerCall]] = []
    for call in calls:
        if steps and steps[-1][0].timestep == call.timestep:
            steps[-1].append(call)
        else:
            steps.append([call])
    return steps


# -- attention -------------------------------------------------------------------------------------------------------


@dataclass
class SiteAttention:
    name: str
    kind: str
    joint: torch.Tensor  # (B, Ni, Nt) float64
    text_renormalised: torch.Tensor  # (B, Ni, Nt) float64
    image_output: torch.Tensor  # what the module returns for the image tokens, recomputed
    text_output: torch.Tensor | None  # the same for the text tokens (joint sites that keep their context)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    # (B, S, H*D) -> (B, S, H, D): both processor families split the channels head-major.
    return x.unflatten(-1, (heads, -1))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # RoPE on interleaved pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), written out here rather than taken
    # from diffusers so a mistake there would show as a parity failure. x: (B, S, H, D); cos/sin: (S, D).
    x = x.double()
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos.double()[None, :, None, :] + rotated * sin.double()[None, :, None, :]


def site_attention(site: AttentionSite, call: SiteCall, num_text: int, text_first: bool | None = None) -> SiteAttention:
    """Recompute one site's attention from its recorded inputs. `num_text` is the transformer call's text length.

    `text_first` overrides the site's layout (tests use it to show the layout is the one the model computes).
    """
    attn = site.module
    heads = attn.heads
    text_first = site.text_first if text_first is None else text_first
    with torch.no_grad():
        hs = call.hidden_states
        if site.kind == "cross":
            text = call.encoder_hidden_states
            q = _heads(attn.to_q(hs), heads)
            k_txt = _heads(attn.to_k(text), heads)
            v_txt = _heads(attn.to_v(text), heads)
            if getattr(attn, "norm_q", None) is not None:
                q, k_txt = attn.norm_q(q), attn.norm_k(k_txt)
            q, k, v = q.double(), k_txt.double(), v_txt.double()
            num_image = hs.shape[1]
            img_keys, txt_keys = slice(0, 0), slice(0, num_text)
            img_queries = slice(0, num_image)
        else:
            if site.kind == "joint":
                text = call.encoder_hidden_states
                q_i, k_i, v_i = (_heads(p(hs), heads) for p in (attn.to_q, attn.to_k, attn.to_v))
                q_t, k_t, v_t = (_heads(p(text), heads) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
                # q/k norms act on the head dimension (last), the same whichever axis holds the heads.
                if getattr(attn, "norm_q", None) is not None:
                    q_i, k_i = attn.norm_q(q_i), attn.norm_k(k_i)
                if getattr(attn, "norm_added_q", None) is not None:
                    q_t, k_t = attn.norm_added_q(q_t), attn.norm_added_k(k_t)
                first, second = ((q_t, k_t, v_t), (q_i, k_i, v_i)) if text_first else ((q_i, k_i, v_i), (q_t, k_t, v_t))
                q, k, v = (torch.cat([a, b], dim=1).double() for a, b in zip(first, second))
                num_image = hs.shape[1]
            else:  # single stream: one sequence, already [text; image]
                q, k, v = (_heads(p(hs), heads) for p in (attn.to_q, attn.to_k, attn.to_v))
                q, k = attn.norm_q(q), attn.norm_k(k)
                q, k, v = q.double(), k.double(), v.double()
                num_image = hs.shape[1] - num_text
            if call.image_rotary_emb is not None:
                cos, sin = call.image_rotary_emb
                q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            if text_first:
                img_keys, txt_keys = slice(num_text, num_text + num_image), slice(0, num_text)
            else:
                img_keys, txt_keys = slice(0, num_image), slice(num_image, num_image + num_text)
            img_queries = img_keys
        # (B, S, H, D) -> (B, H, S, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        # Every processor here calls SDPA without a scale, i.e. 1/sqrt(head_dim) (attn.scale is the same number
        # unless scale_qk=False, which no family sets).
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if call.attention_mask is not None:
            # PixArt: (B, 1, Nt) additive bias (1 - mask) * -10000 (models/transformers/pixart_transformer_2d.py:297).
            scores = scores + call.attention_mask.double()[:, None, :, :]
        probs = scores.softmax(dim=-1)
        block = probs[:, :, img_queries, txt_keys]  # (B, H, Ni, Nt)
        joint = block.mean(dim=1)
        renorm = (block / block.sum(dim=-1, keepdim=True)).mean(dim=1)
        out = (probs @ v).transpose(1, 2).flatten(2)  # (B, S, H*D)
        dtype = hs.dtype
        image_out = out[:, img_queries].to(dtype)
        text_out = None
        if site.kind == "cross":
            image_out = attn.to_out[1](attn.to_out[0](image_out))
        elif site.kind == "joint":
            image_out = attn.to_out[0](image_out)
            text_out = out[:, txt_keys].to(dtype)
            # A context_pre_only block (SD3's last) returns its text part without the output projection.
            if not site.context_pre_only:
                text_out = attn.to_add_out(text_out)
        else:
            # Single stream is pre_only: the processor returns the raw attention output for the whole sequence.
            text_out = out[:, txt_keys].to(dtype)
    return SiteAttention(site.name, site.kind, joint, renorm, image_out, text_out)


def module_outputs(site: AttentionSite, call: SiteCall, num_text: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(image output, text output) of what the module really returned, split by the site's layout."""
    out = call.output
    if site.kind == "cross":
        return out, None
    if site.kind == "joint":
        return out[0], out[1]
    return out[:, num_text:], out[:, :num_text]


def end_token_map(attention: torch.Tensor, positions: list[int], grid: tuple[int, int]) -> torch.Tensor:
    """(B, h, w): for each row b, the column `positions[b]` of a (B, Ni, Nt) attention block on the token grid."""
    h, w = grid
    if attention.shape[1] != h * w:
        raise MemlensError(f"{attention.shape[1]} image tokens do not fill a {h}x{w} grid")
    index = torch.as_tensor(positions, device=attention.device)
    cols = attention[torch.arange(attention.shape[0], device=attention.device), :, index]  # (B, Ni)
    return cols.reshape(-1, h, w)


# -- guidance and magnitudes -----------------------------------------------------------------------------------------


def unpack_flux(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, 4C) packed FLUX output -> (B, C, 2h, 2w) latent. Features are ordered (c, dy, dx), tokens
    row-major (pipelines/flux/pipeline_flux.py:522-528 packs with permute(0, 2, 4, 1, 3, 5))."""
    b, n, f = tokens.shape
    h, w = grid
    c = f // 4
    return tokens.view(b, h, w, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 2 * h, 2 * w)


def guidance_split(pipe, step_calls: list[TransformerCall], cfg: dit_layout.CFGLayout):
    """(cond, uncond) predictions of one step, guided channels only, as (n, C, H, W) latents."""
    family = dit_layout.family_of(pipe)
    pred = dit_layout.prediction_layout(pipe)
    if cfg.mode == "none":
        raise MemlensError("this run made no unconditional prediction, so D and LD do not exist for it")
    if cfg.mode == "batch":
        # The CFG call is the step's first; skip-layer calls (batch n, skip_layers set) come after it.
        call = step_calls[0]
        uncond, cond = dit_layout.guided_prediction(call.output, pred).chunk(2)
    else:
        cond_call, uncond_call = (step_calls[0], step_calls[1]) if cfg.cond_first else (step_calls[1], step_calls[0])
        cond = dit_layout.guided_prediction(cond_call.output, pred)
        uncond = dit_layout.guided_prediction(uncond_call.output, pred)
        call = cond_call
    if pred.packed:
        grid = dit_layout.image_grid(family, None, 1, img_ids=call.img_ids)
        cond, uncond = unpack_flux(cond, grid), unpack_flux(uncond, grid)
    return cond, uncond


def magnitudes(pipe, calls: list[TransformerCall], cfg: dit_layout.CFGLayout, mask: torch.Tensor, footprint: int,
               mask_upsample: str = "patch"):
    """D_t and LD_t for every step: (n, steps) each, float64.

    D_t = ||pred_c - pred_u||_2 over guided channels and latent pixels, per image. LD_t = ||(pred_c - pred_u) * m||_2
    / mean(m), with m the (n, h, w) token-grid mask brought to latent resolution: ``"patch"`` repeats each token
    over the footprint x footprint latent pixels it was made from (the transformer's exact token footprint),
    ``"bilinear"`` interpolates as the UNet probe does.
    """
    d_all, ld_all = [], []
    for step_calls in steps_of(calls):
        cond, uncond = guidance_split(pipe, step_calls, cfg)
        diff = (cond - uncond).double()
        energy = diff.pow(2).sum(dim=1)  # (n, H, W)
        if mask_upsample == "patch":
            m = mask.double().repeat_interleave(footprint, dim=1).repeat_interleave(footprint, dim=2)
        else:
            m = F.interpolate(mask.double()[:, None], size=energy.shape[-2:], mode="bilinear", align_corners=False)
            m = m[:, 0]
        d_all.append(energy.flatten(1).sum(1).sqrt())
        ld_all.append((energy * m.pow(2)).flatten(1).sum(1).sqrt() / m.flatten(1).mean(1))
    return torch.stack(d_all, dim=1), torch.stack(ld_all, dim=1)
