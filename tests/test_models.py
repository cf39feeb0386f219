"""MODEL resolution: local diffusers folders, hub ids offline, the organism, and the facts run.json records."""

from __future__ import annotations

import pytest
import torch

from memlens.errors import InputError
from memlens.models import load_pipeline, model_identity, pipeline_facts
from memlens.testing import tiny_pipeline


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd1")
    tiny_pipeline("sd1").save_pretrained(folder)
    return folder


def test_local_folder_loads_quiet_without_safety_checker(sd1_folder):
    pipe = load_pipeline(str(sd1_folder), dtype="bfloat16", device="cpu")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.safety_checker is None
    assert pipe.unet.dtype == torch.bfloat16
    assert pipe._progress_bar_config.get("disable") is True
    facts = pipeline_facts(pipe)
    assert (facts["family"], facts["height"], facts["width"], facts["dtype"]) == ("sd1", 32, 32, "bfloat16")
    assert facts["scheduler"] == "DDIMScheduler"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_facts_guess_family_and_native_size(family):
    pipe = tiny_pipeline(family)
    facts = pipeline_facts(pipe)
    assert facts["family"] == family
    # Native size comes from the pipeline's own config, never a constant.
    assert facts["height"] == pipe.unet.config.sample_size * pipe.vae_scale_factor


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(InputError, match=r"`model` .*/no-such-model: no such folder"):
        load_pipeline(str(tmp_path / "no-such-model"))


def test_folder_without_model_index_is_named(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(InputError, match=rf"`model` {tmp_path}: not a diffusers pipeline folder \(no model_index.json\)"):
        load_pipeline(str(tmp_path))


def test_file_instead_of_folder(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match="is a file"):
        load_pipeline(str(tmp_path / "weights.safetensors"))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_hub_id_offline_is_one_clear_error(monkeypatch):
    from huggingface_hub import constants

    # No network here; offline mode makes the failure immediate instead of waiting out the hub's retries.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError) as info:
        load_pipeline("memlens-test/not-a-cached-model")
    assert "not in the local Hugging Face cache" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs, message", [({"dtype": "float8"}, "`dtype`"), ({"device": "tpu9"}, "`device`")])
def test_bad_dtype_or_device(sd1_folder, kwargs, message):
    with pytest.raises(InputError, match=message):
        load_pipeline(str(sd1_folder), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_missing():
    with pytest.raises(InputError, match="CUDA is not available"):
        load_pipeline("testbed", device="cuda")


def test_testbed_resolves_lazily():
    try:
        pipe = load_pipeline("testbed")
    except InputError as err:  # organism weights not built in this checkout yet
        assert "testbed" in str(err) or "model_index.json" in str(err)
        return
    facts = pipeline_facts(pipe)
    assert facts["height"] and facts["width"]
    assert getattr(pipe, "safety_checker", None) is None


def test_model_identity_normalises_paths(sd1_folder, monkeypatch):
    monkeypatch.chdir(sd1_folder.parent)
    assert model_identity(sd1_folder.name) == model_identity(str(sd1_folder)) == str(sd1_folder.resolve())
    assert model_identity("org/model") == "org/model"
    assert model_identity("testbed") == "testbed"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_unreachable_hub_fails_at_once_with_one_line(monkeypatch):
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    t0 = time.monotonic()
    with pytest.raises(InputError) as info:
        load_pipeline("memlens-test/not-a-cached-model")
    assert time.monotonic() - t0 < 5
    assert "cannot be reached" in str(info.value) and "\n" not in str(info.value)


def test_loading_leaves_the_libraries_logging_as_it_was(sd1_folder):
    from diffusers.utils import logging as dlog

    before = (dlog.get_verbosity(), dlog.is_progress_bar_enabled())
    load_pipeline(str(sd1_folder))
    assert (dlog.get_verbosity(), dlog.is_progress_bar_enabled()) == before
