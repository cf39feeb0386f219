"""The only module that touches diffusers internals: which cross-attention layers to read, and the processor that
reads them.

`CaptureProcessor` wraps whatever processor a layer already has. It always lets that processor compute the layer's
output, so images are bit-identical with and without the probe; at the captured steps only, it additionally
computes the attention probabilities of the conditional rows (softmax(QK^T * scale) in float32) and hands the chosen
token's column, averaged over heads, to a sink. Nothing else in the UNet changes.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from memlens.errors import MemlensError


@dataclass(frozen=True)
class CaptureLayer:
    name: str  # module path inside the UNet, e.g. "down_blocks.0.attentions.1.transformer_blocks.0.attn2"
    module: torch.nn.Module


def cross_attention_layers(unet: torch.nn.Module) -> list[CaptureLayer]:
    """Every cross-attention module of the UNet, in module order."""
    layers = []
    for name, module in unet.named_modules():
        if getattr(module, "is_cross_attention", False) and hasattr(module, "set_processor"):
            layers.append(CaptureLayer(name, module))
    return layers


def _first_down_block_with_cross_attention(unet: torch.nn.Module, layers: list[CaptureLayer]) -> str | None:
    # The paper reads the highest-resolution cross-attention of the encoder: down_blocks.0 in SD1/SD2, but
    # down_blocks.1 in SDXL, whose first block has no attention.
    for i in range(len(getattr(unet, "down_blocks", []))):
        prefix = f"down_blocks.{i}."
        if any(layer.name.startswith(prefix) for layer in layers):
            return f"down_blocks.{i}"
    return None


def select_layers(unet: torch.nn.Module, layers: list[str] | str | None = None) -> list[CaptureLayer]:
    """The cross-attention layers to read.

    `layers` is None (the paper's default: every cross-attention layer of the first down block that has any), or a
    list of module names or name prefixes such as ``"down_blocks.1"`` or ``"up_blocks.1.attentions.0"``.
    """
    available = cross_attention_layers(unet)
    model_name = type(unet).__name__
    if not available:
        raise MemlensError(
            f"{model_name} has no cross-attention layers (no Attention module with is_cross_attention=True); "
            "the bright-ending probe needs a text-conditioned UNet"
        )
    if layers is None:
        block = _first_down_block_with_cross_attention(unet, available)
        layers = [block] if block is not None else [available[0].name]
    elif isinstance(layers, str):
        layers = [layers]
    chosen: list[CaptureLayer] = []
    for wanted in layers:
        matched = [l for l in available if l.name == wanted or l.name.startswith(wanted.rstrip(".") + ".")]
        if not matched:
            names = ", ".join(l.name for l in available)
            raise MemlensError(f"layer {wanted!r} matches no cross-attention layer of {model_name}; available: {names}")
        chosen.extend(l for l in matched if l not in chosen)
    return chosen


class CaptureSink:
    """What the processors report to; implemented by the probe."""

    def wants_attention(self) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def conditional_rows(self) -> slice:  # pragma: no cover - interface
        raise NotImplementedError

    def token_weights(self, num_tokens: int) -> torch.Tensor:  # pragma: no cover - interface
        """(batch, num_tokens) weights over text tokens for each conditional row; a one-hot selects one token."""
        raise NotImplementedError

    def add_attention(self, layer: str, column: torch.Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def token_attention(
    attn: torch.nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    token_weights: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-averaged attention probability of each query on the weighted tokens of its sample: (batch, queries).

    `token_weights` is (batch, tokens); a one-hot row reads one token's column. Computed in float32.

    Mirrors the projections of diffusers' `AttnProcessor` (group norm, cross norm, per-head q/k norms) and computes
    softmax(Q K^T * scale) explicitly, because fused kernels never expose the probabilities.
    """
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if getattr(attn, "group_norm", None) is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if getattr(attn, "norm_cross", None):
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    query = attn.to_q(hidden_states)
    key = attn.to_k(encoder_hidden_states)
    batch, heads = query.shape[0], attn.heads
    query = query.view(batch, -1, heads, query.shape[-1] // heads).transpose(1, 2)
    key = key.view(batch, -1, heads, key.shape[-1] // heads).transpose(1, 2)
    if getattr(attn, "norm_q", None) is not None:
        query = attn.norm_q(query)
    if getattr(attn, "norm_k", None) is not None:
        key = attn.norm_k(key)
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale
    if attention_mask is not None:
        mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
        scores = scores + mask.view(batch, heads, -1, key.shape[2]).float()
    probs = scores.softmax(dim=-1).mean(dim=1)  # (batch, queries, tokens)
    return torch.bmm(probs, token_weights.to(probs.device, torch.float32)[:, :, None]).squeeze(2)


class CaptureProcessor:
    """Wraps a layer's processor; reads attention probabilities when the sink asks, and never changes the output."""

    def __init__(self, layer: str, original: Callable, sink: CaptureSink):
        self.layer = layer
        self.original = original
        self.sink = sink
        # diffusers' Attention.forward drops keyword arguments that the processor's __call__ does not name, so expose
        # the wrapped processor's signature; otherwise e.g. IP-Adapter's `ip_adapter_masks` would be silently lost.
        original_call = original.__call__
        self.__call__ = _with_signature(self._call, inspect.signature(original_call))

    def _call(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is not None and self.sink.wants_attention():
            text_states = encoder_hidden_states[0] if isinstance(encoder_hidden_states, tuple) else encoder_hidden_states
            rows = self.sink.conditional_rows()
            with torch.no_grad():
                column = token_attention(
                    attn,
                    hidden_states[rows],
                    text_states[rows],
                    self.sink.token_weights(text_states.shape[1]),
                    None if attention_mask is None else attention_mask[rows],
                )
            self.sink.add_attention(self.layer, column)
        return self.original(
            attn, hidden_states, *args, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs
        )

    # `Attention` calls `self.processor(...)`, which looks __call__ up on the type, not the instance.
    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)


def _with_signature(fn: Callable, signature: inspect.Signature) -> Callable:
    def call(*args, **kwargs):
        return fn(*args, **kwargs)

    call.__signature__ = signature
    return call


@dataclass
class InstalledCapture:
    """Processors installed by `install`; `remove` puts back exactly what was there."""

    layers: list[CaptureLayer]
    originals: dict[str, Callable]
    processors: dict[str, CaptureProcessor]

    def replaced_layers(self) -> list[str]:
        """Layers whose probe processor was swapped out by someone else since installation."""
        return [l.name for l in self.layers if l.module.processor is not self.processors[l.name]]

    def remove(self) -> None:
        for layer in self.layers:
            # Only undo our own change: a processor the user set while the probe was attached is theirs to keep.
            if layer.module.processor is self.processors[layer.name]:
                layer.module.set_processor(self.originals[layer.name])


def install(layers: list[CaptureLayer], sink: CaptureSink) -> InstalledCapture:
    originals, processors = {}, {}
    for layer in layers:
        current = layer.module.processor
        if isinstance(current, CaptureProcessor):
            raise MemlensError(f"layer {layer.name} already carries a BrightEndingProbe; nest probes on copies only")
        originals[layer.name] = current
        processors[layer.name] = CaptureProcessor(layer.name, current, sink)
        layer.module.set_processor(processors[layer.name])
    return InstalledCapture(layers, originals, processors)
