"""Per-image memorization scores from a denoiser at pure noise: anisotropy (Asthana & Belagiannis) and SAIL sharpness
(Jeon, Kim & No).

Both take `model(x, t, cond) -> output`, the denoiser's raw output (epsilon or v) for the input it is given (the
scheduler's scaled latents, as the UNet sees them), so any UNet or transformer wrapper fits; `cond` is whatever that
wrapper takes (text embeddings, a dict of SDXL conditions ...). Scores are (B,) tensors; larger = more memorized.

Anisotropy, `rohanasthana/memorization-anisotropy` @97e991bac4 (`local_model/pipe.py`, `detect_eval.py`):
    score = gamma_norm * norm_scale * ||out_c(x_T, t_norm) - out_u(x_T, t_norm)||_2
          + gamma_cos  * mean_pixels cos_channels(out_u(x_T, t_cos), out_c(x_T, t_cos) - out_u(x_T, t_cos))
  - both terms on the SAME pure-noise input x_T: t_norm = the first sampling timestep, t_cos = the third-to-last
    (`timesteps[-3]`, 41 for 50 DDIM steps on SD 1.x); no denoising;
  - the cosine is taken over the channel axis at every pixel and averaged over pixels (`cosine_similarity(.., dim=1)`
    then `.mean()`), not over the flattened latent;
  - for epsilon models the norm term is Wen's first-step D: their code computes a SAIL Hessian-vector product and
    comments it out (`comb_hvp = eps_diff`);
  - norm_scale: 1 for epsilon models (their SD1 path uses the raw eps difference), sqrt(a_t)/(1 - a_t) for v models
    (their SD2 path uses score = (sqrt(a_t) v - x)/(1 - a_t)); see `anisotropy_norm_scale`;
  - their weights (`detect_eval.py`), per model: SD1 gamma_norm 1.0 / gamma_cos 2.0, SD2 1.0 / 0.1, Realistic
    Vision 2 / 1 (the code's gamma_1 weights the norm, the paper's gamma_1 the cosine); `ANISOTROPY_GAMMAS`.
  - cost: 4 evaluations per image (c and u at t_norm, c and u at t_cos), no gradients, no generation. The two at
    t_norm are exactly the generation's first step, so inside a generation the extra cost is 2 evaluations.

SAIL sharpness, `Dongjae0324/sharpness_memorization_diffusion` @f4ee4b8140 (`local_model/pipe.py`, detection branch):
    score = || H_delta s_delta ||_2,  s_delta = a_t (out_c - out_u),  H_delta v = a_t (J_c - J_u) v
  i.e. a_t^2 ||(J_c - J_u)(out_c - out_u)|| with J = d out / dx at the scaled latents; score s = a_t * out (+ terms in
  x alone, which cancel in every difference); a_t = -1/sqrt(1 - alpha_bar_t) for epsilon models and
  sqrt(alpha_bar_t)/(1 - alpha_bar_t) for v models, as their code (`score_scale`). Their default is the first step
  only (`--hvp_sampling_num 1`: x = x_T, t = timesteps[0]); more steps average the per-step scores.
  - cost per image per sampled step: the step's 2 evaluations (shared with the generation) + 2 Jacobian-vector
    products (c and u), each about 2-3 evaluations' work in forward mode.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "ANISOTROPY_GAMMAS",
    "anisotropy_timesteps",
    "anisotropy_norm_scale",
    "anisotropy_terms",
    "anisotropy_combine",
    "anisotropy_score",
    "score_scale",
    "sharpness_score",
]

Denoiser = Callable[[torch.Tensor, Any, Any], torch.Tensor]

# (gamma_norm, gamma_cos) from detect_eval.py: sd_ver 1, 2 and "99" (Realistic Vision V5.1).
ANISOTROPY_GAMMAS = {"sd1": (1.0, 2.0), "sd2": (1.0, 0.1), "realistic_vision": (2.0, 1.0)}

_PAIRINGS = ("x,c|x", "x,x|c", "x|c,c|x")


def _wide(t: torch.Tensor) -> torch.Tensor:
    # Half-precision outputs are summed in float32; float64 stays float64.
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _per_sample(value, like: torch.Tensor) -> torch.Tensor:
    # A float, or one value per sample, broadcast over every other axis of `like`.
    v = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return v.reshape(-1, *([1] * (like.dim() - 1))) if v.dim() else v


def anisotropy_timesteps(timesteps: Sequence) -> tuple[Any, Any]:
    """(t_norm, t_cos) = (timesteps[0], timesteps[-3]) of the scheduler's sampling timesteps, as their pipeline."""
    if len(timesteps) < 3:
        raise ValueError(f"the anisotropy cosine term uses timesteps[-3]; got only {len(timesteps)} timesteps")
    return timesteps[0], timesteps[-3]


def anisotropy_norm_scale(prediction_type: str, alpha_bar_t: float) -> float:
    """The factor their code puts on ||out_c - out_u|| at t_norm: 1 (epsilon), sqrt(a)/(1 - a) (v_prediction)."""
    if prediction_type == "epsilon":
        return 1.0
    if prediction_type == "v_prediction":
        return float(alpha_bar_t) ** 0.5 / (1.0 - float(alpha_bar_t))
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")


