"""memlens: find, outline and remove training-data memorization in text-to-image diffusion models."""

from memlens.errors import InputError, MemlensError
from memlens.probe import BrightEndingProbe, ImageRecord

__version__ = "0.1.0"

__all__ = ["BrightEndingProbe", "ImageRecord", "MemlensError", "InputError", "__version__"]
