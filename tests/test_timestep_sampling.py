"""Which timesteps training draws: a distribution over t is a loss weighting (Kingma & Gao 2023), min-SNR and EDM's
log-normal noise levels as distributions, and the trainer drawing from them."""

from __future__ import annotations

import math

import pytest
import torch

from minildm.elbo import loss_weights
from minildm.schedule import NoiseSchedule
from minildm.timestep_sampling import draw_timesteps, timestep_probabilities

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("sampling", ["uniform", "min_snr", "min_snr_eps", "lognormal"])
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_every_sampling_is_a_distribution_over_the_schedule_s_timesteps(sampling, prediction):
    p = timestep_probabilities(NoiseSchedule(prediction_type=prediction), sampling)
    assert p.shape == (1000,) and p.dtype == torch.float64
    assert (p > 0).all() and p.sum().item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_drawing_t_from_p_with_the_plain_loss_is_the_weighted_loss_up_to_a_constant(prediction):
    # E_{t~uniform}[w_t L_t] = (sum w / T) E_{t~p}[L_t] for any per-t losses L_t, with w_t min-SNR's weight on the
    # model's own target: min(SNR, gamma) / SNR on the eps error, divided by what that target already weighs
    schedule = NoiseSchedule(prediction_type=prediction)
    L = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.1    # any L_t > 0
    w = loss_weights(schedule, "min_snr", 5.0) / loss_weights(schedule, prediction)
    p = timestep_probabilities(schedule, "min_snr", gamma=5.0)
    weighted = (w * L).mean()
    assert weighted.item() == pytest.approx((w.sum() / 1000 * (p * L).sum()).item(), rel=1e-12)


@pytest.mark.parametrize("gamma", [5.0, 1.0, 0.25])
def test_min_snr_on_eps_draws_noisy_timesteps_uniformly_and_nearly_clean_ones_in_proportion_to_snr(gamma):
    schedule = NoiseSchedule()
    p = timestep_probabilities(schedule, "min_snr", gamma=gamma)
    snr = schedule.snr
    noisy = snr <= gamma                               # min(SNR, gamma) / SNR = 1 there: all alike
    assert torch.allclose(p[noisy], p[noisy][0].expand(int(noisy.sum())), rtol=1e-12)
    clean = snr > gamma                                # gamma / SNR there: twice the SNR, half as often
    ratio = (p[clean] * snr[clean]) / (p[noisy][0] * gamma)
    assert torch.allclose(ratio, torch.ones_like(ratio), rtol=1e-9)
    # t = 0 (SNR ~ 1,175) is drawn gamma / SNR_0 as often as the noisiest t: over 200 times less often at gamma 5
    assert (p[0] / p[-1]).item() == pytest.approx(gamma / snr[0].item(), rel=1e-9)
    assert p[0] < p[-1] / 200


def test_a_smaller_gamma_draws_the_noisier_timesteps_more_often():
    schedule = NoiseSchedule()
    share_below_300 = [timestep_probabilities(schedule, "min_snr", gamma=g)[:300].sum().item()
                       for g in (5.0, 1.0, 0.25)]
    assert share_below_300[0] > share_below_300[1] > share_below_300[2]
    assert share_below_300[0] == pytest.approx(0.236, abs=0.001)   # chapter 06's figures for gamma 5 and 1
    assert share_below_300[1] == pytest.approx(0.099, abs=0.001)


def test_min_snr_for_v_prediction_is_min_snr_over_snr_plus_one():
    # on the v error, min-SNR's weight is min(SNR, gamma) / (SNR + 1) (Hang et al.'s v-prediction form)
    schedule = NoiseSchedule(prediction_type="v_prediction")
    snr = schedule.snr
    expected = snr.clamp(max=5) / (snr + 1)
    assert torch.allclose(timestep_probabilities(schedule, "min_snr"), expected / expected.sum(), rtol=1e-10)


