"""Chapter 07's stand-in for a trained network: the best possible denoiser when the data are a few known latents.

If the training data are K latents y_1 .. y_K (equally likely), then z_t = sqrt(alpha_bar_t) y_k + sqrt(1 -
alpha_bar_t) eps is a mixture of K Gaussians, and the denoiser with the least squared error is the posterior mean

    E[z_0 | z_t] = sum_k w_k y_k,    w = softmax_k( -|z_t - sqrt(alpha_bar_t) y_k|^2 / (2 (1 - alpha_bar_t)) )

(Karras et al. 2022, appendix B.3). It needs no training, so the sampling loop of chapter 07 runs for real on the
shipped VAE's latent space before the U-Net exists; and it shows the memorisation a perfect model of a finite set
would have: every sample ends on one of the y_k.
"""

from __future__ import annotations

import torch
from torch import Tensor

from minildm.schedule import NoiseSchedule


class IdealDenoiser:
    """`model_fn(z_t, t)` for `minildm.samplers.sample`, answering in the schedule's prediction type."""

    def __init__(self, latents: Tensor, schedule: NoiseSchedule):
        if latents.ndim < 2 or len(latents) == 0:
            raise ValueError(f"latents must be a batch (K, C, h, w) of at least one; got shape {tuple(latents.shape)}")
        self.latents, self.schedule = latents, schedule

    def alpha_bar(self, t: Tensor) -> Tensor:
        """alpha_bar at (possibly fractional) timesteps, interpolating sigma as the sigma-space samplers do."""
        sigma = self.schedule.sigma_at(t.detach().cpu().double().numpy())
        return torch.from_numpy(1 / (1 + sigma ** 2))                     # alpha_bar = 1 / (1 + sigma^2)

    def z0_hat(self, zt: Tensor, t: Tensor) -> Tensor:
        """The posterior mean E[z_0 | z_t]: (B, C, h, w)."""
        ab = self.alpha_bar(t).to(zt.device, torch.float64).view(-1, 1)    # (B, 1)
        z = zt.double().flatten(1)                                          # (B, D)
        y = self.latents.to(zt.device, torch.float64).flatten(1)           # (K, D)
        # |z_t - sqrt(ab) y_k|^2 for every pair: (B, K)
        distance2 = (z.pow(2).sum(1, keepdim=True) - 2 * ab.sqrt() * z @ y.T + ab * y.pow(2).sum(1))
        weights = torch.softmax(-distance2 / (2 * (1 - ab)), dim=1)         # (B, K), the posterior over k
        return (weights @ y).view_as(zt).to(zt.dtype)

    def __call__(self, zt: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t).reshape(-1).expand(zt.shape[0])
        z0 = self.z0_hat(zt, t)
        ab = self.alpha_bar(t).to(zt.device, zt.dtype).view(-1, *([1] * (zt.ndim - 1)))
        # eps = (z_t - sqrt(ab) z_0) / sqrt(1 - ab);  v = sqrt(ab) eps - sqrt(1 - ab) z_0
        eps = (zt - ab.sqrt() * z0) / (1 - ab).sqrt()
        kind = self.schedule.prediction_type
        if kind == "epsilon":
            return eps
        if kind == "sample":
            return z0
        return ab.sqrt() * eps - (1 - ab).sqrt() * z0
