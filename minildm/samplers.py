"""Chapter 07: reverse diffusion. Start from noise; at each step ask the model what the noise is, and remove some.

Every sampler here answers the same two questions: at which timesteps to ask the model (`timesteps`), and how
to move z from one noise level to the next given the model's answer (`step`). They fall into two families:

- discrete-time samplers (DDPM, DDIM, PLMS) step between timesteps t of the training schedule, on z_t itself;
- sigma-space samplers choose noise levels sigma (Karras et al. 2022), which may fall between the timesteps. Euler,
  Euler ancestral and Heun step on x = z_t / sqrt(alpha_bar_t) = z_0 + sigma eps, solving an ODE or SDE in sigma;
  DPM-Solver++ steps on z_t itself, in log-SNR.

Whatever the model predicts (eps, z_0 or v), its answer is read by the schedule's one conversion,
`NoiseSchedule.predict_z0_and_eps`, at a timestep or at a `NoiseLevel` between them. Each sampler is tested equal
to its diffusers scheduler (tests/oracle/); chapter 07, "Matching diffusers", lists where that takes care.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from minildm.device import randn
from minildm.schedule import TIMESTEP_SPACINGS, NoiseLevel, NoiseSchedule

ModelFn = Callable[[Tensor, Tensor], Tensor]       # model_fn(z_t, t) -> eps, z_0 or v, as the schedule says
VARIANCE_TYPES = ("fixed_small", "fixed_large")    # DDPM's step variance: the posterior's own, or beta_t


# --------------------------------------------------------------------------------------------- timesteps


def spaced_timesteps(spacing: str, num_timesteps: int, num_steps: int, steps_offset: int = 0,
                     rounded: bool = True) -> np.ndarray:
    """N of the T training timesteps, descending (Lin et al. 2024, table 2), as a numpy array.

    linspace: evenly from T-1 down to 0 (fractional in float32 when not `rounded`);  leading: 0, T//N, 2T//N, ...
    (+ steps_offset), so the largest is below T-1;  trailing: T-1, T-1-T/N, ..., so the first step starts from the
    noisiest timestep.
    """
    if spacing == "linspace":
        t = np.linspace(0, num_timesteps - 1, num_steps, dtype=np.float64 if rounded else np.float32)
        t = t.round() if rounded else t
    elif spacing == "leading":
        t = (np.arange(0, num_steps) * (num_timesteps // num_steps)).round() + steps_offset
    elif spacing == "trailing":
        t = (np.round(np.arange(num_timesteps, 0, -num_timesteps / num_steps)) - 1)[::-1]
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(TIMESTEP_SPACINGS)}")
    t = t[::-1].copy()
    if t.max() > num_timesteps - 1 or t.min() < 0 or (np.diff(t) >= 0).any():
        raise ValueError(f"{spacing} spacing with steps_offset={steps_offset} gives timesteps outside "
                         f"0..{num_timesteps - 1} or repeated for {num_steps} steps; use fewer steps or another "
                         "spacing")
    return t


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022), eq. 5: noise levels evenly spaced in sigma^(1/rho), so most steps are spent at low
    noise, where the image's details are decided."""
    ramp = np.linspace(0, 1, num_steps)
    # sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def sigma_to_t(sigmas: np.ndarray, all_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) timestep at which the schedule reaches each sigma, interpolating log sigma."""
    return np.interp(np.log(np.maximum(sigmas, 1e-10)), np.log(all_sigmas), np.arange(len(all_sigmas)))


# ---------------------------------------------------------------------------------------------- the base


@dataclass
class Step:
    """What the sampling loop shows the callback at each model evaluation."""

    index: int           # which evaluation (0 .. len(timesteps) - 1)
    t: float             # the timestep the model was asked about
    zt: Tensor           # the latent the model saw (the model's input: z_t, on the training schedule's scale)
    output: Tensor       # the model's answer (eps, z_0 or v)
    z0_hat: Tensor       # the clean latent that answer implies


