"""The organism's "VAE": a parameter-free, lossless pixel-(un)shuffle.

This file is self-contained (torch and diffusers only) because `OrganismPipeline.save_pretrained` copies it into
each organism folder as `vae/pixel_shuffle_vae.py`: diffusers then loads the folder with no memlens installed,
`StableDiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`, as it loads any custom component.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


@dataclass
class _LatentDist:
    """Stands in for a Gaussian posterior: the encoding is deterministic."""

    latents: torch.Tensor

    def sample(self, generator=None) -> torch.Tensor:
        return self.latents

    def mode(self) -> torch.Tensor:
        return self.latents


@dataclass
class _EncoderOutput:
    latent_dist: _LatentDist


class PixelShuffleVAE(ModelMixin, ConfigMixin):
    """Lossless 2x2 pixel-unshuffle "autoencoder" with no parameters.

    `block_out_channels` only exists so diffusers computes vae_scale_factor = 2 ** (len - 1) = `factor`.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, in_channels: int = 3, factor: int = 2, scaling_factor: float = 1.0,
                 block_out_channels: tuple = (3, 12)):
        super().__init__()
        if 2 ** (len(block_out_channels) - 1) != factor:
            raise ValueError("block_out_channels must have log2(factor) + 1 entries")
        self.latent_channels = in_channels * factor * factor
        # A saved buffer gives the module a device, a dtype and a weights file, which diffusers expects.
        self.register_buffer("anchor", torch.zeros(1))

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        z = F.pixel_unshuffle(x, self.config.factor)
        return _EncoderOutput(_LatentDist(z)) if return_dict else (_LatentDist(z),)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        x = F.pixel_shuffle(z, self.config.factor)
        if return_dict:
            from diffusers.models.autoencoders.vae import DecoderOutput

            return DecoderOutput(sample=x)
        return (x,)
