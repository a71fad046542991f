"""Chapter 01 exercises: latent shape arithmetic and the TwoNN dimension.

Each test carries its task and points (`minildm grade` adds them up). Inputs are random over several seeds and
sizes, and the properties the chapter states are checked, so an answer that only fits one example does not pass.
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from taskcheck import check_number, fail

from minildm.autoencoder import AutoencoderConfig, latent_shape
from minildm.manifold import twonn_dimension

LATENT = "ch01.latent_shape"
TWONN = "ch01.twonn"


def random_config(seed: int) -> AutoencoderConfig:
    g = torch.Generator().manual_seed(seed)
    levels = int(torch.randint(1, 6, (), generator=g))
    channels = int(torch.randint(1, 17, (), generator=g))
    return AutoencoderConfig(block_out_channels=(8,) * levels, latent_channels=channels, norm_num_groups=4)


# ------------------------------------------------------------------------------------------ ch01.latent_shape


@pytest.mark.task(LATENT)
@pytest.mark.points(1)
def test_latent_shape_of_stable_diffusion_v1_sizes():
    for (h, w), want in {(512, 512): (4, 64, 64), (640, 448): (4, 80, 56), (768, 512): (4, 96, 64),
                         (64, 64): (4, 8, 8)}.items():
        got = latent_shape(h, w)                           # no config: SD v1's f = 8, C = 4
        if tuple(got) != want:
            fail(LATENT, f"latent_shape({h}, {w}) with the default config: got {got}, expected {want}")


@pytest.mark.task(LATENT)
@pytest.mark.points(2)
@pytest.mark.parametrize("seed", range(4))
def test_latent_shape_follows_any_config(seed):
    config = random_config(seed)
    f, c = 2 ** (len(config.block_out_channels) - 1), config.latent_channels
    g = torch.Generator().manual_seed(100 + seed)
    for _ in range(5):
        h, w = (int(torch.randint(1, 20, (), generator=g)) * f for _ in range(2))
        got = latent_shape(h, w, config)
        if tuple(got) != (c, h // f, w // f):
            fail(LATENT, f"latent_shape({h}, {w}) with {len(config.block_out_channels)} levels (f = {f}) and "
                         f"{c} latent channels: got {got}, expected {(c, h // f, w // f)}")


@pytest.mark.task(LATENT)
@pytest.mark.points(2)
@pytest.mark.parametrize("size", [(600, 450), (63, 64), (512, 100), (0, 64), (64, -8)])
def test_a_size_the_vae_cannot_halve_is_a_value_error_that_names_one_that_works(size):
    h, w = size
    try:
        got = latent_shape(h, w)
    except ValueError as err:
        works = [(int(a), int(b)) for a, b in re.findall(r"(\d+)\s*x\s*(\d+)", str(err))
                 if int(a) > 0 and int(b) > 0 and int(a) % 8 == 0 and int(b) % 8 == 0]
        if not works:
            fail(LATENT, f"latent_shape({h}, {w}) raised ValueError({str(err)!r}), which names no size HxW that "
                         "the VAE can take; suggest one (e.g. the nearest multiples of f)")
        return
    fail(LATENT, f"latent_shape({h}, {w}) returned {got}; expected a ValueError, since 8 does not divide the size")


# -------------------------------------------------------------------------------------------------- ch01.twonn


def embedded(n: int, d: int, dim: int, seed: int) -> torch.Tensor:
    """n Gaussian points on a random d-dimensional plane in R^dim: intrinsic dimension d."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ basis[:d]


@pytest.mark.task(TWONN)
@pytest.mark.points(2)
@pytest.mark.parametrize("discard", [0.0, 0.5])
def test_twonn_on_five_points_worked_by_hand(discard):
    # points 0, 1, 3, 7, 15 on a line: (r1, r2) = (1, 3), (1, 2), (2, 3), (4, 6), (8, 12),
    # so the sorted ratios mu are 1.5, 1.5, 1.5, 2, 3 and N = 5
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0], [15.0]], dtype=torch.float64)
    log_mu = [math.log(1.5), math.log(1.5), math.log(1.5), math.log(2), math.log(3)]
    mle = (5 - 1) / sum(log_mu)
    # the fit takes the smallest min(int(N (1 - discard)), N - 1) ratios; the i-th sits at F = i / 5,
    # where -log(1 - F) = log(5 / (5 - i))
    keep = 4 if discard == 0.0 else 2
    y = [math.log(5 / (5 - i)) for i in range(1, keep + 1)]
    slope = sum(a * b for a, b in zip(log_mu, y)) / sum(a * a for a in log_mu[:keep])
    result = twonn_dimension(x, discard_fraction=discard)
    check_number(result.mle, mle, TWONN, "the maximum-likelihood estimate (.mle) of the five points", rel=1e-9)
    check_number(result.dimension, slope, TWONN, f"the fitted slope (.dimension), discard_fraction={discard}",
                 rel=1e-9)
    if (result.num_points, result.num_duplicates) != (5, 0):
        fail(TWONN, f"num_points, num_duplicates = {result.num_points}, {result.num_duplicates}; expected 5, 0")


@pytest.mark.task(TWONN)
@pytest.mark.points(2)
@pytest.mark.parametrize("d", [2, 5])
def test_twonn_finds_the_dimension_of_a_flat_plane_in_thirty_dimensions(d):
    result = twonn_dimension(embedded(2000, d, 30, seed=d))
    for name, value in (("dimension", result.dimension), ("mle", result.mle)):
        if not abs(value - d) <= 0.1 * d:
            fail(TWONN, f"2,000 points on a {d}-dimensional plane in R^30: .{name} = {value:.3f}, expected {d} "
                        "within 10%")


@pytest.mark.task(TWONN)
@pytest.mark.points(1)
def test_twonn_does_not_change_when_the_points_are_rotated_scaled_and_moved():
    x = embedded(400, 4, 10, seed=7)
    rotation, _ = torch.linalg.qr(torch.randn(10, 10, generator=torch.Generator().manual_seed(8), dtype=torch.float64))
    before, after = twonn_dimension(x), twonn_dimension(3.0 * x @ rotation + 5.0)
    check_number(after.mle, before.mle, TWONN, "the MLE after rotating, scaling by 3 and shifting by 5", rel=1e-6)
    check_number(after.dimension, before.dimension, TWONN, "the slope after rotating, scaling and shifting", rel=1e-6)


@pytest.mark.task(TWONN)
@pytest.mark.points(1)
def test_twonn_drops_duplicate_points_and_counts_them():
    x = embedded(300, 3, 6, seed=9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = twonn_dimension(torch.cat([x, x[:25]]))
    if not caught:
        fail(TWONN, "25 duplicate points were dropped without a warning; warn the user (drop_duplicates does)")
    clean = twonn_dimension(x)
    if (result.num_points, result.num_duplicates) != (300, 25):
        fail(TWONN, f"300 points plus 25 copies: num_points, num_duplicates = {result.num_points}, "
                    f"{result.num_duplicates}; expected 300, 25")
    check_number(result.mle, clean.mle, TWONN, "the MLE with duplicates dropped", rel=1e-9)
