"""Chapter 08 exercises: classifier-free guidance, and where image to image starts.

Each test carries its task and points (`minildm grade` adds them up). Guidance is checked against its other form,
(1 - w) uncond + w cond, in float64 for scales below, at and above 1, and for the dtype it keeps. The img2img start
is checked for discrete-time samplers (DDPM, DDIM), samplers on x = z_0 + sigma eps (Euler, Euler ancestral, Heun,
whose evaluations come in pairs) and DPM++ 2M (on z_t, with Karras sigmas too): the expected start index and noise
level are worked out here from the steps, alpha_bar and sigma; strength 1 is pure noise as with no image, a
strength too small for one step keeps the image, PLMS refuses to start part-way, and the given noise is the only
noise. diffusers may not be called.
"""

from __future__ import annotations

import math

import pytest
import torch
from taskcheck import (
    check_close,
    fail,
    forbid,
    one_thread,  # noqa: F401  (the fixture pytestmark uses)
)

from minildm.pipeline import guided_model_fn, guided_output
from minildm.samplers import img2img_start, make_sampler, sample
from minildm.schedule import NoiseSchedule

CFG = "ch08.cfg_combine"
IMG2IMG = "ch08.img2img_start"

FORBIDDEN_IMG2IMG = ("diffusers.schedulers.scheduling_ddim:DDIMScheduler",)

pytestmark = pytest.mark.usefixtures("one_thread")


def random_latents(seed: int, shape: tuple[int, ...], count: int = 2, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(count)]


# ------------------------------------------------------------------------------------------------ ch08.cfg_combine


def guided(what: str, uncond: torch.Tensor, cond: torch.Tensor, scale: float):
    try:
        return guided_output(uncond, cond, scale)
    except NotImplementedError:
        raise                                   # the stub itself: its message says it all
    except Exception as err:                    # noqa: BLE001 - report, not crash
        fail(CFG, f"{what} raised {type(err).__name__}: {err}; uncond and cond are (B, C, h, w) tensors and "
                  "guidance_scale a float")


@pytest.mark.task(CFG)
@pytest.mark.points(3)
@pytest.mark.parametrize("seed, shape, scale", [
    (0, (2, 4, 8, 8), 7.5), (1, (3, 4, 5, 3), 0.0), (2, (1, 3, 4, 4), 1.0), (3, (2, 4, 4, 6), 3.0),
    (4, (2, 2, 3, 3), 0.3), (5, (4, 4, 2, 2), 12.0)])
def test_guidance_moves_w_times_from_the_empty_prompts_answer_towards_the_prompts(seed, shape, scale):
    uncond, cond = random_latents(seed, shape)
    # the same line through the two answers, written the other way round: a weighted sum with weights 1 - w and w
    expected = (1.0 - scale) * uncond + scale * cond
    what = f"guided_output(uncond, cond, {scale}) on {shape} answers"
    check_close(guided(what, uncond, cond, scale), expected, CFG, f"{what}, float64", atol=1e-12, rtol=1e-12,
                dtype=torch.float64)


@pytest.mark.task(CFG)
@pytest.mark.points(1)
def test_guidance_of_zero_is_the_empty_prompt_and_of_one_the_prompt_alone():
    uncond, cond = random_latents(6, (2, 4, 4, 4))
    what = "guided_output with guidance_scale"
    check_close(guided(f"{what} 0", uncond, cond, 0.0), uncond, CFG, f"{what} 0 (the prompt ignored: expected "
                "uncond)", atol=1e-12, rtol=1e-12)
    check_close(guided(f"{what} 1", uncond, cond, 1.0), cond, CFG, f"{what} 1 (the prompt alone: expected cond)",
                atol=1e-12, rtol=1e-12)
    past = guided(f"{what} 2", uncond, cond, 2.0)
    check_close(past - cond, cond - uncond, CFG, f"{what} 2 minus cond (w = 2 goes as far past cond as cond is "
                "from uncond)", atol=1e-12, rtol=1e-12)


