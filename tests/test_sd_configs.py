"""Stable Diffusion's real configurations (minildm/sd_configs.py): built on the meta device they have the released
models' parameter counts and allocate nothing; the comparison table and the attention sizes say what the configs
say. No diffusers needed (tests/oracle/test_sd_configs_oracle.py builds diffusers' models from the same dicts)."""

from __future__ import annotations

import pytest
import torch

from minildm.autoencoder import AutoencoderConfig
from minildm.sd_configs import (
    CONFIGS,
    SD15,
    attention_sites,
    build_on_meta,
    comparison_table,
    format_table,
    our_configs,
    parameters_by_part,
    reduced,
    sites_for,
    size_text,
    unet_levels,
)
from minildm.unet import UNetConfig

# the released models' counts (diffusers' UNet2DConditionModel / AutoencoderKL, transformers' CLIPTextModel)
KNOWN = {"sd15": {"U-Net": 859_520_964, "VAE": 83_653_863, "text encoder": 123_060_480},
         "sd21": {"U-Net": 865_910_724, "VAE": 83_653_863, "text encoder": 340_387_840}}   # SD 2: 23 blocks stored


@pytest.fixture(scope="module")
def parts():
    return {name: parameters_by_part(name) for name in KNOWN}


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_build_on_meta_gives_every_tensor_a_shape_and_no_storage(name):
    for model in build_on_meta(name):
        tensors = [*model.parameters(), *model.buffers()]
        assert tensors and all(t.is_meta for t in tensors), f"{name} {type(model).__name__}: a tensor is not on meta"


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_parameter_counts_equal_the_released_models_and_the_total_is_their_sum(parts, name):
    rows = {row.part: row for row in parts[name]}
    got = {part: rows[part].parameters for part in KNOWN[name]}
    assert got == KNOWN[name], f"{name}: counted {got}, the released model has {KNOWN[name]}"
    assert rows["total"].parameters == sum(KNOWN[name].values())
    assert rows["total"].float32_bytes == 4 * rows["total"].parameters == 2 * rows["total"].float16_bytes


def test_comparison_table_says_what_the_configs_say():
    rows = {row["model"]: row for row in comparison_table()}
    assert list(rows) == [config.name for config in CONFIGS.values()]
    sd1, sd2, sdxl = rows["SD 1.5"], rows["SD 2.1"], rows["SDXL 1.0"]
    assert (sd1["context width"], sd2["context width"], sdxl["context width"]) == ("768", "1024", "2048 = 768 + 1280")
    assert sd1["head size per level"] == "40, 80, 160, -", "SD 1: 8 heads everywhere, so the head size grows"
    assert sd2["head size per level"] == "64, 64, 64, -", "SD 2: heads of 64 channels at every level"
    assert sdxl["head size per level"] == "-, 64, 64" and sdxl["transformer depth"] == "-, 2, 10 (middle 10)"
    assert (sd1["prediction"], sd2["prediction"]) == ("epsilon", "v_prediction")
    assert (sd1["linear projections"], sd2["linear projections"]) == ("False", "True")
    assert (sd1["VAE scale factor"], sdxl["VAE scale factor"]) == ("0.18215", "0.13025")
    assert (sd1["native size"], sd2["native size"], sdxl["native size"]) == ("512x512", "768x768", "1024x1024")
    assert (sd1["latent"], sd2["latent"]) == ("4x64x64", "4x96x96")
    assert (sd1["pad token (id)"], sd2["pad token (id)"]) == ("<|endoftext|> (49407)", "! (0)")
    assert sd1["U-Net parameters"] == "859,520,964" and sd2["U-Net parameters"] == "865,910,724"


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_the_tables_reading_of_levels_agrees_with_our_unet_config(name):
    unet_config, _, _ = our_configs(name)
    levels = unet_levels(CONFIGS[name].unet)
    assert [lv["heads"] for lv in levels] == list(unet_config.level_heads)
    assert [lv["attends"] for lv in levels] == list(unet_config.attention_levels)
    assert [lv["channels"] for lv in levels] == list(unet_config.block_out_channels)


