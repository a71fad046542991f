"""Chapter 03 exercises: the forward process in one jump (q_sample) and its inverse given the noise (eps_to_z0).

Each test carries its task and points (`minildm grade` adds them up). Inputs are random over several seeds, shapes
and schedules, with one timestep per item; the invariants the chapter states are checked (no noise leaves
sqrt(alpha_bar_t) z_0, many draws have the closed form's mean and variance, a noise guess that is off by d moves
z0_hat by sigma_t d). The tests of one task never call the other, and the expected values are built here from
`alpha_bar` alone, so each task is graded on its own. diffusers may not be called.
"""

from __future__ import annotations

import math

import pytest
import torch
from taskcheck import check_close, fail, forbid

from minildm.schedule import NoiseSchedule

Q_SAMPLE = "ch03.q_sample"
EPS_TO_Z0 = "ch03.eps_to_z0"

FORBIDDEN = ("diffusers.schedulers.scheduling_ddpm:DDPMScheduler",)
SCHEDULES = {
    "sd_v1": dict(),
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
    "zero_snr": dict(rescale_betas_zero_snr=True),
}


def draw(seed: int, shape: tuple[int, ...], dtype=torch.float64, last: int = 1000):
    """z_0, eps of `shape`, and one timestep per item in [0, last) with both ends of the range included."""
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    eps = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    t = torch.randint(0, last, (shape[0],), generator=g)
    t[0], t[-1] = 0, last - 1
    return z0, eps, t


def signal_and_noise_scales(schedule: NoiseSchedule, t: torch.Tensor, ndim: int):
    """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) per item, shaped to broadcast over the other ndim - 1 axes."""
    alpha_bar = schedule.alpha_bar[t].reshape((-1,) + (1,) * (ndim - 1))
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


