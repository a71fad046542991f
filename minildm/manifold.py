"""Chapter 01: the manifold hypothesis, measured.

A 64x64x3 image has 12,288 numbers, yet a Shapes image is fixed by a handful of them: size, x, y and rotation (plus
which kind, colour and background). The manifold hypothesis says real images lie near such a low-dimensional
surface in pixel space. Here we measure it three ways: the PCA spectrum (how many linear directions hold the
variance), intrinsic-dimension estimators that need no linearity (TwoNN, Levina-Bickel MLE), and interpolation
(walking a straight line in pixel space leaves the surface: a cross-fade is a double exposure, not a shape).

Shapes: a point cloud is (N, D); images are (B, 3, H, W) in [-1, 1].
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from minildm.data import BACKGROUNDS, COLOURS
from minildm.pipeline import guided_model_fn
from minildm.samplers import ddim_invert, make_sampler


def as_points(x: Tensor) -> Tensor:
    """Any batch (N, ...) -> (N, D) float64 points, so that the identities below hold to ~1e-12."""
    if x.ndim < 2 or x.shape[0] < 3:
        raise ValueError(f"expected a batch of at least 3 points, shape (N, D) or (N, C, H, W); got {tuple(x.shape)}")
    return x.detach().reshape(x.shape[0], -1).to(torch.float64)


# ---------------------------------------------------------------------------------------------- PCA spectrum


def pca_spectrum(x: Tensor) -> Tensor:
    """Explained-variance ratios of the principal components, largest first: (min(N, D),), summing to 1.

    The variance along principal component i is s_i^2 / (N - 1), s_i the singular values of the centred data.
    When D >> N (12,288 pixels, a few thousand images) we take them from the N x N Gram matrix X X^T, whose
    eigenvalues are the same s_i^2: an N^2 D product instead of a D x D covariance (Sirovich's "snapshot" trick, 1987).
    """
    points = as_points(x)
    centred = points - points.mean(dim=0)                          # (N, D)
    n, d = centred.shape
    # s_i^2 = eig(X X^T) = eig(X^T X): pick the smaller of the two square matrices
    gram = centred @ centred.T if d > n else centred.T @ centred   # (min(N,D), min(N,D))
    variances = torch.linalg.eigvalsh(gram).flip(0).clamp(min=0)   # descending; round-off can dip below 0
    # ratio_i = s_i^2 / sum_j s_j^2
    return variances / variances.sum()


def components_for_variance(ratios: Tensor, fraction: float) -> int:
    """How many principal components explain `fraction` (e.g. 0.9) of the variance: the smallest k with
    ratio_1 + ... + ratio_k >= fraction."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], e.g. 0.9 for 90% of the variance; got {fraction}")
    cumulative = torch.cumsum(ratios.to(torch.float64), dim=0)
    # the first index where the cumulative sum reaches the fraction (less a rounding error: 0.5 + 0.3 may be 0.7999...)
    k = int(torch.searchsorted(cumulative, torch.tensor([fraction - 1e-12], dtype=torch.float64)).item()) + 1
    return min(k, len(ratios))


# ---------------------------------------------------------------------------------------- nearest neighbours


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """All squared distances between rows of a (M, D) and b (N, D): (M, N), in their (float64) dtype.

    ||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b turns the search into one matrix product (fast BLAS, as torch.cdist
    does); in float64, on centred data, the cancellation costs nothing we can see.
    """
    # d_ij^2 = |a_i|^2 + |b_j|^2 - 2 a_i . b_j
    sq = (a * a).sum(dim=1)[:, None] + (b * b).sum(dim=1)[None, :] - 2 * a @ b.T
    return sq.clamp(min=0)                                         # round-off can dip just below 0


def nearest_distances(x: Tensor, k: int, chunk: int = 512) -> Tensor:
    """Distances from every point to its k nearest *other* points, ascending: (N, k), float64.

    Done in chunks of rows so that N = 4,000 needs a (512, N) block at a time, not an N x N matrix.
    """
    points = as_points(x)
    points = points - points.mean(dim=0)                           # distances do not change; round-off shrinks
    n = points.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"need 1 <= k < N neighbours; got k={k} for N={n} points")
    out = torch.empty(n, k, dtype=torch.float64)
    for start in range(0, n, chunk):
        rows = points[start:start + chunk]                         # (c, D)
        sq = squared_distances(rows, points)                       # (c, N)
        sq[torch.arange(len(rows)), torch.arange(start, start + len(rows))] = math.inf     # not your own neighbour
        out[start:start + chunk] = sq.topk(k, dim=1, largest=False).values.sqrt()
    return out


