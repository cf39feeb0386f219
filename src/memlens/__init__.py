"""memlens: find, outline and remove training-data memorization in text-to-image diffusion models."""

from memlens.errors import InputError, MemlensError

__version__ = "0.1.0"

__all__ = ["BrightEndingProbe", "ImageRecord", "MemlensError", "InputError", "__version__"]


def __getattr__(name: str):
    # The probe needs torch; importing it only when asked keeps `import memlens.metrics` and `memlens --help` light.
    if name in ("BrightEndingProbe", "ImageRecord"):
        from memlens import probe

        return getattr(probe, name)
    raise AttributeError(f"module 'memlens' has no attribute {name!r}")
