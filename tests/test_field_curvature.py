"""Hutchinson diagonal, curvature-difference and score-difference maps against exact Jacobians and direct formulas."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from memlens.field import curvature as cv


def _all_rademacher(shape) -> torch.Tensor:
    n = int(np.prod(shape))
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=n)), dtype=torch.float64)
    return signs.reshape(len(signs), *shape)


def _toy_eps(seed=0, channels=2):
    # A small denoiser with channel mixing, spatial mixing, a nonlinearity and text conditioning: its Jacobian has
    # off-diagonal entries everywhere a Hutchinson estimate must average out.
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(channels, channels, generator=g, dtype=torch.float64)
    p = torch.randn(channels, 3, generator=g, dtype=torch.float64)

    def eps(x, t, cond):
        mixed = torch.einsum("oc,bchw->bohw", w, x) + 0.5 * torch.roll(x, 1, dims=-1) - 0.3 * torch.roll(x, 1, dims=-2)
        bias = (cond @ p.T)[:, :, None, None]
        return torch.tanh(mixed * (1 + t) + bias) + x**2 * bias

    return eps


def _exact_diag(fn, x):
    # Per-sample Jacobian diagonal from the full autograd Jacobian.
    out = []
    for b in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda z: fn(z[None])[0], x[b])
        n = x[b].numel()
        out.append(jac.reshape(n, n).diagonal().reshape(x[b].shape))
    return torch.stack(out)


def test_exactly_unbiased_on_a_linear_map():
    # Averaging over every Rademacher vector is the expectation itself: it must give diag(A) to rounding.
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    x = torch.randn(1, 6, 1, 1, dtype=torch.float64)
    fn = lambda z: (a @ z.reshape(-1)).reshape(z.shape)  # noqa: E731
    est = cv.hutchinson_diagonal(fn, x, probes=_all_rademacher(x.shape))
    assert torch.allclose(est.reshape(-1), a.diagonal(), atol=1e-12)


def test_full_enumeration_is_exact_for_a_nonlinear_network():
    eps = _toy_eps()
    x = torch.randn(1, 2, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cond = torch.randn(1, 3, dtype=torch.float64)
    fn = lambda z: eps(z, 0.5, cond)  # noqa: E731
    est = cv.hutchinson_diagonal(fn, x, probes=_all_rademacher(x.shape))
    assert torch.allclose(est, _exact_diag(fn, x), atol=1e-10)


def test_random_probes_within_the_estimators_own_standard_error():
    eps = _toy_eps(seed=3)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=gen)
    cond = torch.randn(2, 3, dtype=torch.float64, generator=gen)
    fn = lambda z: eps(z, 0.5, cond)  # noqa: E731
    k = 3000
    est = cv.hutchinson_diagonal(fn, x, probes=k, generator=torch.Generator().manual_seed(7))
    # Var of one probe's v_i (J^T v)_i is sum_{j != i} J_ji^2, so the mean of k has that over k.
    for b in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda z: fn(z[None].expand(2, -1, -1, -1).clone())[b], x[b])
        n = x[b].numel()
        jac = jac.reshape(n, n)
        exact = jac.diagonal()
        sd = ((jac**2).sum(0) - exact**2).clamp_min(0).sqrt() / k**0.5
        err = (est[b].reshape(-1) - exact).abs()
        assert (err <= 5 * sd + 1e-12).all(), (err / sd).max()
        assert sd.max() > 0  # the check is not vacuous: the Jacobian is not diagonal


def test_seeded_generator_gives_the_same_estimate():
    eps = _toy_eps()
    x = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    cond = torch.randn(1, 3, dtype=torch.float64)
    fn = lambda z: eps(z, 0.1, cond)  # noqa: E731
    run = lambda s: cv.hutchinson_diagonal(fn, x, 4, torch.Generator().manual_seed(s))  # noqa: E731
    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


def test_curvature_difference_map_is_relu_of_channel_summed_exact_diagonal():
    eps = _toy_eps(seed=4)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 2, 3, dtype=torch.float64, generator=gen)
    cond, uncond = torch.randn(1, 3, dtype=torch.float64, generator=gen), torch.zeros(1, 3, dtype=torch.float64)
    got = cv.curvature_difference_map(eps, x, 0.2, cond, uncond, probes=_all_rademacher(x.shape))
    exact = _exact_diag(lambda z: eps(z, 0.2, cond) - eps(z, 0.2, uncond), x).sum(dim=1).clamp_min(0)
    assert got.shape == (1, 2, 3)
    assert torch.allclose(got, exact, atol=1e-10)
    assert (exact == 0).any() and (exact > 0).any()  # the relu acts on this example


def test_score_difference_map_matches_numpy():
    rng = np.random.default_rng(0)
    ec, eu = rng.normal(size=(3, 4, 5, 6)), rng.normal(size=(3, 4, 5, 6))
    sig = np.array([0.3, 0.5, 0.9])
    want = (((ec - eu) / sig[:, None, None, None]) ** 2).sum(axis=1)
    got = cv.score_difference_map(torch.tensor(ec), torch.tensor(eu), torch.tensor(sig))
    assert got.shape == (3, 5, 6)
    assert np.allclose(got.numpy(), want, rtol=1e-6)
    tc, tu = torch.tensor(ec), torch.tensor(eu)
    assert np.allclose(cv.score_difference_map(tc, tu, 0.5).numpy(), (((ec - eu) / 0.5) ** 2).sum(1), rtol=1e-6)
    assert np.allclose(cv.score_difference_map(tc, tu).numpy(), ((ec - eu) ** 2).sum(1), rtol=1e-6)


@pytest.fixture(scope="module")
def pipe():
    from memlens.testing import tiny_sd1_pipeline

    return tiny_sd1_pipeline()


def test_runs_on_a_stock_unet_at_its_last_step(pipe):
    unet = pipe.unet
    text, negative = pipe.encode_prompt(["a cat", "a dog"], "cpu", 1, True)
    pipe.scheduler.set_timesteps(4)
    t_last = pipe.scheduler.timesteps[-1]
    size = unet.config.sample_size
    x = torch.randn(2, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    eps = lambda z, t, c: unet(z, t, encoder_hidden_states=c).sample  # noqa: E731
    before = [p.grad for p in unet.parameters()]

    def run():
        return cv.curvature_difference_map(eps, x, t_last, text, negative, 2, torch.Generator().manual_seed(0))

    m = run()
    assert m.shape == (2, size, size)
    assert torch.isfinite(m).all() and (m >= 0).all() and m.sum() > 0
    assert [p.grad for p in unet.parameters()] == before  # probes take input gradients only
    assert torch.allclose(m, run())


def test_on_a_score_function_it_estimates_the_hessian_diagonal_of_the_log_density():
    # s = grad log p for log p(x) = -sum log cosh(W x) - |x|^2 / 2: the Jacobian of s is the Hessian of log p.
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    log_p = lambda z: -torch.log(torch.cosh(w @ z)).sum() - 0.5 * (z**2).sum()  # noqa: E731
    x = torch.randn(5, generator=gen, dtype=torch.float64)

    def score(z):
        with torch.enable_grad():
            z = z if z.requires_grad else z.requires_grad_(True)
            return torch.stack([torch.autograd.grad(log_p(row), row, create_graph=True)[0] for row in z.unbind(0)])

    est = cv.hutchinson_diagonal(score, x[None], probes=_all_rademacher((1, 5)))
    hess = torch.autograd.functional.hessian(log_p, x)
    assert torch.allclose(est[0], hess.diagonal(), atol=1e-10)


def test_on_a_stock_unet_it_matches_forward_mode_columns_of_the_jacobian(pipe):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    unet = pipe.unet
    text, negative = pipe.encode_prompt(["a cat"], "cpu", 1, True)
    pipe.scheduler.set_timesteps(3)
    t = pipe.scheduler.timesteps[-1]
    size = unet.config.sample_size
    x = torch.randn(1, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(2))
    eps = lambda z, c: unet(z, t, encoder_hidden_states=c).sample  # noqa: E731
    diff = lambda z: eps(z, text) - eps(z, negative)  # noqa: E731
    k = 48
    probes = cv.rademacher((k, *x.shape), generator=torch.Generator().manual_seed(3))
    est = cv.hutchinson_diagonal(diff, x, probes=probes).flatten()
    flat = probes.reshape(k, -1)
    # Column i of the Jacobian from one forward-mode JVP along e_i, an independent code path: (J^T v)_i = J[:, i] . v,
    # so with the same probes the estimate must be mean_k v_ki (J[:, i] . v_k); and since E = J_ii with variance
    # sum_{j != i} J_ji^2 / k, it must also lie within 5 standard errors of J_ii.
    for i in torch.randperm(x.numel(), generator=torch.Generator().manual_seed(4))[:6].tolist():
        e = torch.zeros(x.numel())
        e[i] = 1
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            col = torch.func.jvp(diff, (x,), (e.reshape(x.shape),))[1].flatten()
        assert est[i] == pytest.approx((flat[:, i] * (flat @ col)).mean().item(), abs=1e-5)
        sd = ((col**2).sum() - col[i] ** 2).clamp_min(0).sqrt() / k**0.5
        assert abs(est[i] - col[i]) <= 5 * sd + 1e-6
