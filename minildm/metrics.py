"""Numbers that say how good an image is. Chapter 02 uses PSNR; later chapters add a judge classifier and FID-style
distances for generated images."""

from __future__ import annotations

import torch
from torch import Tensor


def psnr(x_hat: Tensor, x: Tensor) -> Tensor:
    """Peak signal-to-noise ratio per image, in dB, for images in [-1, 1]: (B,).

    Images are mapped to [0, 1] first, so the peak is 1 and the figure is the usual one for 8-bit images:
    28 dB means a root-mean-square error of 10^(-28/20) = 4% of the range, about 10 grey levels.
    """
    # BEGIN SOLUTION ch02.psnr
    a = (x_hat.detach().float().clamp(-1, 1) + 1) / 2
    b = (x.detach().float().clamp(-1, 1) + 1) / 2
    mse = (a - b).pow(2).flatten(1).mean(dim=1).clamp_min(1e-10)   # (B,); the floor keeps identical images finite
    # PSNR = 10 log10(peak^2 / MSE), peak = 1
    return 10 * torch.log10(1.0 / mse)
    # END SOLUTION
