"""Chapter 06 exercise: the loss of one training step.

Each test carries its task and points (`minildm grade` adds them up). The expected loss is worked out here in
float64, from alpha_bar alone: z_t with explicit square roots, the target for each prediction type (eps, z_0, v)
written out, the mean of the squared error taken by hand. The properties the chapter states are checked too: the
model sees z_t made from the given noise (no noise of the loss's own) at the given timesteps with the captions; a
model that answers exactly has loss 0 and one that is off by c everywhere has loss c^2 (a mean, not a sum); the loss
is float32 when the model answers in bfloat16 or float16; its gradients reach every weight of the model. The
forward process is computed here too (a schedule whose q_sample is the test's own), so the grade never waits on
chapter 03's exercise, and diffusers may not be called.
"""

from __future__ import annotations

import pytest
import torch
from taskcheck import (
    check_close,
    check_number,
    fail,
    forbid,
    one_thread,  # noqa: F401  (the fixture pytestmark uses)
)
from torch import nn

from minildm.schedule import NoiseSchedule
from minildm.train_ldm import diffusion_loss

LOSS = "ch06.training_loss"

FORBIDDEN = ("diffusers.schedulers.scheduling_ddpm:DDPMScheduler",)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 11


class OwnForward(NoiseSchedule):
    """A NoiseSchedule whose forward process is worked out here, from alpha_bar in float64, so the loss is graded
    on its own even when chapter 03's q_sample is still an exercise."""

    def q_sample(self, z0, t, noise):
        keep, spread = coefficients(self, t, z0.ndim)
        return (keep * z0.double() + spread * noise.double()).to(z0.dtype)


def coefficients(schedule: NoiseSchedule, t, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) in float64, one per item, shaped to broadcast over (C, h, w)."""
    alpha_bar = schedule.alpha_bar.double()[torch.as_tensor(t).long().reshape(-1)]
    shape = (-1,) + (1,) * (ndim - 1)
    return torch.sqrt(alpha_bar).view(shape), torch.sqrt(1.0 - alpha_bar).view(shape)


def noised(schedule: NoiseSchedule, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    keep, spread = coefficients(schedule, t, z0.ndim)
    return keep * z0.double() + spread * noise.double()                          # float64


def target_by_hand(schedule: NoiseSchedule, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the model should answer, in float64: eps, z_0, or v = sqrt(ab) eps - sqrt(1 - ab) z_0."""
    if schedule.prediction_type == "epsilon":
        return noise.double()
    if schedule.prediction_type == "sample":
        return z0.double()
    keep, spread = coefficients(schedule, t, z0.ndim)
    return keep * noise.double() - spread * z0.double()


