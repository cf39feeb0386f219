"""The model organism: a tiny text-to-image diffusion model trained on synthetic data with planted global and local
memorization and ground-truth masks (see docs/organism.md)."""

from memlens.testbed.data import ITEMS, make_dataset, memorized_items
from memlens.testbed.pipeline import OrganismPipeline, PixelShuffleVAE, load_pipeline

__all__ = ["load_pipeline", "make_dataset", "memorized_items", "ITEMS", "OrganismPipeline", "PixelShuffleVAE"]
