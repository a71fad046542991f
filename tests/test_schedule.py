"""The forward process and its schedules: every equation of chapter 03 checked as an identity, in float64.

The closed form q(z_t | z_0) is checked against the one-step process it summarises, twice: exactly, by carrying
the mean and variance through every step, and by Monte Carlo, by running the steps on many samples. Then the
shapes of the curves (alpha_bar falls, SNR falls, sigma rises), the eps / z_0 / v conversions, the two fixes
(the cosine cap and zero terminal SNR), and the errors a user can cause.
"""

from __future__ import annotations

import math

import pytest
import torch

from minildm.schedule import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    NoiseLevel,
    NoiseSchedule,
    cosine_alpha_bar,
)

SCHEDULES = {
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),        # DDPM (Ho et al. 2020)
    "scaled_linear": dict(),                                                       # SD v1
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),                  # Nichol & Dhariwal 2021
    "scaled_linear_zero_snr": dict(rescale_betas_zero_snr=True),                  # Lin et al. 2024
    "linear_zero_snr": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, rescale_betas_zero_snr=True),
}
TIMESTEPS = [0, 1, 10, 250, 500, 998, 999]


def schedule(name: str, **options) -> NoiseSchedule:
    return NoiseSchedule(**SCHEDULES[name], **options)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float, rtol: float = 0.0) -> None:
    """Equal shapes, and |actual - expected| <= atol + rtol |expected| everywhere (inf == inf allowed)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    close = torch.isclose(actual, expected, atol=atol, rtol=rtol)
    if not close.all():
        error = (actual - expected).abs()
        rel = error / expected.abs().clamp_min(1e-300)
        where = tuple(int(i) for i in (~close).nonzero()[0])
        raise AssertionError(f"{what}: {int((~close).sum())} of {actual.numel()} values differ; max abs error "
                             f"{error[~close].max():.3g}, max rel error {rel[~close].max():.3g}; first at {where}: "
                             f"{actual[where].item()!r} vs {expected[where].item()!r}")


def random_latents(seed: int, shape=(3, 4, 5, 6)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64),
            torch.randn(shape, generator=g, dtype=torch.float64))


# ------------------------------------------------------------------- the closed form vs the one-step process


@pytest.mark.parametrize("name", SCHEDULES)
def test_closed_form_mean_and_variance_equal_those_of_the_one_step_process_iterated(name):
    s = schedule(name)
    # z_t = sqrt(1 - beta_t) z_{t-1} + sqrt(beta_t) eps_t moves mean and variance by
    #   mean_t = sqrt(1 - beta_t) mean_{t-1},   var_t = (1 - beta_t) var_{t-1} + beta_t,   from z_0 (var 0)
    z0 = torch.tensor([[-2.0, 0.5, 1.5]], dtype=torch.float64).view(1, 3, 1, 1)
    mean, var = z0.clone(), torch.zeros(())
    means, variances = [], []
    for beta in s.betas:
        mean = (1 - beta).sqrt() * mean
        var = (1 - beta) * var + beta
        means.append(mean)
        variances.append(var)
    for t in TIMESTEPS:
        # q_sample is linear in (z_0, eps): its mean is q_sample(z_0, t, 0) and its std is q_sample(0, t, 1)
        closed_mean = s.q_sample(z0, t, torch.zeros_like(z0))
        closed_std = s.q_sample(torch.zeros_like(z0), t, torch.ones_like(z0))
        assert_close(closed_mean, means[t], f"{name}: the mean of z_t at t={t}", atol=1e-13, rtol=1e-11)
        assert_close(closed_std ** 2, variances[t].expand_as(z0), f"{name}: the variance of z_t at t={t}",
                     atol=1e-13, rtol=1e-11)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2", "scaled_linear_zero_snr"])
def test_iterating_the_one_step_process_on_many_samples_matches_the_closed_form_statistically(name):
    s = schedule(name)
    n = 20_000
    g = torch.Generator().manual_seed(0)
    z0 = torch.tensor([-2.0, 0.5, 1.5], dtype=torch.float64).view(1, 3, 1, 1)
    z = z0.expand(n, 3, 1, 1).clone()                                      # (n, 3, 1, 1): n chains per value
    checked = {100, 400, 700, 999}
    for t, beta in enumerate(s.betas):
        # z_t = sqrt(1 - beta_t) z_{t-1} + sqrt(beta_t) eps_t
        z = (1 - beta).sqrt() * z + beta.sqrt() * torch.randn(z.shape, generator=g, dtype=torch.float64)
        if t not in checked:
            continue
        mean = s.q_sample(z0, t, torch.zeros_like(z0))[0]                  # (3, 1, 1)
        var = 1 - s.alpha_bar[t]
        # the sample mean has standard error sqrt(var / n); the sample variance, about var sqrt(2 / n)
        mean_error = ((z.mean(0) - mean).abs() / (var / n).sqrt()).max()
        var_ratio = z.var(0) / var
        assert mean_error < 5, (f"{name}, t={t}: the mean of {n:,} iterated chains is {mean_error:.1f} standard "
                                f"errors from sqrt(alpha_bar_t) z_0 = {mean.flatten().tolist()}")
        assert ((var_ratio - 1).abs() < 5 * math.sqrt(2 / n)).all(), (
            f"{name}, t={t}: variance of the iterated chains / (1 - alpha_bar_t) = {var_ratio.flatten().tolist()}; "
            f"expected 1 within {5 * math.sqrt(2 / n):.3f}")


def test_q_sample_draws_have_the_closed_form_mean_and_variance():
    s = schedule("scaled_linear")
    n, g = 20_000, torch.Generator().manual_seed(1)
    z0 = torch.randn(1, 4, 2, 2, generator=g, dtype=torch.float64)
    for t in (50, 500, 950):
        zt = s.q_sample(z0.expand(n, -1, -1, -1), t, torch.randn(n, 4, 2, 2, generator=g, dtype=torch.float64))
        a = s.alpha_bar[t]
        mean_error = ((zt.mean(0) - a.sqrt() * z0[0]).abs() / ((1 - a) / n).sqrt()).max()
        assert mean_error < 5, f"t={t}: the mean of {n:,} draws is {mean_error:.1f} standard errors off"
        ratio = zt.var(0) / (1 - a)
        assert ((ratio - 1).abs() < 5 * math.sqrt(2 / n)).all(), f"t={t}: variance ratio {ratio.flatten().tolist()}"


# ------------------------------------------------------------------------------- the shapes of the curves


@pytest.mark.parametrize("name", SCHEDULES)
def test_alpha_bar_falls_strictly_from_below_one_and_snr_falls_and_sigma_rises(name):
    s = schedule(name)
    a = s.alpha_bar
    assert a.dtype == torch.float64 and a.shape == (1000,), (a.dtype, tuple(a.shape))
    assert ((s.betas > 0) & (s.betas <= 1)).all(), f"{name}: betas outside (0, 1]: {s.betas.min()}, {s.betas.max()}"
    assert (a[1:] < a[:-1]).all(), f"{name}: alpha_bar does not fall strictly at t = {(a[1:] >= a[:-1]).nonzero()}"
    assert 0 < a[0] <= 1, f"{name}: alpha_bar_0 = {a[0]}"
    if s.rescale_betas_zero_snr:
        assert a[-1] == 0 and (a[:-1] > 0).all(), f"{name}: alpha_bar_(T-1) = {a[-1]!r}, expected exactly 0"
    else:
        assert a[-1] > 0, f"{name}: alpha_bar_(T-1) = {a[-1]!r}, expected > 0"
    assert (s.snr[1:] < s.snr[:-1]).all(), f"{name}: SNR does not fall strictly"
    assert (s.sigmas[1:] > s.sigmas[:-1]).all(), f"{name}: sigma does not rise strictly"
    assert (s.log_snr[1:] < s.log_snr[:-1]).all(), f"{name}: log-SNR does not fall strictly"


@pytest.mark.parametrize("name", SCHEDULES)
def test_snr_sigma_and_log_snr_are_views_of_alpha_bar(name):
    s = schedule(name)
    a = s.alpha_bar
    assert_close(s.snr, a / (1 - a), f"{name}: SNR = alpha_bar / (1 - alpha_bar)", atol=0, rtol=1e-14)
    assert_close(s.log_snr, s.snr.log(), f"{name}: log_snr = log(snr)", atol=1e-12, rtol=1e-12)
    assert_close(s.sigmas, s.snr.rsqrt(), f"{name}: sigma = 1 / sqrt(SNR)", atol=0, rtol=1e-13)
    assert_close(s.alphas, 1 - s.betas, f"{name}: alpha = 1 - beta", atol=0)
    assert_close(a, torch.cumprod(s.alphas, 0), f"{name}: alpha_bar = cumprod(alpha)", atol=0)


def test_snr_is_one_where_alpha_bar_is_one_half():
    s = schedule("scaled_linear")
    t = int((s.alpha_bar < 0.5).nonzero()[0])               # the first step with more noise than signal
    assert s.snr[t - 1] > 1 > s.snr[t] and s.log_snr[t - 1] > 0 > s.log_snr[t], (t, s.snr[t - 1 : t + 1])


# ------------------------------------------------------------------------------------- eps, z_0 and v


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2", "scaled_linear_zero_snr"])
@pytest.mark.parametrize("seed", [0, 1])
def test_eps_z0_and_v_round_trip_for_batched_timesteps(name, seed):
    s = schedule(name)
    z0, eps = random_latents(seed)                                           # (3, 4, 5, 6) each
    top = 998 if s.rescale_betas_zero_snr else 999                           # at SNR = 0, z_t says nothing of z_0
    t = torch.tensor([0, int(torch.randint(1, top, (), generator=torch.Generator().manual_seed(seed))), top])
    zt = s.q_sample(z0, t, eps)
    assert zt.shape == z0.shape and zt.dtype == torch.float64, (tuple(zt.shape), zt.dtype)
    v = s.v_target(z0, eps, t)
    # cosine at t = 998: sqrt(alpha_bar) ~ 3e-4 divides eps, so allow 1e-9 absolute
    assert_close(s.eps_to_z0(zt, eps, t), z0, f"{name}, t={t.tolist()}: eps_to_z0(q_sample(z0, t, eps), eps)",
                 atol=1e-9)
    assert_close(s.z0_to_eps(zt, z0, t), eps, f"{name}, t={t.tolist()}: z0_to_eps", atol=1e-9)
    assert_close(s.v_to_z0(zt, v, t), z0, f"{name}, t={t.tolist()}: v_to_z0", atol=1e-12)
    assert_close(s.v_to_eps(zt, v, t), eps, f"{name}, t={t.tolist()}: v_to_eps", atol=1e-12)
    # v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) z_0, by hand
    a = s.alpha_bar[t].view(-1, 1, 1, 1)
    assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * z0, f"{name}: v_target", atol=1e-14)


def test_batched_timesteps_give_each_item_its_own_step():
    s = schedule("scaled_linear")
    z0, eps = random_latents(2, (4, 2, 3, 3))
    t = torch.tensor([3, 999, 0, 512])
    batched = s.q_sample(z0, t, eps)
    for i, step in enumerate(t.tolist()):
        alone = s.q_sample(z0[i : i + 1], step, eps[i : i + 1])
        assert_close(batched[i : i + 1], alone, f"item {i} (t={step}) of a batch vs on its own", atol=0)
    one_for_all = s.q_sample(z0, torch.tensor(7), eps)                       # a 0-d t applies to every item
    assert_close(one_for_all, s.q_sample(z0, torch.full((4,), 7), eps), "a 0-d t vs the same t per item", atol=0)


def test_conversions_keep_the_dtype_of_their_inputs():
    s = schedule("scaled_linear")
    z0, eps = (x.float() for x in random_latents(3))
    t = torch.tensor([1, 500, 999])
    zt = s.q_sample(z0, t, eps)
    outputs = {"q_sample": zt, "eps_to_z0": s.eps_to_z0(zt, eps, t), "v_target": s.v_target(z0, eps, t)}
    assert all(o.dtype == torch.float32 for o in outputs.values()), {k: o.dtype for k, o in outputs.items()}
    assert_close(outputs["eps_to_z0"].double(), z0.double(), "the float32 round trip", atol=1e-4)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_predict_z0_and_eps_reads_the_model_output_by_prediction_type(prediction_type):
    s = NoiseSchedule(prediction_type=prediction_type)
    z0, eps = random_latents(4)
    t = torch.tensor([5, 300, 990])
    zt = s.q_sample(z0, t, eps)
    output = {"epsilon": eps, "sample": z0, "v_prediction": s.v_target(z0, eps, t)}[prediction_type]
    z0_hat, eps_hat = s.predict_z0_and_eps(zt, output, t)
    assert_close(z0_hat, z0, f"z0_hat from a perfect {prediction_type} output", atol=1e-10)
    assert_close(eps_hat, eps, f"eps_hat from a perfect {prediction_type} output", atol=1e-10)


@pytest.mark.parametrize("name", ["scaled_linear", "squaredcos_cap_v2", "scaled_linear_zero_snr"])
def test_every_conversion_at_a_noise_level_equals_the_one_at_the_timestep_of_that_alpha_bar(name):
    s = schedule(name)
    z0, eps = random_latents(6)
    t = torch.tensor([0, 400, 998])
    zt, v = s.q_sample(z0, t, eps), s.v_target(z0, eps, t)
    per_item = NoiseLevel(s.alpha_bar[t])                                   # (3,): one level per item
    for level in (per_item, NoiseLevel.from_sigma(s.sigmas[t])):
        for what, at_level, at_t in [
            ("eps_to_z0", s.eps_to_z0(zt, eps, level), s.eps_to_z0(zt, eps, t)),
            ("z0_to_eps", s.z0_to_eps(zt, z0, level), s.z0_to_eps(zt, z0, t)),
            ("v_target", s.v_target(z0, eps, level), v),
            ("v_to_z0", s.v_to_z0(zt, v, level), s.v_to_z0(zt, v, t)),
            ("v_to_eps", s.v_to_eps(zt, v, level), s.v_to_eps(zt, v, t)),
        ]:
            assert_close(at_level, at_t, f"{name}: {what} at a NoiseLevel vs at t = {t.tolist()}", atol=1e-9)


def test_one_level_for_the_whole_batch_gives_plain_numbers_with_the_same_values():
    # an int t (or a level of one float) needs no tensor on the latent's device: two Python floats
    s = schedule("scaled_linear")
    like = torch.zeros(2, 4, 3, 3)
    for level in (500, NoiseLevel(float(s.alpha_bar[500]))):
        a, b = s.coefficients(level, like)
        assert isinstance(a, float) and isinstance(b, float), (level, type(a), type(b))
        # equal to the last bits only: math.sqrt and torch's vectorised sqrt may round differently (CI's CPU did)
        expected = (s.alpha_bar[500].sqrt().item(), (1 - s.alpha_bar[500]).sqrt().item())
        assert (a, b) == pytest.approx(expected, rel=1e-14, abs=0), (level, a, b, expected)
    a, b = s.coefficients(torch.tensor([500, 500]), like)
    assert a.shape == b.shape == (2, 1, 1, 1) and a.dtype == like.dtype, (a.shape, a.dtype)


def test_at_zero_terminal_snr_v_still_gives_z0_where_eps_cannot():
    s = schedule("scaled_linear_zero_snr")
    z0, eps = random_latents(5)
    t = s.num_timesteps - 1
    zt = s.q_sample(z0, t, eps)
    assert_close(zt, eps, "z_(T-1) at zero terminal SNR is pure noise", atol=0)
    # v = sqrt(0) eps - sqrt(1) z_0 = -z_0: predicting v at the last step means predicting (minus) the image
    assert_close(s.v_to_z0(zt, s.v_target(z0, eps, t), t), z0, "v_to_z0 at the last step", atol=0)
    z0_from_eps = s.eps_to_z0(zt, eps, t)                                    # 0 / 0: eps says nothing of z_0
    assert not torch.isfinite(z0_from_eps).any(), "eps_to_z0 at SNR = 0 should not pretend to know z_0"


# ------------------------------------------------------------------------------------ the schedules' fixes


@pytest.mark.parametrize("name", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_rescaling_to_zero_terminal_snr_ends_at_exactly_zero_and_keeps_alpha_bar_0(name):
    before, after = schedule(name), schedule(name, rescale_betas_zero_snr=True)
    assert after.alpha_bar[-1] == 0, f"{name}: alpha_bar_(T-1) = {after.alpha_bar[-1]!r} after rescaling"
    assert after.betas[-1] == 1, f"{name}: the last beta is {after.betas[-1]!r}; zero SNR needs 1"
    assert_close(after.alpha_bar[:1], before.alpha_bar[:1], f"{name}: alpha_bar_0 after rescaling", atol=1e-15)
    # sqrt(alpha_bar) is shifted and scaled: an affine map of the old curve, which keeps its shape
    old, new = before.alpha_bar.sqrt(), after.alpha_bar.sqrt()
    scale = old[0] / (old[0] - old[-1])
    assert_close(new, (old - old[-1]) * scale, f"{name}: rescaled sqrt(alpha_bar)", atol=1e-14)


def test_cosine_betas_are_capped_at_0_999_and_follow_the_cosine_before_the_cap():
    s = schedule("squaredcos_cap_v2")
    cap = float(torch.tensor(0.999, dtype=torch.float32))                    # stored in float32, as diffusers does
    assert s.betas.max() == cap, f"largest beta {s.betas.max()!r}, expected the cap {cap!r}"
    capped = (s.betas == cap).nonzero().flatten().tolist()
    assert capped == [999], f"capped steps: {capped}; uncapped, the last beta would be 1 and alpha_bar 0"
    # before the cap, alpha_bar_t = f((t + 1) / T) / f(0) with f the cosine (float32 betas: 1e-5)
    T = s.num_timesteps
    f = torch.tensor([cosine_alpha_bar((t + 1) / T) / cosine_alpha_bar(0) for t in range(T - 1)], dtype=torch.float64)
    assert_close(s.alpha_bar[:-1], f, "cosine alpha_bar vs the formula", atol=1e-12, rtol=1e-5)


def test_stable_diffusion_defaults_leave_signal_at_the_last_step():
    s = NoiseSchedule()
    assert (s.num_timesteps, s.beta_schedule, s.prediction_type) == (1000, "scaled_linear", "epsilon")
    # beta_t = (sqrt(0.00085) + t / 999 (sqrt(0.012) - sqrt(0.00085)))^2, alpha_bar = prod (1 - beta)
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    expected = math.prod(1 - (lo + t / 999 * (hi - lo)) ** 2 for t in range(1000))
    assert s.alpha_bar[-1].item() == pytest.approx(expected, rel=1e-5)
    assert round(s.alpha_bar[-1].item(), 4) == 0.0047, s.alpha_bar[-1]
    # so z_(T-1) keeps sqrt(alpha_bar) ~ 7% of z_0: the signal leak that zero terminal SNR removes
    assert 0.06 < s.alpha_bar[-1].sqrt() < 0.07


def test_the_smallest_schedule_has_two_steps():
    s = NoiseSchedule(num_timesteps=2, beta_schedule="linear", beta_start=0.1, beta_end=0.5)
    assert_close(s.alpha_bar, torch.tensor([0.9, 0.45], dtype=torch.float64), "alpha_bar of a 2-step schedule",
                 atol=1e-7)


# ----------------------------------------------------------------------------------------- configuration


def test_stable_diffusion_v1_scheduler_config_is_read_and_unused_keys_are_ignored():
    config = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
              "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
              "clip_sample": False}
    s = NoiseSchedule.from_diffusers_config(config)
    assert (s.num_timesteps, s.steps_offset, s.set_alpha_to_one) == (1000, 1, False), s.to_dict()
    assert_close(s.alpha_bar, NoiseSchedule().alpha_bar, "SD v1's config vs NoiseSchedule()", atol=0)
    assert NoiseSchedule.from_diffusers_config(s.to_dict()).to_dict() == s.to_dict(), "to_dict does not round-trip"


@pytest.mark.parametrize("options, names", [
    (dict(beta_schedule="sigmoid"), BETA_SCHEDULES),
    (dict(prediction_type="v"), PREDICTION_TYPES),
    (dict(prediction_type="eps"), PREDICTION_TYPES),
    (dict(timestep_spacing="uniform"), TIMESTEP_SPACINGS),
])
def test_an_unknown_name_is_a_one_line_value_error_listing_the_known_ones(options, names):
    with pytest.raises(ValueError) as err:
        NoiseSchedule(**options)
    message = str(err.value)
    assert "\n" not in message and repr(next(iter(options.values()))) in message, message
    assert all(name in message for name in names), f"{message!r} does not list {names}"


@pytest.mark.parametrize("num_timesteps", [1, 0, -10])
def test_fewer_than_two_timesteps_is_a_value_error(num_timesteps):
    with pytest.raises(ValueError, match=f"at least 2.*got {num_timesteps}"):
        NoiseSchedule(num_timesteps=num_timesteps)


@pytest.mark.parametrize("key, value", [("thresholding", True), ("trained_betas", [0.001] * 1000),
                                        ("use_exponential_sigmas", True)])
def test_a_diffusers_setting_we_do_not_implement_is_a_value_error_not_a_silent_difference(key, value):
    config = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", key: value}
    with pytest.raises(ValueError, match=f"{key}=.*does not implement") as err:
        NoiseSchedule.from_diffusers_config(config)
    assert "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("start, end", [(0.0, 0.012), (0.012, 0.00085), (0.001, 1.0)])
def test_betas_outside_zero_one_or_in_the_wrong_order_are_refused(start, end):
    with pytest.raises(ValueError, match="0 < beta_start < beta_end < 1"):
        NoiseSchedule(beta_schedule="linear", beta_start=start, beta_end=end)


def test_a_timestep_outside_the_schedule_is_a_value_error_not_an_index_error():
    schedule = NoiseSchedule()
    with pytest.raises(ValueError, match=r"timesteps must be in 0\.\.999; got 0\.\.1000"):
        schedule.q_sample(torch.zeros(2, 4, 2, 2), torch.tensor([0, 1000]), torch.zeros(2, 4, 2, 2))


def test_finite_sigmas_floor_only_the_zero_terminal_snr_end_and_sigma_at_interpolates_them():
    plain, zero = NoiseSchedule(), NoiseSchedule(rescale_betas_zero_snr=True)
    assert torch.equal(plain.finite_sigmas, plain.sigmas)
    assert torch.isinf(zero.sigmas[-1]) and torch.isfinite(zero.finite_sigmas).all()
    assert math.isclose(zero.finite_sigmas[-1].item(), math.sqrt((1 - 2.0 ** -24) / 2.0 ** -24))
    assert torch.equal(zero.finite_sigmas[:-1], zero.sigmas[:-1])
    at = torch.from_numpy(plain.sigma_at([0, 500, 999, 250.5]))
    assert torch.allclose(at[:3], plain.sigmas[[0, 500, 999]], rtol=0, atol=0)
    assert plain.sigmas[250] < at[3] < plain.sigmas[251]
