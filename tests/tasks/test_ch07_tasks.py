"""Chapter 07 exercises: one DDIM step (with eta) and one Euler step in sigma space.

Each test carries its task and points (`minildm grade` adds them up). Inputs are random over several seeds, shapes,
schedules and prediction types, at every step of a run; the invariants the chapter states are checked: with the
exact noise of a single data point, DDIM (eta = 0) lands on that point's noised latent at the next timestep and Euler
on its noised x at the next sigma (both on the point itself at the end); eta > 0 adds fresh noise of variance
sigma_t^2, and eta = 1 is DDPM's posterior step. The z0 / eps conversion the step is given is computed here, so the
tests never wait on chapter 03's exercises, and diffusers and the other samplers' steps may not be called.
"""

from __future__ import annotations

import math

import pytest
import torch
from taskcheck import check_close, fail, forbid

from minildm.ideal_denoiser import IdealDenoiser
from minildm.samplers import make_sampler, sample
from minildm.schedule import NoiseLevel, NoiseSchedule

DDIM_STEP = "ch07.ddim_step"
EULER_STEP = "ch07.euler_step"

FORBIDDEN_DDIM = ("diffusers.schedulers.scheduling_ddim:DDIMScheduler", "minildm.samplers:DDPM.step",
                  "minildm.samplers:PLMS.transfer", "minildm.samplers:DPMSolverPP2M.step")
FORBIDDEN_EULER = ("diffusers.schedulers.scheduling_euler_discrete:EulerDiscreteScheduler",
                   "minildm.samplers:Heun.step", "minildm.samplers:EulerAncestral.step",
                   "minildm.samplers:DPMSolverPP2M.step")


class OwnConversions(NoiseSchedule):
    """A NoiseSchedule whose (z0_hat, eps_hat) from the model's output is worked out here, from alpha_bar alone, so
    a DDIM or Euler step is graded on its own even when chapter 03's conversions are still exercises. t is a
    timestep (DDIM) or a NoiseLevel between them (Euler's sigmas)."""

    def predict_z0_and_eps(self, zt, output, t):
        alpha_bar = float(t.alpha_bar) if isinstance(t, NoiseLevel) else float(self.alpha_bar[int(t)])
        keep, spread = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
        if self.prediction_type == "epsilon":
            return (zt - spread * output) / keep, output
        if self.prediction_type == "sample":
            return output, (zt - keep * output) / spread
        return keep * zt - spread * output, keep * output + spread * zt          # from v


def random_latents(seed: int, shape: tuple[int, ...], count: int = 2, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(count)]


def alpha_bars(sampler, i: int) -> tuple[float, float]:
    """alpha_bar at step i's timestep and at the next chosen one (after the last: 1, or alpha_bar_0)."""
    schedule, t = sampler.schedule, [int(s) for s in sampler.timesteps]
    here = float(schedule.alpha_bar[t[i]])
    if i + 1 < len(t):
        return here, float(schedule.alpha_bar[t[i + 1]])
    return here, 1.0 if schedule.set_alpha_to_one else float(schedule.alpha_bar[0])


