"""Image-caption datasets in the Hugging Face `imagefolder` layout (`metadata.jsonl` with `file_name` and `text`,
optional `kind`), read into memory, and the training step's batch rows.

Shared by the organism's training (`memlens.testbed.train`) and training-time mitigation
(`memlens.mitigation.training`), so neither imports the other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from memlens.errors import InputError

__all__ = ["ImageTextData", "load_imagefolder", "batch_indices"]


@dataclass
class ImageTextData:
    images: torch.Tensor  # uint8 (N, 3, R, R)
    captions: list[str]
    kinds: list[str] | None


def load_imagefolder(data_dir: str | Path, resolution: int) -> ImageTextData:
    """Read `metadata.jsonl` + images (centre-cropped and resized to `resolution`) into memory."""
    data_dir = Path(data_dir)
    meta = data_dir / "metadata.jsonl"
    if not meta.is_file():
        raise InputError(f"{meta}: not found; expected an imagefolder dataset with metadata.jsonl "
                         "(one JSON object per line with `file_name` and `text`)")
    images, captions, kinds = [], [], []
    with open(meta) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as ex:
                raise InputError(f"{meta}:{lineno}: not valid JSON ({ex.msg})") from None
            for key in ("file_name", "text"):
                if not isinstance(row.get(key), str):
                    raise InputError(f"{meta}:{lineno}: field `{key}` missing or not a string")
            path = data_dir / row["file_name"]
            if not path.is_file():
                raise InputError(f"{meta}:{lineno}: field `file_name`: {path} does not exist")
            images.append(_load_image(path, resolution))
            captions.append(row["text"])
            kinds.append(row.get("kind"))
    if not images:
        raise InputError(f"{meta}: no rows")
    has_kinds = all(k is not None for k in kinds)
    return ImageTextData(torch.from_numpy(np.stack(images)), captions, kinds if has_kinds else None)


def _load_image(path: Path, resolution: int) -> np.ndarray:
    img = Image.open(path).convert("RGB")
    if img.size != (resolution, resolution):
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        img = img.resize((resolution, resolution), Image.BICUBIC)
    return np.asarray(img).transpose(2, 0, 1).copy()


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Rows for training step `step` (0-based): consecutive slices of a per-epoch permutation fixed by (seed, epoch)."""
    per_epoch = n // batch_size
    if per_epoch == 0:  # tiny datasets: sample with replacement, still a pure function of the step
        return np.random.default_rng([seed, step]).integers(0, n, batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[k * batch_size : (k + 1) * batch_size]
