"""How to combine an organism's cross-attention blocks into one bright-ending map (docs/organism.md, "Combining
blocks"): per block and per rule, pooled pixel AUROC / mean Otsu IoU on the local generations that copy their item.

For each local item of the organism's ground truth, `--per-prompt` images (one generator, seed 0, the organism's
default sampling); the last-step, conditional, head-averaged attention of every block (`FullAttention`), read on
the end token (`end`) or on the end token and the padding after it (`end+pad`, the probe's token="eos+padding").
Rules: each block alone; `outer` (first down + last up block, the probe's layers="outer"); `all_equal` (every block,
upsampled, equal weights); `all` (every block, upsampled, one vote per attention query: the probe's layers="all",
computed here with `memlens.capture.on_one_grid` itself); `decoder` (every up block, query-weighted).

    python experiments/organism_v2_aggregation.py runs/study/eos_s3/organism runs/study/eos_s5/organism
"""

import argparse

import numpy as np
import torch


def table(model: str, per: int) -> None:
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
        out = pipe(prompts, num_images_per_prompt=per, generator=torch.Generator().manual_seed(0), output_type="np")
    blocks = sorted({".".join(n.split(".")[:2]) for n in full.sink.store})
    groups = {"outer": ["down_blocks.0", "up_blocks.2"], "all": blocks,
              "decoder": [b for b in blocks if b.startswith("up_blocks")]}
    maps = full.maps({k: v for k, v in groups.items() if set(v) <= set(blocks)})
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    eos = first_eos(ids, pipe.tokenizer.eos_token_id).tolist()
    T = ids.shape[1]
    copies = [(i * per + j, i) for i, it in enumerate(local) for j in range(per)
              if item_similarity((out.images[i * per + j] * 255).round().astype(np.uint8), it) >= MATCH_CORR]
    shape, masks = local[0].mask.shape, [local[i].mask for _, i in copies]
    print(f"{model}: {len(copies)} of {len(local) * per} local generations copy their item")
    for token in ("end", "end+pad"):
        def read(block, n, i):
            pos = [eos[i]] if token == "end" else list(range(eos[i], T))
            return maps[block][n][..., pos].mean(-1)

        rows = {b: [upsample_map(read(b, n, i), shape) for n, i in copies] for b in maps}
        rows["all_equal"] = [np.mean([upsample_map(read(b, n, i), shape) for b in blocks], 0) for n, i in copies]
        cells = [f"{name} {s['pixel_auroc']:.3f}/{s['iou']:.3f}" for name, s in
                 ((name, localization_summary(mm, masks)) for name, mm in rows.items())]
        print(f"  {token:8s} " + " | ".join(cells))


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
