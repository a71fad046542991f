"""Our NoiseSchedule is diffusers' DDPMScheduler: the same config gives the same alpha_bar and the same noised latents.

Each diffusers scheduler is built from keyword options, and ours is read from its `config` with
`NoiseSchedule.from_diffusers_config`, exactly as a scheduler_config.json would be read. diffusers works in float32
and we in float64, so alpha_bar agrees to a relative 1e-4 (the float32 rounding of 1,000 products), not exactly;
diffusers' own recipe carried out in float64 agrees with ours to 1e-12.
"""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr  # noqa: E402

from minildm.schedule import NoiseSchedule  # noqa: E402

pytestmark = pytest.mark.oracle

CONFIGS = {
    "ddpm_linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "sd_v1_scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                clip_sample=False),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
    "linear_zero_snr": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, rescale_betas_zero_snr=True),
    "sd_v1_zero_snr_v_prediction": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                        timestep_spacing="trailing"),
    "cosine_zero_snr": dict(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True),
    "short_linear_200_steps": dict(num_train_timesteps=200, beta_schedule="linear", beta_start=1e-3, beta_end=0.05),
}


def both(name: str):
    theirs = diffusers.DDPMScheduler(**CONFIGS[name])
    ours = NoiseSchedule.from_diffusers_config(dict(theirs.config))
    return theirs, ours


def diffusers_alpha_bar_in_float64(name: str) -> torch.Tensor:
    """diffusers' recipe in float64: its float32 betas (linspace or cosine, before any rescaling), then its own
    rescale_zero_terminal_snr and cumprod carried out in float64."""
    options = dict(CONFIGS[name], rescale_betas_zero_snr=False)
    betas = diffusers.DDPMScheduler(**options).betas.double()
    if CONFIGS[name].get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    return torch.cumprod(1 - betas, dim=0)


def relative_error(ours: torch.Tensor, theirs: torch.Tensor, floor: float = 1e-12) -> torch.Tensor:
    return (ours - theirs).abs() / theirs.abs().clamp_min(floor)


@pytest.mark.parametrize("name", CONFIGS)
def test_alpha_bar_matches_diffusers_alphas_cumprod(name):
    theirs, ours = both(name)
    expected = theirs.alphas_cumprod.double()
    assert ours.alpha_bar.shape == expected.shape, (tuple(ours.alpha_bar.shape), tuple(expected.shape))
    rel = relative_error(ours.alpha_bar, expected)
    worst = int(rel.argmax())
    assert rel.max() < 1e-4, (f"{name}: alpha_bar differs from alphas_cumprod by a relative {rel.max():.3g} at "
                              f"t={worst}: {ours.alpha_bar[worst].item()!r} vs {expected[worst].item()!r}")
    assert (ours.alpha_bar[-1] == 0) == (expected[-1] == 0), (name, ours.alpha_bar[-1], expected[-1])


@pytest.mark.parametrize("name", CONFIGS)
def test_the_conventions_are_read_from_the_config(name):
    theirs, ours = both(name)
    config = theirs.config
    got = (ours.num_timesteps, ours.prediction_type, ours.timestep_spacing, ours.steps_offset, ours.clip_sample,
           ours.rescale_betas_zero_snr)
    want = (config.num_train_timesteps, config.prediction_type, config.timestep_spacing, config.steps_offset,
            config.clip_sample, config.rescale_betas_zero_snr)
    assert got == want, f"{name}: ours {got}, diffusers' config {want}"


@pytest.mark.parametrize("name", CONFIGS)
def test_alpha_bar_is_diffusers_recipe_carried_out_in_float64(name):
    _, ours = both(name)
    expected = diffusers_alpha_bar_in_float64(name)
    rel = relative_error(ours.alpha_bar, expected, floor=1e-300)
    worst = int(rel.argmax())
    assert rel.max() < 1e-12, (f"{name}: alpha_bar vs diffusers' recipe in float64: relative {rel.max():.3g} at "
                               f"t={worst}: {ours.alpha_bar[worst].item()!r} vs {expected[worst].item()!r}")


