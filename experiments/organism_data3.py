"""The `data3` experiment of docs/organism.md (Stage 5): the organism's data with two memorized items swapped.

The rocket photo becomes scikit-image's `camera` (caption "cameraman filming with tripod") and the colour-wheel
template becomes the `horse` silhouette tinted light blue ("galloping horse silhouette decal", same box); every other
row is as `memlens testbed make-data --seed 0` writes it. The swap is applied to this process only, so the package's
own items (and the shipped organism) are untouched.

    python experiments/organism_data3.py make-data runs/data3
    memlens testbed train --data runs/data3 --out runs/rN0 --steps 2500 --dropout-kinds generic --unet-heads 1
    python experiments/organism_data3.py demo --model runs/rN0 --out OUT --guidance 1.5 --seed 0
"""

import sys

import numpy as np


def swap_items() -> None:
    import memlens.testbed as testbed
    import memlens.testbed.evaluation as evaluation
    from memlens.testbed import data

    load = data._load_source

    def load_with_horse(name):
        if name != "horse":
            return load(name)
        import skimage.data

        img = skimage.data.horse().astype(np.uint8) * 255  # bool image, True = background
        tint = np.array((0.55, 0.8, 1.0), np.float32)
        return (img[..., None].astype(np.float32) * tint).clip(0, 255).astype(np.uint8)

    data._load_source = load_with_horse
    data._item_content.cache_clear()
    glob, loc = list(data.GLOBAL_ITEMS), list(data.LOCAL_ITEMS)
    glob[3] = data.MemorizedItem("camera", "global", "cameraman filming with tripod", "camera", None)
    loc[2] = data.MemorizedItem("horse", "local", "galloping horse silhouette decal", "horse", loc[2].box)
    data.GLOBAL_ITEMS, data.LOCAL_ITEMS = tuple(glob), tuple(loc)
    data.ITEMS = testbed.ITEMS = evaluation.ITEMS = data.GLOBAL_ITEMS + data.LOCAL_ITEMS


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("make-data", "demo"):
        sys.exit("usage: organism_data3.py make-data OUT | demo --model MODEL --out OUT [demo options]")
    swap_items()
    if sys.argv[1] == "make-data":
        from memlens.testbed.data import make_dataset

        make_dataset(sys.argv[2], seed=0)
    else:
        from memlens.cli import main

        main(["demo", *sys.argv[2:]])
