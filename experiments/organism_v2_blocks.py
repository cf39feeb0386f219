"""The block x token table of docs/organism.md ("Organism v2"): where an organism's bright-ending signal sits.

For each local item of the organism's ground truth, `--per-prompt` images (seed 1, its default sampling settings);
on those that copy their item (Pearson r >= 0.8 in the box), the last-step, conditional, head-averaged attention of
every cross-attention block (`memlens.testbed.analysis.FullAttention`), read for several token sets and summed
over several block sets after bilinear upsampling to the image (blocks of different resolutions can be combined
here, which the probe cannot do yet). Prints pooled pixel AUROC / mean Otsu IoU (`memlens.metrics`).

    python experiments/organism_v2_blocks.py runs/study/eos_s0/organism runs/study/eos_s5/organism
"""

import argparse

import numpy as np
import torch

TOKENS = {
    "end": lambda e, T: [e],
    "pad_mean": lambda e, T: list(range(e + 1, T)),
    "end+padding": lambda e, T: list(range(e, T)),
    "non-BOS": lambda e, T: list(range(1, T)),
    "words": lambda e, T: list(range(1, e)),
}
BLOCKS = {
    "down0": ["down_blocks.0"],
    "up2": ["up_blocks.2"],
    "outer (down0+up2)": ["down_blocks.0", "up_blocks.2"],
    "down0+up1+up2": ["down_blocks.0", "up_blocks.1", "up_blocks.2"],
    "all": None,
}


def table(model: str, per_prompt: int) -> None:
    from memlens.metrics import localization_summary
    from memlens.metrics.localization import upsample_map
    from memlens.quantities import first_eos
    from memlens.testbed.analysis import FullAttention
    from memlens.testbed.evaluation import MATCH_CORR, item_similarity
    from memlens.testbed.items import load_ground_truth
    from memlens.testbed.pipeline import load_pipeline

    pipe, truth = load_pipeline(model), load_ground_truth(model)
    local = [it for it in truth.items if it.kind == "local"]
    prompts = [it.prompt for it in local]
    with FullAttention(pipe) as full:
        out = pipe(prompts, num_images_per_prompt=per_prompt, generator=torch.Generator().manual_seed(1),
                   output_type="np")
    maps = full.maps()
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    eos = first_eos(ids, pipe.tokenizer.eos_token_id).tolist()
    T = ids.shape[1]
    copies = []
    for i, it in enumerate(local):
        for j in range(per_prompt):
            img = (out.images[i * per_prompt + j] * 255).round().astype(np.uint8)
            if item_similarity(img, it) >= MATCH_CORR:
                copies.append((i * per_prompt + j, i))
    print(f"{model}: {len(copies)} of {len(local) * per_prompt} local generations copy their item")
    shape = local[0].mask.shape
    for name, blocks in BLOCKS.items():
        cells = []
        for tok, positions in TOKENS.items():
            mm = [sum(upsample_map(maps[b][n][..., positions(eos[i], T)].mean(-1), shape)
                      for b in (blocks or list(maps))) for n, i in copies]
            s = localization_summary(mm, [local[i].mask for _, i in copies])
            cells.append(f"{tok} {s['pixel_auroc']:.2f}/{s['iou']:.2f}")
        print(f"  {name:18s} " + " | ".join(cells))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--per-prompt", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for model in args.models:
        table(model, args.per_prompt)


if __name__ == "__main__":
    main()
