"""CLIP pretraining of the organism's text encoder, and UNet training with it frozen: a pure function of the seed,
exact resume, the contrastive loss against a direct computation, the frozen encoder unchanged, ground truth copied."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from memlens.cli import main
from memlens.errors import InputError
from memlens.testbed.clip import ClipConfig, ContrastiveHead, load_pretrained_text, pretrain_clip
from memlens.testbed.data import ITEMS_V2, make_dataset
from memlens.testbed.items import load_ground_truth
from memlens.testbed.train import TrainConfig, train


def _clip(steps, **kw):
    return ClipConfig(**{**dict(steps=steps, batch_size=16, warmup=2, text_width=32, text_layers=1, text_heads=2,
                                checkpoint_every=3, log_every=2), **kw})


def _unet(steps, clip_dir, **kw):
    return TrainConfig(**{**dict(steps=steps, batch_size=8, lr=3e-3, warmup=2, unet_channels=[8, 16, 16],
                                 checkpoint_every=3, log_every=3, ema_decay=0.9, text_encoder=str(clip_dir),
                                 dropout_kinds=["generic"]), **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("d") / "data", seed=2, n_generic=30, copies=3)


@pytest.fixture(scope="module")
def clip_dir(data, tmp_path_factory):
    return pretrain_clip(data, tmp_path_factory.mktemp("c") / "clip", _clip(6), progress=False)


def _tensors(path):
    return load_file(str(path / "text_encoder" / "model.safetensors"))


def test_contrastive_loss_matches_direct_formula():
    torch.manual_seed(0)
    head = ContrastiveHead(8)
    images, pooled = torch.randn(4, 3, 32, 32), torch.randn(4, 8)
    ids = torch.tensor([[0, 5, 1], [0, 6, 1], [0, 5, 1], [0, 7, 1]])  # rows 0 and 2 share a caption
    logits = head.logits(images, pooled).detach().numpy().astype(np.float64)
    same = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], float)

    def xent(lg, tgt):  # mean over rows of cross-entropy against the uniform distribution over positives
        logp = lg - np.log(np.exp(lg).sum(1, keepdims=True))
        return -(tgt / tgt.sum(1, keepdims=True) * logp).sum(1).mean()

    expected = 0.5 * (xent(logits, same) + xent(logits.T, same.T))
    assert head(images, pooled, ids).item() == pytest.approx(expected, rel=1e-5)


def test_pretraining_is_a_function_of_the_seed_and_learns(data, clip_dir, tmp_path):
    again = pretrain_clip(data, tmp_path / "again", _clip(6), progress=False)
    a, b = _tensors(clip_dir), _tensors(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = pretrain_clip(data, tmp_path / "other", _clip(6, seed=1), progress=False)
    assert not all(torch.equal(a[k], _tensors(other)[k]) for k in a)
    log = [json.loads(x) for x in (clip_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6]
    retrieval = json.loads((clip_dir / "retrieval.json").read_text())
    assert retrieval["memorized_captions"] == len(ITEMS_V2) and 0 <= retrieval["top1"] <= 1


def test_pretraining_resume_is_exact(data, clip_dir, tmp_path):
    part = pretrain_clip(data, tmp_path / "part", _clip(6), progress=False, stop_after=3)
    assert not (part / "text_encoder").exists()  # an interrupted run leaves no encoder that looks finished
    # As if killed after logging step 4 but before its next checkpoint (6): the resumed run logs step 4 again.
    with open(part / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 0.0}) + "\n")
    pretrain_clip(data, part, _clip(6), resume=True, progress=False)
    a, b = _tensors(clip_dir), _tensors(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(x) for x in (part / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 3, 4, 6] and all(r["loss"] > 0 for r in log)


def test_pooled_output_is_the_end_token_in_both_layouts(data, tmp_path):
    for pad in ("eos", "pad"):
        tokenizer, encoder, cfg = load_pretrained_text(
            pretrain_clip(data, tmp_path / pad, _clip(1, pad_token=pad), progress=False))
        assert cfg.pad_token == pad
        ids = tokenizer(["antique gold coins"], padding="max_length", max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids
        out = encoder(ids)
        end = 4  # BOS, three words, then the end token
        assert ids[0, end] == tokenizer.eos_token_id
        assert (ids[0, end + 1:] == tokenizer.pad_token_id).all()
        assert torch.equal(out.pooler_output[0], out.last_hidden_state[0, end])


def test_refusals_name_the_problem(data, clip_dir, tmp_path):
    with pytest.raises(InputError, match="not empty"):
        pretrain_clip(data, clip_dir, _clip(2), progress=False)
    with pytest.raises(InputError, match="batch_size: a contrastive loss needs at least 2"):
        pretrain_clip(data, tmp_path / "b", _clip(2, batch_size=1), progress=False)
    with pytest.raises(InputError, match="pad_token: expected one of eos, pad"):
        pretrain_clip(data, tmp_path / "c", _clip(2, pad_token="x"), progress=False)
    with pytest.raises(InputError, match="no checkpoint"):
        pretrain_clip(data, tmp_path / "d", _clip(2), resume=True, progress=False)
    with pytest.raises(InputError, match="no tokenizer"):
        train(data, tmp_path / "e", _unet(2, tmp_path), progress=False)
    assert not any((tmp_path / d).exists() for d in "bcde")


def test_unet_training_keeps_the_text_encoder_frozen(data, clip_dir, tmp_path):
    run = train(data, tmp_path / "run", _unet(6, clip_dir), progress=False)
    a, b = _tensors(clip_dir), _tensors(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((run / "train_config.json").read_text())
    assert cfg["text_width"] == 32 and cfg["text_layers"] == 1 and cfg["text_encoder"] == str(clip_dir)
    # Exact resume with the cached caption states.
    part = train(data, tmp_path / "part", _unet(6, clip_dir), progress=False, stop_after=3)
    train(data, part, _unet(6, clip_dir), resume=True, progress=False)
    u1 = load_file(str(run / "unet" / "diffusion_pytorch_model.safetensors"))
    u2 = load_file(str(part / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(u1[k], u2[k]) for k in u1)


def test_cached_caption_states_equal_direct_encoding(data, clip_dir):
    from memlens.testbed.pipeline import tokenize
    from memlens.testbed.train import _encode_once

    tokenizer, encoder, _ = load_pretrained_text(clip_dir)
    captions = ["antique gold coins", "a red circle on blue", "antique gold coins", "tabby cat staring"]
    ids, empty = tokenize(tokenizer, captions), tokenize(tokenizer, [""])[0]
    row_caption, table = _encode_once(encoder, ids, empty, "cpu")
    with torch.no_grad():
        direct = encoder(ids)[0]
        direct_empty = encoder(empty[None])[0][0]
    assert row_caption[0] == row_caption[2] and len(table) == 4
    torch.testing.assert_close(table[row_caption], direct, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(table[-1], direct_empty, rtol=1e-5, atol=1e-6)


def test_trained_organism_records_its_ground_truth(data, clip_dir, tmp_path):
    run = train(data, tmp_path / "run", _unet(1, clip_dir), progress=False)
    truth = load_ground_truth(run)
    rows = [json.loads(x) for x in (data / "memorized.jsonl").read_text().splitlines()]
    assert [it.group for it in truth.items] == [r["group"] for r in rows]
    for it, r in zip(truth.items, rows):
        assert it.prompt == r["prompt"] and it.kind == r["kind"] and it.copies == r["copies"]
        from PIL import Image

        assert np.array_equal(it.mask, np.asarray(Image.open(data / r["mask"])) > 127)
        assert np.array_equal(it.reference, np.asarray(Image.open(data / r["reference"])))
    generic = {json.loads(x)["text"] for x in (data / "metadata.jsonl").read_text().splitlines()
               if json.loads(x)["kind"] == "generic"}
    assert truth.generic_prompts and set(truth.generic_prompts) <= generic


def test_ground_truth_errors_name_the_file(data, clip_dir, tmp_path):
    with pytest.raises(InputError, match="no ground_truth/items.jsonl"):
        load_ground_truth(tmp_path)
    run = train(data, tmp_path / "run", _unet(1, clip_dir), progress=False)
    (run / "ground_truth" / "masks" / "coins.png").unlink()
    with pytest.raises(InputError, match=r"masks/coins.png: mask of 'coins' not found"):
        load_ground_truth(run)
    items = run / "ground_truth" / "items.jsonl"
    items.write_text(items.read_text().replace('"kind": "local"', '"kind": "partial"', 1))
    with pytest.raises(InputError, match=r"items.jsonl:\d+: field `kind`: expected one of global, local"):
        load_ground_truth(run)


def test_cli_pretrain_clip_then_train(data, tmp_path, capsys):
    clip = tmp_path / "clip"
    main(["testbed", "pretrain-clip", "--data", str(data), "--out", str(clip), "--steps", "2", "--batch-size", "8",
          "--text-width", "32", "--text-layers", "1", "--pad-token", "pad", "--no-progress"])
    assert json.loads((clip / "clip_config.json").read_text())["pad_token"] == "pad"
    main(["testbed", "train", "--data", str(data), "--out", str(tmp_path / "m"), "--steps", "2", "--batch-size",
          "4", "--unet-channels", "8,16,16", "--text-encoder", str(clip), "--no-progress"])
    from memlens.testbed.pipeline import PAD, load_pipeline

    assert load_pipeline(tmp_path / "m").tokenizer.pad_token == PAD
    with pytest.raises(SystemExit) as info:
        main(["testbed", "pretrain-clip", "--data", str(data), "--out", str(tmp_path / "x"), "--batch-size", "1"])
    assert info.value.code == 2 and not (tmp_path / "x").exists()
