"""Scoring generations of the organism against its planted memorized items.

Per-generation criteria (fixed in advance, used by the demo and in docs/organism.md):

* A **global** generation reproduces its own item when the Pearson correlation between the generated image and the
  item's reference image (all RGB pixels, in [0, 1]) is >= `MATCH_CORR`.
* A **local** generation reproduces its own item when the correlation between the generated pixels inside the
  template's box and the template patch is >= `MATCH_CORR`.
* A **generic** generation is novel when it matches no memorized item by these criteria: its correlation with every
  global reference image, and its box crop's correlation with every local template at that template's box, stay
  below `MATCH_CORR`. (The generic training scenes are not consulted: the shipped package does not carry them.)

Localization compares the bright-ending map, upsampled to image size (bilinear) and min-max normalised per image,
with the ground-truth box, over local generations that reproduce their own item. IoU uses Otsu's threshold on each
normalised map, a rule that does not know the mask's area.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memlens.testbed.data import ITEMS, generic_scene, memorized_items

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


def _crop(img: np.ndarray, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return img[y0:y1, x0:x1]


def item_similarity(img: np.ndarray, item: dict) -> float:
    """Correlation of a generation with one memorized item, inside the item's region."""
    img = np.asarray(img, np.float32) / 255.0
    ref = item["reference"].astype(np.float32) / 255.0
    if item["box"] is None:
        return pearson(img, ref)
    return pearson(_crop(img, item["box"]), _crop(ref, item["box"]))


def score_generation(img: np.ndarray, kind: str, group: str | None, items: dict[str, dict] | None = None) -> dict:
    """Per-generation labels: similarity to its own item, best item, and whether it matches / is novel."""
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


def localization(be_maps: list[np.ndarray], masks: list[np.ndarray]) -> dict:
    """Pooled pixel AUROC and mean Otsu IoU of BE maps (any resolution) against boolean image-size masks."""
    from sklearn.metrics import roc_auc_score

    from memlens.maps import normalize, threshold_otsu, upsample

    if not be_maps:
        return {"pixel_auroc": None, "iou": None, "n": 0}
    scores, labels, ious = [], [], []
    for m, gt in zip(be_maps, masks):
        up = normalize(upsample(m, gt.shape))
        scores.append(up.ravel())
        labels.append(gt.ravel())
        pred = up > threshold_otsu(up)
        union = (pred | gt).sum()
        ious.append(float((pred & gt).sum() / union) if union else 0.0)
    y, s = np.concatenate(labels), np.concatenate(scores)
    auroc = float(roc_auc_score(y, s)) if 0 < y.mean() < 1 else None
    return {"pixel_auroc": auroc, "iou": float(np.mean(ious)), "n": len(be_maps)}


def detection(pos: np.ndarray, neg: np.ndarray) -> dict:
    """AUC and TPR at 1% FPR of a score where memorized (pos) should be higher than generic (neg)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    if len(pos) == 0 or len(neg) == 0:
        return {"auc": None, "tpr_at_1pct_fpr": None}
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    s = np.r_[pos, neg]
    fpr, tpr, _ = roc_curve(y, s)
    return {"auc": float(roc_auc_score(y, s)), "tpr_at_1pct_fpr": float(tpr[fpr <= 0.01].max())}
