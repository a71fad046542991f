"""Chapter 06: the latent cache. The frozen VAE encodes every training image once; each step samples from it.

A cache is only as good as what made it: the file records the encoder's weights (a SHA-256 of its tensors, so a
retrained VAE at the same path is noticed and a VAE moved elsewhere is not) and the data settings (image count,
data seed, image size). When any differ from the run's, the cache is encoded again, with a one-line notice.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from minildm.checkpoint import load_state_dict, read_safetensors_metadata
from minildm.saving import save_file_atomically
from minildm.train_vae import encode_moments

LATENT_CACHE = "latents.safetensors"


def encoder_fingerprint(vae: nn.Module) -> str:
    """SHA-256 of the tensors that make a posterior (encoder and quant_conv): the same hash, the same latents."""
    digest = hashlib.sha256()
    for name, value in vae.state_dict().items():
        if name.startswith(("encoder.", "quant_conv.")):
            digest.update(name.encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_identity(vae: nn.Module, num_images: int, data_seed: int, image_size: int) -> dict[str, str]:
    """What made a cache, as the file's metadata (safetensors metadata is str -> str)."""
    return {"encoder_sha256": encoder_fingerprint(vae), "num_images": str(num_images), "data_seed": str(data_seed),
            "image_size": str(image_size)}


def stale_fields(path: Path, identity: dict[str, str]) -> list[str]:
    """The fields of `identity` the cache at `path` was not made with (all of them for a cache from before they were
    recorded)."""
    made_with = read_safetensors_metadata(path, "latent cache")
    return [key for key, value in identity.items() if made_with.get(key) != value]


def load_or_encode(path: Path, vae: nn.Module, pixels: Tensor, identity: dict[str, str], rank: int = 0,
                   world_size: int = 1) -> Tensor:
    """The posterior moments (N, 2C, h, w) of `pixels` (N, H, W, 3) uint8: read from `path` when it was made the same
    way, else encoded (again) and written. Rank 0 decides and writes; the other ranks wait, then read."""
    if rank == 0:
        stale = stale_fields(path, identity) if path.exists() else None
        if stale:
            print(f"minildm: {path} was made with another {', '.join(stale)}; encoding the latents again",
                  file=sys.stderr)
        if stale is None or stale:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file_atomically({"moments": encode_moments(vae, pixels)}, path, metadata=identity)
    if world_size > 1:
        dist.barrier()
    return load_state_dict(path, "latent cache")["moments"]
