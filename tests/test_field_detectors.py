"""Anisotropy and SAIL sharpness against formulas written out here: numpy for the anisotropy terms, the explicit
Jacobian matrix and central finite differences for SAIL's Hessian-vector product."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memlens.field import detectors as det


def _toy_model(seed=0, channels=3):
    # Output depends on x, t and the text condition nonlinearly, with channel and spatial mixing.
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(channels, channels, generator=g, dtype=torch.float64) / channels**0.5
    p = torch.randn(channels, 2, generator=g, dtype=torch.float64)

    def model(x, t, cond):
        t = torch.as_tensor(t, dtype=x.dtype)
        h = torch.einsum("oc,bchw->bohw", w, x) + 0.4 * torch.roll(x, 1, dims=-1)
        return torch.tanh(h * (1 + t / 1000) + (cond @ p.T)[:, :, None, None]) + 0.3 * x * torch.sin(t / 300)

    return model


def _inputs(seed=1, b=2, c=3, h=4, w=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    cond = torch.randn(b, 2, generator=g, dtype=torch.float64)
    uncond = torch.zeros(b, 2, dtype=torch.float64)
    return x, cond, uncond


def _np_anisotropy(oc_n, ou_n, oc_c, ou_c, norm_scale, g_norm, g_cos):
    oc_n, ou_n, oc_c, ou_c = (np.asarray(a, dtype=np.float64) for a in (oc_n, ou_n, oc_c, ou_c))
    norm = norm_scale * np.sqrt(((oc_n - ou_n) ** 2).reshape(len(oc_n), -1).sum(1))
    a, b = ou_c, oc_c - ou_c
    cos = (a * b).sum(1) / (np.sqrt((a**2).sum(1)) * np.sqrt((b**2).sum(1)))  # over channels, per pixel
    return g_norm * norm + g_cos * cos.reshape(len(cos), -1).mean(1), norm, cos.reshape(len(cos), -1).mean(1)


def test_anisotropy_terms_match_numpy_per_pixel_channel_cosine():
    rng = np.random.default_rng(0)
    oc_n, ou_n, oc_c, ou_c = (rng.normal(size=(3, 4, 5, 6)) for _ in range(4))
    norm, cos = det.anisotropy_terms(*(torch.tensor(a) for a in (oc_n, ou_n, oc_c, ou_c)), norm_scale=0.7)
    _, want_norm, want_cos = _np_anisotropy(oc_n, ou_n, oc_c, ou_c, 0.7, 1, 1)
    assert np.allclose(norm.numpy(), want_norm, rtol=1e-6)
    assert np.allclose(cos.numpy(), want_cos, rtol=1e-5, atol=1e-7)
    # The cosine over the flattened latent is a different number: the per-pixel convention matters.
    a, b = ou_c, oc_c - ou_c
    a, b = a.reshape(3, -1), b.reshape(3, -1)
    flat = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert not np.allclose(cos.numpy(), flat, atol=1e-3)


def test_anisotropy_pairings():
    rng = np.random.default_rng(1)
    u, c = rng.normal(size=(2, 4, 3, 3)), rng.normal(size=(2, 4, 3, 3))

    def np_cos(a, b):
        return ((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).reshape(2, -1).mean(1)

    for pairing, (a, b) in {"x,c|x": (u, c - u), "x,x|c": (u, c), "x|c,c|x": (c, c - u)}.items():
        tc, tu = torch.tensor(c), torch.tensor(u)
        _, cos = det.anisotropy_terms(tc, tu, tc, tu, pairing=pairing)
        assert np.allclose(cos.numpy(), np_cos(a, b), rtol=1e-5), pairing
    with pytest.raises(ValueError, match="pairing"):
        det.anisotropy_terms(*(torch.tensor(u),) * 4, pairing="c,u")


def test_anisotropy_score_evaluates_norm_and_cosine_at_their_own_timesteps():
    model = _toy_model()
    x, cond, uncond = _inputs()
    timesteps = list(range(981, 0, -20))
    t_norm, t_cos = det.anisotropy_timesteps(timesteps)
    assert (t_norm, t_cos) == (timesteps[0], timesteps[-3])
    got = det.anisotropy_score(model, x, t_norm, t_cos, cond, uncond, gamma_norm=1.0, gamma_cos=0.1, norm_scale=2.0)
    outs = [model(x, t, e).numpy() for t, e in ((t_norm, cond), (t_norm, uncond), (t_cos, cond), (t_cos, uncond))]
    want, _, _ = _np_anisotropy(*outs, 2.0, 1.0, 0.1)
    assert got.shape == (x.shape[0],)
    assert np.allclose(got.numpy(), want, rtol=1e-6)
    swapped = det.anisotropy_score(model, x, t_cos, t_norm, cond, uncond, gamma_norm=1.0, gamma_cos=0.1, norm_scale=2.0)
    assert not torch.allclose(got, swapped)
    with pytest.raises(ValueError, match="timesteps\\[-3\\]"):
        det.anisotropy_timesteps([981, 1])


def test_scales_by_prediction_type():
    a = 0.36  # sqrt(a) = 0.6, 1 - a = 0.64, sqrt(1 - a) = 0.8
    assert det.score_scale("epsilon", a) == pytest.approx(-1.25)
    assert det.score_scale("v_prediction", a) == pytest.approx(0.6 / 0.64)
    assert det.anisotropy_norm_scale("epsilon", a) == 1.0
    assert det.anisotropy_norm_scale("v_prediction", a) == pytest.approx(0.6 / 0.64)
    with pytest.raises(ValueError, match="prediction_type"):
        det.score_scale("sample", a)


def test_identical_branches_score_zero():
    model = _toy_model()
    x, cond, _ = _inputs()
    zero = torch.zeros(2, dtype=torch.float64)
    assert torch.allclose(det.sharpness_score(model, x, 500, cond, cond, scale=-2.0), zero)
    norm, _ = det.anisotropy_terms(*(model(x, 500, cond),) * 4)
    assert torch.allclose(norm, torch.zeros(2, dtype=torch.float64))


def _explicit_sharpness(model, x, t, cond, uncond, scale):
    # scale^2 * (J_c - J_u)(out_c - out_u) with the full Jacobian matrices of each sample.
    out = []
    for b in range(x.shape[0]):
        n = x[b].numel()
        one = lambda e: (lambda z: model(z[None], t, e[b : b + 1])[0])  # noqa: E731
        jac = lambda e: torch.autograd.functional.jacobian(one(e), x[b]).reshape(n, n)  # noqa: E731
        d = (model(x[b : b + 1], t, cond[b : b + 1]) - model(x[b : b + 1], t, uncond[b : b + 1])).reshape(n)
        out.append(torch.linalg.norm(scale**2 * (jac(cond) - jac(uncond)) @ d))
    return torch.stack(out)


def _finite_difference_sharpness(model, x, t, cond, uncond, scale, h=1e-5):
    s = scale * (model(x, t, cond) - model(x, t, uncond))
    jv = lambda e: (model(x + h * s, t, e) - model(x - h * s, t, e)) / (2 * h)  # noqa: E731
    return (scale * (jv(cond) - jv(uncond))).flatten(1).norm(dim=1)


@pytest.mark.parametrize("jvp", ["forward", "double_backward"])
def test_sharpness_matches_explicit_jacobian_and_finite_differences(jvp):
    model = _toy_model(seed=2)
    x, cond, uncond = _inputs(seed=3)
    scale = det.score_scale("epsilon", 0.3)
    got = det.sharpness_score(model, x, 981, cond, uncond, scale=scale, jvp=jvp)
    assert got.shape == (x.shape[0],)
    assert torch.allclose(got, _explicit_sharpness(model, x, 981, cond, uncond, scale), rtol=1e-9)
    assert torch.allclose(got, _finite_difference_sharpness(model, x, 981, cond, uncond, scale), rtol=1e-6)


def test_sharpness_per_sample_scale_and_precomputed_outputs():
    model = _toy_model(seed=4)
    x, cond, uncond = _inputs(seed=5)
    scales = torch.tensor([-1.5, 0.8], dtype=torch.float64)
    got = det.sharpness_score(model, x, 700, cond, uncond, scale=scales)
    for b in range(2):
        one = det.sharpness_score(model, x[b : b + 1], 700, cond[b : b + 1], uncond[b : b + 1], scale=float(scales[b]))
        assert torch.allclose(got[b : b + 1], one)
    outs = (model(x, 700, cond), model(x, 700, uncond))
    assert torch.allclose(det.sharpness_score(model, x, 700, cond, uncond, scale=scales, outputs=outs), got)


def test_on_a_stock_unet_forward_and_reverse_jvps_agree_and_kernel_choice_is_restored():
    from memlens.testing import tiny_sd1_pipeline

    pipe = tiny_sd1_pipeline()
    unet = pipe.unet
    text, negative = pipe.encode_prompt(["a cat", "a red dog"], "cpu", 1, True)
    pipe.scheduler.set_timesteps(5)
    t = pipe.scheduler.timesteps[0]
    size = unet.config.sample_size
    x = torch.randn(2, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    model = lambda z, tt, c: unet(z, tt, encoder_hidden_states=c).sample  # noqa: E731
    cuda = torch.backends.cuda
    flags = lambda: (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled())  # noqa: E731
    before = flags()
    scale = det.score_scale(pipe.scheduler.config.prediction_type, float(pipe.scheduler.alphas_cumprod[int(t)]))
    fwd = det.sharpness_score(model, x, t, text, negative, scale=scale, jvp="forward")
    rev = det.sharpness_score(model, x, t, text, negative, scale=scale, jvp="double_backward")
    assert flags() == before
    assert torch.isfinite(fwd).all() and (fwd > 0).all()
    assert torch.allclose(fwd, rev, rtol=1e-4)
    with torch.no_grad():
        fd = _finite_difference_sharpness(model, x, t, text, negative, scale, h=1e-3)
    assert torch.allclose(fwd, fd, rtol=2e-2)
    t_norm, t_cos = det.anisotropy_timesteps(pipe.scheduler.timesteps)
    score = det.anisotropy_score(model, x, t_norm, t_cos, text, negative)
    assert score.shape == (2,) and torch.isfinite(score).all()


def _collapsing_denoisers(alpha_bar):
    # Unconditional data ~ N(0, I): eps_u = sigma x. A "memorized" prompt's data is one image x0, so its denoiser
    # pulls every input onto x0: eps_c = (x - sqrt(a) x0) / sigma. A "generic" prompt only shifts eps_u slightly.
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    shift = 0.05 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(10), dtype=torch.float64)

    def model(x, t, cond):
        a = torch.as_tensor(alpha_bar(t), dtype=x.dtype)
        sigma = (1 - a).sqrt()
        if cond == "memorized":
            return (x - a.sqrt() * x0) / sigma
        return sigma * x + (shift if cond == "generic" else 0)

    return model


def test_a_collapsing_conditional_denoiser_scores_higher_on_both_detectors():
    alpha_bar = lambda t: float(torch.cos(torch.tensor(t / 1000 * torch.pi / 2)) ** 2 * 0.999 + 0.0005)  # noqa: E731
    model = _collapsing_denoisers(alpha_bar)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    t_norm, t_cos = det.anisotropy_timesteps(list(range(981, 0, -20)))
    scores = {}
    for prompt in ("memorized", "generic"):
        anis = det.anisotropy_score(model, x, t_norm, t_cos, prompt, "uncond")
        scale = det.score_scale("epsilon", alpha_bar(t_norm))
        sharp = det.sharpness_score(model, x, t_norm, prompt, "uncond", scale=scale)
        calls = ((t_norm, prompt), (t_norm, "uncond"), (t_cos, prompt), (t_cos, "uncond"))
        _, cos = det.anisotropy_terms(*(model(x, t, c) for t, c in calls))
        scores[prompt] = (anis.item(), sharp.item(), cos.item())
    assert scores["memorized"][0] > scores["generic"][0]
    # A constant shift has no curvature at all; the collapse onto x0 has.
    assert scores["generic"][1] == pytest.approx(0.0, abs=1e-12) and scores["memorized"][1] > 1e-5
    assert scores["memorized"][2] > 0.5 > abs(scores["generic"][2])  # guidance aligns with the unconditional score
