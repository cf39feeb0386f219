"""Similarity between a generation and training (reference) images: SSCD, the paper's S and LS, and CLIP score.

Images cross this module as float32 (H, W, 3) arrays in [0, 1] (what `load_image` returns). Models are the user's
files: SSCD is a TorchScript path, CLIP an open_clip architecture name plus a local weights path; nothing downloads.
Formulas, presets and the choices the paper leaves open are in docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from memlens.errors import InputError
from memlens.metrics.localization import upsample_map

__all__ = [
    "SSCDPreset",
    "SSCD_PRESETS",
    "load_image",
    "preprocess_sscd",
    "load_sscd",
    "sscd_embeddings",
    "cosine_similarity",
    "masked_l2",
    "s_score",
    "ls_score",
    "load_clip",
    "clip_scores",
]


@dataclass(frozen=True)
class SSCDPreset:
    """How an image becomes an SSCD input: resize, optional centre crop, then (x - mean) / std on [0, 1] pixels.

    `resize` is the shorter side's new length (aspect kept, as torchvision's `Resize(int)`) or an exact (h, w).
    """

    name: str
    resize: int | tuple[int, int]
    center_crop: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


SSCD_PRESETS: dict[str, SSCDPreset] = {
    # The SSCD README's recipe (facebookresearch/sscd-copy-detection): shorter side 288, ImageNet statistics.
    "sscd": SSCDPreset("sscd", 288, None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # Wen / BE `inference_mem.py` (inherited from DCR): Resize(256), CenterCrop(224), mean = std = 0.5. Use it to
    # compare with those papers' numbers; it is not what SSCD was trained with.
    "wen": SSCDPreset("wen", 256, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def load_image(path: str | Path) -> np.ndarray:
    """An image file as float32 (H, W, 3) RGB in [0, 1]; an unreadable file is an `InputError` naming it."""
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
            rgb.load()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"{path}: cannot read image ({err})") from None
    return np.asarray(rgb, dtype=np.float32) / 255.0


def _to_pil(image: np.ndarray) -> Image.Image:
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {a.shape}")
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(a, "RGB")


def _resize(im: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    # PIL bilinear (antialiased when shrinking) is what torchvision's Resize does on PIL images, so the presets
    # match the reference recipes without a torchvision dependency.
    w, h = im.size
    if isinstance(size, int):
        if w <= h:
            new = (size, int(size * h / w))
        else:
            new = (int(size * w / h), size)
    else:
        new = (size[1], size[0])
    return im.resize(new, Image.BILINEAR) if new != (w, h) else im


def _center_crop(im: Image.Image, crop: int) -> Image.Image:
    w, h = im.size
    if w < crop or h < crop:
        raise ValueError(f"image {w}x{h} is smaller than the {crop}px centre crop")
    top = int(round((h - crop) / 2.0))
    left = int(round((w - crop) / 2.0))
    return im.crop((left, top, left + crop, top + crop))


def preprocess_sscd(image: np.ndarray, preset: str | SSCDPreset = "sscd") -> np.ndarray:
    """One image (H, W, 3) in [0, 1] (or uint8) -> a float32 (3, h, w) SSCD input under `preset`."""
    p = SSCD_PRESETS[preset] if isinstance(preset, str) else preset
    im = _resize(_to_pil(image), p.resize)
    if p.center_crop is not None:
        im = _center_crop(im, p.center_crop)
    x = np.asarray(im, dtype=np.float32) / 255.0
    x = (x - np.asarray(p.mean, np.float32)) / np.asarray(p.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def load_sscd(path: str | Path, device: str = "cpu"):
    """The user's SSCD TorchScript file (e.g. `sscd_disc_large.torchscript.pt`), in eval mode."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: SSCD model file not found")
    try:
        model = torch.jit.load(str(path), map_location=device)
    except Exception as err:  # torch raises RuntimeError or ValueError depending on how the file is broken
        raise InputError(f"{path}: not a loadable TorchScript model ({str(err).splitlines()[0]})") from None
    return model.eval()


def _device_of(model):
    import torch

    return next(iter(model.parameters()), torch.empty(0)).device


def sscd_embeddings(model, images: Sequence[np.ndarray], preset: str | SSCDPreset = "sscd") -> np.ndarray:
    """L2-normalised SSCD descriptors, float32 (n, d), one image at a time (the "sscd" preset keeps aspect ratios,
    so inputs of one batch need not share a size)."""
    import torch

    rows = []
    device = _device_of(model)
    with torch.no_grad():
        for image in images:
            x = torch.from_numpy(preprocess_sscd(image, preset))[None]
            f = model(x.to(device)).float().reshape(1, -1)
            rows.append(torch.nn.functional.normalize(f, dim=1)[0].cpu().numpy())
    return np.stack(rows).astype(np.float32) if rows else np.zeros((0, 0), np.float32)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, m) cosine similarities between the rows of `a` (n, d) and `b` (m, d)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a @ b.T).astype(np.float32)


