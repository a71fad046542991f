"""The ELBO of chapter 06, term by term: each identity the chapter states, checked on random tensors or on a 1-D
Gaussian mixture where every density is exact."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from minildm.elbo import chain_bound, elbo_terms, elbo_weights, loss_weights, prior_kl, reconstruction_nll, step_kl
from minildm.schedule import NoiseSchedule
from minildm.score import GaussianMixture

SCHEDULES = {"sd": NoiseSchedule(), "cosine": NoiseSchedule(beta_schedule="squaredcos_cap_v2"),
             "tiny": NoiseSchedule(num_timesteps=10, beta_schedule="linear", beta_start=0.02, beta_end=0.6)}

pytestmark = pytest.mark.usefixtures("one_thread")      # tests/conftest.py: tiny tensors, one thread


def draws(seed: int, shape=(6, 4, 4, 4)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))


def eps_mse(eps: torch.Tensor, eps_hat: torch.Tensor) -> torch.Tensor:
    return (eps - eps_hat).pow(2).flatten(1).sum(1)                            # (B,)


@pytest.mark.parametrize("name", SCHEDULES)
def test_the_step_kl_from_the_gaussian_formula_is_the_weighted_eps_mse(name):
    schedule = SCHEDULES[name]
    weights = elbo_weights(schedule)
    for t in sorted({1, 2, schedule.num_timesteps // 2, schedule.num_timesteps - 1}):
        z0, eps, eps_hat = draws(t)
        zt = schedule.q_sample(z0, t, eps)
        kl = step_kl(schedule, z0, zt, eps_hat, t)                             # (B,)
        expected = weights[t] * eps_mse(eps, eps_hat)
        assert torch.allclose(kl, expected, rtol=1e-9, atol=0), (
            f"{name}, t = {t}: KL {kl.tolist()} vs lambda_t |eps - eps_hat|^2 {expected.tolist()}")
        assert (kl > 0).all(), f"a KL between different Gaussians is positive; got {kl.tolist()}"


def test_the_elbo_weight_is_hos_beta_form_and_half_the_snr_ratio_less_one():
    schedule = SCHEDULES["sd"]
    t = torch.arange(1, schedule.num_timesteps)
    ab, ab_prev, beta = schedule.alpha_bar[t], schedule.alpha_bar[t - 1], 1 - schedule.alpha_bar[t] / \
        schedule.alpha_bar[t - 1]
    variance = (1 - ab_prev) / (1 - ab) * beta                                 # the posterior variance
    hos = beta ** 2 / (2 * variance * (1 - beta) * (1 - ab))                   # Ho et al. 2020, eq. 12
    assert torch.allclose(elbo_weights(schedule)[1:], hos, rtol=1e-9), (elbo_weights(schedule)[1:5], hos[:4])


@pytest.mark.parametrize("name", ["sd", "tiny"])
def test_the_reconstruction_term_is_the_weighted_eps_mse_plus_a_constant(name):
    schedule = SCHEDULES[name]
    z0, eps, eps_hat = draws(5)
    zt = schedule.q_sample(z0, 0, eps)
    beta0 = schedule.betas[0].item()
    constant = 0.5 * z0[0].numel() * math.log(2 * math.pi * beta0)
    got = reconstruction_nll(schedule, z0, zt, eps_hat)
    expected = elbo_weights(schedule)[0] * eps_mse(eps, eps_hat) + constant
    assert torch.allclose(got, expected, rtol=1e-9), (got.tolist(), expected.tolist())


@pytest.mark.parametrize("weighting", ["epsilon", "sample", "v_prediction", "min_snr"])
@pytest.mark.parametrize("t", [0, 120, 500, 999])
def test_each_objective_is_its_weight_times_the_eps_mse(weighting, t):
    schedule = SCHEDULES["sd"]
    z0, eps, eps_hat = draws(t + 1)
    zt = schedule.q_sample(z0, t, eps)
    z0_hat = schedule.eps_to_z0(zt, eps_hat, t)                                # what the model's eps implies
    if weighting == "epsilon":
        loss = eps_mse(eps, eps_hat)
    elif weighting == "sample":
        loss = eps_mse(z0, z0_hat)
    elif weighting == "v_prediction":
        loss = eps_mse(schedule.v_target(z0, eps, t), schedule.v_target(z0_hat, eps_hat, t))
    else:
        loss = min(schedule.snr[t].item(), 5.0) * eps_mse(z0, z0_hat)          # Hang et al. 2023, on the x0-MSE
    expected = loss_weights(schedule, weighting)[t] * eps_mse(eps, eps_hat)
    assert torch.allclose(loss, expected, rtol=1e-8), (weighting, t, loss.tolist(), expected.tolist())


def test_min_snr_is_the_x0_loss_at_low_snr_and_the_eps_loss_capped_at_high_snr():
    schedule = SCHEDULES["sd"]
    w, snr = loss_weights(schedule, "min_snr", gamma=5.0), schedule.snr
    low, high = snr < 5, snr >= 5
    assert torch.equal(w[low], torch.ones_like(w[low])) and torch.allclose(w[high], 5 / snr[high])


def test_the_prior_term_is_the_kl_of_two_gaussians_with_different_variances():
    schedule = SCHEDULES["tiny"]
    z0 = torch.linspace(-2, 2, 5, dtype=torch.float64).view(5, 1)
    ab = schedule.alpha_bar[-1].item()
    # 1-D: KL(N(m, v) || N(0, 1)) = (m^2 + v - 1 - log v) / 2
    expected = (ab * z0[:, 0] ** 2 + (1 - ab) - 1 - math.log(1 - ab)) / 2
    assert torch.allclose(prior_kl(schedule, z0), expected, rtol=1e-9)


# ------------------------------------------------------------------------------------------------ the whole bound

MIXTURE = GaussianMixture(weights=[0.3, 0.7], means=[-1.5, 1.0], stds=[0.3, 0.5])


def mixture_model(schedule: NoiseSchedule):
    """The exact eps of the 1-D mixture, E[eps | z_t], from its posterior mean: the best model there is."""
    def model_fn(zt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = schedule.alpha_bar[int(t[0])].item()
        z0 = MIXTURE.posterior_mean(zt, ab).view_as(zt)
        return (zt - math.sqrt(ab) * z0) / math.sqrt(1 - ab)
    return model_fn


def test_the_sum_of_the_elbo_terms_is_the_monte_carlo_bound_of_the_forward_chain():
    # the terms' expectations over z_t ~ q(z_t | z_0) by Gauss-Hermite quadrature (exact to ~1e-12 here); the bound
    # itself from 50,000 forward chains, drawn step by step; they agree within the estimator's standard error
    schedule = SCHEDULES["tiny"]
    model = mixture_model(schedule)
    nodes, quad_weights = np.polynomial.hermite_e.hermegauss(80)
    nodes = torch.from_numpy(nodes).view(1, -1, 1).expand(schedule.num_timesteps, -1, -1)   # (T, 80, 1)
    quad_weights = torch.from_numpy(quad_weights) / math.sqrt(2 * math.pi)
    for z0_value in (-1.5, 0.2):
        z0 = torch.full((80, 1), z0_value, dtype=torch.float64)
        terms = elbo_terms(schedule, model, z0, nodes) @ quad_weights                        # (T + 1,)
        chains = chain_bound(schedule, model, torch.full((50_000, 1), z0_value, dtype=torch.float64),
                             torch.Generator().manual_seed(int(10 * z0_value) + 100))
        estimate, standard_error = chains.mean().item(), chains.std().item() / math.sqrt(len(chains))
        gap = terms.sum().item() - estimate
        assert abs(gap) < 4 * standard_error, (
            f"z_0 = {z0_value}: sum of the terms {terms.sum():.5f}, Monte-Carlo bound {estimate:.5f} "
            f"+- {standard_error:.5f} (terms: {[round(v, 4) for v in terms.tolist()]})")
        # the check can tell a term missing: the reconstruction and the first step's KL are far above the tolerance
        assert terms[:2].abs().min() > 10 * standard_error, (terms.tolist(), standard_error)


@pytest.mark.parametrize("call, message", [
    (lambda: step_kl(SCHEDULES["tiny"], *draws(0)[:2], draws(0)[2], 0), "t = 0 is the reconstruction term"),
    (lambda: loss_weights(SCHEDULES["tiny"], "snr"), "unknown weighting 'snr'; choose one of elbo"),
    (lambda: loss_weights(SCHEDULES["tiny"], "min_snr", gamma=0), "gamma must be > 0"),
])
def test_bad_input_is_a_one_line_value_error_that_says_what_to_do(call, message):
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)
