"""Training: runs end to end in seconds on a tiny configuration, loss goes down, resume is exact."""

import json

import pytest
import torch

from memlens.cli import main
from memlens.errors import InputError
from memlens.testbed.data import make_dataset
from memlens.testbed.train import TrainConfig, read_log, train


def _tiny(steps, **kw):
    base = dict(batch_size=8, lr=3e-3, warmup=5, text_width=32, text_layers=1, unet_channels=[8, 16, 16],
                checkpoint_every=5, log_every=5, ema_decay=0.9)
    return TrainConfig(steps=steps, **{**base, **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("d") / "data", seed=1, n_generic=24, copies=3)


def _weights(path):
    state = torch.load(sorted((path / "checkpoints").glob("step_*"))[-1] / "state.pt", weights_only=False)
    return state


def test_loss_decreases(data, tmp_path):
    out = train(data, tmp_path / "m", _tiny(40), progress=False)
    losses = [r["loss"] for r in read_log(out)]
    assert losses[-1] < losses[0]
    assert (out / "model_index.json").is_file()


def test_resume_is_exact(data, tmp_path):
    full = train(data, tmp_path / "full", _tiny(10), progress=False)
    part = train(data, tmp_path / "part", _tiny(10), progress=False, stop_after=5)
    assert read_log(part)[-1]["step"] == 5
    part = train(data, part, _tiny(10), resume=True, progress=False)
    a, b = _weights(full), _weights(part)
    assert a["step"] == b["step"] == 10
    for key in ("unet", "text_encoder", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert torch.equal(a["gen"], b["gen"])


def test_cli_make_data_and_train(tmp_path):
    data = tmp_path / "data"
    main(["testbed", "make-data", "--out", str(data), "--n-generic", "8", "--copies", "2"])
    main(["testbed", "train", "--data", str(data), "--out", str(tmp_path / "m"), "--steps", "2",
          "--batch-size", "4", "--unet-channels", "8,16,16", "--text-width", "32", "--text-layers", "1",
          "--dropout-kinds", "generic", "--pad-token", "eos", "--no-progress"])
    cfg = json.loads((tmp_path / "m" / "train_config.json").read_text())
    assert cfg["dropout_kinds"] == ["generic"] and cfg["pad_token"] == "eos" and (tmp_path / "m" / "unet").is_dir()
    from memlens.testbed.pipeline import EOS, load_pipeline

    assert load_pipeline(tmp_path / "m").tokenizer.pad_token == EOS
    main(["testbed", "train", "--data", str(data), "--out", str(tmp_path / "m2"), "--steps", "1",
          "--batch-size", "4", "--unet-channels", "8,16,16", "--text-width", "32", "--text-layers", "1",
          "--pad-token", "eos", "--init-from", str(tmp_path / "m"), "--lr", "0", "--no-progress"])
    first, second = load_pipeline(tmp_path / "m").unet.state_dict(), load_pipeline(tmp_path / "m2").unet.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)  # lr 0: the second phase starts where the first ended


def test_bad_metadata_names_line_and_field(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "a"}\n{"file_name": "x.png"}\n')
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    with pytest.raises(InputError, match=r"metadata.jsonl:2: field `text`"):
        train(tmp_path, tmp_path / "m", _tiny(1), progress=False)


def test_resume_without_checkpoint_is_an_input_error(data, tmp_path):
    with pytest.raises(InputError, match="no checkpoint"):
        train(data, tmp_path / "none", _tiny(1), resume=True, progress=False)


def test_end_contrastive_option_trains_resumes_exactly_and_leaves_init_alone(data, tmp_path):
    full = train(data, tmp_path / "full", _tiny(10, end_contrastive=0.5), progress=False)
    log = read_log(full)
    assert all(r["end_contrastive"] > 0 for r in log)
    part = train(data, tmp_path / "part", _tiny(10, end_contrastive=0.5), progress=False, stop_after=5)
    part = train(data, part, _tiny(10, end_contrastive=0.5), resume=True, progress=False)
    a, b = _weights(full), _weights(part)
    for key in ("unet", "text_encoder", "matcher"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    # the option adds a loss, it does not change where the pipeline starts: step-0 weights match a plain run's
    zero = train(data, tmp_path / "z0", _tiny(5, lr=0.0), progress=False)  # lr 0: the weights stay at init
    zero_c = train(data, tmp_path / "z1", _tiny(5, lr=0.0, end_contrastive=0.5), progress=False)
    w0, w1 = _weights(zero), _weights(zero_c)
    assert all(torch.equal(w0["unet"][k], w1["unet"][k]) for k in w0["unet"])
    assert "matcher" in w1 and "matcher" not in w0


def test_init_from_starts_at_the_given_organism_and_checks_it_fits(data, tmp_path):
    from memlens.testbed.pipeline import load_pipeline

    first = train(data, tmp_path / "first", _tiny(5), progress=False)
    # lr 0 (AdamW's decay scales with lr too): the second phase's weights stay where --init-from put them
    second = train(data, tmp_path / "second", _tiny(3, lr=0.0, init_from=str(first)), progress=False)
    a, b = load_pipeline(first), load_pipeline(second)
    for name in ("unet", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    fresh = _weights(train(data, tmp_path / "fresh", _tiny(1, lr=0.0), progress=False))
    loaded = b.unet.state_dict()
    assert not all(torch.equal(v, loaded[k]) for k, v in fresh["unet"].items())  # a fresh init is elsewhere
    assert json.loads((second / "train_config.json").read_text())["init_from"] == str(first)
    with pytest.raises(InputError, match=r"`init_from` .*unet does not fit.*first mismatch"):
        train(data, tmp_path / "wide", _tiny(1, unet_channels=[16, 16, 16], init_from=str(first)), progress=False)
    assert not (tmp_path / "wide").exists()  # a refused start leaves no half-made run folder behind
    with pytest.raises(InputError, match=r"`init_from` .*missing: no model_index.json"):
        train(data, tmp_path / "nothing", _tiny(1, init_from=str(tmp_path / "missing")), progress=False)
    other = make_dataset(tmp_path / "other", seed=2, n_generic=5, copies=1)
    with pytest.raises(InputError, match="vocabulary differs"):
        train(other, tmp_path / "vocab", _tiny(1, init_from=str(first)), progress=False)


def test_caption_matcher_counts_copies_as_positives():
    from memlens.testbed.clip import ContrastiveHead as CaptionMatcher

    torch.manual_seed(0)
    m = CaptionMatcher(16)
    images = torch.randn(4, 3, 32, 32)
    pooled = torch.randn(4, 16)
    ids = torch.tensor([[0, 5, 1], [0, 5, 1], [0, 6, 1], [0, 7, 1]])
    loss = m(images, pooled, ids)
    # independent computation: soft targets spread over the two rows with the same caption
    img = torch.nn.functional.normalize(m.image(images), dim=-1)
    txt = torch.nn.functional.normalize(m.text(pooled), dim=-1)
    logits = m.logit_scale.exp() * txt @ img.T
    target = torch.tensor([[.5, .5, 0, 0], [.5, .5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.]])
    ref = 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.log_softmax(0)).sum(0).mean())
    assert torch.allclose(loss, ref, atol=1e-6)


@pytest.mark.parametrize("option, value, message", [
    ("--pad-token", "bang", "--pad-token must be one of eos, pad, got 'bang'"),
    ("--end-contrastive", "-0.1", "--end-contrastive must be >= 0, got -0.1"),
    ("--schedule", "cosine", "--schedule must be one of sd, ddpm, got 'cosine'"),
    ("--filter", "X", "--filter must be one of none, D, LD, got 'X'"),
])
def test_cli_train_refuses_bad_options_before_writing(tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit) as ex:
        main(["testbed", "train", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "m"), option, value])
    assert ex.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("field, value, message", [
    ("schedule", "x", "`schedule` must be one of sd, ddpm"), ("batch_size", 0, "`batch_size` must be at least 1"),
    ("caption_dropout", 1.5, "`caption_dropout` and `decay_from` must lie in [0, 1]"),
    ("unet_channels", [], "`unet_channels` must be positive widths"),
])
def test_library_validates_the_config_before_writing(tmp_path, field, value, message):
    with pytest.raises(InputError) as ex:
        train(tmp_path / "nodata", tmp_path / "m", _tiny(2, **{field: value}), progress=False)
    assert message in str(ex.value) and not (tmp_path / "m").exists()


def test_training_leaves_the_callers_rng_and_threads_alone(data, tmp_path):
    threads = torch.get_num_threads()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    train(data, tmp_path / "m", _tiny(2, threads=threads + 1), progress=False)
    assert torch.equal(torch.rand(3), expected) and torch.get_num_threads() == threads