def noised_by_hand(schedule: NoiseSchedule, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    keep, spread = signal_and_noise_scales(schedule, t, z0.ndim)
    return keep * z0.double() + spread * eps.double()


# ----------------------------------------------------------------------------------------------- ch03.q_sample


@pytest.mark.task(Q_SAMPLE)
@pytest.mark.points(3)
@pytest.mark.parametrize("seed, shape, name", [(0, (3, 4, 8, 8), "sd_v1"), (1, (5, 4, 3, 7), "linear"),
                                               (2, (2, 1, 6, 6), "cosine"), (3, (4, 3, 2, 5), "zero_snr")])
def test_q_sample_is_the_closed_form_with_one_timestep_per_item(monkeypatch, seed, shape, name):
    schedule = NoiseSchedule(**SCHEDULES[name])
    z0, eps, t = draw(seed, shape)
    forbid(monkeypatch, Q_SAMPLE, *FORBIDDEN)
    check_close(schedule.q_sample(z0, t, eps), noised_by_hand(schedule, z0, eps, t), Q_SAMPLE,
                f"q_sample on {shape} latents ({name} schedule, t = {t.tolist()})", atol=1e-12, rtol=1e-12,
                dtype=torch.float64)


@pytest.mark.task(Q_SAMPLE)
@pytest.mark.points(1)
@pytest.mark.parametrize("seed", [4, 5])
def test_q_sample_without_noise_is_the_scaled_clean_latent_and_without_signal_the_scaled_noise(monkeypatch, seed):
    schedule = NoiseSchedule()
    z0, eps, t = draw(seed, (4, 4, 5, 5))
    keep, spread = signal_and_noise_scales(schedule, t, 4)
    forbid(monkeypatch, Q_SAMPLE, *FORBIDDEN)
    check_close(schedule.q_sample(z0, t, torch.zeros_like(z0)), keep * z0, Q_SAMPLE,
                f"q_sample(z0, t, noise=0) at t = {t.tolist()}", atol=1e-14, rtol=1e-12)
    check_close(schedule.q_sample(torch.zeros_like(eps), t, eps), spread * eps, Q_SAMPLE,
                f"q_sample(0, t, noise) at t = {t.tolist()}", atol=1e-14, rtol=1e-12)


@pytest.mark.task(Q_SAMPLE)
@pytest.mark.points(2)
@pytest.mark.parametrize("t", [30, 400, 900])
def test_q_sample_draws_have_the_closed_form_mean_and_variance(monkeypatch, t):
    schedule = NoiseSchedule()
    g = torch.Generator().manual_seed(t)
    n = 20_000
    z0 = torch.randn(1, 4, 2, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(n, 4, 2, 2, generator=g, dtype=torch.float64)
    forbid(monkeypatch, Q_SAMPLE, *FORBIDDEN)
    zt = schedule.q_sample(z0.expand(n, -1, -1, -1), t, noise)                 # one t for all n items
    if not isinstance(zt, torch.Tensor) or zt.shape != (n, 4, 2, 2):
        fail(Q_SAMPLE, f"q_sample of {n:,} latents of shape (4, 2, 2) returned "
                       f"{tuple(zt.shape) if isinstance(zt, torch.Tensor) else type(zt).__name__}")
    alpha_bar = schedule.alpha_bar[t]
    # mean sqrt(alpha_bar_t) z_0 (standard error sqrt(var / n)), variance 1 - alpha_bar_t (about var sqrt(2 / n))
    error = ((zt.mean(0) - alpha_bar.sqrt() * z0[0]).abs() / ((1 - alpha_bar) / n).sqrt()).max()
    if error > 5:
        fail(Q_SAMPLE, f"t={t}: the mean of {n:,} draws is {error:.1f} standard errors from sqrt(alpha_bar_t) z_0")
    ratio = zt.var(0) / (1 - alpha_bar)
    if not ((ratio - 1).abs() < 5 * math.sqrt(2 / n)).all():
        fail(Q_SAMPLE, f"t={t}: the variance of {n:,} draws / (1 - alpha_bar_t) ranges over [{ratio.min():.3f}, "
                       f"{ratio.max():.3f}]; expected 1 within {5 * math.sqrt(2 / n):.3f}")


@pytest.mark.task(Q_SAMPLE)
@pytest.mark.points(2)
def test_q_sample_takes_one_t_for_all_items_or_one_per_item(monkeypatch):
    schedule = NoiseSchedule(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    z0, eps, _ = draw(6, (4, 2, 3, 3))
    forbid(monkeypatch, Q_SAMPLE, *FORBIDDEN)
    for t in (0, 17, 999):
        expected = noised_by_hand(schedule, z0, eps, torch.full((4,), t))
        check_close(schedule.q_sample(z0, t, eps), expected, Q_SAMPLE, f"q_sample with t = {t} (a Python int)",
                    atol=1e-12)
        check_close(schedule.q_sample(z0, torch.tensor(t), eps), expected, Q_SAMPLE,
                    f"q_sample with t = torch.tensor({t}) (0-d)", atol=1e-12)
    t = torch.tensor([999, 3, 500, 0])
    batched = schedule.q_sample(z0, t, eps)
    for i, step in enumerate(t.tolist()):
        check_close(batched[i], noised_by_hand(schedule, z0[i : i + 1], eps[i : i + 1], t[i : i + 1])[0], Q_SAMPLE,
                    f"item {i} of a batch with t = {t.tolist()} (it has t = {step})", atol=1e-12)


@pytest.mark.task(Q_SAMPLE)
@pytest.mark.points(1)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_q_sample_keeps_the_dtype_and_at_zero_terminal_snr_ends_in_pure_noise(monkeypatch, dtype):
    schedule = NoiseSchedule(rescale_betas_zero_snr=True)
    z0, eps, t = draw(7, (3, 4, 4, 4), dtype)
    forbid(monkeypatch, Q_SAMPLE, *FORBIDDEN)
    zt = schedule.q_sample(z0, t, eps)
    check_close(zt, noised_by_hand(schedule, z0, eps, t).to(dtype), Q_SAMPLE, f"q_sample on {dtype} latents",
                atol=1e-5 if dtype == torch.float32 else 1e-12, dtype=dtype)
    last = torch.full((3,), schedule.num_timesteps - 1)
    check_close(schedule.q_sample(z0, last, eps), eps, Q_SAMPLE,
                "q_sample at the last step of a zero-terminal-SNR schedule (alpha_bar = 0: only noise is left)",
                atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- ch03.eps_to_z0


@pytest.mark.task(EPS_TO_Z0)
@pytest.mark.points(3)
@pytest.mark.parametrize("seed, shape, name", [(0, (3, 4, 8, 8), "sd_v1"), (1, (5, 4, 3, 7), "linear"),
                                               (2, (2, 1, 6, 6), "cosine"), (3, (4, 3, 2, 5), "zero_snr")])
def test_eps_to_z0_undoes_the_forward_process_given_its_noise(monkeypatch, seed, shape, name):
    schedule = NoiseSchedule(**SCHEDULES[name])
    last = schedule.num_timesteps - (1 if schedule.rescale_betas_zero_snr else 0)      # at SNR = 0, nothing is left
    z0, eps, t = draw(seed, shape, last=last)
    zt = noised_by_hand(schedule, z0, eps, t)
    forbid(monkeypatch, EPS_TO_Z0, *FORBIDDEN)
    # near the end of the cosine schedule sqrt(alpha_bar) ~ 1e-4 divides the result, so allow 1e-9
    check_close(schedule.eps_to_z0(zt, eps, t), z0, EPS_TO_Z0,
                f"eps_to_z0 of {shape} latents ({name} schedule, t = {t.tolist()})", atol=1e-9, rtol=1e-9,
                dtype=torch.float64)


@pytest.mark.task(EPS_TO_Z0)
@pytest.mark.points(2)
def test_eps_to_z0_is_exact_at_every_timestep_of_the_schedule(monkeypatch):
    schedule = NoiseSchedule()
    T = schedule.num_timesteps
    z0, eps, _ = draw(8, (T, 2, 2, 2))
    t = torch.arange(T)                                                        # one item per timestep
    zt = noised_by_hand(schedule, z0, eps, t)
    forbid(monkeypatch, EPS_TO_Z0, *FORBIDDEN)
    check_close(schedule.eps_to_z0(zt, eps, t), z0, EPS_TO_Z0, "eps_to_z0 with t = 0, 1, ..., 999 (one per item)",
                atol=1e-11, rtol=1e-11)


@pytest.mark.task(EPS_TO_Z0)
@pytest.mark.points(2)
@pytest.mark.parametrize("seed", [9, 10])
def test_a_noise_guess_off_by_d_moves_z0_hat_by_minus_sigma_t_times_d(monkeypatch, seed):
    schedule = NoiseSchedule()
    z0, eps, t = draw(seed, (4, 4, 3, 3), last=990)
    zt = noised_by_hand(schedule, z0, eps, t)
    d = 0.1 * torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    # z0_hat - z_0 = -sqrt(1 - alpha_bar) / sqrt(alpha_bar) d = -sigma_t d: an error in eps costs sigma_t times more
    sigma = schedule.sigmas[t].view(-1, 1, 1, 1)
    forbid(monkeypatch, EPS_TO_Z0, *FORBIDDEN)
    check_close(schedule.eps_to_z0(zt, eps + d, t), z0 - sigma * d, EPS_TO_Z0,
                f"eps_to_z0 with the noise off by d, at t = {t.tolist()}", atol=1e-10, rtol=1e-10)


@pytest.mark.task(EPS_TO_Z0)
@pytest.mark.points(1)
@pytest.mark.parametrize("t", [0, 250, torch.tensor(600)])
def test_eps_to_z0_takes_one_t_for_all_items_and_keeps_float32(monkeypatch, t):
    schedule = NoiseSchedule()
    z0, eps, _ = draw(11, (3, 4, 8, 8), torch.float32)
    zt = noised_by_hand(schedule, z0, eps, torch.full((3,), int(t))).float()
    forbid(monkeypatch, EPS_TO_Z0, *FORBIDDEN)
    check_close(schedule.eps_to_z0(zt, eps, t), z0, EPS_TO_Z0, f"eps_to_z0 of float32 latents with t = {t!r}",
                atol=1e-4, rtol=1e-4, dtype=torch.float32)
