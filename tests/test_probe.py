"""BrightEndingProbe against an independent eager computation on tiny SD1-, SD2- and SDXL-like pipelines.

The reference side never uses memlens code: it records attention probabilities with diffusers' own eager
`AttnProcessor` math (`get_attention_scores`), counts UNet calls (fine here: one call per step by construction),
finds the EOS in the text encoder's actual input ids, and takes norms with torch directly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from _magnitude_oracle import masked_magnitude
from memlens import BrightEndingProbe, MemlensError, capture
from memlens.testing import tiny_pipeline

LONG = "a very long prompt " * 8  # > 77 characters: every character is a token, so this gets truncated
PROMPTS = ["a cat", "an astronaut riding a horse on the moon", LONG]
FIRST_CROSS_BLOCK = {"sd1": "down_blocks.0.", "sd2": "down_blocks.0.", "sdxl": "down_blocks.1."}


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def family_pipe(request):
    return request.param, tiny_pipeline(request.param)


class _Reference:
    """Records what the paper's quantities need, with no memlens code involved."""

    def __init__(self, pipe, block_prefix):
        self.pipe = pipe
        self.probs = {}  # step -> list of (B*heads, Lq, Lk) per captured layer
        self.eps = []  # per step, the UNet output
        self.input_ids = []
        self.step = -1
        self.handles = []
        self.saved = dict(pipe.unet.attn_processors)
        ref = self

        class Recording(AttnProcessor):
            def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
                b = hidden_states.shape[0]
                q = attn.head_to_batch_dim(attn.to_q(hidden_states))
                k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
                probs = attn.get_attention_scores(q.float(), k.float(), None)
                ref.probs.setdefault(ref.step, []).append((attn.heads, b, probs.detach().clone()))
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

        procs = {}
        for name, proc in self.saved.items():
            is_target = name.startswith(block_prefix) and name.endswith("attn2.processor")
            procs[name] = Recording() if is_target else proc
        pipe.unet.set_attn_processor(procs)

        def count(module, args):
            ref.step += 1

        def keep(module, args, output):
            ref.eps.append(output[0].detach().clone())

        encoder = pipe.text_encoder if pipe.text_encoder is not None else pipe.text_encoder_2
        self.handles = [
            pipe.unet.register_forward_pre_hook(count),
            pipe.unet.register_forward_hook(keep),
            encoder.register_forward_pre_hook(lambda m, a: ref.input_ids.append(a[0].clone())),
        ]

    def close(self):
        for h in self.handles:
            h.remove()
        self.pipe.unet.set_attn_processor(self.saved)

    def eos(self, tokenizer):
        ids = self.input_ids[0]  # the positive prompts are encoded first
        return [int((row == tokenizer.eos_token_id).nonzero()[0]) for row in ids]

    def be_maps(self, eos, per_prompt, latent_hw):
        last = max(self.probs)
        maps = []
        for heads, b, probs in self.probs[last]:
            n = b // 2
            p = probs.view(b, heads, *probs.shape[1:])[n:].mean(dim=1)  # conditional half, head mean
            cols = torch.stack([p[i, :, eos[i // per_prompt]] for i in range(n)])
            maps.append(cols)
        m = torch.stack(maps).mean(dim=0)
        h, w = latent_hw
        while m.shape[1] < h * w:
            h, w = (h + 1) // 2, (w + 1) // 2
        return m.view(-1, h, w)

    def magnitudes(self, masks):
        d, ld = [], []
        for eps in self.eps:
            u, c = eps.chunk(2)
            diff = (c - u).double()
            d.append(torch.linalg.vector_norm(diff.flatten(1), dim=1))
            m = masks.double()
            if m.shape[-2:] != diff.shape[-2:]:
                m = F.interpolate(m[:, None].float(), size=diff.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
                m = m.double()
            ld.append(torch.linalg.vector_norm((diff * m[:, None]).flatten(1), dim=1) / m.flatten(1).mean(dim=1))
        return torch.stack(d).T.numpy(), torch.stack(ld).T.numpy()


def _generate(pipe, steps, per_prompt=2, prompts=PROMPTS, height=32, width=48, guidance=3.0, seed=0):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts) * per_prompt)]
    return pipe(
        prompts,
        num_images_per_prompt=per_prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=gens,
        height=height,
        width=width,
        output_type="np",
    )


def _assert_rel(actual, expected, rtol=1e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.mark.parametrize("steps", [1, 7, 50])
def test_probe_matches_eager_reference(family_pipe, steps):
    family, pipe = family_pipe
    per_prompt = 2
    with BrightEndingProbe(pipe) as probe:
        _generate(pipe, steps, per_prompt)
    ref = _Reference(pipe, FIRST_CROSS_BLOCK[family])
    try:
        out = _generate(pipe, steps, per_prompt)
    finally:
        ref.close()
    latent_hw = (out.images.shape[1] // pipe.vae_scale_factor, out.images.shape[2] // pipe.vae_scale_factor)
    eos = ref.eos(pipe.tokenizer)
    assert eos[2] == pipe.tokenizer.model_max_length - 1  # the long prompt was truncated, EOS last
    maps = ref.be_maps(eos, per_prompt, latent_hw)
    d, ld = ref.magnitudes(maps)

    assert len(probe.records) == len(PROMPTS) * per_prompt
    for i, rec in enumerate(probe.records):
        assert rec.prompt == PROMPTS[i // per_prompt]
        assert rec.eos_index == eos[i // per_prompt]
        assert rec.be_map.dtype == np.float32 and rec.magnitude.shape == (steps,)
        _assert_rel(rec.be_map, maps[i].numpy())
        _assert_rel(rec.magnitude, d[i])
        _assert_rel(rec.masked_magnitude, ld[i])
    # Non-square: the map keeps the image's aspect ratio.
    h, w = probe.records[0].be_map.shape
    assert w * 2 == h * 3


def test_one_pass_equals_two_passes(family_pipe):
    """LD from the probe equals the reference procedure: re-run with the same seeds and apply run 1's mask."""
    family, pipe = family_pipe
    with BrightEndingProbe(pipe) as probe:
        _generate(pipe, 6, per_prompt=1, seed=11)
    masks = torch.from_numpy(np.stack([r.be_map for r in probe.records]))
    ref = _Reference(pipe, FIRST_CROSS_BLOCK[family])
    try:
        _generate(pipe, 6, per_prompt=1, seed=11)
    finally:
        ref.close()
    _, ld_two_pass = ref.magnitudes(masks)
    for rec, expected in zip(probe.records, ld_two_pass):
        _assert_rel(rec.masked_magnitude, expected)


def test_probe_leaves_images_and_processors_unchanged(family_pipe):
    family, pipe = family_pipe
    # A processor the user chose on one of the probed layers must come back exactly.
    target = FIRST_CROSS_BLOCK[family] + "attentions.0.transformer_blocks.0.attn2.processor"
    user_proc = AttnProcessor()
    pipe.unet.set_attn_processor({**pipe.unet.attn_processors, target: user_proc})
    before = dict(pipe.unet.attn_processors)
    try:
        plain = _generate(pipe, 5).images
        with BrightEndingProbe(pipe):
            probed = _generate(pipe, 5).images
        after = pipe.unet.attn_processors
        assert list(after) == list(before)
        assert all(after[k] is before[k] for k in before)
        assert after[target] is user_proc
        assert any(isinstance(p, AttnProcessor2_0) for p in after.values())  # SDPA stays SDPA elsewhere
        np.testing.assert_allclose(probed, plain, atol=1e-6)
    finally:
        pipe.unet.set_attn_processor(AttnProcessor2_0())


def test_guidance_without_unconditional_branch_raises(family_pipe):
    _, pipe = family_pipe
    with BrightEndingProbe(pipe):
        with pytest.raises(MemlensError, match="classifier-free guidance"):
            _generate(pipe, 3, guidance=1.0)
    assert not any(type(p).__name__ == "CaptureProcessor" for p in pipe.unet.attn_processors.values())


def test_processor_replaced_mid_run_raises():
    pipe = tiny_pipeline("sd1")

    def slice_attention(p, step, t, kwargs):
        p.enable_attention_slicing()
        return kwargs

    with BrightEndingProbe(pipe) as probe:
        with pytest.raises(MemlensError, match="replaced"):
            pipe("a cat", num_inference_steps=3, guidance_scale=3.0, callback_on_step_end=slice_attention)
    assert probe.records == []


def test_unet_without_cross_attention_is_named():
    from diffusers import UNet2DConditionModel

    pipe = tiny_pipeline("sd1")
    pipe.unet = UNet2DConditionModel(
        block_out_channels=(8, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None,
        norm_num_groups=4,
        cross_attention_dim=32,
    )
    with pytest.raises(MemlensError, match="UNet2DConditionModel has no cross-attention"):
        BrightEndingProbe(pipe)


def test_prompt_embeds_need_prompts_or_eos():
    pipe = tiny_pipeline("sd1")
    embeds, negative = pipe.encode_prompt(["a cat", "a red bird"], "cpu", 1, True)
    kwargs = dict(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=2, guidance_scale=3.0)
    with BrightEndingProbe(pipe):
        with pytest.raises(MemlensError, match="prompt_embeds"):
            pipe(**kwargs)
    with BrightEndingProbe(pipe, prompts=["a cat", "a red bird"]) as probe:
        pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    assert [r.prompt for r in probe.records] == ["a cat", "a red bird"]
    assert [r.eos_index for r in probe.records] == [5, 9]  # BOS + one token per character + EOS
    with BrightEndingProbe(pipe, eos_indices=[5, 9]) as by_index:
        pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    for a, b in zip(probe.records, by_index.records):
        np.testing.assert_array_equal(a.be_map, b.be_map)


def test_records_stay_small_and_energy_reproduces_ld():
    pipe = tiny_pipeline("sd1")
    with BrightEndingProbe(pipe) as small:
        _generate(pipe, 8, per_prompt=1, prompts=["a cat"])
    rec = small.records[0]
    assert rec.energy is None
    assert rec.nbytes == rec.be_map.nbytes + 8 * 4 * 2 + rec.timesteps.nbytes
    with BrightEndingProbe(pipe, keep_energy=True) as full:
        _generate(pipe, 8, per_prompt=1, prompts=["a cat"])
    kept = full.records[0]
    assert kept.energy.shape == (8, 16, 24)
    _assert_rel(masked_magnitude(kept.energy, kept.be_map), kept.masked_magnitude)
    _assert_rel(kept.masked_magnitude_with(kept.be_map), kept.masked_magnitude)
    # A constant mask gives back D: the normalisation by mean(m) is scale-free.
    _assert_rel(masked_magnitude(kept.energy, np.full((4, 6), 3.0, np.float32)), kept.magnitude)
    _assert_rel(kept.masked_magnitude_with(np.full((4, 6), 3.0, np.float32)), kept.magnitude)
    other = np.random.default_rng(0).random((4, 6)).astype(np.float32)
    _assert_rel(kept.masked_magnitude_with(other), masked_magnitude(kept.energy, other))
    with pytest.raises(MemlensError, match="keep_energy"):
        rec.masked_magnitude_with(other)


def test_configurable_layers_steps_and_token():
    pipe = tiny_pipeline("sd1")
    with pytest.raises(MemlensError, match="matches no cross-attention layer"):
        BrightEndingProbe(pipe, layers=["mid_block.nope"])
    with BrightEndingProbe(pipe, layers=["up_blocks.2"], steps=(0, -1), token=0) as probe:
        _generate(pipe, 4, per_prompt=1, prompts=["a cat"])
    assert all(name.startswith("up_blocks.2.") for name in probe.layer_names)
    assert probe.records[0].be_map.shape == (16, 24)
    # Several calls accumulate records in order; clear() empties them.
    with BrightEndingProbe(pipe) as probe:
        _generate(pipe, 2, per_prompt=1, prompts=["a"])
        _generate(pipe, 2, per_prompt=1, prompts=["b", "c"])
    assert [r.prompt for r in probe.records] == ["a", "b", "c"]
    probe.clear()
    assert probe.records == []


@pytest.mark.parametrize("family, expected", [("sd1", ("down_blocks.0.", "up_blocks.2.")),  # tiny: 3 blocks a side
                                              ("sdxl", ("down_blocks.1.", "up_blocks.1."))])
def test_outer_layers_are_both_ends_of_the_unet_at_one_resolution(family, expected):
    pipe = tiny_pipeline(family)
    with BrightEndingProbe(pipe, layers="outer") as outer:
        _generate(pipe, 2, per_prompt=1, prompts=["a cat"])
    assert {name.split("attentions")[0] for name in outer.layer_names} == set(expected)
    maps = []
    for block in expected:
        with BrightEndingProbe(pipe, layers=[block.rstrip(".")]) as one:
            _generate(pipe, 2, per_prompt=1, prompts=["a cat"])
        maps.append((one.records[0].be_map, len(one.layer_names)))
    # The probe averages over layers: each block's map weighted by its number of layers.
    want = sum(m * n for m, n in maps) / sum(n for _, n in maps)
    _assert_rel(outer.records[0].be_map, want)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_all_layers_combine_every_resolution_on_the_finest_grid(family):
    from memlens.maps import upsample

    pipe = tiny_pipeline(family)
    with BrightEndingProbe(pipe, layers="all", keep_energy=True) as every:
        _generate(pipe, 2, per_prompt=1, prompts=["a cat"])
    names = every.layer_names
    assert names == [l.name for l in capture.cross_attention_layers(pipe.unet)]
    # Independently: each layer read alone, its map resized bilinearly to the finest one's grid, then averaged.
    per_layer = []
    for name in names:
        with BrightEndingProbe(pipe, layers=[name]) as one:
            _generate(pipe, 2, per_prompt=1, prompts=["a cat"])
        per_layer.append(one.records[0].be_map)
    finest = max((m.shape for m in per_layer), key=lambda s: s[0] * s[1])
    assert len({m.shape for m in per_layer}) > 1  # the test must mix resolutions
    rec = every.records[0]
    assert rec.be_map.shape == finest
    _assert_rel(rec.be_map, np.average([upsample(m, finest) for m in per_layer], axis=0,
                                       weights=[m.size for m in per_layer]))  # one vote per attention query
    # LD is masked with that map, the same as any other mask of its size
    _assert_rel(rec.masked_magnitude, rec.masked_magnitude_with(rec.be_map))


def test_padding_token_is_the_mean_of_its_positions():
    pipe = tiny_pipeline("sd1", model_max_length=10)
    prompt = ["a cat"]  # BOS a c a t EOS + 4 padding EOS: the padding is positions 6..9

    def be_map(token):
        with BrightEndingProbe(pipe, token=token) as probe:
            _generate(pipe, 2, per_prompt=1, prompts=prompt)
        return probe.records[0].be_map

    block = np.mean([be_map(k) for k in range(6, 10)], axis=0)
    _assert_rel(be_map("padding"), block)
    _assert_rel(be_map("eos"), be_map(5))
    _assert_rel(be_map("eos+padding"), np.mean([be_map(k) for k in range(5, 10)], axis=0))
    with pytest.raises(MemlensError, match="token must be one of"):
        BrightEndingProbe(pipe, token="pad")
