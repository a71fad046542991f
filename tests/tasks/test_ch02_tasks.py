"""Chapter 02 exercises: PSNR, the ResBlock, the reparameterisation trick, the Gaussian KL and the scale factor.

Each test carries its task and points (`minildm grade` adds them up). Inputs are random over several seeds and
shapes; the invariants the chapter states are checked (KL of N(0, I) is 0, samples have the requested mean and
variance, gradients reach mean and logvar, gradcheck in float64), and where torch or diffusers already offers the
answer, calling it is forbidden.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from taskcheck import check_close, check_number, fail, forbid
from torch import nn

from minildm.autoencoder import DiagonalGaussian, ResBlock
from minildm.data import to_tensor_batch
from minildm.metrics import psnr
from minildm.train_vae import measure_scale_factor, step_generator

PSNR = "ch02.psnr"
RESBLOCK = "ch02.resblock"
REPARAM = "ch02.reparameterize"
KL = "ch02.gaussian_kl"
SCALE = "ch02.scale_factor"

FORBIDDEN_GAUSSIANS = ("torch.distributions:Normal", "torch:normal", "torch.distributions:kl_divergence",
                       "torch.distributions.kl:kl_divergence", "torch.nn.functional:kl_div",
                       "torch.nn.functional:gaussian_nll_loss",
                       "diffusers.models.autoencoders.vae:DiagonalGaussianDistribution")


def random_moments(seed: int, shape: tuple[int, int, int, int], dtype=torch.float32) -> torch.Tensor:
    """(B, 2C, h, w): means in N(0, 1) and log-variances in [-3, 2], well inside the clamp of [-30, 20]."""
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    mean = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    logvar = torch.rand(b, c, h, w, generator=g, dtype=torch.float64) * 5 - 3
    return torch.cat([mean, logvar], dim=1).to(dtype)


# -------------------------------------------------------------------------------------------------- ch02.psnr


@pytest.mark.task(PSNR)
@pytest.mark.points(2)
@pytest.mark.parametrize("seed, shape", [(0, (3, 3, 8, 8)), (1, (5, 1, 6, 10)), (2, (2, 3, 16, 16))])
def test_psnr_of_a_known_error_per_image(seed, shape):
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(shape, generator=g) * 0.8 + 0.1                     # in [0.1, 0.9]: no clamping happens
    step = torch.rand(shape[0], generator=g) * 0.09 + 0.01                 # one error size per image
    signs = torch.randint(0, 2, shape, generator=g) * 2 - 1
    noisy = clean + step.view(-1, 1, 1, 1) * signs                         # |error| = step everywhere, so MSE = step^2
    # PSNR = 10 log10(1 / MSE) = -20 log10(step), in [0, 1] units; the images are given in [-1, 1]
    expected = -20 * torch.log10(step)
    check_close(psnr(noisy * 2 - 1, clean * 2 - 1), expected, PSNR, f"psnr of {shape} images", atol=1e-3, rtol=1e-4)


@pytest.mark.task(PSNR)
@pytest.mark.points(1)
def test_psnr_of_identical_images_is_finite():
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    # MSE floored at 1e-10: 10 log10(1e10) = 100 dB
    check_close(psnr(x, x), torch.full((4,), 100.0), PSNR, "psnr(x, x)", atol=1e-3)


@pytest.mark.task(PSNR)
@pytest.mark.points(1)
def test_psnr_clamps_images_to_their_range_first():
    x = torch.zeros(2, 3, 4, 4)                          # 0.5 in [0, 1]
    x_hat = torch.full((2, 3, 4, 4), 3.0)                # clamped to 1, i.e. 1.0 in [0, 1]: MSE = 0.25
    check_close(psnr(x_hat, x), torch.full((2,), 10 * math.log10(4.0)), PSNR, "psnr with values beyond [-1, 1]",
                atol=1e-4)


# ---------------------------------------------------------------------------------------------- ch02.resblock


def randomised(block: ResBlock, seed: int) -> ResBlock:
    """Random weights everywhere, norms included, so that mixing up norm1 and norm2 shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            scale = 1.0 if name.startswith("norm") and name.endswith("weight") else 0.0      # norm gains near 1
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3 + scale)
    return block.eval()


def by_hand(block: ResBlock, x: torch.Tensor, groups: int) -> torch.Tensor:
    """The chapter's ResBlock from functional pieces and the block's own weights."""
    first = F.group_norm(x, groups, block.norm1.weight, block.norm1.bias, eps=block.norm1.eps)
    first = F.conv2d(F.silu(first), block.conv1.weight, block.conv1.bias, padding=1)
    second = F.group_norm(first, groups, block.norm2.weight, block.norm2.bias, eps=block.norm2.eps)
    second = F.conv2d(F.silu(second), block.conv2.weight, block.conv2.bias, padding=1)
    shortcut = x if isinstance(block.skip, nn.Identity) else F.conv2d(x, block.skip.weight, block.skip.bias)
    return shortcut + second


