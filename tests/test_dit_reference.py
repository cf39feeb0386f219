"""memlens.dit_reference: the eager recomputation equals the attention the model really computes, and D/LD come
from the right rows.

Parity: softmax(QK^T)V recomputed by the reference (float64, its own RoPE) and pushed through the module's output
projections must equal what the attention module returned in the real run (a plain forward hook), to 1e-5, for
every text-attention site at the last step, on square and non-square sizes. Guidance rows: the prediction the
pipeline hands to its scheduler must equal uncond + scale * (cond - uncond) built from the reference's split.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memlens import dit_layout as L
import _dit_reference as R
from memlens.testing_dit import tiny_dit_pipeline

PROMPTS = ["a cat", "two dogs on a sofa"]
CALL = {
    "pixart": dict(max_sequence_length=16, guidance_scale=4.5),
    "pixart-sigma": dict(max_sequence_length=16, guidance_scale=4.5),
    "sd3": dict(max_sequence_length=8, guidance_scale=4.0),
    "sd3.5": dict(max_sequence_length=8, guidance_scale=4.0),
    "flux": dict(max_sequence_length=8, true_cfg_scale=3.0, negative_prompt=[""] * len(PROMPTS)),
}
# Non-square requests; PixArt's is binned to a different aspect-ratio bucket before the transformer sees it.
SIZES = {
    "pixart": [None, (128, 256)],
    "pixart-sigma": [(256, 128)],
    "sd3": [None, (32, 64)],
    "sd3.5": [(64, 32)],
    "flux": [None, (32, 64)],
}
CASES = [(f, s) for f, sizes in SIZES.items() for s in sizes]


@pytest.fixture(scope="module")
def pipes():
    return {family: tiny_dit_pipeline(family) for family in SIZES}


def _record(pipe, family, size=None, steps=2, **overrides):
    sites = L.text_attention_sites(pipe.transformer)
    kwargs = dict(CALL[family], num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                  output_type="latent")
    if size is not None:
        kwargs.update(height=size[0], width=size[1])
    kwargs.update(overrides)
    prompt = kwargs.pop("prompt", PROMPTS)
    with R.CallRecorder(pipe.transformer, sites) as rec:
        pipe(prompt, **kwargs)
    return sites, rec.calls, kwargs


def _grid(family, call, pipe):
    fam = L.family_of(pipe)
    p = 1 if fam == "flux" else pipe.transformer.config.patch_size
    return L.image_grid(fam, torch.empty(call.hidden_states_shape), p, img_ids=call.img_ids)


@pytest.mark.parametrize("family,size", CASES)
def test_reference_attention_equals_what_the_model_computes(pipes, family, size):
    pipe = pipes[family]
    sites, calls, _ = _record(pipe, family, size)
    last_step = R.steps_of(calls)[-1]
    checked = 0
    for call in last_step:
        h, w = _grid(family, call, pipe)
        for site in sites:
            got = R.site_attention(site, call.sites[site.name], call.num_text)
            image, text = R.module_outputs(site, call.sites[site.name], call.num_text)
            assert got.joint.shape == (call.batch, h * w, call.num_text)
            assert torch.allclose(got.image_output, image, atol=1e-5, rtol=0), site.name
            if text is not None:
                assert torch.allclose(got.text_output, text, atol=1e-5, rtol=0), site.name
            checked += 1
    assert checked == len(sites) * len(last_step)
    if size is not None and not family.startswith("pixart"):
        f = pipe.vae_scale_factor * 2  # VAE factor times the 2x2 patch (PatchEmbed p=2, FLUX packing)
        assert (h, w) == (size[0] // f, size[1] // f) and h != w


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_parity_holds_after_fuse_qkv_projections(family):
    # Fusing swaps SD3/PixArt processors for fused classes and adds to_qkv/to_added_qkv; the unfused projections stay
    # and hold the same weights, so sites (found by module, not processor class) and the recomputation still hold.
    pipe = tiny_dit_pipeline(family)
    pipe.transformer.fuse_qkv_projections()
    sites, calls, _ = _record(pipe, family)
    call = R.steps_of(calls)[-1][0]
    for site in sites:
        got = R.site_attention(site, call.sites[site.name], call.num_text)
        image, _ = R.module_outputs(site, call.sites[site.name], call.num_text)
        assert torch.allclose(got.image_output, image, atol=1e-5, rtol=0)


def test_flux_key_order_is_the_one_the_model_uses(pipes):
    # RoPE rows are aligned with the concatenated sequence, so assuming the wrong order changes q/k rotations.
    pipe = pipes["flux"]
    sites, calls, _ = _record(pipe, "flux")
    call = R.steps_of(calls)[-1][0]
    for site in sites:
        image, _ = R.module_outputs(site, call.sites[site.name], call.num_text)
        wrong = R.site_attention(site, call.sites[site.name], call.num_text, text_first=not site.text_first)
        assert (wrong.image_output - image).abs().max() > 1e-3


def test_sd3_key_order_is_invisible_to_attention_probabilities(pipes):
    # Without positional terms inside attention, softmax over keys is permutation invariant: the image/text key
    # order of SD3 matters only to code that slices a concatenated tensor. The parity test fixes which output rows
    # are image rows.
    pipe = pipes["sd3"]
    sites, calls, _ = _record(pipe, "sd3")
    call = R.steps_of(calls)[-1][0]
    site = sites[0]
    a = R.site_attention(site, call.sites[site.name], call.num_text)
    b = R.site_attention(site, call.sites[site.name], call.num_text, text_first=True)
    assert torch.allclose(a.joint, b.joint, atol=1e-12) and torch.allclose(a.image_output, b.image_output, atol=1e-6)


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_normalisations(pipes, family):
    pipe = pipes[family]
    sites, calls, _ = _record(pipe, family)
    call = R.steps_of(calls)[-1][0]
    for site in sites:
        a = R.site_attention(site, call.sites[site.name], call.num_text)
        ones = torch.ones_like(a.joint[..., 0])
        assert torch.allclose(a.text_renormalised.sum(-1), ones, atol=1e-12)
        mass = a.joint.sum(-1)
        if site.kind == "cross":
            assert torch.allclose(mass, ones, atol=1e-12) and torch.allclose(a.joint, a.text_renormalised)
        else:
            assert (mass < 1 - 1e-3).all() and (mass > 0).all()  # image keys take the rest


def test_pixart_padding_gets_no_attention(pipes):
    pipe = pipes["pixart"]
    sites, calls, _ = _record(pipe, "pixart")
    call = R.steps_of(calls)[-1][0]
    site_call = call.sites[sites[0].name]
    padded = site_call.attention_mask[:, 0] < 0  # the additive bias the transformer built from the T5 mask
    assert padded.any()
    a = R.site_attention(sites[0], site_call, call.num_text)
    assert a.joint.permute(0, 2, 1)[padded].max() < 1e-30
    # The end token (first </s>) is the last unmasked position.
    seg = L.text_segments(pipe, call.num_text)[0]
    ends = L.end_token_positions(pipe, seg, PROMPTS)
    n = len(PROMPTS)
    for b, e in enumerate(ends):
        assert not padded[n + b, e] and padded[n + b, e + 1 :].all()


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_prompt_embeds_input_gives_the_same_end_token_map(pipes, family):
    pipe = pipes[family]
    sites, calls, kwargs = _record(pipe, family, size=None)
    n = len(PROMPTS)
    if family == "pixart":
        pe, pm, ne, nm = pipe.encode_prompt(PROMPTS, max_sequence_length=kwargs["max_sequence_length"])
        embeds = dict(prompt_embeds=pe, prompt_attention_mask=pm, negative_prompt_embeds=ne,
                      negative_prompt_attention_mask=nm, negative_prompt=None)
    elif family == "sd3":
        pe, ne, pp, npp = pipe.encode_prompt(PROMPTS, None, None, max_sequence_length=kwargs["max_sequence_length"])
        embeds = dict(prompt_embeds=pe, negative_prompt_embeds=ne, pooled_prompt_embeds=pp,
                      negative_pooled_prompt_embeds=npp)
    else:
        pe, pp, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=kwargs["max_sequence_length"])
        ne, npp, _ = pipe.encode_prompt([""] * n, None, max_sequence_length=kwargs["max_sequence_length"])
        embeds = dict(prompt_embeds=pe, pooled_prompt_embeds=pp, negative_prompt_embeds=ne,
                      negative_pooled_prompt_embeds=npp, negative_prompt=None)
    _, calls_e, _ = _record(pipe, family, prompt=None, **embeds)
    cfg = L.cfg_layout(pipe, 2, **CALL[family])

    def end_map(calls_):
        step = R.steps_of(calls_)[-1]
        call = step[0]
        rows = slice(n, 2 * n) if cfg.mode == "batch" else slice(0, n)
        segment = L.text_segments(pipe, call.num_text)[0]  # CLIP for SD3 (default END), T5 otherwise
        ends = L.end_token_positions(pipe, segment, PROMPTS)  # from the prompts, whichever way the call got them
        a = R.site_attention(sites[0], call.sites[sites[0].name], call.num_text)
        return R.end_token_map(a.text_renormalised[rows], ends, _grid(family, call, pipe))

    assert torch.allclose(end_map(calls), end_map(calls_e), atol=1e-6)


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_guidance_split_matches_the_prediction_the_scheduler_receives(pipes, family, monkeypatch):
    pipe = pipes[family]
    received = []
    step = pipe.scheduler.step

    def recording_step(model_output, *args, **kwargs):
        received.append(model_output.detach().clone())
        return step(model_output, *args, **kwargs)

    monkeypatch.setattr(pipe.scheduler, "step", recording_step)
    sites, calls, kwargs = _record(pipe, family, size=(128, 256) if family == "pixart" else (32, 64))
    cfg = L.cfg_layout(pipe, 2, **CALL[family])
    scale = CALL[family].get("true_cfg_scale", CALL[family].get("guidance_scale"))
    steps = R.steps_of(calls)
    assert len(steps) == len(received) == 2
    for step_calls, guided in zip(steps, received):
        cond, uncond = R.guidance_split(pipe, step_calls, cfg)
        if family == "flux":
            guided = R.unpack_flux(guided, L.image_grid("flux", None, 1, img_ids=step_calls[0].img_ids))
        assert torch.allclose(uncond + scale * (cond - uncond), guided, atol=1e-5)
        assert (cond - uncond).abs().max() > 1e-3  # random weights: the two branches really differ


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_magnitudes(pipes, family):
    pipe = pipes[family]
    sites, calls, _ = _record(pipe, family, size=(128, 256) if family == "pixart" else (32, 64))
    cfg = L.cfg_layout(pipe, 2, **CALL[family])
    n = len(PROMPTS)
    last = R.steps_of(calls)[-1][0]
    grid = _grid(family, last, pipe)
    footprint = 2 if family == "flux" else pipe.transformer.config.patch_size
    ones = torch.ones(n, *grid)
    d, ld = R.magnitudes(pipe, calls, cfg, ones, footprint)
    assert d.shape == (n, 2) and torch.allclose(d, ld)
    mask = torch.rand(n, *grid, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, ld_patch = R.magnitudes(pipe, calls, cfg, mask, footprint)
    _, ld_bilinear = R.magnitudes(pipe, calls, cfg, mask, footprint, mask_upsample="bilinear")
    for i, step_calls in enumerate(R.steps_of(calls)):
        cond, uncond = R.guidance_split(pipe, step_calls, cfg)
        energy = (cond - uncond).double().pow(2).sum(1)
        # Token-level form of the patch mask: each token's energy is the sum over its footprint.
        token_energy = F.avg_pool2d(energy[:, None], footprint)[:, 0] * footprint**2
        expect = (token_energy * mask.pow(2)).flatten(1).sum(1).sqrt() / mask.flatten(1).mean(1)
        assert torch.allclose(ld_patch[:, i], expect, rtol=1e-10)
        assert torch.allclose(d[:, i], energy.flatten(1).sum(1).sqrt(), rtol=1e-10)
    assert not torch.allclose(ld_patch, ld_bilinear)


def test_end_token_map_is_the_column_on_the_token_grid():
    attn = torch.arange(2 * 6 * 4, dtype=torch.float64).view(2, 6, 4)
    maps = R.end_token_map(attn, [1, 3], (2, 3))
    assert maps.shape == (2, 2, 3)
    assert torch.equal(maps[0].flatten(), attn[0, :, 1]) and torch.equal(maps[1].flatten(), attn[1, :, 3])


def test_sd3_skip_layer_calls_stay_with_their_step(pipes):
    pipe = pipes["sd3"]
    extra = dict(skip_guidance_layers=[0], skip_layer_guidance_stop=0.8)
    _, calls, _ = _record(pipe, "sd3", steps=4, **extra)
    cfg = L.cfg_layout(pipe, 4, **CALL["sd3"], **extra)
    steps = R.steps_of(calls)
    assert len(steps) == 4
    assert [len(s) for s in steps] == [cfg.calls_per_step(i) for i in range(4)]
    for i, step_calls in enumerate(steps):
        for role, call in zip(cfg.call_roles(i), step_calls):
            assert (role == "cond_skip_layers") == (call.skip_layers is not None)
            rows = cfg.conditional_rows(role, call.batch)
            assert rows is None or rows.stop - rows.start == len(PROMPTS)
    grid = _grid("sd3", steps[-1][0], pipe)
    d, _ = R.magnitudes(pipe, calls, cfg, torch.ones(len(PROMPTS), *grid), pipe.transformer.config.patch_size)
    assert d.shape == (len(PROMPTS), 4)
