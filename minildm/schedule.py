"""Chapter 03: the forward process. How much of z_0 survives to step t, and how much noise has replaced it.

The forward process adds a little Gaussian noise at each of T steps:

    q(z_t | z_{t-1}) = N(sqrt(1 - beta_t) z_{t-1}, beta_t I)

Because Gaussians compose, step t can be reached in one jump (Ho et al. 2020, eq. 4):

    q(z_t | z_0) = N(sqrt(alpha_bar_t) z_0, (1 - alpha_bar_t) I),    alpha_bar_t = prod_{s<=t} (1 - beta_s)

Everything a sampler needs is a function of alpha_bar: the noise level sigma_t = sqrt((1 - alpha_bar_t) /
alpha_bar_t) of the Karras view (z_t / sqrt(alpha_bar_t) = z_0 + sigma_t eps) and the signal-to-noise ratio
SNR_t = alpha_bar_t / (1 - alpha_bar_t) = 1 / sigma_t^2. Tensors here are float64 and indexed by t = 0 .. T-1 (the
code's t is the paper's t - 1, as in diffusers). A schedule also carries the conventions a diffusers scheduler
config stores beside the betas (prediction type, timestep spacing, clipping), so that one object describes how a
model was trained and how its samplers should step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def cosine_alpha_bar(s: float) -> float:
    """Nichol & Dhariwal's (2021) alpha_bar(s) for s in [0, 1]: a cosine, offset by 0.008 so beta_0 is not tiny."""
    # alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi / 2)
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def make_betas(kind: str, num_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """beta_t for t = 0 .. T-1: computed in float32 (chapter 03 says why), returned in float64."""
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float32).double()
    if kind == "scaled_linear":
        # SD: linear in sqrt(beta), so beta grows quadratically
        return (torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float32) ** 2).double()
    if kind == "squaredcos_cap_v2":
        # beta_t = 1 - alpha_bar(t+1) / alpha_bar(t), capped at 0.999 so the last steps keep a trace of signal
        betas = [min(1 - cosine_alpha_bar((t + 1) / num_timesteps) / cosine_alpha_bar(t / num_timesteps), 0.999)
                 for t in range(num_timesteps)]
        return torch.tensor(betas, dtype=torch.float32).double()
    raise ValueError(f"unknown beta schedule {kind!r}; choose one of {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. (2024) "Common Diffusion Noise Schedules and Sample Steps are Flawed": shift and scale
    sqrt(alpha_bar) so that it is unchanged at t = 0 and exactly 0 at t = T-1. Then the last step is pure noise,
    as the sampler's start assumes, instead of leaking a little of the image's mean."""
    root = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    # sqrt(alpha_bar)' = (sqrt(alpha_bar) - last) * first / (first - last)
    root = (root - last) * first / (first - last)
    alpha_bar = root ** 2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


@dataclass(frozen=True)
class NoiseLevel:
    """A point of the forward process named by its alpha_bar instead of by a training timestep. The sigma-space
    samplers of chapter 07 stand between the timesteps; every conversion of `NoiseSchedule` that takes t takes one
    of these in its place."""

    alpha_bar: float | Tensor                       # one value for the whole batch, or one per item (B,)

    @classmethod
    def from_sigma(cls, sigma: float | Tensor) -> NoiseLevel:
        """The level of the Karras noise level sigma: x = z_t / sqrt(alpha_bar) = z_0 + sigma eps."""
        # sigma^2 = (1 - alpha_bar) / alpha_bar  =>  alpha_bar = 1 / (1 + sigma^2)
        return cls(1 / (1 + sigma ** 2))


@dataclass
class NoiseSchedule:
    """The betas and everything derived from them, plus the conventions a sampler needs (see the module docstring).

    SD v1 trained with `NoiseSchedule()`: T = 1000, scaled_linear betas from 0.00085 to 0.012, epsilon prediction.
    """

    num_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    rescale_betas_zero_snr: bool = False
    prediction_type: str = "epsilon"        # what the model predicts: eps, z_0 ("sample") or v
    timestep_spacing: str = "leading"       # how a sampler picks its timesteps (samplers.py)
    steps_offset: int = 0                   # added to "leading" timesteps (SD v1: 1)
    clip_sample: bool = False               # clamp z0_hat to [-clip_sample_range, clip_sample_range] (DDPM, DDIM)
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True           # DDIM/PLMS: alpha_bar after the last step is 1 (else alpha_bar_0)
    use_karras_sigmas: bool = False         # sigma-space samplers: Karras et al. (2022) noise levels

    def __post_init__(self):
        if self.num_timesteps < 2:
            raise ValueError(f"num_timesteps must be at least 2 (SD uses 1000); got {self.num_timesteps}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {self.prediction_type!r}; choose one of "
                             f"{', '.join(PREDICTION_TYPES)}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"unknown timestep spacing {self.timestep_spacing!r}; choose one of "
                             f"{', '.join(TIMESTEP_SPACINGS)}")
        if self.beta_schedule != "squaredcos_cap_v2" and not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1; got {self.beta_start} and {self.beta_end} "
                             "(SD: 0.00085 and 0.012)")
        betas = make_betas(self.beta_schedule, self.num_timesteps, self.beta_start, self.beta_end)
        if self.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas                                          # (T,)
        self.alphas = 1 - betas                                     # alpha_t = 1 - beta_t
        # alpha_bar_t = prod_{s <= t} alpha_s
        self.alpha_bar = torch.cumprod(self.alphas, dim=0)          # (T,), falls from ~1 to ~0

    # ------------------------------------------------------------------------------- views of alpha_bar

    @property
    def sigmas(self) -> Tensor:
        """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t): z_t / sqrt(alpha_bar_t) = z_0 + sigma_t eps. (T,)"""
        return ((1 - self.alpha_bar) / self.alpha_bar).sqrt()

    @property
    def finite_sigmas(self) -> Tensor:
        """`sigmas` with the zero-terminal-SNR end kept finite: alpha_bar_T = 0 would make sigma_T infinite, and a
        sampler in sigma cannot start from infinite noise, so 2^-24 stands in for alpha_bar there. (T,)"""
        alpha_bar = self.alpha_bar.clone()
        if self.rescale_betas_zero_snr:
            alpha_bar[-1] = 2.0 ** -24
        return ((1 - alpha_bar) / alpha_bar).sqrt()

    def sigma_at(self, t) -> np.ndarray:
        """sigma at (possibly fractional) timesteps, interpolated linearly in t between the training ones."""
        return np.interp(np.asarray(t, dtype=np.float64), np.arange(self.num_timesteps), self.finite_sigmas.numpy())

    @property
    def snr(self) -> Tensor:
        """SNR_t = alpha_bar_t / (1 - alpha_bar_t): signal power over noise power in z_t. (T,)"""
        return self.alpha_bar / (1 - self.alpha_bar)

    @property
    def log_snr(self) -> Tensor:
        """lambda_t = log SNR_t. DPM-Solver steps in half of it, log(sqrt(alpha_bar_t) / sqrt(1 - alpha_bar_t)) =
        -log sigma_t (not log(alpha_t / ...): here alpha_t = 1 - beta_t, a single step's share)."""
        return self.alpha_bar.log() - (1 - self.alpha_bar).log()

    def alpha_bar_at(self, t: Tensor | int) -> Tensor | float:
        """alpha_bar at an int timestep (a float) or at timesteps t (float64, (B,)); a ValueError outside 0..T-1."""
        steps = torch.as_tensor(t, device=self.alpha_bar.device).long().reshape(-1)
        if steps.numel() and (steps.min() < 0 or steps.max() >= self.num_timesteps):
            raise ValueError(f"timesteps must be in 0..{self.num_timesteps - 1}; got "
                             f"{steps.min().item()}..{steps.max().item()}")
        alpha_bar = self.alpha_bar[steps]                           # float64: 1 - alpha_bar keeps its digits at small t
        return float(alpha_bar) if isinstance(t, int) else alpha_bar

    def coefficients(self, t: Tensor | int | NoiseLevel, like: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) at integer timesteps t, or at a NoiseLevel between them:
        (B, 1, 1, 1) tensors like `like`, one per item, or two plain numbers for one level for the whole batch."""
        alpha_bar = t.alpha_bar if isinstance(t, NoiseLevel) else self.alpha_bar_at(t)
        if not isinstance(alpha_bar, Tensor):
            # one level for the whole batch: numbers broadcast like tensors and need no copy to the latent's device
            return math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
        alpha_bar = alpha_bar.double().reshape(-1)
        shape = (-1,) + (1,) * (like.ndim - 1)                      # (B,) -> (B, 1, 1, 1) to broadcast
        return (alpha_bar.sqrt().to(like.device, like.dtype).view(shape),
                (1 - alpha_bar).sqrt().to(like.device, like.dtype).view(shape))

    # ------------------------------------------------------------------------------- the forward process

    def q_sample(self, z0: Tensor, t: Tensor | int, noise: Tensor) -> Tensor:
        """Jump straight to step t: one draw of noise reaches any step, so training needs no loop over t."""
        a, b = self.coefficients(t, z0)
        # BEGIN SOLUTION ch03.q_sample
        # z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps
        return a * z0 + b * noise                                   # (B, C, h, w)
        # END SOLUTION

    # ------------------------------------------------------------------- what the model predicts, converted
    # Given z_t, any one of eps, z_0 and v determines the other two (Salimans & Ho 2022 for v). These are the only
    # place the conversions are written: t is an integer timestep (or one per item), or a NoiseLevel between them.

    def eps_to_z0(self, zt: Tensor, eps: Tensor, t) -> Tensor:
        a, b = self.coefficients(t, zt)
        # BEGIN SOLUTION ch03.eps_to_z0
        # z0_hat = (z_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
        return (zt - b * eps) / a
        # END SOLUTION

    def z0_to_eps(self, zt: Tensor, z0: Tensor, t) -> Tensor:
        a, b = self.coefficients(t, zt)
        # eps = (z_t - sqrt(alpha_bar_t) z_0) / sqrt(1 - alpha_bar_t)
        return (zt - a * z0) / b

    def v_target(self, z0: Tensor, eps: Tensor, t) -> Tensor:
        a, b = self.coefficients(t, z0)
        # v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) z_0
        return a * eps - b * z0

    def v_to_z0(self, zt: Tensor, v: Tensor, t) -> Tensor:
        a, b = self.coefficients(t, zt)
        # z_0 = sqrt(alpha_bar_t) z_t - sqrt(1 - alpha_bar_t) v
        return a * zt - b * v

    def v_to_eps(self, zt: Tensor, v: Tensor, t) -> Tensor:
        a, b = self.coefficients(t, zt)
        # eps = sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t) z_t
        return a * v + b * zt

    def training_target(self, z0: Tensor, eps: Tensor, t) -> Tensor:
        """What the network is asked to output: eps, z_0 or v (Salimans & Ho 2022), as `prediction_type` says."""
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "sample":
            return z0
        return self.v_target(z0, eps, t)

    def predict_z0_and_eps(self, zt: Tensor, output: Tensor, t) -> tuple[Tensor, Tensor]:
        """(z0_hat, eps_hat) from the model's output, whatever it predicts (`prediction_type`)."""
        if self.prediction_type == "epsilon":
            return self.eps_to_z0(zt, output, t), output
        if self.prediction_type == "sample":
            return output, self.z0_to_eps(zt, output, t)
        return self.v_to_z0(zt, output, t), self.v_to_eps(zt, output, t)

    # ------------------------------------------------------------------------------------ configuration

    @classmethod
    def from_diffusers_config(cls, config: dict) -> NoiseSchedule:
        """Read a diffusers scheduler config (scheduler_config.json as a dict). Keys we do not use (e.g.
        `_class_name`, `skip_prk_steps`) are ignored; settings we do not implement are an error, not a silent
        difference. A key the config lacks takes our default (SD v1's), not the diffusers class's: real
        scheduler_config.json files store every key."""
        unsupported = {"trained_betas": None, "thresholding": False, "timestep_type": "discrete",
                       "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
                       "use_flow_sigmas": False}
        for key, default in unsupported.items():
            value = config.get(key, default)
            if value is not None and value != default:
                raise ValueError(f"scheduler config sets {key}={value!r}, which minildm does not implement; "
                                 f"remove it or set it to {default!r}")
        known = {f.name for f in fields(cls)}
        renamed = {"num_train_timesteps": "num_timesteps"}
        values = {renamed.get(k, k): v for k, v in config.items() if renamed.get(k, k) in known}
        values = {k: v for k, v in values.items() if v is not None}
        return cls(**values)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
