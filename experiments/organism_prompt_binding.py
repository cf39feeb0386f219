"""Two measurements of docs/organism.md (Stage 6) on why the colour-wheel prompt draws another template.

`text-distances`: L2 distances between the text encoder's last hidden states (flattened over the token positions) of
the eight memorized prompts, the empty prompt and one generic caption; the local prompts' rows are printed.

`rescale`: copies of each memorized item (correlation >= 0.8, as the demo counts them) under the stock pipeline's
`guidance_rescale`, for guidance:rescale:steps settings.

    python experiments/organism_prompt_binding.py text-distances runs/rPf1 runs/rPt10
    python experiments/organism_prompt_binding.py rescale runs/rPf1 --per-item 8 1.5:0:50 1.5:0.7:50
"""

import argparse

import numpy as np
import torch

GENERIC = "red circle at the left on blue background"


def text_distances(model_dir: str) -> None:
    from memlens.testbed.data import ITEMS
    from memlens.testbed.pipeline import load_pipeline, tokenize

    pipe = load_pipeline(model_dir)
    names = [it.group for it in ITEMS] + ["empty", "generic"]
    ids = tokenize(pipe.tokenizer, [it.prompt for it in ITEMS] + ["", GENERIC])
    with torch.no_grad():
        hidden = pipe.text_encoder(ids).last_hidden_state.flatten(1)
    dist = torch.cdist(hidden, hidden).numpy()
    print(model_dir)
    print(" " * 11 + " ".join(f"{n[:9]:>9}" for n in names))
    for i, name in enumerate(names):
        if i >= sum(it.kind == "global" for it in ITEMS):
            print(f"{name[:10]:>10} " + " ".join(f"{v:9.1f}" for v in dist[i]))


def rescale(model_dir: str, per_item: int, settings: list[str]) -> None:
    from memlens.testbed.evaluation import MATCH_CORR, _items_by_group, item_similarity
    from memlens.testbed.pipeline import load_pipeline

    pipe = load_pipeline(model_dir)
    pipe.set_progress_bar_config(disable=True)
    items = _items_by_group()
    for setting in settings:
        guidance, rescale_to, steps = setting.split(":")
        copies = {}
        for group, item in items.items():
            out = pipe([item["prompt"]], num_images_per_prompt=per_item, guidance_scale=float(guidance),
                       guidance_rescale=float(rescale_to), num_inference_steps=int(steps),
                       generator=torch.Generator().manual_seed(0), output_type="np").images
            images = (out * 255).round().astype(np.uint8)
            copies[group] = int(sum(item_similarity(img, item) >= MATCH_CORR for img in images))
        print(f"guidance {guidance} rescale {rescale_to} steps {steps}: {copies}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    td = sub.add_parser("text-distances")
    td.add_argument("models", nargs="+")
    rs = sub.add_parser("rescale")
    rs.add_argument("model")
    rs.add_argument("settings", nargs="+", metavar="GUIDANCE:RESCALE:STEPS")
    rs.add_argument("--per-item", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.cmd == "text-distances":
        for model in args.models:
            text_distances(model)
    else:
        rescale(args.model, args.per_item, args.settings)


if __name__ == "__main__":
    main()
