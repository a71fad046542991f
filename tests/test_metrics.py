"""The metrics: Frechet distance identities, caption parsing, object counting, and the shipped judge's accuracy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from minildm.autoencoder import AutoencoderConfig, AutoencoderKL
from minildm.data import (
    BACKGROUNDS,
    EVAL_SEED,
    OTHER_REAL_SEED,
    SameCaptionsDataset,
    ShapesDataset,
    draw_factor,
    position_word,
    redraw_factor,
    render,
    size_word,
)
from minildm.judge import FACTORS, HELDOUT_SEED, TRAIN_SEED
from minildm.metrics import (
    count_objects,
    evaluate_pipeline,
    frechet_distance,
    judge_accuracy,
    judge_features,
    prompt_attributes,
    prompt_following,
    read_attributes,
    reconstruction_accuracy,
)
from minildm.pretrained import JUDGES, load_judge, load_vae

pytestmark = pytest.mark.usefixtures("one_thread")

FRESH_SEED = 4444   # neither the judge's training seed (4242) nor its held-out seed (4343)
FRESH_COUNT = 3000  # size is the hardest factor: 98.4% here, so 1,000 images would leave a margin of a few images


@pytest.fixture(scope="module")
def judge():
    return load_judge("shapes64", device="cpu")


@pytest.fixture(scope="module")
def fresh():
    data = ShapesDataset(FRESH_COUNT, seed=FRESH_SEED)
    return data.images(), [data.factors(i) for i in range(FRESH_COUNT)], data.captions()


def gaussian_features(n: int, dim: int, seed: int, scale=1.0, shift=0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64) * scale + shift


# ------------------------------------------------------------------------------------------------- Frechet distance

def test_frechet_distance_of_a_set_with_itself_is_zero():
    a = gaussian_features(500, 8, seed=0) @ gaussian_features(8, 8, seed=1)   # correlated features
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def diagonal_set(n: int, std: torch.Tensor, mean: torch.Tensor, seed: int) -> torch.Tensor:
    """n points whose sample mean is `mean` and sample covariance exactly diag(std^2) (orthogonalised columns)."""
    x = gaussian_features(n, len(std), seed)
    q, _ = torch.linalg.qr(x - x.mean(0))                 # (n, d) orthonormal, zero-mean columns
    return q * std * math.sqrt(n - 1) + mean


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    std_a = torch.tensor([1.0, 2, 3, 0.5, 1], dtype=torch.float64)
    std_b = torch.tensor([2.0, 1, 1, 1.5, 0.2], dtype=torch.float64)
    mean_a, mean_b = torch.full((5,), 1.0, dtype=torch.float64), torch.linspace(-1, 1, 5, dtype=torch.float64)
    a, b = diagonal_set(400, std_a, mean_a, seed=2), diagonal_set(300, std_b, mean_b, seed=3)
    # diagonal S_a, S_b: d^2 = ||mu_a - mu_b||^2 + sum_i (sigma_a,i - sigma_b,i)^2
    closed = (mean_a - mean_b).pow(2).sum() + (std_a - std_b).pow(2).sum()
    assert frechet_distance(a, b) == pytest.approx(closed.item(), rel=1e-9)


def test_frechet_distance_matches_a_float64_reference_through_eigvals_of_sa_sb():
    a = gaussian_features(400, 6, seed=8) @ gaussian_features(6, 6, seed=9)
    b = gaussian_features(300, 6, seed=10, scale=1.5, shift=0.3)
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    # Tr((S_a S_b)^{1/2}) = sum_i sqrt(lambda_i(S_a S_b)): S_a S_b has real, non-negative eigenvalues
    cross = torch.linalg.eigvals(sa @ sb).real.clamp_min(0).sqrt().sum()
    reference = (a.mean(0) - b.mean(0)).pow(2).sum() + sa.trace() + sb.trace() - 2 * cross
    assert frechet_distance(a, b) == pytest.approx(reference.item(), rel=1e-9)


def test_frechet_distance_is_symmetric_and_blind_to_a_shared_translation():
    a = gaussian_features(300, 6, seed=4) @ gaussian_features(6, 6, seed=5)
    b = gaussian_features(300, 6, seed=6, scale=1.3, shift=0.2)
    d = frechet_distance(a, b)
    assert frechet_distance(b, a) == pytest.approx(d, rel=1e-9)
    shift = gaussian_features(1, 6, seed=7, scale=10.0)
    assert frechet_distance(a + shift, b + shift) == pytest.approx(d, rel=1e-7)


def test_frechet_distance_rejects_mismatched_features():
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(torch.randn(1, 3), torch.randn(10, 3))


# ------------------------------------------------------------------------------------------------- captions

def test_prompt_attributes_reads_back_every_caption_of_500_items():
    data = ShapesDataset(500, seed=FRESH_SEED)
    for i, caption in enumerate(data.captions()):
        obj = data.factors(i)["objects"][0]
        words = prompt_attributes(caption)
        assert (words["kind"], words["colour"]) == (obj.kind, obj.colour), caption
        assert f"a {words['size']} {words['colour']} {words['kind']}" in caption
        assert caption.endswith(words["position"]), caption


@pytest.mark.parametrize("bad", ["a cat on a mat", "a huge red circle at the top", "a small red circle at the top "
                                 "and a large blue square in the centre", 42])
def test_prompt_attributes_refuses_what_is_not_a_shapes_caption(bad):
    with pytest.raises(ValueError, match="not a single-object Shapes caption"):
        prompt_attributes(bad)


# ------------------------------------------------------------------------------------------------- counting

def apart(factors: dict, side: int) -> bool:
    """True when no two objects, each drawn alone, cover or touch (8-neighbour) a common pixel."""
    masks = [torch.from_numpy(render([obj], factors["background"], side) != BACKGROUNDS[factors["background"]])
             .any(-1).float() for obj in factors["objects"]]                                    # each (H, W)
    grown = [torch.nn.functional.max_pool2d(m[None, None], 3, stride=1, padding=1)[0, 0] for m in masks]
    return all(((grown[i] > 0) & (masks[j] > 0)).sum() == 0
               for i in range(len(masks)) for j in range(len(masks)) if i != j)


@pytest.mark.parametrize("side", [64, 96])
def test_count_objects_counts_scenes_whose_objects_do_not_touch(side):
    data = ShapesDataset(200, seed=FRESH_SEED, image_size=side, num_objects=(1, 3))
    keep = [i for i in range(200) if apart(data.factors(i), side)]
    images = torch.stack([data[i]["image"] for i in keep])
    truth = torch.tensor([len(data.factors(i)["objects"]) for i in keep])
    counted = count_objects(images)
    assert set(truth.tolist()) == {1, 2, 3}
    assert torch.equal(counted, truth), f"wrong at {[keep[i] for i in (counted != truth).nonzero().flatten()]}"


def test_count_objects_ignores_specks_and_rejects_bad_shapes():
    image = -torch.ones(1, 3, 20, 30)
    image[:, :, 2:8, 2:8] = 1.0       # one object of 36 pixels
    image[:, :, 15, 25] = 1.0         # a one-pixel speck
    assert count_objects(image).tolist() == [1]
    with pytest.raises(ValueError, match="B, 3, H, W"):
        count_objects(torch.zeros(3, 20, 20))


# ------------------------------------------------------------------------------------------------- the shipped judge

def test_shipped_judge_reads_every_factor_of_fresh_real_images_98_percent_of_the_time(judge, fresh):
    images, factors, _ = fresh
    accuracy = judge_accuracy(judge, images, factors)
    assert set(accuracy) == set(FACTORS)
    low = {k: v for k, v in accuracy.items() if v < 0.98}
    assert not low, f"per-factor accuracy on {FRESH_COUNT:,} images of seed {FRESH_SEED}: {accuracy}; below 98%: {low}"


def test_prompt_following_is_high_with_own_captions_and_low_with_shuffled_ones(judge, fresh):
    images, _, captions = fresh
    own = prompt_following(judge, images, captions)
    # each word is read right >= 98% of the time; all four at once (size and position errors add up) >= 97%
    assert min(own[k] for k in ("kind", "colour", "size", "position")) >= 0.98 and own["all"] >= 0.97, own
    shuffled = captions[1:] + captions[:1]
    assert prompt_following(judge, images, shuffled)["all"] < 0.1


def test_the_shipped_vaes_round_trips_keep_every_factor_and_an_untrained_vaes_do_not(judge):
    # reconstruction_accuracy separates a decoder that loses a factor from a diffusion model that never made it
    trained = reconstruction_accuracy(load_vae("shapes64"), judge, count=200, seed=FRESH_SEED)
    data = ShapesDataset(200, seed=FRESH_SEED)
    real = judge_accuracy(judge, data.images(0, 200), [data.factors(i) for i in range(200)])
    assert set(trained) == set(FACTORS)
    # each factor read within 3 points of how well the judge reads the same real images
    assert all(trained[k] >= real[k] - 0.03 for k in FACTORS), (trained, real)
    torch.manual_seed(0)
    untrained = reconstruction_accuracy(AutoencoderKL(AutoencoderConfig.shapes64()), judge, count=200,
                                        seed=FRESH_SEED)
    assert untrained["kind"] < 0.5 and untrained["colour"] < 0.5, untrained


def test_judge_features_and_reading_have_the_documented_shapes(judge, fresh):
    images = fresh[0][:8]
    features = judge_features(judge, images, batch=3)
    assert features.shape == (8, judge.config.feature_dim) and features.dtype == torch.float32
    words = read_attributes(judge, images)
    assert len(words) == 8 and set(words[0]) == set(FACTORS)


def test_judge_and_metrics_refuse_bad_inputs(judge, fresh):
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        judge(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="one prompt per image"):
        prompt_following(judge, fresh[0][:3], fresh[2][:2])
    with pytest.raises(ValueError, match="one per image"):
        judge_accuracy(judge, fresh[0][:3], fresh[1][:2])


def test_shipped_judge_is_small_and_says_how_it_was_made():
    folder = JUDGES["shapes64"]
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 2**20, f"the judge folder takes {size / 2**20:.2f} MiB, over 1 MiB"
    record = __import__("json").loads((folder / "training.json").read_text())
    assert record["data_seed"] == TRAIN_SEED and record["heldout_seed"] == HELDOUT_SEED
    assert min(record["heldout_accuracy"].values()) >= 0.98, record["heldout_accuracy"]


# ------------------------------------------------------------------------------------------------- a pipeline, scored

class RealImages:
    """A stand-in pipeline that 'generates' the real held-out image of each caption (or a fixed wrong one)."""

    guidance_scale = 3.0

    def __init__(self, count, wrong=False):
        data = ShapesDataset(count, seed=EVAL_SEED)
        self.images = data.images()
        self.captions, self.served = data.captions(), 0
        self.wrong, self.calls = wrong, []

    def text_to_image(self, prompts, *, guidance_scale, sampler_name, steps, seed):     # LatentDiffusion's keywords
        self.calls.append((len(prompts), guidance_scale, sampler_name, steps, seed))
        if self.wrong:
            return self.images[:1].expand(len(prompts), -1, -1, -1)
        # the held-out captions arrive in order, batch after batch: answer each with its own real image
        start, self.served = self.served, self.served + len(prompts)
        assert list(prompts) == self.captions[start:self.served], "the prompts are the held-out captions, in order"
        return self.images[start:self.served]


def test_evaluate_pipeline_scores_real_images_as_real_and_a_stuck_generator_as_poor(judge):
    good = evaluate_pipeline(RealImages(120), judge, count=120, seed=5, batch=50)
    assert good["guidance_scale"] == 3.0 and good["count"] == 120
    assert good["prompt_following"]["all"] >= 0.9
    assert good["frechet"] < 1e-6, good                                # the very images of the reference
    # two real sets of the same captions are close; real sets of other captions are far
    assert 0 < good["frechet_real"] < 0.5 * good["frechet_real_other_captions"], good
    stuck = RealImages(120, wrong=True)
    bad = evaluate_pipeline(stuck, judge, count=120, guidance_scale=7.5, steps=3, batch=50)
    assert [c[0] for c in stuck.calls] == [50, 50, 20] and {c[1:4] for c in stuck.calls} == {(7.5, "ddim", 3)}
    assert [c[4] for c in stuck.calls] == [0, 50, 100], "each batch gets its own seed"
    assert bad["prompt_following"]["all"] < 0.2 and bad["frechet"] > 10 * bad["frechet_real"], bad
    with pytest.raises(ValueError, match="at least 2"):
        evaluate_pipeline(stuck, judge, count=1)


def test_the_judge_reads_words_even_from_images_that_are_not_shapes(judge):
    noise = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    blank = torch.ones(2, 3, 64, 64)                                   # one colour, nothing on it
    words = read_attributes(judge, torch.cat([noise, blank]))         # an untrained model draws such things
    assert len(words) == 6 and all(set(w) == set(FACTORS) for w in words)
    assert size_word(1.5) == "large" and position_word(-0.1, 1.2) == "bottom left"   # measured past the edges


# ------------------------------------------------------------------------------------------------- the fair baseline

def test_same_captions_dataset_keeps_every_caption_and_redraws_the_continuous_factors():
    base = ShapesDataset(200, seed=EVAL_SEED, num_objects=(1, 2))
    again = SameCaptionsDataset(base, seed=OTHER_REAL_SEED)
    assert again.captions() == base.captions()
    moved = 0
    for i in range(len(base)):
        old, new = base.factors(i), again.factors(i)
        assert new["background"] == old["background"]
        for a, b in zip(old["objects"], new["objects"], strict=True):
            assert (b.kind, b.colour) == (a.kind, a.colour)
            moved += (b.size, b.x, b.y) != (a.size, a.x, a.y)
    assert moved == sum(len(base.factors(i)["objects"]) for i in range(len(base)))
    assert not torch.equal(again.images(0, 20), base.images(0, 20))
    assert again.factors(7) == SameCaptionsDataset(base, seed=OTHER_REAL_SEED).factors(7), "a pure function of seeds"


def test_redraw_factor_draws_the_generator_conditioned_on_the_words():
    # every redraw of "large ... at the top left" has a large size and a top-left centre, and they spread over
    # the whole allowed range rather than sitting at one point
    rng = np.random.default_rng(0)
    target = next(f for f in (draw_factor(rng, True) for _ in range(10_000))
                  if f.describe().endswith("at the top left") and size_word(f.size) == "large")
    redrawn = [redraw_factor(rng, target, rotation=True) for _ in range(200)]
    assert all(size_word(f.size) == "large" and position_word(f.x, f.y) == "top left" for f in redrawn)
    sizes = np.array([f.size for f in redrawn])
    assert sizes.min() >= 0.34 and sizes.max() - sizes.min() > 0.01
    # one try rarely matches a caption with three narrow words; the error says what to do
    with pytest.raises(ValueError, match="pass more tries"):
        for _ in range(100):
            redraw_factor(rng, target, rotation=True, tries=1)
