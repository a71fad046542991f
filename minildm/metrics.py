"""Numbers that say how good an image is. Chapter 02 uses PSNR; later chapters score generated Shapes with the judge
(minildm/judge.py): does the image show what the prompt asked for, how far is the set of images from real ones (a
Frechet distance in the judge's features, like FID), and how many objects does it hold."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from minildm.data import (
    COLOURS,
    EVAL_SEED,
    OTHER_REAL_SEED,
    POSITION_WORDS,
    SHAPE_KINDS,
    SIZE_WORDS,
    SameCaptionsDataset,
    ShapesDataset,
)
from minildm.judge import FACTORS, Judge, factor_words, read_words


def psnr(x_hat: Tensor, x: Tensor) -> Tensor:
    """Peak signal-to-noise ratio per image, in dB, for images in [-1, 1]: (B,).

    Images are mapped to [0, 1] first, so the peak is 1 and the figure is the usual one for 8-bit images:
    28 dB means a root-mean-square error of 10^(-28/20) = 4% of the range, about 10 grey levels.
    """
    # BEGIN SOLUTION ch02.psnr
    a = (x_hat.detach().float().clamp(-1, 1) + 1) / 2
    b = (x.detach().float().clamp(-1, 1) + 1) / 2
    mse = (a - b).pow(2).flatten(1).mean(dim=1).clamp_min(1e-10)   # (B,); the floor keeps identical images finite
    # PSNR = 10 log10(peak^2 / MSE), peak = 1
    return 10 * torch.log10(1.0 / mse)
    # END SOLUTION


# ------------------------------------------------------------------------------------------------- the judge's reading

def judge_accuracy(judge: Judge, images: Tensor, factors: Sequence[dict]) -> dict[str, float]:
    """Share of images whose factor the judge reads right, per factor: {"kind", "colour", "size", ...}.

    `factors` are the scenes' `ShapesDataset.factors(i)` (single-object). This is how we trust the judge before
    using it to score generated images: on real images it should be right at least 98% of the time per factor.
    """
    if len(images) != len(factors):
        raise ValueError(f"got {len(images)} images but {len(factors)} factor dicts; pass one per image")
    read = read_words(judge, images)
    truth = [factor_words(f) for f in factors]
    # accuracy = (1/N) sum_i [read_i == true_i]
    return {k: sum(r[k] == t[k] for r, t in zip(read, truth)) / max(len(truth), 1) for k in FACTORS}


def reconstruction_accuracy(vae, judge: Judge, count: int = 500, seed: int = EVAL_SEED,
                            batch: int = 100) -> dict[str, float]:
    """judge_accuracy on a VAE's round trips, decode(mean of encode(x)), of `count` held-out images: what a diffusion
    model on its latents could at best be read as, if it made the encoder's own latents. Near the real images'
    accuracy means the decoder keeps every factor; a diffusion model that scores far lower lost it, not the decoder."""
    data = ShapesDataset(count, seed=seed)
    images, factors = data.images(0, count), [data.factors(i) for i in range(count)]
    weights = next(vae.parameters())
    vae.eval()
    with torch.no_grad():
        # x_hat = D(mu(x)), clamped to the pixel range as a sampler's output is
        round_trips = torch.cat([vae.reconstruct(images[i:i + batch].to(weights.device, weights.dtype))
                                 .float().clamp(-1, 1).cpu()
                                 for i in range(0, count, batch)])                        # (count, 3, H, W)
    return judge_accuracy(judge, round_trips, factors)


def read_attributes(judge: Judge, images: Tensor) -> list[dict[str, str]]:
    """The words the judge reads in each image: kind, colour, size, position, background."""
    return read_words(judge, images)


PLACES = {("in the " if where == "centre" else "at the ") + where: where for row in POSITION_WORDS for where in row}
CAPTION = re.compile(r"a (?P<size>{}) (?P<colour>{}) (?P<kind>{}) (?P<place>{})".format(
    "|".join(word for _, word in SIZE_WORDS), "|".join(COLOURS), "|".join(SHAPE_KINDS), "|".join(PLACES)))


def prompt_attributes(prompt: str) -> dict[str, str]:
    """A single-object Shapes caption back to its words: {"kind", "colour", "size", "position"}.

    The inverse of `ShapeFactors.describe`; it reads the same word lists (data.SIZE_WORDS, COLOURS, ...), so the
    two cannot drift apart.
    """
    match = CAPTION.fullmatch(prompt.strip().lower()) if isinstance(prompt, str) else None
    if match is None:
        raise ValueError(f"{prompt!r} is not a single-object Shapes caption; expected e.g. "
                         f"'a small red circle at the top left' (split multi-object captions at ' and ')")
    return {"kind": match["kind"], "colour": match["colour"], "size": match["size"],
            "position": PLACES[match["place"]]}


def prompt_following(judge: Judge, images: Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """How often the image shows what its prompt asked for: "all" four words, and each word alone.

    A text-to-image model can make beautiful images of the wrong thing; this counts the right things, as read by
    the judge. Real images with their own captions score about 1; images paired with shuffled prompts score low.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")
    wanted = [prompt_attributes(p) for p in prompts]
    read = read_words(judge, images)
    names = ("kind", "colour", "size", "position")
    hits = {k: [r[k] == w[k] for r, w in zip(read, wanted)] for k in names}
    n = max(len(wanted), 1)
    shares = {k: sum(v) / n for k, v in hits.items()}
    # all = (1/N) sum_i prod_k [read_ik == asked_ik]
    shares["all"] = sum(all(h) for h in zip(*hits.values())) / n
    return shares


