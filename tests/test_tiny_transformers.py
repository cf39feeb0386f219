"""Tiny diffusion-transformer pipelines (memlens.testing_dit) and the layout facts memlens.dit_layout reads from them.

Every fact is checked against what the stock pipeline actually does on the tiny model: hooks on the text encoders
record the ids they receive, hooks on the transformer record how many calls a step makes and which rows are which,
and token order is checked by perturbing one side and watching where the change lands.
"""

from __future__ import annotations

import socket

import pytest
import torch

from memlens import dit_layout as L
from memlens.testing_dit import DIT_FAMILIES, tiny_dit_pipeline

# Small text lengths keep the runs fast; they go through the pipelines' own max_sequence_length argument.
CALL = {
    "pixart": dict(max_sequence_length=16),
    "pixart-sigma": dict(max_sequence_length=16),
    "sd3": dict(max_sequence_length=8, guidance_scale=4.0),
    "sd3.5": dict(max_sequence_length=8, guidance_scale=4.0),
    "flux": dict(max_sequence_length=8),
}
REAL_CLASSES = {
    "pixart": ("PixArtAlphaPipeline", "PixArtTransformer2DModel"),
    "pixart-sigma": ("PixArtSigmaPipeline", "PixArtTransformer2DModel"),
    "sd3": ("StableDiffusion3Pipeline", "SD3Transformer2DModel"),
    "sd3.5": ("StableDiffusion3Pipeline", "SD3Transformer2DModel"),
    "flux": ("FluxPipeline", "FluxTransformer2DModel"),
}
PROMPTS = ["a cat", "  Two DOGS  on a sofa", "a very long prompt " * 4]  # the last one is truncated


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a tiny pipeline tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def pipes():
    return {family: tiny_dit_pipeline(family) for family in DIT_FAMILIES}


def _run(pipe, family, prompts=("a cat",), seed=0, **kwargs):
    args = dict(CALL[family], num_inference_steps=2, generator=torch.Generator().manual_seed(seed), output_type="np")
    args.update(kwargs)
    return pipe(list(prompts), **args).images


class _Calls:
    """Plain hooks on the transformer: the inputs of each call."""

    def __init__(self, transformer):
        self.calls = []
        self.handle = transformer.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        kwargs = dict(kwargs, **({"hidden_states": args[0]} if args else {}))
        self.calls.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    def close(self):
        self.handle.remove()


@pytest.mark.parametrize("family", DIT_FAMILIES)
def test_builds_real_classes_and_generates_offline_deterministically(family):
    rng_before = torch.random.get_rng_state()
    pipe = tiny_dit_pipeline(family)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "building a tiny pipeline changed the global RNG"
    assert (type(pipe).__name__, type(pipe.transformer).__name__) == REAL_CLASSES[family]
    first = _run(pipe, family)
    again = _run(tiny_dit_pipeline(family), family)
    assert first.shape[0] == 1 and first.std() > 0
    assert (first == again).all()


def test_text_attention_sites_are_chosen_by_what_the_module_is(pipes):
    for family, pipe in pipes.items():
        sites = L.text_attention_sites(pipe.transformer)
        names = [s.name for s in sites]
        t = pipe.transformer
        if family.startswith("pixart"):
            assert names == [f"transformer_blocks.{i}.attn2" for i in range(len(t.transformer_blocks))]
            assert {s.kind for s in sites} == {"cross"}
        elif family.startswith("sd3"):
            assert names == [f"transformer_blocks.{i}.attn" for i in range(len(t.transformer_blocks))]
            assert [s.context_pre_only for s in sites] == [b.context_pre_only for b in t.transformer_blocks]
            assert sites[-1].context_pre_only
        else:
            double = [f"transformer_blocks.{i}.attn" for i in range(len(t.transformer_blocks))]
            single = [f"single_transformer_blocks.{j}.attn" for j in range(len(t.single_transformer_blocks))]
            assert names == double + single
            assert [s.kind for s in sites] == ["joint"] * len(double) + ["single"] * len(single)


def test_sd35_attn2_is_image_only_self_attention_and_not_a_site(pipes):
    pipe = pipes["sd3.5"]
    attn2 = {n: m for n, m in pipe.transformer.named_modules() if n.endswith(".attn2")}
    assert attn2, "the SD3.5-style config must have dual-attention blocks"
    seen = {}
    handles = [
        m.register_forward_pre_hook(
            lambda mod, a, kw, n=n: seen.setdefault(n, (a[1] if len(a) > 1 else kw.get("encoder_hidden_states"))),
            with_kwargs=True,
        )
        for n, m in attn2.items()
    ]
    try:
        _run(pipe, "sd3.5")
    finally:
        for h in handles:
            h.remove()
    assert set(seen) == set(attn2) and all(v is None for v in seen.values())
    assert not set(attn2) & {s.name for s in L.text_attention_sites(pipe.transformer)}


