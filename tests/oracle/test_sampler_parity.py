"""Every sampler equals its diffusers scheduler: same config, same model function, same starting noise and the same
per-step noise; timesteps identical and final latents within 1e-4 relative. diffusers runs at test time.

What the match rests on besides the papers' formulas (chapter 07, "Matching diffusers", explains each): timesteps
computed in numpy, Euler's linspace timesteps kept fractional in float32; DDPM's last step aiming at alpha_bar = 1
whatever set_alpha_to_one says, its variance floored at 1e-20; Euler's starting noise sqrt(sigma_max^2 + 1) on
leading timesteps; Euler ancestral drawing noise on its last step too; alpha_bar = 2^-24 in place of 0 for the
sigma-space samplers at zero terminal SNR; DPM++(2M)'s N + 1 points with the last dropped and its Karras sigmas over
the whole schedule, rounded except on the cosine schedule.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from minildm.samplers import make_sampler, sample
from minildm.schedule import NoiseSchedule

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.oracle

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "timestep_spacing": "leading",
      "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}
LINEAR = {"beta_schedule": "linear", "timestep_spacing": "trailing"}
COSINE = {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "leading"}
ZERO_SNR = {**SD, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "steps_offset": 0}
LINSPACE = {**SD, "timestep_spacing": "linspace", "steps_offset": 0}

# (our name, diffusers class, extra diffusers config, our options, diffusers step kwargs)
SAMPLERS = {
    "ddpm": ("DDPMScheduler", {}, {}, {}),
    "ddim": ("DDIMScheduler", {}, {}, {}),
    "ddim_eta": ("DDIMScheduler", {}, {"eta": 0.7}, {"eta": 0.7}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}, {}, {}),
    "euler": ("EulerDiscreteScheduler", {}, {}, {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, {}, {}),
    "heun": ("HeunDiscreteScheduler", {}, {}, {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, {}, {}),
}
KARRAS = ("euler", "heun", "dpmpp_2m")

CASES = []
for name in SAMPLERS:
    sampler = name.split("_eta")[0]
    configs = [("sd", SD, 10), ("sd", SD, 25), ("linear", LINEAR, 20), ("cosine", COSINE, 12)]
    if sampler not in ("ddim", "plms"):
        # diffusers' DDIM and PLMS step from t to t - T // N, ours to the next chosen timestep: the same only when
        # the timesteps are evenly spaced, which linspace's 15 (999 / 14 apart, rounded) are not
        configs += [("linspace", LINSPACE, 15)]
    if sampler != "plms":                          # PNDM has no zero-terminal-SNR support worth comparing
        configs += [("zero_snr", ZERO_SNR, 10)]
    for label, config, steps in configs:
        for prediction in ("epsilon", "v_prediction"):
            if label in ("linear", "cosine", "linspace") and prediction == "v_prediction":
                continue
            if sampler == "plms" and prediction == "v_prediction":
                # diffusers' PNDM combines the raw v outputs, ours the eps each implies: equal for eps models only
                continue
            CASES.append((name, label, config, steps, prediction))
    if sampler in KARRAS:
        CASES.append((name, "sd_karras", {**SD, "use_karras_sigmas": True}, 15, "epsilon"))
CASES.append(("ddim", "sample_prediction", {**SD, "clip_sample": True}, 10, "sample"))
CASES.append(("ddpm", "clipped", {**LINEAR, "clip_sample": True}, 10, "epsilon"))


def model(z: torch.Tensor, t) -> torch.Tensor:
    """A fixed function of (z, t), nonlinear in both, standing in for the U-Net."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1) / 1000
    return 0.8 * torch.tanh(z) + 0.2 * torch.sin(3 * z) * t + 0.1 * t


def make_scheduler(cls_name: str, config: dict):
    """The diffusers scheduler, given only the config keys it takes (each scheduler takes a different set)."""
    cls = getattr(diffusers, cls_name)
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in config.items() if k in accepted})


def run_diffusers(scheduler, noise, steps, step_kwargs, seed):
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        output = model(scheduler.scale_model_input(latents, t), t)
        if "generator" in inspect.signature(scheduler.step).parameters:
            step_kwargs = {**step_kwargs, "generator": generator}
        latents = scheduler.step(output, t, latents, **step_kwargs).prev_sample
    return latents, scheduler.timesteps


@pytest.mark.parametrize("name, label, config, steps, prediction", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[3]}-{c[4]}" for c in CASES])
def test_sampler_matches_diffusers(name, label, config, steps, prediction):
    cls_name, extra, options, step_kwargs = SAMPLERS[name]
    config = {**config, **extra, "prediction_type": prediction}
    scheduler = make_scheduler(cls_name, config)
    schedule = NoiseSchedule.from_diffusers_config(dict(scheduler.config))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    if label == "zero_snr" and prediction == "epsilon" and name.startswith(("ddpm", "ddim")):
        # diffusers divides by sqrt(alpha_bar_T) = 0 here and returns NaN; we refuse up front
        with pytest.raises(ValueError, match="zero terminal SNR"):
            make_sampler(name.split("_eta")[0], schedule, steps, **options)
        return
    ours = make_sampler(name.split("_eta")[0], schedule, steps, **options)

    expected, timesteps = run_diffusers(scheduler, noise, steps, step_kwargs, seed=7)
    got = sample(model, noise, ours, generator=torch.Generator().manual_seed(7))

    assert ours.timesteps.shape == timesteps.shape, (ours.timesteps.tolist(), timesteps.tolist())
    t_error = (ours.timesteps.double() - timesteps.double()).abs().max().item()
    assert t_error <= (1e-3 if "karras" in label else 0.0), (ours.timesteps.tolist(), timesteps.tolist())
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    assert error <= 1e-4, f"{name} {label} {steps} steps {prediction}: max error {error:.2e} relative to max |z|"


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m"])
def test_img2img_start_matches_diffusers(name):
    """strength 0.6 of 20 steps: the same noised start and the same remaining steps as diffusers' img2img."""
    cls_name, extra, options, step_kwargs = SAMPLERS[name]
    scheduler = make_scheduler(cls_name, {**SD, **extra})
    ours = make_sampler(name, NoiseSchedule.from_diffusers_config(dict(scheduler.config)), 20)
    g = torch.Generator().manual_seed(3)
    init, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)

    scheduler.set_timesteps(20)
    start = 20 - int(20 * 0.6)
    timesteps = scheduler.timesteps[start * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    latents = scheduler.add_noise(init, noise, timesteps[:1])
    for t in timesteps:
        latents = scheduler.step(model(scheduler.scale_model_input(latents, t), t), t, latents).prev_sample

    got = sample(model, noise, ours, init=init, strength=0.6)
    error = ((got - latents).abs().max() / latents.abs().max()).item()
    assert error <= 1e-4, f"{name} img2img: max error {error:.2e}"