class Sampler:
    """Base class. `timesteps[i]` is the i-th model evaluation; `step` turns its output into the next latent.

    The base keeps its latent on z_t's own scale and starts from unit-variance noise. Each sampler's options are
    keyword arguments of its `__init__`, which is where everything it keeps is set.
    """

    name = ""
    order = 1                                           # model evaluations per step (Heun: 2)

    def __init__(self, schedule: NoiseSchedule, num_steps: int, *, timestep_spacing: str | None = None):
        if not isinstance(num_steps, int) or not 1 <= num_steps <= schedule.num_timesteps:
            raise ValueError(f"num_steps must be an integer from 1 to {schedule.num_timesteps} (the schedule's T); "
                             f"got {num_steps!r}")
        spacing = schedule.timestep_spacing if timestep_spacing is None else timestep_spacing
        if spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(TIMESTEP_SPACINGS)}")
        self.schedule, self.num_steps = schedule, num_steps
        self.spacing = spacing                          # leading | trailing | linspace (None: the schedule's)
        self.timesteps = torch.empty(0)                 # one per model evaluation; each family sets them

    @property
    def init_noise_sigma(self) -> float:
        """The starting noise's standard deviation: 1 for samplers on z_t, sigma_max for those on x."""
        return 1.0

    def reset(self) -> None:
        """Forget what a multistep sampler remembers from earlier steps (called before every run)."""

    def model_input(self, z: Tensor, i: int) -> Tensor:
        return z

    def noise_level(self, i: int) -> float:
        """sigma before evaluation i: used to noise an image for img2img."""
        return float(self.schedule.sigmas[int(self.timesteps[i])])

    def add_noise(self, z0: Tensor, noise: Tensor, i: int) -> Tensor:
        """z as it would be just before evaluation i, for a clean z0: img2img starts here."""
        sigma = self.noise_level(i)
        # z_t = (z_0 + sigma eps) / sqrt(1 + sigma^2)  =  sqrt(alpha_bar) z_0 + sqrt(1 - alpha_bar) eps
        return (z0 + sigma * noise) / math.sqrt(1 + sigma ** 2)

    def start_index(self, strength: float) -> int:
        """img2img: skip the first (1 - strength) of the steps, rounding the steps kept down."""
        skip = self.num_steps - min(int(self.num_steps * strength), self.num_steps)
        return skip * self.order

    def step(self, i: int, z: Tensor, output: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """(the next z, z0_hat) from evaluation i's output."""
        raise NotImplementedError


# -------------------------------------------------------------------------------- discrete-time samplers


class DiscreteSampler(Sampler):
    """Samplers that step from training timestep t to the next chosen one, on z_t."""

    def __init__(self, schedule: NoiseSchedule, num_steps: int, *, timestep_spacing: str | None = None):
        super().__init__(schedule, num_steps, timestep_spacing=timestep_spacing)
        self.steps = spaced_timesteps(self.spacing, schedule.num_timesteps, num_steps, schedule.steps_offset)  # (N,)
        self.timesteps = torch.from_numpy(self.steps.astype(np.int64))
        if schedule.alpha_bar[int(self.steps[0])] == 0 and schedule.prediction_type == "epsilon":
            raise ValueError(f"{self.name} starts at t = {int(self.steps[0])}, where alpha_bar = 0 (zero terminal "
                             "SNR): there z_t is pure noise and eps says nothing about z_0; use a v_prediction "
                             "model, or a sigma-space sampler (euler, heun, dpmpp_2m)")

    def alpha_bar_after(self, k: int) -> float:
        """alpha_bar at the timestep after the k-th chosen one; after the last, 1 (or alpha_bar_0)."""
        if k + 1 < len(self.steps):
            return float(self.schedule.alpha_bar[int(self.steps[k + 1])])
        return 1.0 if self.schedule.set_alpha_to_one else float(self.schedule.alpha_bar[0])

    def predict(self, z: Tensor, output: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """(z0_hat, eps_hat) from the model's output at t; z0_hat clamped when the schedule says clip_sample."""
        z0, eps = self.schedule.predict_z0_and_eps(z, output, t)
        if self.schedule.clip_sample:
            z0 = z0.clamp(-self.schedule.clip_sample_range, self.schedule.clip_sample_range)
        return z0, eps


def ddpm_posterior(ab_t: float, ab_prev: float, z0: Tensor, zt: Tensor) -> tuple[Tensor, float]:
    """q(z_prev | z_t, z_0) = N(mean, variance I): the step back when z_0 is known (Ho et al. 2020, eqs. 6-7), between
    any two levels ab_t < ab_prev. DDPM samples it with z0_hat in place of z_0; the ELBO (minildm/elbo.py) compares
    it with that guess."""
    beta_t = 1 - ab_t / ab_prev                     # the one-step beta between the two levels
    # mean = sqrt(ab_prev) beta_t / (1 - ab_t) z_0 + sqrt(1 - beta_t) (1 - ab_prev) / (1 - ab_t) z_t
    mean = ((math.sqrt(ab_prev) * beta_t / (1 - ab_t)) * z0
            + (math.sqrt(1 - beta_t) * (1 - ab_prev) / (1 - ab_t)) * zt)
    # variance = (1 - ab_prev) / (1 - ab_t) beta_t
    return mean, (1 - ab_prev) / (1 - ab_t) * beta_t


class DDPM(DiscreteSampler):
    """Ho et al. (2020): sample the posterior q(z_prev | z_t, z0_hat), a Gaussian with known mean and variance.
    The last step aims at a clean latent (alpha_bar = 1), as the paper's chain ends at z_0."""

    name = "ddpm"

    def __init__(self, schedule: NoiseSchedule, num_steps: int, *, variance_type: str = "fixed_small",
                 timestep_spacing: str | None = None):
        super().__init__(schedule, num_steps, timestep_spacing=timestep_spacing)
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"unknown variance_type {variance_type!r}; choose one of {', '.join(VARIANCE_TYPES)}")
        self.variance_type = variance_type

    def alpha_bar_after(self, k):
        return float(self.schedule.alpha_bar[int(self.steps[k + 1])]) if k + 1 < len(self.steps) else 1.0

    def step(self, i, z, output, generator):
        t = int(self.steps[i])
        ab_t, ab_prev = float(self.schedule.alpha_bar[t]), self.alpha_bar_after(i)
        z0, _ = self.predict(z, output, t)
        # the posterior q(z_prev | z_t, z_0) with z0_hat in place of z_0
        mean, posterior_variance = ddpm_posterior(ab_t, ab_prev, z0, z)
        if t == 0:
            return mean, z0
        if self.variance_type == "fixed_small":
            variance = max(posterior_variance, 1e-20)   # the exact one when z_0 is known
        else:
            variance = 1 - ab_t / ab_prev               # fixed_large: beta_t, the upper bound (Ho et al.: both work)
        noise = randn(z.shape, generator, z.device, z.dtype)
        return mean + math.sqrt(variance) * noise, z0


class DDIM(DiscreteSampler):
    """Song et al. (2021): the same marginals q(z_t | z_0) with a family of reverse processes; eta = 0 is
    deterministic (an ODE), eta = 1 has DDPM's variance."""

    name = "ddim"

    def __init__(self, schedule: NoiseSchedule, num_steps: int, *, eta: float = 0.0,
                 timestep_spacing: str | None = None):
        super().__init__(schedule, num_steps, timestep_spacing=timestep_spacing)
        if not isinstance(eta, (int, float)) or not eta >= 0:             # NaN fails this too
            raise ValueError(f"eta must be a number >= 0 (0: no fresh noise, 1: DDPM's variance); got {eta!r}")
        self.eta = eta

    def step(self, i, z, output, generator):
        t = int(self.steps[i])
        ab_t, ab_prev = float(self.schedule.alpha_bar[t]), self.alpha_bar_after(i)
        z0, eps = self.predict(z, output, t)
        # BEGIN SOLUTION ch07.ddim_step
        # sigma_t^2 = eta^2 (1 - ab_prev) / (1 - ab_t) (1 - ab_t / ab_prev)
        std = self.eta * math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
        # z_prev = sqrt(ab_prev) z0_hat + sqrt(1 - ab_prev - sigma_t^2) eps_hat + sigma_t noise
        z_prev = math.sqrt(ab_prev) * z0 + math.sqrt(1 - ab_prev - std ** 2) * eps
        if self.eta > 0:
            z_prev = z_prev + std * randn(z.shape, generator, z.device, z.dtype)
        return z_prev, z0
        # END SOLUTION


class PLMS(DiscreteSampler):
    """Liu et al. (2022), pseudo linear multistep: combine the last four eps estimates as Adams-Bashforth does,
    then take a DDIM-like step. The first step is taken twice (a Heun-like warm-up), so N steps cost N + 1 model
    evaluations.

    The estimates combined are eps, each read from the model's output at its own timestep, not the raw outputs: a
    v model's answer changes with t even when its eps does not."""

    name = "plms"

    def __init__(self, schedule: NoiseSchedule, num_steps: int, *, timestep_spacing: str | None = None):
        super().__init__(schedule, num_steps, timestep_spacing=timestep_spacing)
        if schedule.prediction_type == "sample":
            raise ValueError("plms needs a model that predicts eps or v, not the sample; use ddim or euler")
        # [t0, t1, t1, t2, ..., t_{N-1}]: every timestep but the first is evaluated once, t1 twice
        evaluations = [self.steps[0]] + ([self.steps[1]] if len(self.steps) > 1 else []) + list(self.steps[1:])
        self.timesteps = torch.tensor([int(t) for t in evaluations])
        self.eps_history: list[Tensor] = []             # the last four eps estimates, oldest first
        self.counter = 0                                # evaluations seen in this run
        self.first_z: Tensor | None = None              # the run's first z, where the warm-up starts again

    def reset(self):
        self.eps_history, self.counter, self.first_z = [], 0, None

    def start_index(self, strength):
        if strength < 1.0:
            # part-way, the run would start inside the [t0, t1, t1, t2, ...] plan and the warm-up would redo a
            # step from the wrong level; refuse rather than be quietly wrong
            raise ValueError("plms cannot start part-way (img2img strength < 1): its warm-up needs the run's first "
                             "two evaluations; use ddim, euler or dpmpp_2m for img2img")
        return 0

    def transfer(self, z: Tensor, eps: Tensor, t: int, ab_prev: float) -> Tensor:
        """Move z from t to the next timestep with the eps estimate (PNDM's transfer, eq. 11 of Liu et al.)."""
        ab_t = float(self.schedule.alpha_bar[t])
        # z_prev = sqrt(ab_prev / ab_t) z
        #          - (ab_prev - ab_t) eps / (ab_t sqrt(1 - ab_prev) + sqrt(ab_t (1 - ab_t) ab_prev))
        denominator = ab_t * math.sqrt(1 - ab_prev) + math.sqrt(ab_t * (1 - ab_t) * ab_prev)
        return math.sqrt(ab_prev / ab_t) * z - (ab_prev - ab_t) * eps / denominator

    def step(self, i, z, output, generator):
        t = int(self.timesteps[i])
        z0, eps = self.schedule.predict_z0_and_eps(z, output, t)   # combine eps estimates, whatever the model gives
        k = int(np.nonzero(self.steps == t)[0][0])      # which chosen timestep this is
        if self.counter == 1:                            # the warm-up: average the two estimates, redo step one
            combined, z, k = (eps + self.eps_history[-1]) / 2, self.first_z, k - 1
        else:
            self.eps_history = [*self.eps_history[-3:], eps]
            e = self.eps_history[::-1]                   # newest first
            # Adams-Bashforth with 1, 2, 3 or 4 past estimates
            if len(e) == 1:
                combined = e[0]
            elif len(e) == 2:
                combined = (3 * e[0] - e[1]) / 2
            elif len(e) == 3:
                combined = (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
            else:
                combined = (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3]) / 24
            if self.counter == 0:
                self.first_z = z
        self.counter += 1
        return self.transfer(z, combined, int(self.steps[k]), self.alpha_bar_after(k)), z0


# ---------------------------------------------------------------------------------- sigma-space samplers


def ode_derivative(x: Tensor, z0_hat: Tensor, sigma: float) -> Tensor:
    """The probability-flow ODE in sigma (Karras et al. 2022, algorithm 1's d_i): x moves towards the denoised
    guess, and its speed is the noise that guess implies (eps_hat, for an eps model)."""
    # dx/dsigma = (x - z0_hat) / sigma
    return (x - z0_hat) / sigma


def ancestral_split(sigma: float, sigma_next: float) -> tuple[float, float]:
    """(sigma_up, sigma_down) for a step from sigma to sigma_next with fresh noise (k-diffusion's
    get_ancestral_step): go deterministically down to sigma_down, then add noise of std sigma_up, which brings the
    level back to sigma_next with the DDPM posterior's variance."""
    # sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2
    sigma_up = math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)
    # sigma_down^2 = sigma_next^2 - sigma_up^2
    sigma_down = math.sqrt(sigma_next ** 2 - sigma_up ** 2)
    return sigma_up, sigma_down


