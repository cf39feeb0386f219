"""PRSS (Chen et al., CVPR 2025): semantic search over paraphrases (SS) and prompt re-anchoring (PR).

SS: at the first step on the image's own x_T, the candidates [original, caption1, ..., captionK] are scored by the
magnitude (D for `prss`, LD for `prss-be`). An image whose original scores <= l_target_ss is not triggered and keeps
its prompt; otherwise the first paraphrase <= l_target_ss is used, else the lowest-scoring candidate.

PR: at every step, for a triggered image whose modified-prompt magnitude `mag` exceeds l (`l_target_pr`), guidance is
mixed toward the original prompt as the anchor:

    c   = (g*l - M) / (g - 1),   s = min(g * (mag - c) / (M - c), g)          (M = mag_thres_pr > l)
    eps = eps_o + s (eps_m - eps_o) + (g - s)(eps_m - eps_u)

s = 1 at mag = l (plain CFG on the modified prompt) and s = g from mag = M on (CFG with the original prompt as the
negative). The magnitude is taken per image (the reference takes one norm over the whole batch, so its thresholds
depend on n); `prss-be` masks it with the image's BE map (the reference never masks PR; we use the same criterion for
SS and PR so that one target scale applies to both).

How PR attaches: `PromptReanchor` is two UNet hooks, nothing else. The pre-hook appends the original prompt's rows to
the batch the pipeline is about to evaluate, [u, m] -> [u, m, o] (one UNet call per step, as the reference's notes
suggest, instead of a second pass), and the forward hook folds the three predictions back into the [u, m] pair the
pipeline expects, choosing the pair so that the pipeline's own CFG line, u + g (m' - u), yields the PR mixture:
m' = u + (eps - u) / g. The stock denoising loop runs unmodified.

Hook order matters and is fixed by registration: the pre-hook is appended (it runs after the pre-hooks of anything
attached earlier, e.g. a `BrightEndingProbe`, which therefore reads the pipeline's own [u, m] batch) and the forward
hook is prepended (everything else sees the folded [u, m'] output). So attach PR after the probe; attached before
it, the probe sees 3n rows and refuses the call. The probe then records D = ||m' - u|| = ||eps - u|| / g, the text
term the guided step actually used, and reads its BE map from the modified prompt's rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from memlens import quantities, unet_call
from memlens.errors import InputError, MemlensError
from memlens.mitigation.conditioning import Conditioning

__all__ = ["SearchResult", "choose_candidates", "reanchor_scale", "reanchor_eps", "PromptReanchor", "validate_pr"]


@dataclass
class SearchResult:
    chosen: list[int]  # candidate index per image (0 = the original prompt)
    triggered: list[bool]
    scores: list[list[float]]  # per image, every candidate's first-step magnitude, in candidate order


def choose_candidates(scores: Sequence[Sequence[float]], target: float) -> SearchResult:
    """Pick per image: the original if it is under target, else the first candidate under target, else argmin."""
    chosen, triggered = [], []
    for row in scores:
        if row[0] <= target:
            chosen.append(0)
            triggered.append(False)
            continue
        triggered.append(True)
        under = [k for k, v in enumerate(row) if v <= target]
        chosen.append(under[0] if under else min(range(len(row)), key=lambda k: row[k]))
    return SearchResult(chosen, triggered, [list(map(float, r)) for r in scores])


def validate_pr(l_target_pr: float, mag_thres_pr: float, guidance: float) -> None:
    if not mag_thres_pr > l_target_pr:
        raise InputError(
            f"--mag-thres-pr ({mag_thres_pr}) must be greater than --l-target-pr ({l_target_pr}): the re-anchoring "
            "strength rises from 1 at l to g at M"
        )
    if not guidance > 1:
        raise InputError(f"prompt re-anchoring needs --guidance > 1, got {guidance}")


def reanchor_scale(mag: torch.Tensor, l: float, M: float, g: float) -> torch.Tensor:
    """s per image for magnitudes `mag` > l (the formula above); values at or below l give s <= 1."""
    c = (g * l - M) / (g - 1)
    return torch.clamp(g * (mag - c) / (M - c), max=g)


def reanchor_eps(eps_u, eps_m, eps_o, s, g):
    """eps_o + s (eps_m - eps_o) + (g - s)(eps_m - eps_u), with s broadcast per image."""
    s = s.view(-1, *([1] * (eps_m.dim() - 1))).to(eps_m)
    return eps_o + s * (eps_m - eps_o) + (g - s) * (eps_m - eps_u)


class PromptReanchor:
    """Attach PR to a pipeline for the calls made inside the `with` block.

    Args:
        pipe: the pipeline; its UNet gets the hooks and its `guidance_scale` (read at each step) is g.
        original: the original prompts' conditioning, one row per image of the coming call (the call's own
            `prompt_embeds` are the modified prompts).
        l_target, mag_thres: l and M above.
        masks: optional (n, H, W) latent-size masks; the per-step magnitude becomes LD.
        active: optional per-image flags; images not active are left exactly as the pipeline computes them.
    """

    def __init__(self, pipe, original: Conditioning, l_target: float, mag_thres: float,
                 masks: torch.Tensor | None = None, active: Sequence[bool] | None = None):
        if not mag_thres > l_target:
            raise InputError(f"mag_thres ({mag_thres}) must be greater than l_target ({l_target})")
        self.pipe = pipe
        self.original = original
        self.l, self.M = float(l_target), float(mag_thres)
        self.masks = masks
        n = len(original)
        self.active = torch.tensor([True] * n if active is None else list(active))
        self.reanchored_steps = [0] * n
        self._handles: list = []

    def __enter__(self) -> "PromptReanchor":
        unet = self.pipe.unet
        self._handles = [
            unet.register_forward_pre_hook(self._expand, with_kwargs=True),
            unet.register_forward_hook(self._fold, with_kwargs=True, prepend=True),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- hooks -----------------------------------------------------------------------------------------------------
    def _expand(self, module, args, kwargs):
        n = len(self.original)
        sample, _ = unet_call.sample_and_timestep(args, kwargs)
        if sample.shape[0] != 2 * n:
            raise MemlensError(
                f"PromptReanchor was set up for {n} images but the UNet got {sample.shape[0]} rows; it needs CFG and "
                "one row of `original` per image of the call"
            )
        # [u, m] -> [u, m, m]: every per-row argument gets a third block, whose text is then set to the original's.
        index = torch.cat([torch.arange(2 * n), torch.arange(n, 2 * n)])
        args = tuple(unet_call.select_rows(a, index, 2 * n) for a in args)
        kwargs = {k: unet_call.select_rows(v, index, 2 * n) for k, v in kwargs.items()}
        text = kwargs["encoder_hidden_states"]
        kwargs["encoder_hidden_states"] = torch.cat([text[: 2 * n], self.original.embeds.to(text)])
        added = kwargs.get("added_cond_kwargs")
        if added and "text_embeds" in added and self.original.pooled is not None:
            pooled = added["text_embeds"]
            added["text_embeds"] = torch.cat([pooled[: 2 * n], self.original.pooled.to(pooled)])
        return args, kwargs

    def _fold(self, module, args, kwargs, output):
        n = len(self.original)
        eps = unet_call.prediction(output)
        eps_u, eps_m, eps_o = eps[:n], eps[n : 2 * n], eps[2 * n :]
        g = float(self.pipe.guidance_scale)
        channels = unet_call.sample_and_timestep(args, kwargs)[0].shape[1]
        mag = quantities.difference_magnitude(quantities.guidance_difference(eps[: 2 * n], channels), self.masks)
        on = self.active.to(mag.device) & (mag > self.l)
        guided_text = eps_m
        if bool(on.any()):
            s = reanchor_scale(mag, self.l, self.M, g)
            mixed = reanchor_eps(eps_u.float(), eps_m.float(), eps_o.float(), s, g)
            # The pipeline computes u + g (m' - u); this m' makes that the PR mixture.
            folded = (eps_u.float() + (mixed - eps_u.float()) / g).to(eps_m.dtype)
            guided_text = torch.where(on.view(-1, *([1] * (eps_m.dim() - 1))), folded, eps_m)
            for i in on.nonzero().flatten().tolist():
                self.reanchored_steps[i] += 1
        return unet_call.with_prediction(output, torch.cat([eps_u, guided_text]))