def drop_duplicates(x: Tensor) -> tuple[Tensor, int]:
    """Identical points have r_1 = 0 and log(r_2 / r_1) = inf; keep one copy of each and say how many went."""
    points = as_points(x)
    unique = torch.unique(points, dim=0)
    dropped = points.shape[0] - unique.shape[0]
    if dropped:
        warnings.warn(f"dropped {dropped} duplicate points before estimating the dimension (their r_1 is 0)")
    return unique, dropped


# ----------------------------------------------------------------------------------- intrinsic dimension


@dataclass
class TwoNNResult:
    dimension: float     # Facco et al.'s estimate: the slope of the straight-line fit through the origin
    mle: float           # the maximum-likelihood estimate (N - 1) / sum(log mu)
    num_points: int      # points used (after dropping duplicates)
    num_duplicates: int  # identical points dropped


def twonn_dimension(x: Tensor, discard_fraction: float = 0.1) -> TwoNNResult:
    """Intrinsic dimension from each point's two nearest neighbours (TwoNN; Facco et al. 2017).

    If the density is roughly constant over the scale of r_2, the ratio mu = r_2 / r_1 follows a Pareto law whose
    only parameter is the dimension d: F(mu) = 1 - mu^(-d). So -log(1 - F(mu)) = d log(mu), a line through the
    origin; we fit it to the empirical CDF after discarding the largest ratios (the noisy tail).
    """
    if not 0 <= discard_fraction < 1:
        raise ValueError(f"discard_fraction must be in [0, 1), e.g. 0.1; got {discard_fraction}")
    # BEGIN SOLUTION ch01.twonn
    points, dropped = drop_duplicates(x)
    r = nearest_distances(points, k=2)                             # (N, 2)
    r = r[r[:, 0] > 0]                                             # near-duplicates that survived rounding
    # mu_i = r_2 / r_1 >= 1
    mu, _ = (r[:, 1] / r[:, 0]).sort()                             # (N,)
    n = len(mu)
    # the empirical CDF F(mu_(i)) = i / N; F = 1 at the last point, where -log(1 - F) is infinite: always drop it
    keep = min(int(n * (1 - discard_fraction)), n - 1)
    log_mu = mu[:keep].log()
    cdf = torch.arange(1, keep + 1, dtype=torch.float64) / n
    y = -torch.log1p(-cdf)
    # least squares through the origin: d = sum(x y) / sum(x^2), with x = log mu, y = -log(1 - F)
    slope = (log_mu * y).sum() / (log_mu * log_mu).sum()
    # the Pareto likelihood prod d mu^(-d-1) peaks at d = N / sum(log mu); N - 1 makes it unbiased
    mle = (n - 1) / mu.log().sum()
    return TwoNNResult(float(slope), float(mle), n, dropped)
    # END SOLUTION


def mle_dimension(x: Tensor, k: int | range = 10) -> float:
    """Levina & Bickel's (2005) maximum-likelihood dimension from the k nearest neighbours.

    Each point's estimate is m_k(x) = [1/(k-1) sum_{j<k} log(T_k / T_j)]^(-1), T_j its j-th neighbour distance.
    Following MacKay & Ghahramani (2005) we average the *inverses* over points (the inverse is the unbiased
    quantity), then invert. A range of k averages the estimates over k, as Levina & Bickel do.
    """
    ks = [k] if isinstance(k, int) else list(k)
    if not ks or min(ks) < 2:
        raise ValueError(f"k must be at least 2 (an int or a range such as range(10, 21)); got {k}")
    points, _ = drop_duplicates(x)
    distances = nearest_distances(points, k=max(ks))               # (N, k_max)
    distances = distances[distances[:, 0] > 0]
    estimates = []
    for kk in ks:
        log_t = distances[:, :kk].log()                            # (N, kk)
        # 1 / m_k(x) = 1/(k-1) sum_{j=1}^{k-1} log(T_k / T_j)
        inverse = (log_t[:, kk - 1:kk] - log_t[:, :kk - 1]).sum(dim=1) / (kk - 1)   # (N,)
        # m_k = [mean over points of 1 / m_k(x)]^(-1)
        estimates.append(1.0 / inverse.mean())
    return float(torch.stack(estimates).mean())


