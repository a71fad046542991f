"""minildm: a latent diffusion model (the design behind Stable Diffusion), built from scratch to be read.

Start with chapters/01-pixels-and-latents.md, or run `minildm demo`.
"""

from minildm.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian, latent_shape
from minildm.data import ImageFolderDataset, ShapesDataset
from minildm.device import get_device

__version__ = "0.1.0"
__all__ = [
    "AutoencoderConfig",
    "AutoencoderKL",
    "DiagonalGaussian",
    "ImageFolderDataset",
    "ShapesDataset",
    "get_device",
    "latent_shape",
]
