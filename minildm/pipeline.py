"""Chapter 08: the whole machine. A prompt becomes an image: text encoder -> U-Net in a sampler loop -> VAE decoder.

`LatentDiffusion` holds the five parts (VAE, U-Net, text encoder, tokenizer, noise schedule) and adds the three
things a user asks of them, all through one sampling loop (samplers.sample):

- text_to_image: start from noise and denoise, steered by classifier-free guidance (Ho & Salimans 2022);
- image_to_image: start from an image's latent noised part of the way (SDEdit, Meng et al. 2021);
- inpaint: at every step put the known part of the latent back, noised to the current level (RePaint, Lugmayr et
  al. 2022; Stable Diffusion's "legacy" inpainting), so only the masked part is invented.

The "VAE" may also be an identity autoencoder (pixel-space diffusion): the pipeline only calls its encode, decode,
to_z0, from_z0 and config.downsampling_factor. A saved pipeline is a folder of model folders, like diffusers'.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minildm.autoencoder import AutoencoderKL, check_size_multiple, swap_decoder
from minildm.checkpoint import config_from_dict
from minildm.device import cpu_generator, default_dtype, get_device, randn, vae_dtype
from minildm.pixel_space import PixelSpace
from minildm.samplers import SAMPLERS, ModelFn, Sampler, Step, check_strength, img2img_start, make_sampler, sample
from minildm.saving import model_files, read_json, recover_interrupted_save, write_folder_atomically
from minildm.schedule import NoiseSchedule
from minildm.text import SPECIAL_TOKENS, TextEncoder, Tokenizer, text_encoder_files
from minildm.unet import UNet
from minildm.vae_files import swap_vae_file

PIPELINE_NAME = "pipeline.json"
SCHEDULER_NAME = "scheduler.json"
OUTPUT_TYPES = ("images", "latents")


# ------------------------------------------------------------------------------ classifier-free guidance


def guided_output(uncond: Tensor, cond: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): step past the prompt's answer, away from the empty prompt's.

    w = 1 is the prompt alone, w = 0 ignores it, w > 1 exaggerates whatever the prompt changes: sharper prompt
    following, less variety. It works because caption dropout trained one network to answer both questions.
    """
    # BEGIN SOLUTION ch08.cfg_combine
    # eps_tilde = eps(z_t, "") + w (eps(z_t, c) - eps(z_t, ""))
    return uncond + guidance_scale * (cond - uncond)                   # (B, C, h, w)
    # END SOLUTION


def guided_model_fn(unet: nn.Module, context: Tensor, uncond_context: Tensor, guidance_scale: float) -> ModelFn:
    """model_fn(z_t, t) for the sampler. With guidance, the U-Net runs once on the doubled batch [uncond; cond], as
    SD does: one big call is faster than two small ones. w = 1 and w = 0 need only one half, so run only that."""
    def model_fn(zt: Tensor, t: Tensor) -> Tensor:
        if guidance_scale == 1.0:
            return unet(zt, t, context)
        if guidance_scale == 0.0:
            return unet(zt, t, uncond_context)
        both = unet(torch.cat([zt, zt]), torch.cat([t, t]), torch.cat([uncond_context, context]))   # (2B, C, h, w)
        uncond, cond = both.chunk(2)                                                              # (B, C, h, w) each
        return guided_output(uncond, cond, guidance_scale)
    return model_fn


# ------------------------------------------------------------------------------------------ inpainting


def keep_known_region(sampler: Sampler, noise: Tensor, z_known: Tensor,
                      repaint: Tensor) -> Callable[[int, Tensor], Tensor]:
    """samplers.sample's before_step for inpainting: before each evaluation, the kept region of z becomes the
    image's latent noised to that evaluation's level, so the model sees the two regions at one noise level and
    fits the repainted one to its surroundings (RePaint's blend, without its resampling)."""
    def before_step(i: int, z: Tensor) -> Tensor:
        # z = m z + (1 - m) q(z_known at evaluation i's level),  m = 1 where we repaint
        return repaint * z + (1 - repaint) * sampler.add_noise(z_known, noise, i)      # (B, C, h, w)
    return before_step


# ------------------------------------------------------------------------------------- the parts agree


