"""Stable Diffusion 1.5 at its full size loads into minildm (built on the meta device) and takes diffusers' steps.

The reduced-width parity tests (test_sd_pipeline_parity.py) check every rule; this one checks that nothing in them
depends on the width: SD 1.5's own configs (859,520,964 U-Net parameters, 83,653,863 VAE, 123,060,480 text encoder,
4.3 GB of float32 weights), random weights, saved by diffusers as a diffusers folder, loaded by
`LatentDiffusion.from_pretrained`, then two DDIM steps at a 64x64 image (8x8 latent), guidance 7.5, from the same
latents as diffusers: final latents and image within 1e-4 (relative). diffusers runs first and is dropped before
ours loads, so at most one copy of the weights is alive at a time (plus the pages of the file being read). The wall
time and peak resident memory (ru_maxrss) are printed (run with -s to see them); no timing is asserted.

    python -m pytest -p no:cacheprovider -m slow -s tests/oracle/test_sd_full_size.py
"""

from __future__ import annotations

import gc
import math
import os
import resource
import time

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from minildm.clip_tokenizer import CLIPTokenizer  # noqa: E402
from minildm.pipeline import LatentDiffusion  # noqa: E402
from minildm.sd_configs import SD15, SD_SCHEDULER  # noqa: E402

pytestmark = [pytest.mark.oracle, pytest.mark.slow]

RTOL = 1e-4                                    # of max |diffusers' value|
UNET_PARAMETERS, VAE_PARAMETERS, TEXT_PARAMETERS = 859_520_964, 83_653_863, 123_060_480
# SD 1.5's unet/config.json, vae/config.json and text_encoder/config.json (what differs from the classes' defaults),
# and its schedule (run by DDIM here), from minildm/sd_configs.py
UNET, VAE, (TEXT,), SCHEDULE = SD15.unet, SD15.vae, SD15.text_encoders, SD_SCHEDULER
PROMPT, NEGATIVE, SIZE, STEPS = "a photograph of an astronaut riding a horse", "blurry", 64, 2


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20         # Linux: KiB


def fill(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Cheap random weights, in place: each weight ~ N(0, 1/fan_in) (the scale of PyTorch's default init, at the
    price of one randn per tensor instead of kaiming's bookkeeping), biases ~ N(0, 0.02), norm scales around 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                    p.normal_(1.0 if name == "weight" else 0.0, 0.2, generator=generator)
                elif p.dim() >= 2:
                    p.normal_(0.0, 1 / math.sqrt(p[0].numel()), generator=generator)
                else:
                    p.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def empty(build):
    """The model built on the meta device, then given uninitialised CPU memory (fill() writes every parameter)."""
    with torch.device("meta"):
        model = build()
    return model.to_empty(device="cpu")


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape, f"ours {tuple(ours.shape)} vs diffusers {tuple(theirs.shape)}"
    return (ours.float() - theirs.float()).abs().max().item() / max(theirs.abs().max().item(), 1e-12)


def latents() -> torch.Tensor:
    return torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(3))


def test_full_size_sd15_folder_loads_on_meta_and_takes_diffusers_two_ddim_steps(tmp_path):
    start = time.perf_counter()
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        unet = fill(empty(lambda: diffusers.UNet2DConditionModel(**UNET)), 0)
        vae = fill(empty(lambda: diffusers.AutoencoderKL(**VAE)), 1)
        text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT))   # has buffers: built plainly
        fill(text_encoder, 2)
        assert (count(unet), count(vae), count(text_encoder)) == (UNET_PARAMETERS, VAE_PARAMETERS, TEXT_PARAMETERS)
        CLIPTokenizer.shipped(pad_token="<|endoftext|>").save(tmp_path / "tokenizer")
        tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
        pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                                 scheduler=diffusers.DDIMScheduler(**SCHEDULE), safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        pipe.save_pretrained(tmp_path / "sd15")
        built = time.perf_counter()
        with torch.no_grad():
            theirs = {kind: pipe(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                                 guidance_scale=7.5, latents=latents(), output_type=kind).images
                      for kind in ("latent", "pt")}
        del pipe, unet, vae, text_encoder                 # one copy of the weights at a time
        gc.collect()
    finally:
        if old is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    diffusers_ran = time.perf_counter()

    ours = LatentDiffusion.from_pretrained(tmp_path / "sd15", device="cpu")
    loaded = time.perf_counter()
    assert (count(ours.unet), count(ours.vae), count(ours.text_encoder)) == (
        UNET_PARAMETERS, VAE_PARAMETERS, TEXT_PARAMETERS), "our SD 1.5 parts should have SD 1.5's parameter counts"
    assert ours.sampler_name == "ddim"
    run = dict(height=SIZE, width=SIZE, negative_prompt=NEGATIVE, steps=STEPS, guidance_scale=7.5)
    z = ours.text_to_image([PROMPT], latents=latents(), output_type="latents", **run)
    x = (ours.text_to_image([PROMPT], latents=latents(), output_type="images", **run) + 1) / 2     # [-1,1] -> [0,1]
    err_latents, err_images = relative_error(z, theirs["latent"]), relative_error(x, theirs["pt"])
    end = time.perf_counter()
    print(f"\nSD 1.5 full size: build+save {built - start:.1f} s, diffusers 2x2 steps {diffusers_ran - built:.1f} s, "
          f"our load {loaded - diffusers_ran:.1f} s, ours 2x2 steps {end - loaded:.1f} s, total {end - start:.1f} s; "
          f"peak RSS {peak_rss_gib():.2f} GiB; relative error: latents {err_latents:.2e}, images {err_images:.2e}")
    assert err_latents <= RTOL, f"final latents differ from diffusers' by {err_latents:.2e} (relative)"
    assert err_images <= RTOL, f"images differ from diffusers' by {err_images:.2e} (relative)"
