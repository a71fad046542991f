"""Where the tensors live: pick CUDA, then Apple's MPS, then the CPU; and draw noise reproducibly on any of them.

Every other module takes a `device` argument and calls `get_device()` when none is given, so the choice is made in
one place. The environment variable MINILDM_DEVICE (or the CLI's `--device`) overrides it.

Noise is always drawn on the CPU with a seeded `torch.Generator` and then moved. CUDA, MPS and CPU generators
produce different streams for the same seed, so drawing on the device would make "seed 0" mean a different image
on every machine; drawing on the CPU makes it the same image everywhere (up to float rounding in the model).
"""

from __future__ import annotations

import os

import torch

DEVICE_ENV = "MINILDM_DEVICE"


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def get_device(name: str | torch.device | None = None) -> torch.device:
    """cuda > mps > cpu, unless `name` (or $MINILDM_DEVICE) says otherwise."""
    name = str(name) if isinstance(name, torch.device) else name
    name = name or os.environ.get(DEVICE_ENV) or "auto"
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but this torch sees no CUDA GPU; use --device cpu or auto")
    if device.type == "mps" and not mps_available():
        raise ValueError(f"device {name!r} was asked for but MPS is not available here; use --device cpu or auto")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """The dtype we run inference in: float16 on CUDA and MPS (half the memory, tensor cores), float32 on the CPU.

    CPUs have no fast float16 matmul for these shapes, so float32 is both faster and more exact there.
    """
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


def vae_dtype(pipeline_dtype: torch.dtype) -> torch.dtype:
    """The dtype a pipeline's VAE runs in: float32 when the pipeline runs in float16, else the pipeline's own.

    float16 tops out at 65,504, and SD's VAE decoder passes that at large sizes (inf, then NaN: black or grey
    images); diffusers marks such VAEs `force_upcast` and decodes them in float32. The VAE runs once per image
    (twice for an edit), so float32 costs little. bfloat16 has float32's range (8 exponent bits): its VAE stays.
    """
    return torch.float32 if pipeline_dtype == torch.float16 else pipeline_dtype


def cpu_generator(seed: int | None) -> torch.Generator | None:
    """A seeded CPU generator, or None for 'use the global RNG'."""
    if seed is None:
        return None
    return torch.Generator("cpu").manual_seed(int(seed))


def randn(shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard-normal noise drawn on the CPU (so a seed means the same noise everywhere), then moved."""
    noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    return noise.to(device=device or "cpu", dtype=dtype)
