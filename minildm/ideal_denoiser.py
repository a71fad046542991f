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

from minildm.schedule import NoiseLevel, NoiseSchedule


class IdealDenoiser:
    """`model_fn(z_t, t)` for `minildm.samplers.sample`, answering in the schedule's prediction type."""

    def __init__(self, latents: Tensor, schedule: NoiseSchedule):
        if latents.ndim < 2 or len(latents) == 0:
            raise ValueError(f"latents must be a batch (K, C, h, w) of at least one; got shape {tuple(latents.shape)}")
        self.latents, self.schedule = latents, schedule

    def noise_level(self, t: Tensor) -> NoiseLevel:
        """The level at (possibly fractional) timesteps, interpolating sigma as the sigma-space samplers do."""
        return NoiseLevel.from_sigma(torch.from_numpy(self.schedule.sigma_at(t.detach().cpu().double().numpy())))

    def z0_hat(self, zt: Tensor, t: Tensor) -> Tensor:
        """The posterior mean E[z_0 | z_t]: (B, C, h, w)."""
        z = zt.double().flatten(1)                                          # (B, D)
        y = self.latents.to(zt.device, torch.float64).flatten(1)           # (K, D)
        a, b = self.schedule.coefficients(self.noise_level(t), z)           # sqrt(ab), sqrt(1 - ab): (B, 1) each
        # |z_t - sqrt(ab) y_k|^2 for every pair: (B, K)
        distance2 = z.pow(2).sum(1, keepdim=True) - 2 * a * z @ y.T + a ** 2 * y.pow(2).sum(1)
        weights = torch.softmax(-distance2 / (2 * b ** 2), dim=1)           # (B, K), the posterior over k
        return (weights @ y).view_as(zt).to(zt.dtype)

    def __call__(self, zt: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t).reshape(-1).expand(zt.shape[0])
        z0 = self.z0_hat(zt, t)
        level = self.noise_level(t)
        eps = self.schedule.z0_to_eps(zt, z0, level)
        return self.schedule.training_target(z0, eps, level)               # eps, z_0 or v, as the model would
