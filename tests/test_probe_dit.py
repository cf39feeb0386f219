"""BrightEndingProbe on diffusion-transformer pipelines (PixArt-alpha/sigma, SD3/SD3.5, FLUX) against the
independent eager reference `memlens.dit_reference`.

The reference side records the transformer and attention-module inputs with plain hooks (no processor), recomputes
softmax(QK^T) over the full key sequence in float64 with its own RoPE, and takes D/LD with torch directly. End tokens
come from the ids the text encoders actually received (forward pre-hooks), not from re-tokenising. The probe and
the recorder watch the same pass: both only read, and a separate test shows the probe changes no image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memlens import BrightEndingProbe, MemlensError
from memlens import dit_layout as L
import _dit_reference as R
from memlens import quantities, unet_call
from memlens.testing_dit import tiny_dit_pipeline

PROMPTS = ["a cat", "two dogs on a sofa"]
CALL = {
    "pixart": dict(max_sequence_length=16, guidance_scale=4.5),
    "pixart-sigma": dict(max_sequence_length=16, guidance_scale=4.5),
    "sd3": dict(max_sequence_length=8, guidance_scale=4.0),
    "sd3.5": dict(max_sequence_length=8, guidance_scale=4.0),
    "flux": dict(max_sequence_length=8, true_cfg_scale=3.0, negative_prompt=[""] * len(PROMPTS)),
}
# (height, width) requests; None is the pipeline's default. PixArt's 128x256 is binned to another bucket.
SIZES = {
    "pixart": [None, (128, 256)],
    "pixart-sigma": [(256, 128)],
    "sd3": [None, (32, 64)],
    "sd3.5": [(64, 32)],
    "flux": [None, (32, 64)],
}
CASES = [(f, s) for f, sizes in SIZES.items() for s in sizes]
# The text encoder that fills each family's (default) end-token segment, and its tokenizer.
END_ENCODER = {"pixart": ("text_encoder", "tokenizer"), "sd3": ("text_encoder", "tokenizer"),
               "flux": ("text_encoder_2", "tokenizer_2")}
T5_ENCODER = {"pixart": "text_encoder", "sd3": "text_encoder_3", "flux": "text_encoder_2"}


@pytest.fixture(scope="module")
def pipes():
    return {}


def _pipe(pipes, family):
    if family not in pipes:
        pipes[family] = tiny_dit_pipeline(family)
    return pipes[family]


def _base(family: str) -> str:
    return {"pixart-sigma": "pixart", "sd3.5": "sd3"}.get(family, family)


class _EncoderIds:
    """The input ids each text encoder receives, per call (plain pre-hooks)."""

    def __init__(self, pipe, names):
        self.ids = {name: [] for name in names}
        self.handles = [
            getattr(pipe, name).register_forward_pre_hook(self._hook(name), with_kwargs=True) for name in names
        ]

    def _hook(self, name):
        def hook(module, args, kwargs):
            self.ids[name].append((args[0] if args else kwargs["input_ids"]).clone())

        return hook

    def close(self):
        for h in self.handles:
            h.remove()

    def first_end(self, name, token_id):
        """First end token of the positive prompts' ids (encoded before the negative ones)."""
        rows = self.ids[name][0]
        return [int((row == token_id).nonzero()[0]) for row in rows], rows.shape[1]


def _kwargs(family, size=None, steps=2, seed=0, **overrides):
    kw = dict(CALL[family], num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
              output_type="latent")
    if size is not None:
        kw.update(height=size[0], width=size[1])
    kw.update(overrides)
    return kw


def _run(pipe, family, probe_options=None, size=None, steps=2, prompt=PROMPTS, record=True, **overrides):
    """One pipeline pass with the probe and (optionally) the reference recorder; returns (probe, calls, ids)."""
    sites = L.text_attention_sites(pipe.transformer)
    base = _base(family)
    names = sorted({END_ENCODER[base][0], T5_ENCODER[base]})
    ids = _EncoderIds(pipe, names)
    kwargs = _kwargs(family, size, steps, **overrides)
    probe = BrightEndingProbe(pipe, **(probe_options or {}))
    try:
        if record:
            with R.CallRecorder(pipe.transformer, sites) as rec, probe:
                out = pipe(prompt, **kwargs)
            calls = rec.calls
        else:
            with probe:
                out = pipe(prompt, **kwargs)
            calls = None
    finally:
        ids.close()
    return probe, calls, ids, out