def test_flux_single_stream_sequence_is_text_then_image(pipes):
    pipe = pipes["flux"]
    block = pipe.transformer.single_transformer_blocks[0]
    got = {}
    h1 = block.register_forward_pre_hook(lambda m, a, kw: got.update(block=kw), with_kwargs=True)
    h2 = block.attn.register_forward_pre_hook(lambda m, a, kw: got.update(attn=kw), with_kwargs=True)
    try:
        _run(pipe, "flux")
    finally:
        h1.remove(), h2.remove()
    text, image, temb = got["block"]["encoder_hidden_states"], got["block"]["hidden_states"], got["block"]["temb"]
    seq = got["attn"]["hidden_states"]
    nt = text.shape[1]
    site = [s for s in L.text_attention_sites(pipe.transformer) if s.kind == "single"][0]
    img_keys, txt_keys = site.key_slices(image.shape[1], nt)
    # The block's norm is per token, so normalising each stream alone must reproduce its rows of the attention input.
    with torch.no_grad():
        assert torch.allclose(seq[:, txt_keys], block.norm(text, emb=temb)[0], atol=1e-6)
        assert torch.allclose(seq[:, img_keys], block.norm(image, emb=temb)[0], atol=1e-6)


def test_sd3_text_sequence_is_clip_then_t5(pipes):
    pipe = pipes["sd3"]
    kw = dict(do_classifier_free_guidance=False, max_sequence_length=CALL["sd3"]["max_sequence_length"])
    base = pipe.encode_prompt("a cat", "a cat", "a cat", **kw)[0]
    t5_changed = pipe.encode_prompt("a cat", "a cat", "a dog", **kw)[0]  # prompt_3 goes to T5 only
    clip_changed = pipe.encode_prompt("a cat", "a dog", "a cat", **kw)[0]  # prompt_2 goes to CLIP-G only
    segments = L.text_segments(pipe, base.shape[1])
    assert [s.name for s in segments] == ["clip", "t5"]
    clip, t5 = segments
    assert clip.start == 0 and t5.start == clip.length and clip.length + t5.length == base.shape[1]
    rows_t5 = (t5_changed - base).abs().amax(dim=(0, 2)) > 0
    rows_clip = (clip_changed - base).abs().amax(dim=(0, 2)) > 0
    assert not rows_t5[: t5.start].any() and rows_t5[t5.start :].any()
    assert rows_clip[: clip.length].any() and not rows_clip[clip.length :].any()


def test_flux_text_sequence_is_t5_only(pipes):
    pipe = pipes["flux"]
    n = CALL["flux"]["max_sequence_length"]
    embeds, pooled, _ = pipe.encode_prompt("a cat", "a cat", max_sequence_length=n)
    clip_changed, pooled_changed, _ = pipe.encode_prompt("a dog", "a cat", max_sequence_length=n)
    t5_changed, _, _ = pipe.encode_prompt("a cat", "a dog", max_sequence_length=n)
    assert torch.equal(embeds, clip_changed) and not torch.equal(pooled, pooled_changed)
    assert not torch.equal(embeds, t5_changed)
    assert [s.name for s in L.text_segments(pipe, embeds.shape[1])] == ["t5"]


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_end_tokens_are_found_in_the_ids_the_text_encoders_receive(pipes, family):
    pipe = pipes[family]
    received: dict[str, list] = {}
    handles = []
    for attr in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        enc = getattr(pipe, attr, None)
        if enc is not None:
            handles.append(enc.register_forward_pre_hook(
                lambda m, a, kw, attr=attr: received.setdefault(attr, []).append(
                    (a[0] if a else kw["input_ids"]).tolist()), with_kwargs=True))
    try:
        _run(pipe, family, PROMPTS)
    finally:
        for h in handles:
            h.remove()
    calls = _Calls(pipe.transformer)
    try:
        _run(pipe, family, PROMPTS)
    finally:
        calls.close()
    num_text = calls.calls[-1]["encoder_hidden_states"].shape[1]
    encoder_of = {"tokenizer": "text_encoder", "tokenizer_2": "text_encoder_2", "tokenizer_3": "text_encoder_3"}
    for seg in L.text_segments(pipe, num_text):
        # The prompts are encoded first (the negative prompt after), so the first call's ids are the prompts'.
        ids = received[encoder_of[seg.tokenizer_attr]][0]
        assert ids == L.segment_input_ids(pipe, seg, PROMPTS)
        ends = L.end_token_positions(pipe, seg, PROMPTS)
        for row, end in zip(ids, ends):
            assert row[end - seg.start] == seg.end_token_id
            assert seg.end_token_id not in row[: end - seg.start]
    if family == "sd3":
        # CLIP-G pads with "!" rather than EOT, yet its end token sits where CLIP-L's does.
        clip_l, clip_g = received["text_encoder"][0], received["text_encoder_2"][0]
        eot_l, eot_g = pipe.tokenizer.eos_token_id, pipe.tokenizer_2.eos_token_id
        assert [L.first_index(r, eot_l) for r in clip_l] == [L.first_index(r, eot_g) for r in clip_g]


