"""Chapter 01's measurements: PCA spectra, intrinsic dimension (TwoNN, Levina-Bickel) and interpolation."""

import math

import pytest
import torch
import torch.nn.functional as F

from minildm import manifold
from minildm.autoencoder import AutoencoderConfig, AutoencoderKL
from minildm.data import ShapeFactors, ShapesDataset, render, to_tensor

SHAPES_N, SHAPES_SEED = 1500, 0


@pytest.fixture(scope="module")
def shapes() -> torch.Tensor:
    """1,500 Shapes images of seed 0, rendered once for the whole module: (1500, 3, 64, 64)."""
    return ShapesDataset(seed=SHAPES_SEED).images(0, SHAPES_N)


@pytest.fixture(scope="module")
def shapes_twonn(shapes) -> manifold.TwoNNResult:
    """TwoNN on those images, computed once (1500^2 x 12,288 multiply-adds in float64: the module's costliest step)."""
    return manifold.twonn_dimension(shapes)


def embed(points: torch.Tensor, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Put (N, d) points into R^dim by padding with zeros and applying a random rotation: distances unchanged."""
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    padded = torch.cat([points, points.new_zeros(points.shape[0], dim - points.shape[1])], dim=1)
    return padded @ rotation


def sphere(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """n points uniform on the d-sphere S^d (a d-dimensional manifold without boundary) in R^(d+1)."""
    return F.normalize(torch.randn(n, d + 1, generator=generator, dtype=torch.float64), dim=1)


def close(estimate: float, d: int, rel: float) -> bool:
    return abs(estimate - d) <= rel * d


# ---------------------------------------------------------------------------------------------------- PCA


@pytest.mark.parametrize("n, dim", [(60, 200), (200, 30)])  # the Gram branch (D > N) and the covariance branch
def test_pca_ratios_sum_to_one_descend_and_match_the_svd(n, dim):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, dim, dtype=torch.float64)
    ratios = manifold.pca_spectrum(x)
    assert ratios.shape == (min(n, dim),)
    assert abs(ratios.sum().item() - 1) < 1e-12, f"ratios sum to {ratios.sum().item()}"
    assert (ratios[1:] <= ratios[:-1]).all(), "ratios are not in descending order"
    singular = torch.linalg.svdvals(x - x.mean(dim=0))
    expected = singular**2 / (singular**2).sum()
    err = (ratios[: len(expected)] - expected).abs().max().item()
    assert err < 1e-12, f"PCA ratios differ from the SVD's s^2 / sum s^2 by up to {err:.2e}"


@pytest.mark.parametrize("n, dim", [(150, 400), (300, 40)])
def test_pca_of_data_in_a_7_dim_subspace_has_exactly_7_nonzero_ratios(n, dim):
    g = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(dim, 7, generator=g, dtype=torch.float64))   # (D, 7) orthonormal
    x = torch.randn(n, 7, generator=g, dtype=torch.float64) @ basis.T + 5.0              # an affine 7-dim subspace
    ratios = manifold.pca_spectrum(x)
    assert ratios[:7].min() > 1e-3, f"the 7 real directions carry too little variance: {ratios[:7].tolist()}"
    assert ratios[7:].max() < 1e-12, f"directions beyond the 7th are not empty: max ratio {ratios[7:].max().item():.2e}"
    assert manifold.components_for_variance(ratios, 1.0) == 7


def test_components_for_variance_counts_the_smallest_k_that_reaches_the_fraction():
    ratios = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    got = [manifold.components_for_variance(ratios, f) for f in (0.4, 0.5, 0.8, 0.81, 0.9, 0.99, 1.0)]
    assert got == [1, 1, 2, 3, 3, 4, 4], got
    with pytest.raises(ValueError, match="fraction"):
        manifold.components_for_variance(ratios, 90)


# ---------------------------------------------------------------------------------------- intrinsic dimension


@pytest.mark.parametrize("d", [2, 4, 8])
def test_twonn_and_mle_recover_the_dimension_of_a_sphere_within_15_percent(d):
    g = torch.Generator().manual_seed(0)
    x = embed(sphere(1000, d, g), 32, g)
    twonn = manifold.twonn_dimension(x)
    levina_bickel = manifold.mle_dimension(x, k=10)
    assert close(twonn.dimension, d, 0.15), f"TwoNN fit {twonn.dimension:.2f} for a {d}-sphere"
    assert close(twonn.mle, d, 0.15), f"TwoNN MLE {twonn.mle:.2f} for a {d}-sphere"
    assert close(levina_bickel, d, 0.15), f"Levina-Bickel MLE {levina_bickel:.2f} for a {d}-sphere"
    assert close(manifold.mle_dimension(x, k=range(10, 21)), d, 0.15)


@pytest.mark.parametrize("d", [2, 4, 8])
def test_twonn_recovers_the_dimension_of_a_hypercube_within_15_percent(d):
    # The cube has a boundary, where a point's neighbours all lie on one side; that biases every estimator down
    # as d grows (measured for d = 8, N = 2000: TwoNN 7.2, Levina-Bickel k=10 6.8). TwoNN stays within 15%.
    g = torch.Generator().manual_seed(0)
    x = embed(torch.rand(2000, d, generator=g, dtype=torch.float64), 32, g)
    twonn = manifold.twonn_dimension(x)
    assert close(twonn.dimension, d, 0.15), f"TwoNN fit {twonn.dimension:.2f} for a {d}-cube"


def test_twonn_drops_duplicate_points_with_a_warning_instead_of_dividing_by_zero():
    g = torch.Generator().manual_seed(0)
    x = embed(sphere(500, 2, g), 10, g)
    x = torch.cat([x, x[:40]])                                     # 40 exact copies: their r_1 would be 0
    with pytest.warns(UserWarning, match="dropped 40 duplicate"):
        result = manifold.twonn_dimension(x)
    assert result.num_duplicates == 40 and result.num_points == 500
    assert math.isfinite(result.dimension) and close(result.dimension, 2, 0.15), result


def test_bad_arguments_raise_value_errors_that_say_what_was_given():
    x = torch.randn(50, 4)
    with pytest.raises(ValueError, match="at least 3 points"):
        manifold.twonn_dimension(x[:2])
    with pytest.raises(ValueError, match="discard_fraction"):
        manifold.twonn_dimension(x, discard_fraction=1.0)
    with pytest.raises(ValueError, match="k must be at least 2"):
        manifold.mle_dimension(x, k=1)
    with pytest.raises(ValueError, match="k=60 for N=50"):
        manifold.mle_dimension(x, k=60)


def test_shapes_images_have_a_low_intrinsic_dimension_and_noise_a_high_one(shapes, shapes_twonn):
    # Measured (N = 1500, seed 0): TwoNN fit 8.8 (its MLE 8.3), Levina-Bickel k=10 8.5; uniform noise of the same
    # size: 733 (N = 1500) / 671 (N = 500), the estimators saturating far below 12,288 for lack of points.
    # Why ~8 and not the 4 continuous factors (size, x, y, rotation)? Shapes have sharp edges: moving one by delta
    # pixels changes ~perimeter * delta pixels, so the pixel distance grows like sqrt(delta), not delta (Wakin,
    # Donoho, Choi & Baraniuk 2005, "non-differentiable image manifolds"). Every ratio r_2 / r_1 is square-rooted
    # and log(mu) halves, so TwoNN reads about 2 x 4 = 8. Hence the bounds: at least the 4 factors, at most 12.
    twonn = shapes_twonn
    levina_bickel = manifold.mle_dimension(shapes[:500], k=10)    # 500 points: a ninth of the cost; measured 8.6
    assert 4 <= twonn.dimension <= 12, f"TwoNN on Shapes: {twonn.dimension:.2f}"
    assert 4 <= levina_bickel <= 12, f"Levina-Bickel on Shapes: {levina_bickel:.2f}"
    noise = manifold.random_noise_images(500, 64, torch.Generator().manual_seed(0))
    noise_dimension = manifold.twonn_dimension(noise).dimension
    assert noise_dimension > 20 * twonn.dimension, f"noise {noise_dimension:.1f} vs Shapes {twonn.dimension:.1f}"


def test_blurring_shapes_lowers_the_estimate_towards_the_factor_count(shapes, shapes_twonn):
    # The sqrt(delta) law holds for shifts larger than the blur; at 8x8 (each pixel averages 8x8) neighbours move
    # less than a pixel and distances grow like delta again: measured 5.1, near the 3-4 continuous factors.
    sharp = shapes_twonn.dimension
    blurred = manifold.twonn_dimension(F.avg_pool2d(shapes, 8)).dimension
    assert blurred < sharp - 2, f"blurred {blurred:.2f} vs sharp {sharp:.2f}"
    assert 3 <= blurred <= 6.5, f"blurred Shapes: {blurred:.2f}"


def test_pca_of_shapes_needs_few_components_and_of_noise_nearly_all(shapes):
    # Measured (seed 0): 9 components hold 90% of the variance (the first, dark vs light background, 77%); 267
    # hold 99% (N = 1000; 312 for N = 1500); noise (N = 500) needs 429 of its 499 components for 90%.
    ratios = manifold.pca_spectrum(shapes[:1000])                  # 1,000 images: half the cost of 1,500
    k90, k99 = manifold.components_for_variance(ratios, 0.9), manifold.components_for_variance(ratios, 0.99)
    assert k90 <= 30 and k99 <= 500, f"Shapes need {k90} components for 90%, {k99} for 99%"
    noise = manifold.random_noise_images(500, 64, torch.Generator().manual_seed(0))
    noise_k90 = manifold.components_for_variance(manifold.pca_spectrum(noise), 0.9)
    assert noise_k90 > 400, f"noise needs only {noise_k90} components for 90%"


def test_random_noise_images_are_uniform_in_range_and_reproducible():
    a = manifold.random_noise_images(4, 16, torch.Generator().manual_seed(3))
    b = manifold.random_noise_images(4, 16, torch.Generator().manual_seed(3))
    assert a.shape == (4, 3, 16, 16) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1 and abs(a.mean().item()) < 0.1


# ------------------------------------------------------------------------------------------- interpolation


def two_red_circles() -> tuple[torch.Tensor, torch.Tensor]:
    """The same medium red circle on a dark background, once at the left and once at the right."""
    left = ShapeFactors("circle", "red", 0.25, 0.3, 0.5, 0.0)
    right = ShapeFactors("circle", "red", 0.25, 0.7, 0.5, 0.0)
    return to_tensor(render([left], "dark")), to_tensor(render([right], "dark"))


def test_interpolate_pixels_is_the_straight_line_between_the_images():
    x0, x1 = two_red_circles()
    frames = manifold.interpolate_pixels(x0, x1, 5)
    assert frames.shape == (5, 3, 64, 64)
    assert torch.equal(frames[0], x0) and torch.allclose(frames[-1], x1, atol=1e-6)
    assert torch.allclose(frames[2], (x0 + x1) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        manifold.interpolate_pixels(x0, x1[:, :32], 5)


def test_pixel_midpoints_are_double_exposures_and_real_images_are_not(shapes):
    # Real Shapes images have no 3x3 block of off-palette pixels at all (measured: ghost fraction 0 for all 1,500),
    # so the calibrated threshold is 0; the midpoint of two red circles has ~30% ghost pixels.
    threshold = manifold.ghost_threshold(shapes)
    assert not manifold.double_exposures(shapes, threshold).any()
    x0, x1 = two_red_circles()
    frames = manifold.interpolate_pixels(x0, x1, 9)
    flagged = manifold.double_exposures(frames, threshold)
    assert flagged.tolist() == [False] + [True] * 7 + [False], f"flags {flagged.tolist()}"
    assert manifold.ghost_fraction(frames[4:5]).item() > 0.1
    # the second measure: the midpoint is far from every real image, the endpoints are real images
    distance = manifold.nearest_real_distance(frames, torch.cat([shapes[:500], x0[None], x1[None]]))
    assert distance[0] < 1e-6 and distance[-1] < 1e-6, distance
    assert distance[4] > 0.1 and distance[4] == distance.max(), distance


def test_slerp_keeps_the_norm_and_hits_both_ends():
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(4, 2, 2, generator=g, dtype=torch.float64)
    z1 = torch.randn(4, 2, 2, generator=g, dtype=torch.float64)
    z1 = z1 * z0.norm() / z1.norm()                                 # equal norms: slerp stays on the sphere
    path = manifold.slerp(z0, z1, torch.linspace(0, 1, 7, dtype=torch.float64))
    assert path.shape == (7, 4, 2, 2)
    assert torch.allclose(path[0], z0) and torch.allclose(path[-1], z1)
    norms = path.flatten(1).norm(dim=1)
    assert torch.allclose(norms, z0.norm().expand(7)), f"norms along the path: {norms.tolist()}"
    same = manifold.slerp(z0, z0, torch.tensor([0.5], dtype=torch.float64))   # parallel: falls back to the line
    assert torch.allclose(same[0], z0)


@pytest.fixture(scope="module")
def tiny_vae() -> AutoencoderKL:
    """An untrained VAE, narrow but with SD's f = 8: enough to check the plumbing, not the picture."""
    torch.manual_seed(0)
    config = AutoencoderConfig(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
    return AutoencoderKL(config).eval()


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_interpolate_latents_decodes_every_step_of_the_latent_path(tiny_vae, method):
    vae = tiny_vae
    x0, x1 = (x[:, :32, :32] for x in two_red_circles())
    frames = manifold.interpolate_latents(vae, x0, x1, 4, method=method)
    assert frames.shape == (4, 3, 32, 32) and frames.min() >= -1 and frames.max() <= 1
    with torch.no_grad():
        ends = vae.decode(vae.encode(torch.stack([x0, x1])).mean).clamp(-1, 1)
    err = (frames[[0, -1]] - ends).abs().max().item()
    assert err < 1e-4, f"the path's ends differ from decode(encode(x).mean) by {err:.2e}"
    with pytest.raises(ValueError, match="'linear' or 'slerp'"):
        manifold.interpolate_latents(vae, x0, x1, 4, method="cubic")


def test_walk_thresholds_judge_pixels_against_real_images_and_decoded_frames_against_reconstructions():
    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4)).eval()
    real = ShapesDataset(24, seed=3, image_size=32).images()
    thresholds = manifold.walk_thresholds(vae, real)
    with torch.no_grad():
        recon = vae.reconstruct(real).clamp(-1, 1)
    assert thresholds["pixels"] == manifold.ghost_threshold(real)
    assert thresholds["latents"] == pytest.approx(manifold.ghost_threshold(recon))
    assert thresholds["latents"] > thresholds["pixels"], "an untrained VAE's reconstructions are all ghost"
