"""TEMPORARY stand-in for `memlens.testbed.items` (being added on main); removed when main is merged.

Same interface: `PlantedItem`, `GroundTruth`, `load_ground_truth(organism_dir)`. For the shipped organism it rebuilds
the items from `memlens.testbed.data`; any other folder must hold `ground_truth/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memlens.errors import InputError


@dataclass(frozen=True)
class PlantedItem:
    group: str
    kind: str
    prompt: str
    box: tuple[int, int, int, int] | None
    copies: int | None
    reference: np.ndarray
    mask: np.ndarray


@dataclass(frozen=True)
class GroundTruth:
    items: list[PlantedItem]
    generic_prompts: list[str]


def load_ground_truth(organism_dir) -> GroundTruth:
    from memlens.testbed.data import generic_scene, memorized_items
    from memlens.testbed.pipeline import WEIGHTS_DIR

    organism_dir = Path(organism_dir)
    if organism_dir.resolve() != Path(WEIGHTS_DIR).resolve():
        raise InputError(f"{organism_dir}: no ground_truth/ folder (the organism's memorized items, references and "
                         "masks); train it with `memlens testbed train` to record them")
    items = [PlantedItem(it["group"], it["kind"], it["prompt"], it["box"], None, it["reference"], it["mask"])
             for it in memorized_items()]
    rng = np.random.default_rng(12345)
    return GroundTruth(items, [generic_scene(rng)[1] for _ in range(64)])