def check_image_size(height: int, width: int, vae_config) -> tuple[int, int]:
    """The latent's (h, w) for an image of height x width. The VAE divides each side by f, so a side must be a
    multiple of f; the U-Net takes any latent size (its way up returns to the sizes its way down made)."""
    f = vae_config.downsampling_factor
    check_size_multiple(height, width, f, f"the VAE divides it by {f}" if f > 1 else "pixel space")
    return height // f, width // f


def mismatches(vae, unet, text_encoder, tokenizer: Tokenizer, schedule: NoiseSchedule, names: dict | None = None,
               image_size: int | None = None) -> list[str]:
    """What does not fit between the parts; `names` says what to call each part (a file, when loading). The VAE,
    U-Net and text encoder may be given as modules or as their configs (a trainer checks before it builds), and
    `image_size` adds the size rule for square images of that side."""
    n = {"vae": "the VAE", "unet": "the U-Net", "text_encoder": "the text encoder", "tokenizer": "the tokenizer",
         "schedule": "the schedule", **(names or {})}
    v, u, te = (getattr(part, "config", part) for part in (vae, unet, text_encoder))
    problems = []
    latent_channels = getattr(v, "latent_channels", None)
    if latent_channels is not None and latent_channels != u.in_channels:
        problems.append(f"{n['unet']} reads {u.in_channels}-channel latents but {n['vae']} makes {latent_channels}")
    if latent_channels is not None and latent_channels != u.out_channels:
        problems.append(f"{n['unet']} predicts {u.out_channels} channels but {n['vae']}'s latents have "
                        f"{latent_channels}")
    if u.context_dim != te.dim:
        problems.append(f"{n['unet']} reads a context of width {u.context_dim} but {n['text_encoder']} makes {te.dim}")
    if (tokenizer.vocab_size, tokenizer.max_length) != (te.vocab_size, te.max_length):
        problems.append(f"{n['tokenizer']} has {tokenizer.vocab_size} words and max_length {tokenizer.max_length} but "
                        f"{n['text_encoder']} expects {te.vocab_size} and {te.max_length}")
    if u.num_timesteps != schedule.num_timesteps:
        problems.append(f"{n['unet']} knows {u.num_timesteps} timesteps but {n['schedule']} has "
                        f"{schedule.num_timesteps}")
    if image_size is not None:
        try:
            check_image_size(image_size, image_size, v)
        except (TypeError, ValueError) as err:
            problems.append(str(err))
    return problems


def dtype_of(module: nn.Module) -> torch.dtype:
    """The dtype a network computes in: that of its first floating-point parameter (or buffer: PixelSpace has one)."""
    return next(t.dtype for t in itertools.chain(module.parameters(), module.buffers()) if t.is_floating_point())


def kind_of(value) -> str:
    """How a TypeError names what it was given: the type, and for a list or tuple the types inside."""
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {', '.join(sorted({type(v).__name__ for v in value})) or 'nothing'}"
    return "None" if value is None else type(value).__name__


