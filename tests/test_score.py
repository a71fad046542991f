"""The score view of chapters 07 and 08: the score of the noised data, Tweedie's formula, the probability-flow ODE
that DDIM discretises, and classifier-free guidance as the score of a tilted distribution. Checked on Gaussian
mixtures, whose every density is known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from minildm.ideal_denoiser import IdealDenoiser
from minildm.pipeline import guided_output
from minildm.samplers import make_sampler
from minildm.schedule import NoiseSchedule
from minildm.score import GaussianMixture, eps_to_score, pf_ode_slope, tweedie_z0

SCHEDULE = NoiseSchedule()                                                   # SD v1's
MIXTURE = GaussianMixture(weights=[0.2, 0.5, 0.3], means=[[-2.0, 0.5], [0.5, 1.0], [1.5, -1.0]],
                          stds=[0.3, 0.6, 0.2])
LINE = GaussianMixture(weights=[0.3, 0.7], means=[-1.5, 1.0], stds=[0.3, 0.5])   # 1-D

pytestmark = pytest.mark.usefixtures("one_thread")      # tests/conftest.py: tiny tensors, one thread


def autograd_score(mixture: GaussianMixture, z: torch.Tensor) -> torch.Tensor:
    """grad log p(z) by differentiating the closed-form log density: no score formula involved."""
    z = z.detach().clone().requires_grad_(True)
    mixture.log_prob(z).sum().backward()
    return z.grad


def grid(n: int = 41, seed: int = 0) -> torch.Tensor:
    return 2.5 * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_the_closed_form_score_is_the_gradient_of_the_log_density():
    for ab in (0.999, 0.5, 0.01):
        noised, z = MIXTURE.noised(ab), grid()
        assert torch.allclose(noised.score(z), autograd_score(noised, z), rtol=1e-10, atol=1e-12), ab


@pytest.mark.parametrize("t", [50, 400, 900])
def test_the_score_of_q_zt_is_minus_the_expected_noise_over_sqrt_one_minus_alpha_bar(t):
    # E[eps | z_t = z] by Monte Carlo, with no posterior formula: draw eps ~ N(0, 1), and weight each draw by the
    # data density at the z_0 it implies, z_0 = (z - sqrt(1 - ab) eps) / sqrt(ab) (self-normalised importance sampling)
    ab = SCHEDULE.alpha_bar_at(t)
    eps = torch.randn(100_000, 1, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
    for z in (-1.2, 0.1, 0.9):
        z0 = (z - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        w = LINE.log_prob(z0).exp()                                          # (N,)
        expected_eps = (w * eps[:, 0]).sum() / w.sum()
        # the estimator's standard error (delta method for a ratio)
        error = (w * (eps[:, 0] - expected_eps)).pow(2).sum().sqrt() / w.sum()
        score = LINE.noised(ab).score(torch.tensor([[z]], dtype=torch.float64))[0, 0]
        from_eps = eps_to_score(expected_eps, ab)
        assert abs(score - from_eps) < 4 * error / math.sqrt(1 - ab), (
            f"t = {t}, z = {z}: closed-form score {score:.5f}, -E[eps | z_t] / sqrt(1 - ab) = {from_eps:.5f} "
            f"+- {error / math.sqrt(1 - ab):.5f}")


def test_tweedie_from_the_score_is_the_posterior_mean_by_bayes():
    for ab in (0.99, 0.3, 0.02):
        z = grid(seed=1)
        tweedie = tweedie_z0(z, autograd_score(MIXTURE.noised(ab), z), ab)
        bayes = MIXTURE.posterior_mean(z, ab)
        assert torch.allclose(tweedie, bayes, rtol=1e-10, atol=1e-12), (ab, (tweedie - bayes).abs().max())


def test_the_ideal_denoiser_of_chapter_07_is_tweedies_formula_on_its_own_data():
    y = torch.randn(7, 4, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)   # K latents
    denoiser = IdealDenoiser(y, SCHEDULE)
    points = GaussianMixture(torch.full((7,), 1 / 7), y.flatten(1), torch.zeros(7))         # the data: 7 points
    for t in (30, 300, 800):
        ab = SCHEDULE.alpha_bar_at(t)
        zt = SCHEDULE.q_sample(y[[0, 2, 5]], t, torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(t),
                                                              dtype=torch.float64))
        score = autograd_score(points.noised(ab), zt.flatten(1))           # (3, 16)
        tweedie = tweedie_z0(zt.flatten(1), score, ab).view_as(zt)
        ideal = denoiser.z0_hat(zt, torch.full((3,), float(t)))
        assert torch.allclose(ideal, tweedie, rtol=1e-8, atol=1e-10), (t, (ideal - tweedie).abs().max())
        # and its eps is the score, scaled: eps = -sqrt(1 - ab) grad log q(z_t)
        eps = denoiser(zt, torch.full((3,), float(t))).flatten(1)
        assert torch.allclose(eps, -math.sqrt(1 - ab) * score, rtol=1e-7, atol=1e-9), t


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_one_ddim_step_is_one_euler_step_of_the_probability_flow_ode_in_x_and_sigma(spacing):
    # x = z_t / sqrt(ab) = z_0 + sigma eps has density p_sigma: the data mixture with each variance grown by sigma^2
    ddim = make_sampler("ddim", SCHEDULE, 10, timestep_spacing=spacing)
    z = grid(seed=2)
    for i in range(len(ddim.steps)):
        t = int(ddim.steps[i])
        ab, ab_next = SCHEDULE.alpha_bar_at(t), ddim.alpha_bar_after(i)
        sigma, sigma_next = math.sqrt((1 - ab) / ab), math.sqrt((1 - ab_next) / ab_next)
        eps = (z - math.sqrt(ab) * MIXTURE.posterior_mean(z, ab)) / math.sqrt(1 - ab)     # the exact eps
        z_ddim, _ = ddim.step(i, z, eps, None)
        x = z / math.sqrt(ab)
        p_sigma = GaussianMixture(MIXTURE.weights, MIXTURE.means, (MIXTURE.stds ** 2 + sigma ** 2).sqrt())
        # Euler: x_next = x + (sigma_next - sigma) dx/dsigma, the slope taken at the start
        x_next = x + (sigma_next - sigma) * pf_ode_slope(autograd_score(p_sigma, x), sigma)
        assert torch.allclose(z_ddim, math.sqrt(ab_next) * x_next, rtol=1e-9, atol=1e-11), (
            f"step {i} (t = {t}): DDIM and Euler differ by {(z_ddim - math.sqrt(ab_next) * x_next).abs().max():.2e}")
        z = z_ddim


def test_ddim_is_euler_not_the_solution_its_error_shrinks_with_the_step():
    # in 1-D the probability-flow ODE keeps the order of points, so its exact solution from t = 999 to the data maps
    # each z to the data's quantile at z's cdf under q(z_999). DDIM, an Euler method, only approaches it: the gap
    # shrinks about in proportion to the step (first order), and is not 0 at any finite number of steps
    z = torch.linspace(-2, 2, 9, dtype=torch.float64).view(-1, 1)
    exact = LINE.quantile(LINE.noised(SCHEDULE.alpha_bar_at(999)).cdf(z)).view(-1, 1)

    def ddim_run(n):
        ddim, x = make_sampler("ddim", SCHEDULE, n, timestep_spacing="linspace"), z
        for i in range(n):
            ab = SCHEDULE.alpha_bar_at(int(ddim.steps[i]))
            eps = (x - math.sqrt(ab) * LINE.posterior_mean(x, ab)) / math.sqrt(1 - ab)
            x, _ = ddim.step(i, x, eps, None)
        return x

    gaps = [(ddim_run(n) - exact).abs().max().item() for n in (10, 40, 160)]
    assert gaps[0] > gaps[1] > 2 * gaps[2] > 0, f"gaps to the exact solution at 10, 40, 160 steps: {gaps}"


def test_the_quantile_inverts_the_cdf():
    u = torch.tensor([1e-4, 0.1, 0.5, 0.9, 0.9999], dtype=torch.float64)
    assert torch.allclose(LINE.cdf(LINE.quantile(u)), u, atol=1e-12), LINE.cdf(LINE.quantile(u))


@pytest.mark.parametrize("w", [0.0, 1.0, 4.0, 7.5])
@pytest.mark.parametrize("negative", [False, True])
def test_guided_eps_is_the_score_of_the_tilted_mixture(w, negative):
    # two classes on a line: p(z_0 | c) for each, p(z_0) their half-and-half mixture. Guidance combines the answers
    # for the prompt c and for "" (or, with a negative prompt, for the class to avoid), and lands on
    # -sqrt(1 - ab) grad log [ p(z_t | c)^w p(z_t | other)^(1 - w) ]
    wanted = GaussianMixture([1.0], [1.2], [0.4])
    avoided = GaussianMixture([1.0], [-1.0], [0.5])
    unconditional = GaussianMixture([0.5, 0.5], [1.2, -1.0], [0.4, 0.5])
    other = avoided if negative else unconditional
    z = torch.linspace(-3, 3, 13, dtype=torch.float64).view(-1, 1)
    for ab in (0.9, 0.3):
        def eps_of(mixture):
            return (z - math.sqrt(ab) * mixture.posterior_mean(z, ab)) / math.sqrt(1 - ab)
        guided = guided_output(eps_of(other), eps_of(wanted), w)

        def tilted_log_density(x):
            return w * wanted.noised(ab).log_prob(x) + (1 - w) * other.noised(ab).log_prob(x)
        x = z.clone().requires_grad_(True)
        tilted_log_density(x).sum().backward()
        assert torch.allclose(guided, -math.sqrt(1 - ab) * x.grad, rtol=1e-9, atol=1e-11), (w, negative, ab)


def test_a_mixture_samples_its_own_mean_and_variance():
    draws = LINE.sample(200_000, torch.Generator().manual_seed(0))[:, 0]
    mean = (LINE.weights * LINE.means[:, 0]).sum()
    variance = (LINE.weights * (LINE.stds ** 2 + LINE.means[:, 0] ** 2)).sum() - mean ** 2
    assert abs(draws.mean() - mean) < 4 * (variance / len(draws)).sqrt(), (draws.mean(), mean)
    assert abs(draws.var() / variance - 1) < 0.02, (draws.var(), variance)


@pytest.mark.parametrize("call, message", [
    (lambda: GaussianMixture([0.5, 0.6], [0.0, 1.0], [1.0, 1.0]), "weights >= 0 that sum to 1"),
    (lambda: GaussianMixture([1.0], [0.0], [0.0]).log_prob(torch.zeros(1, 1)), "noise it first"),
    (lambda: MIXTURE.cdf(torch.zeros(1, 2)), "cdf is for 1-D mixtures; this one has 2"),
])
def test_bad_input_is_a_one_line_value_error_that_says_what_to_do(call, message):
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)