@pytest.mark.task(CFG)
@pytest.mark.points(1)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_guidance_keeps_the_answers_dtype(dtype):
    uncond, cond = random_latents(7, (2, 4, 4, 4), dtype=dtype)
    expected = (1.0 - 7.5) * uncond.double() + 7.5 * cond.double()
    loose = {torch.float32: 1e-5, torch.bfloat16: 0.1, torch.float16: 2e-2}[dtype]     # rounding of the answers
    check_close(guided(f"guided_output on {dtype} answers", uncond, cond, 7.5), expected, CFG,
                f"guided_output(uncond, cond, 7.5) on {dtype} answers (the U-Net's dtype under autocast)",
                atol=loose, rtol=loose, dtype=dtype)


@pytest.mark.task(CFG)
@pytest.mark.points(1)
def test_the_guided_model_combines_the_doubled_batchs_two_halves():
    # a stand-in U-Net whose answer depends on the context: the empty prompt's answer and the prompt's differ
    def unet(zt, t, context):
        return zt * context.mean(dim=(1, 2)).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1) / 1000

    z, _ = random_latents(8, (3, 4, 4, 4))
    context, empty = random_latents(9, (3, 5, 6))
    t = torch.tensor([999.0, 500.0, 1.0], dtype=torch.float64)
    model_fn = guided_model_fn(unet, context, empty, 7.5)
    expected = unet(z, t, empty) + 7.5 * (unet(z, t, context) - unet(z, t, empty))
    try:
        got = model_fn(z, t)
    except NotImplementedError:
        raise
    except Exception as err:                    # noqa: BLE001 - report, not crash
        fail(CFG, f"guided_model_fn's model_fn raised {type(err).__name__}: {err} when it called guided_output on "
                  "the two halves of the U-Net's answer, (3, 4, 4, 4) each")
    check_close(got, expected, CFG, "the guided model (U-Net on [uncond; cond], then guided_output) at w = 7.5",
                atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------------------------------------- ch08.img2img_start

ON_X = ("euler", "euler_a", "heun")          # samplers on x = z_0 + sigma eps; the others on z_t


def first_evaluation(sampler, strength: float) -> int:
    """SDEdit's start: run only the last floor(N * strength) of the N steps; each step is `order` evaluations."""
    kept = math.floor(sampler.num_steps * strength)
    return (sampler.num_steps - kept) * sampler.order


def noised_to(sampler, name: str, z0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
    """z_0 with the given noise at evaluation i's level, on the sampler's own scale (float64)."""
    if name in ON_X:
        sigma = float(sampler.sigmas[i])
        return z0 + sigma * noise                                        # x = z_0 + sigma eps
    if name == "dpmpp_2m":
        sigma = float(sampler.sigmas[i])                                 # its own sigmas (Karras ones too)
        alpha_bar = 1.0 / (1.0 + sigma ** 2)
    else:
        alpha_bar = float(sampler.schedule.alpha_bar.double()[int(sampler.timesteps[i])])
    return math.sqrt(alpha_bar) * z0 + math.sqrt(1.0 - alpha_bar) * noise


def start_of(what: str, sampler, z0: torch.Tensor, noise: torch.Tensor, strength: float) -> tuple[int, torch.Tensor]:
    rng = torch.get_rng_state()
    try:
        result = img2img_start(sampler, z0, noise, strength)
    except (NotImplementedError, AssertionError):
        raise                                   # the stub itself, or a forbidden call: the message says it all
    except Exception as err:                    # noqa: BLE001 - report, not crash
        fail(IMG2IMG, f"{what} raised {type(err).__name__}: {err}; z0 and noise are (B, C, h, w) latents, strength "
                      "a float in [0, 1]")
    if not torch.equal(torch.get_rng_state(), rng):
        fail(IMG2IMG, f"{what} drew random numbers of its own; the noise is given (the pipeline draws it from the "
                      "call's seed)")
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], torch.Tensor)):
        fail(IMG2IMG, f"{what}: expected a pair (the index of the first evaluation, the latent to start from); got "
                      f"{type(result).__name__}")
    start, z = result
    if not isinstance(start, int) or isinstance(start, bool):
        fail(IMG2IMG, f"{what}: the start index must be an int, got {type(start).__name__} ({start!r})")
    return start, z


