"""The small weights we ship, trained by our own commands (each asset folder records the command, seed and time)."""

from __future__ import annotations

from pathlib import Path

import torch

from minildm.autoencoder import AutoencoderKL
from minildm.device import get_device

ASSETS = Path(__file__).parent / "assets"
VAES = {"shapes64": ASSETS / "shapes64-vae"}


def vae_folder(name: str) -> Path:
    if name not in VAES:
        raise ValueError(f"no shipped VAE called {name!r}; available: {', '.join(VAES)}")
    folder = VAES[name]
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder}: the shipped weights are missing; reinstall minildm or retrain them "
                                f"with the command in {folder / 'README.md'}")
    return folder


def load_vae_folder(folder: str | Path, device: str | torch.device | None = None) -> AutoencoderKL:
    """Any VAE model folder (config.json + model.safetensors), in eval mode on `device`."""
    return AutoencoderKL.from_folder(folder).eval().to(get_device(device))


def load_vae(name: str = "shapes64", device=None) -> AutoencoderKL:
    """The shipped VAE: 'shapes64' maps 64x64x3 Shapes images to 4x8x8 latents (the same 48x as SD)."""
    return load_vae_folder(vae_folder(name), device)
