"""The organism pipeline: stock-diffusers compatible, round-trips through save/from_pretrained, ships offline."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from memlens.testbed.pipeline import OrganismPipeline, build_pipeline, build_tokenizer, load_pipeline, tokenize


@pytest.fixture(scope="module")
def tiny():
    tok = build_tokenizer(["a red circle on blue", "tabby cat staring"], max_length=8)
    torch.manual_seed(0)
    return build_pipeline(tok, text_width=32, text_layers=1, unet_channels=(8, 16, 16), unet_heads=2)


def test_tokenizer_ids_like_sd1():
    tok = build_tokenizer(["a red circle on blue", "tabby cat staring"], max_length=8, pad="eos")
    ids = tokenize(tok, ["Tabby cat, staring!"])[0].tolist()
    words = [tok.convert_ids_to_tokens(i) for i in ids[1:4]]
    assert ids[0] == tok.bos_token_id and words == ["tabby", "cat", "staring"]
    assert ids[4:] == [tok.eos_token_id] * (tok.model_max_length - 4)
    assert tok.pad_token_id == tok.eos_token_id


def test_tokenizer_with_own_pad_token_like_sd2():
    tok = build_tokenizer(["a red circle on blue", "tabby cat staring"], max_length=8)  # the default
    ids = tokenize(tok, ["tabby cat staring", ""]).tolist()
    assert tok.pad_token_id not in (tok.eos_token_id, tok.bos_token_id, tok.unk_token_id)
    assert ids[0][4] == tok.eos_token_id and ids[0][5:] == [tok.pad_token_id] * 3
    # the end token is the only EOS, also for the empty prompt
    assert ids[1][:2] == [tok.bos_token_id, tok.eos_token_id] and ids[1].count(tok.eos_token_id) == 1


def test_probe_end_token_with_own_pad_token():
    from memlens import BrightEndingProbe

    tok = build_tokenizer(["a red circle on blue", "tabby cat staring"], max_length=8, pad="pad")
    torch.manual_seed(0)
    pipe = build_pipeline(tok, text_width=32, text_layers=1, unet_channels=(8, 16, 16), unet_heads=2)
    with BrightEndingProbe(pipe) as probe:
        pipe(["tabby cat staring", "a red circle"], num_inference_steps=2, guidance_scale=2.0,
             generator=torch.Generator().manual_seed(0))
    assert [r.eos_index for r in probe.records] == [4, 4]


def test_bad_pad_choice_names_the_choices():
    from memlens.errors import InputError

    with pytest.raises(InputError, match="eos, pad"):
        build_tokenizer(["a"], pad="bang")


def test_round_trip_and_stock_loader(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    again = load_pipeline(tmp_path)
    assert isinstance(again, OrganismPipeline) and again.vae_scale_factor == tiny.vae.config.factor
    for a, b in zip(tiny.unet.state_dict().values(), again.unet.state_dict().values()):
        assert torch.equal(a, b)
    # Stock diffusers, in a process that never imports memlens: the VAE comes from the folder's own vae/ module.
    script = f"""
import sys, numpy as np, torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
stock = DiffusionPipeline.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
assert type(stock) is StableDiffusionPipeline, type(stock)
out = stock(["tabby cat staring"], num_images_per_prompt=2, num_inference_steps=2, guidance_scale=2.0,
            generator=torch.Generator().manual_seed(0), height=32, width=32, output_type="np")