@pytest.mark.task(RESBLOCK)
@pytest.mark.points(3)
@pytest.mark.parametrize("seed, c_in, c_out, groups, h, w", [(0, 8, 8, 4, 6, 5), (1, 8, 16, 4, 7, 7),
                                                              (2, 16, 8, 8, 4, 9)])
def test_resblock_matches_the_chapter_computed_by_hand(monkeypatch, seed, c_in, c_out, groups, h, w):
    block = randomised(ResBlock(c_in, c_out, groups), seed)
    x = torch.randn(2, c_in, h, w, generator=torch.Generator().manual_seed(seed + 10))
    expected = by_hand(block, x, groups)
    forbid(monkeypatch, RESBLOCK, "diffusers.models.resnet:ResnetBlock2D")
    with torch.no_grad():
        check_close(block(x), expected, RESBLOCK, f"ResBlock({c_in}, {c_out}, groups={groups}) on {tuple(x.shape)}",
                    atol=1e-5, rtol=1e-4)


@pytest.mark.task(RESBLOCK)
@pytest.mark.points(1)
def test_resblock_applies_dropout_before_its_second_conv(monkeypatch):
    forbid(monkeypatch, RESBLOCK, "diffusers.models.resnet:ResnetBlock2D")
    block = randomised(ResBlock(8, 16, 4, dropout=1.0), 3).train()       # p = 1 zeroes whatever it sees
    x = torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(4))
    # everything reaching conv2 is zero, so only its bias is left on the residual path
    expected = F.conv2d(x, block.skip.weight, block.skip.bias) + block.conv2.bias.view(1, -1, 1, 1)
    with torch.no_grad():
        check_close(block(x), expected, RESBLOCK, "ResBlock with dropout p = 1 in training mode", atol=1e-5)


@pytest.mark.task(RESBLOCK)
@pytest.mark.points(2)
def test_resblock_gradients_pass_gradcheck_in_float64(monkeypatch):
    forbid(monkeypatch, RESBLOCK, "diffusers.models.resnet:ResnetBlock2D")
    block = randomised(ResBlock(4, 8, 2), 5).double()
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6), requires_grad=True)
    try:
        ok = torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-5, raise_exception=False)
    except NotImplementedError:
        raise
    except Exception as err:                              # noqa: BLE001 - report, not crash
        fail(RESBLOCK, f"gradcheck could not run the block: {type(err).__name__}: {err}")
    if not ok:
        fail(RESBLOCK, "the block's gradients (autograd) do not match finite differences in float64; is every step "
                       "a differentiable torch operation on the input?")


# ---------------------------------------------------------------------------------------- ch02.reparameterize


@pytest.mark.task(REPARAM)
@pytest.mark.points(2)
@pytest.mark.parametrize("seed, shape, dtype", [(0, (2, 4, 8, 8), torch.float32), (1, (3, 2, 5, 7), torch.float32),
                                                (2, (1, 4, 4, 4), torch.float64)])
def test_sample_is_mean_plus_std_times_the_generators_noise(monkeypatch, seed, shape, dtype):
    moments = random_moments(seed, shape, dtype)
    mean, logvar = moments.chunk(2, dim=1)
    forbid(monkeypatch, REPARAM, *FORBIDDEN_GAUSSIANS)
    z = DiagonalGaussian(moments).sample(torch.Generator().manual_seed(seed))
    again = DiagonalGaussian(moments).sample(torch.Generator().manual_seed(seed))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(dtype)
    check_close(z, mean + torch.exp(0.5 * logvar) * eps, REPARAM, f"sample() of a {dtype} posterior of shape "
                f"{tuple(mean.shape)}", atol=1e-6, rtol=1e-5, dtype=dtype)
    check_close(again, z, REPARAM, "a second sample() with a generator of the same seed", atol=0, rtol=0)


