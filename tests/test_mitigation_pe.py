"""Prompt-embedding optimisation (pe, pe-be) on tiny random pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memlens import BrightEndingProbe
from memlens.mitigation import Job, Settings, mitigate_batch
from memlens.mitigation.conditioning import draw_noise, encode, first_step, image_magnitude, mask_tensor
from memlens.mitigation.prompt_embedding import optimize_embeddings
from memlens.testing import tiny_pipeline

STEPS, G, H = 3, 3.0, 32
PROMPTS = ["a cat on a mat", "an astronaut riding a horse", "zzz"]
SEEDS = [11, 12, 13]


@pytest.fixture(scope="module")
def sd1():
    return tiny_pipeline("sd1")


def _first(pipe, prompts, seeds):
    cond = encode(pipe, prompts)
    noise = draw_noise(pipe, seeds, H, H, dtype=cond.embeds.dtype)
    return cond, noise, first_step(pipe, cond, noise, steps=STEPS, guidance=G, height=H, width=H)


def _plain(pipe, prompts, seeds):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    with BrightEndingProbe(pipe) as probe:
        out = pipe(prompts, num_inference_steps=STEPS, guidance_scale=G, generator=gens, height=H, width=H)
    return [np.asarray(im) for im in out.images], probe.records


def test_first_step_magnitude_is_the_probes_D0(sd1):
    _, _, step = _first(sd1, PROMPTS, SEEDS)
    with torch.no_grad():
        d = image_magnitude(step.eps_diff()).numpy()
    _, records = _plain(sd1, PROMPTS, SEEDS)
    np.testing.assert_allclose(d, [r.magnitude[0] for r in records], rtol=1e-5)


def test_stops_at_target_bos_frozen_and_final_is_measured(sd1):
    cond, _, step = _first(sd1, PROMPTS, SEEDS)
    with torch.no_grad():
        d0 = image_magnitude(step.eps_diff()).numpy()
    target = float(np.sort(d0)[0] * 0.95)  # every image triggered
    res = optimize_embeddings(step, cond.embeds, target)
    assert all(res.triggered)
    for i in range(len(PROMPTS)):
        assert res.final[i] <= target or res.iterations[i] == 10
        assert res.final[i] < res.initial[i]
        if res.final[i] <= target:
            assert res.iterations[i] < 10  # stopped early, at the first iterate under target
    assert any(f <= target for f in res.final)
    assert torch.equal(res.embeds[:, 0], cond.embeds[:, 0])  # BOS bit-identical
    assert not torch.equal(res.embeds[:, 1:], cond.embeds[:, 1:])
    with torch.no_grad():
        again = image_magnitude(step.eps_diff(res.embeds)).numpy()
    np.testing.assert_allclose(again, res.final, rtol=1e-4)  # the reported loss is that of the returned embedding


def test_zero_iterations_and_untriggered_rows_are_untouched(sd1):
    cond, _, step = _first(sd1, PROMPTS, SEEDS)
    with torch.no_grad():
        d0 = image_magnitude(step.eps_diff()).numpy()
    mid = float(np.sort(d0)[:2].mean())
    res = optimize_embeddings(step, cond.embeds, mid, max_iters=3)
    for i, v in enumerate(d0):
        assert res.triggered[i] == (v > mid)
        if not res.triggered[i]:
            assert torch.equal(res.embeds[i], cond.embeds[i]) and res.iterations[i] == 0
        else:
            assert res.iterations[i] <= 3


def test_decision_and_embedding_independent_of_batch(sd1):
    # The same prompt and seed alone and inside a batch of three: same trigger decision, same iterations, same
    # embedding up to floating-point noise. The batch-level norm of the reference would fail this.
    cond1, _, step1 = _first(sd1, PROMPTS[1:2], SEEDS[1:2])
    cond3, _, step3 = _first(sd1, PROMPTS, SEEDS)
    with torch.no_grad():
        d = image_magnitude(step1.eps_diff()).item()
    target = d * 0.9
    r1 = optimize_embeddings(step1, cond1.embeds, target)
    r3 = optimize_embeddings(step3, cond3.embeds, target)
    assert r1.triggered[0] == r3.triggered[1] is True
    assert r1.iterations[0] == r3.iterations[1]
    torch.testing.assert_close(r1.embeds[0], r3.embeds[1], rtol=0, atol=1e-4)
    assert abs(r1.final[0] - r3.final[1]) < 1e-3


def test_untriggered_images_bit_identical_to_plain_generation(sd1):
    images, records = _plain(sd1, PROMPTS, SEEDS)
    d0 = np.array([r.magnitude[0] for r in records])
    target = float(np.sort(d0)[1:].mean())  # between the two largest: one triggered, two not
    jobs = [Job(p, s) for p, s in zip(PROMPTS, SEEDS)]
    outs = mitigate_batch(sd1, jobs, Settings(method="pe", steps=STEPS, guidance=G, height=H, width=H, target=target,
                                              max_iters=2))
    assert [o.triggered for o in outs] == list(d0 > target)
    for o, img, rec in zip(outs, images, records):
        if o.triggered:
            assert not np.array_equal(np.asarray(o.image), img)
            # the generation's own first-step D is the optimised embedding's loss
            assert o.record.magnitude[0] == pytest.approx(o.final_magnitude, rel=1e-4)
        else:
            assert np.array_equal(np.asarray(o.image), img)
            assert np.array_equal(o.record.magnitude, rec.magnitude)
            assert o.iterations == 0 and o.final_magnitude == o.initial_magnitude


def test_pe_be_uses_the_unmitigated_pass_mask(sd1):
    images, records = _plain(sd1, PROMPTS, SEEDS)
    ld0 = np.array([r.masked_magnitude[0] for r in records])
    target = float(np.sort(ld0)[1:].mean())
    jobs = [Job(p, s) for p, s in zip(PROMPTS, SEEDS)]
    outs = mitigate_batch(sd1, jobs, Settings(method="pe-be", steps=STEPS, guidance=G, height=H, width=H,
                                              target=target, max_iters=2))
    np.testing.assert_allclose([o.initial_magnitude for o in outs], ld0, rtol=1e-5)  # LD_0 with the final-step mask
    for o, img in zip(outs, images):
        if o.triggered:
            assert np.array_equal(np.asarray(o.unmitigated_image), img)  # the mask pass is the plain generation
        else:
            assert np.array_equal(np.asarray(o.image), img) and o.unmitigated_image is None


def test_masked_loss_of_uniform_mask_is_D(sd1):
    cond, noise, step = _first(sd1, PROMPTS, SEEDS)
    with torch.no_grad():
        diff = step.eps_diff()
    m = mask_tensor([np.full((4, 4), 0.3, np.float32)] * 3, noise.shape[-2:], diff.device)
    torch.testing.assert_close(image_magnitude(diff, m), image_magnitude(diff))


def test_sdxl_keeps_pooled_and_bos():
    pipe = tiny_pipeline("sdxl")
    cond, _, step = _first(pipe, PROMPTS[:2], SEEDS[:2])
    with torch.no_grad():
        d0 = image_magnitude(step.eps_diff()).numpy()
    res = optimize_embeddings(step, cond.embeds, float(d0.min()) * 0.9, max_iters=2)
    assert torch.equal(res.embeds[:, 0], cond.embeds[:, 0])
    assert all(r == 2 or f <= float(d0.min()) * 0.9 for r, f in zip(res.iterations, res.final))
    pooled_before = step.kwargs["added_cond_kwargs"]["text_embeds"].clone()
    step.eps_diff(res.embeds)
    assert torch.equal(step.kwargs["added_cond_kwargs"]["text_embeds"], pooled_before)
    jobs = [Job(p, s) for p, s in zip(PROMPTS[:2], SEEDS[:2])]
    outs = mitigate_batch(pipe, jobs, Settings(method="pe", steps=STEPS, guidance=G, height=H, width=H,
                                               target=float(d0.min()) * 0.9, max_iters=1))
    assert all(o.triggered and o.iterations == 1 for o in outs)
