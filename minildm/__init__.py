"""minildm: a latent diffusion model (the design behind Stable Diffusion), built from scratch to be read.

Start with chapters/01-pixels-and-latents.md, or run `minildm demo`. The modules, in reading order:

    data.py            ch01  Shapes (procedural images with captions and known factors); a folder of your images
    manifold.py        ch01  PCA spectra, intrinsic dimension, interpolation walks
    autoencoder.py     ch02  the VAE: encoder, decoder, the diagonal Gaussian between them, the VAE loss
    discriminator.py   ch02  the optional PatchGAN
    train_vae.py       ch02  training the VAE, and fine-tuning its decoder into a VAE file
    schedule.py        ch03  the forward process: betas, alpha_bar, q_sample, the eps / z_0 / v conversions
    attention.py       ch04  attention five ways (naive, sliced, chunked, sdpa, Triton), one function
    kernels/           ch04  the Triton flash-attention kernel
    unet.py            ch05  the noise predictor: timestep embedding, ResBlocks, cross-attention, the U
    text.py            ch05  the Shapes tokenizer and the causal text encoder (with CLIP's options)
    clip_tokenizer.py  ch05  CLIP's byte-level BPE tokenizer (the vocabulary ships in assets/clip/)
    training_guards.py ch02  what both trainers check: the run folder, --resume, finite losses and weights
    ldm_recipe.py      ch06  the training settings, the networks' configs, the Denoiser (U-Net + text encoder)
    ema.py             ch06  the moving average of the weights that is sampled from
    distributed.py     ch06  torchrun placement, joining the process group, Ctrl-C on every rank
    latent_cache.py    ch06  the VAE latents, encoded once, with a record of what made them
    train_ldm.py       ch06  the loss and the training loop of the latent diffusion model
    ldm_export.py      ch06  a finished run becomes a pipeline folder
    judge.py           ch06  a small CNN that reads the factors back from an image, to score samples
    metrics.py         ch06  PSNR, prompt following, Frechet distance
    pixel_space.py     ch06  no autoencoder: the pixel-space baseline
    samplers.py        ch07  DDPM, DDIM, PLMS, Euler, Euler ancestral, Heun, DPM-Solver++ 2M
    ideal_denoiser.py  ch07  the exact denoiser of a finite set of latents
    pipeline.py        ch08  LatentDiffusion: text-to-image, img2img, inpainting, guidance, save and load

Beside them: saving.py (folders written atomically, never over a user's files), checkpoint.py (loaded strictly),
convert.py (other people's weights, by renaming rules; convert_text.py for CLIP's text encoder), sd_loading.py
(Stable Diffusion as users have it: a diffusers folder or a CompVis single file), vae_files.py (SD's VAE files),
device.py (CUDA > MPS > CPU, reproducible noise), pretrained.py (the shipped weights in assets/); and the tooling:
cli.py (the `minildm` command), demo.py, viz.py, quotes.py (the chapters' quotes stay true), grading/ (workbooks
and the grader).
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
