"""Our U-Net is diffusers' UNet2DConditionModel: the same weights give the same eps_hat for SD 1 and SD 2 layouts.

Each diffusers model is built with random weights at a reduced width (LayerNorm and GroupNorm scales and shifts
randomised too, so a norm that is skipped or misplaced cannot hide behind weight 1 / bias 0, and no tensor is left
constant), converted with `minildm.convert.unet_from_diffusers`, and run side by side in float32, eval mode. The
full-size layouts are compared on the meta device (shapes and names only, no memory).
"""

from __future__ import annotations

import re

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from minildm.convert import (  # noqa: E402
    DIFFUSERS_UNET_RULES,
    rename_keys,
    unet_config_from_diffusers,
    unet_from_diffusers,
)
from minildm.sd_configs import SD15, SD21  # noqa: E402
from minildm.unet import UNet, UNetConfig  # noqa: E402
from tests.weights import randomise_norms  # noqa: E402

pytestmark = [pytest.mark.oracle, pytest.mark.usefixtures("one_thread")]    # one_thread: tests/conftest.py

SD_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3


def mirror(down: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(t.replace("Down", "Up") for t in reversed(down))


# name -> diffusers UNet2DConditionModel options (everything else at diffusers' defaults)
CONFIGS = {
    # SD v1.5's blocks, mid block, 2 ResBlocks per level, 8 heads, 1x1 conv projections; 1/10 of the width
    "sd_v1_layout": dict(block_out_channels=(32, 64, 64, 64), down_block_types=SD_DOWN, up_block_types=SD_UP,
                         layers_per_block=2, attention_head_dim=8, norm_num_groups=8, cross_attention_dim=32),
    # SDXL's pattern: no attention at the first (largest) level
    "attention_only_below_first_level": dict(
        block_out_channels=(16, 32, 32), down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
        up_block_types=mirror(("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2), layers_per_block=1,
        attention_head_dim=4, norm_num_groups=8, cross_attention_dim=16),
    "attention_only_at_first_level": dict(
        block_out_channels=(16, 32, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=mirror(("CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D")), layers_per_block=1,
        attention_head_dim=2, norm_num_groups=8, cross_attention_dim=16),
    # attention at the first level on one path only (train-ldm --attention 1,1 --attention-up 0,1, and its mirror):
    # diffusers reads each path's block types on their own
    "first_level_attends_on_the_way_down_only": dict(
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1, attention_head_dim=2,
        norm_num_groups=8, cross_attention_dim=16),
    "first_level_attends_on_the_way_up_only": dict(
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D",) * 2, layers_per_block=1, attention_head_dim=2,
        norm_num_groups=8, cross_attention_dim=16),
    # no attention level at all: the mid block still cross-attends (diffusers' UNetMidBlock2DCrossAttn always does)
    "attention_only_in_mid_block": dict(
        block_out_channels=(16, 32), down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
        layers_per_block=1, attention_head_dim=2, norm_num_groups=8, cross_attention_dim=16),
    # SD 2: Linear proj_in/out, heads per level (diffusers' "attention_head_dim" counts heads), 2 transformer blocks
    "sd_v2_linear_projection_per_level_heads_depth_2": dict(
        block_out_channels=(32, 64, 64), down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2, layers_per_block=1,
        attention_head_dim=(2, 4, 8), use_linear_projection=True, transformer_layers_per_block=2, norm_num_groups=8,
        cross_attention_dim=24),
    # [sin, cos] order and diffusers' downscale_freq_shift = 1; 9 channels in (SD's inpainting U-Net), 8 out
    "sin_first_freq_shift_1_nine_channels_in": dict(
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2, layers_per_block=1, attention_head_dim=4, norm_num_groups=8,
        cross_attention_dim=16, flip_sin_to_cos=False, freq_shift=1, in_channels=9, out_channels=8),
}

# (config, batch, height, width, timesteps). The comment is the max relative deviation measured (torch 2.13 CPU,
# diffusers 0.42.1; the larger of 1 and 2 threads): max |ours - diffusers| / max |diffusers|. At 8x8 the sd_v1_layout's
# mid block sees one position, where self-attention's q and k cannot matter; the 16x24 case covers them. Swapping
# the values of any one of its 684 tensors moves the 16x24 output by >= 2.8e-4 relative, so none can hide under RTOL.
# (* measured later, on an AVX512 CPU, where every case here gives exactly 0: the same kernels in the same order)
CASES = {
    "sd_v1_layout_per_item_timesteps": ("sd_v1_layout", 2, 8, 8, [10, 900]),                    # 1.9e-06
    "sd_v1_layout_non_square_16x24": ("sd_v1_layout", 1, 16, 24, [500]),                        # 1.1e-06
    # sides that three halvings do not divide (a 520x456 image's 65x57 latent, at a tenth): the way down rounds up
    # (13 -> 7 -> 4 -> 2) and the way up returns to the skips' sizes, as diffusers' upsample_size does
    "sd_v1_layout_odd_sides_13x11": ("sd_v1_layout", 2, 13, 11, [100, 600]),
    "sd_v1_layout_one_int_for_a_batch_of_3": ("sd_v1_layout", 3, 8, 8, 999),                   # 9.4e-07
    "sd_v1_layout_fractional_timesteps": ("sd_v1_layout", 2, 8, 8, [811.38, 3.71]),             # 1.3e-06
    "sd_v1_layout_one_float_for_the_batch": ("sd_v1_layout", 2, 8, 8, 0.5),                     # 1.0e-06
    "attention_only_below_first_level": ("attention_only_below_first_level", 2, 8, 16, [1, 998]),   # 1.1e-06
    "attention_only_at_first_level": ("attention_only_at_first_level", 2, 16, 8, [250, 750]),       # 1.0e-06
    "attention_only_in_mid_block": ("attention_only_in_mid_block", 2, 8, 6, [0, 999]),              # 4.8e-07
    "first_level_attends_on_the_way_down_only": (
        "first_level_attends_on_the_way_down_only", 2, 8, 8, [30, 870]),                           # 0 *
    "first_level_attends_on_the_way_up_only": (
        "first_level_attends_on_the_way_up_only", 2, 10, 6, [640, 5]),                             # 0 *
    "sd_v2_linear_projection_per_level_heads_depth_2": (
        "sd_v2_linear_projection_per_level_heads_depth_2", 2, 8, 12, [42, 420.5]),                 # 9.3e-07
    "sin_first_freq_shift_1_nine_channels_in": (
        "sin_first_freq_shift_1_nine_channels_in", 2, 6, 8, [7, 707]),                             # 4.3e-07
}
RTOL = 1e-4                                    # of max |diffusers' output|
_cache: dict = {}




def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Norms randomised (tests/weights.py); every other tensor keeps its random init, and none is left constant."""
    randomise_norms(model, spread=0.5)
    constant = [n for n, p in model.named_parameters() if p.numel() > 1 and p.min() == p.max()]
    assert not constant, f"parameters left constant (a wrong mapping could hide there): {constant[:5]}"
    return model


def diffusers_unet(name: str, seed: int = 0):
    """A diffusers UNet2DConditionModel with random weights, built once per config."""
    if name not in _cache:
        torch.manual_seed(seed)
        _cache[name] = randomise(diffusers.UNet2DConditionModel(**CONFIGS[name])).eval()
    return _cache[name]


def converted(name: str) -> UNet:
    key = ("ours", name)
    if key not in _cache:
        reference = diffusers_unet(name)
        _cache[key] = unet_from_diffusers(dict(reference.config), reference.state_dict()).eval()
    return _cache[key]


def max_relative_error(ours: torch.Tensor, reference: torch.Tensor, what: str) -> tuple[float, str]:
    assert ours.shape == reference.shape, f"{what}: ours {tuple(ours.shape)} vs diffusers {tuple(reference.shape)}"
    diff = (ours - reference).abs()
    err = diff.max().item()
    rel = err / max(reference.abs().max().item(), 1e-12)
    where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    return rel, (f"{what}: max abs error {err:.3g} at {where}, relative to max |output| "
                 f"{reference.abs().max().item():.3g}: {rel:.3g}; shape {tuple(reference.shape)}")


@pytest.mark.parametrize("case", list(CASES))
def test_converted_diffusers_unet_predicts_the_same_noise(case):
    name, batch, height, width, timesteps = CASES[case]
    reference, ours = diffusers_unet(name), converted(name)
    g = torch.Generator().manual_seed(1)
    zt = torch.randn(batch, reference.config.in_channels, height, width, generator=g)
    context = torch.randn(batch, 7, reference.config.cross_attention_dim, generator=g)   # 7 tokens
    t = torch.tensor(timesteps) if isinstance(timesteps, list) else timesteps            # a python number stays one
    with torch.no_grad():
        expected = reference(zt, t, encoder_hidden_states=context).sample
        eps = ours(zt, t, context)
    rel, message = max_relative_error(eps, expected, case)
    assert rel <= RTOL, f"{message} > {RTOL:g}"


def test_the_converted_unet_reads_the_prompt_and_the_timestep_like_diffusers():
    # guards against a parity that holds only because cross-attention or the time MLP contribute nothing
    reference, ours = diffusers_unet("sd_v1_layout"), converted("sd_v1_layout")
    g = torch.Generator().manual_seed(2)
    zt = torch.randn(1, 4, 8, 8, generator=g)
    context, other = torch.randn(2, 1, 7, 32, generator=g)                                # two prompts
    with torch.no_grad():
        base = reference(zt, 100, encoder_hidden_states=context).sample
        for label, ref_out, our_out in [
            ("another prompt", reference(zt, 100, encoder_hidden_states=other).sample, ours(zt, 100, other)),
            ("another timestep", reference(zt, 600, encoder_hidden_states=context).sample, ours(zt, 600, context)),
        ]:
            change = (ref_out - base).abs().max().item() / base.abs().max().item()
            assert change > 100 * RTOL, f"{label} changes diffusers' output by only {change:.3g} (relative)"
            rel, message = max_relative_error(our_out, ref_out, label)
            assert rel <= RTOL, f"{message} > {RTOL:g}"


# ----------------------------------------------------------------------------------------- full-size layouts

SD_V1_5, SD_V2_1 = SD15.unet, SD21.unet          # SD's own unet/config.json (what differs from the defaults)


@pytest.mark.parametrize(
    "options, expected",
    [(SD_V1_5, 859_520_964), ({}, None), (SD_V2_1, None)],
    ids=["sd_v1_5", "diffusers_defaults_cross_attention_1280", "sd_v2_1"],
)
def test_full_size_unet_has_diffusers_parameter_count(options, expected):
    with torch.device("meta"):                                     # shapes only: nothing is allocated
        reference = diffusers.UNet2DConditionModel(**options)
        ours = UNet(unet_config_from_diffusers(dict(reference.config)))
    theirs, mine = (sum(p.numel() for p in m.parameters()) for m in (reference, ours))
    assert mine == theirs, f"ours has {mine:,} parameters, diffusers' {theirs:,} ({options})"
    if expected is not None:
        assert mine == expected, f"{mine:,} parameters, SD v1.5's U-Net has {expected:,}"
        with torch.device("meta"):
            assert sum(p.numel() for p in UNet(UNetConfig()).parameters()) == expected, "UNetConfig() is not SD v1"


@pytest.mark.parametrize("options", [SD_V1_5, SD_V2_1], ids=["sd_v1_5", "sd_v2_1"])
def test_every_full_size_diffusers_key_becomes_exactly_one_of_ours_with_its_shape(options):
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel(**options)
        ours = UNet(unet_config_from_diffusers(dict(reference.config)))
    renamed, origin = rename_keys(reference.state_dict(), DIFFUSERS_UNET_RULES)
    expected = ours.state_dict()
    unexplained = sorted(origin[k] for k in set(renamed) - set(expected))
    unsupplied = sorted(set(expected) - set(renamed))
    assert not unexplained, f"{len(unexplained)} diffusers keys no rule maps onto ours, e.g. {unexplained[:3]}"
    assert not unsupplied, f"{len(unsupplied)} of our keys no diffusers key supplies, e.g. {unsupplied[:3]}"
    wrong = [f"{k} <- {origin[k]}: {tuple(renamed[k].shape)} vs ours {tuple(expected[k].shape)}"
             for k in expected if renamed[k].shape != expected[k].shape]
    assert not wrong, f"{len(wrong)} shape mismatches, e.g. {wrong[:3]}"


# ----------------------------------------------------------------------------------------- refusals

def small():
    reference = diffusers_unet("attention_only_in_mid_block")
    return dict(reference.config), dict(reference.state_dict())


def refused(config: dict, state: dict, match: str) -> str:
    with pytest.raises(ValueError, match=match) as err:
        unet_from_diffusers(config, state)
    message = str(err.value)
    assert "\n" not in message, f"not one line: {message}"
    return message


def test_extra_key_is_refused_naming_it():
    config, state = small()
    state["down_blocks.0.resnets.0.extra_layer.weight"] = torch.zeros(3)
    message = refused(config, state, re.escape("down.0.res.0.extra_layer.weight"))
    assert "down_blocks.0.resnets.0.extra_layer.weight" in message, f"the file's own name is missing: {message}"


def test_missing_key_is_refused_naming_it():
    config, state = small()
    del state["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    refused(config, state, re.escape("mid.attn.blocks.0.attn2.to_k.weight"))


def test_wrong_shape_is_refused_naming_our_key_and_the_files_key():
    config, state = small()
    state["up_blocks.1.resnets.1.time_emb_proj.weight"] = torch.zeros(16, 32)
    message = refused(config, state, re.escape("up.1.res.1.time_proj.weight"))
    assert "(16, 32)" in message and "up_blocks.1.resnets.1.time_emb_proj.weight" in message, message


# each a change to a small model's config.json dict -> the one-line message that refuses it
REFUSALS = {
    "class_embed_type": ({"class_embed_type": "timestep"}, r"class_embed_type='timestep' is not supported"),
    "fourier_time_embedding": ({"time_embedding_type": "fourier"}, r"time_embedding_type='fourier' is not supported"),
    "sdxl_addition_embed": ({"addition_embed_type": "text_time"}, r"addition_embed_type='text_time'"),
    "scale_shift_time": ({"resnet_time_scale_shift": "scale_shift"}, r"resnet_time_scale_shift='scale_shift'"),
    "simple_mid_block": ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"},
                         r"mid_block_type 'UNetMidBlock2DSimpleCrossAttn'"),
    "no_mid_block": ({"mid_block_type": None}, r"mid_block_type None is not supported"),
    "unknown_key": ({"some_new_option": 1}, r"unknown .* keys \['some_new_option'\]"),
    "self_attention_block": ({"down_block_types": ("AttnDownBlock2D", "DownBlock2D")}, r"AttnDownBlock2D"),
    "up_blocks_for_another_level_count": ({"up_block_types": ("UpBlock2D",) * 3}, r"one entry per level each"),
    "depth_per_level": ({"transformer_layers_per_block": (1, 2)}, r"transformer_layers_per_block=\(1, 2\)"),
    "layers_per_block_per_level": ({"layers_per_block": (1, 2)}, r"layers_per_block"),
    "cross_attention_dim_per_level": ({"cross_attention_dim": (16, 24)}, r"cross_attention_dim=\(16, 24\)"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_config_options_we_do_not_model_are_refused_in_one_line(case):
    change, match = REFUSALS[case]
    config, state = small()
    config.update(change)
    refused(config, state, match)