class TinyDenoiser(nn.Module):
    """A stand-in for the U-Net and text encoder: its answer depends on z_t (a 1x1 conv), on t and on the caption
    (one shift per item and channel), so a loss that drops any of them shows. It keeps what it was asked."""

    def __init__(self, channels: int, seed: int, answer_dtype: torch.dtype | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(seed + 1000)
        self.mix = nn.Conv2d(channels, channels, 1)
        self.time = nn.Parameter(torch.randn(channels, generator=g))
        self.words = nn.Embedding(VOCAB, channels)
        with torch.no_grad():
            for p in (self.mix.weight, self.mix.bias, self.words.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.answer_dtype = answer_dtype
        self.asked: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, zt: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        self.asked.append((zt.detach().clone(), torch.as_tensor(t).clone(), ids.clone()))
        shift = self.time * (torch.as_tensor(t).to(zt.dtype) / 1000)[:, None] + self.words(ids).mean(1)   # (B, C)
        out = self.mix(zt) + shift.to(zt.dtype)[:, :, None, None]
        return out if self.answer_dtype is None else out.to(self.answer_dtype)


def inputs(seed: int, shape: tuple[int, ...], schedule: NoiseSchedule, tokens: int = 5):
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    t = torch.randint(0, schedule.num_timesteps, (shape[0],), generator=g)
    t[0] = schedule.num_timesteps - 1                                             # the noisiest step, and
    if shape[0] > 1:
        t[1] = 0                                                                 # the cleanest, every time
    ids = torch.randint(0, VOCAB, (shape[0], tokens), generator=g)
    return z0, t, noise, ids


def expected_loss(model: TinyDenoiser, schedule: NoiseSchedule, z0, t, noise, ids) -> torch.Tensor:
    """The chapter's loss from pieces computed here; the model runs in float32 on a z_t worked out in float64."""
    zt = noised(schedule, z0, t, noise).float()
    answer = model(zt, t, ids).double()
    error = answer - target_by_hand(schedule, z0, t, noise)
    return error.pow(2).sum() / error.numel()                                    # mean over batch and elements


def loss_of(what: str, *args) -> torch.Tensor:
    try:
        loss = diffusion_loss(*args)
    except (NotImplementedError, AssertionError):
        raise                                   # the stub itself, or a forbidden call: the message says it all
    except Exception as err:                    # noqa: BLE001 - report, not crash
        fail(LOSS, f"{what} raised {type(err).__name__}: {err}; z0 and noise are (B, C, h, w), t (B,) and ids (B, L); "
                   "the denoiser is called as denoiser(z_t, t, ids)")
    if not isinstance(loss, torch.Tensor):
        fail(LOSS, f"{what}: expected a tensor, got {type(loss).__name__}")
    if loss.ndim != 0:
        fail(LOSS, f"{what}: expected one number (a 0-dim tensor), got shape {tuple(loss.shape)}; take the mean over "
                   "the batch and every element")
    return loss


LOSS_CASES = [  # seed, latent shape, schedule settings
    (0, (4, 4, 8, 8), {}),
    (1, (3, 4, 5, 3), {"prediction_type": "v_prediction"}),
    (2, (2, 3, 4, 4), {"prediction_type": "sample"}),
    (3, (5, 2, 3, 6), {"prediction_type": "v_prediction", "beta_schedule": "linear", "beta_start": 1e-4,
                       "beta_end": 0.02}),
    (4, (3, 4, 4, 4), {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}),
]


@pytest.mark.task(LOSS)
@pytest.mark.points(4)
@pytest.mark.parametrize("seed, shape, settings", LOSS_CASES)
def test_diffusion_loss_is_the_mean_squared_error_to_the_schedules_target(monkeypatch, seed, shape, settings):
    schedule = OwnForward(**settings)
    model = TinyDenoiser(shape[1], seed)
    z0, t, noise, ids = inputs(seed, shape, schedule)
    with torch.no_grad():
        expected = expected_loss(model, schedule, z0, t, noise, ids)
    forbid(monkeypatch, LOSS, *FORBIDDEN)
    what = f"diffusion_loss ({schedule.prediction_type}) on {shape} latents at t = {t.tolist()}"
    loss = loss_of(what, model, schedule, z0, t, noise, ids)
    check_close(loss, expected, LOSS, f"{what}, against the mean of (answer - target)^2", atol=1e-7, rtol=1e-5,
                dtype=torch.float32)


@pytest.mark.task(LOSS)
@pytest.mark.points(2)
@pytest.mark.parametrize("seed, prediction", [(5, "epsilon"), (6, "v_prediction")])
def test_the_model_is_asked_about_z_t_from_the_given_noise_at_the_given_timesteps(monkeypatch, seed, prediction):
    schedule = OwnForward(prediction_type=prediction)
    shape = (3, 4, 4, 4)
    model = TinyDenoiser(shape[1], seed)
    z0, t, noise, ids = inputs(seed, shape, schedule)
    forbid(monkeypatch, LOSS, *FORBIDDEN)
    rng = torch.get_rng_state()
    loss_of("diffusion_loss", model, schedule, z0, t, noise, ids)
    if not torch.equal(torch.get_rng_state(), rng):
        fail(LOSS, "diffusion_loss drew random numbers of its own; the noise is given (training draws it from a "
                   "seeded generator so that a resumed run repeats itself)")
    if len(model.asked) != 1:
        fail(LOSS, f"the denoiser was called {len(model.asked)} times for one batch; expected once, on all of it")
    zt, t_seen, ids_seen = model.asked[0]
    check_close(zt, noised(schedule, z0, t, noise), LOSS, "the z_t the denoiser was given (expected "
                "sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) noise, with each item's own t and the given noise)",
                atol=1e-6, rtol=1e-5)
    check_close(t_seen, t, LOSS, "the timesteps the denoiser was given", atol=0, rtol=0)
    check_close(ids_seen, ids, LOSS, "the token ids the denoiser was given", atol=0, rtol=0)


@pytest.mark.task(LOSS)
@pytest.mark.points(2)
@pytest.mark.parametrize("prediction, offset", [("epsilon", 0.0), ("sample", 0.5), ("v_prediction", -0.25)])
def test_a_model_off_by_c_everywhere_has_loss_c_squared(monkeypatch, prediction, offset):
    # the mean, not the sum, over the batch and the elements: the loss does not grow with the batch or the latent
    schedule = OwnForward(prediction_type=prediction)
    z0, t, noise, ids = inputs(7, (6, 4, 8, 8), schedule)
    exact = target_by_hand(schedule, z0, t, noise).float()

    def off_by(zt, t_asked, ids_asked):                  # knows the answer, and adds `offset` to it
        return exact + offset

    forbid(monkeypatch, LOSS, *FORBIDDEN)
    loss = loss_of("diffusion_loss", off_by, schedule, z0, t, noise, ids)
    check_number(loss, offset ** 2, LOSS, f"the loss of a {prediction} model whose every answer is the target "
                 f"{'' if offset == 0 else f'+ {offset}'} (expected {offset ** 2}; a sum over {exact.numel():,} "
                 "numbers would be that many times larger)", rel=1e-5, abs_=1e-10)


@pytest.mark.task(LOSS)
@pytest.mark.points(1)
@pytest.mark.parametrize("answer_dtype", [torch.bfloat16, torch.float16])
def test_the_loss_is_float32_when_the_model_answers_in_half_precision(monkeypatch, answer_dtype):
    # under autocast the U-Net answers in bfloat16 or float16 while the target is float32: squaring and averaging
    # 768 differences in 8 bits of mantissa would lose the small ones, so both are taken to float32 first
    schedule = OwnForward(prediction_type="v_prediction")
    model = TinyDenoiser(4, 8, answer_dtype=answer_dtype)
    z0, t, noise, ids = inputs(8, (3, 4, 8, 8), schedule)
    with torch.no_grad():
        zt = noised(schedule, z0, t, noise).float()
        answer = model(zt, t, ids).double()                          # the half-precision answer, exactly
        expected = (answer - target_by_hand(schedule, z0, t, noise).float().double()).pow(2).mean()
    model.asked.clear()
    forbid(monkeypatch, LOSS, *FORBIDDEN)
    loss = loss_of(f"diffusion_loss with a model answering in {answer_dtype}", model, schedule, z0, t, noise, ids)
    check_close(loss, expected, LOSS, f"the loss when the model answers in {answer_dtype} (the answer and the "
                "target taken to float32 before the difference)", atol=1e-7, rtol=2e-6, dtype=torch.float32)


@pytest.mark.task(LOSS)
@pytest.mark.points(2)
@pytest.mark.parametrize("seed, prediction", [(9, "epsilon"), (10, "v_prediction")])
def test_the_gradients_reach_every_weight_of_the_denoiser(monkeypatch, seed, prediction):
    schedule = OwnForward(prediction_type=prediction)
    shape = (3, 4, 4, 4)
    model, reference = TinyDenoiser(shape[1], seed), TinyDenoiser(shape[1], seed)
    z0, t, noise, ids = inputs(seed, shape, schedule)
    expected_loss(reference, schedule, z0, t, noise, ids).backward()
    forbid(monkeypatch, LOSS, *FORBIDDEN)
    loss = loss_of("diffusion_loss", model, schedule, z0, t, noise, ids)
    if not loss.requires_grad:
        fail(LOSS, "the loss does not require grad: it must stay connected to the denoiser's output (no .detach(), "
                   ".item() or torch.no_grad())")
    loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if p.grad is None:
            fail(LOSS, f"no gradient reached the denoiser's {name}")
        check_close(p.grad, q.grad, LOSS, f"the gradient of the loss with respect to the denoiser's {name}",
                    atol=1e-6, rtol=1e-4)