IMG2IMG_CASES = [  # sampler, steps, options, schedule settings, strength
    ("ddim", 10, {}, {}, 0.6),
    ("ddim", 20, {"timestep_spacing": "trailing"}, {"prediction_type": "v_prediction"}, 0.35),
    ("ddpm", 8, {}, {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}, 0.75),
    ("euler", 10, {}, {}, 0.5),
    ("euler", 12, {"timestep_spacing": "linspace", "use_karras_sigmas": True}, {}, 0.3),
    ("euler_a", 9, {"timestep_spacing": "trailing"}, {}, 0.8),
    ("heun", 10, {}, {}, 0.45),
    ("dpmpp_2m", 10, {}, {}, 0.55),
    ("dpmpp_2m", 15, {"use_karras_sigmas": True}, {"prediction_type": "v_prediction"}, 0.7),
]


@pytest.mark.task(IMG2IMG)
@pytest.mark.points(4)
@pytest.mark.parametrize("name, steps, options, settings, strength", IMG2IMG_CASES)
def test_img2img_starts_part_way_at_the_level_of_its_first_evaluation(monkeypatch, name, steps, options, settings,
                                                                      strength):
    sampler = make_sampler(name, NoiseSchedule(**settings), steps, **options)
    z0, noise = random_latents(steps, (2, 4, 5, 6))
    forbid(monkeypatch, IMG2IMG, *FORBIDDEN_IMG2IMG)
    what = f"img2img_start({name} with {steps} steps, strength {strength})"
    start, z = start_of(what, sampler, z0, noise, strength)
    first = first_evaluation(sampler, strength)
    if start != first:
        fail(IMG2IMG, f"{what}: start index {start}, expected {first} (run the last floor({steps} x {strength}) = "
                      f"{math.floor(steps * strength)} steps of {steps}, {sampler.order} evaluation(s) each)")
    scale = "x = z_0 + sigma eps" if name in ON_X else "z_t = sqrt(alpha_bar) z_0 + sqrt(1 - alpha_bar) eps"
    check_close(z, noised_to(sampler, name, z0, noise, first), IMG2IMG, f"{what}: the start latent ({scale} at "
                f"evaluation {first}'s level, with the given noise)", atol=1e-10, rtol=1e-9, dtype=torch.float64)
    check_close(z0, random_latents(steps, (2, 4, 5, 6))[0], IMG2IMG, f"z_0 after {what} (it must not be changed "
                "in place)", atol=0, rtol=0)


@pytest.mark.task(IMG2IMG)
@pytest.mark.points(2)
@pytest.mark.parametrize("name, options", [
    ("ddim", {}), ("ddim", {"timestep_spacing": "trailing"}), ("euler", {}),
    ("euler", {"timestep_spacing": "linspace"}), ("heun", {}), ("dpmpp_2m", {}), ("plms", {})])
def test_strength_one_starts_from_pure_noise_as_if_there_were_no_image(monkeypatch, name, options):
    sampler = make_sampler(name, NoiseSchedule(), 10, **options)
    z0, noise = random_latents(11, (2, 4, 4, 4))
    # the loop without an image starts from the noise at the sampler's starting scale (sigma_max for Euler on
    # linspace or trailing steps, sqrt(sigma_max^2 + 1) on leading ones, 1 on z_t)
    scale = sampler.init_noise_sigma
    forbid(monkeypatch, IMG2IMG, *FORBIDDEN_IMG2IMG)
    what = f"img2img_start({name} {options or ''}, strength 1)"
    start, z = start_of(what, sampler, z0, noise, 1.0)
    if start != 0:
        fail(IMG2IMG, f"{what}: start index {start}, expected 0 (every step is run)")
    check_close(z, scale * noise, IMG2IMG, f"{what}: the start latent (expected the noise times {scale:.6g}, with "
                "nothing of the image in it)", atol=1e-10, rtol=1e-10)


