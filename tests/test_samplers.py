"""The samplers' identities (chapter 07): what each one must do whatever diffusers does, and its errors."""

from __future__ import annotations

import math

import pytest
import torch

from minildm import samplers
from minildm.ideal_denoiser import IdealDenoiser
from minildm.samplers import SAMPLERS, ancestral_split, ddim_invert, karras_sigmas, make_sampler, sample
from minildm.schedule import NoiseLevel, NoiseSchedule

DETERMINISTIC = ["ddim", "plms", "euler", "heun", "dpmpp_2m"]


def latents(k: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(k, 4, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def smooth_model(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth, fixed eps-predictor: DDIM inversion is accurate for it with small steps."""
    return 0.3 * torch.tanh(z) * (1 + t.view(-1, 1, 1, 1) / 1000)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("prediction, spacing", [("epsilon", "leading"), ("v_prediction", "trailing"),
                                                 ("epsilon", "linspace")])
def test_a_deterministic_sampler_lands_exactly_on_the_only_data_point(name, prediction, spacing):
    # with one data point y, the ideal denoiser knows z_0 = y exactly; every step must keep that
    schedule = NoiseSchedule(prediction_type=prediction, timestep_spacing=spacing)
    y = latents(1)
    noise = latents(3, seed=1)
    z = sample(IdealDenoiser(y, schedule), noise, make_sampler(name, schedule, 7))
    error = (z - y).abs().max().item()
    assert error < 2e-5, f"{name} ({prediction}, {spacing}) ends {error:.2e} from the data point"


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_ends_on_a_training_latent_of_the_ideal_denoiser(name):
    schedule = NoiseSchedule()
    data = latents(5)
    z = sample(IdealDenoiser(data, schedule), latents(6, seed=1), make_sampler(name, schedule, 20),
               generator=torch.Generator().manual_seed(2))
    nearest = torch.cdist(z.flatten(1), data.flatten(1)).min(dim=1).values
    assert nearest.max() < 1e-3 * data.flatten(1).norm(dim=1).mean(), (name, nearest.tolist())


def test_ddim_with_eta_one_over_all_T_steps_is_ddpm():
    # DDIM's sigma_t at eta = 1 is DDPM's posterior variance, and its mean is then the posterior mean:
    # with the same noise drawn in the same order, the two samplers agree step by step (so in distribution too)
    schedule = NoiseSchedule(num_timesteps=100, beta_schedule="linear", beta_start=1e-3, beta_end=0.1)
    model = IdealDenoiser(latents(3, dtype=torch.float64), schedule)
    noise = latents(8, seed=4, dtype=torch.float64)
    ddpm = sample(model, noise, make_sampler("ddpm", schedule, 100), generator=torch.Generator().manual_seed(5))
    ddim = sample(model, noise, make_sampler("ddim", schedule, 100, eta=1.0),
                  generator=torch.Generator().manual_seed(5))
    assert relative(ddim, ddpm) < 1e-9


def test_ddim_with_eta_zero_is_deterministic_and_draws_no_noise():
    schedule = NoiseSchedule()
    generator = torch.Generator().manual_seed(9)
    state = generator.get_state()
    first = sample(smooth_model, latents(2), make_sampler("ddim", schedule, 10), generator=generator)
    second = sample(smooth_model, latents(2), make_sampler("ddim", schedule, 10))
    assert torch.equal(first, second)
    assert torch.equal(generator.get_state(), state), "eta = 0 must not consume random numbers"


def test_euler_is_ddim_and_euler_ancestral_is_ddpm_for_an_eps_model():
    # in sigma space DDIM(eta=0) is exactly an Euler step, and Euler ancestral's sigma_up is DDPM's posterior std
    schedule = NoiseSchedule()
    noise = latents(2, seed=3)
    pairs = {("ddim", "euler"): None, ("ddpm", "euler_a"): torch.Generator}
    for (a, b), make_generator in pairs.items():
        za = sample(smooth_model, noise, make_sampler(a, schedule, 12),
                    generator=make_generator().manual_seed(1) if make_generator else None)
        zb = sample(smooth_model, noise, make_sampler(b, schedule, 12),
                    generator=make_generator().manual_seed(1) if make_generator else None)
        assert relative(zb, za) < 1e-5, (a, b, relative(zb, za))


@pytest.mark.parametrize("steps, limit", [(50, 0.02), (200, 0.005)])
def test_ddim_inversion_recovers_the_starting_noise(steps, limit):
    schedule = NoiseSchedule()
    sampler = make_sampler("ddim", schedule, steps)
    noise = latents(2, seed=6)
    z0 = sample(smooth_model, noise, sampler)
    back = ddim_invert(smooth_model, z0, sampler)
    assert relative(back, noise) < limit, f"{steps} steps: inversion error {relative(back, noise):.4f}"


def test_the_callback_sees_every_model_evaluation_in_order():
    schedule = NoiseSchedule()
    for name in SAMPLERS:
        sampler = make_sampler(name, schedule, 6)
        steps = []
        sample(smooth_model, latents(2), sampler, callback=steps.append, generator=torch.Generator().manual_seed(0))
        assert [s.index for s in steps] == list(range(len(sampler.timesteps))), name
        assert [s.t for s in steps] == [float(t) for t in sampler.timesteps], name
        assert all(s.zt.shape == s.output.shape == s.z0_hat.shape == (2, 4, 4, 4) for s in steps), name


def test_evaluation_counts_plms_n_plus_one_heun_two_per_step_but_the_last():
    schedule = NoiseSchedule()
    assert len(make_sampler("plms", schedule, 10).timesteps) == 11
    assert len(make_sampler("heun", schedule, 10).timesteps) == 19
    assert all(len(make_sampler(n, schedule, 10).timesteps) == 10 for n in ("ddpm", "ddim", "euler", "euler_a",
                                                                            "dpmpp_2m"))


def test_karras_sigmas_fall_from_sigma_max_to_sigma_min_evenly_in_the_seventh_root():
    sigmas = torch.from_numpy(karras_sigmas(0.03, 14.6, 10))
    assert math.isclose(sigmas[0], 14.6) and math.isclose(sigmas[-1], 0.03)
    roots = sigmas ** (1 / 7)
    assert torch.allclose(roots.diff(), roots.diff()[:1].expand(9), atol=1e-12)


def test_img2img_strength_zero_returns_the_image_and_strength_skips_steps():
    schedule = NoiseSchedule()
    init, noise = latents(1), latents(1, seed=1)
    sampler = make_sampler("ddim", schedule, 20)
    assert torch.equal(sample(smooth_model, noise, sampler, init=init, strength=0.0), init)
    seen = []
    sample(smooth_model, noise, sampler, init=init, strength=0.6, callback=seen.append)
    assert [s.index for s in seen] == list(range(8, 20))                    # 12 of the 20 steps
    assert seen[0].t == float(sampler.timesteps[8])


# -------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call, message", [
    (lambda s: make_sampler("dpm++", s, 10), "choose one of ddpm, ddim, plms, euler, euler_a, heun, dpmpp_2m"),
    (lambda s: make_sampler("ddim", s, 0), "from 1 to 1000"),
    (lambda s: make_sampler("ddim", s, 1001), "from 1 to 1000"),
    (lambda s: make_sampler("euler", s, 2.5), "from 1 to 1000"),
    (lambda s: make_sampler("ddim", s, 10, eta=0.5, gamma=1), "ddim has no option gamma; it takes eta, "
                                                              "timestep_spacing"),
    (lambda s: make_sampler("euler", s, 10, eta=0.5), "euler has no option eta; it takes use_karras_sigmas, "
                                                      "timestep_spacing"),
    (lambda s: make_sampler("ddim", s, 10, eta=-0.1), "eta must be a number >= 0"),
    (lambda s: make_sampler("ddim", s, 10, eta=math.nan), "eta must be a number >= 0"),
    (lambda s: make_sampler("ddpm", s, 10, variance_type="learned"), "unknown variance_type 'learned'; choose one "
                                                                     "of fixed_small, fixed_large"),
    (lambda s: make_sampler("ddim", s, 10, timestep_spacing="uniform"), "unknown timestep spacing"),
    (lambda s: sample(smooth_model, latents(1), make_sampler("ddim", s, 10), init=latents(1), strength=1.5),
     "strength must be in"),
    (lambda s: ddim_invert(smooth_model, latents(1), make_sampler("ddim", s, 10, eta=1.0)), "deterministic"),
    (lambda s: make_sampler("plms", NoiseSchedule(prediction_type="sample"), 10), "eps or v"),
    (lambda s: sample(smooth_model, latents(1), make_sampler("plms", s, 10), init=latents(1), strength=0.8),
     "plms cannot start part-way"),
    (lambda s: make_sampler("ddim", NoiseSchedule(rescale_betas_zero_snr=True, timestep_spacing="trailing"), 10),
     "zero terminal SNR"),
])
def test_bad_input_is_a_one_line_value_error_that_says_what_to_do(call, message):
    with pytest.raises(ValueError, match=message) as err:
        call(NoiseSchedule())
    assert "\n" not in str(err.value)


def breaks_at_step_three(z, t):
    return torch.full_like(z, math.nan) if t[0] < 700 else 0.1 * z


def test_a_non_finite_model_output_stops_with_the_step_and_timestep():
    seen = []
    with pytest.raises(FloatingPointError, match=r"step 3 \(t = 601\)") as err:
        sample(breaks_at_step_three, latents(1), make_sampler("ddim", NoiseSchedule(steps_offset=1), 10),
               callback=seen.append)
    assert "\n" not in str(err.value)
    assert len(seen) == 3, f"on the CPU the run stops at the bad step; the callback saw {len(seen)} steps"


def test_off_the_cpu_the_finiteness_check_is_read_once_at_the_end_and_names_the_first_bad_step(monkeypatch):
    # on a GPU, reading the check every step would make the host wait for the device; the deferred path is the
    # one a GPU takes, exercised here on the CPU
    monkeypatch.setattr(samplers, "checks_each_step", lambda device: False)
    seen = []
    with pytest.raises(FloatingPointError, match=r"step 3 \(t = 601\)"):
        sample(breaks_at_step_three, latents(1), make_sampler("ddim", NoiseSchedule(steps_offset=1), 10),
               callback=seen.append)
    assert len(seen) == 10, f"the deferred check runs every step before it reports; the callback saw {len(seen)}"
    finite = sample(smooth_model, latents(1), make_sampler("ddim", NoiseSchedule(), 10))
    assert torch.isfinite(finite).all()


# ----------------------------------------------------------------------------------------- the options


@pytest.mark.parametrize("name, options", [
    ("ddpm", {"variance_type": "fixed_large"}), ("ddim", {"eta": 0.3}), ("plms", {"timestep_spacing": "trailing"}),
    ("euler", {"use_karras_sigmas": True}), ("euler_a", {"timestep_spacing": "linspace"}),
    ("heun", {"use_karras_sigmas": True, "timestep_spacing": "trailing"}), ("dpmpp_2m", {"use_karras_sigmas": True})])
def test_each_option_a_sampler_is_given_is_an_attribute_it_keeps(name, options):
    sampler = make_sampler(name, NoiseSchedule(), 10, **options)
    kept = {key: getattr(sampler, "spacing" if key == "timestep_spacing" else key) for key in options}
    assert kept == options, f"{name}: given {options}, keeps {kept}"


def test_options_left_out_take_the_defaults_and_the_schedules_settings():
    schedule = NoiseSchedule(timestep_spacing="trailing", use_karras_sigmas=True)
    assert make_sampler("ddim", schedule, 10).eta == 0.0
    assert make_sampler("ddpm", schedule, 10).variance_type == "fixed_small"
    assert make_sampler("euler", schedule, 10).use_karras_sigmas is True
    assert make_sampler("euler", schedule, 10, use_karras_sigmas=False).use_karras_sigmas is False
    assert make_sampler("dpmpp_2m", schedule, 10).spacing == "trailing"


# ------------------------------------------------------------------------------------ the shared helpers


@pytest.mark.parametrize("sigma, sigma_next", [(14.6, 8.3), (1.0, 0.5), (0.3, 0.0)])
def test_the_ancestral_split_lands_back_on_sigma_next(sigma, sigma_next):
    sigma_up, sigma_down = ancestral_split(sigma, sigma_next)
    assert math.isclose(sigma_up ** 2 + sigma_down ** 2, sigma_next ** 2, abs_tol=1e-12)
    assert 0 <= sigma_up <= sigma_next and 0 <= sigma_down <= sigma_next
    # sigma_up^2 is DDPM's posterior variance on the x scale: sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2
    assert math.isclose(sigma_up ** 2, sigma_next ** 2 * (1 - sigma_next ** 2 / sigma ** 2), abs_tol=1e-12)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_sigma_space_denoising_is_the_schedules_conversion_at_the_same_level(prediction):
    # Euler's z0_hat at sigma_t equals the schedule's z0_hat at timestep t, whatever the model predicts
    schedule = NoiseSchedule(prediction_type=prediction)
    euler = make_sampler("euler", schedule, 10, timestep_spacing="trailing")
    z0, eps = latents(2, dtype=torch.float64), latents(2, seed=1, dtype=torch.float64)
    for i, t in enumerate(int(t) for t in euler.timesteps):
        sigma = float(euler.sigmas[i])
        zt = schedule.q_sample(z0, t, eps)
        output = schedule.training_target(z0, eps, t)
        got = euler.denoised(zt * math.sqrt(1 + sigma ** 2), output, sigma)
        want, _ = schedule.predict_z0_and_eps(zt, output, t)
        assert torch.allclose(got, want, atol=1e-9, rtol=1e-9), (prediction, t, (got - want).abs().max().item())
        level = NoiseLevel.from_sigma(sigma)
        assert math.isclose(level.alpha_bar, float(schedule.alpha_bar[t]), rel_tol=1e-12), (t, level)