def _grid(pipe, call):
    fam = L.family_of(pipe)
    p = 1 if fam == "flux" else pipe.transformer.config.patch_size
    return L.image_grid(fam, torch.empty(call.hidden_states_shape), p, img_ids=call.img_ids)


def _conditional_call(family, step_calls, n):
    # Reference knowledge per family: PixArt/SD3 make one [uncond ; cond] call (skip-layer calls come after it);
    # FLUX true CFG makes the cond call first (tests/test_dit_reference.py checks both against the scheduler input).
    call = step_calls[0]
    rows = slice(0, n) if _base(family) == "flux" else slice(n, 2 * n)
    return call, rows


def _reference_maps(pipe, family, calls, ends, n, normalisation="text_renormalised", sites=None):
    sites = sites or L.text_attention_sites(pipe.transformer)
    call, rows = _conditional_call(family, R.steps_of(calls)[-1], n)
    maps = []
    for site in sites:
        a = R.site_attention(site, call.sites[site.name], call.num_text)
        block = getattr(a, normalisation)[rows]
        if isinstance(ends[0], (list, tuple)):  # several end tokens: mean of their columns
            maps.append(torch.stack([R.end_token_map(block, list(e), _grid(pipe, call)) for e in ends]).mean(0))
        else:
            maps.append(R.end_token_map(block, ends, _grid(pipe, call)))
    return torch.stack(maps).mean(0), call


def _default_ends(pipe, family, ids, per_prompt=1):
    enc, tok = END_ENCODER[_base(family)]
    ends, _ = ids.first_end(enc, getattr(pipe, tok).eos_token_id)
    return [e for e in ends for _ in range(per_prompt)]


def _reference_magnitudes(pipe, family, calls, mask, steps):
    cfg = L.cfg_layout(pipe, steps, **CALL[family])
    footprint = 2 if _base(family) == "flux" else pipe.transformer.config.patch_size
    return R.magnitudes(pipe, calls, cfg, mask, footprint)


def _stack(records, field):
    return np.stack([getattr(r, field) for r in records])


@pytest.mark.parametrize("family,size", CASES)
def test_be_map_d_and_ld_equal_the_reference(pipes, family, size):
    pipe = _pipe(pipes, family)
    probe, calls, ids, _ = _run(pipe, family, size=size)
    n = len(PROMPTS)
    ends = _default_ends(pipe, family, ids)
    ref_map, call = _reference_maps(pipe, family, calls, ends, n)
    recs = probe.records
    assert len(recs) == n and [r.prompt for r in recs] == PROMPTS
    assert [r.eos_index for r in recs] == ends
    be = _stack(recs, "be_map")
    assert be.shape == (n, *_grid(pipe, call))
    np.testing.assert_allclose(be, ref_map.numpy(), rtol=1e-5, atol=1e-7)
    d, ld = _reference_magnitudes(pipe, family, calls, ref_map, 2)
    np.testing.assert_allclose(_stack(recs, "magnitude"), d.numpy(), rtol=1e-5)
    np.testing.assert_allclose(_stack(recs, "masked_magnitude"), ld.numpy(), rtol=1e-5)
    assert not np.allclose(_stack(recs, "magnitude"), _stack(recs, "masked_magnitude"))
    assert all(r.mask_resize == "patch" for r in recs)
    if size is not None and not family.startswith("pixart"):
        assert be.shape[1] != be.shape[2]