@pytest.mark.task(IMG2IMG)
@pytest.mark.points(2)
@pytest.mark.parametrize("name, strength", [("ddim", 0.0), ("euler", 0.0), ("heun", 0.0), ("dpmpp_2m", 0.0),
                                            ("ddim", 0.05), ("heun", 0.09)])
def test_a_strength_too_small_for_one_step_keeps_the_image(monkeypatch, name, strength):
    sampler = make_sampler(name, NoiseSchedule(), 10)
    z0, noise = random_latents(12, (2, 4, 4, 4))
    kept = z0.clone()
    forbid(monkeypatch, IMG2IMG, *FORBIDDEN_IMG2IMG)
    what = f"img2img_start({name} with 10 steps, strength {strength})"
    start, z = start_of(what, sampler, z0, noise, strength)
    if start < len(sampler.timesteps):
        fail(IMG2IMG, f"{what}: start index {start}, but {name} has only {len(sampler.timesteps)} evaluations and "
                      "no step is left to run: expected an index past the last one")
    check_close(z, kept, IMG2IMG, f"{what}: the latent (expected z_0 itself, with no noise)", atol=0, rtol=0)
    z.add_(1.0)
    check_close(z0, kept, IMG2IMG, f"z_0 after changing the latent {what} returned (return a copy, so the "
                "caller's z_0 is never changed)", atol=0, rtol=0)


@pytest.mark.task(IMG2IMG)
@pytest.mark.points(1)
@pytest.mark.parametrize("strength", [0.0, 0.5, 0.99])
def test_plms_refuses_to_start_part_way(monkeypatch, strength):
    # PLMS's warm-up needs the run's first two evaluations: started part-way it would be quietly wrong
    sampler = make_sampler("plms", NoiseSchedule(), 10)
    z0, noise = random_latents(13, (1, 4, 4, 4))
    forbid(monkeypatch, IMG2IMG, *FORBIDDEN_IMG2IMG)
    try:
        img2img_start(sampler, z0, noise, strength)
    except (NotImplementedError, AssertionError):
        raise
    except ValueError:
        return
    except Exception as err:                    # noqa: BLE001 - report, not crash
        fail(IMG2IMG, f"img2img_start(plms, strength {strength}) raised {type(err).__name__}: {err}; expected the "
                      "ValueError of the sampler's start_index")
    fail(IMG2IMG, f"img2img_start(plms, strength {strength}) returned a start; expected the ValueError with which "
                  "PLMS refuses to start part-way (ask the sampler where to start)")


@pytest.mark.task(IMG2IMG)
@pytest.mark.points(1)
@pytest.mark.parametrize("name, strength", [("ddim", 0.4), ("euler", 0.7), ("heun", 0.5)])
def test_the_sampling_loop_runs_only_the_steps_after_the_start(monkeypatch, name, strength):
    sampler = make_sampler(name, NoiseSchedule(), 10)
    z0, noise = random_latents(14, (2, 4, 4, 4))
    first = first_evaluation(sampler, strength)
    seen = []

    def model_fn(zt, t):                         # answers eps = 0 and keeps what it was asked
        seen.append((zt.clone(), t.clone()))
        return torch.zeros_like(zt)

    forbid(monkeypatch, IMG2IMG, *FORBIDDEN_IMG2IMG)
    sample(model_fn, noise, sampler, init=z0, strength=strength)
    asked = [float(t[0]) for _, t in seen]
    wanted = [float(t) for t in sampler.timesteps[first:]]
    if asked != wanted:
        fail(IMG2IMG, f"img2img with {name} (strength {strength}) asked the model at t = {asked}; expected the last "
                      f"{len(wanted)} evaluations, t = {wanted}")
    # the model's first input is z_t on the training schedule's scale, whatever scale the sampler steps on
    z_start = noised_to(sampler, name, z0, noise, first)
    zt = z_start / math.sqrt(float(sampler.sigmas[first]) ** 2 + 1) if name in ON_X else z_start
    check_close(seen[0][0], zt, IMG2IMG, f"the model's first input in img2img with {name} (strength {strength})",
                atol=1e-10, rtol=1e-9)
