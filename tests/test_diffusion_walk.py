"""Chapter 01's third walk: DDIM-invert two images to noise, slerp between the noises, denoise every step. On a tiny
random pipeline (16x16 images, 4x8x8 latents, 4 DDIM steps): the plumbing, not the picture."""

from __future__ import annotations

import pytest
import torch

from minildm import manifold
from minildm.autoencoder import AutoencoderConfig, AutoencoderKL
from minildm.data import ShapesDataset
from minildm.pipeline import LatentDiffusion
from minildm.schedule import NoiseSchedule
from minildm.text import TextEncoder, TextEncoderConfig, Tokenizer
from minildm.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE, DDIM_STEPS, PROMPT = 16, 4, "a small red circle at the top left"


@pytest.fixture(scope="module")
def pipe() -> LatentDiffusion:
    torch.manual_seed(0)
    tokenizer = Tokenizer()
    vae = AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                          scale_factor=0.5)).eval()
    unet = UNet(UNetConfig(block_out_channels=(32, 64), attention_levels=(False, True), heads=2, context_dim=32,
                           norm_num_groups=8, layers_per_block=1, num_timesteps=100))
    text_encoder = TextEncoder(TextEncoderConfig(vocab_size=tokenizer.vocab_size, dim=32, depth=1, heads=2))
    return LatentDiffusion(vae, unet, text_encoder, tokenizer, NoiseSchedule(num_timesteps=100), device="cpu")


@pytest.fixture(scope="module")
def ends() -> tuple[torch.Tensor, torch.Tensor]:
    images = ShapesDataset(2, seed=5, image_size=SIZE).images()                      # (2, 3, 16, 16)
    return images[0], images[1]


def test_diffusion_walk_gives_one_image_per_step_in_range(pipe, ends):
    frames = manifold.interpolate_diffusion(pipe, *ends, 5, PROMPT, ddim_steps=DDIM_STEPS)
    assert frames.shape == (5, 3, SIZE, SIZE), tuple(frames.shape)
    assert frames.min() >= -1 and frames.max() <= 1
    assert (frames[1:] - frames[:-1]).abs().amax(dim=(1, 2, 3)).min() > 0, "two consecutive frames are identical"


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_diffusion_walk_ends_are_each_image_inverted_then_denoised(pipe, ends, guidance_scale):
    frames = manifold.interpolate_diffusion(pipe, *ends, 4, PROMPT, ddim_steps=DDIM_STEPS,
                                            guidance_scale=guidance_scale)
    for frame, image in zip(frames[[0, -1]], ends):
        noise = manifold.invert_images(pipe, image[None], PROMPT, DDIM_STEPS, guidance_scale)     # (1, 4, 8, 8)
        round_trip = pipe.text_to_image(PROMPT, height=SIZE, width=SIZE, guidance_scale=guidance_scale,
                                        sampler_name="ddim", steps=DDIM_STEPS, latents=noise)[0]
        err = (frame - round_trip).abs().max().item()
        assert err < 1e-4, f"an end of the walk differs from its image's round trip by {err:.2e}"


def test_slerp_between_inverted_noises_keeps_their_norm_where_the_straight_line_sags(pipe, ends):
    noises = manifold.invert_images(pipe, torch.stack(ends), PROMPT, DDIM_STEPS).double()    # (2, 4, 8, 8)
    path = manifold.slerp(noises[0], noises[1], torch.linspace(0, 1, 9, dtype=torch.float64))
    norms = path.flatten(1).norm(dim=1)                                                       # (9,)
    low, high = noises.flatten(1).norm(dim=1).aminmax()
    assert (norms >= low - 1e-9).all() and (norms <= high + 1e-9).all(), \
        f"norms along the slerp {norms.tolist()} leave the ends' range [{low:.3f}, {high:.3f}]"
    line_middle = (noises[0] + noises[1]).norm() / 2
    assert line_middle < low, f"the straight line's middle has norm {line_middle:.3f}, ends {low:.3f}..{high:.3f}"


def test_diffusion_walk_refuses_mismatched_images_a_prompt_list_and_too_few_steps(pipe, ends):
    x0, x1 = ends
    with pytest.raises(ValueError, match=r"of the same shape; got \(3, 16, 16\) and \(3, 8, 8\)"):
        manifold.interpolate_diffusion(pipe, x0, x1[:, :8, :8], 4, PROMPT)
    with pytest.raises(TypeError, match="prompt must be one str.*got list"):
        manifold.interpolate_diffusion(pipe, x0, x1, 4, [PROMPT, PROMPT])
    with pytest.raises(ValueError, match="at least 2.*got 1"):
        manifold.interpolate_diffusion(pipe, x0, x1, 1, PROMPT)
    with pytest.raises(ValueError, match="4 prompts for 2 walks; give one prompt, or one per pair"):
        manifold.interpolate_diffusion(pipe, torch.stack([x0, x1]), torch.stack([x1, x0]), 4, [PROMPT, ""] * 2)


def test_a_batch_of_walks_equals_the_walks_one_at_a_time(pipe, ends):
    x0, x1 = ends
    prompts = [PROMPT, ""]
    batch = manifold.interpolate_diffusion(pipe, torch.stack([x0, x1]), torch.stack([x1, x0]), 4, prompts,
                                           ddim_steps=DDIM_STEPS)                  # (2, 4, 3, 16, 16)
    assert batch.shape == (2, 4, 3, SIZE, SIZE), tuple(batch.shape)
    for walk, (a, b, prompt) in zip(batch, [(x0, x1, prompts[0]), (x1, x0, prompts[1])]):
        alone = manifold.interpolate_diffusion(pipe, a, b, 4, prompt, ddim_steps=DDIM_STEPS)
        err = (walk - alone).abs().max().item()
        assert err < 1e-4, f"a walk made in a batch differs from the same walk alone by {err:.2e}"


def test_largest_step_share_is_even_for_a_cross_fade_and_one_for_a_jump(ends):
    x0, x1 = ends
    fade = manifold.interpolate_pixels(x0, x1, 9)                                   # (9, 3, 16, 16)
    assert manifold.largest_step_share(fade) == pytest.approx(1 / 8, rel=1e-6)
    jump = torch.stack([x0] * 4 + [x1] * 5)                                         # stands still, then jumps
    assert manifold.largest_step_share(jump) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 3 frames"):
        manifold.largest_step_share(fade[:2])
    with pytest.raises(ValueError, match="all equal"):
        manifold.largest_step_share(torch.stack([x0] * 3))
