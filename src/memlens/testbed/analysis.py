"""Which token and which layer carry the bright-ending signal in the organism (for docs/organism.md).

The probe reads one token (the end token) from one block. This analysis keeps the full last-step cross-attention
(all tokens) of every cross-attention block, so the end token can be compared with BOS, the mean over the prompt's
words and the padding after the end token, and down_blocks.0 with down_blocks.1 and the others.

Run: memlens testbed analyze MODEL_DIR OUT_JSON [--per-prompt N] [--guidance G] [--trajectory GROUP]
The memorized items and generic prompts are the organism folder's own (`memlens.testbed.items.load_ground_truth`).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from memlens import capture, quantities, unet_call
from memlens.testbed.tokens import token_maps
from memlens.testbed.evaluation import MATCH_CORR, Prompt, score_generation


class FullAttention:
    """Context manager: keeps the last-step, head-mean, conditional-branch attention over all tokens of every
    cross-attention layer, as an `AllTokens` sink on memlens' one capture processor (float32, honouring the
    attention mask). It shares the processors with a `BrightEndingProbe` attached in the same run, in either order."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.sink = capture.AllTokens()
        self.latent_hw: tuple[int, int] | None = None
        self._last = (None, -1)  # (the call's timesteps tensor, the last step seen in it)

    def __enter__(self):
        unet = self.pipe.unet
        self._attached = capture.attach(capture.cross_attention_layers(unet), self.sink)

        def pre(module, args, kwargs):
            sample, t = unet_call.sample_and_timestep(args, kwargs)
            timesteps = self.pipe.scheduler.timesteps
            after = self._last[1] if self._last[0] is timesteps else -1
            step = unet_call.step_index(t, timesteps, after=after)
            self._last = (timesteps, step)
            # diffusers skips the unconditional branch at guidance <= 1; the pipeline says which it is doing
            cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", True))
            last = step == len(timesteps) - 1
            self.sink.wanted = unet_call.read_rows(sample.shape[0], cfg) if last else None
            self.latent_hw = (sample.shape[-2], sample.shape[-1])

        self.hook = unet.register_forward_pre_hook(pre, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.hook.remove()
        self._attached.remove()
        self.sink.wanted = None

    def maps(self, groups: dict[str, list[str]] | None = None) -> dict[str, np.ndarray]:
        """Per block (e.g. down_blocks.0): (N, h, w, T) attention of all images so far, averaged over its layers.
        `groups` adds named unions of blocks, averaged over all their layers as the probe does, on the finest of
        their grids (e.g. {"outer": the blocks of capture.select_layers(unet, "outer")})."""
        blocks = defaultdict(list)
        for name, probs in self.sink.store.items():
            blocks[".".join(name.split(".")[:2])].append(torch.cat(probs))
        for group, members in (groups or {}).items():
            blocks[group] = [a for m in members for a in blocks.get(m, [])]
        grid = lambda queries: capture.attention_grid(*self.latent_hw, queries)  # noqa: E731
        return {block: capture.on_one_grid(arrs, grid).numpy() for block, arrs in blocks.items()}


def last_step_attention(pipe, prompts, per_prompt, steps, guidance, seed):
    """Images and, per block name, last-step attention (N, h, w, T) averaged over the block's layers."""
    with FullAttention(pipe) as full:
        out = pipe(prompts, num_images_per_prompt=per_prompt, num_inference_steps=steps, guidance_scale=guidance,
                   generator=torch.Generator().manual_seed(seed))
    return out.images, full.maps()


def x0_trajectory(pipe, prompt: str, per_prompt: int = 8, steps: int | None = None, guidance: float | None = None,
                  seed: int = 0) -> tuple[list[int], np.ndarray]:
    """The guided x0 prediction at every sampling step, as images: (timesteps, (S, N, H, W, 3) uint8).

    Read with a forward hook on the UNet (its input x_t and timestep, its epsilon output), combined as the pipeline
    combines them, so it shows when a trajectory commits to an item (docs/organism.md, Stage 4).
    """
    steps = steps or pipe.config.default_num_inference_steps
    guidance = pipe.config.default_guidance_scale if guidance is None else guidance
    alphas = pipe.scheduler.alphas_cumprod
    timesteps, x0s = [], []

    def hook(module, args, kwargs, output):
        x, t = args[0], (args[1] if len(args) > 1 else kwargs["timestep"])
        eps = output[0] if isinstance(output, tuple) else output.sample
        if getattr(pipe, "do_classifier_free_guidance", False):
            uncond, cond = eps.chunk(2)
            eps, x = uncond + guidance * (cond - uncond), x.chunk(2)[1]
        a = alphas[int(t)]
        timesteps.append(int(t))
        x0s.append(((x - (1 - a).sqrt() * eps) / a.sqrt()).detach().clone())

    handle = pipe.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe([prompt], num_images_per_prompt=per_prompt, num_inference_steps=steps, guidance_scale=guidance,
             generator=torch.Generator().manual_seed(seed), output_type="latent")
    finally:
        handle.remove()
    with torch.no_grad():
        images = [pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample.clamp(-1, 1) for x0 in x0s]
    arr = torch.stack(images).permute(0, 1, 3, 4, 2).add(1).mul(127.5).round().to(torch.uint8).numpy()
    return timesteps, arr


def _save_grid(images, end_maps, per_prompt, path) -> None:
    """One row per prompt: its images, then their down_blocks.0 END maps (each min-max scaled)."""
    from PIL import Image

    from memlens.maps import heatmap

    n = len(images) // per_prompt
    side = images[0].size[0]
    sheet = Image.new("RGB", (2 * per_prompt * side, n * side))
    for i, img in enumerate(images):
        r, c = divmod(i, per_prompt)
        sheet.paste(img, (c * side, r * side))
        sheet.paste(heatmap(end_maps[i], (side, side)), ((per_prompt + c) * side, r * side))
    sheet.resize((sheet.width * 3, sheet.height * 3), Image.NEAREST).save(path)


def organism_items(model_dir, n_generic: int = 16) -> tuple[dict, list[Prompt]]:
    """The organism's items by group and its prompts (memorized captions, then `n_generic` generic captions)."""
    from memlens.testbed.items import load_ground_truth

    truth = load_ground_truth(model_dir)
    prompts = [Prompt(it.prompt, it.kind, it.group) for it in truth.items]
    prompts += [Prompt(p, "generic", None) for p in truth.generic_prompts[:n_generic]]
    return {it.group: it for it in truth.items}, prompts


def analyse(model_dir, per_prompt=4, steps=None, guidance=None, seed=0, grid=None) -> dict:
    from memlens.metrics import localization_summary as localization
    from memlens.metrics import separation as detection
    from memlens.testbed.pipeline import WEIGHTS_DIR, load_pipeline, tokenize

    model_dir = model_dir if model_dir is not None else WEIGHTS_DIR
    pipe = load_pipeline(model_dir)
    guidance = guidance if guidance is not None else pipe.config.default_guidance_scale
    steps = steps or pipe.config.default_num_inference_steps
    items, prompts = organism_items(model_dir)
    texts = [p.text for p in prompts]
    images, maps = last_step_attention(pipe, texts, per_prompt, steps, guidance, seed)
    ids = tokenize(pipe.tokenizer, texts)
    eos = quantities.first_eos(ids, pipe.tokenizer.eos_token_id).tolist()
    gens = []
    for i, img in enumerate(images):
        p = prompts[i // per_prompt]
        gens.append({"p": p, "eos": eos[i // per_prompt], **score_generation(np.asarray(img), p.kind, p.group, items)})
    if grid:
        end = [token_maps(maps["down_blocks.0"][i], g["eos"])["end"] for i, g in enumerate(gens)]
        _save_grid(images, end, per_prompt, grid)
    result = {"guidance": guidance, "steps": steps, "per_prompt": per_prompt,
              "reproduce": {k: float(np.mean([g["reproduces_own"] for g in gens if g["p"].kind == k]))
                            for k in ("global", "local")},
              "novel": float(np.mean([g.get("novel", False) for g in gens if g["p"].kind == "generic"])),
              "per_group_corr": {grp: float(np.mean([g["own_corr"] for g in gens if g["p"].group == grp]))
                                 for grp in items},
              "blocks": {}}
    for block, att in maps.items():
        res = {}
        for tok in ("end", "bos", "word_mean", "pad_mean"):
            tm = [token_maps(att[i], g["eos"])[tok] for i, g in enumerate(gens)]
            loc_idx = [i for i, g in enumerate(gens) if g["p"].kind == "local" and g["reproduces_own"]]
            loc = localization([tm[i] for i in loc_idx], [items[gens[i]["p"].group].mask for i in loc_idx])
            mean = {k: float(np.mean([tm[i].mean() for i, g in enumerate(gens) if g["p"].kind == k]))
                    for k in ("global", "local", "generic")}
            det = {k: detection([tm[i].mean() for i, g in enumerate(gens) if g["p"].kind == k],
                                [tm[i].mean() for i, g in enumerate(gens) if g["p"].kind == "generic"])["auc"]
                   for k in ("global", "local")}
            res[tok] = {"pixel_auroc": loc["pixel_auroc"], "iou": loc["iou"], "n": loc["n"], "mean_attention": mean,
                        "mean_attention_auc": det}
        result["blocks"][block] = res
    return result


def trajectory(model_dir, group: str, per_prompt: int = 8, steps: int | None = None, guidance: float | None = None,
               seed: int = 0) -> dict:
    """Follow `group`'s prompt through sampling: every 5 steps (and the last), the x0 prediction's mean correlation
    with each memorized item of its kind and how many of the `per_prompt` images already copy their own item."""
    from memlens.errors import InputError
    from memlens.testbed.evaluation import item_similarity
    from memlens.testbed.pipeline import WEIGHTS_DIR, load_pipeline

    model_dir = model_dir if model_dir is not None else WEIGHTS_DIR
    items, _ = organism_items(model_dir)
    if group not in items:
        raise InputError(f"`trajectory`: unknown group {group!r}; expected one of {', '.join(items)}")
    own = items[group]
    pipe = load_pipeline(model_dir)
    pipe.set_progress_bar_config(disable=True)
    ts, x0 = x0_trajectory(pipe, own.prompt, per_prompt=per_prompt, steps=steps, guidance=guidance, seed=seed)
    same_kind = [g for g, it in items.items() if it.kind == own.kind]
    rows = []
    for i in list(range(0, len(ts), 5)) + ([len(ts) - 1] if (len(ts) - 1) % 5 else []):
        corr = {g: [item_similarity(img, items[g]) for img in x0[i]] for g in same_kind}
        rows.append({"t": ts[i], "mean_corr": {g: round(float(np.mean(c)), 3) for g, c in corr.items()},
                     "own_copies": int(sum(c >= MATCH_CORR for c in corr[group]))})
    return {"group": group, "per_prompt": per_prompt, "rows": rows}


if __name__ == "__main__":  # the old spelling of `memlens testbed analyze`, which docs/organism.md still cites
    import sys

    from memlens.cli import main as _memlens

    _memlens(["testbed", "analyze", *sys.argv[1:]])
