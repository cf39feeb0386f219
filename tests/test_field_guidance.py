"""Guidance schedules and end-token masking against hand-computed values, and a schedule attached to a stock
pipeline against a denoising loop written out here."""

from __future__ import annotations

import pytest
import torch

from memlens.field import guidance as gd


def test_guided_and_opposite_guidance_by_hand():
    u, c = torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 1.0]])
    assert gd.guided(u, c, 0.0).tolist() == [[1.0, 0.0]]  # unconditional only
    assert gd.guided(u, c, 1.0).tolist() == [[3.0, 1.0]]  # conditional only
    assert gd.guided(u, c, -2.0).tolist() == [[-3.0, -2.0]]  # 1 - 2*2, 0 - 2*1
    both = gd.guided(torch.cat([u, u]), torch.cat([c, c]), torch.tensor([7.5, -2.0]))
    assert both.tolist() == [[16.0, 7.5], [-3.0, -2.0]]


def test_static_transition_schedule_by_hand():
    ts = [900, 700, 650, 500, 300, 100]
    assert gd.CFG_DELAY.schedule(ts) == [0.0, 0.0, 0.0, 7.5, 7.5, 7.5]  # t = 500 is not > 500: guidance on
    assert gd.OPPOSITE_GUIDANCE.schedule(ts) == [-2.0, -2.0, 7.5, 7.5, 7.5, 7.5]
    u, c = torch.zeros(1, 2), torch.ones(1, 2)
    assert gd.OPPOSITE_GUIDANCE.combine(u, c, 1, ts).tolist() == [[-2.0, -2.0]]
    assert gd.OPPOSITE_GUIDANCE.combine(u, c, 2, torch.tensor(ts)).tolist() == [[7.5, 7.5]]


def test_dynamic_transition_by_hand():
    # d: 5, 4, 3, 3.5 -> d_2 = 3 is the first strict local minimum, seen at step 3.
    assert gd.dynamic_transition_step([5, 4, 3, 3.5, 2, 6]) == 3
    assert gd.dynamic_transition_scales([5, 4, 3, 3.5, 2, 6]) == [1.0, 1.0, 1.0, 7.5, 7.5, 7.5]
    assert gd.dynamic_transition_step([5, 2, 3]) == 2  # earliest possible switch
    assert gd.dynamic_transition_step([0.0, 5.0]) is None  # the -1 start values never make step 1 a switch
    assert gd.dynamic_transition_step([3, 3, 3, 3]) is None  # plateaus are not strict minima
    assert gd.dynamic_transition_scales([4, 3, 2, 1], early=0.0, late=5.0) == [0.0] * 4


def test_stateful_dynamic_transition_matches_the_pure_rule_per_sample():
    seqs = [[5.0, 4.0, 3.0, 3.5, 2.0, 6.0], [1.0, 2.0, 1.5, 1.0, 2.0, 0.5]]
    dtp = gd.DynamicTransition(early=1.0, late=7.5)
    got = []
    for j in range(len(seqs[0])):
        # eps_u - eps_c with the wanted norm for each sample (a 3-4-5 triangle scaled).
        diff = torch.tensor([[0.6 * s[j], 0.8 * s[j]] for s in seqs], dtype=torch.float64)
        got.append(dtp.scale(diff, torch.zeros_like(diff)).tolist())
    assert [list(col) for col in zip(*got)] == [gd.dynamic_transition_scales(s) for s in seqs]
    assert dtp.switched.tolist() == [True, True]


def test_retarget_conditional_makes_the_pipelines_combination_give_the_target():
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    for target in (0.0, 1.0, -2.0, torch.tensor([0.0, 7.5])):
        c2 = gd.retarget_conditional(u, c, target, pipeline_scale=7.5)
        assert torch.allclose(u + 7.5 * (c2 - u), gd.guided(u, c, target), atol=1e-6)