def test_pixart_cfg_is_one_batch_uncond_then_cond(pipes):
    pipe = pipes["pixart"]
    calls = _Calls(pipe.transformer)
    try:
        _run(pipe, "pixart", ["a cat", "a dog"], guidance_scale=4.5)
    finally:
        calls.close()
    layout = L.cfg_layout(pipe, 2, guidance_scale=4.5)
    assert layout.mode == "batch" and len(calls.calls) == 2
    length = CALL["pixart"]["max_sequence_length"]
    cond, _, uncond, _ = pipe.encode_prompt(["a cat", "a dog"], max_sequence_length=length)
    text = calls.calls[0]["encoder_hidden_states"]
    assert torch.allclose(text[:2], uncond, atol=1e-5) and torch.allclose(text[2:], cond, atol=1e-5)
    assert L.cfg_layout(pipe, 2, guidance_scale=1.0).mode == "none"


def test_sd3_skip_layer_guidance_adds_cond_only_calls_at_the_same_timestep(pipes):
    pipe = pipes["sd3"]
    steps, n = 4, 2
    kwargs = dict(skip_guidance_layers=[0], skip_layer_guidance_stop=0.8)
    calls = _Calls(pipe.transformer)
    try:
        _run(pipe, "sd3", ["a cat", "a dog"], num_inference_steps=steps, **kwargs)
    finally:
        calls.close()
    layout = L.cfg_layout(pipe, steps, **CALL["sd3"], **kwargs)
    assert layout.mode == "batch" and layout.extra_cond_steps
    assert len(calls.calls) == sum(layout.calls_per_step(i) for i in range(steps))
    it = iter(calls.calls)
    for i in range(steps):
        cfg_call = next(it)
        assert cfg_call["hidden_states"].shape[0] == 2 * n and cfg_call.get("skip_layers") is None
        if i in layout.extra_cond_steps:
            extra = next(it)
            assert extra["hidden_states"].shape[0] == n and extra["skip_layers"] == [0]
            assert torch.equal(extra["timestep"], cfg_call["timestep"][:n])
            assert torch.equal(extra["encoder_hidden_states"], cfg_call["encoder_hidden_states"][n:])


def test_flux_needs_true_cfg_and_a_negative_prompt_for_an_unconditional_branch(pipes):
    pipe = pipes["flux"]
    prompts = ["a cat", "a dog"]
    calls = _Calls(pipe.transformer)
    try:
        _run(pipe, "flux", prompts, true_cfg_scale=3.0)  # no negative prompt: silently no CFG
        silent = len(calls.calls)
        calls.calls.clear()
        _run(pipe, "flux", prompts, true_cfg_scale=3.0, negative_prompt=[""] * len(prompts))
    finally:
        calls.close()
    assert silent == 2 and L.cfg_layout(pipe, 2, true_cfg_scale=3.0).mode == "none"
    layout = L.cfg_layout(pipe, 2, true_cfg_scale=3.0, negative_prompt=[""] * 2)
    assert layout.mode == "calls" and layout.cond_first and len(calls.calls) == 4
    n = CALL["flux"]["max_sequence_length"]
    cond = pipe.encode_prompt(prompts, prompts, max_sequence_length=n)[0]
    uncond = pipe.encode_prompt(["", ""], ["", ""], max_sequence_length=n)[0]
    assert (cond - uncond).abs().max() > 0.1
    for first, second in (calls.calls[0:2], calls.calls[2:4]):
        # T5 outputs differ in the last ulp between batch sizes, so compare to 1e-5; cond and uncond differ by O(1).
        assert torch.allclose(first["encoder_hidden_states"], cond, atol=1e-5)
        assert torch.allclose(second["encoder_hidden_states"], uncond, atol=1e-5)
        assert torch.equal(first["timestep"], second["timestep"])
        assert torch.equal(first["hidden_states"], second["hidden_states"])


def test_prediction_layout(pipes):
    for family, pipe in pipes.items():
        pred = L.prediction_layout(pipe)
        cfg = pipe.transformer.config
        if family.startswith("pixart"):
            assert pred.kind == "epsilon" and pred.guided_channels == cfg.in_channels < cfg.out_channels
        else:
            assert pred.kind == "flow_velocity"
            assert pred.packed == (family == "flux")


