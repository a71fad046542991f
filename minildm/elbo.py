"""Chapter 06: why the loss is what it is. The variational bound of a diffusion model, term by term, and the weight
that each training objective puts on || eps - eps_hat ||^2 at each timestep.

Ho et al. (2020), eq. 5, in this book's indices (t = 0 .. T-1 are the paper's 1 .. T; z_0 is the clean latent):

    -log p(z_0) <= L = KL(q(z_{T-1} | z_0) || N(0, I))                                        the prior term
                     + sum_{t=1}^{T-1} E_q KL(q(z_{t-1} | z_t, z_0) || p(z_{t-1} | z_t))     one KL per step
                     + E_q [-log p(z_0 | z_{t=0})]                                            the reconstruction

Every KL is between two Gaussians of the same variance, so it is a squared difference of means, and with the mean
written through eps it is a weighted eps-MSE: KL_t = lambda_t |eps - eps_hat|^2. Ho et al. dropped lambda_t to get
the "simple" loss; `loss_weights` puts x0-, v-prediction and min-SNR on the same scale.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from minildm.autoencoder import DiagonalGaussian
from minildm.samplers import ModelFn, ddpm_posterior
from minildm.schedule import NoiseSchedule

WEIGHTINGS = ("elbo", "epsilon", "sample", "v_prediction", "min_snr")


def equal_variance_kl(mean_q: Tensor, mean_p: Tensor, variance: float) -> Tensor:
    """KL(N(mean_q, s^2 I) || N(mean_p, s^2 I)) per item, (B,): the log-variance terms cancel, the means remain."""
    # KL = |mean_q - mean_p|^2 / (2 s^2)
    return (mean_q - mean_p).pow(2).flatten(1).sum(1) / (2 * variance)


def gaussian_log_density(z: Tensor, mean: Tensor | float, variance: float) -> Tensor:
    """log N(z; mean, variance I) per item, (B,)."""
    d = z[0].numel()
    # log N = -|z - mean|^2 / (2 s^2) - D/2 log(2 pi s^2)
    return -(z - mean).pow(2).flatten(1).sum(1) / (2 * variance) - 0.5 * d * math.log(2 * math.pi * variance)


def prior_kl(schedule: NoiseSchedule, z0: Tensor) -> Tensor:
    """KL(q(z_{T-1} | z_0) || N(0, I)) per item, (B,): no parameters, near 0 when alpha_bar_{T-1} is near 0."""
    ab = schedule.alpha_bar[-1].item()
    mean = math.sqrt(ab) * z0.flatten(1)                                      # (B, D)
    logvar = torch.full_like(mean, math.log(1 - ab))                          # (B, D)
    # chapter 02's KL to N(0, I): 1/2 sum(mean^2 + var - 1 - log var)
    return DiagonalGaussian(torch.cat([mean, logvar], dim=1)[:, :, None, None]).kl()


def model_eps(schedule: NoiseSchedule, model_fn: ModelFn, zt: Tensor, t: int) -> Tensor:
    """eps_hat from a model_fn(z_t, t) that predicts eps, z_0 or v (as the schedule says)."""
    output = model_fn(zt, torch.full((zt.shape[0],), t, device=zt.device))
    return schedule.predict_z0_and_eps(zt, output, t)[1]


def step_kl(schedule: NoiseSchedule, z0: Tensor, zt: Tensor, eps_hat: Tensor, t: int) -> Tensor:
    """The ELBO's term at step t >= 1 for one z_t, (B,), from the Gaussian formula: the true posterior against the
    model's, which is the same posterior with z0_hat in place of z_0 (Ho et al.'s choice of mean) and its variance."""
    if not 1 <= t < schedule.num_timesteps:
        raise ValueError(f"step_kl needs 1 <= t <= {schedule.num_timesteps - 1}; t = 0 is the reconstruction term "
                         f"(reconstruction_nll), got t = {t}")
    ab_t, ab_prev = schedule.alpha_bar[t].item(), schedule.alpha_bar[t - 1].item()
    z0_hat = schedule.eps_to_z0(zt, eps_hat, t)
    mean_q, variance = ddpm_posterior(ab_t, ab_prev, z0, zt)                   # q(z_{t-1} | z_t, z_0)
    mean_p, _ = ddpm_posterior(ab_t, ab_prev, z0_hat, zt)                     # p(z_{t-1} | z_t)
    return equal_variance_kl(mean_q, mean_p, variance)


def reconstruction_nll(schedule: NoiseSchedule, z0: Tensor, zt: Tensor, eps_hat: Tensor) -> Tensor:
    """-log p(z_0 | z_{t=0}) per item, (B,), with p = N(z0_hat, beta_0 I): the posterior variance is 0 at the last
    step, so the chain ends with DDPM's "fixed_large" variance instead (Ho et al. used a discrete decoder here)."""
    z0_hat = schedule.eps_to_z0(zt, eps_hat, 0)
    return -gaussian_log_density(z0, z0_hat, schedule.betas[0].item())


