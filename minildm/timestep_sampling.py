"""Chapter 06: which noise levels training practises on, and why that is the same choice as a loss weighting.

Training draws a timestep t for every image and pays L_t = |target - model(z_t, t, c)|^2 there. A weighting w_t on
that loss and a distribution p_t over t are one knob seen from two sides (Kingma & Gao 2023):

    E_{t ~ uniform}[w_t L_t] = (1 / T) sum_t w_t L_t = (sum_s w_s / T) E_{t ~ p}[L_t],   with p_t = w_t / sum_s w_s

The factor in front is a constant, and Adam's step does not change when the loss is multiplied by a constant. So
drawing t from p with the plain loss trains toward the weighted objective; it also spends the batch's compute on the
timesteps the weighting values, where a weight near 0 would have spent it on a term that barely counts.

- `uniform`: every t alike, Ho et al.'s L_simple (the shipped model's recipe).
- `min_snr`: Hang et al. (2023)'s min-SNR-gamma weighting, min(SNR_t, gamma) on the z_0 error, converted to the
  model's own target: its weight on the eps error is min(SNR_t, gamma) / SNR_t (elbo.loss_weights), divided by the
  weight the target already carries (1 for eps, 1 / SNR_t for z_0, 1 + 1 / SNR_t for v). Nearly clean timesteps,
  where the model only has to copy its input, are drawn far less often. For a v model this draws few of the noisy
  timesteps (its own loss already weights them up), and none at a zero-terminal-SNR schedule's last step.
- `min_snr_eps`: min-SNR's draws for an eps model, p_t proportional to min(1, gamma / SNR_t), whatever the model
  predicts: the defaults' timesteps, for a v (or z_0) model. Its objective is then min-SNR's times the target's own
  weight (for v, 1 + 1 / SNR_t on the eps error), so the noisy timesteps count for more than under `min_snr`.
- `lognormal`: the noise-level distribution of Karras et al. (2022, EDM): log sigma ~ N(-1.2, 1.2^2), with
  sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) the noise level of t seen in the z / sqrt(alpha_bar) frame.
  Timestep t receives the normal's mass between the log sigmas halfway to its neighbours. (EDM's network
  preconditioning is another change; this is only where its noise levels fall.)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from minildm.elbo import loss_weights
from minildm.schedule import NoiseSchedule

SAMPLINGS = ("uniform", "min_snr", "min_snr_eps", "lognormal")
MIN_SNR_GAMMA = 5.0                      # Hang et al.'s choice
LOG_SIGMA_MEAN, LOG_SIGMA_STD = -1.2, 1.2  # EDM's P_mean, P_std


def timestep_probabilities(schedule: NoiseSchedule, sampling: str, gamma: float = MIN_SNR_GAMMA,
                           log_sigma_mean: float = LOG_SIGMA_MEAN, log_sigma_std: float = LOG_SIGMA_STD) -> Tensor:
    """p_t, (T,) float64 summing to 1: how often training draws each timestep under `sampling` (see the module)."""
    T = schedule.num_timesteps
    if sampling == "uniform":
        return torch.full((T,), 1.0 / T, dtype=torch.float64)
    if sampling == "min_snr":
        # p_t proportional to w_t(min-SNR) / w_t(the model's own target), both as weights on |eps - eps_hat|^2
        own = loss_weights(schedule, schedule.prediction_type)                    # (T,)
        weights = loss_weights(schedule, "min_snr", gamma) / own                  # (T,)
        return (weights / weights.sum()).double()
    if sampling == "min_snr_eps":
        # p_t proportional to min-SNR's weight on |eps - eps_hat|^2 itself: the draws of `min_snr` for an eps model
        weights = loss_weights(schedule, "min_snr", gamma)                        # (T,)
        return (weights / weights.sum()).double()
    if sampling == "lognormal":
        if not log_sigma_std > 0:
            raise ValueError(f"log_sigma_std must be > 0 (EDM uses 1.2); got {log_sigma_std}")
        log_sigma = schedule.finite_sigmas.double().log()                         # (T,), rising with t
        # cell edges halfway between neighbours; the first and last cells reach to -inf and +inf
        inner = (log_sigma[1:] + log_sigma[:-1]) / 2                              # (T - 1,)
        edges = torch.cat([torch.tensor([-math.inf], dtype=torch.float64), inner,
                           torch.tensor([math.inf], dtype=torch.float64)])        # (T + 1,)
        # Phi(e) = (1 + erf((e - mean) / (std sqrt 2))) / 2: the normal's mass below each edge
        below = (1 + torch.erf((edges - log_sigma_mean) / (log_sigma_std * math.sqrt(2)))) / 2
        return below[1:] - below[:-1]                                             # (T,)
    raise ValueError(f"unknown timestep sampling {sampling!r}; choose one of {', '.join(SAMPLINGS)}")


def draw_timesteps(probabilities: Tensor | None, count: int, num_timesteps: int,
                   generator: torch.Generator) -> Tensor:
    """count timesteps (count,) long: uniform when `probabilities` is None (torch.randint, as the shipped recipe
    drew them), else drawn from p_t with replacement."""
    if probabilities is None:
        return torch.randint(num_timesteps, (count,), generator=generator)
    return torch.multinomial(probabilities, count, replacement=True, generator=generator)