class SigmaScheduleSampler(Sampler):
    """Samplers whose noise levels are chosen in sigma, sigma_0 > ... > sigma_N = 0, and may fall between the
    training timesteps (Karras et al. 2022): `sigmas[i]` is evaluation i's level and `timesteps[i]` the (possibly
    fractional) timestep the model is told. Each subclass picks its levels (`choose_sigmas`) and its latent's scale.
    """

    def __init__(self, schedule: NoiseSchedule, num_steps: int, *, use_karras_sigmas: bool | None = None,
                 timestep_spacing: str | None = None):
        super().__init__(schedule, num_steps, timestep_spacing=timestep_spacing)
        # None takes the schedule's setting (a diffusers scheduler config stores one)
        self.use_karras_sigmas = schedule.use_karras_sigmas if use_karras_sigmas is None else use_karras_sigmas
        self.all_sigmas = schedule.finite_sigmas.numpy()                        # (T,), rising with t
        t, sigmas = self.choose_sigmas()
        self.timesteps = torch.from_numpy(np.asarray(t, dtype=np.float32))
        self.sigmas = torch.from_numpy(np.append(sigmas, 0.0))                 # (N + 1,), ends at 0

    def choose_sigmas(self) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps, sigmas) of the N steps, noisiest first."""
        raise NotImplementedError

    def noise_level(self, i):
        return float(self.sigmas[i])


class SigmaSampler(SigmaScheduleSampler):
    """Samplers on x = z_t / sqrt(alpha_bar_t) = z_0 + sigma eps, whose noise level sigma falls to 0.

    The model was trained on z_t, so its input is x / sqrt(sigma^2 + 1); the start is noise of std sigma_max.
    """

    def choose_sigmas(self):
        """The spaced timesteps (fractional ones for linspace) and sigma interpolated there; or Karras sigmas
        between the same two ends, at the timesteps where the schedule reaches them."""
        s = self.schedule
        t = spaced_timesteps(self.spacing, s.num_timesteps, self.num_steps, s.steps_offset, rounded=False)
        sigmas = s.sigma_at(t)
        if self.use_karras_sigmas:
            sigmas = karras_sigmas(sigmas[-1], sigmas[0], self.num_steps)
            t = sigma_to_t(sigmas, self.all_sigmas)
        return t, sigmas

    @property
    def init_noise_sigma(self) -> float:
        sigma_max = float(self.sigmas.max())
        # x_T = sigma_max eps; on "leading" steps, which never reach t = T-1, sqrt(sigma_max^2 + 1) (chapter 07)
        return sigma_max if self.spacing in ("linspace", "trailing") else math.sqrt(sigma_max ** 2 + 1)

    def add_noise(self, z0, noise, i):
        return z0 + self.noise_level(i) * noise          # x = z_0 + sigma eps

    def model_input(self, x, i):
        # z_t = x / sqrt(sigma^2 + 1)
        return x / math.sqrt(self.noise_level(i) ** 2 + 1)

    def denoised(self, x: Tensor, output: Tensor, sigma: float) -> Tensor:
        """z0_hat from the model's output at noise level sigma (x is on the sigma scale), by the schedule's own
        conversion at the level alpha_bar = 1 / (1 + sigma^2), which need not be a training timestep's."""
        # z_t = x / sqrt(sigma^2 + 1): the latent the model saw
        zt = x / math.sqrt(sigma ** 2 + 1)
        z0, _ = self.schedule.predict_z0_and_eps(zt, output, NoiseLevel.from_sigma(sigma))
        return z0