def _match_reference(generated: np.ndarray, reference: np.ndarray) -> np.ndarray:
    # L2 needs pixel-aligned arrays; a training image of another size is resized (PIL bilinear) to the generation's.
    if reference.shape == generated.shape:
        return reference
    h, w = generated.shape[:2]
    # Per channel in PIL's float mode, so resizing adds no 8-bit rounding to the distance.
    channels = []
    for c in range(3):
        plane = Image.fromarray(np.ascontiguousarray(reference[..., c], np.float32), "F")
        channels.append(np.asarray(plane.resize((w, h), Image.BILINEAR)))
    return np.stack(channels, axis=-1).astype(np.float32)


def _mask_weights(be_map: np.ndarray, size: tuple[int, int], normalize: str) -> np.ndarray:
    m = upsample_map(be_map, size).astype(np.float64)
    if normalize == "mean":
        # Like Eq. 8's division by the mask mean: weights average 1, so LS lives on S's scale and the paper's
        # single threshold (-50) means the same for both, whatever the attention's absolute size.
        mean = m.mean()
        return m / mean if mean > 0 else np.zeros_like(m)
    if normalize == "minmax":
        lo, hi = m.min(), m.max()
        return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    if normalize == "none":
        return m
    raise ValueError(f"unknown mask normalisation {normalize!r}; expected 'mean', 'minmax' or 'none'")


def masked_l2(
    generated: np.ndarray, reference: np.ndarray, be_map: np.ndarray | None = None, normalize: str = "mean"
) -> float:
    """`||(x_hat - x) * m||_2` over all pixels and channels, pixels in [0, 1]; `be_map=None` is the unmasked norm.

    The map is upsampled bilinearly to the generation's size and broadcast over the 3 channels; `normalize` is
    'mean' (weights / their mean, the default), 'minmax' or 'none' (raw attention values).
    """
    x_hat = np.asarray(generated, dtype=np.float64)
    x = _match_reference(generated, np.asarray(reference, dtype=np.float32)).astype(np.float64)
    diff = x_hat - x
    if be_map is not None:
        diff = diff * _mask_weights(be_map, x_hat.shape[:2], normalize)[..., None]
    return float(np.sqrt(np.sum(diff * diff)))


def s_score(sscd: float, l2: float, sscd_threshold: float = 0.5) -> float:
    """Eq. 10: `S = -1[SSCD < 0.5] * ||x_hat - x||_2` (0 means "memorized per SSCD")."""
    return -float(l2) if sscd < sscd_threshold else 0.0


def ls_score(sscd: float, masked: float, sscd_threshold: float = 0.5) -> float:
    """Eq. 9: `LS = -1[SSCD < 0.5] * ||(x_hat - x) * m||_2`; pass `masked_l2(..., be_map)` as `masked`."""
    return -float(masked) if sscd < sscd_threshold else 0.0


def load_clip(model_name: str, pretrained: str | Path, device: str = "cpu"):
    """`(model, preprocess, tokenizer)` from open_clip, weights from a LOCAL file only (never a download)."""
    try:
        import open_clip
    except ImportError:
        raise InputError(
            "CLIP score needs open_clip, which is not installed; install it with `pip install 'memlens[clip]'`"
        ) from None
    path = Path(pretrained)
    if not path.is_file():
        raise InputError(f"{path}: CLIP weights file not found (give a local file; memlens never downloads)")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(path), device=device)
    except Exception as err:
        raise InputError(f"cannot load CLIP model {model_name!r} from {path}: {str(err).splitlines()[0]}") from None
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


def clip_scores(
    model, preprocess: Callable, tokenizer: Callable, images: Sequence[np.ndarray], prompts: Sequence[str]
) -> np.ndarray:
    """Cosine between each image's and its prompt's CLIP features, float32 (n,); Wen's convention: no x100, no
    clamp at 0. `model` needs `encode_image` / `encode_text`, `preprocess` maps a PIL image to a (3, h, w) tensor,
    `tokenizer` maps a list of strings to token ids (open_clip's interfaces)."""
    import torch

    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    out = []
    device = _device_of(model)
    with torch.no_grad():
        for image, prompt in zip(images, prompts):
            x = preprocess(_to_pil(image))[None].to(device)
            fi = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)
            ft = torch.nn.functional.normalize(model.encode_text(tokenizer([prompt]).to(device)).float(), dim=-1)
            out.append(float((fi * ft).sum()))
    return np.asarray(out, dtype=np.float32)
