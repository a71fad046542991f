"""The small weights we ship, trained by our own commands (each asset folder records the command, seed and time)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from minildm.autoencoder import AutoencoderKL
from minildm.device import get_device
from minildm.judge import Judge
from minildm.pipeline import PIPELINE_NAME, LatentDiffusion

ASSETS = Path(__file__).parent / "assets"
VAES = {"shapes64": ASSETS / "shapes64-vae"}
JUDGES = {"shapes64": ASSETS / "shapes64-judge"}
PIPELINES = {"shapes64": ASSETS / "shapes64-ldm"}


def vae_folder(name: str) -> Path:
    return asset_folder(name, VAES, "VAE")


def vae_folder_or_name(vae: str | Path) -> Path:
    """--vae's folder: `vae` itself when it is a folder, else the shipped VAE of that name."""
    return Path(vae) if Path(vae).is_dir() else vae_folder(str(vae))


def asset_folder(name: str, shipped: dict[str, Path], what: str) -> Path:
    if name not in shipped and ("/" in name or os.sep in name):
        raise FileNotFoundError(f"{name}: no such {what} folder; give a folder holding config.json and "
                                f"model.safetensors, or a shipped name: {', '.join(shipped)}")
    if name not in shipped:
        raise ValueError(f"no shipped {what} called {name!r}; available: {', '.join(shipped)}")
    folder = shipped[name]
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


def pipeline_folder(name: str) -> Path:
    if name not in PIPELINES:
        raise ValueError(f"no shipped pipeline called {name!r}; available: {', '.join(PIPELINES)}")
    folder = PIPELINES[name]
    if not (folder / PIPELINE_NAME).is_file():
        raise FileNotFoundError(f"{folder}: the shipped weights are missing; reinstall minildm or retrain them "
                                f"with the command in {folder / 'README.md'}")
    return folder


def load_pipeline(name_or_path: str | os.PathLike = "shapes64", device=None, dtype=None,
                  **options) -> LatentDiffusion:
    """A shipped text-to-image model by name ('shapes64' draws 64x64 Shapes from captions, reusing the shapes64
    VAE), or any path LatentDiffusion.from_pretrained takes: our pipeline folder, a diffusers Stable Diffusion
    folder, a CompVis single .safetensors/.ckpt file (`options` go to the loader)."""
    if isinstance(name_or_path, str) and name_or_path in PIPELINES:
        return LatentDiffusion.from_folder(pipeline_folder(name_or_path), device, dtype=dtype)
    if isinstance(name_or_path, os.PathLike) or os.path.exists(name_or_path) or "/" in name_or_path \
            or os.sep in name_or_path:
        return LatentDiffusion.from_pretrained(name_or_path, device, dtype, **options)
    return LatentDiffusion.from_folder(pipeline_folder(name_or_path), device)        # the unknown-name error


def load_judge(name: str = "shapes64", device=None) -> Judge:
    """The shipped Shapes judge (minildm/judge.py): reads kind, colour, size, position and background, for metrics."""
    return Judge.from_folder(asset_folder(name, JUDGES, "judge")).eval().to(get_device(device))