@pytest.mark.task(REPARAM)
@pytest.mark.points(1)
def test_samples_have_the_requested_mean_and_variance(monkeypatch):
    one = random_moments(7, (1, 2, 3, 3))
    mean, logvar = one.chunk(2, dim=1)
    forbid(monkeypatch, REPARAM, *FORBIDDEN_GAUSSIANS)
    n = 20_000
    z = DiagonalGaussian(one.expand(n, -1, -1, -1)).sample(torch.Generator().manual_seed(8))   # (n, 2, 3, 3)
    var = logvar.exp()[0]
    # the sample mean has standard error sqrt(var / n); the sample variance, about var * sqrt(2 / n)
    error = (z.mean(0) - mean[0]).abs() / (var / n).sqrt()
    if error.max() > 5:
        fail(REPARAM, f"the mean of {n:,} samples is {error.max():.1f} standard errors from `mean`; expected "
                      "within 5")
    ratio = z.var(0) / var
    if not ((ratio - 1).abs() < 5 * math.sqrt(2 / n)).all():
        fail(REPARAM, f"the variance of {n:,} samples / exp(logvar) ranges over [{ratio.min():.3f}, "
                      f"{ratio.max():.3f}]; expected 1 within {5 * math.sqrt(2 / n):.3f}")


@pytest.mark.task(REPARAM)
@pytest.mark.points(2)
@pytest.mark.parametrize("seed", [0, 1])
def test_gradients_reach_mean_and_logvar(monkeypatch, seed):
    moments = random_moments(seed, (2, 3, 4, 4), torch.float64).requires_grad_()
    forbid(monkeypatch, REPARAM, *FORBIDDEN_GAUSSIANS)
    posterior = DiagonalGaussian(moments)
    z = posterior.sample(torch.Generator().manual_seed(seed))
    if not z.requires_grad:
        fail(REPARAM, "the sample carries no gradient: build it from mean and std with torch operations")
    z.sum().backward()
    grad_mean, grad_logvar = moments.grad.chunk(2, dim=1)
    mean = moments.detach().chunk(2, dim=1)[0]
    # dz/dmean = 1 and dz/dlogvar = 1/2 std eps = 1/2 (z - mean)
    check_close(grad_mean, torch.ones_like(grad_mean), REPARAM, "d sum(z) / d mean", atol=1e-9)
    check_close(grad_logvar, 0.5 * (z.detach() - mean), REPARAM, "d sum(z) / d logvar", atol=1e-9, rtol=1e-7)


@pytest.mark.task(REPARAM)
@pytest.mark.points(1)
def test_sample_passes_gradcheck_in_float64(monkeypatch):
    forbid(monkeypatch, REPARAM, *FORBIDDEN_GAUSSIANS)
    moments = random_moments(3, (1, 2, 2, 3), torch.float64).requires_grad_()

    def draw(m):
        return DiagonalGaussian(m).sample(torch.Generator().manual_seed(4))

    if not torch.autograd.gradcheck(draw, (moments,), eps=1e-6, atol=1e-6, raise_exception=False):
        fail(REPARAM, "the sample's gradients do not match finite differences in float64")


# ------------------------------------------------------------------------------------------- ch02.gaussian_kl


@pytest.mark.task(KL)
@pytest.mark.points(2)
@pytest.mark.parametrize("seed, shape", [(0, (3, 4, 8, 8)), (1, (1, 2, 5, 3)), (2, (4, 8, 2, 2))])
def test_kl_matches_the_closed_form(monkeypatch, seed, shape):
    moments = random_moments(seed, shape, torch.float64)
    mean, logvar = moments.chunk(2, dim=1)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    forbid(monkeypatch, KL, *FORBIDDEN_GAUSSIANS)
    check_close(DiagonalGaussian(moments).kl(), expected, KL, f"kl() of a posterior of shape {tuple(mean.shape)}",
                atol=1e-9, rtol=1e-9)


@pytest.mark.task(KL)
@pytest.mark.points(1)
def test_kl_of_the_standard_normal_is_zero_and_positive_elsewhere(monkeypatch):
    forbid(monkeypatch, KL, *FORBIDDEN_GAUSSIANS)
    standard = torch.zeros(3, 8, 4, 4, dtype=torch.float64)                # mean 0, logvar 0: N(0, I) itself
    check_close(DiagonalGaussian(standard).kl(), torch.zeros(3, dtype=torch.float64), KL, "the KL of N(0, I)",
                atol=1e-12, rtol=0)
    kl = DiagonalGaussian(random_moments(5, (6, 4, 3, 3), torch.float64)).kl()
    if not (kl > 0).all():
        fail(KL, f"KL(q || N(0, I)) must be positive for q other than N(0, I); got {kl.tolist()}")