def test_static_schedule_on_a_stock_pipeline_equals_an_explicit_loop():
    from diffusers import DDIMScheduler

    from memlens.testing import tiny_sd1_pipeline

    pipe = tiny_sd1_pipeline()
    steps, g_pipe = 6, 7.5
    text, negative = pipe.encode_prompt(["a cat on a mat"], "cpu", 1, True)
    size = pipe.unet.config.sample_size
    noise = torch.randn(1, pipe.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(1))
    pipe.scheduler.set_timesteps(steps)
    ts = pipe.scheduler.timesteps.tolist()
    rule = gd.StaticTransition(early=-2.0, late=7.5, change_timestep=ts[steps // 2])
    assert len(set(rule.schedule(ts))) == 2  # both phases occur

    def hook(module, args, kwargs, output):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        u, c = output[0].chunk(2)
        return (torch.cat([u, gd.retarget_conditional(u, c, rule.scale(t), g_pipe)]),) + tuple(output[1:])

    call = dict(prompt_embeds=text, negative_prompt_embeds=negative, latents=noise, num_inference_steps=steps,
                guidance_scale=g_pipe, output_type="latent")
    handle = pipe.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            got = pipe(**call).images
    finally:
        handle.remove()

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    latents = noise * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.scale_model_input(torch.cat([latents] * 2), t)
            u, c = pipe.unet(x, t, encoder_hidden_states=torch.cat([negative, text])).sample.chunk(2)
            s = -2.0 if float(t) > ts[steps // 2] else 7.5
            latents = sched.step(u + s * (c - u), t, latents).prev_sample
    assert torch.allclose(got, latents, atol=1e-4)
    with torch.no_grad():
        plain = pipe(**call).images
    assert not torch.allclose(plain, latents, atol=1e-2)  # the schedule changed the sample: the check is not vacuous


def test_end_token_positions_and_masks_by_hand():
    B, E, P = 0, 9, 7  # begin, end, pad ids
    ids = torch.tensor([[B, 5, 6, E, E, E], [B, 4, E, P, P, P]])
    assert gd.end_token_positions(ids, E).tolist() == [3, 2]
    assert gd.end_token_mask(ids, E, "eot").int().tolist() == [[0, 0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0]]
    assert gd.end_token_mask(ids, E, "padding").int().tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]]
    assert gd.end_token_mask(ids, E, "eot+padding").int().tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]]
    assert gd.repad_input_ids(ids, E, P).tolist() == [[B, 5, 6, E, P, P], [B, 4, E, P, P, P]]
    with pytest.raises(ValueError, match="row 1"):
        gd.end_token_positions(torch.tensor([[B, E], [B, 5]]), E)
    with pytest.raises(ValueError, match="mode"):
        gd.end_token_mask(ids, E, "all")


def test_mask_end_token_zeroes_or_fills_exactly_the_masked_rows():
    E = 9
    ids = torch.tensor([[0, 5, E, E], [0, 4, 6, E]])
    emb = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3) + 1
    out = gd.mask_end_token(emb, ids, E, "eot")
    assert out[0, 2].tolist() == [0.0, 0.0, 0.0] and out[1, 3].tolist() == [0.0, 0.0, 0.0]
    keep = ~gd.end_token_mask(ids, E, "eot")
    assert torch.equal(out[keep], emb[keep])
    assert emb.min() > 0  # the input is untouched
    fill = -torch.ones(4, 3)
    filled = gd.mask_end_token(emb, ids, E, "eot+padding", fill=fill)
    assert filled[0, 2:].eq(-1).all() and filled[0, :2].equal(emb[0, :2]) and filled[1, 3].eq(-1).all()
    with pytest.raises(ValueError, match="disagree"):
        gd.mask_end_token(emb, ids[:, :3], E)


def test_end_token_functions_on_a_real_tokenizer():
    from memlens.testing import tiny_sd1_pipeline

    tok = tiny_sd1_pipeline().tokenizer
    prompts = ["a cat", "a much longer prompt"]
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    pos = gd.end_token_positions(ids, tok.eos_token_id)
    lengths = [len(tok(p).input_ids) for p in prompts]
    assert pos.tolist() == [n - 1 for n in lengths]  # tokenizer output ends with the end token
    assert tok.pad_token_id == tok.eos_token_id  # SD 1.x: padding repeats the end token ...
    bang = tok.convert_tokens_to_ids("!")
    repadded = gd.repad_input_ids(ids, tok.eos_token_id, bang)
    assert ((repadded == tok.eos_token_id).sum(dim=1) == 1).all()  # ... and after re-padding only one is left
