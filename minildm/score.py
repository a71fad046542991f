"""Chapter 07: the score view. A network that predicts eps has learnt the score of the noised data, up to a scale:

    grad log q(z_t) = -E[eps | z_t] / sqrt(1 - alpha_bar_t)                 (Vincent 2011; Song & Ermon 2019)

and the score gives the best guess of the clean latent, Tweedie's formula (Efron 2011):

    E[z_0 | z_t] = (z_t + (1 - alpha_bar_t) grad log q(z_t)) / sqrt(alpha_bar_t)

To check such identities exactly we need data whose every density is known: a mixture of isotropic Gaussians,
p(z_0) = sum_k pi_k N(mu_k, s_k^2 I). Noising keeps it a mixture, so q(z_t), its score and E[z_0 | z_t] have closed
forms. With s_k = 0 it is chapter 07's ideal denoiser's data (K points); in 1-D it is small enough to draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class GaussianMixture:
    """p(z) = sum_k pi_k N(mu_k, s_k^2 I) in D dimensions: weights (K,) summing to 1, means (K, D), stds (K,) >= 0.
    Held in float64: the identities are checked to rounding."""

    weights: Tensor
    means: Tensor
    stds: Tensor

    def __post_init__(self):
        self.weights = torch.as_tensor(self.weights, dtype=torch.float64).reshape(-1)
        self.means = torch.as_tensor(self.means, dtype=torch.float64)
        self.means = self.means.reshape(len(self.weights), -1)                  # (K, D); 1-D: (K,) -> (K, 1)
        self.stds = torch.as_tensor(self.stds, dtype=torch.float64).reshape(-1).expand(len(self.weights)).clone()
        if (self.weights < 0).any() or abs(self.weights.sum().item() - 1) > 1e-6 or (self.stds < 0).any():
            raise ValueError(f"a mixture needs weights >= 0 that sum to 1 and stds >= 0; got weights "
                             f"{self.weights.tolist()} and stds {self.stds.tolist()}")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def noised(self, alpha_bar: float) -> GaussianMixture:
        """q(z_t) for z_t = sqrt(ab) z_0 + sqrt(1 - ab) eps: the same mixture, each component moved and widened."""
        # q(z_t) = sum_k pi_k N(sqrt(ab) mu_k, (ab s_k^2 + 1 - ab) I)
        return GaussianMixture(self.weights, math.sqrt(alpha_bar) * self.means,
                               (alpha_bar * self.stds ** 2 + 1 - alpha_bar).sqrt())

    def component_log_densities(self, z: Tensor) -> Tensor:
        """log pi_k + log N(z; mu_k, s_k^2 I) for every point and component: (N, K). Needs every s_k > 0."""
        if (self.stds == 0).any():
            raise ValueError("this mixture has point components (std 0) and no density; noise it first: "
                             "mixture.noised(alpha_bar) with alpha_bar < 1")
        z = z.double().reshape(-1, self.dim)                                    # (N, D)
        var = self.stds ** 2                                                    # (K,)
        distance2 = (z[:, None, :] - self.means).pow(2).sum(-1)                 # (N, K)
        # log pi_k - |z - mu_k|^2 / (2 s_k^2) - D/2 log(2 pi s_k^2)
        return self.weights.log() - distance2 / (2 * var) - 0.5 * self.dim * torch.log(2 * math.pi * var)

    def log_prob(self, z: Tensor) -> Tensor:
        """log p(z), (N,)."""
        # log p(z) = logsumexp_k (log pi_k + log N(z; mu_k, s_k^2 I))
        return torch.logsumexp(self.component_log_densities(z), dim=1)

    def score(self, z: Tensor) -> Tensor:
        """grad_z log p(z) in closed form, (N, D): each component pulls z to its mean, weighted by how likely it is
        to have made z (its responsibility r_k(z))."""
        z = z.double().reshape(-1, self.dim)                                    # (N, D)
        r = torch.softmax(self.component_log_densities(z), dim=1)               # (N, K)
        # grad log p(z) = sum_k r_k(z) (mu_k - z) / s_k^2
        return (r / self.stds ** 2) @ self.means - (r / self.stds ** 2).sum(1, keepdim=True) * z

    def posterior_mean(self, zt: Tensor, alpha_bar: float) -> Tensor:
        """E[z_0 | z_t], (N, D), by Bayes' rule, component by component (no score involved): given k, z_0 and z_t
        are jointly Gaussian, and the components' posterior weights are their responsibilities for z_t."""
        a = math.sqrt(alpha_bar)
        zt = zt.double().reshape(-1, self.dim)                                  # (N, D)
        noised = self.noised(alpha_bar)
        r = torch.softmax(noised.component_log_densities(zt), dim=1)            # (N, K)
        gain = a * self.stds ** 2 / noised.stds ** 2                            # (K,)
        # E[z_0 | z_t, k] = mu_k + sqrt(ab) s_k^2 / (ab s_k^2 + 1 - ab) (z_t - sqrt(ab) mu_k)
        means = self.means[:, None] + gain[:, None, None] * (zt[None] - a * self.means[:, None])   # (K, N, D)
        return torch.einsum("nk,knd->nd", r, means)

    def cdf(self, z: Tensor) -> Tensor:
        """P(Z <= z) of a 1-D mixture, (N,). In 1-D the probability-flow ODE keeps the order of points, so its exact
        solution from level t to the data maps each point to the data's quantile at the point's cdf under q(z_t)."""
        if self.dim != 1:
            raise ValueError(f"cdf is for 1-D mixtures; this one has {self.dim} dimensions")
        z = z.double().reshape(-1, 1)                                           # (N, 1)
        # F(z) = sum_k pi_k Phi((z - mu_k) / s_k)
        return (self.weights * torch.special.ndtr((z - self.means[:, 0]) / self.stds)).sum(1)

    def quantile(self, u: Tensor, iterations: int = 200) -> Tensor:
        """The inverse of `cdf`, (N,), by bisection (the cdf rises, so halving the bracket always keeps the root)."""
        u = u.double().reshape(-1)
        spread = 12 * self.stds.max().item() + 1
        low = torch.full_like(u, self.means.min().item() - spread)
        high = torch.full_like(u, self.means.max().item() + spread)
        for _ in range(iterations):
            middle = (low + high) / 2
            below = self.cdf(middle) < u
            low, high = torch.where(below, middle, low), torch.where(below, high, middle)
        return (low + high) / 2

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws, (n, D): pick a component by its weight, then add its noise."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)   # (n,)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * noise


def tweedie_z0(zt: Tensor, score: Tensor, alpha_bar: float) -> Tensor:
    """Tweedie's formula: the posterior mean of z_0 from the score of q(z_t) alone."""
    # E[z_0 | z_t] = (z_t + (1 - ab) grad log q(z_t)) / sqrt(ab)
    return (zt + (1 - alpha_bar) * score) / math.sqrt(alpha_bar)


def eps_to_score(eps: Tensor, alpha_bar: float) -> Tensor:
    """The score a noise prediction stands for."""
    # grad log q(z_t) = -E[eps | z_t] / sqrt(1 - ab)
    return -eps / math.sqrt(1 - alpha_bar)


def pf_ode_slope(score_x: Tensor, sigma: float) -> Tensor:
    """The probability-flow ODE of x = z_0 + sigma eps (Song et al. 2021; Karras et al. 2022, eq. 4): the velocity
    that moves samples of p_sigma to samples of p_sigma' with no noise, written with the score of p_sigma(x)."""
    # dx/dsigma = -sigma grad_x log p_sigma(x)   ( = eps_hat: chapter 07's ode_derivative)
    return -sigma * score_x