def check_defaults(guidance_scale: float, sampler_name: str, steps: int) -> None:
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise TypeError(f"guidance_scale must be a number (SD uses 7.5), got {kind_of(guidance_scale)}")
    if not guidance_scale >= 0:                                        # NaN fails this too
        raise ValueError(f"guidance_scale must be >= 0 (0: ignore the prompt, 1: the prompt alone, SD uses 7.5); "
                         f"got {guidance_scale}")
    if not isinstance(sampler_name, str):
        raise TypeError(f"sampler_name must be a str, one of {', '.join(SAMPLERS)}; got {kind_of(sampler_name)}")
    if sampler_name not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler_name!r}; choose one of {', '.join(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be a whole number (int, e.g. 50), got {kind_of(steps)}")
    if steps < 1:
        raise ValueError(f"steps must be a whole number of at least 1 (e.g. 50); got {steps!r}")


# ------------------------------------------------------------------------------------------ the pipeline


class LatentDiffusion:
    """The parts of Stable Diffusion and the three ways to use them.

    What a seed promises: the starting noise, and any noise a stochastic sampler draws, come from one CPU generator
    seeded by `seed`, so the same seed, prompts and settings give bit-identical images again on the same device
    with the same number of CPU threads. That is all that is promised. Another thread count adds the model's sums
    in another order (for the shipped model, 1 vs 2 CPU threads move pixels by about 1e-5 on the [-1, 1] scale, a
    few 8-bit values by one level; notebook 08 measures it); another device also has its own kernels, and float16
    on a GPU, so expect close images, not the same bits. `seed=None` draws from torch's global RNG instead.

    One dtype for the pipeline (`dtype`, else the U-Net's), except the VAE's: in a float16 pipeline the VAE keeps
    float32 weights and runs in float32 (device.vae_dtype, SD's decoder overflows float16); `dtypes` shows them.
    """

    def __init__(self, vae: nn.Module, unet: UNet, text_encoder: TextEncoder, tokenizer: Tokenizer,
                 schedule: NoiseSchedule, device: str | torch.device | None = None, guidance_scale: float = 7.5,
                 sampler_name: str = "ddim", steps: int = 50, dtype: torch.dtype | None = None):
        problems = mismatches(vae, unet, text_encoder, tokenizer, schedule)
        if problems:
            raise ValueError("the pipeline's parts do not fit: " + "; ".join(problems) + "; use parts trained together")
        check_defaults(guidance_scale, sampler_name, steps)
        self.device = next(unet.parameters()).device if device is None else get_device(device)
        self.dtype = next(unet.parameters()).dtype if dtype is None else dtype
        self.unet, self.text_encoder = (m.to(self.device, self.dtype).eval() for m in (unet, text_encoder))
        self.vae = vae.to(self.device, vae_dtype(self.dtype)).eval()        # float32 in a float16 pipeline
        self.tokenizer, self.schedule = tokenizer, schedule
        self.guidance_scale, self.sampler_name, self.steps = guidance_scale, sampler_name, steps

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        """What each network computes in, e.g. U-Net and text encoder float16, VAE float32 (device.vae_dtype)."""
        return {name: dtype_of(getattr(self, name)) for name in ("unet", "text_encoder", "vae")}

    def __repr__(self) -> str:
        parts = ", ".join(f"{name} {str(dtype).removeprefix('torch.')}" for name, dtype in self.dtypes.items())
        return (f"LatentDiffusion({self.space} space on {self.device}: {parts}; {self.sampler_name}, {self.steps} "
                f"steps, guidance {self.guidance_scale})")

    @property
    def space(self) -> str:
        """"latent" with a VAE, "pixel" with an identity autoencoder."""
        return "latent" if isinstance(self.vae, AutoencoderKL) else "pixel"

    # ---------------------------------------------------------------------------- the user's input, checked

    def check_prompts(self, prompts: str | Sequence[str], what: str = "prompts") -> list[str]:
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"{what} must be a str or a list of str, got {kind_of(prompts)}; e.g. \"a red circle\"")
        if not prompts:
            raise ValueError(f"{what} is an empty list; give at least one prompt (\"\" is the empty prompt)")
        unknown_words = getattr(self.tokenizer, "unknown_words", None)      # only word tokenizers have one
        unknown = unknown_words(prompts) if unknown_words is not None else []
        if unknown:
            known = self.tokenizer.words[len(SPECIAL_TOKENS):]
            raise ValueError(f"unknown words {', '.join(map(repr, unknown))} in the {what}; this text encoder knows "
                             f"{len(known)} words (e.g. {', '.join(known[:8])}); rephrase with those, or train a text "
                             f"encoder with Tokenizer(extra_words=[...])")
        return list(prompts)

    def check_images(self, image: Tensor) -> Tensor:
        """(3, H, W) or (B, 3, H, W) -> (B, 3, H, W) on the pipeline's device, in the VAE's dtype (only the VAE reads
        it). The rule: a floating-point tensor, no NaN or inf, every value in [-1, 1]. Values past the ends by at most
        1e-4 (rounding) are clamped; anything further is refused with the range found, never saturated. uint8 pixels
        are refused by type."""
        channels = getattr(self.vae.config, "in_channels", 3)
        shapes = f"({channels}, H, W) or (B, {channels}, H, W)"
        if not isinstance(image, Tensor):
            raise TypeError(f"image must be a torch.Tensor {shapes} in [-1, 1], got {kind_of(image)}; convert an "
                            f"(H, W, 3) uint8 array with minildm.data.to_tensor")
        if not image.is_floating_point():
            raise TypeError(f"image must hold floats in [-1, 1], got dtype {image.dtype}; map 0..255 pixels with "
                            f"x.float() / 127.5 - 1")
        if image.ndim not in (3, 4) or image.shape[-3] != channels:
            raise ValueError(f"image must be a {shapes} tensor, got shape {tuple(image.shape)}; put channels first")
        image = image[None] if image.ndim == 3 else image
        check_image_size(image.shape[2], image.shape[3], self.vae.config)
        bad = (~torch.isfinite(image)).sum().item()
        if bad:
            raise ValueError(f"image holds {bad} NaN or inf values; check how it was loaded and mapped to [-1, 1]")
        low, high = image.min().item(), image.max().item()
        if not (low >= -1 - 1e-4 and high <= 1 + 1e-4):
            raise ValueError(f"image values must lie in [-1, 1], got {low:g}..{high:g}; map [0, 1] images with "
                             f"2 x - 1 and [0, 255] ones with x / 127.5 - 1")
        return image.clamp(-1, 1).to(self.device, dtype_of(self.vae))

    def check_mask(self, mask: Tensor, image: Tensor) -> Tensor:
        """(H, W) or (B, 1, H, W), bool or float, of 0s and 1s (1 = repaint) -> (B, 1, h, w) at latent size: a latent
        cell is repainted if any of its pixels is (max-pooling), so no pixel to repaint stays stuck to the old image.
        Integer masks are refused by type, since 0..255 and 0..1 masks would both look valid."""
        b, _, height, width = image.shape
        shapes = f"({height}, {width}) or ({b}, 1, {height}, {width})"
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor {shapes} of 0 (keep) and 1 (repaint), got {kind_of(mask)}")
        if not (mask.dtype == torch.bool or mask.is_floating_point()):
            raise TypeError(f"mask must be bool or float (1 = repaint), got dtype {mask.dtype}; use mask > 127 for a "
                            f"0..255 mask, or mask.bool() for 0 and 1")
        fits = tuple(mask.shape) == (height, width) or (
            mask.ndim == 4 and mask.shape[0] in (1, b) and tuple(mask.shape[1:]) == (1, height, width))
        if not fits:
            raise ValueError(f"mask must be {shapes} for this {height}x{width} image, got shape "
                             f"{tuple(mask.shape)}; resize it to the image")
        if not ((mask == 0) | (mask == 1)).all():
            odd = mask[(mask != 0) & (mask != 1)].flatten()[:3].tolist()
            raise ValueError(f"mask must hold only 0 (keep) and 1 (repaint), got values like {odd}; threshold it "
                             f"with (mask > 0.5)")
        mask = mask.to(self.device, self.dtype).reshape(-1, 1, height, width).expand(b, 1, height, width)
        f = self.vae.config.downsampling_factor
        return F.max_pool2d(mask, kernel_size=f) if f > 1 else mask                     # (B, 1, h, w)

    # -------------------------------------------------------------------------------- between x and z_0

    @torch.no_grad()
    def encode_images(self, image: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> z_0 (B, C, h, w): the posterior's mean, times the scale factor, in the
        pipeline's dtype (the VAE's may be float32: see device.vae_dtype)."""
        z0 = self.vae.to_z0(self.vae.encode(self.check_images(image)).mean)            # (B, C, h, w), the VAE's dtype
        return z0.to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, z0: Tensor) -> Tensor:
        """z_0 (or z_t, or z0_hat from a Step) -> images (B, 3, H, W) in [-1, 1], float32 on the CPU."""
        z0 = z0.to(self.device, dtype_of(self.vae))      # at the VAE's door: float32 in a float16 pipeline
        x = self.vae.decode(self.vae.from_z0(z0))                                         # (B, 3, H, W)
        return x.clamp(-1, 1).float().cpu()

    def swap_vae_decoder(self, file: str | os.PathLike) -> None:
        """Use the decoder in a VAE file (decoder.safetensors): same latents, another way to draw them."""
        if not isinstance(self.vae, AutoencoderKL):
            raise ValueError(f"this pipeline diffuses in pixel space ({type(self.vae).__name__}): it has no VAE "
                             f"decoder to swap; use a latent-space pipeline")
        if not Path(file).is_file():
            raise FileNotFoundError(f"{file}: no such VAE file; give a decoder.safetensors written by "
                                    f"save_decoder_file")
        try:
            swap_decoder(self.vae, file)
        except ValueError:
            raise
        except Exception as err:                    # safetensors raises its own types for files it cannot read
            raise ValueError(f"{file}: not a readable VAE file ({err}); give a decoder.safetensors written by "
                             f"save_decoder_file") from err
        self.vae.to(self.device, vae_dtype(self.dtype)).eval()

    def swap_vae(self, file: str | os.PathLike) -> None:
        """Use the weights in a VAE file as users have them: SD's (CompVis layout, full or decoder-only, .safetensors
        or .ckpt), a diffusers `vae/` folder or its weights file, or our own decoder file (`swap_vae_decoder`).
        The file has this VAE's architecture; a full file replaces the encoder too. A failed swap changes nothing."""
        if not isinstance(self.vae, AutoencoderKL):
            raise ValueError(f"this pipeline diffuses in pixel space ({type(self.vae).__name__}): it has no VAE "
                             f"to swap; use a latent-space pipeline")
        try:
            swap_vae_file(self.vae, file)
        except (ValueError, FileNotFoundError):
            raise
        except Exception as err:                    # anything a reader raises that is not already one clear line
            reason = (str(err).splitlines() or [type(err).__name__])[0]
            raise ValueError(f"{file}: not a readable VAE file ({reason}); give an SD VAE file (.safetensors or "
                             f".ckpt) or a diffusers vae/ folder") from err
        self.vae.to(self.device, vae_dtype(self.dtype)).eval()

    # ------------------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, prompts: str | Sequence[str], height: int, width: int, *, guidance_scale: float | None = None,
                 sampler_name: str | None = None, steps: int | None = None, seed: int | None = 0,
                 negative_prompt: str | Sequence[str] | None = None, callback: Callable[[Step], None] | None = None,
                 output_type: str = "images", init: Tensor | None = None, strength: float = 1.0,
                 known: tuple[Tensor, Tensor] | None = None, latents: Tensor | None = None) -> Tensor:
        """The one loop behind all three: prompts -> context; seeded noise -> (img2img start) -> sampler -> z_0.
        `init` (an image's z_0) starts part-way, by `strength`; `known` = (z_0 of the image, repaint mask at latent
        size) turns on inpainting. `latents` replaces the seeded starting noise: unit-variance (B, C, h, w), which
        the sampler scales by its initial sigma (diffusers' convention, so both can start from the same noise).
        A setting left at None is the pipeline's default."""
        guidance_scale = self.guidance_scale if guidance_scale is None else guidance_scale
        sampler_name = self.sampler_name if sampler_name is None else sampler_name
        steps = self.steps if steps is None else steps
        check_defaults(guidance_scale, sampler_name, steps)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        check_strength(strength)
        prompts = self.check_prompts(prompts)
        negatives = [""] * len(prompts) if negative_prompt is None else self.check_prompts(negative_prompt,
                                                                                           "negative_prompt")
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one, or one each")
        h, w = check_image_size(height, width, self.vae.config)

        encode = self.text_encoder.encode_prompts
        context = encode(self.tokenizer, prompts, self.device).to(self.dtype)                # (B, L, D)
        uncond_context = encode(self.tokenizer, negatives, self.device).to(self.dtype)       # (B, L, D)
        model_fn = guided_model_fn(self.unet, context, uncond_context, guidance_scale)
        sampler = make_sampler(sampler_name, self.schedule, steps)
        generator = cpu_generator(seed)
        shape = (len(prompts), self.unet.config.in_channels, h, w)
        if latents is None:
            noise = randn(shape, generator, self.device, self.dtype)                        # (B, C, h, w)
        else:
            noise = self.check_latents(latents, shape)                                      # (B, C, h, w)

        before_step = None if known is None else keep_known_region(sampler, noise, *known)
        z0 = sample(model_fn, noise, sampler, generator, callback=callback, init=init, strength=strength,
                    before_step=before_step)
        if known is not None:
            z_known, repaint = known
            z0 = repaint * z0 + (1 - repaint) * z_known                   # the kept region, exactly the image's
        return self.decode_latents(z0) if output_type == "images" else z0

    def check_latents(self, latents: Tensor, shape: tuple[int, ...]) -> Tensor:
        """Given starting noise -> on the pipeline's device and dtype, after checking its shape and values."""
        if not isinstance(latents, Tensor) or not latents.is_floating_point():
            given = f"dtype {latents.dtype}" if isinstance(latents, Tensor) else kind_of(latents)
            raise TypeError(f"latents must be a float tensor of unit-variance noise {shape}, got {given}")
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} (prompts, latent channels, height / f, width / f) for "
                             f"this size, got {tuple(latents.shape)}; draw them with torch.randn{shape}")
        if not torch.isfinite(latents).all():
            raise ValueError("latents hold NaN or inf values; give standard-normal noise (torch.randn)")
        return latents.to(self.device, self.dtype)

    def text_to_image(self, prompts: str | Sequence[str], *, height: int = 64, width: int = 64,
                      guidance_scale: float | None = None, sampler_name: str | None = None, steps: int | None = None,
                      seed: int | None = 0, negative_prompt: str | Sequence[str] | None = None,
                      callback: Callable[[Step], None] | None = None, output_type: str = "images",
                      latents: Tensor | None = None) -> Tensor:
        """One image per prompt: (B, 3, H, W) in [-1, 1] (float32, CPU), or the z_0 latents (B, C, h, w).
        `latents`: the unit-variance starting noise (B, C, H / f, W / f) instead of the seed's."""
        return self.generate(prompts, height, width, guidance_scale=guidance_scale, sampler_name=sampler_name,
                             steps=steps, seed=seed, negative_prompt=negative_prompt, callback=callback,
                             output_type=output_type, latents=latents)

    def match_batch(self, image: Tensor, prompts) -> tuple[Tensor, list[str]]:
        """One prompt per image; a single image or a single prompt is repeated to match the other."""
        prompts = self.check_prompts(prompts)
        b = max(image.shape[0], len(prompts))
        if {image.shape[0], len(prompts)} - {1, b}:
            raise ValueError(f"{image.shape[0]} images for {len(prompts)} prompts; give one prompt per image, or one "
                             f"for all")
        return image.expand(b, *image.shape[1:]), prompts * (b // len(prompts))

    def image_to_image(self, image: Tensor, prompt: str | Sequence[str], *, strength: float = 0.6,
                       guidance_scale: float | None = None, sampler_name: str | None = None, steps: int | None = None,
                       seed: int | None = 0, negative_prompt: str | Sequence[str] | None = None,
                       callback: Callable[[Step], None] | None = None, output_type: str = "images") -> Tensor:
        """SDEdit: noise the image's latent to strength x the way and denoise it towards the prompt. Strength 0
        gives back the image (through the VAE), strength 1 ignores it (the same as text_to_image, same seed).
        The image follows check_images' rule: floats in [-1, 1], no NaN or inf."""
        image, prompts = self.match_batch(self.check_images(image), prompt)
        z0 = self.encode_images(image)                                                       # (B, C, h, w)
        return self.generate(prompts, image.shape[2], image.shape[3], guidance_scale=guidance_scale,
                             sampler_name=sampler_name, steps=steps, seed=seed, negative_prompt=negative_prompt,
                             callback=callback, output_type=output_type, init=z0, strength=strength)

    def inpaint(self, image: Tensor, mask: Tensor, prompt: str | Sequence[str], *, strength: float = 1.0,
                guidance_scale: float | None = None, sampler_name: str | None = None, steps: int | None = None,
                seed: int | None = 0, negative_prompt: str | Sequence[str] | None = None,
                callback: Callable[[Step], None] | None = None, output_type: str = "images",
                keep_pixels: bool = False) -> Tensor:
        """Repaint where mask = 1, keep where mask = 0 (a bool or float mask, see check_mask). The latent's kept
        region is the image's at every step (noised to that step's level) and exactly at the end; `keep_pixels` also
        pastes the original pixels there, since the VAE's round trip blurs them a little."""
        image, prompts = self.match_batch(self.check_images(image), prompt)
        repaint = self.check_mask(mask, image)                                               # (B, 1, h, w)
        z0 = self.encode_images(image)                                                       # (B, C, h, w)
        out = self.generate(prompts, image.shape[2], image.shape[3], guidance_scale=guidance_scale,
                            sampler_name=sampler_name, steps=steps, seed=seed, negative_prompt=negative_prompt,
                            callback=callback, output_type=output_type, init=z0, strength=strength,
                            known=(z0, repaint))
        if output_type == "images" and keep_pixels:
            m = mask.to(out.dtype).reshape(-1, 1, *image.shape[2:])                          # (B or 1, 1, H, W)
            out = m * out + (1 - m) * image.float().cpu()
        return out

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, progress: bool = False, **options) -> "LatentDiffusion":
        """Any of the three layouts: our pipeline folder (pipeline.json, see from_folder), a diffusers folder
        (model_index.json) or a CompVis single file (.safetensors / .ckpt); `options` go to the loader
        (sd_loading.load_diffusers_folder / load_single_file, e.g. prediction_type="v_prediction" for SD 2 768).
        `progress` shows a bar over the bytes of Stable Diffusion's weights files on stderr as they are read (our
        own folders are small: they load without one)."""
        from minildm import sd_loading

        path = Path(path)
        if path.is_dir() and (path / PIPELINE_NAME).is_file():
            return cls.from_folder(path, device, dtype=dtype, **options)
        if path.is_dir() and (path / sd_loading.MODEL_INDEX).is_file():
            return sd_loading.load_diffusers_folder(path, device, dtype, progress=progress, **options)
        if path.is_file() and path.suffix in sd_loading.SINGLE_FILE_SUFFIXES:
            return sd_loading.load_single_file(path, device, dtype, progress=progress, **options)
        what = "a folder" if path.is_dir() else "a file" if path.is_file() else "nothing (no such path)"
        raise FileNotFoundError(f"{path}: {what} that is no pipeline we know; give our pipeline folder "
                                f"({PIPELINE_NAME}), a diffusers folder ({sd_loading.MODEL_INDEX}) or a single "
                                f"{' / '.join(sd_loading.SINGLE_FILE_SUFFIXES)} Stable Diffusion file")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, device: str | torch.device | None = None,
                    vae: nn.Module | str | os.PathLike | None = None,
                    dtype: torch.dtype | None = None) -> "LatentDiffusion":
        """A folder written by save_pipeline -> the pipeline, in eval mode on `device` (default: get_device()).
        A pixel-space pipeline stores no VAE: it gets the identity autoencoder (pixel_space.PixelSpace). `vae`
        replaces the VAE pipeline.json names: a model, or a VAE folder (the way to use one outside the pipeline's
        parent folder, which pipeline.json alone may not point to)."""
        folder = Path(folder)
        recover_interrupted_save(folder)
        meta_path = folder / PIPELINE_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"{folder}: not a pipeline folder (no {PIPELINE_NAME}); write one with "
                                    f"save_pipeline")
        meta = read_json(meta_path)
        if not isinstance(meta, dict):
            raise ValueError(f"{meta_path}: expected a JSON object, found {type(meta).__name__}; write the folder "
                             f"again with save_pipeline")
        if isinstance(vae, (str, os.PathLike)):
            vae, vae_name = AutoencoderKL.from_folder(vae), str(Path(vae) / "config.json")
        elif vae is None and (meta.get("space") == "pixel" or meta.get("vae") is None):
            vae, vae_name = PixelSpace(), "the identity autoencoder (pixel space)"
        elif vae is None:
            vae_folder = vae_path(folder, meta["vae"], meta_path)
            if not (vae_folder / "config.json").is_file():
                raise FileNotFoundError(f"{meta_path} points to the VAE folder {meta['vae']!r}, but {vae_folder} holds "
                                        f"no config.json; put the VAE there or save the pipeline with its VAE inside")
            vae = AutoencoderKL.from_folder(vae_folder)
            vae_name = str(Path(meta["vae"]) / "config.json")
        else:
            vae_name = "the given vae"
        unet = UNet.from_folder(folder / "unet")
        text_encoder = TextEncoder.from_folder(folder / "text_encoder")
        tokenizer = Tokenizer.from_folder(folder / "text_encoder")
        scheduler_path = folder / SCHEDULER_NAME
        if not scheduler_path.is_file():
            raise FileNotFoundError(f"{scheduler_path}: missing; a pipeline folder holds the NoiseSchedule there")
        schedule = config_from_dict(NoiseSchedule, read_json(scheduler_path), scheduler_path)
        names = {"vae": vae_name, "unet": "unet/config.json", "text_encoder": "text_encoder/config.json",
                 "tokenizer": "text_encoder/vocab.json", "schedule": SCHEDULER_NAME}
        problems = mismatches(vae, unet, text_encoder, tokenizer, schedule, names)
        if problems:
            raise ValueError(f"{folder}: the parts do not fit: " + "; ".join(problems) + "; save the parts that were "
                             "trained together")
        device = get_device(device)
        dtype = default_dtype(device) if dtype is None else dtype
        return cls(vae, unet, text_encoder, tokenizer, schedule, device, meta.get("guidance_scale", 7.5),
                   meta.get("sampler", "ddim"), meta.get("steps", 50), dtype=dtype)