@pytest.mark.task(KL)
@pytest.mark.points(1)
def test_kl_is_one_number_per_item_summed_over_latent_dimensions(monkeypatch):
    forbid(monkeypatch, KL, *FORBIDDEN_GAUSSIANS)
    moments = random_moments(6, (2, 4, 3, 3), torch.float64)
    kl = DiagonalGaussian(moments).kl()
    changed = moments.clone()
    changed[1] = random_moments(7, (1, 4, 3, 3), torch.float64)[0]
    check_close(DiagonalGaussian(changed).kl()[0], kl[0], KL, "item 0's KL after changing item 1", atol=1e-12)
    mean, logvar = moments.chunk(2, dim=1)
    doubled = torch.cat([mean, mean, logvar, logvar], dim=1)               # every latent number twice
    check_close(DiagonalGaussian(doubled).kl(), 2 * kl, KL, "the KL with every latent channel duplicated",
                atol=1e-9, rtol=1e-9)


@pytest.mark.task(KL)
@pytest.mark.points(1)
def test_kl_passes_gradcheck_in_float64(monkeypatch):
    forbid(monkeypatch, KL, *FORBIDDEN_GAUSSIANS)
    moments = random_moments(8, (2, 2, 2, 2), torch.float64).requires_grad_()
    if not torch.autograd.gradcheck(lambda m: DiagonalGaussian(m).kl(), (moments,), eps=1e-6, atol=1e-6,
                                    raise_exception=False):
        fail(KL, "the KL's gradients do not match finite differences in float64")


# ------------------------------------------------------------------------------------------ ch02.scale_factor


class FakePosterior:
    def __init__(self, mean: torch.Tensor, std: float):
        self.mean, self.std = mean, std

    def sample(self, generator=None) -> torch.Tensor:
        return self.mean + self.std * torch.randn(self.mean.shape, generator=generator)


class FakeVAE(nn.Module):
    """Encodes an image to a 4x2x2 posterior whose mean depends on the image; records the batch sizes it saw."""

    def __init__(self, std: float, centred: bool = False):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))        # so next(vae.parameters()).device works
        self.std, self.centred, self.batches = std, centred, []

    def encode(self, x: torch.Tensor) -> FakePosterior:
        self.batches.append(len(x))
        level = torch.zeros(len(x)) if self.centred else x.mean(dim=(1, 2, 3))
        mean = level.view(-1, 1, 1, 1) * torch.arange(1.0, 5.0).view(1, 4, 1, 1) * torch.ones(1, 1, 2, 2)
        return FakePosterior(mean, self.std)


def pixels(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 8, 8, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def expected_scale(images: torch.Tensor, count: int, seed: int, std: float) -> float:
    """What the chapter asks for, from FakeVAE's own formula: the batch starting at image k draws its noise from
    step_generator(seed, k, 9)."""
    n = min(count, len(images))
    level = to_tensor_batch(images[:n].numpy()).mean(dim=(1, 2, 3))
    means = level.view(-1, 1, 1, 1) * torch.arange(1.0, 5.0).view(1, 4, 1, 1) * torch.ones(1, 1, 2, 2)
    noise = torch.cat([torch.randn((min(256, n - k), 4, 2, 2), generator=step_generator(seed, k, 9))
                       for k in range(0, n, 256)])
    return float(1 / (means + std * noise).std())


@pytest.mark.task(SCALE)
@pytest.mark.points(2)
@pytest.mark.parametrize("seed, count", [(3, 300), (4, 512)])
def test_scale_factor_is_one_over_the_std_of_posterior_samples(seed, count):
    images = pixels(600, seed)
    s = measure_scale_factor(FakeVAE(0.5), images, count=count, seed=seed)
    if not isinstance(s, float):
        fail(SCALE, f"measure_scale_factor returned a {type(s).__name__}; return a Python float (float(...))")
    check_number(s, expected_scale(images, count, seed, 0.5), SCALE,
                 f"the scale factor of the first {count} of 600 images", rel=1e-5)


@pytest.mark.task(SCALE)
@pytest.mark.points(1)
def test_scale_factor_encodes_the_first_count_images_in_batches_of_256():
    for count, n, batches in [(300, 600, [256, 44]), (10_000, 300, [256, 44]), (100, 600, [100])]:
        vae = FakeVAE(0.5)
        measure_scale_factor(vae, pixels(n, 5), count=count, seed=0)
        if vae.batches != batches:
            fail(SCALE, f"count={count} of {n} images: encode() saw batches of {vae.batches}; expected {batches}")


@pytest.mark.task(SCALE)
@pytest.mark.points(1)
def test_a_posterior_of_known_spread_gives_the_inverse_of_its_std():
    s = measure_scale_factor(FakeVAE(2.0, centred=True), pixels(512, 6), count=512, seed=1)
    check_number(s, 0.5, SCALE, "latents of mean 0 and std 2 (8,192 samples)", rel=0.03)