def elbo_weights(schedule: NoiseSchedule) -> Tensor:
    """lambda_t, (T,): the ELBO's term at t equals lambda_t |eps - eps_hat|^2 (plus a constant at t = 0).
    L_simple sets every lambda_t to 1."""
    snr, alphas = schedule.snr, schedule.alphas
    # t >= 1: lambda_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - ab_t)) = (SNR_{t-1} / SNR_t - 1) / 2
    steps = (snr[:-1] / snr[1:] - 1) / 2                                      # (T-1,)
    # t = 0: variance beta_0 and ab_0 = alpha_0 give lambda_0 = 1 / (2 alpha_0)
    return torch.cat([1 / (2 * alphas[:1]), steps])                           # (T,)


def loss_weights(schedule: NoiseSchedule, weighting: str, gamma: float = 5.0) -> Tensor:
    """The weight w_t, (T,), that an objective puts on |eps - eps_hat|^2 at t, all on one scale (Kingma & Gao 2023).

    epsilon (L_simple): 1; sample (x0-MSE): 1 / SNR_t; v_prediction (v-MSE): 1 + 1 / SNR_t; min_snr (Hang et al.
    2023, x0-MSE weighted by min(SNR_t, gamma)): min(SNR_t, gamma) / SNR_t; elbo: `elbo_weights`.
    """
    snr = schedule.snr
    if weighting == "elbo":
        return elbo_weights(schedule)
    if weighting == "epsilon":
        return torch.ones_like(snr)
    if weighting == "sample":
        # |z_0 - z0_hat|^2 = |eps - eps_hat|^2 (1 - ab) / ab
        return 1 / snr
    if weighting == "v_prediction":
        # |v - v_hat|^2 = |eps - eps_hat|^2 / ab = (1 + 1 / SNR) |eps - eps_hat|^2
        return 1 + 1 / snr
    if weighting == "min_snr":
        if not gamma > 0:
            raise ValueError(f"min-SNR's gamma must be > 0 (Hang et al. use 5); got {gamma}")
        # min(SNR, gamma) |z_0 - z0_hat|^2 = min(SNR, gamma) / SNR |eps - eps_hat|^2 = min(1, gamma / SNR) |...|^2;
        # the last form, so that a zero-terminal-SNR schedule's last step (SNR = 0) gets the limit, 1, not 0 / 0
        return (gamma / snr).clamp(max=1)
    raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")


@torch.no_grad()
def elbo_terms(schedule: NoiseSchedule, model_fn: ModelFn, z0: Tensor, noise: Tensor) -> Tensor:
    """Each term of the bound for each z_0, (T + 1, B): row 0 the reconstruction, row t the step KL at t, row T the
    prior. noise (T, B, ...) gives row t its z_t = sqrt(ab_t) z_0 + sqrt(1 - ab_t) noise[t], reached in one jump,
    so each row is a one-sample estimate of its expectation; the sum of the rows' expectations is the bound L."""
    rows = []
    for t in range(schedule.num_timesteps):
        zt = schedule.q_sample(z0, t, noise[t])
        eps_hat = model_eps(schedule, model_fn, zt, t)
        rows.append(reconstruction_nll(schedule, z0, zt, eps_hat) if t == 0
                    else step_kl(schedule, z0, zt, eps_hat, t))
    rows.append(prior_kl(schedule, z0))
    return torch.stack(rows)                                                  # (T + 1, B)


@torch.no_grad()
def chain_bound(schedule: NoiseSchedule, model_fn: ModelFn, z0: Tensor,
                generator: torch.Generator | None = None) -> Tensor:
    """The bound as defined, with no algebra: log q(z_{0..T-1} | z_0) - log p(z_0 .. z_{T-1}) on one forward chain
    per item, drawn step by step, (B,). Its mean over chains is a Monte-Carlo estimate of L."""
    log_ratio = torch.zeros(z0.shape[0], dtype=z0.dtype, device=z0.device)
    z_prev, chain = z0, []
    for t in range(schedule.num_timesteps):
        beta = schedule.betas[t].item()
        noise = torch.randn(z0.shape, generator=generator, dtype=z0.dtype).to(z0.device)
        # q(z_t | z_{t-1}) = N(sqrt(1 - beta_t) z_{t-1}, beta_t I)
        zt = math.sqrt(1 - beta) * z_prev + math.sqrt(beta) * noise
        log_ratio += gaussian_log_density(zt, math.sqrt(1 - beta) * z_prev, beta)
        chain.append(zt)
        z_prev = zt
    log_ratio -= gaussian_log_density(chain[-1], 0.0, 1.0)                     # p(z_{T-1}) = N(0, I)
    for t in range(schedule.num_timesteps - 1, 0, -1):
        ab_t, ab_prev = schedule.alpha_bar[t].item(), schedule.alpha_bar[t - 1].item()
        z0_hat = schedule.eps_to_z0(chain[t], model_eps(schedule, model_fn, chain[t], t), t)
        mean, variance = ddpm_posterior(ab_t, ab_prev, z0_hat, chain[t])      # p(z_{t-1} | z_t)
        log_ratio -= gaussian_log_density(chain[t - 1], mean, variance)
    eps_hat = model_eps(schedule, model_fn, chain[0], 0)
    log_ratio += reconstruction_nll(schedule, z0, chain[0], eps_hat)           # -log p(z_0 | z_{t=0})
    return log_ratio
