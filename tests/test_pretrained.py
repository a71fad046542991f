"""The shipped Shapes VAE keeps the promises the README and chapter 02 make about it."""

from __future__ import annotations

import json

import pytest
import torch

from minildm.autoencoder import latent_shape, swap_decoder
from minildm.data import ShapesDataset
from minildm.pretrained import VAES, load_vae, vae_folder, vae_folder_or_name
from minildm.train_vae import evaluate_psnr

FRESH_SEED = 31337  # neither the training seed (0) nor the seed the training summary evaluated on (2024)
FOLDER = VAES["shapes64"]


def test_unknown_pretrained_name_is_a_clear_error():
    with pytest.raises(ValueError, match="available: shapes64"):
        load_vae("sd-v1-5")


def test_shipped_vae_maps_64x64_images_to_4x8x8_latents_like_sd():
    vae = load_vae("shapes64", device="cpu")
    assert vae.config.downsampling_factor == 8 and vae.config.latent_channels == 4
    assert latent_shape(64, 64, vae.config) == (4, 8, 8)
    z = vae.encode(ShapesDataset(2, seed=FRESH_SEED).images()).mean
    assert z.shape == (2, 4, 8, 8)


def test_shipped_vae_reconstructs_fresh_shapes_at_28_db_or_better():
    vae = load_vae("shapes64", device="cpu")
    images = ShapesDataset(256, seed=FRESH_SEED).images()
    score = evaluate_psnr(vae, images)
    assert score >= 28.0, f"mean PSNR on 256 fresh images is {score:.2f} dB, below the 28 dB target"


@torch.no_grad()
def test_shipped_scale_factor_gives_latents_of_unit_variance():
    vae = load_vae("shapes64", device="cpu")
    images = ShapesDataset(512, seed=FRESH_SEED).images()
    z0 = vae.to_z0(vae.encode(images).sample(torch.Generator().manual_seed(0)))
    assert z0.std().item() == pytest.approx(1.0, abs=0.1), f"std of s*z is {z0.std():.3f}, expected about 1"


def test_shipped_weights_are_small_and_say_how_they_were_made():
    folder = vae_folder("shapes64")
    size = sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors")
    assert size <= 5 * 2**20, f"shipped weights take {size / 2**20:.2f} MiB, over the 5 MiB budget"
    record = json.loads((folder / "training.json").read_text())
    for key in ("command", "seed", "train_seconds", "heldout_psnr"):
        assert key in record, f"training.json lacks {key!r}"
    assert record["command"].startswith("minildm train-vae")
    assert (folder / "README.md").is_file()


@pytest.mark.skipif(not (FOLDER / "decoder.safetensors").is_file(), reason="no fine-tuned decoder shipped")
def test_shipped_fine_tuned_decoder_reconstructs_the_same_latents_better():
    vae = load_vae("shapes64", device="cpu")
    images = ShapesDataset(256, seed=FRESH_SEED).images()
    before = evaluate_psnr(vae, images)
    after = evaluate_psnr(swap_decoder(vae, FOLDER / "decoder.safetensors"), images)
    assert after > before, f"the fine-tuned decoder does not help: {before:.2f} -> {after:.2f} dB"


def test_the_shapes64_preset_is_the_shipped_architecture():
    """`minildm train-vae` with no --channels must build the model we ship, so its defaults reproduce it."""
    from minildm.autoencoder import AutoencoderConfig

    shipped, preset = load_vae("shapes64", device="cpu").config.to_dict(), AutoencoderConfig.shapes64().to_dict()
    for key in ("block_out_channels", "layers_per_block", "norm_num_groups", "latent_channels", "mid_block_attention"):
        assert shipped[key] == preset[key], f"{key}: shipped {shipped[key]} vs shapes64() {preset[key]}"


def test_vae_folder_or_name_takes_a_folder_first_then_a_shipped_name(tmp_path):
    # --vae (train-ldm, the benchmarks' scoring): a folder is used as given; anything else must be a shipped name
    assert vae_folder_or_name(tmp_path) == tmp_path
    assert vae_folder_or_name("shapes64") == vae_folder("shapes64")
    with pytest.raises(ValueError, match="no shipped VAE called 'nope'"):
        vae_folder_or_name("nope")
