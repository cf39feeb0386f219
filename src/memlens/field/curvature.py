"""Kim & Lee (ICML 2026): localize memorized pixels by coordinate-wise curvature differences at the last step.

Source: `Gwangho99/mem-curv-diff` @42a30d4434 (`metric_utils.py`: `hutchinson_diag_from_output`,
`compute_diag_h_diff_only` = the `cov` map, `compute_score_diffs_only` = the `score_diff` map;
`generate_metric_maps.py` defaults: 50 DDIM steps, step index 49, K = 16 probes).

- `hutchinson_diagonal`: diag(J) of a vector function's Jacobian from Rademacher probes v, as the mean of
  v * (J^T v) (one vector-Jacobian product per probe). E[v v^T] = I makes it unbiased: E[v_i (J^T v)_i] = J_ii.
  For a score function s = grad log p, J is the Hessian of log p, so this is the Hessian diagonal.
- `curvature_difference_map`: mem-curv-diff's `cov` map. They estimate the diagonal of J_s for
  s = -(eps_c - eps_u) (deliberately not divided by sigma_t, "to avoid numerical instability") and keep
  relu(-sum_c diag); since -diag(J_s) = diag(J_{eps_c - eps_u}), that is relu(sum_c diag d(eps_c - eps_u)/dx).
- `score_difference_map`: their `score_diff` baseline, sum_c ((eps_c - eps_u) / sigma_t)^2 with
  sigma_t = sqrt(1 - alpha_bar_t) (`--is_score`, on by default); with `sigma_t=None` it is the plain energy map
  sum_c (eps_c - eps_u)^2.

Cost at the step where the map is taken (per image): the curvature map needs the step's two UNet evaluations (eps_c,
eps_u) WITH an autograd graph kept, plus K backward passes through both (K = 16: about 2K = 32 backward passes of one
evaluation, each roughly twice a forward); the plain generation's own two evaluations at that step can be these.
The score-difference map costs nothing beyond the generation.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["rademacher", "hutchinson_diagonal", "curvature_difference_map", "score_difference_map"]


def rademacher(shape, *, generator: torch.Generator | None = None, dtype=torch.float32, device=None) -> torch.Tensor:
    """Independent +-1 entries with probability 1/2 each."""
    # Drawn on the CPU so a seeded CPU generator gives the same probes whatever the device.
    bits = torch.randint(0, 2, tuple(shape), generator=generator)
    return (bits * 2 - 1).to(dtype=dtype, device=device)


def hutchinson_diagonal(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    probes: int | torch.Tensor = 16,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Estimate of diag(d fn(x) / dx) with the shape of x: mean over probes v of v * (J^T v).

    `fn` maps a tensor to one of the same shape (e.g. one denoiser output from its input). Samples of a batch do not
    mix in a denoiser, so the estimate is per sample. `probes` is a count (Rademacher vectors drawn from `generator`,
    on the CPU so a seed gives the same probes on any device) or a (K, *x.shape) tensor of given probe vectors.
    The graph of fn is built once and reused by every probe.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y = fn(x)
    if y.shape != x.shape:
        raise ValueError(f"fn must keep the input's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    if isinstance(probes, int):
        if probes < 1:
            raise ValueError(f"probes must be >= 1, got {probes}")
        vs = (rademacher(x.shape, generator=generator, dtype=x.dtype, device=x.device) for _ in range(probes))
        k = probes
    else:
        if tuple(probes.shape[1:]) != tuple(x.shape):
            want = ", ".join(map(str, x.shape))
            raise ValueError(f"probe vectors must have shape (K, {want}), got {tuple(probes.shape)}")
        vs = iter(probes.to(x))
        k = probes.shape[0]
    diag = torch.zeros_like(x)
    for i, v in enumerate(vs):
        (jtv,) = torch.autograd.grad(y, x, grad_outputs=v, retain_graph=i < k - 1)
        diag += v * jtv
    return (diag / k).detach()


def curvature_difference_map(
    eps: Callable[[torch.Tensor, Any, Any], torch.Tensor],
    x_last: torch.Tensor,
    t_last: Any,
    cond: Any,
    uncond: Any,
    probes: int | torch.Tensor = 16,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """mem-curv-diff's `cov` map: relu(sum over channels of diag d(eps_c - eps_u)/dx) at (x_last, t_last), (B, h, w).

    `eps(x, t, cond)` is the denoiser's noise prediction for the latents it is given (wrap any input scaling inside
    it). mem-curv-diff takes the map at the last of 50 DDIM steps (t = 1 for SD v1.4), on that step's latents.
    """
    diff = lambda x: eps(x, t_last, cond) - eps(x, t_last, uncond)  # noqa: E731
    diag = hutchinson_diagonal(diff, x_last, probes=probes, generator=generator)
    return diag.sum(dim=1).clamp_min(0)


def score_difference_map(
    eps_c: torch.Tensor, eps_u: torch.Tensor, sigma_t: float | torch.Tensor | None = None
) -> torch.Tensor:
    """sum_c ((eps_c - eps_u) / sigma_t)^2, (B, h, w); without sigma_t the unscaled energy sum_c (eps_c - eps_u)^2.

    sigma_t = sqrt(1 - alpha_bar_t) of the step, a float or a (B,) tensor. A factor common to every image does not
    change any threshold rule on min-max normalised maps, but it does move mem-curv-diff's oracle (log1p before
    normalising), so pass sigma_t to reproduce their numbers.
    """
    d = (eps_c - eps_u).float()
    if sigma_t is not None:
        s = torch.as_tensor(sigma_t, dtype=d.dtype, device=d.device)
        d = d / (s.reshape(-1, *([1] * (d.dim() - 1))) if s.dim() else s)
    return (d**2).sum(dim=1)
