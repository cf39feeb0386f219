"""The model organism: a tiny text-to-image diffusion model trained on synthetic data with planted global and local
memorization and ground-truth masks (see docs/organism.md)."""

_EXPORTS = {
    "ITEMS": "memlens.testbed.data", "make_dataset": "memlens.testbed.data", "memorized_items": "memlens.testbed.data",
    "load_pipeline": "memlens.testbed.pipeline", "OrganismPipeline": "memlens.testbed.pipeline",
    "PixelShuffleVAE": "memlens.testbed.pipeline",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    # The pipeline needs torch and diffusers; `memlens testbed --help` must not pay for them.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'memlens.testbed' has no attribute {name!r}")
