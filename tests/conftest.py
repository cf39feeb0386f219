"""Shared fixtures: the CLI runner, the shipped organism's full demo (run once per session), and one torch thread.

Test modules keep fixtures that only they use; what several modules need lives here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # the helper modules next to the tests (_scan_factory)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One CPU thread for every test: results do not depend on the machine's core count, and on a shared machine
    one thread is the fastest (docs/scan.md, `--threads`). Set here, at the entry point, never in the library."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    yield


def run_memlens(args) -> tuple[int, str, str]:
    """Run the real CLI in-process with pytest's capture; use through the `cli` fixture."""
    from memlens.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as ex:
        return int(ex.code or 0)
    return 0


@pytest.fixture
def cli(capsys):
    """`cli([...])` runs `memlens ...` and returns (exit status, stdout, stderr)."""

    def run(args):
        code = run_memlens(args)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """`memlens demo` on the shipped organism with its defaults at seed 0 (about a minute on one core)."""
    from memlens.testbed.demo import run_demo

    out = tmp_path_factory.mktemp("demo") / "out"
    run_demo(out, seed=0, progress=False)
    return out


@pytest.fixture
def recommending_pipe():
    """A tiny SD1 pipeline that declares its sampling settings in its config (2 steps, guidance 3.0), as the
    organism does."""
    from diffusers import StableDiffusionPipeline

    from memlens.testing import tiny_pipeline

    class Recommending(StableDiffusionPipeline):
        def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None, feature_extractor=None,
                     image_encoder=None, requires_safety_checker=False, default_num_inference_steps: int = 2,
                     default_guidance_scale: float = 3.0):
            super().__init__(vae, text_encoder, tokenizer, unet, scheduler, None, None, None, False)
            self.register_to_config(
                default_num_inference_steps=default_num_inference_steps, default_guidance_scale=default_guidance_scale
            )

    pipe = Recommending(**tiny_pipeline("sd1").components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
