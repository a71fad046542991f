"""The VAE's contract: latent shapes and the 48x claim, refusals with useful messages, and the posterior's maths
(KL, reparameterised sampling, gradients, clamping). Tiny configs; no diffusers needed."""

import re

import pytest
import torch

from minildm.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian, compression_ratio, latent_shape

TINY = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)   # f = 2


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(AutoencoderConfig(**TINY)).eval()


def posterior(mean: torch.Tensor, logvar: torch.Tensor) -> DiagonalGaussian:
    return DiagonalGaussian(torch.cat([mean, logvar], dim=1))


@pytest.mark.parametrize(
    "height, width, config, expected",
    [
        (512, 512, None, (4, 64, 64)),
        (768, 512, None, (4, 96, 64)),
        (64, 64, AutoencoderConfig.shapes64(), (4, 8, 8)),
    ],
)
def test_latent_shape_is_latent_channels_by_size_over_f(height, width, config, expected):
    assert latent_shape(height, width, config) == expected


def test_latent_shape_refuses_size_not_divisible_by_8_and_suggests_one():
    with pytest.raises(ValueError, match="500x512") as err:
        latent_shape(500, 512)
    suggestion = re.search(r"use (\d+)x(\d+)", str(err.value))
    assert suggestion, f"no suggested size in: {err.value}"
    h, w = int(suggestion[1]), int(suggestion[2])
    assert h % 8 == 0 and w % 8 == 0 and abs(h - 500) < 8 and w == 512, f"bad suggestion {h}x{w}: {err.value}"


def test_sd_compresses_512x512_images_48_times():
    # 512 * 512 * 3 = 786,432 pixel values vs 4 * 64 * 64 = 16,384 latent values
    assert compression_ratio(512, 512) == 48


@pytest.mark.parametrize(
    "x, words",
    [
        (torch.zeros(1, 1, 8, 8), "channels"),                                  # greyscale
        (torch.zeros(3, 8, 8), "(B, C, H, W)"),                                 # no batch dimension
        (torch.full((1, 3, 8, 8), float("nan")), "NaN"),
        (torch.full((1, 3, 8, 8), float("inf")), "Inf"),
    ],
)
def test_encode_refuses_images_it_cannot_take(x, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        tiny_vae().encode(x)


def test_encode_and_decode_shapes_for_non_square_images():
    vae = tiny_vae()
    with torch.no_grad():
        dist = vae.encode(torch.rand(2, 3, 6, 10) * 2 - 1)
        assert dist.mean.shape == dist.logvar.shape == (2, 4, 3, 5)
        assert vae.decode(torch.randn(2, 4, 3, 5)).shape == (2, 3, 6, 10)


def test_kl_of_standard_normal_posterior_is_exactly_zero():
    dist = DiagonalGaussian(torch.zeros(2, 8, 3, 5))
    assert torch.equal(dist.kl(), torch.zeros(2))


def test_kl_matches_torch_distributions_in_float64():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)
    logvar = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, torch.exp(0.5 * logvar)),
        torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean)),
    ).sum(dim=(1, 2, 3))
    got = posterior(mean, logvar).kl()
    err = (got - expected).abs().max().item()
    assert err <= 1e-12 * expected.abs().max().item(), f"KL max abs error {err:.3g}; ours {got}, torch {expected}"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reparameterised_samples_have_the_posterior_mean_and_variance(seed):
    n = 20000                                                                # draws per latent channel
    mean_c = torch.tensor([0.0, 1.5, -2.0, 0.3], dtype=torch.float64)
    logvar_c = torch.tensor([0.0, -1.0, 1.0, -3.0], dtype=torch.float64)
    dist = posterior(mean_c.view(1, 4, 1, 1).expand(n, 4, 1, 1), logvar_c.view(1, 4, 1, 1).expand(n, 4, 1, 1))
    z = dist.sample(torch.Generator().manual_seed(seed)).view(n, 4)          # (n, 4)
    var_c = logvar_c.exp()
    # standard errors of the sample mean and the sample variance of n Gaussian draws; allow 5 of them
    mean_tol = 5 * (var_c / n).sqrt()
    var_tol = 5 * var_c * (2 / (n - 1)) ** 0.5
    mean_err, var_err = (z.mean(0) - mean_c).abs(), (z.var(0) - var_c).abs()
    assert (mean_err <= mean_tol).all(), f"sample means off by {mean_err.tolist()}, tolerance {mean_tol.tolist()}"
    assert (var_err <= var_tol).all(), f"sample variances off by {var_err.tolist()}, tolerance {var_tol.tolist()}"


def test_gradients_flow_to_mean_and_logvar_through_sample():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(1, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(1, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)

    def f(mean, logvar):
        z = posterior(mean, logvar).sample(torch.Generator().manual_seed(1))  # same eps on every call
        return (z * z.sin()).sum()

    assert torch.autograd.gradcheck(f, (mean, logvar))
    f(mean, logvar).backward()
    assert mean.grad.abs().sum() > 0 and logvar.grad.abs().sum() > 0, "sample() cut the gradient"


def test_logvar_is_clamped_to_minus_30_and_20():
    logvar = torch.tensor([-100.0, -30.0, 0.0, 20.0, 100.0]).view(1, 5, 1, 1)
    dist = posterior(torch.zeros_like(logvar), logvar)
    assert dist.logvar.flatten().tolist() == [-30.0, -30.0, 0.0, 20.0, 20.0]
    assert torch.isfinite(dist.std).all() and (dist.std > 0).all()
    assert torch.isfinite(dist.kl()).all()


def test_same_generator_seed_gives_same_sample():
    dist = DiagonalGaussian(torch.randn(2, 8, 3, 5, generator=torch.Generator().manual_seed(0)))
    a = dist.sample(torch.Generator().manual_seed(42))
    b = dist.sample(torch.Generator().manual_seed(42))
    c = dist.sample(torch.Generator().manual_seed(43))
    assert torch.equal(a, b), "the same seed gave different samples"
    assert not torch.equal(a, c), "different seeds gave the same sample"


def test_reconstruct_is_decode_of_the_posterior_mean_and_from_folder_round_trips(tmp_path):
    from minildm.saving import save_model

    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4)).eval()
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae.reconstruct(x), vae.decode(vae.encode(x).mean))
        save_model(tmp_path / "vae", vae, vae.config.to_dict())
        again = AutoencoderKL.from_folder(tmp_path / "vae").eval()
        assert torch.equal(again.reconstruct(x), vae.reconstruct(x))