class Euler(SigmaSampler):
    """Karras et al. (2022), algorithm 1 without churn: one Euler step of the probability-flow ODE
    dx/dsigma = (x - z0_hat) / sigma."""

    name = "euler"

    def step(self, i, x, output, generator):
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        # BEGIN SOLUTION ch07.euler_step
        z0 = self.denoised(x, output, sigma)
        # x_next = x + d (sigma_next - sigma), with the ODE's slope d = (x - z0_hat) / sigma
        return x + ode_derivative(x, z0, sigma) * (sigma_next - sigma), z0
        # END SOLUTION


class EulerAncestral(SigmaSampler):
    """Euler down to sigma_down, then fresh noise of std sigma_up, chosen so the step lands on sigma_next with the
    DDPM posterior's variance (`ancestral_split`)."""

    name = "euler_a"

    def step(self, i, x, output, generator):
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        z0 = self.denoised(x, output, sigma)
        sigma_up, sigma_down = ancestral_split(sigma, sigma_next)
        # x_down = x + d (sigma_down - sigma);  x_next = x_down + sigma_up noise
        x = x + ode_derivative(x, z0, sigma) * (sigma_down - sigma)
        noise = randn(x.shape, generator, x.device, x.dtype)   # drawn at every step, the last one too
        return x + noise * sigma_up, z0


