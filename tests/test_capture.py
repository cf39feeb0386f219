"""The one capture processor and its sinks: the all-token sink against an eager softmax(QK^T) that honours the
attention mask, and sinks sharing processors (the probe with the analysis) without changing images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memlens import BrightEndingProbe, capture
from memlens.testbed.analysis import FullAttention
from memlens.testing import tiny_pipeline


@pytest.fixture(scope="module")
def sd1():
    return tiny_pipeline("sd1")


def _eager_probs(attn, hidden_states, text_states, keep):
    """softmax(Q K^T * scale + bias) averaged over heads, float64, written from the definition; `keep` (B, T) is the
    UNet's encoder_attention_mask (1 keep, 0 drop), turned into diffusers' additive bias of -10000."""
    q = attn.to_q(hidden_states).double()
    k = attn.to_k(text_states).double()
    b, heads = q.shape[0], attn.heads
    q = q.view(b, -1, heads, q.shape[-1] // heads).transpose(1, 2)
    k = k.view(b, -1, heads, k.shape[-1] // heads).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / np.sqrt(q.shape[-1])
    scores = scores + ((1.0 - keep.double()) * -10000.0)[:, None, None, :]
    return scores.softmax(dim=-1).mean(dim=1)


def test_all_token_sink_equals_eager_softmax_with_the_attention_mask(sd1):
    unet = sd1.unet
    layers = capture.cross_attention_layers(unet)
    gen = torch.Generator().manual_seed(0)
    b, tokens = 4, 77
    sample = torch.randn(b, 4, 8, 8, generator=gen)
    text = torch.randn(b, tokens, unet.config.cross_attention_dim, generator=gen)
    keep = torch.ones(b, tokens)
    keep[0, 10:] = 0  # row 0 sees only its first 10 tokens
    keep[2, 3:40] = 0
    inputs = {}

    def record(name):
        def pre(module, args, kwargs):
            inputs[name] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return pre

    handles = [l.module.register_forward_pre_hook(record(l.name), with_kwargs=True) for l in layers]
    with torch.no_grad():
        plain = unet(sample, 10, encoder_hidden_states=text, encoder_attention_mask=keep).sample
        sink = capture.AllTokens(rows=slice(0, b))
        attached = capture.attach(layers, sink)
        try:
            captured = unet(sample, 10, encoder_hidden_states=text, encoder_attention_mask=keep).sample
        finally:
            attached.remove()
            for h in handles:
                h.remove()
    assert torch.equal(captured, plain)  # capture never changes the output
    assert set(sink.store) == {l.name for l in layers}
    with torch.no_grad():
        for layer in layers:
            (probs,) = sink.store[layer.name]
            assert probs.dtype == torch.float32 and probs.shape[0] == b and probs.shape[2] == tokens
            expected = _eager_probs(layer.module, inputs[layer.name], text, keep)
            torch.testing.assert_close(probs.double(), expected, rtol=1e-5, atol=1e-6)
            assert probs[0, :, 10:].max() < 1e-6 and probs[2, :, 3:40].max() < 1e-6
    assert not any(isinstance(p, capture.CaptureProcessor) for p in unet.attn_processors.values())


def test_token_columns_read_one_column_of_the_all_token_probabilities(sd1):
    unet = sd1.unet
    layers = capture.select_layers(unet)
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(4, 4, 8, 8, generator=gen)
    text = torch.randn(4, 77, unet.config.cross_attention_dim, generator=gen)
    eos = [3, 7]
    weights = torch.zeros(2, 77)
    weights[0, 3] = weights[1, 7] = 1.0
    columns = capture.TokenColumns(lambda t: weights, rows=slice(2, 4))
    full = capture.AllTokens(rows=slice(2, 4))
    a, b = capture.attach(layers, columns), capture.attach(layers, full)
    try:
        with torch.no_grad():
            unet(sample, 10, encoder_hidden_states=text)
    finally:
        a.remove()  # detaching out of order leaves the other sink working until it goes too
        assert all(isinstance(l.module.processor, capture.CaptureProcessor) for l in layers)
        b.remove()
    assert not any(isinstance(l.module.processor, capture.CaptureProcessor) for l in layers)
    expected = torch.stack([torch.stack([p[0][i, :, e] for i, e in enumerate(eos)]) for p in full.store.values()])
    grid = lambda q: capture.attention_grid(8, 8, q)  # noqa: E731
    h, w = grid(expected.shape[2])
    torch.testing.assert_close(columns.mean(grid), expected.mean(dim=0).view(2, h, w), rtol=0, atol=0)


def test_on_one_grid_upsamples_coarser_layers_to_the_finest_then_averages_by_queries():
    from memlens.maps import upsample

    gen = torch.Generator().manual_seed(0)
    fine, coarse, odd = (torch.rand(3, 8 * 6, generator=gen), torch.rand(3, 4 * 3, generator=gen),
                         torch.rand(3, 2 * 2, generator=gen))
    grids = {48: (8, 6), 12: (4, 3), 4: (2, 2)}
    got = capture.on_one_grid([coarse, fine, odd], grids.__getitem__)
    assert got.shape == (3, 8, 6)
    for i in range(3):  # independently: each layer resized as a user sees it, averaged with one vote per query
        layers = (coarse, fine, odd)
        expected = np.average([upsample(m[i].view(*grids[m.shape[1]]).numpy(), (8, 6)) for m in layers], axis=0,
                              weights=[m.shape[1] for m in layers])
        np.testing.assert_allclose(got[i].numpy(), expected, rtol=1e-6, atol=1e-7)
    # extra trailing dimensions (every token) ride along: each token's slice equals the one-token result
    tokens = torch.rand(3, 12, 5, generator=gen), torch.rand(3, 48, 5, generator=gen)
    both = capture.on_one_grid(list(tokens), grids.__getitem__)
    assert both.shape == (3, 8, 6, 5)
    one = capture.on_one_grid([t[..., 2] for t in tokens], grids.__getitem__)
    torch.testing.assert_close(both[..., 2], one, rtol=0, atol=1e-7)
    # layers of one grid: a plain mean, nothing resampled
    torch.testing.assert_close(capture.on_one_grid([fine, fine * 3], grids.__getitem__), (2 * fine).view(3, 8, 6))


def test_probe_and_full_attention_share_the_processors(sd1):
    pipe = sd1
    kwargs = dict(num_inference_steps=3, guidance_scale=2.0, height=32, width=48, output_type="np")
    before = dict(pipe.unet.attn_processors)
    plain = pipe(["a cat", "a red bird"], generator=torch.Generator().manual_seed(0), **kwargs).images
    with FullAttention(pipe) as full, BrightEndingProbe(pipe) as probe:
        both = pipe(["a cat", "a red bird"], generator=torch.Generator().manual_seed(0), **kwargs).images
    after = pipe.unet.attn_processors
    assert all(after[k] is before[k] for k in before)
    np.testing.assert_array_equal(both, plain)
    maps = full.maps()
    block = ".".join(probe.layer_names[0].split(".")[:2])
    assert {block, "down_blocks.1"} <= set(maps)  # every cross-attention block, the probed one among them
    assert maps[block].shape[:3] == (2, *probe.records[0].be_map.shape)  # non-square: the latent's aspect ratio
    for i, rec in enumerate(probe.records):
        np.testing.assert_allclose(maps[block][i, :, :, rec.eos_index], rec.be_map, rtol=1e-6, atol=1e-7)
