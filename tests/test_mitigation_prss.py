"""PRSS: semantic search and prompt re-anchoring, on tiny random pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memlens import BrightEndingProbe, InputError, MemlensError
from memlens.mitigation import Job, Settings, mitigate_batch
from memlens.mitigation.conditioning import draw_noise, encode, first_step
from memlens.mitigation.prss import PromptReanchor, choose_candidates, reanchor_eps, reanchor_scale, validate_pr
from memlens.testing import tiny_pipeline

STEPS, G, H = 3, 3.0, 32
PROMPTS = ["a cat on a mat", "an astronaut riding a horse", "zzz"]
ORIGINALS = ["a photo of the moon", "a red car", "qqqq rrrr"]
SEEDS = [21, 22, 23]


@pytest.fixture(scope="module")
def sd1():
    return tiny_pipeline("sd1")


def test_reanchor_scale_and_mixture_by_hand():
    g, l, M = 7.5, 3.0, 5.0
    s = reanchor_scale(torch.tensor([3.0, 4.0, 5.0, 9.0]), l, M, g)
    # c = (g l - M)/(g - 1) = 17.5/6.5; s rises linearly from 1 at l to g at M, then stays at g.
    torch.testing.assert_close(s, torch.tensor([1.0, 4.25, 7.5, 7.5]))
    u, m, o = torch.tensor([[1.0]]), torch.tensor([[2.0]]), torch.tensor([[4.0]])
    # 4 + 4.25 * (2 - 4) + (7.5 - 4.25) * (2 - 1) = -1.25
    assert reanchor_eps(u, m, o, torch.tensor([4.25]), g).item() == pytest.approx(-1.25)
    # s = g: CFG with the original prompt as the negative, o + g (m - o) = 4 - 15
    assert reanchor_eps(u, m, o, torch.tensor([g]), g).item() == pytest.approx(-11.0)
    # s = 1: plain CFG on the modified prompt, u + g (m - u)
    assert reanchor_eps(u, m, o, torch.tensor([1.0]), g).item() == pytest.approx(1 + 7.5)


def test_pr_validation():
    with pytest.raises(InputError):
        validate_pr(5.0, 5.0, 7.5)
    with pytest.raises(InputError):
        validate_pr(3.0, 5.0, 1.0)
    with pytest.raises(InputError):
        Settings(method="prss", l_target_pr=4.0, mag_thres_pr=2.0).validate()


def test_choose_candidates():
    r = choose_candidates([[0.5, 0.1], [5, 4, 0.9, 0.2], [5, 4, 3], [2, 5, 6]], target=1.0)
    assert r.chosen == [0, 2, 2, 0]
    assert r.triggered == [False, True, True, True]


def test_hooks_give_the_pr_mixture_per_image(sd1):
    mod, orig = encode(sd1, PROMPTS), encode(sd1, ORIGINALS)
    noise = draw_noise(sd1, SEEDS, H, H)
    step = first_step(sd1, mod, noise, steps=STEPS, guidance=G, height=H, width=H)
    x, t = step.args[0], step.args[1]
    n = len(PROMPTS)
    with torch.no_grad():
        eps_um = sd1.unet(x, t, encoder_hidden_states=torch.cat([mod.negative, mod.embeds])).sample
        eps_o = sd1.unet(x[n:], t, encoder_hidden_states=orig.embeds).sample
    eps_u, eps_m = eps_um[:n], eps_um[n:]
    mags = (eps_m - eps_u).flatten(1).norm(dim=1).numpy()
    order = np.sort(mags)
    l, M = float(order[:2].mean()), float(order[1:].mean())  # one image below l, one between, one above M
    hand = []
    for i in range(n):
        if mags[i] <= l:
            hand.append(eps_u[i] + G * (eps_m[i] - eps_u[i]))
            continue
        c = (G * l - M) / (G - 1)
        s_i = min(G * (mags[i] - c) / (M - c), G)
        hand.append(eps_o[i] + s_i * (eps_m[i] - eps_o[i]) + (G - s_i) * (eps_m[i] - eps_u[i]))
    sd1._guidance_scale = G  # what the pipeline sets during a call; the hooks read pipe.guidance_scale
    hooks = PromptReanchor(sd1, orig, l, M)
    with hooks, torch.no_grad():
        out = sd1.unet(*step.args, **{k: v for k, v in step.kwargs.items() if k != "return_dict"}).sample
    assert out.shape[0] == 2 * n
    guided = out[:n] + G * (out[n:] - out[:n])  # the pipeline's own CFG line
    torch.testing.assert_close(guided, torch.stack(hand), rtol=1e-4, atol=1e-4)
    assert hooks.reanchored_steps == [int(m > l) for m in mags]
    assert not sd1.unet._forward_hooks and not sd1.unet._forward_pre_hooks  # detached cleanly


def test_pr_attached_before_the_probe_is_refused(sd1):
    cond = encode(sd1, PROMPTS[:1])
    noise = draw_noise(sd1, SEEDS[:1], H, H)
    with PromptReanchor(sd1, cond, 0.0, 1.0), BrightEndingProbe(sd1, prompts=PROMPTS[:1]):
        with pytest.raises(MemlensError):
            sd1(**cond.pipe_kwargs(), latents=noise, num_inference_steps=STEPS, guidance_scale=G, height=H, width=H)


def _plain(pipe, prompts, seeds):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    with BrightEndingProbe(pipe) as probe:
        out = pipe(prompts, num_inference_steps=STEPS, guidance_scale=G, generator=gens, height=H, width=H)
    return [np.asarray(im) for im in out.images], probe.records


@pytest.mark.parametrize("method", ["prss", "prss-be"])
def test_partial_trigger_keeps_untriggered_images_bit_identical(sd1, method):
    images, records = _plain(sd1, PROMPTS, SEEDS)
    key = "magnitude" if method == "prss" else "masked_magnitude"
    d0 = np.array([getattr(r, key)[0] for r in records])
    target = float(np.sort(d0)[1:].mean())  # only the largest triggers
    jobs = [Job(p, s, ("a b", "c d e")) for p, s in zip(PROMPTS, SEEDS)]
    s = Settings(method=method, steps=STEPS, guidance=G, height=H, width=H, l_target_ss=target,
                 l_target_pr=0.0, mag_thres_pr=1e-3)
    outs = mitigate_batch(sd1, jobs, s)
    assert [o.triggered for o in outs] == list(d0 > target)
    for o, img, rec in zip(outs, images, records):
        if o.triggered:
            assert o.reanchored_steps > 0
            assert not np.array_equal(np.asarray(o.image), img)
            assert np.array_equal(np.asarray(o.unmitigated_image), img)
        else:
            assert o.reanchored_steps == 0 and o.used_prompt == o.record.prompt
            assert np.array_equal(np.asarray(o.image), img)
            assert np.array_equal(o.record.magnitude, rec.magnitude)


def test_semantic_search_takes_first_candidate_under_target(sd1):
    captions = ("a b", "c d e", "f", "g h i j")
    jobs = [Job(PROMPTS[1], SEEDS[1], captions)]
    probe_run = mitigate_batch(sd1, jobs, Settings(method="prss", steps=STEPS, guidance=G, height=H, width=H,
                                                   l_target_ss=1e9, l_target_pr=None))
    scores = probe_run[0].extra["candidate_magnitudes"]
    assert len(scores) == 1 + len(captions) and not probe_run[0].triggered
    below_orig = [k for k in range(1, len(scores)) if scores[k] < scores[0]]
    if not below_orig:
        pytest.skip("no paraphrase scores below the original on this random model")
    # A target just above one paraphrase's score and below the original's: the first candidate under it wins.
    k_star = min(below_orig, key=lambda k: scores[k])
    target = scores[k_star] + 1e-3
    expected = next(k for k in range(1, len(scores)) if scores[k] <= target)
    out = mitigate_batch(sd1, jobs, Settings(method="prss", steps=STEPS, guidance=G, height=H, width=H,
                                             l_target_ss=target, l_target_pr=None))[0]
    assert out.triggered and out.reanchored_steps == 0
    assert out.used_prompt == ([PROMPTS[1], *captions])[expected]
    assert out.final_magnitude == pytest.approx(scores[expected], rel=1e-5)
    assert out.record.magnitude[0] == pytest.approx(out.final_magnitude, rel=1e-4)
    assert out.record.prompt == out.used_prompt  # the probe reads the paraphrase's end token


def test_prss_sdxl_runs_with_pooled_embeddings():
    pipe = tiny_pipeline("sdxl")
    jobs = [Job(p, s, ("a b",)) for p, s in zip(PROMPTS[:2], SEEDS[:2])]
    outs = mitigate_batch(pipe, jobs, Settings(method="prss", steps=STEPS, guidance=G, height=H, width=H,
                                               l_target_ss=0.0, l_target_pr=0.0, mag_thres_pr=1.0))
    assert all(o.triggered and o.reanchored_steps == STEPS for o in outs)


def test_search_decision_independent_of_batch(sd1):
    caps = ("a b", "c d e")
    s = Settings(method="prss", steps=STEPS, guidance=G, height=H, width=H, l_target_ss=1e9, l_target_pr=None)
    alone = mitigate_batch(sd1, [Job(PROMPTS[1], SEEDS[1], caps)], s)[0]
    scores = alone.extra["candidate_magnitudes"]
    s.l_target_ss = float(np.sort(scores)[:2].mean())  # between the two lowest candidates
    alone = mitigate_batch(sd1, [Job(PROMPTS[1], SEEDS[1], caps)], s)[0]
    batch = mitigate_batch(sd1, [Job(p, sd, caps) for p, sd in zip(PROMPTS, SEEDS)], s)[1]
    assert (alone.triggered, alone.used_prompt) == (batch.triggered, batch.used_prompt)
    np.testing.assert_allclose(alone.extra["candidate_magnitudes"], batch.extra["candidate_magnitudes"], rtol=1e-5)