class Heun(SigmaSampler):
    """Karras et al. (2022), algorithm 1: an Euler step, then a second model call at its end point and the
    average of the two slopes (a 2nd-order method). The last step, to sigma = 0, is a plain Euler step. The two
    calls of a step are two entries of `timesteps`: [t0, t1, t1, t2, t2, ..., t_{N-1}, t_{N-1}]."""

    name = "heun"
    order = 2

    def __init__(self, schedule: NoiseSchedule, num_steps: int, *, use_karras_sigmas: bool | None = None,
                 timestep_spacing: str | None = None):
        super().__init__(schedule, num_steps, use_karras_sigmas=use_karras_sigmas, timestep_spacing=timestep_spacing)
        t, s = self.timesteps, self.sigmas
        self.timesteps = torch.cat([t[:1], t[1:].repeat_interleave(2)])
        self.sigmas = torch.cat([s[:1], s[1:-1].repeat_interleave(2), s[-1:]])   # one per evaluation, then 0
        self.pending: tuple[Tensor, Tensor, float] | None = None   # (x, slope, sigma_next - sigma) between the calls

    def reset(self):
        self.pending = None

    def step(self, i, x, output, generator):
        if self.pending is None:                     # first call: an Euler step from sigma to sigma_next
            sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
            z0 = self.denoised(x, output, sigma)
            d = ode_derivative(x, z0, sigma)
            if sigma_next > 0:                       # remember the start and the slope there for the correction
                self.pending = (x, d, sigma_next - sigma)
            return x + d * (sigma_next - sigma), z0
        x_start, d_start, dt = self.pending          # second call, at the Euler step's end point
        sigma_next = float(self.sigmas[i])
        z0 = self.denoised(x, output, sigma_next)
        # x_next = x + dt (d(x, sigma) + d(x_euler, sigma_next)) / 2
        d = (d_start + ode_derivative(x, z0, sigma_next)) / 2
        self.pending = None
        return x_start + d * dt, z0