assert "memlens" not in sys.modules
np.save(sys.argv[1], out.images)
"""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", script, str(tmp_path / "stock.npy")], check=True, cwd=tmp_path,
                   capture_output=True)
    stock_images = np.load(tmp_path / "stock.npy")
    ours = again(["tabby cat staring"], num_images_per_prompt=2, num_inference_steps=2, guidance_scale=2.0,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert stock_images.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(stock_images, ours)


def test_vae_is_lossless(tiny):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = tiny.vae.encode(x).latent_dist.sample()
    f = tiny.vae_scale_factor
    assert z.shape == (2, 3 * f * f, 32 // f, 32 // f)
    assert torch.equal(tiny.vae.decode(z).sample, x)


def test_shipped_organism_loads_offline_and_probe_attaches():
    from memlens import BrightEndingProbe
    from memlens.testbed.data import ITEMS

    pipe = load_pipeline()
    assert pipe.safety_checker is None
    assert pipe.config.default_guidance_scale > 1
    with BrightEndingProbe(pipe) as probe:
        out = pipe([ITEMS[0].prompt, "a red circle"], num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert len(out.images) == len(probe.records) == 2
    rec = probe.records[0]
    latent = pipe.unet.config.sample_size
    assert rec.be_map.shape == (latent, latent) and np.isfinite(rec.be_map).all()
    assert rec.eos_index == len(ITEMS[0].prompt.split()) + 1
    assert rec.magnitude.shape == (3,)


def test_recommended_defaults_are_used_and_match_the_shipped_folder(tiny):
    from memlens.testbed.pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS

    # A freshly trained organism records the module's defaults; the shipped one must say the same, or the documented
    # from-scratch reproduction would sample differently from the shipped weights.
    shipped = load_pipeline().config
    assert (shipped.default_guidance_scale, shipped.default_num_inference_steps) == (DEFAULT_GUIDANCE, DEFAULT_STEPS)
    seen = []
    tiny(["a red circle on blue"], generator=torch.Generator().manual_seed(0), output_type="latent",
         callback_on_step_end=lambda pipe, i, t, kw: seen.append((int(t), pipe.guidance_scale)) or kw)
    assert len(seen) == tiny.config.default_num_inference_steps == DEFAULT_STEPS
    assert {g for _, g in seen} == {DEFAULT_GUIDANCE} and seen[-1][0] == 1


def test_shipped_organisms_by_name():
    from memlens.errors import InputError
    from memlens.models import load_pipeline as load_model
    from memlens.testbed.items import load_ground_truth
    from memlens.testbed.pipeline import EOS, PAD, SHIPPED, WEIGHTS_DIR

    assert SHIPPED["testbed"] == SHIPPED["testbed-v1"] == WEIGHTS_DIR
    v1, v2 = load_pipeline("testbed-v1"), load_model("testbed-v2")
    # v1 pads with a token of its own and trained its text encoder with the UNet; v2 pads with the end token (SD
    # v1's layout) and carries the CLIP-pretrained, frozen text encoder.
    assert v1.tokenizer.pad_token == PAD and v2.tokenizer.pad_token == EOS
    assert [it.group for it in load_ground_truth(SHIPPED["testbed-v2"]).items] == [
        "astronaut", "coffee", "chelsea", "retina", "logo", "coins", "clock", "colorwheel", "checker", "camera"]
    meta = json.loads((SHIPPED["testbed-v2"] / "organism.json").read_text())
    assert meta["clip_config"]["pad_token"] == "eos" and meta["train_config"]["steps"] == meta["final_step"]
    with pytest.raises(InputError, match="testbed-v9: not a shipped organism"):
        load_model("testbed-v9")


def test_demo_runs_on_the_v2_organism_by_name(tmp_path):
    from memlens.testbed.demo import run_demo

    s = run_demo(tmp_path / "d", organism="testbed-v2", per_memorized=1, per_generic=1, n_generic=2, steps=3,
                 progress=False).summary
    assert s["settings"]["model"].endswith("weights_v2")
    n_local = sum(r["kind"] == "local" for r in s["generations"])
    assert n_local == 6 and len(s["generations"]) == 12


def test_shipped_folders_carry_the_vae_module_itself():
    """Stock diffusers runs the copy in vae/; it must be memlens' module byte for byte, not a drifting fork."""
    from memlens.testbed import pixel_shuffle_vae
    from memlens.testbed.pipeline import SHIPPED

    source = Path(pixel_shuffle_vae.__file__).read_bytes()
    for folder in set(SHIPPED.values()):
        assert (folder / "vae" / "pixel_shuffle_vae.py").read_bytes() == source, folder
