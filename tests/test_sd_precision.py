"""Half precision the way Stable Diffusion needs it (issue 14, item 6): the pipeline runs in float16 or bfloat16, and
what float16 cannot hold stays float32.

float16 tops out at 65,504 and SD's VAE decoder passes that at large sizes, so a float16 pipeline keeps its VAE in
float32 (device.vae_dtype, applied where the pipeline is built and where a VAE is swapped in) and casts z_0 at the
VAE's door. bfloat16 has float32's range: its VAE stays bfloat16. The CPU runs float16 and bfloat16 convolutions and
matmuls, so all of this is checked here on tiny random models.
"""

from __future__ import annotations

import copy

import pytest
import torch

from minildm.autoencoder import save_decoder_file
from minildm.device import vae_dtype
from minildm.pipeline import LatentDiffusion, save_pipeline
from tests.test_pipeline import SIZE, tiny_pipe, tiny_vae

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red circle", "a large blue square"]
HALVES = (torch.float16, torch.bfloat16)


def overflowing_vae():
    """A tiny VAE whose decoder's first conv makes activations of about 2.3e5, past float16's 65,504, as SD's decoder
    does at large sizes. The GroupNorms after it bring them back to order 1, so in float32 it decodes fine."""
    vae = tiny_vae()
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)
        vae.decoder.conv_in.bias.mul_(1e5)
    return vae


def latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(seed))     # (B, 4, h, w)


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_the_vae_rule_upcasts_float16_only():
    assert [vae_dtype(d) for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)] == [
        torch.float32, torch.bfloat16, torch.float32, torch.float64]


def test_a_vae_that_overflows_float16_decodes_finite_in_a_float16_pipeline_and_equals_float32(tmp_path):
    z16 = latents().half()                                # what a float16 pipeline's sampler hands the VAE
    plain = copy.deepcopy(overflowing_vae()).half()       # the whole VAE in float16, as before the rule
    with torch.no_grad():
        x_plain = plain.decode(plain.from_z0(z16))
    assert not torch.isfinite(x_plain).all(), "this VAE was meant to overflow float16; the test shows nothing"

    parts, other = tiny_pipe(), tiny_pipe()
    ours, reference = (LatentDiffusion(overflowing_vae(), p.unet, p.text_encoder, p.tokenizer, p.schedule, "cpu",
                                       dtype=dtype) for p, dtype in ((parts, torch.float16), (other, torch.float32)))
    assert ours.dtypes == {"unet": torch.float16, "text_encoder": torch.float16, "vae": torch.float32}
    x16, x32 = ours.decode_latents(z16), reference.decode_latents(z16.float())
    assert torch.isfinite(x16).all()
    # the same float32 weights read the same z_0: equal to the last bit (tolerance 0)
    assert torch.equal(x16, x32), f"float16 pipeline's decode differs from float32's by {max_error(x16, x32):.2e}"
    # and from the unrounded z_0 only by float16's rounding of z_0 (measured 2.9e-4 on images in [-1, 1])
    assert max_error(x16, reference.decode_latents(latents())) < 2e-3
    images = ours.text_to_image(PROMPTS, height=SIZE, width=SIZE, steps=2)
    assert torch.isfinite(images).all() and images.dtype == torch.float32

    # a saved float32 pipeline loaded in float16: the VAE keeps the file's float32 weights bit for bit
    save_pipeline(tmp_path / "pipe", reference)
    loaded = LatentDiffusion.from_folder(tmp_path / "pipe", "cpu", dtype=torch.float16)
    assert loaded.dtypes == ours.dtypes
    assert torch.equal(loaded.decode_latents(z16), x32)


@pytest.mark.parametrize("dtype", HALVES)
def test_a_half_precision_pipeline_runs_its_u_net_in_half_and_matches_float32(dtype):
    """Tolerances from 12 seeds (max over them): float16 latents 1.7e-3 of max |z_0|, images 2.7e-3; bfloat16
    latents 1.2e-2, images 2.6e-2, i.e. 1.5 to 3.3 times each dtype's eps (9.8e-4, 7.8e-3). Allowed: 5 eps on the
    latents (relative to max |z_0|), 8 eps on the images."""
    eps = torch.finfo(dtype).eps
    half, reference = tiny_pipe(dtype=dtype), tiny_pipe()
    assert {p.dtype for p in half.unet.parameters()} == {dtype}
    assert {p.dtype for p in half.text_encoder.parameters()} == {dtype}
    assert half.dtypes["vae"] == vae_dtype(dtype)
    z_half = half.text_to_image(PROMPTS, height=SIZE, width=SIZE, output_type="latents", seed=3)
    z_ref = reference.text_to_image(PROMPTS, height=SIZE, width=SIZE, output_type="latents", seed=3)
    assert z_half.dtype == dtype                                         # the sampler's loop ran in half
    relative = max_error(z_half, z_ref) / z_ref.abs().max().item()
    assert 0 < relative <= 5 * eps, f"{dtype} latents differ from float32's by {relative:.2e} of max |z_0|"
    x_half, x_ref = half.decode_latents(z_half), reference.decode_latents(z_ref)
    assert max_error(x_half, x_ref) <= 8 * eps, f"{dtype} images differ from float32's by {max_error(x_half, x_ref)}"


def test_img2img_in_float16_encodes_in_float32_and_hands_the_sampler_float16():
    pipe = tiny_pipe(dtype=torch.float16)
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z0 = pipe.encode_images(image)
    assert z0.dtype == torch.float16
    assert max_error(z0, tiny_pipe().encode_images(image)) <= 2 * torch.finfo(torch.float16).eps * z0.abs().max()
    out = pipe.image_to_image(image, "a red circle", strength=0.5, steps=2)
    mask = torch.zeros(SIZE, SIZE)
    mask[:, : SIZE // 2] = 1
    painted = pipe.inpaint(image, mask, "a red circle", steps=2)
    assert torch.isfinite(out).all() and torch.isfinite(painted).all()


def test_swapping_a_decoder_into_a_float16_pipeline_keeps_the_vae_float32(tmp_path):
    pipe = tiny_pipe(dtype=torch.float16)
    save_decoder_file(overflowing_vae(), tmp_path / "decoder.safetensors")
    pipe.swap_vae_decoder(tmp_path / "decoder.safetensors")
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.float32}
    assert torch.isfinite(pipe.decode_latents(latents().half())).all()


def test_the_pipeline_says_which_dtype_each_part_runs_in():
    text = repr(tiny_pipe(dtype=torch.float16))
    assert "unet float16, text_encoder float16, vae float32" in text and "cpu" in text, text
    assert tiny_pipe(dtype=torch.bfloat16).dtypes["vae"] == torch.bfloat16


@pytest.mark.oracle
def test_a_diffusers_folder_loaded_in_float16_keeps_its_vae_float32_also_after_a_vae_swap(tmp_path_factory):
    from tests.test_cli import tiny_sd_folder

    folder = tiny_sd_folder(tmp_path_factory.mktemp("tiny-sd"))
    pipe = LatentDiffusion.from_pretrained(folder, device="cpu", dtype=torch.float16)
    assert pipe.dtypes == {"unet": torch.float16, "text_encoder": torch.float16, "vae": torch.float32}
    pipe.swap_vae(folder.parent / "other-vae.safetensors")
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.float32}
    images = pipe.text_to_image("a photograph of an astronaut riding a horse", height=16, width=16, steps=2)
    assert torch.isfinite(images).all()
    bf16 = LatentDiffusion.from_pretrained(folder, device="cpu", dtype=torch.bfloat16)
    assert set(bf16.dtypes.values()) == {torch.bfloat16}