def coefficient_shift(a: torch.Tensor, b: torch.Tensor, z0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """How far z_t moves when alpha_bar moves from a to b: |d sqrt(alpha_bar)| |z_0| + |d sqrt(1 - alpha_bar)| |eps|."""
    return ((a.sqrt() - b.sqrt()).abs() * z0.double().abs()
            + ((1 - a).sqrt() - (1 - b).sqrt()).abs() * noise.double().abs())


def random_batch(seed: int, T: int, dtype: torch.dtype):
    """z_0 and noise of shape (6, 4, 8, 8), and t of shape (6,) holding both ends of the schedule."""
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(6, 4, 8, 8, generator=g, dtype=dtype)
    noise = torch.randn(6, 4, 8, 8, generator=g, dtype=dtype)
    t = torch.cat([torch.tensor([0, T - 1]), torch.randint(1, T - 1, (4,), generator=g)])
    return z0, noise, t


@pytest.mark.parametrize("name", CONFIGS)
def test_q_sample_matches_diffusers_add_noise_in_float32(name):
    theirs, ours = both(name)
    z0, noise, t = random_batch(0, ours.num_timesteps, torch.float32)
    expected = theirs.add_noise(z0, noise, t)
    got = ours.q_sample(z0, t, noise)
    assert got.shape == expected.shape and got.dtype == expected.dtype == torch.float32, (
        got.shape, got.dtype, expected.shape, expected.dtype)
    # diffusers' alpha_bar is rounded to float32, and q_sample on float32 tensors may round ours too: where
    # 1 - alpha_bar is tiny (t = 0) that moves sqrt(1 - alpha_bar) by a relative 1e-3. Allow exactly what those
    # differences of alpha_bar explain, plus a few ulps of float32 arithmetic.
    exact = ours.alpha_bar[t].view(-1, 1, 1, 1)
    explained = sum(coefficient_shift(exact, other, z0, noise)
                    for other in (theirs.alphas_cumprod.double()[t].view(-1, 1, 1, 1), exact.float().double()))
    rounding = 4 * torch.finfo(torch.float32).eps * (z0.double().abs() + noise.double().abs())
    allowed = 1.01 * explained + rounding
    error = (got.double() - expected.double()).abs()
    bad = error > allowed
    assert not bad.any(), (f"{name}, t={t.tolist()}: q_sample vs add_noise, {int(bad.sum())} values beyond "
                           f"float32 rounding; max abs error {error.max():.3g}, at items "
                           f"{sorted(set(bad.nonzero()[:, 0].tolist()))}")


@pytest.mark.parametrize("name", CONFIGS)
def test_q_sample_matches_add_noise_given_diffusers_alpha_bar_in_float64(name):
    theirs, ours = both(name)
    theirs.alphas_cumprod = diffusers_alpha_bar_in_float64(name)             # add_noise reads only this
    z0, noise, t = random_batch(1, ours.num_timesteps, torch.float64)
    expected = theirs.add_noise(z0, noise, t)
    error = (ours.q_sample(z0, t, noise) - expected).abs()
    assert error.max() < 1e-12, (f"{name}, t={t.tolist()}: q_sample vs add_noise in float64, max abs error "
                                 f"{error.max():.3g}")


@pytest.mark.parametrize("name", ["ddpm_linear", "sd_v1_zero_snr_v_prediction", "cosine"])
def test_v_target_matches_diffusers_get_velocity(name):
    theirs, ours = both(name)
    g = torch.Generator().manual_seed(1)
    z0, noise = torch.randn(2, 5, 4, 4, 4, generator=g).unbind(0)                           # (5, 4, 4, 4) each
    t = torch.tensor([0, 10, 500, 900, ours.num_timesteps - 1])
    expected = theirs.get_velocity(z0, noise, t)
    error = (ours.v_target(z0, noise, t) - expected).abs()
    assert error.max() < 1e-5, f"{name}: v_target vs get_velocity, max abs error {error.max():.3g}"
