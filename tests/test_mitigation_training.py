"""Training-time magnitude filter on a tiny SD1-like UNet."""

from __future__ import annotations

import pytest
import torch

from memlens import InputError
from memlens.mitigation.training import eos_positions, filter_mask, sample_magnitudes
from memlens.testing import tiny_pipeline

CAPTIONS = ["a cat", "a dog on a log", "zz", "hello world", "the quick brown fox", "x"]


@pytest.fixture(scope="module")
def batch():
    pipe = tiny_pipeline("sd1")
    tok = pipe.tokenizer
    ids = tok(CAPTIONS, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        cond, uncond = pipe.text_encoder(ids)[0], pipe.text_encoder(empty)[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(len(CAPTIONS), 4, 16, 16, generator=gen)
    t = torch.tensor([1, 50, 300, 500, 800, 999])
    return pipe, ids, cond, uncond, x, t


def _manual_d(unet, x, t, cond, uncond):
    with torch.no_grad():
        c = unet(x, t, encoder_hidden_states=cond).sample
        u = unet(x, t, encoder_hidden_states=uncond.expand_as(cond)).sample
    return (c - u).flatten(1).norm(dim=1)


def test_eos_positions(batch):
    pipe, ids, *_ = batch
    eos = eos_positions(ids, pipe.tokenizer.eos_token_id)
    for row, e in zip(ids.tolist(), eos.tolist()):
        assert row[e] == pipe.tokenizer.eos_token_id and pipe.tokenizer.eos_token_id not in row[:e]


def test_filter_drops_exactly_the_samples_above_threshold(batch):
    pipe, _, cond, uncond, x, t = batch
    d = _manual_d(pipe.unet, x, t, cond, uncond)
    values = d.sort().values
    for T in [float(values[:2].mean()), float(values[3:5].mean()), float(values[-1]) + 1, float(values[0]) / 2]:
        keep = filter_mask(pipe.unet, x, t, cond, uncond, T, "D")
        assert keep.dtype == torch.bool
        assert keep.tolist() == (d <= T).tolist()
    assert filter_mask(pipe.unet, x, t, cond, uncond, 0.0, "none").all()
    with pytest.raises(InputError):
        filter_mask(pipe.unet, x, t, cond, uncond, 1.0, "LDD")


def test_ld_uses_the_end_token_map_and_leaves_the_unet_as_it_was(batch):
    pipe, ids, cond, uncond, x, t = batch
    unet = pipe.unet
    unet.train()
    procs = dict(unet.attn_processors)
    eos = eos_positions(ids, pipe.tokenizer.eos_token_id)
    m = sample_magnitudes(unet, x, t, cond, uncond, masked=True, eos_indices=eos)
    assert unet.training and dict(unet.attn_processors) == procs
    assert all(p.grad is None for p in unet.parameters())
    assert m.masks.shape[0] == len(CAPTIONS) and m.masks.shape[1:] == x.shape[-2:]  # down_blocks.0: latent res
    assert torch.all(m.masks >= 0) and torch.all(m.masks <= 1)
    d = _manual_d(unet, x, t, cond, uncond)
    torch.testing.assert_close(m.D, d, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        diff = unet(x, t, encoder_hidden_states=cond).sample - unet(x, t, encoder_hidden_states=uncond.expand_as(cond)).sample
    mask = m.masks
    ld = (diff * mask[:, None]).flatten(1).norm(dim=1) / mask.flatten(1).mean(dim=1)
    torch.testing.assert_close(m.LD, ld, rtol=1e-4, atol=1e-4)
    T = float(m.LD.median())
    assert filter_mask(unet, x, t, cond, uncond, T, "LD", eos_indices=eos).tolist() == (m.LD <= T).tolist()
    with pytest.raises(InputError):
        sample_magnitudes(unet, x, t, cond, uncond, masked=True)


def test_mask_at_a_low_timestep(batch):
    pipe, ids, cond, uncond, x, t = batch
    eos = eos_positions(ids, pipe.tokenizer.eos_token_id)
    low = sample_magnitudes(pipe.unet, x, t, cond, uncond, masked=True, eos_indices=eos,
                            mask_inputs=(x, torch.ones_like(t)))
    own = sample_magnitudes(pipe.unet, x, t, cond, uncond, masked=True, eos_indices=eos)
    torch.testing.assert_close(low.D, own.D)
    assert low.masks.shape == own.masks.shape
    # Sample 0 is already at t = 1, so both ways read the same map for it.
    torch.testing.assert_close(low.masks[0], own.masks[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(low.masks[-1], own.masks[-1])


def test_training_filter_recomputes_uncond_from_the_encoder(batch):
    from memlens.mitigation.training import TrainingFilter

    pipe, ids, cond, uncond, x, t = batch
    empty = pipe.tokenizer([""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                           return_tensors="pt").input_ids[0]
    d = _manual_d(pipe.unet, x, t, cond, uncond)
    T = float(d.sort().values[2:4].mean())
    f = TrainingFilter("D", T, empty, pipe.tokenizer.eos_token_id)
    pipe.text_encoder.train()
    assert f(pipe.unet, pipe.text_encoder, x, t, cond, ids).tolist() == (d <= T).tolist()
    assert pipe.text_encoder.training
    pipe.text_encoder.eval()
    ld = TrainingFilter("LD", 1e9, empty, pipe.tokenizer.eos_token_id)(pipe.unet, pipe.text_encoder, x, t, cond, ids)
    assert ld.all()


def test_finetune_skips_batches_the_filter_empties(tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from memlens.mitigation.training import finetune

    pipe = tiny_pipeline("sd1")
    pipe.save_pretrained(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    with open(data / "metadata.jsonl", "w") as fh:
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")
            fh.write(json.dumps({"file_name": f"{i}.png", "text": f"picture number {i}"}) + "\n")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    out = finetune(tmp_path / "model", data, tmp_path / "none_kept", steps=2, batch_size=2, criterion="D",
                   threshold=0.0, log_every=1, device="cpu")
    logs = [json.loads(l) for l in (out / "finetune_log.jsonl").read_text().splitlines()]
    assert [l["kept"] for l in logs] == [0, 0] and [l["seen"] for l in logs] == [2, 2]
    from diffusers import UNet2DConditionModel

    after = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    out = finetune(tmp_path / "model", data, tmp_path / "all_kept", steps=1, batch_size=2, criterion="D",
                   threshold=1e9, log_every=1, device="cpu", lr=1e-3)
    assert json.loads((out / "finetune_log.jsonl").read_text())["kept"] == 2
    after = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    assert not all(torch.equal(before[k], after[k]) for k in before)


def test_testbed_train_filter_option(tmp_path):
    from memlens.testbed.data import make_dataset
    from memlens.testbed.train import TrainConfig, read_log, train

    data = make_dataset(tmp_path / "data", seed=1, n_generic=8, copies=2)
    cfg = dict(steps=2, batch_size=4, lr=3e-3, warmup=1, text_width=32, text_layers=1, unet_channels=[8, 16, 16],
               checkpoint_every=2, log_every=1, caption_dropout=0.0)
    out = train(data, tmp_path / "none", TrainConfig(filter="D", filter_threshold=-1.0, **cfg), progress=False)
    assert [(r["kept"], r["seen"]) for r in read_log(out)] == [(0, 4), (0, 4)]
    state = torch.load(sorted((out / "checkpoints").glob("step_*"))[-1] / "state.pt", weights_only=False)
    assert state["optimizer"]["state"] == {}  # no sample kept: the optimizer never stepped
    out = train(data, tmp_path / "all", TrainConfig(filter="LD", filter_threshold=1e9, **cfg), progress=False)
    assert [(r["kept"], r["seen"]) for r in read_log(out)] == [(4, 4), (4, 4)]
