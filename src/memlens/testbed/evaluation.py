"""Scoring generations of the organism against its planted memorized items.

Per-generation criteria (fixed in advance, used by the demo and in docs/organism.md):

* A **global** generation reproduces its own item when the Pearson correlation between the generated image and the
  item's reference image (all RGB pixels, in [0, 1]) is >= `MATCH_CORR`.
* A **local** generation reproduces its own item when the correlation between the generated pixels inside the
  template's box and the template patch is >= `MATCH_CORR`.
* A **generic** generation is novel when it matches no memorized item by these criteria: its correlation with every
  global reference image, and its box crop's correlation with every local template at that template's box, stay
  below `MATCH_CORR`. (The generic training scenes are not consulted: the shipped package does not carry them.)

Quality on generic prompts (for comparing trained organisms, e.g. with and without a training-time filter):

* **background accuracy**: for generic captions that name a background (`... on red [background]`), the fraction of
  generations whose border pixels, each snapped to the nearest palette colour, are mostly that colour;
* **palette distance**: the mean RGB distance (0-255 units) of every pixel to its nearest palette colour; generic
  training scenes are flat palette colours (distance 0), so grain and smudges raise it;
* **held-out loss**: the epsilon-prediction MSE on fresh generic scenes (a seed the dataset did not use) at fixed
  timesteps and fixed noise, so two models are scored on exactly the same inputs.

Localization and detection numbers are not computed here: the demo writes its generations as a scan and its ground
truth as masks, and scores them with `memlens.evaluate` (definitions in docs/metrics.md).

Items may be `memlens.testbed.items.PlantedItem`s or the dicts of `memlens.testbed.data.memorized_items()`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from memlens.testbed.data import COLOURS, ITEMS, generic_scene, memorized_items

MATCH_CORR = 0.8


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else 0.0


@dataclass
class Prompt:
    text: str
    kind: str  # global, local, generic
    group: str | None


def prompt_set(n_generic: int = 16, seed: int = 12345) -> list[Prompt]:
    """The memorized prompts (verbatim training captions) and generic captions from the training distribution."""
    prompts = [Prompt(it.prompt, it.kind, it.group) for it in ITEMS]
    rng = np.random.default_rng(seed)
    prompts += [Prompt(generic_scene(rng)[1], "generic", None) for _ in range(n_generic)]
    return prompts


def _items_by_group() -> dict[str, dict]:
    return {it["group"]: it for it in memorized_items()}


def _field(item, name: str):
    return item[name] if isinstance(item, dict) else getattr(item, name)


def _crop(img: np.ndarray, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return img[y0:y1, x0:x1]


def item_similarity(img: np.ndarray, item: dict) -> float:
    """Correlation of a generation with one memorized item, inside the item's region."""
    img = np.asarray(img, np.float32) / 255.0
    ref = np.asarray(_field(item, "reference")).astype(np.float32) / 255.0
    box = _field(item, "box")
    if box is None:
        return pearson(img, ref)
    return pearson(_crop(img, box), _crop(ref, box))


def score_generation(img: np.ndarray, kind: str, group: str | None, items: dict | None = None) -> dict:
    """Per-generation labels: similarity to its own item, best item, and whether it matches / is novel.
    `items` maps group -> item (default: memlens' own eight, `memlens.testbed.data`)."""
    items = items or _items_by_group()
    sims = {g: item_similarity(img, it) for g, it in items.items()}
    best = max(sims, key=sims.get)
    out = {"best_group": best, "best_corr": sims[best]}
    if kind in ("global", "local"):
        out["own_corr"] = sims[group]
        out["reproduces_own"] = sims[group] >= MATCH_CORR
    else:
        out["novel"] = sims[best] < MATCH_CORR
    return out


# ---------------------------------------------------------------- quality on generic prompts
_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _PALETTE_NAMES], np.float32)
_BACKGROUND = re.compile(r"\bon (\w+)(?: background)?$")


def caption_background(caption: str) -> str | None:
    """The background colour a generic caption names, or None when it names none."""
    m = _BACKGROUND.search(caption.strip())
    return m.group(1) if m and m.group(1) in COLOURS else None


def border_colour(img: np.ndarray) -> str:
    """Majority palette colour of the image's outermost pixel ring (each pixel snapped to its nearest colour)."""
    img = np.asarray(img, np.float32)
    ring = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    nearest = ((ring[:, None, :] - _PALETTE[None]) ** 2).sum(-1).argmin(1)
    return _PALETTE_NAMES[int(np.bincount(nearest, minlength=len(_PALETTE)).argmax())]


def palette_distance(images) -> float:
    """Mean over images and pixels of the RGB distance to the nearest palette colour (0 = pure palette colours)."""
    pix = np.concatenate([np.asarray(img, np.float32).reshape(-1, 3) for img in images])
    return float(np.sqrt(((pix[:, None, :] - _PALETTE[None]) ** 2).sum(-1).min(1)).mean())


def background_accuracy(images, captions) -> dict:
    """Fraction of generations whose border colour is the background their caption names (captions naming none
    are skipped; `n` says how many counted)."""
    hits = [border_colour(np.asarray(img)) == bg
            for img, cap in zip(images, captions) if (bg := caption_background(cap)) is not None]
    return {"accuracy": float(np.mean(hits)) if hits else None, "n": len(hits)}


def heldout_generic_loss(pipe, n: int = 256, seed: int = 987654, timesteps=(50, 200, 400, 600, 800)) -> float:
    """Mean epsilon MSE of `pipe`'s UNet on `n` fresh generic scenes under their captions, at fixed timesteps with
    fixed noise (pure function of `n` and `seed`, so models are compared on identical inputs)."""
    import torch

    from memlens.testbed.pipeline import tokenize

    rng = np.random.default_rng(seed)
    scenes = [generic_scene(rng) for _ in range(n)]
    x0 = torch.from_numpy(np.stack([img for img, _ in scenes])).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        latents = pipe.vae.encode(x0).latent_dist.sample()
        cond = pipe.text_encoder(tokenize(pipe.tokenizer, [c for _, c in scenes]))[0]
        losses = []
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=gen)
            tt = torch.full((n,), int(t), dtype=torch.long)
            pred = pipe.unet(pipe.scheduler.add_noise(latents, noise, tt), tt, encoder_hidden_states=cond).sample
            losses.append(float((pred - noise).pow(2).mean()))
    return float(np.mean(losses))
