"""benchmarks/standardise_vae.py: per-channel latent standardisation folded into a VAE's 1x1 convs (chapter 06)."""

from __future__ import annotations

import pytest
import torch
from benchscript import load_benchmark

from minildm.autoencoder import AutoencoderConfig, AutoencoderKL

standardise_vae = load_benchmark("standardise_vae")

TINY = AutoencoderConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, scale_factor=0.5)


def test_the_folded_vae_decodes_the_same_and_its_latents_have_zero_mean_and_unit_variance_per_channel():
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY).eval()
    with torch.no_grad():   # give the channels different offsets and spreads, as a trained VAE's have
        vae.quant_conv.bias[:4] += torch.tensor([3.0, -2.0, 0.5, 0.0])
        vae.quant_conv.weight[:4] *= torch.tensor([40.0, 3.0, 10.0, 20.0]).view(4, 1, 1, 1)
        vae.quant_conv.bias[4:] = -4.0                                   # posterior std e^-2: the means dominate
    pixels = torch.randint(0, 256, (64, 16, 16, 3), dtype=torch.uint8).numpy()
    x = standardise_vae.to_tensor_batch(pixels)
    with torch.no_grad():
        before = vae.reconstruct(x)
        mean, std = standardise_vae.channel_moments(vae, pixels)
        assert std.max() / std.min() > 3, "the test VAE should start with unequal channels"
        standardise_vae.standardise(vae, mean, std)
        torch.testing.assert_close(vae.reconstruct(x), before, atol=1e-4, rtol=1e-4)
        new_mean, new_std = standardise_vae.channel_moments(vae, pixels)
    torch.testing.assert_close(new_mean, torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(new_std, torch.ones(4), atol=1e-4, rtol=0)
    assert vae.config.scale_factor == 1.0


def test_an_existing_output_folder_is_refused_and_left_as_it_was(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="exists; give a new folder"):
        standardise_vae.main([str(tmp_path / "vae"), str(tmp_path / "out")])
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
