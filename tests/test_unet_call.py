"""The shared step / CFG-row helper that the probe, the analysis capture and the mitigations read UNet calls with."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from memlens import MemlensError, unet_call
from memlens.testing import tiny_pipeline


def test_step_index_is_the_position_in_the_schedulers_timesteps_not_a_count():
    timesteps = torch.tensor([901, 801, 801, 701, 1])  # PLMS-style repeat at positions 1 and 2
    assert [unet_call.step_index(timesteps[i], timesteps) for i in range(5)] == [0, 1, 2, 3, 4]
    # A copy is matched by value after the last step seen, so the repeat still resolves in order.
    assert unet_call.step_index(torch.tensor(801), timesteps) == 1
    assert unet_call.step_index(torch.tensor(801), timesteps, after=1) == 2
    assert unet_call.step_index(701.0, timesteps) == 3
    with pytest.raises(MemlensError, match="not among pipe.scheduler.timesteps"):
        unet_call.step_index(torch.tensor(901), timesteps, after=0)


def test_step_index_inside_a_pipeline_call_follows_the_loop():
    pipe = tiny_pipeline("sd1")
    seen = []

    def pre(module, args, kwargs):
        _, t = unet_call.sample_and_timestep(args, kwargs)
        seen.append(unet_call.step_index(t, pipe.scheduler.timesteps))

    handle = pipe.unet.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        pipe("a cat", num_inference_steps=4, guidance_scale=2.0, output_type="latent")
    finally:
        handle.remove()
    assert seen == [0, 1, 2, 3]


def test_cfg_rows_and_read_rows():
    assert unet_call.cfg_rows(6) == (slice(0, 3), slice(3, 6))
    assert unet_call.read_rows(6, cfg=True) == slice(3, 6)
    assert unet_call.read_rows(3, cfg=False) == slice(0, 3)
    with pytest.raises(MemlensError):
        unet_call.cfg_rows(5)


def test_paired_rows_and_select_rows_keep_a_cfg_batch():
    n = 3
    index = unet_call.paired_rows([2, 0], n)
    assert index.tolist() == [2, 0, 5, 3]
    sample = torch.arange(2 * n).float().view(2 * n, 1)
    added = {"text_embeds": torch.arange(2 * n).view(2 * n, 1), "time_ids": torch.zeros(2 * n, 6)}
    picked = unet_call.select_rows({"sample": sample, "added": added, "t": torch.tensor(7), "other": torch.ones(4),
                                    "flag": None}, index, 2 * n)
    assert picked["sample"].flatten().tolist() == [2, 0, 5, 3]
    assert picked["added"]["text_embeds"].flatten().tolist() == [2, 0, 5, 3]
    assert picked["added"]["time_ids"].shape == (4, 6)
    assert picked["t"].item() == 7 and picked["other"].shape == (4,) and picked["flag"] is None


@pytest.mark.parametrize("kind", ["tuple", "list", "output"])
def test_prediction_and_with_prediction(kind):
    eps, new = torch.zeros(2, 4, 3, 3), torch.ones(2, 4, 3, 3)
    output = {"tuple": (eps,), "list": [eps], "output": UNet2DConditionOutput(sample=eps)}[kind]
    assert unet_call.prediction(output) is eps
    replaced = unet_call.with_prediction(output, new)
    assert type(replaced) is type(output) and unet_call.prediction(replaced) is new
