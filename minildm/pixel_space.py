"""No autoencoder at all: diffusion on the pixels, the baseline that latent diffusion is measured against.

`PixelSpace` has the surface of AutoencoderKL that training and the pipeline use (encode, decode, to_z0, from_z0,
config.latent_channels, config.downsampling_factor), and every one of them is the identity: z_0 = x, 3x64x64. The
same trainer and the same pipeline then run "the same U-Net recipe" on pixels, which is what chapter 06's
latent-vs-pixel table compares (Ho et al. 2020 trained this way; Rombach et al. 2022 moved it into a latent space).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from minildm.autoencoder import DiagonalGaussian


@dataclass
class PixelSpaceConfig:
    image_size: int = 64
    latent_channels: int = 3           # z_0 is the image itself: 3 channels ...
    downsampling_factor: int = 1       # ... at full resolution
    scale_factor: float = 1.0          # images in [-1, 1] already have about unit scale


class PixelSpace(nn.Module):
    """The identity "autoencoder": encode returns a Gaussian with mean x and (almost) no variance."""

    def __init__(self, image_size: int = 64):
        super().__init__()
        self.config = PixelSpaceConfig(image_size)
        self.register_buffer("anchor", torch.zeros(()), persistent=False)   # so .to(device) and a device exist

    def encode(self, x: Tensor) -> DiagonalGaussian:
        # moments = [mean = x, logvar = -30]: std = exp(-15), a sample is x to float32 precision
        return DiagonalGaussian(torch.cat([x, torch.full_like(x, -30.0)], dim=1))     # (B, 6, H, W) -> N(x, ~0)

    def decode(self, z: Tensor) -> Tensor:
        return z                                                                        # (B, 3, H, W)

    def to_z0(self, sample: Tensor) -> Tensor:
        return sample

    def from_z0(self, z0: Tensor) -> Tensor:
        return z0
