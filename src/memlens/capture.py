"""The only module that touches diffusers' attention internals: which cross-attention layers to read, and the one
processor memlens installs on them.

`CaptureProcessor` wraps whatever processor a layer already has. It always lets that processor compute the layer's
output, so images are bit-identical with and without capture; when a sink asks for rows of the batch, it
additionally computes their attention probabilities (softmax(QK^T * scale) in float32, with the attention mask,
averaged over heads) and hands them to the sink. Sinks decide what to keep:
- `TokenColumns`: the attention on one token (or weighted tokens) per layer, as the probe and the training filter
  read it; O(queries) per image.
- `AllTokens`: every token position, for the analysis of which token carries the signal.
Nothing else in the UNet changes.
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


def _outer_blocks(unet: torch.nn.Module, layers: list[CaptureLayer]) -> list[str]:
    # A UNet mirrors its encoder: the last up block with cross-attention runs at the resolution of the first down
    # block with cross-attention (SD1/SD2: up_blocks.3 and down_blocks.0; SDXL: up_blocks.1 and down_blocks.1).
    first = _first_down_block_with_cross_attention(unet, layers)
    ups = [i for i in range(len(getattr(unet, "up_blocks", [])))
           if any(layer.name.startswith(f"up_blocks.{i}.") for layer in layers)]
    if first is None or not ups:
        raise MemlensError(f"layers='outer' needs cross-attention in both a down and an up block of "
                           f"{type(unet).__name__}")
    return [first, f"up_blocks.{ups[-1]}"]


def select_layers(unet: torch.nn.Module, layers: list[str] | str | None = None) -> list[CaptureLayer]:
    """The cross-attention layers to read.

    `layers` is None (the paper's default: every cross-attention layer of the first down block that has any),
    ``"outer"`` (that block and the last up block with cross-attention: both ends of the UNet at one resolution), or
    a list of module names or name prefixes such as ``"down_blocks.1"`` or ``"up_blocks.1.attentions.0"``.
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
    elif layers == "outer":
        layers = _outer_blocks(unet, available)
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


class AttentionSink:
    """What reads attention from a `CaptureProcessor`. A sink says, at each layer call, which batch rows it wants
    (None: nothing now), and receives their head-averaged probabilities."""

    def rows(self) -> slice | None:  # pragma: no cover - interface
        raise NotImplementedError

    def add(self, layer: str, probs: torch.Tensor) -> None:  # pragma: no cover - interface
        """`probs`: float32 (rows, queries, tokens), softmax over the tokens, averaged over heads."""
        raise NotImplementedError


def attention_probs(
    attn: torch.nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-averaged attention probabilities of each query over the text tokens: float32 (batch, queries, tokens).

    Mirrors the projections of diffusers' `AttnProcessor` (group norm, cross norm, per-head q/k norms, the attention
    mask as an additive bias) and computes softmax(Q K^T * scale) explicitly in float32, because fused kernels never
    expose the probabilities and half-precision softmax would round the small end-token values.
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
    return scores.softmax(dim=-1).mean(dim=1)


def token_attention(probs: torch.Tensor, token_weights: torch.Tensor) -> torch.Tensor:
    """Attention of each query on the weighted tokens of its sample: (batch, queries, tokens) x (batch, tokens) ->
    (batch, queries). A one-hot row of `token_weights` reads one token's column."""
    return torch.bmm(probs, token_weights.to(probs.device, torch.float32)[:, :, None]).squeeze(2)


def attention_grid(height: int, width: int, queries: int) -> tuple[int, int]:
    """The (h, w) grid of `queries` attention positions over a height x width latent."""
    # UNet downsamplers are stride-2 convs with padding 1: each level maps n to ceil(n / 2).
    h, w = height, width
    while h * w > queries and h > 1:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != queries:
        raise MemlensError(f"cannot place {queries} attention queries on a {height}x{width} latent")
    return h, w


class TokenColumns(AttentionSink):
    """The one-token sink: per layer, the attention on weighted tokens (`weights(num_tokens)` -> (rows, tokens)),
    summed over the calls captured while `rows` is set; `mean` averages them into one (rows, queries) map."""

    def __init__(self, weights: Callable[[int], torch.Tensor], rows: slice | None = None):
        self.weights = weights
        self.wanted = rows
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def rows(self) -> slice | None:
        return self.wanted

    def add(self, layer: str, probs: torch.Tensor) -> None:
        column = token_attention(probs, self.weights(probs.shape[2]))
        if layer in self.sums:
            self.sums[layer] += column
            self.counts[layer] += 1
        else:
            self.sums[layer] = column
            self.counts[layer] = 1

    def mean(self) -> torch.Tensor:
        """(rows, queries): the mean over captured calls of each layer, then over the layers."""
        return torch.stack([self.sums[name] / self.counts[name] for name in self.sums]).mean(dim=0)


class AllTokens(AttentionSink):
    """The all-token sink: per layer, the probabilities over every token (rows, queries, tokens) of each captured
    call, moved to the CPU (they are large; the one-token sink is what the probe uses)."""

    def __init__(self, rows: slice | None = None):
        self.wanted = rows
        self.store: dict[str, list[torch.Tensor]] = {}

    def rows(self) -> slice | None:
        return self.wanted

    def add(self, layer: str, probs: torch.Tensor) -> None:
        self.store.setdefault(layer, []).append(probs.cpu())


class CaptureProcessor:
    """Wraps a layer's processor; computes attention probabilities for the sinks that ask, and never changes the
    output. Several sinks share one processor (the probe and the analysis on the same run), and rows asked by more
    than one sink are computed once."""

    def __init__(self, layer: str, original: Callable):
        self.layer = layer
        self.original = original
        self.sinks: list[AttentionSink] = []
        # diffusers' Attention.forward drops keyword arguments that the processor's __call__ does not name, so expose
        # the wrapped processor's signature; otherwise e.g. IP-Adapter's `ip_adapter_masks` would be silently lost.
        original_call = original.__call__
        self.__call__ = _with_signature(self._call, inspect.signature(original_call))

    def _call(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is not None and self.sinks:
            text_states = encoder_hidden_states[0] if isinstance(encoder_hidden_states, tuple) else encoder_hidden_states
            computed: dict[tuple, torch.Tensor] = {}
            for sink in self.sinks:
                rows = sink.rows()
                if rows is None:
                    continue
                key = (rows.start, rows.stop, rows.step)
                if key not in computed:
                    with torch.no_grad():
                        computed[key] = attention_probs(
                            attn,
                            hidden_states[rows],
                            text_states[rows],
                            None if attention_mask is None else attention_mask[rows],
                        )
                sink.add(self.layer, computed[key])
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
class Attachment:
    """One sink attached to some layers by `attach`; `remove` detaches it and, once a layer's processor has no sinks
    left, puts back exactly the processor that was there."""

    layers: list[CaptureLayer]
    sink: AttentionSink
    processors: dict[str, CaptureProcessor]

    def replaced_layers(self) -> list[str]:
        """Layers whose capture processor was swapped out by someone else since attaching."""
        return [l.name for l in self.layers if l.module.processor is not self.processors[l.name]]

    def remove(self) -> None:
        for layer in self.layers:
            proc = self.processors[layer.name]
            if self.sink in proc.sinks:
                proc.sinks.remove(self.sink)
            # Only undo our own change: a processor the user set while attached is theirs to keep.
            if not proc.sinks and layer.module.processor is proc:
                layer.module.set_processor(proc.original)
        self.processors = {}
        self.layers = []


def attach(layers: list[CaptureLayer], sink: AttentionSink) -> Attachment:
    """Add `sink` to the capture processor of each layer, wrapping the layer's processor first if it has none."""
    processors = {}
    for layer in layers:
        current = layer.module.processor
        if not isinstance(current, CaptureProcessor):
            current = CaptureProcessor(layer.name, current)
            layer.module.set_processor(current)
        current.sinks.append(sink)
        processors[layer.name] = current
    return Attachment(list(layers), sink, processors)