def random_noise_images(n: int, size: int = 64, generator: torch.Generator | None = None) -> Tensor:
    """The contrast case: every pixel independent and uniform in [-1, 1], a cloud that fills all 3 size^2 dims."""
    return torch.rand(n, 3, size, size, generator=generator) * 2 - 1


# ------------------------------------------------------------------------------------------- interpolation


def interpolate_pixels(x0: Tensor, x1: Tensor, steps: int) -> Tensor:
    """The straight line in pixel space, (steps, 3, H, W): a cross-fade, which shows both images at once."""
    if x0.shape != x1.shape or x0.ndim != 3:
        raise ValueError(
            f"expected two images of the same shape (3, H, W); got {tuple(x0.shape)} and {tuple(x1.shape)}"
        )
    t = torch.linspace(0, 1, steps, dtype=x0.dtype).view(-1, 1, 1, 1)
    # x(t) = (1 - t) x_0 + t x_1
    return (1 - t) * x0 + t * x1


def slerp(z0: Tensor, z1: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation (Shoemake 1985; White 2016 for generative models): keeps the norm that Gaussian
    latents concentrate at, where a straight line would pass through the low-norm middle."""
    a, b = z0.flatten(), z1.flatten()
    cos_omega = (a @ b / (a.norm() * b.norm())).clamp(-1, 1)
    omega = torch.arccos(cos_omega)
    t = t.view(-1, *([1] * z0.ndim))
    if omega.abs() < 1e-4:  # (almost) parallel: slerp is the straight line
        return (1 - t) * z0 + t * z1
    # slerp(t) = sin((1 - t) omega) / sin(omega) z_0 + sin(t omega) / sin(omega) z_1
    return (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / torch.sin(omega)


@torch.no_grad()
def interpolate_latents(vae, x0: Tensor, x1: Tensor, steps: int, method: str = "linear") -> Tensor:
    """Walk between two images in the VAE's latent space, then decode every step: (steps, 3, H, W).

    We encode to the posterior means, blend the latents (linearly or by slerp) and decode; if the latent space is
    a good chart of the image manifold, every frame is a single clean shape rather than a double exposure.
    """
    if method not in ("linear", "slerp"):
        raise ValueError(f"method must be 'linear' or 'slerp'; got {method!r}")
    param = next(vae.parameters())
    pair = torch.stack([x0, x1]).to(param)                         # (2, 3, H, W)
    z = vae.encode(pair).mean                                      # (2, C, h, w)
    t = torch.linspace(0, 1, steps, dtype=z.dtype, device=z.device)
    if method == "slerp":
        latents = slerp(z[0], z[1], t)                             # (steps, C, h, w)
    else:
        # z(t) = (1 - t) z_0 + t z_1
        latents = (1 - t.view(-1, 1, 1, 1)) * z[0] + t.view(-1, 1, 1, 1) * z[1]
    return vae.decode(latents).clamp(-1, 1).float().cpu()


# --------------------------------------------------------------------- the walk Stable Diffusion users make


@torch.no_grad()
def invert_images(pipe, images: Tensor, prompts: str | list[str], ddim_steps: int = 50,
                  guidance_scale: float = 1.0) -> Tensor:
    """Images (B, 3, H, W) -> the starting noises (B, C, h, w) from which DDIM, with these prompts (one for all, or
    one each), draws them again.

    Encode to z_0 with the pipeline's VAE, then run DDIM backwards (samplers.ddim_invert, chapter 07). The round
    trip is only as exact as inversion's approximation: close at w = 1 (notebook 07: 33 dB at 50 steps), looser
    at larger w, where guidance bends the way up and the way down differently.
    """
    prompts = pipe.check_prompts([prompts] * len(images) if isinstance(prompts, str) else prompts)
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images; give one prompt, or one per image")
    z0 = pipe.encode_images(images)                                # (B, C, h, w)
    encode = pipe.text_encoder.encode_prompts
    context = encode(pipe.tokenizer, prompts, pipe.device).to(pipe.dtype)                # (B, L, D)
    uncond = encode(pipe.tokenizer, [""] * len(z0), pipe.device).to(pipe.dtype)          # (B, L, D)
    model_fn = guided_model_fn(pipe.unet, context, uncond, guidance_scale)
    return ddim_invert(model_fn, z0, make_sampler("ddim", pipe.schedule, ddim_steps))   # (B, C, h, w)


@torch.no_grad()
def interpolate_diffusion(pipe, x0: Tensor, x1: Tensor, steps: int, prompt: str | list[str], ddim_steps: int = 50,
                          guidance_scale: float = 1.0) -> Tensor:
    """The walk Stable Diffusion users make, (steps, 3, H, W): invert both images to noise with one prompt, slerp
    between the two noises, and let DDIM draw every step with the same prompt, steps and guidance.

    The noises are where the diffusion model, not the VAE, decides what the image is; if the model has learned
    the manifold, every noise on the path is drawn as one clean image. The ends are the round trips
    (inverted, then drawn again), not the images themselves. Two batches of B images (B, 3, H, W) with B prompts
    make B walks at once, (B, steps, 3, H, W): one batch for the U-Net, far faster on a CPU than one walk at a time.
    """
    if x0.shape != x1.shape or x0.ndim not in (3, 4):
        raise ValueError(f"expected two images (3, H, W) or two batches (B, 3, H, W) of the same shape; "
                         f"got {tuple(x0.shape)} and {tuple(x1.shape)}")
    single = x0.ndim == 3
    if single and not isinstance(prompt, str):
        raise TypeError(f"prompt must be one str, held along the whole walk (e.g. \"a red circle\"); "
                        f"got {type(prompt).__name__}")
    if not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be a whole number of frames, at least 2 (the two ends); got {steps!r}")
    x0, x1 = (x0[None], x1[None]) if single else (x0, x1)          # (B, 3, H, W) each
    b = len(x0)
    prompts = [prompt] * b if isinstance(prompt, str) else list(prompt)
    if len(prompts) != b:
        raise ValueError(f"{len(prompts)} prompts for {b} walks; give one prompt, or one per pair of images")
    noises = invert_images(pipe, torch.cat([x0, x1]), prompts * 2, ddim_steps, guidance_scale)  # (2B, C, h, w)
    t = torch.linspace(0, 1, steps, dtype=torch.float32, device=noises.device)
    path = torch.stack([slerp(noises[i].float(), noises[b + i].float(), t) for i in range(b)])  # (B, steps, C, h, w)
    frames = pipe.text_to_image([p for p in prompts for _ in range(steps)], height=x0.shape[2], width=x0.shape[3],
                                guidance_scale=guidance_scale, sampler_name="ddim", steps=ddim_steps,
                                latents=path.flatten(0, 1))        # (B * steps, 3, H, W)
    frames = frames.view(b, steps, *frames.shape[1:])              # (B, steps, 3, H, W)
    return frames[0] if single else frames


def largest_step_share(frames: Tensor) -> float:
    """The share of a walk's path length taken by its largest step, in (0, 1]: does it glide or jump?

    Path length is the sum of the distances between consecutive frames. Frames evenly spread along the way give
    1 / (steps - 1), as a cross-fade does exactly; a walk that stands still and then jumps gives nearly 1. A frame
    can be clean and still jump, and the ghost counter never sees it.
    """
    if frames.ndim != 4 or frames.shape[0] < 3:
        raise ValueError(f"expected a walk of at least 3 frames, shape (steps, 3, H, W); got {tuple(frames.shape)}")
    step = (frames[1:] - frames[:-1]).detach().double().flatten(1).norm(dim=1)     # (steps - 1,)
    if step.sum() == 0:
        raise ValueError("the frames are all equal: a walk that does not move has no largest step")
    return float(step.max() / step.sum())


# ---------------------------------------------------------------------------- is a frame on the manifold?


def palette() -> Tensor:
    """Every colour a Shapes image can hold away from edges: 6 shape colours and 2 backgrounds, in [-1, 1]: (8, 3)."""
    rgb = list(COLOURS.values()) + list(BACKGROUNDS.values())
    return torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1.0


def ghost_fraction(images: Tensor, tolerance: float = 0.15) -> Tensor:
    """The fraction of each image covered by "ghost" pixels: (B,).

    A real Shapes pixel is one palette colour, except on anti-aliased edges (a one-pixel-wide rim). A cross-fade
    of two images paints whole regions in mixed, half-transparent colours. So: a pixel is off-palette when no
    palette colour lies within `tolerance` (RGB distance in [-1, 1] units, 0.15 ~ 19/255); it is a ghost when its
    whole 3x3 neighbourhood is off-palette too, which an edge rim never is, but a faded shape's interior is.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W) in [-1, 1]; got {tuple(images.shape)}")
    fractions = []
    for batch in images.detach().float().cpu().split(256):         # 256 images at a time: bounded memory
        pixels = batch.movedim(1, -1)                              # (b, H, W, 3)
        # distance to the nearest palette colour: min_c |p - c|
        nearest = torch.cdist(pixels.reshape(-1, 3), palette()).min(dim=1).values.view(pixels.shape[:3])  # (b, H, W)
        clean = (nearest <= tolerance).float().unsqueeze(1)        # (b, 1, H, W)
        # a ghost: no clean pixel in its 3x3 window (a max-pool of "clean" dilates the clean set by one pixel)
        ghost = 1 - F.max_pool2d(clean, kernel_size=3, stride=1, padding=1)
        fractions.append(ghost.flatten(1).mean(dim=1))
    return torch.cat(fractions)


def ghost_threshold(real_images: Tensor, quantile: float = 0.999, tolerance: float = 0.15) -> float:
    """The ghost fraction that real images essentially never exceed: its `quantile` over `real_images`.
    (For real Shapes images it is 0: none of 1,500 has a single 3x3 block off the palette.)

    Calibrate on what "on the manifold" means for your frames: real Shapes images for pixel blends, VAE
    reconstructions of real images for decoded latent walks (the VAE's own colour error is not a ghost).
    """
    return float(torch.quantile(ghost_fraction(real_images, tolerance).double(), quantile))


@torch.no_grad()
def walk_thresholds(vae, real_images: Tensor) -> dict[str, float]:
    """Both thresholds from one set of real images: {"pixels": for cross-fades, "latents": for decoded walks}.

    A decoded frame carries the VAE's blur, so it is judged against the VAE's reconstructions of the same real
    images, not against the images themselves.
    """
    param = next(vae.parameters())
    recon = torch.cat([vae.reconstruct(b.to(param)).clamp(-1, 1).float().cpu() for b in real_images.split(100)])
    return {"pixels": ghost_threshold(real_images), "latents": ghost_threshold(recon)}


def double_exposures(frames: Tensor, threshold: float, tolerance: float = 0.15) -> Tensor:
    """Which frames are not a single clean scene: (B,) bool, ghost fraction above the real images' threshold."""
    return ghost_fraction(frames, tolerance) > threshold


def nearest_real_distance(frames: Tensor, real_images: Tensor, chunk: int = 1024) -> Tensor:
    """RMS pixel distance from each frame to its nearest real image: (B,). A second, assumption-free measure:
    a frame on the manifold has a real image close by (given enough real images); a double exposure does not."""
    if frames.shape[1:] != real_images.shape[1:]:
        raise ValueError(f"frames {tuple(frames.shape)} and real images {tuple(real_images.shape)} differ in size")
    a = frames.detach().reshape(frames.shape[0], -1).double()     # (B, D)
    best = torch.full((a.shape[0],), math.inf, dtype=torch.float64)
    for start in range(0, real_images.shape[0], chunk):
        b = real_images[start:start + chunk].detach().reshape(-1, a.shape[1]).double()   # (c, D)
        best = torch.minimum(best, squared_distances(a, b).min(dim=1).values)
    # RMS = ||frame - real|| / sqrt(D), so the number reads in the [-1, 1] pixel units
    return (best / a.shape[1]).sqrt()
