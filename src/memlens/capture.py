"""The only module that touches diffusers' attention internals: which text-attention layers to read, and the one
processor memlens installs on them.

`CaptureProcessor` wraps whatever processor a layer already has. It always lets that processor compute the layer's
output, with the arguments exactly as it received them, so images are bit-identical with and without capture; when
a sink asks for rows of the batch, it additionally computes their image-to-text attention probabilities (float32,
averaged over heads) and hands them to the sink. Three kinds of layer (`CaptureLayer.kind`):
- ``"cross"``: UNet and PixArt `attn2`: softmax(QK^T * scale) over the text keys, with the attention mask;
- ``"joint"``: SD3 and FLUX double-stream attention: image and text projected separately, one softmax over both;
- ``"single"``: FLUX single-stream attention: one sequence [text ; image]; the text length comes from the sink.
For joint and single layers the sink chooses the normalisation (`AttentionSink.normalisation`):
``"text_renormalised"`` (softmax over the text logits only, the quantity cross-attention layers give) or ``"joint"``
(the raw probability of the softmax over image and text keys). Sinks decide what to keep:
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


NORMALISATIONS = ("text_renormalised", "joint")


@dataclass(frozen=True)
class CaptureLayer:
    name: str  # module path inside the denoiser, e.g. "down_blocks.0.attentions.1.transformer_blocks.0.attn2"
    module: torch.nn.Module
    kind: str = "cross"  # "cross", "joint" or "single" (see the module docstring)
    text_first: bool = True  # joint/single: whether text keys precede image keys in the module's sequence


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


def transformer_layers(transformer: torch.nn.Module) -> list[CaptureLayer]:
    """Every attention module of a diffusion transformer whose image queries see text keys, in module order."""
    from memlens import dit_layout

    return [
        CaptureLayer(site.name, site.module, site.kind, site.text_first)
        for site in dit_layout.text_attention_sites(transformer)
    ]


def is_transformer(model: torch.nn.Module) -> bool:
    from memlens import dit_layout

    try:
        dit_layout.family_of(model)
    except MemlensError:
        return False
    return True


def select_layers(unet: torch.nn.Module, layers: list[str] | str | None = None) -> list[CaptureLayer]:
    """The text-attention layers to read.

    `layers` is None, ``"outer"`` (UNets: the first down block with cross-attention and the last up block with
    cross-attention, both ends of the UNet at one resolution), ``"all"`` (every text-attention layer; layers of
    several resolutions are combined on the finest grid, see `on_one_grid`) or a list of module names or name prefixes such as
    ``"down_blocks.1"``, ``"up_blocks.1.attentions.0"`` or ``"single_transformer_blocks"``. The default for a UNet is
    the paper's: every cross-attention layer of the first down block that has any. For a diffusion transformer it is
    every text-attention site (provisional: no measurement yet says which blocks localise copying; docs/probe.md).
    """
    transformer = is_transformer(unet)
    available = transformer_layers(unet) if transformer else cross_attention_layers(unet)
    model_name = type(unet).__name__
    if not available:
        raise MemlensError(
            f"{model_name} has no cross-attention layers (no Attention module with is_cross_attention=True); "
            "the bright-ending probe needs a text-conditioned UNet"
        )
    if (layers is None and transformer) or layers == "all":
        return available
    if layers is None:
        block = _first_down_block_with_cross_attention(unet, available)
        layers = [block] if block is not None else [available[0].name]
    elif layers == "outer":
        if transformer:
            raise MemlensError("layers='outer' names two UNet blocks; a diffusion transformer has none")
        layers = _outer_blocks(unet, available)
    elif isinstance(layers, str):
        layers = [layers]
    chosen: list[CaptureLayer] = []
    for wanted in layers:
        matched = [l for l in available if l.name == wanted or l.name.startswith(wanted.rstrip(".") + ".")]
        if not matched:
            names = ", ".join(l.name for l in available)
            what = "text-attention" if transformer else "cross-attention"
            raise MemlensError(f"layer {wanted!r} matches no {what} layer of {model_name}; available: {names}")
        chosen.extend(l for l in matched if l not in chosen)
    return chosen


class AttentionSink:
    """What reads attention from a `CaptureProcessor`. A sink says, at each layer call, which batch rows it wants
    (None: nothing now), and receives their head-averaged probabilities."""

    # How joint/single layers normalise the image-query x text-key block (cross layers have one normalisation).
    normalisation = "text_renormalised"

    def rows(self) -> slice | None:  # pragma: no cover - interface
        raise NotImplementedError

    def add(self, layer: str, probs: torch.Tensor) -> None:  # pragma: no cover - interface
        """`probs`: float32 (rows, image queries, text tokens), averaged over heads."""
        raise NotImplementedError

    def text_length(self) -> int | None:
        """The text tokens of the current transformer call; single-stream layers receive text and image as one
        sequence and cannot tell them apart without it."""
        return None


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


def joint_attention_probs(
    attn: torch.nn.Module,
    layer: CaptureLayer,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    image_rotary_emb,
    num_text: int | None,
    normalisation: str = "text_renormalised",
) -> torch.Tensor:
    """Head-averaged image-query x text-key probabilities of a joint or single-stream layer: float32
    (batch, image queries, text tokens).

    Recomputes q and k as SD3's `JointAttnProcessor2_0` and FLUX's `FluxAttnProcessor` do (separate image and added
    text projections for joint layers, one projection of the whole sequence for single-stream ones, q/k norms, then
    RoPE on the positions the tokens hold in the concatenated sequence), from the unfused projections, which
    `fuse_qkv_projections` keeps with the same weights. ``"text_renormalised"`` needs only the image x text logits;
    ``"joint"`` also computes every image x image logit, for the row's log-sum-exp over all keys.
    """
    heads = attn.heads

    def split(x):  # (B, S, H*D) -> (B, S, H, D); both processors split channels head-major
        return x.unflatten(-1, (heads, -1))

    if layer.kind == "joint":
        num_text = encoder_hidden_states.shape[1]
        num_image = hidden_states.shape[1]
        q_img, k_img = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states))
        k_txt = split(attn.add_k_proj(encoder_hidden_states))
        if getattr(attn, "norm_q", None) is not None:
            q_img, k_img = attn.norm_q(q_img), attn.norm_k(k_img)
        if getattr(attn, "norm_added_k", None) is not None:
            k_txt = attn.norm_added_k(k_txt)
    else:
        if num_text is None:
            raise MemlensError(f"single-stream layer {layer.name}: the sink did not give the text length")
        num_image = hidden_states.shape[1] - num_text
        q, k = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states))
        if getattr(attn, "norm_q", None) is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        text, image = (slice(0, num_text), slice(num_text, None)) if layer.text_first else (
            slice(num_image, None), slice(0, num_image))
        q_img, k_img, k_txt = q[:, image], k[:, image], k[:, text]
    q_img, k_img, k_txt = q_img.float(), k_img.float(), k_txt.float()
    if image_rotary_emb is not None:
        from diffusers.models.embeddings import apply_rotary_emb

        # The rotary table covers the concatenated sequence; each part is rotated by its own rows of it.
        cos, sin = image_rotary_emb
        text_pos, image_pos = (slice(0, num_text), slice(num_text, num_text + num_image)) if layer.text_first else (
            slice(num_image, num_image + num_text), slice(0, num_image))
        rotate = lambda x, pos: apply_rotary_emb(x, (cos[pos], sin[pos]), sequence_dim=1)  # noqa: E731
        q_img, k_img, k_txt = rotate(q_img, image_pos), rotate(k_img, image_pos), rotate(k_txt, text_pos)
    # Both processors call SDPA without a scale, i.e. 1/sqrt(head_dim).
    scale = q_img.shape[-1] ** -0.5
    text_logits = torch.einsum("bqhd,bkhd->bhqk", q_img, k_txt) * scale
    if normalisation == "text_renormalised":
        return text_logits.softmax(dim=-1).mean(dim=1)
    if normalisation != "joint":
        raise MemlensError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    image_logits = torch.einsum("bqhd,bkhd->bhqk", q_img, k_img) * scale
    norm = torch.logsumexp(torch.cat([image_logits, text_logits], dim=-1), dim=-1, keepdim=True)
    return (text_logits - norm).exp().mean(dim=1)


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


def on_one_grid(per_layer: list[torch.Tensor], grid_of: Callable[[int], tuple[int, int]]) -> torch.Tensor:
    """Layer maps that may live on grids of different sizes, (rows, queries_l, *extra) each, combined into one
    (rows, h, w, *extra) on the finest grid among them.

    `grid_of(queries)` gives a layer's (h, w). Coarser maps are brought to the finest grid by bilinear interpolation
    with align_corners=False (the operation `memlens.maps.upsample` uses to put a map over the image, so combining
    first and upsampling after equals upsampling each layer and then combining). Each layer is weighted by its
    number of queries: every attention query counts once, so layers of one grid get the plain mean, and a 2x2
    bottleneck, whose four cells say little about where a patch is, cannot outvote a 64x64 layer (on the organism
    the equal-weight mean over every block lost 0.05-0.2 pixel AUROC to this weighting; docs/organism.md)."""
    import torch.nn.functional as F

    grids = [grid_of(m.shape[1]) for m in per_layer]
    h, w = max(grids, key=lambda g: g[0] * g[1])
    total, weight = None, 0
    for m, (gh, gw) in zip(per_layer, grids):
        extra = m.shape[2:]
        x = m.reshape(m.shape[0], gh, gw, -1).permute(0, 3, 1, 2)  # (rows, channels, gh, gw)
        if (gh, gw) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        x = x.permute(0, 2, 3, 1).reshape(m.shape[0], h, w, *extra) * (gh * gw)
        total = x if total is None else total + x
        weight += gh * gw
    return total / weight


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

    def mean(self, grid_of: Callable[[int], tuple[int, int]]) -> torch.Tensor:
        """(rows, h, w): the mean over captured calls of each layer, then over the layers, on the finest of their
        grids (`on_one_grid`; `grid_of(queries)` gives a layer's (h, w))."""
        return on_one_grid([self.sums[name] / self.counts[name] for name in self.sums], grid_of)


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

    def __init__(self, layer: str | CaptureLayer, original: Callable):
        if isinstance(layer, str):
            layer = CaptureLayer(layer, None)
        self.layer = layer.name
        self.site = layer
        self.original = original
        self.sinks: list[AttentionSink] = []
        # diffusers' Attention.forward drops keyword arguments that the processor's __call__ does not name, so expose
        # the wrapped processor's signature; otherwise e.g. IP-Adapter's `ip_adapter_masks` would be silently lost.
        signature = inspect.signature(original.__call__)
        self.__call__ = _with_signature(self._call, signature)
        # Where each argument sits when passed positionally: FluxAttention passes image_rotary_emb fifth.
        self._positions = {
            p.name: i
            for i, p in enumerate(signature.parameters.values())
            if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        }

    def _argument(self, name: str, args: tuple, kwargs: dict):
        if name in kwargs:
            return kwargs[name]
        i = self._positions.get(name)
        return args[i] if i is not None and i < len(args) else None

    def _call(self, *args, **kwargs):
        # args = (attn, hidden_states, ...) exactly as the module passed them; the original gets them unchanged.
        if self.sinks:
            self._capture(args, kwargs)
        return self.original(*args, **kwargs)

    def _capture(self, args: tuple, kwargs: dict) -> None:
        attn = args[0]
        hidden_states = self._argument("hidden_states", args, kwargs)
        encoder_hidden_states = self._argument("encoder_hidden_states", args, kwargs)
        kind = self.site.kind
        if kind != "single" and encoder_hidden_states is None:
            return
        text_states = encoder_hidden_states[0] if isinstance(encoder_hidden_states, tuple) else encoder_hidden_states
        computed: dict[tuple, torch.Tensor] = {}
        for sink in self.sinks:
            rows = sink.rows()
            if rows is None:
                continue
            if kind == "cross":
                key = (rows.start, rows.stop, rows.step)
            else:
                num_text = sink.text_length() if kind == "single" else None
                key = (rows.start, rows.stop, rows.step, sink.normalisation, num_text)
            if key not in computed:
                with torch.no_grad():
                    if kind == "cross":
                        attention_mask = self._argument("attention_mask", args, kwargs)
                        computed[key] = attention_probs(
                            attn,
                            hidden_states[rows],
                            text_states[rows],
                            None if attention_mask is None else attention_mask[rows],
                        )
                    else:
                        computed[key] = joint_attention_probs(
                            attn,
                            self.site,
                            hidden_states[rows],
                            None if text_states is None else text_states[rows],
                            self._argument("image_rotary_emb", args, kwargs),
                            num_text,
                            sink.normalisation,
                        )
            sink.add(self.layer, computed[key])

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
            current = CaptureProcessor(layer, current)
            layer.module.set_processor(current)
        current.sinks.append(sink)
        processors[layer.name] = current
    return Attachment(list(layers), sink, processors)
