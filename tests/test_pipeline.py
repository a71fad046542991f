"""The pipeline (chapter 08): seeds, guidance, img2img, inpainting, saving and its errors, on tiny random models."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from minildm.autoencoder import AutoencoderConfig, AutoencoderKL, save_decoder_file
from minildm.pipeline import (
    LatentDiffusion,
    check_image_size,
    guided_model_fn,
    guided_output,
    img2img_start,
    mismatches,
    save_pipeline,
)
from minildm.pixel_space import PixelSpace
from minildm.samplers import make_sampler
from minildm.saving import save_model
from minildm.schedule import NoiseSchedule
from minildm.sd_configs import SD15, SD21
from minildm.text import TextEncoder, TextEncoderConfig, Tokenizer, save_text_encoder
from minildm.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16                      # images 16x16 -> latents 4x8x8 (VAE f = 2), which the U-Net halves once


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                           scale_factor=0.5)).eval()


def tiny_pipe(seed: int = 0, **defaults) -> LatentDiffusion:
    tokenizer = Tokenizer()
    vae = tiny_vae(seed)
    torch.manual_seed(seed + 1)
    unet = UNet(UNetConfig(block_out_channels=(32, 64), attention_levels=(False, True), heads=2, context_dim=32,
                           norm_num_groups=8, layers_per_block=1, num_timesteps=100))
    text_encoder = TextEncoder(TextEncoderConfig(vocab_size=tokenizer.vocab_size, dim=32, depth=1, heads=2))
    schedule = NoiseSchedule(num_timesteps=100)
    return LatentDiffusion(vae, unet, text_encoder, tokenizer, schedule, device="cpu",
                           **{"guidance_scale": 3.0, "steps": 4, **defaults})


@pytest.fixture(scope="module")
def pipe() -> LatentDiffusion:
    return tiny_pipe()


def images(batch: int = 1, seed: int = 3) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def generate(pipe, **kwargs):
    return pipe.text_to_image(["a red circle", "a large blue square"], height=SIZE, width=SIZE, **kwargs)


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("sampler_name", ["ddim", "euler_a"])
def test_the_same_seed_at_the_same_thread_count_gives_bit_identical_images_and_another_seed_different_ones(
        pipe, sampler_name):
    assert torch.get_num_threads() == 1                              # the promise holds at a fixed thread count
    first, again, other = (generate(pipe, seed=s, sampler_name=sampler_name) for s in (7, 7, 8))
    assert first.shape == (2, 3, SIZE, SIZE) and first.dtype == torch.float32 and first.device.type == "cpu"
    assert first.min() >= -1 and first.max() <= 1
    assert torch.equal(first, again), f"seed 7 twice differs by {max_error(first, again):.2e}"
    assert max_error(first, other) > 1e-3, "seeds 7 and 8 gave the same images"


# ------------------------------------------------------------------------------------------- guidance


def test_guided_output_at_w_one_is_the_prompt_and_at_w_zero_the_empty_prompt():
    uncond, cond = torch.randn(2, 2, 4, 8, 8, dtype=torch.float64)
    assert max_error(guided_output(uncond, cond, 1.0), cond) < 1e-12
    assert torch.equal(guided_output(uncond, cond, 0.0), uncond)
    assert max_error(guided_output(uncond, cond, 3.0), 3 * cond - 2 * uncond) < 1e-12


def test_the_doubled_batch_model_fn_equals_two_separate_calls(pipe):
    context = pipe.text_encoder.encode_prompts(pipe.tokenizer, ["a red circle", "a green triangle"])
    uncond = pipe.text_encoder.encode_prompts(pipe.tokenizer, ["", ""])
    zt, t = torch.randn(2, 4, 8, 8), torch.tensor([90.0, 40.0])
    with torch.no_grad():
        separate = [pipe.unet(zt, t, c) for c in (uncond, context)]
        for w in (0.0, 1.0, 4.0):
            got = guided_model_fn(pipe.unet, context, uncond, w)(zt, t)
            want = guided_output(*separate, w)
            assert max_error(got, want) < 1e-5, f"w = {w}: doubled batch differs by {max_error(got, want):.2e}"


def test_the_empty_prompt_tokenizes_to_bos_and_eos():
    ids = Tokenizer().encode("").ids
    assert ids[0, :3].tolist() == [1, 2, 0]


# ------------------------------------------------------------------------------------------- the loop


@pytest.mark.parametrize("task", ["text", "img2img", "inpaint"])
def test_the_callback_sees_every_step_exactly_once_in_order(pipe, task):
    seen = []
    if task == "text":
        pipe.text_to_image("a red circle", height=SIZE, width=SIZE, steps=5, callback=seen.append)
        expected = range(5)
    elif task == "img2img":
        pipe.image_to_image(images(), "a red circle", strength=0.6, steps=5, callback=seen.append)
        expected = range(2, 5)                                       # int(5 * 0.6) = 3 steps left
    else:
        mask = torch.zeros(SIZE, SIZE)
        mask[:, :8] = 1
        pipe.inpaint(images(), mask, "a red circle", steps=5, callback=seen.append)
        expected = range(5)
    sampler = make_sampler("ddim", pipe.schedule, 5)
    assert [s.index for s in seen] == list(expected)
    assert [s.t for s in seen] == [float(sampler.timesteps[i]) for i in expected]
    assert pipe.decode_latents(seen[-1].z0_hat).shape == (1, 3, SIZE, SIZE)


def test_img2img_start_begins_at_start_index_with_z0_noised_to_that_level():
    schedule = NoiseSchedule(num_timesteps=100)
    sampler = make_sampler("ddim", schedule, 10)
    z0, noise = torch.randn(2, 1, 4, 8, 8, dtype=torch.float64)
    start, z = img2img_start(sampler, z0, noise, 0.35)
    assert start == sampler.start_index(0.35) == 7
    ab = float(schedule.alpha_bar[int(sampler.timesteps[start])])
    assert torch.allclose(z, math.sqrt(ab) * z0 + math.sqrt(1 - ab) * noise, atol=1e-12)
    assert img2img_start(sampler, z0, noise, 0.0)[0] == len(sampler.timesteps)     # nothing left to run
    assert torch.equal(img2img_start(sampler, z0, noise, 0.0)[1], z0)
    assert img2img_start(sampler, z0, noise, 1.0) == (0, pytest.approx(noise))    # pure noise: the image is ignored
    assert torch.equal(img2img_start(sampler, z0, noise, 1.0)[1], noise * sampler.init_noise_sigma)


def test_image_to_image_at_strength_zero_is_the_vae_round_trip(pipe):
    x = images(2)
    got = pipe.image_to_image(x, "a red circle", strength=0.0)
    with torch.no_grad():
        want = pipe.vae.decode(pipe.vae.encode(x).mean).clamp(-1, 1)
    assert max_error(got, want) < 1e-5


def test_image_to_image_at_strength_one_is_text_to_image_with_the_same_seed(pipe):
    got = pipe.image_to_image(images(), "a red circle", strength=1.0, seed=5)
    want = pipe.text_to_image("a red circle", height=SIZE, width=SIZE, seed=5)
    assert torch.equal(got, want)


def test_inpaint_keeps_the_unmasked_latent_exactly_and_repaints_the_rest(pipe):
    x = images()
    mask = torch.zeros(SIZE, SIZE)
    mask[4:12, 4:12] = 1                                             # latent cells 2..5 of 8 repainted
    z = pipe.inpaint(x, mask, "a red circle", output_type="latents")
    known = pipe.encode_images(x)
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[2:6, 2:6] = False
    assert torch.equal(z[..., keep], known[..., keep])
    assert max_error(z[..., ~keep], known[..., ~keep]) > 1e-2
    pasted = pipe.inpaint(x, mask, "a red circle", keep_pixels=True)
    assert torch.equal(pasted[..., mask == 0], x[..., mask == 0])
    assert torch.equal(pipe.inpaint(x, mask[None, None], "a red circle", output_type="latents"), z)   # (B, 1, H, W)


def test_a_pixel_space_pipeline_runs_saves_and_loads_with_its_identity_autoencoder(pipe, tmp_path):
    torch.manual_seed(0)
    unet = UNet(UNetConfig(in_channels=3, out_channels=3, block_out_channels=(32, 64), attention_levels=(False, True),
                           heads=2, context_dim=32, norm_num_groups=8, layers_per_block=1, num_timesteps=100))
    pixels = LatentDiffusion(PixelSpace(), unet, pipe.text_encoder, pipe.tokenizer, pipe.schedule, steps=3)
    x = pixels.text_to_image("a red circle", height=8, width=8)
    assert x.shape == (1, 3, 8, 8) and pixels.space == "pixel"
    save_pipeline(tmp_path / "pixel-ldm", pixels)
    assert json.loads((tmp_path / "pixel-ldm" / "pipeline.json").read_text())["space"] == "pixel"
    loaded = LatentDiffusion.from_folder(tmp_path / "pixel-ldm", device="cpu")      # builds its PixelSpace
    assert isinstance(loaded.vae, PixelSpace)
    assert torch.equal(loaded.text_to_image("a red circle", height=8, width=8), x)
    with pytest.raises(ValueError, match="no VAE decoder to swap"):
        pixels.swap_vae_decoder(tmp_path / "decoder.safetensors")


# ------------------------------------------------------------------------------------- saving, loading


def test_a_saved_pipeline_loads_back_to_identical_images(pipe, tmp_path):
    save_pipeline(tmp_path / "ldm", pipe)
    assert {p.name for p in (tmp_path / "ldm").iterdir()} == {"unet", "text_encoder", "vae", "pipeline.json",
                                                              "scheduler.json"}
    loaded = LatentDiffusion.from_folder(tmp_path / "ldm", device="cpu")
    assert (loaded.guidance_scale, loaded.sampler_name, loaded.steps) == (3.0, "ddim", 4)
    assert torch.equal(generate(loaded), generate(pipe))


def test_a_pipeline_can_point_to_a_vae_folder_beside_it(pipe, tmp_path):
    save_model(tmp_path / "shared-vae", pipe.vae, pipe.vae.config.to_dict())
    save_pipeline(tmp_path / "ldm", pipe, vae_folder_name="../shared-vae")
    assert not (tmp_path / "ldm" / "vae").exists()
    assert json.loads((tmp_path / "ldm" / "pipeline.json").read_text())["vae"] == "../shared-vae"
    save_pipeline(tmp_path / "ldm", pipe, vae_folder_name="../shared-vae")          # overwriting works too
    assert torch.equal(generate(LatentDiffusion.from_folder(tmp_path / "ldm", device="cpu")), generate(pipe))
    save_model(tmp_path / "other-vae", tiny_vae(9), pipe.vae.config.to_dict())
    with pytest.raises(ValueError, match="differs from the pipeline's"):
        save_pipeline(tmp_path / "ldm2", pipe, vae_folder_name="../other-vae")


def test_a_folder_whose_parts_do_not_fit_is_a_one_line_error_naming_the_files(pipe, tmp_path):
    save_pipeline(tmp_path / "ldm", pipe)
    wide = TextEncoder(TextEncoderConfig(vocab_size=pipe.tokenizer.vocab_size, dim=64, depth=1, heads=2))
    save_text_encoder(tmp_path / "ldm" / "text_encoder", wide, pipe.tokenizer)
    with pytest.raises(ValueError, match="unet/config.json reads a context of width 32 but text_encoder/config.json "
                                         "makes 64") as err:
        LatentDiffusion.from_folder(tmp_path / "ldm", device="cpu")
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="not a pipeline folder"):
        LatentDiffusion.from_folder(tmp_path / "nowhere")
    (tmp_path / "ldm" / "pipeline.json").write_text(json.dumps({"vae": "../missing", "space": "latent"}))
    with pytest.raises(FileNotFoundError, match="points to the VAE folder"):
        LatentDiffusion.from_folder(tmp_path / "ldm")


def test_swapping_the_vae_decoder_changes_the_images_and_a_wrong_file_is_refused(tmp_path):
    pipe = tiny_pipe()
    before = generate(pipe)
    save_decoder_file(tiny_vae(seed=5), tmp_path / "decoder.safetensors")
    pipe.swap_vae_decoder(tmp_path / "decoder.safetensors")
    assert max_error(generate(pipe), before) > 1e-3
    save_pipeline(tmp_path / "ldm", pipe)
    with pytest.raises(ValueError, match="not a minildm VAE decoder file"):
        pipe.swap_vae_decoder(tmp_path / "ldm" / "unet" / "model.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match="not a readable VAE file"):
        pipe.swap_vae_decoder(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="no such VAE file"):
        pipe.swap_vae_decoder(tmp_path / "absent.safetensors")


# ------------------------------------------------------------------------------------------- bad input


def mask_with(value: float) -> torch.Tensor:
    mask = torch.zeros(SIZE, SIZE)
    mask[0, 0] = value
    return mask


@pytest.mark.parametrize("call, message", [
    (lambda p: p.text_to_image([]), "empty list"),
    (lambda p: p.text_to_image("a purple dog and a cat"), r"unknown words 'cat', 'dog'.*e\.g\. "),
    (lambda p: p.text_to_image("a red circle", height=21, width=SIZE), "not a multiple of 2.*use 20x16"),
    (lambda p: p.text_to_image("a red circle", guidance_scale=-1.0), "guidance_scale must be >= 0"),
    (lambda p: p.text_to_image("a red circle", steps=0), "steps must be a whole number of at least 1"),
    (lambda p: p.text_to_image("a red circle", sampler_name="dpm"), "unknown sampler"),
    (lambda p: p.text_to_image("a red circle", output_type="pil"), "output_type must be one of"),
    (lambda p: p.text_to_image("a red circle", negative_prompt=["", ""]), "2 negative prompts for 1"),
    (lambda p: p.image_to_image(images(), "a red circle", strength=1.5), r"strength must be in \[0, 1\]"),
    (lambda p: p.image_to_image(images()[:, :1], "a red circle"), r"image must be a \(3, H, W\)"),
    (lambda p: p.image_to_image((images() + 1) * 127.5, "a red circle"), r"in \[-1, 1\], got .*x / 127.5 - 1"),
    (lambda p: p.image_to_image(images()[..., :15], "a red circle"), "not a multiple of 2"),
    (lambda p: p.image_to_image(images(3), ["a red circle", "a blue square"]), "3 images for 2 prompts"),
    (lambda p: p.inpaint(images(), torch.zeros(8, 8), "a red circle"), r"mask must be \(16, 16\) or \(1, 1, 16, 16\)"),
    (lambda p: p.inpaint(images(), mask_with(0.5), "a red circle"), "only 0 .keep. and 1 .repaint."),
    (lambda p: p.inpaint(images(), mask_with(1.0), "a red circle", strength=-0.1), r"strength must be in \[0, 1\]"),
    (lambda p: p.inpaint(images(), mask_with(float("nan")), "a red circle"), r"only 0 .keep. and 1 .repaint.*nan"),
    (lambda p: p.text_to_image("a red circle", height=0, width=SIZE), "has a side below 1.*use 2x16"),
    (lambda p: p.text_to_image("a red circle", steps=-2), "steps must be a whole number of at least 1"),
    (lambda p: p.image_to_image(images() * 3, "a red circle"), r"in \[-1, 1\], got -2\.\d+\.\.2\.\d+"),
    (lambda p: p.image_to_image(with_value(float("nan")), "a red circle"), "holds 1 NaN or inf values"),
    (lambda p: p.image_to_image(with_value(float("inf")), "a red circle"), "holds 1 NaN or inf values"),
    (lambda p: p.image_to_image(with_value(1.01), "a red circle"), r"in \[-1, 1\], got .*\.\.1\.01"),
])
def test_bad_input_is_a_one_line_value_error_that_says_what_to_do(pipe, call, message):
    with pytest.raises(ValueError, match=message) as err:
        call(pipe)
    assert "\n" not in str(err.value)


def with_value(value: float) -> torch.Tensor:
    x = images()
    x[0, 1, 2, 3] = value
    return x


@pytest.mark.parametrize("call, message", [
    (lambda p: p.text_to_image(None), "prompts must be a str or a list of str, got None"),
    (lambda p: p.text_to_image(7), "prompts must be a str or a list of str, got int"),
    (lambda p: p.text_to_image(["a red circle", 3]), "got a list of int, str"),
    (lambda p: p.text_to_image("a red circle", negative_prompt=0), "negative_prompt must be a str .*, got int"),
    (lambda p: p.text_to_image("a red circle", guidance_scale="7.5"), "guidance_scale must be a number.*got str"),
    (lambda p: p.text_to_image("a red circle", sampler_name=make_sampler("ddim", p.schedule, 2)),
     "sampler_name must be a str.*got DDIM"),
    (lambda p: p.text_to_image("a red circle", steps=2.5), r"steps must be a whole number \(int.*got float"),
    (lambda p: p.text_to_image("a red circle", height=16.0, width=SIZE), r"image size 16\.0x16 must be two whole"),
    (lambda p: p.image_to_image(images().numpy(), "a red circle"), "image must be a torch.Tensor .*got ndarray"),
    (lambda p: p.image_to_image(None, "a red circle"), "image must be a torch.Tensor .*got None"),
    (lambda p: p.image_to_image(((images() + 1) * 127.5).to(torch.uint8), "a red circle"),
     r"image must hold floats in \[-1, 1\], got dtype torch.uint8; map 0..255 pixels with x.float\(\) / 127.5 - 1"),
    (lambda p: p.inpaint(images(), mask_with(1.0).to(torch.uint8), "a red circle"),
     "mask must be bool or float .*got dtype torch.uint8"),
    (lambda p: p.inpaint(images(), mask_with(1.0).tolist(), "a red circle"),
     r"mask must be a torch.Tensor .*got a list"),
])
def test_a_wrong_type_is_a_one_line_type_error_naming_what_was_given_and_what_is_expected(pipe, call, message):
    with pytest.raises(TypeError, match=message) as err:
        call(pipe)
    assert "\n" not in str(err.value)


def test_settings_after_the_prompts_and_size_are_keyword_only(pipe):
    with pytest.raises(TypeError, match="positional"):
        pipe.generate("a red circle", SIZE, SIZE, 3.0)                   # a guidance scale by position
    with pytest.raises(TypeError, match="positional"):
        pipe.text_to_image("a red circle", SIZE)
    with pytest.raises(TypeError, match="positional"):
        pipe.image_to_image(images(), "a red circle", 0.5)
    with pytest.raises(TypeError, match="positional"):
        pipe.inpaint(images(), mask_with(1.0), "a red circle", 0.5)


def test_a_bool_mask_repaints_exactly_like_the_same_float_mask(pipe):
    mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    mask[:, :8] = True
    as_bool = pipe.inpaint(images(), mask, "a red circle", steps=2, keep_pixels=True)
    as_float = pipe.inpaint(images(), mask.float(), "a red circle", steps=2, keep_pixels=True)
    assert torch.equal(as_bool, as_float)


def test_the_size_rule_gives_one_message_for_the_pipeline_and_the_trainer_and_the_u_net_takes_any_size(pipe):
    with pytest.raises(ValueError) as err:
        pipe.text_to_image("a red circle", height=21, width=21)
    from_pipeline = str(err.value)
    assert from_pipeline == "image size 21x21 is not a multiple of 2 (the VAE divides it by 2); use 20x20"
    parts = (pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.schedule)
    assert mismatches(*parts, image_size=21) == [from_pipeline]                  # what the trainer calls
    configs = (pipe.vae.config, pipe.unet.config, pipe.text_encoder.config, pipe.tokenizer, pipe.schedule)
    assert mismatches(*configs, image_size=21) == [from_pipeline] and mismatches(*configs, image_size=16) == []
    # 18 is a multiple of the VAE's 2 but not of the U-Net's halving: a 9x9 latent, which runs
    z0 = pipe.text_to_image("a red circle", height=18, width=18, output_type="latents")
    assert tuple(z0.shape) == (1, pipe.unet.config.in_channels, 9, 9) and torch.isfinite(z0).all()


def test_a_u_net_that_predicts_other_channels_than_the_latents_does_not_fit(pipe):
    config = dataclasses.replace(pipe.unet.config, out_channels=8)
    problems = mismatches(pipe.vae.config, config, pipe.text_encoder.config, pipe.tokenizer, pipe.schedule)
    assert problems == ["the U-Net predicts 8 channels but the VAE's latents have 4"], problems


def test_parts_that_do_not_fit_are_refused_when_the_pipeline_is_built(pipe):
    wide = TextEncoder(TextEncoderConfig(vocab_size=pipe.tokenizer.vocab_size, dim=64, depth=1, heads=2))
    with pytest.raises(ValueError, match="the U-Net reads a context of width 32 but the text encoder makes 64"):
        LatentDiffusion(pipe.vae, pipe.unet, wide, pipe.tokenizer, pipe.schedule)


def test_loading_the_shipped_pipeline_before_it_is_trained_says_how_to_get_it():
    from minildm.pretrained import PIPELINES, load_pipeline
    if (PIPELINES["shapes64"] / "pipeline.json").is_file():
        pytest.skip("the shipped pipeline exists")
    with pytest.raises(FileNotFoundError, match="shipped weights are missing"):
        load_pipeline()


# --------------------------------------------------------------------------------- Stable Diffusion's sizes

# SD 1.5's and SD 2.1's unet/config.json (what differs from diffusers' defaults); both VAEs are AutoencoderConfig()
SD_UNETS = {"sd15": SD15.unet, "sd21": SD21.unet}


def f8_pipe() -> LatentDiffusion:
    """tiny_pipe with a VAE that divides by 8, as SD's does (four levels): image sides map to latent sides as in SD."""
    pipe = tiny_pipe()
    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderConfig(block_out_channels=(8,) * 4, layers_per_block=1, norm_num_groups=4))
    return LatentDiffusion(vae, pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.schedule, "cpu", steps=1,
                           guidance_scale=1.0)