# ------------------------------------------------------------------------------------------------ saving


def vae_path(folder: Path, vae_folder_name: str, source: str | os.PathLike = PIPELINE_NAME,
             fix: str = "if you trust it, pass it explicitly: LatentDiffusion.from_folder(..., vae={target!r})",
             ) -> Path:
    """The VAE folder a pipeline names, relative to the pipeline's folder, and never outside the folder that holds
    the pipeline: a downloaded pipeline.json must not pick a folder elsewhere on the disk (pass one explicitly with
    from_folder(vae=...)). Normalised by hand: the system would resolve "ldm/../vae" only once "ldm" exists, and a
    pipeline is checked before it is written."""
    if not isinstance(vae_folder_name, str) or not vae_folder_name:
        raise ValueError(f"{source}: \"vae\" must name a folder (e.g. \"vae\" or \"../shapes64-vae\"), got "
                         f"{vae_folder_name!r}")
    target = Path(os.path.normpath(Path(folder).absolute() / vae_folder_name))
    home = Path(os.path.normpath(Path(folder).absolute().parent))
    if Path(vae_folder_name).is_absolute() or not target.is_relative_to(home):
        raise ValueError(f"{source}: the VAE folder {vae_folder_name!r} lies outside {home}, the only place a "
                         f"pipeline may point to; " + fix.format(target=str(target)))
    return Path(os.path.normpath(Path(folder) / vae_folder_name))