class DPMSolverPP2M(SigmaScheduleSampler):
    """Lu et al. (2022), DPM-Solver++(2M): solve the ODE for z0_hat exactly in log-SNR, using the last two z0_hat
    estimates as a linear function of lambda (the "midpoint" form). Steps on z_t itself, from unit-variance noise,
    at levels chosen in sigma. The first and the last step are first order."""

    name = "dpmpp_2m"

    def __init__(self, schedule: NoiseSchedule, num_steps: int, *, use_karras_sigmas: bool | None = None,
                 timestep_spacing: str | None = None):
        super().__init__(schedule, num_steps, use_karras_sigmas=use_karras_sigmas, timestep_spacing=timestep_spacing)
        self.previous: tuple[Tensor, float] | None = None       # (z0_hat, lambda) of the last step

    def choose_sigmas(self):
        """N + 1 points spaced over the schedule with the last one dropped, so t = 0 is not a step of its own; or
        Karras sigmas over the whole schedule, at whole timesteps (fractional ones for the cosine schedule)."""
        s, n = self.schedule, self.num_steps
        if self.spacing == "linspace":
            t = np.linspace(0, s.num_timesteps - 1, n + 1).round()[::-1][:-1].copy()
        elif self.spacing == "leading":
            t = (np.arange(0, n + 1) * (s.num_timesteps // (n + 1))).round()[::-1][:-1].copy() + s.steps_offset
        else:
            t = spaced_timesteps(self.spacing, s.num_timesteps, n, s.steps_offset)
        if self.use_karras_sigmas:
            sigmas = karras_sigmas(self.all_sigmas[0], self.all_sigmas[-1], n)
            t = sigma_to_t(sigmas, self.all_sigmas)
            t = t if s.beta_schedule == "squaredcos_cap_v2" else t.round()
        else:
            sigmas = s.sigma_at(t)
        return t.astype(np.int64), sigmas

    def reset(self):
        self.previous = None

    def step(self, i, z, output, generator):
        here = NoiseLevel.from_sigma(float(self.sigmas[i]))
        there = NoiseLevel.from_sigma(float(self.sigmas[i + 1]))
        # z_t = alpha z_0 + sigma eps with alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar) (Lu et al.'s sigma)
        alpha_s, sigma_s = self.schedule.coefficients(here, z)
        alpha_t, sigma_t = self.schedule.coefficients(there, z)
        z0, _ = self.schedule.predict_z0_and_eps(z, output, here)
        # lambda = log(alpha / sigma): half the log-SNR; h is the step in it
        lambda_s = math.log(alpha_s) - math.log(sigma_s)
        lambda_t = math.log(alpha_t) - math.log(sigma_t) if sigma_t > 0 else math.inf
        h = lambda_t - lambda_s
        last = i == len(self.timesteps) - 1
        if self.previous is None or last:
            # first order (DDIM in these variables): z_t = sigma_t / sigma_s z - alpha_t (e^-h - 1) z0_hat
            d = z0
        else:
            z0_before, lambda_before = self.previous
            r = (lambda_s - lambda_before) / h
            # D = z0_hat + (z0_hat - z0_hat_before) / (2 r): z0_hat extrapolated to the middle of the step
            d = z0 + 0.5 * (z0 - z0_before) / r
        self.previous = (z0, lambda_s)
        return (sigma_t / sigma_s) * z - (alpha_t * math.expm1(-h)) * d, z0


# ------------------------------------------------------------------------------------------------ the loop


SAMPLERS: dict[str, type[Sampler]] = {cls.name: cls for cls in (DDPM, DDIM, PLMS, Euler, EulerAncestral, Heun,
                                                                 DPMSolverPP2M)}


def sampler_options(cls: type[Sampler]) -> list[str]:
    """The options a sampler takes: the keyword-only arguments of its __init__."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]


def make_sampler(name: str, schedule: NoiseSchedule, num_steps: int, **options) -> Sampler:
    """A sampler by name: ddpm (variance_type), ddim (eta), plms, euler, euler_a, heun, dpmpp_2m (use_karras_sigmas
    for the last four); every sampler also takes timestep_spacing = leading | trailing | linspace."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    accepted = sampler_options(SAMPLERS[name])
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"{name} has no option {', '.join(unknown)}; it takes {', '.join(accepted)}")
    return SAMPLERS[name](schedule, num_steps, **options)


def check_strength(strength: float) -> None:
    """img2img's strength is a share of the steps: 0 runs none (the image comes back), 1 runs all (pure noise)."""
    if not 0.0 <= strength <= 1.0:                                  # NaN fails this too
        raise ValueError(f"strength must be in [0, 1] (0 keeps the image, 1 ignores it); got {strength}")


def img2img_start(sampler: Sampler, z0: Tensor, noise: Tensor, strength: float) -> tuple[int, Tensor]:
    """Where img2img starts: (the index of the first evaluation to run, the latent the loop starts from).

    SDEdit (Meng et al. 2021): noise the clean z_0 only part of the way, to the level of step (1 - strength) N, and
    let the sampler denoise from there; what the noise did not reach (the layout, the colours) survives. Strength 0
    leaves no step to run and returns z_0; strength 1 starts from pure noise, as if there were no image.
    """
    check_strength(strength)
    # BEGIN SOLUTION ch08.img2img_start
    if strength == 1.0:
        return 0, noise * sampler.init_noise_sigma                # pure noise at the sampler's starting scale
    start = sampler.start_index(strength)                         # skip the first (1 - strength) of the steps
    if start >= len(sampler.timesteps):
        return start, z0.clone()                                  # strength 0: no step left to run
    # z_start = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps, at the level of evaluation `start`
    return start, sampler.add_noise(z0, noise, start)             # (B, C, h, w)
    # END SOLUTION


def checks_each_step(device: torch.device) -> bool:
    """Whether `sample` looks at the model's output after every evaluation. On the CPU that costs nothing; on a GPU
    (or MPS) reading a value back makes the host wait until the device has caught up, every step, so there the
    checks stay on the device and are read once, at the end of the run."""
    return device.type == "cpu"


def raise_if_not_finite(checks: list[tuple[int, float, Tensor]]) -> None:
    """checks: (evaluation, t, whether its output was all finite) for each evaluation so far."""
    finite = torch.stack([ok for _, _, ok in checks]).cpu()               # one wait for the device, for all of them
    if not finite.all():
        i, t, _ = checks[int((~finite).nonzero()[0])]
        raise FloatingPointError(f"the model's output is not finite at step {i} (t = {t:g}); check the model "
                                 "and its inputs (a NaN in the weights, or a latent far outside the training range)")


@torch.no_grad()
def sample(model_fn: ModelFn, noise: Tensor, sampler: Sampler, generator: torch.Generator | None = None,
           callback: Callable[[Step], None] | None = None, init: Tensor | None = None,
           strength: float = 1.0, before_step: Callable[[int, Tensor], Tensor] | None = None) -> Tensor:
    """Reverse diffusion: from standard-normal `noise` (B, C, h, w) to a clean latent z_0.

    img2img: give `init` (a clean z_0) and a `strength` in [0, 1] (see `img2img_start`); strength 1 starts from
    pure noise, as without init. `generator` supplies the fresh noise of stochastic samplers (DDPM, DDIM with
    eta > 0, Euler ancestral). `before_step(i, z) -> z` may change z before evaluation i (inpainting puts the
    known region back there). A model output that is not finite stops the run with a FloatingPointError naming
    the first such step (on a GPU, once the run is over).
    """
    sampler.reset()
    if init is None:
        start, z = 0, noise * sampler.init_noise_sigma          # the sampler's starting scale
    else:
        start, z = img2img_start(sampler, init, noise, strength)
    each_step, checks = checks_each_step(z.device), []
    for i in range(start, len(sampler.timesteps)):
        if before_step is not None:
            z = before_step(i, z)
        t = float(sampler.timesteps[i])
        zt = sampler.model_input(z, i)
        output = model_fn(zt, torch.full((z.shape[0],), t, device=z.device))
        finite = torch.isfinite(output).all()                   # 0-d, on the model's device
        checks.append((i, t, finite))
        if each_step and not finite:
            raise_if_not_finite(checks)
        z, z0_hat = sampler.step(i, z, output, generator)
        if callback is not None:
            callback(Step(i, t, zt, output, z0_hat))
    if checks and not each_step:
        raise_if_not_finite(checks)
    return z


@torch.no_grad()
def ddim_invert(model_fn: ModelFn, z0: Tensor, sampler: DDIM, callback: Callable[[Step], None] | None = None) -> Tensor:
    """Run DDIM (eta = 0) backwards, from a clean z_0 up to the noise that DDIM would turn into it.

    DDIM's step is deterministic, so it can be walked the other way: at each timestep, on the way up, the model's
    eps at the current z takes the place of the eps at the next one. The approximation is good when steps are
    small, which is why inversion is a test of a sampler and the basis of image editing (Mokady et al. 2023).
    """
    if not isinstance(sampler, DDIM) or sampler.eta != 0:
        raise ValueError("ddim_invert needs a deterministic DDIM sampler: make_sampler('ddim', schedule, N) with eta 0")
    schedule = sampler.schedule
    # where we are: the clean end first (alpha_bar = 1, or alpha_bar_0), then each timestep on the way up
    now = NoiseLevel(sampler.alpha_bar_after(len(sampler.steps) - 1))
    z = z0
    for k, t in enumerate(int(t) for t in sampler.steps[::-1]):       # t_{N-1} < ... < t_0: upwards
        seen = z
        output = model_fn(z, torch.full((z.shape[0],), float(t), device=z.device))
        _, eps = schedule.predict_z0_and_eps(z, output, t)             # the model's eps, reading z as if at t
        z0_hat = schedule.eps_to_z0(z, eps, now)                       # z0_hat from where we are
        # one level up: z_t = sqrt(alpha_bar_t) z0_hat + sqrt(1 - alpha_bar_t) eps_hat
        z, now = schedule.q_sample(z0_hat, t, eps), t
        if callback is not None:
            callback(Step(k, float(t), seen, output, z0_hat))
    return z