def output_for(prediction: str, point: torch.Tensor, eps: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """What a perfect model answers about z_t = sqrt(ab) point + sqrt(1 - ab) eps, in its prediction type."""
    if prediction == "epsilon":
        return eps
    if prediction == "sample":
        return point
    return math.sqrt(alpha_bar) * eps - math.sqrt(1 - alpha_bar) * point                 # v


def step_result(task: str, result, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(result, tuple) and len(result) == 2):
        fail(task, f"{what}: step must return a pair (the next latent, z0_hat); got {type(result).__name__}")
    return result


# ------------------------------------------------------------------------------------------------- ch07.ddim_step

DDIM_CASES = [  # seed, latent shape, steps, schedule settings, eta
    (0, (2, 4, 8, 8), 10, {}, 0.0),
    (1, (3, 4, 5, 3), 7, {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 0.0),
    (2, (1, 3, 4, 4), 12, {"steps_offset": 1, "set_alpha_to_one": False}, 0.5),
    (3, (2, 4, 3, 6), 6, {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}, 1.0),
    (4, (2, 2, 4, 4), 9, {"prediction_type": "sample", "clip_sample": True, "clip_sample_range": 1.5}, 0.3),
]


@pytest.mark.task(DDIM_STEP)
@pytest.mark.points(3)
@pytest.mark.parametrize("seed, shape, steps, settings, eta", DDIM_CASES)
def test_ddim_step_is_the_papers_update_on_random_inputs(monkeypatch, seed, shape, steps, settings, eta):
    schedule = OwnConversions(**settings)
    sampler = make_sampler("ddim", schedule, steps, eta=eta)
    forbid(monkeypatch, DDIM_STEP, *FORBIDDEN_DDIM)
    for i in range(steps):
        z, output = random_latents(seed * 100 + i, shape)
        ab_t, ab_next = alpha_bars(sampler, i)
        z0_want, eps_want = schedule.predict_z0_and_eps(z, output, int(sampler.timesteps[i]))
        if schedule.clip_sample:
            z0_want = z0_want.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
        # the DDIM paper's sigma_t^2 at this eta, then its update with fresh noise drawn as minildm draws it
        variance = eta ** 2 * (1 - ab_next) / (1 - ab_t) * (1 - ab_t / ab_next)
        fresh = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).double()
        expected = (math.sqrt(ab_next) * z0_want + math.sqrt(1 - ab_next - variance) * eps_want
                    + math.sqrt(variance) * fresh * (eta > 0))
        got, z0_hat = step_result(DDIM_STEP, sampler.step(i, z, output, torch.Generator().manual_seed(seed)),
                                  f"DDIM step {i}")
        where = f"DDIM (eta = {eta}, {schedule.prediction_type}) step {i} of {steps} on {shape} latents"
        check_close(got, expected, DDIM_STEP, where, atol=1e-10, rtol=1e-9, dtype=torch.float64)
        check_close(z0_hat, z0_want, DDIM_STEP, f"the z0_hat returned by {where}", atol=1e-10, rtol=1e-9)


@pytest.mark.task(DDIM_STEP)
@pytest.mark.points(2)
@pytest.mark.parametrize("seed, shape, steps, prediction, spacing", [
    (5, (2, 4, 8, 8), 10, "epsilon", "leading"), (6, (3, 4, 3, 5), 13, "v_prediction", "trailing"),
    (7, (1, 1, 6, 6), 4, "epsilon", "linspace")])
def test_ddim_with_the_exact_noise_of_one_point_lands_on_its_noised_latent_at_the_next_timestep(
        monkeypatch, seed, shape, steps, prediction, spacing):
    schedule = OwnConversions(prediction_type=prediction, timestep_spacing=spacing)
    sampler = make_sampler("ddim", schedule, steps)
    forbid(monkeypatch, DDIM_STEP, *FORBIDDEN_DDIM)
    point, eps = random_latents(seed, shape)
    generator = torch.Generator().manual_seed(seed)
    state = generator.get_state()
    for i in range(steps):
        ab_t, ab_next = alpha_bars(sampler, i)
        z = math.sqrt(ab_t) * point + math.sqrt(1 - ab_t) * eps
        got, z0_hat = step_result(DDIM_STEP, sampler.step(i, z, output_for(prediction, point, eps, ab_t), generator),
                                  f"DDIM step {i}")
        # eta = 0 keeps the noise it was given: the same point, the same eps, one noise level lower
        on_path = math.sqrt(ab_next) * point + math.sqrt(1 - ab_next) * eps
        what = "the data point itself" if ab_next == 1 else "the point's noised latent at the next timestep"
        check_close(got, on_path, DDIM_STEP, f"DDIM (eta = 0, {prediction}) step {i} of {steps} with the exact "
                    f"{prediction} of one point: expected {what}", atol=1e-10, rtol=1e-9)
        check_close(z0_hat, point, DDIM_STEP, f"the z0_hat of DDIM step {i} with the exact {prediction}",
                    atol=1e-10, rtol=1e-9)
    if not torch.equal(generator.get_state(), state):
        fail(DDIM_STEP, "DDIM with eta = 0 drew random numbers from the generator; it is deterministic and must "
                        "draw none (other samplers sharing the generator would change)")


@pytest.mark.task(DDIM_STEP)
@pytest.mark.points(2)
@pytest.mark.parametrize("seed, eta, steps, i", [(8, 1.0, 10, 3), (9, 0.4, 25, 20), (10, 0.8, 5, 0)])
def test_ddim_with_eta_adds_fresh_noise_of_variance_sigma_t_squared(monkeypatch, seed, eta, steps, i):
    schedule = OwnConversions()
    sampler = make_sampler("ddim", schedule, steps, eta=eta)
    forbid(monkeypatch, DDIM_STEP, *FORBIDDEN_DDIM)
    n = 20_000
    z, output = (x.expand(n, -1, -1, -1) for x in random_latents(seed, (1, 2, 2, 2)))      # one latent, n copies
    first, _ = step_result(DDIM_STEP, sampler.step(i, z, output, torch.Generator().manual_seed(seed)), "DDIM step")
    second, _ = step_result(DDIM_STEP, sampler.step(i, z, output, torch.Generator().manual_seed(seed + 1)),
                            "DDIM step")
    ab_t, ab_next = alpha_bars(sampler, i)
    variance = eta ** 2 * (1 - ab_next) / (1 - ab_t) * (1 - ab_t / ab_next)
    # two draws differ only by their noise: first - second = sigma_t (n1 - n2), of variance 2 sigma_t^2
    measured = ((first - second).double().var(dim=0) / 2).flatten()                            # (8,)
    ratio = measured / variance
    limit = 5 * math.sqrt(2 / n)
    if not ((ratio - 1).abs() < limit).all():
        fail(DDIM_STEP, f"eta = {eta}, step {i} of {steps}: the fresh noise's variance / sigma_t^2 ranges over "
                        f"[{ratio.min():.3f}, {ratio.max():.3f}] over {n:,} draws; expected 1 within {limit:.3f} "
                        f"(sigma_t^2 = {variance:.4g})")
    again, _ = step_result(DDIM_STEP, sampler.step(i, z, output, torch.Generator().manual_seed(seed)), "DDIM step")
    check_close(again, first, DDIM_STEP, "a second step with a generator of the same seed", atol=0, rtol=0)


@pytest.mark.task(DDIM_STEP)
@pytest.mark.points(1)
@pytest.mark.parametrize("seed, steps", [(11, 8), (12, 20)])
def test_ddim_with_eta_one_is_ddpms_posterior_step(monkeypatch, seed, steps):
    # Song et al.: at eta = 1, sigma_t^2 is the posterior variance and the mean is the posterior mean
    schedule = OwnConversions()
    ddpm, ddim = make_sampler("ddpm", schedule, steps), make_sampler("ddim", schedule, steps, eta=1.0)
    inputs = [random_latents(seed * 100 + i, (2, 4, 4, 4)) for i in range(steps)]
    expected = [ddpm.step(i, z, output, torch.Generator().manual_seed(i))[0] for i, (z, output) in enumerate(inputs)]
    forbid(monkeypatch, DDIM_STEP, *FORBIDDEN_DDIM)
    for i, (z, output) in enumerate(inputs):
        got, _ = step_result(DDIM_STEP, ddim.step(i, z, output, torch.Generator().manual_seed(i)), f"DDIM step {i}")
        check_close(got, expected[i], DDIM_STEP, f"DDIM (eta = 1) step {i} of {steps} against DDPM's posterior "
                    "step with the same generator", atol=1e-9, rtol=1e-8)


# ------------------------------------------------------------------------------------------------ ch07.euler_step

EULER_CASES = [  # seed, latent shape, steps, schedule settings
    (0, (2, 4, 8, 8), 10, {}),
    (1, (3, 4, 3, 5), 7, {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    (2, (1, 3, 4, 4), 12, {"timestep_spacing": "linspace", "use_karras_sigmas": True}),
    (3, (2, 2, 5, 5), 6, {"prediction_type": "sample", "beta_schedule": "linear", "beta_start": 1e-4,
                          "beta_end": 0.02}),
    (4, (2, 4, 4, 4), 9, {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                          "timestep_spacing": "trailing"}),
]


def denoised_by_hand(prediction: str, x: torch.Tensor, output: torch.Tensor, sigma: float) -> torch.Tensor:
    """z0_hat at noise level sigma, x = z_0 + sigma eps (the model saw z_t = x / sqrt(sigma^2 + 1))."""
    if prediction == "epsilon":
        return x - sigma * output
    if prediction == "sample":
        return output
    scale = 1 / math.sqrt(sigma ** 2 + 1)                          # sqrt(alpha_bar)
    return scale * (scale * x) - sigma * scale * output             # sqrt(ab) z_t - sqrt(1 - ab) v


@pytest.mark.task(EULER_STEP)
@pytest.mark.points(3)
@pytest.mark.parametrize("seed, shape, steps, settings", EULER_CASES)
def test_euler_step_follows_the_ode_slope_on_random_inputs(monkeypatch, seed, shape, steps, settings):
    schedule = OwnConversions(**settings)
    sampler = make_sampler("euler", schedule, steps)
    forbid(monkeypatch, EULER_STEP, *FORBIDDEN_EULER)
    sigmas = [float(s) for s in sampler.sigmas]
    for i in range(steps):
        x, output = random_latents(seed * 100 + i, shape)
        x = x * math.sqrt(sigmas[i] ** 2 + 1)                       # on the sigma scale, as the loop keeps it
        z0_want = denoised_by_hand(schedule.prediction_type, x, output, sigmas[i])
        # dx / dsigma = (x - z0_hat) / sigma, taken from sigma_i to sigma_{i+1}
        slope = (x - z0_want) / sigmas[i]
        expected = x + (sigmas[i + 1] - sigmas[i]) * slope
        got, z0_hat = step_result(EULER_STEP, sampler.step(i, x, output, None), f"Euler step {i}")
        where = f"Euler ({schedule.prediction_type}) step {i} of {steps}, sigma {sigmas[i]:.4g} -> {sigmas[i + 1]:.4g}"
        check_close(got, expected, EULER_STEP, where, atol=1e-9, rtol=1e-9, dtype=torch.float64)
        check_close(z0_hat, z0_want, EULER_STEP, f"the z0_hat returned by {where}", atol=1e-9, rtol=1e-9)


@pytest.mark.task(EULER_STEP)
@pytest.mark.points(2)
@pytest.mark.parametrize("seed, shape, steps, prediction, karras", [
    (5, (2, 4, 8, 8), 10, "epsilon", False), (6, (3, 4, 3, 5), 13, "v_prediction", True),
    (7, (1, 1, 6, 6), 4, "epsilon", True)])
def test_euler_with_the_exact_noise_of_one_point_stays_on_its_path_and_ends_on_it(monkeypatch, seed, shape, steps,
                                                                                   prediction, karras):
    schedule = OwnConversions(prediction_type=prediction, use_karras_sigmas=karras)
    sampler = make_sampler("euler", schedule, steps)
    forbid(monkeypatch, EULER_STEP, *FORBIDDEN_EULER)
    point, eps = random_latents(seed, shape)
    sigmas = [float(s) for s in sampler.sigmas]
    for i in range(steps):
        x = point + sigmas[i] * eps
        output = output_for(prediction, point, eps, 1 / (1 + sigmas[i] ** 2))
        got, z0_hat = step_result(EULER_STEP, sampler.step(i, x, output, None), f"Euler step {i}")
        # the exact eps makes the slope eps itself: x moves along z_0 + sigma eps, to sigma_next (0 at the end)
        what = "the data point itself" if sigmas[i + 1] == 0 else "the point's x at the next sigma"
        check_close(got, point + sigmas[i + 1] * eps, EULER_STEP, f"Euler ({prediction}) step {i} of {steps} with "
                    f"the exact {prediction} of one point: expected {what}", atol=1e-10, rtol=1e-9)
        check_close(z0_hat, point, EULER_STEP, f"the z0_hat of Euler step {i} with the exact {prediction}",
                    atol=1e-10, rtol=1e-9)


@pytest.mark.task(EULER_STEP)
@pytest.mark.points(1)
@pytest.mark.parametrize("seed, spacing", [(8, "leading"), (9, "linspace")])
def test_a_whole_euler_run_with_the_ideal_denoiser_of_one_point_ends_on_it(monkeypatch, seed, spacing):
    schedule = OwnConversions(timestep_spacing=spacing)
    point, noise = random_latents(seed, (1, 4, 4, 4))
    forbid(monkeypatch, EULER_STEP, *FORBIDDEN_EULER)
    z = sample(IdealDenoiser(point, schedule), noise.expand(3, -1, -1, -1), make_sampler("euler", schedule, 8))
    check_close(z, point.expand(3, -1, -1, -1), EULER_STEP, f"8 Euler steps ({spacing} spacing) with the ideal "
                "denoiser of one point, from 3 noises", atol=1e-8, rtol=1e-8)