@pytest.mark.parametrize("height, width, latent", [(512, 512, (2, 4, 64, 64)), (768, 512, (2, 4, 96, 64))])
def test_sd_sizes_give_sd_latents_from_text_to_image(height, width, latent):
    z0 = f8_pipe().text_to_image(["a red circle", "a blue square"], height=height, width=width,
                                 output_type="latents")
    assert tuple(z0.shape) == latent and torch.isfinite(z0).all()


@pytest.mark.parametrize("variant", SD_UNETS)
def test_sd_configs_on_the_meta_device_carry_512_and_768_through_the_u_net_and_the_vae(variant):
    """SD's own configs, built on the meta device (shapes only, no memory): the size rule and the networks agree."""
    from minildm.convert import unet_config_from_diffusers

    unet_config, vae_config = unet_config_from_diffusers(SD_UNETS[variant]), AutoencoderConfig()
    with torch.device("meta"):
        unet, vae = UNet(unet_config), AutoencoderKL(vae_config)
        context = torch.empty(2, 77, unet_config.context_dim)                          # (B, L, D)
        for (height, width), latent in [((512, 512), (64, 64)), ((768, 512), (96, 64)), ((520, 456), (65, 57))]:
            assert check_image_size(height, width, vae_config) == latent
            eps = unet(torch.empty(2, 4, *latent), torch.full((2,), 999.0), context)
            assert tuple(eps.shape) == (2, 4, *latent)
            assert tuple(vae.decode(eps).shape) == (2, 3, height, width)
            assert tuple(vae.quant_conv(vae.encoder(torch.empty(1, 3, height, width))).shape) == (1, 8, *latent)


def test_an_sd_size_not_divisible_by_8_is_one_line_naming_it_and_a_size_that_fits():
    with pytest.raises(ValueError) as err:
        f8_pipe().text_to_image("a red circle", height=500, width=512)
    assert str(err.value) == "image size 500x512 is not a multiple of 8 (the VAE divides it by 8); use 496x512"
