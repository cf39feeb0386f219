"""Bright-ending map operations: resize, normalise, threshold, colour, overlay, save.

Maps are numpy float32 arrays of shape (h, w). Resizing uses torch's bilinear interpolation with
align_corners=False, the same operation the probe uses to bring a map to latent resolution, so a map shown over an
image and a map used as a mask agree. torch is imported only when a map is resized, so the metrics and readers that
import this module stay light.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from memlens.rundir import atomic_write

__all__ = ["upsample", "normalize", "scale", "threshold_otsu", "heatmap", "overlay", "save_png", "save_npy"]


def upsample(be_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an (h, w) map to size=(H, W) by bilinear interpolation (align_corners=False), as float32.

    Half-pixel alignment treats each attention cell as covering an equal block of pixels, which is how the UNet's
    downsampling maps pixels to attention positions. Shrinking is antialiased so no cell is skipped.
    """
    arr = np.asarray(be_map, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D map, got shape {arr.shape}")
    size = tuple(int(s) for s in size)
    if arr.shape == size:
        return arr.copy()
    import torch
    import torch.nn.functional as F

    shrink = size[0] < arr.shape[0] or size[1] < arr.shape[1]
    out = F.interpolate(
        torch.from_numpy(arr)[None, None], size=size, mode="bilinear", align_corners=False, antialias=shrink
    )
    return out[0, 0].numpy()


def normalize(be_map: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1]; a constant map becomes all zeros."""
    arr = np.asarray(be_map, dtype=np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    if hi - lo <= 0:
        return np.zeros_like(arr)
    return (arr - lo) / (hi - lo)


def threshold_otsu(be_map: np.ndarray) -> float:
    """Otsu's threshold of the map's values (the rule fixed in advance for IoU in memlens)."""
    from skimage.filters import threshold_otsu as _otsu

    # float64: a nearly flat map (attention equal to float32's last bits) has a range too small for 256 float32
    # histogram bins, which skimage refuses; such a map is treated as constant only if float64 cannot split it.
    arr = np.asarray(be_map, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if hi - lo <= 1e-12 * max(abs(hi), abs(lo)):
        return hi
    return float(_otsu(arr))


def scale(be_map: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """The map in [0, 1] for colouring: min-max per map when `vmax` is None, else `map / vmax` clipped, one scale
    shared by every map drawn with that `vmax` (so a map with little end-token attention looks dark)."""
    arr = np.asarray(be_map, dtype=np.float32)
    if vmax is None:
        return normalize(arr)
    return np.clip(arr / vmax, 0.0, 1.0) if vmax > 0 else np.zeros_like(arr)


def heatmap(be_map: np.ndarray, size: tuple[int, int] | None = None, cmap: str = "jet",
            vmax: float | None = None) -> Image.Image:
    """The map as an RGB picture (scaled as in `scale`), optionally resized to size=(H, W)."""
    import matplotlib

    arr = np.asarray(be_map, dtype=np.float32)
    if size is not None and tuple(size) != arr.shape:
        arr = upsample(arr, size)
    rgba = matplotlib.colormaps[cmap](scale(arr, vmax))
    return Image.fromarray((rgba[..., :3] * 255).round().astype(np.uint8))


def overlay(image: Image.Image, be_map: np.ndarray, alpha: float = 0.5, cmap: str = "jet",
            vmax: float | None = None) -> Image.Image:
    """The map, upsampled to the image's size and scaled (per map, or to a shared `vmax`), blended over the image."""
    base = image.convert("RGB")
    heat = heatmap(be_map, (base.height, base.width), cmap, vmax)
    return Image.blend(base, heat, alpha)


def save_png(image: Image.Image | np.ndarray, path: str | Path) -> Path:
    """Save a PIL image, or a map as its heatmap, as PNG atomically."""
    if not isinstance(image, Image.Image):
        image = heatmap(image)
    return atomic_write(Path(path), lambda fh: image.save(fh, format="PNG"))


def save_npy(array: np.ndarray, path: str | Path) -> Path:
    """Save an array as .npy atomically."""
    return atomic_write(Path(path), lambda fh: np.save(fh, np.asarray(array)))