# ------------------------------------------------------------------------------------------------- Frechet distance

@torch.no_grad()
def judge_features(judge: Judge, images: Tensor, batch: int = 256) -> Tensor:
    """The judge's penultimate vector for each image: (N, F), on the CPU, float32 (the space of our FID)."""
    judge.eval()
    device = next(judge.parameters()).device
    chunks = [judge(images[i:i + batch].to(device).float())["features"].cpu() for i in range(0, len(images), batch)]
    return torch.cat(chunks) if chunks else torch.empty(0, judge.config.feature_dim)


def gaussian_fit(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (F,) and unbiased covariance (F, F) of (N, F) features, in float64."""
    f = features.double()
    mu = f.mean(dim=0)                                               # (F,)
    centred = f - mu                                                 # (N, F)
    # S = (1 / (N - 1)) sum_i (f_i - mu)(f_i - mu)^T
    return mu, centred.T @ centred / (len(f) - 1)                    # (F,), (F, F)


def sqrtm_psd(matrix: Tensor) -> Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix, via its eigen-decomposition."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)    # symmetrise away round-off first
    # sqrt(S) = V diag(sqrt(lambda)) V^T, with tiny negative eigenvalues (round-off) clamped to 0
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (FID, Heusel et al. 2017, in judge features).

    d^2 = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}). S_a S_b is not symmetric, but it is similar to
    sqrt(S_a) S_b sqrt(S_a), which is symmetric PSD, so the trace of its root comes from eigh alone (no scipy).
    """
    for name, f in (("features_a", features_a), ("features_b", features_b)):
        if not isinstance(f, Tensor) or f.ndim != 2 or len(f) < 2:
            given = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(f"{name} must be an (N, F) tensor with N >= 2, got {given}; use judge_features(...)")
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"feature sizes differ ({features_a.shape[1]} vs {features_b.shape[1]}); "
                         f"compute both sets with the same judge")
    mu_a, s_a = gaussian_fit(features_a)
    mu_b, s_b = gaussian_fit(features_b)
    root_a = sqrtm_psd(s_a)                                          # (F, F)
    # Tr((S_a S_b)^{1/2}) = Tr((sqrt(S_a) S_b sqrt(S_a))^{1/2}) = sum_i sqrt(lambda_i)
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0).sqrt().sum()
    # d^2 = ||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^{1/2})
    d2 = (mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * cross
    return float(d2.clamp_min(0))


def real_features(judge: Judge, n: int, seed: int, same_captions_as: int | None = None) -> Tensor:
    """The judge's features of n real Shapes images, rendered at the judge's size: (n, F). The images of `seed`, or,
    with `same_captions_as`, the captions of that seed redrawn by `seed` (SameCaptionsDataset)."""
    data = ShapesDataset(n, seed=seed, image_size=judge.config.image_size)
    if same_captions_as is not None:
        data = SameCaptionsDataset(ShapesDataset(n, seed=same_captions_as, image_size=judge.config.image_size), seed)
    return judge_features(judge, data.images())


# ------------------------------------------------------------------------------------------------- a pipeline, scored

@torch.no_grad()
def evaluate_pipeline(pipe, judge: Judge, count: int = 500, seed: int = 0, guidance_scale: float | None = None,
                      steps: int = 25, sampler_name: str = "ddim", batch: int = 100) -> dict:
    """Generate `count` images for held-out captions (Shapes seed 2024, never trained on) and score them: the judge's
    prompt-following, and the Frechet distance of their judge features to the real images of the same captions.

    For scale, real vs real: a second real set for the same captions (`frechet_real`, the fair baseline: both sets
    answer the same captions, as the generated set does), and a real set of other captions
    (`frechet_real_other_captions`, which also counts the captions' differences and so flatters the model)."""
    if count < 2:
        raise ValueError(f"count must be at least 2 (a covariance needs two images), got {count}")
    prompts = ShapesDataset(count, seed=EVAL_SEED).captions()
    w = pipe.guidance_scale if guidance_scale is None else guidance_scale
    images = torch.cat([pipe.text_to_image(prompts[i:i + batch], guidance_scale=w, sampler_name=sampler_name,
                                           steps=steps, seed=seed + i)
                        for i in range(0, count, batch)])                                 # (count, 3, H, W)
    real = real_features(judge, count, EVAL_SEED)                                       # the same captions
    return {"count": count, "guidance_scale": w, "steps": steps, "sampler": sampler_name, "seed": seed,
            "prompt_following": prompt_following(judge, images, prompts),
            "frechet": frechet_distance(judge_features(judge, images), real),
            "frechet_real": frechet_distance(real_features(judge, count, OTHER_REAL_SEED, EVAL_SEED), real),
            "frechet_real_other_captions": frechet_distance(real_features(judge, count, OTHER_REAL_SEED), real)}


# ------------------------------------------------------------------------------------------------- counting objects

def count_objects(images: Tensor, threshold: float = 0.3, min_pixels: int = 8) -> Tensor:
    """How many separate objects each image shows: (B,) long, for images of any size.

    The background is the image's most common colour; a pixel whose colour differs from it by more than
    `threshold` (in [-1, 1] units, any channel) is foreground. Objects are the 8-connected foreground regions,
    found by label propagation: every pixel starts with its own label (its index + 1) and takes the largest label
    among its neighbours until nothing changes. A label names a pixel of the same region, so a pixel may also jump
    to that pixel's label, which spreads big labels across a region in far fewer rounds than one pixel per round.
    Regions under `min_pixels` are specks, not objects. Objects that touch or overlap count as one.
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        given = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"count_objects reads (B, 3, H, W) images in [-1, 1], got {given}")
    x = images.detach().float().cpu()
    B, _, H, W = x.shape
    background = most_common_colour(x)                                            # (B, 3)
    foreground = (x - background[:, :, None, None]).abs().amax(dim=1) > threshold  # (B, H, W) bool
    # labels are float32 (max_pool2d needs floats): exact integers up to 2^24, i.e. images up to 4096 x 4096
    labels = torch.arange(1, H * W + 1, dtype=torch.float32).view(1, H, W) * foreground   # (B, H, W); 0 = bg
    while True:
        spread = F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0] * foreground   # (B, H, W)
        flat = spread.view(B, -1)                                                            # (B, H*W)
        # pointer jump: label L was first held by pixel L - 1, which is in the same region; take its label now
        jumped = flat.gather(1, (flat.long() - 1).clamp_min(0)) * foreground.view(B, -1)
        spread = torch.maximum(flat, jumped).view(B, H, W)
        if torch.equal(spread, labels):
            break
        labels = spread
    # pixels per label in each image, then the labels with at least min_pixels
    sizes = torch.zeros(B, H * W + 1).scatter_add_(1, labels.long().view(B, -1), torch.ones(B, H * W))
    return (sizes[:, 1:] >= min_pixels).sum(dim=1)                                # (B,) long


def most_common_colour(x: Tensor, levels: int = 16) -> Tensor:
    """(B, 3, H, W) -> (B, 3): the mean colour of the fullest of levels^3 colour bins (the background, for Shapes)."""
    B = x.shape[0]
    q = ((x.clamp(-1, 1) + 1) / 2 * (levels - 1)).round().long()                  # (B, 3, H, W) in 0..levels-1
    bins = (q[:, 0] * levels + q[:, 1]) * levels + q[:, 2]                         # (B, H, W) one bin per colour
    fullest = torch.mode(bins.view(B, -1), dim=1).values                           # (B,)
    inside = (bins == fullest[:, None, None]).unsqueeze(1).float()                 # (B, 1, H, W)
    return (x * inside).sum(dim=(2, 3)) / inside.sum(dim=(2, 3))                   # (B, 3)