def test_min_snr_eps_draws_what_min_snr_draws_for_an_eps_model_whatever_the_target():
    eps = timestep_probabilities(NoiseSchedule(), "min_snr", gamma=2.0)
    for prediction in ("epsilon", "sample", "v_prediction"):
        drawn = timestep_probabilities(NoiseSchedule(prediction_type=prediction), "min_snr_eps", gamma=2.0)
        assert torch.allclose(drawn, eps, rtol=1e-12, atol=0)
    # the difference it makes for a v model: min_snr puts 7% of its draws above t = 600, min_snr_eps 44%
    v_min_snr = timestep_probabilities(NoiseSchedule(prediction_type="v_prediction"), "min_snr")
    v_min_snr_eps = timestep_probabilities(NoiseSchedule(prediction_type="v_prediction"), "min_snr_eps")
    assert v_min_snr[600:].sum().item() == pytest.approx(0.071, abs=0.001)
    assert v_min_snr_eps[600:].sum().item() == pytest.approx(0.436, abs=0.001)


def test_min_snr_on_a_zero_terminal_snr_schedule_takes_its_limit_at_the_pure_noise_step():
    schedule = NoiseSchedule(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    snr = schedule.snr
    assert snr[-1] == 0 and (snr[:-1] > 0).all()
    # min(SNR, gamma) / SNR -> 1 as SNR -> 0: finite, and equal to the other noisy steps' weight
    weights = loss_weights(schedule, "min_snr", 5.0)
    assert weights[-1] == 1 and torch.isfinite(weights).all()
    assert torch.allclose(weights[:-1], snr[:-1].clamp(max=5) / snr[:-1], rtol=1e-12)
    eps_draws = timestep_probabilities(schedule, "min_snr_eps")
    assert eps_draws[-1] == eps_draws[-2] == eps_draws.max()
    # on the v error, min(SNR, gamma) / (SNR + 1) is 0 at SNR = 0: min_snr never draws the pure-noise step
    v_draws = timestep_probabilities(schedule, "min_snr")
    assert v_draws[-1] == 0 and not v_draws.isnan().any()
    assert v_draws.sum().item() == pytest.approx(1.0, abs=1e-12)


def test_lognormal_gives_each_timestep_the_normal_mass_of_its_log_sigma_cell():
    schedule = NoiseSchedule()
    p = timestep_probabilities(schedule, "lognormal", log_sigma_mean=-1.2, log_sigma_std=1.2)
    log_sigma = schedule.finite_sigmas.double().log()
    normal_cdf = lambda x: (1 + math.erf((x + 1.2) / (1.2 * math.sqrt(2)))) / 2      # noqa: E731
    # t = 0's cell reaches down to -inf: it gathers every noise level below the schedule's smallest sigma
    assert p[0].item() == pytest.approx(normal_cdf((log_sigma[0] + log_sigma[1]).item() / 2), rel=1e-9)
    # the mass below sigma = exp(-1.2) is one half, to within the one cell that straddles it
    below = p[log_sigma < -1.2].sum().item()
    cell = p[(log_sigma + 1.2).abs().argmin()].item()
    assert abs(below - 0.5) <= cell
    # 2.5% of the mass lies above the mean + 1.96 std (sigma ~ 3.2, inside the schedule's range)
    above = p[log_sigma > -1.2 + 1.96 * 1.2].sum().item()
    assert above == pytest.approx(0.025, abs=0.002)
    with pytest.raises(ValueError, match="log_sigma_std must be > 0"):
        timestep_probabilities(schedule, "lognormal", log_sigma_std=0.0)


def test_draw_timesteps_matches_p_and_uniform_is_the_old_randint_draw():
    g = torch.Generator().manual_seed(3)
    assert torch.equal(draw_timesteps(None, 64, 1000, g), torch.randint(1000, (64,), generator=torch.Generator()
                                                                          .manual_seed(3)))
    p = torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=torch.float64)
    t = draw_timesteps(p, 20_000, 4, torch.Generator().manual_seed(0))
    freq = torch.bincount(t, minlength=4).double() / 20_000
    assert freq[1] == 0
    # each frequency within 5 binomial standard deviations of its probability
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / 20_000).sqrt() + 1e-12).all(), freq


def test_an_unknown_sampling_is_a_one_line_error():
    choices = "uniform, min_snr, min_snr_eps, lognormal"
    with pytest.raises(ValueError, match=f"unknown timestep sampling 'snr'; choose one of {choices}"):
        timestep_probabilities(NoiseSchedule(), "snr")
    assert math.isclose(timestep_probabilities(NoiseSchedule(), "uniform")[0].item(), 1e-3)
