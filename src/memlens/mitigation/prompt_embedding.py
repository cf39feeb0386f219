"""Prompt-embedding optimisation (PE, Wen et al. 2024) with D (`pe`) or BE's masked LD (`pe-be`) as the loss.

At the first denoising step, on the x_T the final generation will start from, the conditional text embedding E is
moved by AdamW until the image's magnitude is at most `target`:

    pe:     L_i = ||eps_c - eps_u||_2                   (per image)
    pe-be:  L_i = ||(eps_c - eps_u) * m_i||_2 / mean(m_i) (per image, m_i its BE map from an unmitigated pass)

Differences from the reference implementation, on purpose:
- Per image, not over the batch: each image has its own parameter and its own AdamW, its own stop test, and images
  already under target are never touched. A target therefore means the same at any batch size and any n.
- BOS is truly frozen: only positions 1..L-1 are a parameter, and the fixed BOS row is concatenated in front, so it
  stays bit-identical (AdamW's decoupled weight decay would otherwise move it).
- Each iteration evaluates before it updates, and after the last update the embedding is evaluated once more; the
  returned embedding is the first one evaluated under target, else the best evaluated one, so `final_magnitude` is a
  measured number, never a guess.
- SDXL: only the token embeddings (the UNet's cross-attention input) are optimised. The pooled embedding that feeds
  the added time/text conditioning stays the original prompt's: it is one vector per prompt, carries no per-token
  information for the BE map, and the reference method has no counterpart for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memlens.mitigation.conditioning import FirstStep
from memlens.quantities import difference_magnitude

__all__ = ["PEResult", "optimize_embeddings", "DEFAULT_LR", "DEFAULT_ITERS"]

DEFAULT_LR = 0.05
DEFAULT_ITERS = 10
DEFAULT_WEIGHT_DECAY = 0.01  # torch's AdamW default, which the reference runs with


@dataclass
class PEResult:
    """Per image: the embedding to generate with and what the optimisation measured."""

    embeds: torch.Tensor  # (n, L, D), the input's rows unchanged for images not triggered
    triggered: list[bool]
    initial: list[float]  # loss of the original embedding
    final: list[float]  # loss of the returned embedding (measured)
    iterations: list[int]  # AdamW updates applied


def optimize_embeddings(
    step: FirstStep,
    embeds: torch.Tensor,
    target: float,
    *,
    masks: torch.Tensor | None = None,
    lr: float = DEFAULT_LR,
    max_iters: int = DEFAULT_ITERS,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
) -> PEResult:
    """Optimise each row of `embeds` (n, L, D) on the first-step UNet call `step` until its loss <= `target`.

    `masks` (n, H, W) at latent size switches the loss from D to LD.
    """
    n = embeds.shape[0]
    with torch.no_grad():
        initial = difference_magnitude(step.eps_diff(embeds), masks).tolist()
    triggered = [v > target for v in initial]
    out = embeds.detach().clone()
    final = list(initial)
    iterations = [0] * n

    bos = embeds[:, :1].detach()
    params = {i: torch.nn.Parameter(embeds[i, 1:].detach().float().clone()) for i in range(n) if triggered[i]}
    optims = {i: torch.optim.AdamW([p], lr=lr, weight_decay=weight_decay) for i, p in params.items()}
    best = {i: (initial[i], embeds[i].detach().clone()) for i in params}
    active = sorted(params)
    while active:
        rows = torch.cat([torch.cat([bos[i], params[i].to(embeds.dtype)])[None] for i in active])
        losses = difference_magnitude(step.eps_diff(rows, rows=active), None if masks is None else masks[active])
        values = losses.detach().tolist()
        stepping = []
        for j, i in enumerate(active):
            if values[j] <= target or values[j] < best[i][0]:
                best[i] = (values[j], rows[j].detach().clone())
            if values[j] > target and iterations[i] < max_iters:
                stepping.append(j)
        if stepping:
            inputs = [params[active[j]] for j in stepping]
            grads = torch.autograd.grad(losses[stepping].sum(), inputs)
            for j, g in zip(stepping, grads):
                i = active[j]
                params[i].grad = g
                optims[i].step()
                optims[i].zero_grad(set_to_none=True)
                iterations[i] += 1
        active = [active[j] for j in stepping]
    for i, (value, row) in best.items():
        out[i] = row
        final[i] = value
    return PEResult(out, triggered, initial, final, iterations)