def anisotropy_terms(
    out_c_norm: torch.Tensor,
    out_u_norm: torch.Tensor,
    out_c_cos: torch.Tensor,
    out_u_cos: torch.Tensor,
    *,
    norm_scale: float | torch.Tensor = 1.0,
    pairing: str = "x,c|x",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm term, cosine term), each (B,), from already computed outputs (B, C, ...) at t_norm and t_cos.

    pairing names the two vectors of the cosine as their `--mode`: "x,c|x" (default: unconditional vs guidance
    direction c - u), "x,x|c" (unconditional vs conditional), "x|c,c|x" (conditional vs guidance direction).
    """
    if pairing not in _PAIRINGS:
        raise ValueError(f"pairing must be one of {_PAIRINGS}, got {pairing!r}")
    diff = _wide(out_c_norm - out_u_norm)
    norm = diff.flatten(1).norm(dim=1) * torch.as_tensor(norm_scale, dtype=diff.dtype, device=diff.device)
    u, c = _wide(out_u_cos), _wide(out_c_cos)
    a, b = {"x,c|x": (u, c - u), "x,x|c": (u, c), "x|c,c|x": (c, c - u)}[pairing]
    cos = F.cosine_similarity(a, b, dim=1).flatten(1).mean(dim=1)
    return norm, cos


def anisotropy_combine(norm: torch.Tensor, cos: torch.Tensor, gamma_norm: float, gamma_cos: float) -> torch.Tensor:
    """gamma_norm * norm + gamma_cos * cos (their `combined_score`)."""
    return gamma_norm * norm + gamma_cos * cos


@torch.no_grad()
def anisotropy_score(
    model: Denoiser,
    x: torch.Tensor,
    t_norm: Any,
    t_cos: Any,
    cond: Any,
    uncond: Any,
    *,
    gamma_norm: float = ANISOTROPY_GAMMAS["sd1"][0],
    gamma_cos: float = ANISOTROPY_GAMMAS["sd1"][1],
    norm_scale: float | torch.Tensor = 1.0,
    x_cos: torch.Tensor | None = None,
    pairing: str = "x,c|x",
) -> torch.Tensor:
    """Asthana & Belagiannis' score per image, (B,), from 4 denoiser evaluations on the pure-noise input x.

    x_cos is the input at t_cos when the scheduler scales inputs per timestep (their code rescales the t_norm input
    for t_cos; for DDIM both are x). Defaults: SD 1.x weights, epsilon scaling.
    """
    x_cos = x if x_cos is None else x_cos
    norm, cos = anisotropy_terms(
        model(x, t_norm, cond), model(x, t_norm, uncond), model(x_cos, t_cos, cond), model(x_cos, t_cos, uncond),
        norm_scale=norm_scale, pairing=pairing,
    )
    return anisotropy_combine(norm, cos, gamma_norm, gamma_cos)


def score_scale(prediction_type: str, alpha_bar_t: float) -> float:
    """a_t with score = a_t * output (+ x terms): -1/sqrt(1 - a) for epsilon, sqrt(a)/(1 - a) for v (SAIL's code)."""
    a = float(alpha_bar_t)
    if prediction_type == "epsilon":
        return -1.0 / (1.0 - a) ** 0.5
    if prediction_type == "v_prediction":
        return a**0.5 / (1.0 - a)
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")


def _math_attention():
    # Fused attention kernels (flash, memory-efficient) have no forward-mode or double-backward derivative, so the
    # JVP needs the math kernel; the context restores the previous kernel choice on exit (SAIL flips the same
    # switches globally).
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: no scoped switch; fused kernels may then refuse the JVP
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def _jvp(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, v: torch.Tensor, method: str) -> torch.Tensor:
    with _math_attention():
        if method == "forward":
            with torch.no_grad():
                return torch.func.jvp(fn, (x,), (v,))[1]
        if method == "double_backward":
            return torch.autograd.functional.jvp(fn, (x,), (v,))[1].detach()
    raise ValueError(f"jvp must be 'forward' or 'double_backward', got {method!r}")


def sharpness_score(
    model: Denoiser,
    x: torch.Tensor,
    t: Any,
    cond: Any,
    uncond: Any,
    *,
    scale: float | torch.Tensor,
    jvp: str = "forward",
    outputs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """SAIL's ||H_delta s_delta||_2 per image, (B,), at the model input x and timestep t.

    scale: a_t from `score_scale` (a float, or (B,) when samples sit at different timesteps). `outputs` =
    (out_c, out_u) at (x, t) when the generation already computed them, saving 2 evaluations. `jvp`: "forward"
    (torch.func.jvp, as SAIL) or "double_backward" (reverse mode twice; for models forward mode cannot trace).
    """
    if outputs is None:
        with torch.no_grad():
            outputs = (model(x, t, cond), model(x, t, uncond))
    out_c, out_u = outputs
    s_delta = (_per_sample(scale, out_c) * (out_c - out_u)).to(x.dtype)
    j_c = _jvp(lambda z: model(z, t, cond), x, s_delta, jvp)
    j_u = _jvp(lambda z: model(z, t, uncond), x, s_delta, jvp)
    hvp = _per_sample(scale, j_c) * (j_c - j_u)
    return _wide(hvp).flatten(1).norm(dim=1)