@pytest.mark.parametrize("family", ["pixart", "sd3"])
def test_image_tokens_are_row_major_patches_of_the_latent(pipes, family):
    pipe = pipes[family]
    t = pipe.transformer
    p = t.config.patch_size
    # The first block's input: tokens straight from the patch embedding, before any attention mixes them.
    first_block = t.transformer_blocks[0]
    height, width = 2 * p * 3, 2 * p * 5  # a non-square latent
    seen = []
    handle = first_block.register_forward_pre_hook(lambda m, a, kw: seen.append(a[0] if a else kw["hidden_states"]),
                                                   with_kwargs=True)
    latent = torch.randn(1, t.config.in_channels, height, width, generator=torch.Generator().manual_seed(0))
    poked = latent.clone()
    r, c = height - 1, 1  # a pixel in the last patch row, second patch column
    poked[0, :, r, c] += 1.0
    text_width = t.config.caption_channels if family == "pixart" else t.config.joint_attention_dim
    text = torch.randn(1, 4, text_width, generator=torch.Generator().manual_seed(1))
    kwargs = dict(encoder_hidden_states=text, timestep=torch.tensor([500.0]), return_dict=False)
    if family == "pixart":
        kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    else:
        kwargs["pooled_projections"] = torch.zeros(1, t.config.pooled_projection_dim)
    try:
        with torch.no_grad():
            t(latent, **kwargs)
            t(poked, **kwargs)
    finally:
        handle.remove()
    changed = ((seen[1] - seen[0]).abs().amax(dim=(0, 2)) > 0).nonzero().flatten().tolist()
    h, w = L.image_grid(L.family_of(t), latent, p)
    assert (h, w) == (height // p, width // p)
    assert changed == [(r // p) * w + c // p]


def test_pixart_token_grid_follows_the_binned_size(pipes):
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
        ASPECT_RATIO_256_BIN,
        ASPECT_RATIO_512_BIN,
        ASPECT_RATIO_1024_BIN,
    )

    pipe = pipes["pixart"]
    bins = {32: ASPECT_RATIO_256_BIN, 64: ASPECT_RATIO_512_BIN, 128: ASPECT_RATIO_1024_BIN}
    bins = bins[pipe.transformer.config.sample_size]
    height, width = 128, 256
    calls = _Calls(pipe.transformer)
    try:
        _run(pipe, "pixart", height=height, width=width)
    finally:
        calls.close()
    latent = calls.calls[0].get("hidden_states")
    bh, bw = pipe.image_processor.classify_height_width_bin(height, width, ratios=bins)
    p, f = pipe.transformer.config.patch_size, pipe.vae_scale_factor
    grid = L.image_grid("pixart", latent, p)
    assert grid == (bh // f // p, bw // f // p) and grid != (height // f // p, width // f // p)


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_step_index_is_read_from_the_scheduler_timesteps_storage(pipes, family):
    pipe = pipes[family]
    extra = {
        "pixart": dict(guidance_scale=4.5),
        "sd3": dict(skip_guidance_layers=[0], skip_layer_guidance_stop=0.8),
        "flux": dict(true_cfg_scale=3.0, negative_prompt=[""]),
    }[family]
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append((L.step_index(pipe, kw["timestep"]), float(kw["timestep"].flatten()[0]))),
        with_kwargs=True,
    )
    try:
        _run(pipe, family, num_inference_steps=4, **extra)
    finally:
        handle.remove()
    layout = L.cfg_layout(pipe, 4, **CALL[family], **extra)
    expected = [i for i in range(4) for _ in range(layout.calls_per_step(i))]
    assert [i for i, _ in seen] == expected
    # Calls of one step share the timestep value; different steps do not.
    values = {}
    for i, v in seen:
        values.setdefault(i, set()).add(v)
    assert all(len(v) == 1 for v in values.values()) and len({next(iter(v)) for v in values.values()}) == 4


def test_sd3_without_t5_has_only_the_clip_segment():
    from diffusers import StableDiffusion3Pipeline

    full = tiny_dit_pipeline("sd3")
    parts = dict(full.components, text_encoder_3=None, tokenizer_3=None)
    pipe = StableDiffusion3Pipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    calls = _Calls(pipe.transformer)
    try:
        _run(pipe, "sd3")
    finally:
        calls.close()
    num_text = calls.calls[0]["encoder_hidden_states"].shape[1]
    segments = L.text_segments(pipe, num_text)
    # The pipeline still appends max_sequence_length zero rows for the missing T5; they are keys without a </s>.
    assert [s.name for s in segments] == ["clip"]
    assert num_text == segments[0].length + CALL["sd3"]["max_sequence_length"]