def test_sdxl_is_refused_in_one_line_that_says_what_is_built():
    with pytest.raises(ValueError, match="out of scope") as err:
        build_on_meta("sdxl")
    assert "\n" not in str(err.value) and "'sd15' and 'sd21'" in str(err.value)
    with pytest.raises(ValueError, match="unknown Stable Diffusion config 'sd3'; choose one of sd15, sd21, sdxl"):
        build_on_meta("sd3")


def test_sd15_at_512_attends_over_4096_positions_and_77_tokens_with_a_1_gib_first_score_matrix():
    sites = {site.site: site for site in sites_for("sd15", 512, 512)}
    first, cross = sites["level 0 self"], sites["level 0 cross"]
    assert (first.grid, first.n_q, first.n_k, first.heads, first.head_size) == ("64x64", 4096, 4096, 8, 40)
    assert first.score_bytes == 2 * 8 * 4096 * 4096 * 4 == 2**30, size_text(first.score_bytes)
    assert (cross.n_q, cross.n_k) == (4096, 77) and cross.score_bytes == 2 * 8 * 4096 * 77 * 4
    assert first.layers == 5 and sites["middle self"].layers == 1, "2 down + 3 up transformers at a level"
    assert (sites["level 2 self"].grid, sites["middle self"].grid) == ("16x16", "8x8")
    vae = sites["VAE decoder middle"]
    assert (vae.n_q, vae.heads, vae.head_size, vae.batch, vae.per) == (4096, 1, 512, 1, "image")


def test_a_768x512_image_has_a_96x64_latent():
    first = sites_for("sd15", 768, 512)[0]
    assert (first.grid, first.n_q) == ("96x64", 6144)


@pytest.mark.parametrize("budget, backend", [(2**30, "sdpa"), (2**30 - 1, "chunked")])
def test_the_mps_choice_flips_to_chunked_when_the_budget_is_below_the_score_matrix(budget, backend):
    first = sites_for("sd15", 512, 512, mps_budget=budget)[0]
    assert first.mps.backend == backend, str(first.mps)
    assert first.cuda.backend == "sdpa" and first.cpu.backend == "sdpa"


def test_attention_sites_refuse_a_size_the_vae_cannot_halve_three_times():
    with pytest.raises(ValueError, match="500x512 is not divisible by the VAE's factor 8"):
        attention_sites(UNetConfig(), AutoencoderConfig.sd_v1(), 500, 512)


def test_reduced_keeps_the_layout_and_changes_only_the_given_keys():
    small = reduced(SD15, unet={"block_out_channels": (32, 64, 64, 64), "norm_num_groups": 8},
                    vae={"block_out_channels": (8, 16, 16, 16), "norm_num_groups": 8}, text_encoder={"hidden_size": 48})
    unet_config, vae_config, text_config = our_configs(small)
    assert unet_config.block_out_channels == (32, 64, 64, 64) and unet_config.level_heads == (8, 8, 8, 8)
    assert vae_config.downsampling_factor == 8 and text_config.dim == 48 and text_config.depth == 12
    assert SD15.unet["block_out_channels"] == (320, 640, 1280, 1280), "the release's dict must stay as it was"


def test_size_text_and_format_table():
    assert (size_text(2**30), size_text(20_185_088), size_text(3 * 2**29)) == ("1 GiB", "19.25 MiB", "1.5 GiB")
    table = format_table([{"part": "U-Net", "n": 1}, {"part": "VAE", "n": 22}]).splitlines()
    assert table == ["part   n", "-----  --", "U-Net  1", "VAE    22"], table
    flipped = format_table([{"model": "a", "x": 1}, {"model": "b", "x": 2}], transpose=True).splitlines()
    assert flipped[0].split() == ["a", "b"] and flipped[2].split() == ["x", "1", "2"], flipped


def test_meta_build_is_not_affected_by_the_default_device():
    unet, _, _ = build_on_meta("sd15")
    assert torch.empty(1).device.type == "cpu" and next(unet.parameters()).is_meta