def test_several_images_per_prompt_keep_prompt_major_rows(pipes):
    pipe = _pipe(pipes, "sd3")
    probe, calls, ids, _ = _run(pipe, "sd3", num_images_per_prompt=2)
    ends = _default_ends(pipe, "sd3", ids, per_prompt=2)
    ref_map, _ = _reference_maps(pipe, "sd3", calls, ends, 4)
    recs = probe.records
    assert [(r.prompt_index, r.image_index) for r in recs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    np.testing.assert_allclose(_stack(recs, "be_map"), ref_map.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_joint_normalisation_equals_the_reference(pipes, family):
    pipe = _pipe(pipes, family)
    probe, calls, ids, _ = _run(pipe, family, probe_options=dict(normalisation="joint"), size=(32, 64))
    ref_map, _ = _reference_maps(pipe, family, calls, _default_ends(pipe, family, ids), 2, normalisation="joint")
    be = _stack(probe.records, "be_map")
    np.testing.assert_allclose(be, ref_map.numpy(), rtol=1e-5, atol=1e-8)
    renorm, _ = _reference_maps(pipe, family, calls, _default_ends(pipe, family, ids), 2)
    assert (be < renorm.numpy()).all()  # image keys take part of every query's mass


def test_sd3_end_token_choices(pipes):
    pipe = _pipe(pipes, "sd3")
    n = len(PROMPTS)
    probe_t5, calls, ids, _ = _run(pipe, "sd3", probe_options=dict(segment="t5"))
    clip_ends, _ = ids.first_end("text_encoder", pipe.tokenizer.eos_token_id)
    t5_local, t5_len = ids.first_end("text_encoder_3", pipe.tokenizer_3.eos_token_id)
    num_text = calls[0].num_text
    t5_ends = [num_text - t5_len + e for e in t5_local]  # T5 fills the tail of the text sequence
    ref_t5, _ = _reference_maps(pipe, "sd3", calls, t5_ends, n)
    np.testing.assert_allclose(_stack(probe_t5.records, "be_map"), ref_t5.numpy(), rtol=1e-5, atol=1e-7)
    assert [r.eos_index for r in probe_t5.records] == t5_ends
    probe_both, calls, _, _ = _run(pipe, "sd3", probe_options=dict(segment="both"))
    ref_both, _ = _reference_maps(pipe, "sd3", calls, [clip_ends, t5_ends], n)
    np.testing.assert_allclose(_stack(probe_both.records, "be_map"), ref_both.numpy(), rtol=1e-5, atol=1e-7)
    with pytest.raises(MemlensError, match="segment must be one of"):
        BrightEndingProbe(pipe, segment="pooled")


def test_segment_is_refused_on_unet_pipelines():
    from memlens.testing import tiny_pipeline

    with pytest.raises(MemlensError, match="UNet pipelines"):
        BrightEndingProbe(tiny_pipeline("sd1"), segment="t5")


def test_flux_has_no_clip_segment(pipes):
    pipe = _pipe(pipes, "flux")
    with pytest.raises(MemlensError, match="segment='clip'.*t5"):
        with BrightEndingProbe(pipe, segment="clip"):
            pipe(PROMPTS, **_kwargs("flux"))


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_one_pass_equals_two_passes(pipes, family):
    # The reference procedure: generate once for the BE map, then again with the same seed and apply it as the mask.
    pipe = _pipe(pipes, family)
    probe, _, _, _ = _run(pipe, family, record=False, size=(32, 64) if family != "pixart" else None, steps=3)
    sites = L.text_attention_sites(pipe.transformer)
    with R.CallRecorder(pipe.transformer, sites) as rec:
        pipe(PROMPTS, **_kwargs(family, (32, 64) if family != "pixart" else None, steps=3))
    mask = torch.from_numpy(_stack(probe.records, "be_map")).double()
    d, ld = _reference_magnitudes(pipe, family, rec.calls, mask, 3)
    np.testing.assert_allclose(_stack(probe.records, "magnitude"), d.numpy(), rtol=1e-5)
    np.testing.assert_allclose(_stack(probe.records, "masked_magnitude"), ld.numpy(), rtol=1e-5)


@pytest.mark.parametrize("family", ["pixart", "sd3.5", "flux"])
def test_images_are_bit_identical_and_processors_restored(pipes, family):
    pipe = _pipe(pipes, family)
    modules = {name: m for name, m in pipe.transformer.named_modules() if hasattr(m, "processor")}
    before = {name: m.processor for name, m in modules.items()}
    plain = pipe(PROMPTS, **_kwargs(family, output_type="np"))
    probe, _, _, probed = _run(pipe, family, record=False, output_type="np")
    assert np.array_equal(plain.images, probed.images)
    assert len(probe.records) == len(PROMPTS)
    assert all(m.processor is before[name] for name, m in modules.items())


def test_processors_restored_when_the_run_fails(pipes):
    pipe = _pipe(pipes, "flux")
    before = {name: m.processor for name, m in pipe.transformer.named_modules() if hasattr(m, "processor")}
    with pytest.raises(MemlensError):
        with BrightEndingProbe(pipe):
            pipe(PROMPTS, **_kwargs("flux", negative_prompt=None))
    after = {name: m.processor for name, m in pipe.transformer.named_modules() if hasattr(m, "processor")}
    assert all(after[k] is v for k, v in before.items())


def test_only_the_chosen_blocks_are_wrapped(pipes):
    pipe = _pipe(pipes, "flux")
    sites = {s.name for s in L.text_attention_sites(pipe.transformer)}
    probe = BrightEndingProbe(pipe, layers="single_transformer_blocks")
    assert probe.layer_names == [n for n in sites if n.startswith("single_transformer_blocks.")]
    wrapped = []
    with probe:
        for name, m in pipe.transformer.named_modules():
            if hasattr(m, "processor") and type(m.processor).__name__ == "CaptureProcessor":
                wrapped.append(name)
        pipe(PROMPTS, **_kwargs("flux"))
    assert wrapped == probe.layer_names
    assert BrightEndingProbe(pipe).layer_names == [s.name for s in L.text_attention_sites(pipe.transformer)]
    with pytest.raises(MemlensError, match="matches no text-attention layer"):
        BrightEndingProbe(pipe, layers="transformer_blocks.7")


def test_block_selection_equals_the_reference_on_those_blocks(pipes):
    pipe = _pipe(pipes, "flux")
    probe, calls, ids, _ = _run(pipe, "flux", probe_options=dict(layers=["single_transformer_blocks.0"]))
    sites = [s for s in L.text_attention_sites(pipe.transformer) if s.kind == "single"]
    ref_map, _ = _reference_maps(pipe, "flux", calls, _default_ends(pipe, "flux", ids), 2, sites=sites)
    np.testing.assert_allclose(_stack(probe.records, "be_map"), ref_map.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_prompt_embeds_input(pipes, family):
    pipe = _pipe(pipes, family)
    msl = CALL[family]["max_sequence_length"]
    n = len(PROMPTS)
    if family == "pixart":
        pe, pm, ne, nm = pipe.encode_prompt(PROMPTS, max_sequence_length=msl)
        embeds = dict(prompt_embeds=pe, prompt_attention_mask=pm, negative_prompt_embeds=ne,
                      negative_prompt_attention_mask=nm, negative_prompt=None)
    elif family == "sd3":
        pe, ne, pp, npp = pipe.encode_prompt(PROMPTS, None, None, max_sequence_length=msl)
        embeds = dict(prompt_embeds=pe, negative_prompt_embeds=ne, pooled_prompt_embeds=pp,
                      negative_pooled_prompt_embeds=npp)
    else:
        pe, pp, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=msl)
        ne, npp, _ = pipe.encode_prompt([""] * n, None, max_sequence_length=msl)
        embeds = dict(prompt_embeds=pe, pooled_prompt_embeds=pp, negative_prompt_embeds=ne,
                      negative_pooled_prompt_embeds=npp, negative_prompt=None)
    from_text, _, _, _ = _run(pipe, family, record=False)
    with pytest.raises(MemlensError, match="prompts=\\[...\\] or eos_indices"):
        _run(pipe, family, record=False, prompt=None, **embeds)
    from_embeds, _, _, _ = _run(pipe, family, probe_options=dict(prompts=PROMPTS), record=False, prompt=None,
                                **embeds)
    positions = [r.eos_index for r in from_text.records]
    from_ids, _, _, _ = _run(pipe, family, probe_options=dict(eos_indices=positions), record=False, prompt=None,
                             **embeds)
    # The two embeds runs get identical inputs, so they must agree exactly; against the text run they differ only by
    # the float noise of encoding the prompts in another batch arrangement (PixArt: ~1e-6), hence rtol 1e-4 there.
    for field in ("be_map", "magnitude", "masked_magnitude"):
        assert np.array_equal(_stack(from_embeds.records, field), _stack(from_ids.records, field))
    assert [r.eos_index for r in from_embeds.records] == [r.eos_index for r in from_ids.records] == positions
    np.testing.assert_allclose(_stack(from_ids.records, "be_map"), _stack(from_text.records, "be_map"), rtol=1e-4,
                               atol=1e-7)
    np.testing.assert_allclose(_stack(from_ids.records, "magnitude"), _stack(from_text.records, "magnitude"),
                               rtol=1e-4)


def test_sd3_skip_layer_guidance_does_not_corrupt_d(pipes):
    pipe = _pipe(pipes, "sd3")
    extra = dict(skip_guidance_layers=[0], skip_layer_guidance_stop=1.0)
    probe, calls, ids, _ = _run(pipe, "sd3", steps=4, **extra)
    steps = R.steps_of(calls)
    assert [len(s) for s in steps] == [1, 2, 2, 2]  # cond-only skip-layer calls at steps 1..3, the last included
    cfg = L.cfg_layout(pipe, 4, **CALL["sd3"], **extra)
    ref_map, _ = _reference_maps(pipe, "sd3", calls, _default_ends(pipe, "sd3", ids), 2)
    d, ld = R.magnitudes(pipe, calls, cfg, ref_map, pipe.transformer.config.patch_size)
    recs = probe.records
    np.testing.assert_allclose(_stack(recs, "be_map"), ref_map.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(_stack(recs, "magnitude"), d.numpy(), rtol=1e-5)
    np.testing.assert_allclose(_stack(recs, "masked_magnitude"), ld.numpy(), rtol=1e-5)
    assert np.array_equal(recs[0].timesteps, pipe.scheduler.timesteps.numpy())


def test_flux_without_a_negative_prompt_is_refused_clearly(pipes):
    pipe = _pipe(pipes, "flux")
    for overrides in (dict(negative_prompt=None), dict(negative_prompt=None, true_cfg_scale=1.0),
                      dict(true_cfg_scale=1.0)):
        with pytest.raises(MemlensError, match="true_cfg_scale > 1 AND a negative prompt"):
            with BrightEndingProbe(pipe):
                pipe(PROMPTS, **_kwargs("flux", **overrides))


def test_flux_without_true_cfg_records_maps_with_d_unavailable(pipes):
    pipe = _pipe(pipes, "flux")
    probe, calls, ids, _ = _run(pipe, "flux", probe_options=dict(require_guidance=False), negative_prompt=None)
    assert len(calls) == 2  # one call per step: no unconditional branch
    ref_map, _ = _reference_maps(pipe, "flux", calls, _default_ends(pipe, "flux", ids), 2)
    recs = probe.records
    np.testing.assert_allclose(_stack(recs, "be_map"), ref_map.numpy(), rtol=1e-5, atol=1e-7)
    assert np.isnan(_stack(recs, "magnitude")).all() and np.isnan(_stack(recs, "masked_magnitude")).all()
    assert _stack(recs, "magnitude").shape == (2, 2)


def test_pixart_without_guidance_is_refused(pipes):
    pipe = _pipe(pipes, "pixart")
    with pytest.raises(MemlensError, match="guidance_scale <= 1"):
        with BrightEndingProbe(pipe):
            pipe(PROMPTS, **_kwargs("pixart", guidance_scale=1.0))


def test_keep_energy_reapplies_the_patch_mask(pipes):
    pipe = _pipe(pipes, "flux")
    probe, _, _, _ = _run(pipe, "flux", probe_options=dict(keep_energy=True), record=False)
    rec = probe.records[0]
    assert rec.energy.shape[1:] == tuple(2 * s for s in rec.be_map.shape)  # 2x2 packed latent patches
    np.testing.assert_allclose(rec.masked_magnitude_with(rec.be_map), rec.masked_magnitude, rtol=1e-6)


def test_fused_projections_keep_parity():
    pipe = tiny_dit_pipeline("flux")
    pipe.transformer.fuse_qkv_projections()
    probe, calls, ids, _ = _run(pipe, "flux")
    ref_map, _ = _reference_maps(pipe, "flux", calls, _default_ends(pipe, "flux", ids), 2)
    np.testing.assert_allclose(_stack(probe.records, "be_map"), ref_map.numpy(), rtol=1e-5, atol=1e-7)


# -- the core helpers the transformer path added -----------------------------------------------------------------------


def test_step_index_reads_expanded_views_of_the_timesteps():
    timesteps = torch.tensor([999.0, 750.0, 750.0, 250.0])
    assert unet_call.storage_step(timesteps[2].expand(3), timesteps) == 2
    assert unet_call.step_index(timesteps[2].expand(3), timesteps) == 2  # the value alone would say 1
    assert unet_call.step_index(timesteps[2][None].expand(5), timesteps) == 2
    assert unet_call.storage_step(timesteps[1:3], timesteps) is None  # two elements, not a view of one
    assert unet_call.storage_step(timesteps[1].clone(), timesteps) is None
    assert unet_call.step_index(timesteps[1].clone() / 1000 * 1000, timesteps) == 1  # value fallback


def test_patch_mask_is_the_token_footprint():
    maps = torch.arange(6, dtype=torch.float32).view(1, 2, 3)
    up = quantities.mask_to_latent(maps, (4, 6), mode="patch")
    assert torch.equal(up[0, ::2, ::2], maps[0]) and torch.equal(up[0, 1::2, 1::2], maps[0])
    with pytest.raises(ValueError):
        quantities.mask_to_latent(maps, (5, 6), mode="patch")
    e = torch.rand(1, 4, 6, generator=torch.Generator().manual_seed(0))
    token_energy = e.view(1, 2, 2, 3, 2).sum(dim=(2, 4))
    expect = (token_energy * maps.pow(2)).sum().sqrt() / maps.mean()
    assert torch.allclose(quantities.magnitude(e, up), expect[None])


def test_paired_difference_equals_the_batch_form():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 8, 4, 4, generator=g), torch.randn(2, 8, 4, 4, generator=g)
    batch = quantities.guidance_difference(torch.cat([uncond, cond]), 4)
    assert torch.equal(quantities.paired_difference(cond, uncond, 4), batch)
    assert torch.equal(batch, (cond[:, :4] - uncond[:, :4]).float())


# -- memlens scan on a saved tiny transformer pipeline ------------------------------------------------------------------


def _cli(argv) -> int:
    from memlens.cli import main

    try:
        main([str(a) for a in argv])
    except SystemExit as ex:
        return int(ex.code or 0)
    return 0


@pytest.fixture(scope="module")
def prompt_txt(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "p.txt"
    path.write_text("a cat\ntwo dogs on a sofa\n")
    return path


@pytest.mark.parametrize("family,size", [("pixart", 256), ("sd3", 32)])
def test_cli_scan_on_a_saved_transformer_pipeline(family, size, prompt_txt, tmp_path):
    import json

    folder = tmp_path / family
    tiny_dit_pipeline(family).save_pretrained(folder)
    out = tmp_path / "scan"
    args = ["scan", "--model", folder, "--prompts", prompt_txt, "--out", out, "--steps", 2, "--batch-size", 2]
    assert _cli(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["pipeline"]["family"] == family
    assert (run["settings"]["height"], run["settings"]["width"]) == (size, size)  # the transformer's native size
    lines = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [line["prompt"] for line in lines] == ["a cat", "two dogs on a sofa"]
    for line in lines:
        assert len(line["D"]) == len(line["LD"]) == 2 and np.isfinite(line["D"]).all()
        assert np.load(out / line["be_map"]).ndim == 2
    if family == "sd3":
        assert _cli(["report", out]) == 0 and (out / "report.html").stat().st_size > 0


def test_cli_scan_refuses_flux_without_true_cfg_in_one_line(prompt_txt, tmp_path, capsys):
    folder = tmp_path / "flux"
    tiny_dit_pipeline("flux").save_pretrained(folder)
    out = tmp_path / "scan"
    args = ["scan", "--model", folder, "--prompts", prompt_txt, "--out", out, "--steps", 2, "--height", 32,
            "--width", 32]
    assert _cli(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "true_cfg_scale" in line]
    assert len(err) == 1 and "true_cfg_scale > 1 AND a negative prompt" in err[0]


def test_cli_scan_runs_flux_with_true_cfg(prompt_txt, tmp_path):
    import json

    folder = tmp_path / "flux"
    tiny_dit_pipeline("flux").save_pretrained(folder)
    out = tmp_path / "scan"
    args = ["scan", "--model", folder, "--prompts", prompt_txt, "--out", out, "--steps", 2, "--height", 32,
            "--width", 32, "--true-cfg-scale", 2.0, "--negative-prompt", ""]
    assert _cli(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["settings"]["true_cfg_scale"] == 2.0
    lines = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert all(len(line["D"]) == 2 and np.isfinite(line["D"]).all() and np.isfinite(line["LD"]).all()
               for line in lines)
    # A resume with another true-CFG scale is refused, naming the option.
    assert _cli(args[:-4] + ["--true-cfg-scale", 3.0, "--negative-prompt", ""]) == 2
    assert _cli(args[:-4] + ["--true-cfg-scale", 1.0, "--negative-prompt", ""]) == 2