def check_vae_reference(folder: Path, vae_folder_name: str, vae: nn.Module) -> None:
    """A pipeline that points to a VAE folder must get back the VAE it was saved with (not, say, the original
    decoder after a swap): refuse to write a reference that would load different weights."""
    target = vae_path(folder, vae_folder_name, "vae_folder_name", "save the VAE beside the pipeline folder, or pass "
                      "vae_folder_name=None to store it inside")
    if not (target / "config.json").is_file():
        raise FileNotFoundError(f"{target}: no VAE model folder there; save the VAE there first, or pass "
                                f"vae_folder_name=None to store it inside the pipeline")
    stored = AutoencoderKL.from_folder(target).state_dict()
    ours = vae.state_dict()
    if stored.keys() != ours.keys() or any(not torch.equal(stored[k], ours[k].detach().cpu().to(stored[k].dtype))
                                           for k in ours):
        raise ValueError(f"the VAE in {target} differs from the pipeline's (a swapped decoder?); pass "
                         f"vae_folder_name=None to store the pipeline's own VAE inside it")


def save_pipeline(folder: str | os.PathLike, pipe: LatentDiffusion, vae_folder_name: str | None = None,
                  extra_files: dict | None = None) -> Path:
    """Write `folder/` = unet/, text_encoder/ (with vocab.json), scheduler.json, pipeline.json, and vae/ unless
    `vae_folder_name` names a VAE folder relative to `folder` (e.g. "../shapes64-vae", shared by several models);
    `extra_files` (e.g. training.json) go in too. One atomic write: an interrupted save leaves the old pipeline whole,
    and a pipeline folder already there is kept as NAME.old-N (anything else there is refused)."""
    folder = Path(folder)
    latent = pipe.space == "latent"
    if latent and vae_folder_name is not None:
        check_vae_reference(folder, vae_folder_name, pipe.vae)
    parts = {"unet": model_files(pipe.unet, pipe.unet.config),
             "text_encoder": text_encoder_files(pipe.text_encoder, pipe.tokenizer)}
    if latent and vae_folder_name is None:
        parts["vae"] = model_files(pipe.vae, pipe.vae.config.to_dict())
    files = {f"{part}/{name}": content for part, contents in parts.items() for name, content in contents.items()}
    files[PIPELINE_NAME] = {"vae": (vae_folder_name or "vae") if latent else None, "space": pipe.space,
                            "guidance_scale": pipe.guidance_scale, "sampler": pipe.sampler_name, "steps": pipe.steps}
    files[SCHEDULER_NAME] = pipe.schedule.to_dict()
    return write_folder_atomically(folder, {**files, **(extra_files or {})}, kind="pipeline")


__all__ = [
    "LatentDiffusion",
    "guided_model_fn",
    "guided_output",
    "img2img_start",
    "save_pipeline",
]
