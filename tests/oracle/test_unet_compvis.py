"""A U-Net in CompVis' layout (the original SD single file) loads into our UNet and predicts diffusers' noise.

No SD file can be downloaded here, so the test makes one: diffusers builds a UNet2DConditionModel with random weights
(SD 1.5's and SD 2's layouts at a reduced width), and `to_compvis` below writes the same tensors under CompVis'
names. That writer is the test's own inverse table, checked against diffusers' own single-file converter
(`convert_ldm_unet_checkpoint` must turn it back into exactly diffusers' state dict), so the file is the one a
CompVis checkpoint of that model would be. Then `unet_from_compvis` loads it and our eps_hat must equal diffusers'.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

from test_unet_parity import CONFIGS as PARITY_CONFIGS  # noqa: E402
from test_unet_parity import randomise  # noqa: E402  (the same re-randomised norms as the diffusers parity test)

from minildm.convert import (  # noqa: E402
    compvis_ema_key,
    compvis_unet_rules,
    rename_keys,
    unet_config_from_compvis,
    unet_config_from_diffusers,
    unet_from_compvis,
)
from minildm.sd_configs import SD15, SD21  # noqa: E402
from minildm.unet import UNet, UNetConfig  # noqa: E402

pytestmark = [pytest.mark.oracle, pytest.mark.usefixtures("one_thread")]    # one_thread: tests/conftest.py

PREFIX = "model.diffusion_model."
SD_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3

# name -> diffusers UNet2DConditionModel options at a reduced width (everything else at diffusers' defaults)
CONFIGS = {
    # SD 1.5: 4 levels, 2 ResBlocks per level, 8 heads, 1x1 conv projections
    "sd_v1_5_layout": dict(block_out_channels=(32, 64, 64, 64), down_block_types=SD_DOWN, up_block_types=SD_UP,
                           layers_per_block=2, attention_head_dim=8, norm_num_groups=8, cross_attention_dim=32),
    # SD 2: Linear projections, heads per level; 1 ResBlock per level and 2 transformer blocks so that the index
    # arithmetic is tested with another layers_per_block
    "sd_v2_layout_linear_per_level_heads": dict(
        block_out_channels=(32, 64, 64, 64), down_block_types=SD_DOWN, up_block_types=SD_UP, layers_per_block=1,
        attention_head_dim=(2, 4, 8, 8), use_linear_projection=True, transformer_layers_per_block=2,
        norm_num_groups=8, cross_attention_dim=24),
    # attention at the first level on the way down only (train-ldm --attention 1,1 --attention-up 0,1): the way up's
    # output blocks there hold a ResBlock and the upsample, no transformer (the parity test's config)
    "first_level_attends_on_the_way_down_only": PARITY_CONFIGS["first_level_attends_on_the_way_down_only"],
}
RTOL = 1e-4                                    # of max |diffusers' output|
_cache: dict = {}


# ----------------------------------------------------------------------------------------- the test's CompVis writer

RESNET_TO_COMPVIS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                     "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
PLAIN_TO_COMPVIS = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def compvis_key(key: str, layers_per_block: int, up_attends: list[bool]) -> str:
    """One diffusers UNet2DConditionModel key -> its name in CompVis' openaimodel.UNetModel (without the prefix)."""
    n = layers_per_block
    for old, new in PLAIN_TO_COMPVIS.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)$", key)
    if m:
        path, i, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if path == "down":
            block = {"resnets": f"input_blocks.{1 + i * (n + 1) + j}.0",
                     "attentions": f"input_blocks.{1 + i * (n + 1) + j}.1",
                     "downsamplers": f"input_blocks.{(i + 1) * (n + 1)}.0"}[kind]
            rest = rest.replace("conv.", "op.") if kind == "downsamplers" else rest
        else:
            last = i * (n + 1) + n
            block = {"resnets": f"output_blocks.{i * (n + 1) + j}.0",
                     "attentions": f"output_blocks.{i * (n + 1) + j}.1",
                     "upsamplers": f"output_blocks.{last}.{2 if up_attends[i] else 1}"}[kind]
    else:
        m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)$", key)
        assert m, f"the test's table has no rule for diffusers key {key!r}"
        kind, j, rest = m[1], int(m[2]), m[3]
        block = f"middle_block.{ {('resnets', 0): 0, ('attentions', 0): 1, ('resnets', 1): 2}[kind, j] }"
    if kind in ("resnets",):
        head, _, tail = rest.partition(".")
        rest = f"{RESNET_TO_COMPVIS[head]}.{tail}"
    return f"{block}.{rest}"


def to_compvis(reference, state: dict | None = None, prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    state = reference.state_dict() if state is None else state
    up_attends = [t.startswith("CrossAttn") for t in reference.config.up_block_types]
    out = {prefix + compvis_key(k, reference.config.layers_per_block, up_attends): v for k, v in state.items()}
    assert len(out) == len(state), "two diffusers keys got the same CompVis name in the test's table"
    return out


# ----------------------------------------------------------------------------------------- models

def diffusers_unet(name: str):
    if name not in _cache:
        torch.manual_seed(0)
        _cache[name] = randomise(diffusers.UNet2DConditionModel(**CONFIGS[name])).eval()
    return _cache[name]


def our_config(reference) -> UNetConfig:
    return unet_config_from_diffusers(dict(reference.config))


def max_relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    assert ours.shape == reference.shape, f"ours {tuple(ours.shape)} vs diffusers {tuple(reference.shape)}"
    return (ours - reference).abs().max().item() / max(reference.abs().max().item(), 1e-12)


def same_state(model: torch.nn.Module, other: torch.nn.Module) -> bool:
    a, b = model.state_dict(), other.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_tests_compvis_file_is_what_diffusers_single_file_converter_reads_back_exactly(name):
    reference = diffusers_unet(name)
    expected = reference.state_dict()
    back = single_file_utils.convert_ldm_unet_checkpoint(to_compvis(reference), dict(reference.config))
    assert back.keys() == expected.keys(), (f"keys differ: only ours {sorted(set(back) - set(expected))[:3]}, "
                                            f"only diffusers' {sorted(set(expected) - set(back))[:3]}")
    changed = [k for k in expected if not torch.equal(back[k], expected[k])]
    assert not changed, f"{len(changed)} tensors changed on the way back, e.g. {changed[:3]}"


# (config, batch, height, width, timesteps). Measured max |ours - diffusers| / max |diffusers| (torch CPU float32,
# diffusers 0.42.1, 1 and 2 threads) in the comment: 0, the same float32 operations in the same order.
CASES = {
    "sd_v1_5_layout_non_square": ("sd_v1_5_layout", 2, 16, 24, [10, 900]),                        # 0.0
    "sd_v2_layout_linear_per_level_heads": ("sd_v2_layout_linear_per_level_heads", 2, 16, 8, [42, 420.5]),  # 0.0
}


@pytest.mark.parametrize("case", list(CASES))
def test_unet_loaded_from_compvis_layout_predicts_diffusers_noise(case):
    name, batch, height, width, timesteps = CASES[case]
    reference = diffusers_unet(name)
    ours = unet_from_compvis(our_config(reference), to_compvis(reference)).eval()
    g = torch.Generator().manual_seed(1)
    zt = torch.randn(batch, reference.config.in_channels, height, width, generator=g)
    context = torch.randn(batch, 7, reference.config.cross_attention_dim, generator=g)
    t = torch.tensor(timesteps)
    with torch.no_grad():
        expected = reference(zt, t, encoder_hidden_states=context).sample
        eps = ours(zt, t, context)
    rel = max_relative_error(eps, expected)
    assert rel <= RTOL, f"{case}: relative error {rel:.3g} > {RTOL:g}"


def test_the_prefix_is_optional_and_gives_the_same_weights():
    reference = diffusers_unet("sd_v1_5_layout")
    with_prefix = unet_from_compvis(our_config(reference), to_compvis(reference))
    bare = unet_from_compvis(our_config(reference), to_compvis(reference, prefix=""))
    assert same_state(with_prefix, bare), "the bare U-Net dict loads other weights than the prefixed one"


def whole_file(reference) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A whole SD file: the U-Net, an EMA copy that differs, the DDPM buffers, and VAE and text-encoder keys."""
    plain = to_compvis(reference)
    g = torch.Generator().manual_seed(3)
    ema = {compvis_ema_key(k): v + 0.01 * torch.randn(v.shape, generator=g) for k, v in plain.items()}
    others = {"betas": torch.rand(1000), "alphas_cumprod": torch.rand(1000), "model_ema.decay": torch.tensor(0.9999),
              "model_ema.num_updates": torch.tensor(7), "first_stage_model.decoder.conv_in.weight": torch.zeros(1),
              "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(1)}
    return {**plain, **ema, **others}, ema


def test_ema_selects_the_ema_copy_and_the_default_the_trained_weights():
    reference = diffusers_unet("sd_v1_5_layout")
    config = our_config(reference)
    state, ema = whole_file(reference)
    plain = to_compvis(reference)
    assert compvis_ema_key(PREFIX + "input_blocks.1.1.proj_in.weight") == \
        "model_ema.diffusion_modelinput_blocks11proj_inweight", "not CompVis' LitEma naming"
    trained, averaged = unet_from_compvis(config, state), unet_from_compvis(config, state, ema=True)
    assert same_state(trained, unet_from_compvis(config, plain)), "ema=False did not load model.diffusion_model.*"
    ema_as_unet = {k[len(PREFIX):]: ema[compvis_ema_key(k)] for k in plain}
    assert same_state(averaged, unet_from_compvis(config, ema_as_unet)), "ema=True did not load model_ema.*"
    assert not same_state(averaged, trained), "the EMA weights are the trained ones: the test cannot tell them apart"
    # diffusers' own converter with extract_ema=True picks the same tensors
    theirs = diffusers.UNet2DConditionModel(**CONFIGS["sd_v1_5_layout"])
    theirs.load_state_dict(single_file_utils.convert_ldm_unet_checkpoint(state, dict(reference.config),
                                                                         extract_ema=True))
    g = torch.Generator().manual_seed(4)
    zt, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 7, 32, generator=g)
    with torch.no_grad():
        rel = max_relative_error(averaged.eval()(zt, 300, context),
                                 theirs.eval()(zt, 300, encoder_hidden_states=context).sample)
    assert rel <= RTOL, f"ema=True differs from diffusers' extract_ema=True by {rel:.3g} (relative)"


def refused(config: UNetConfig, state: dict, match: str, **options) -> str:
    with pytest.raises(ValueError, match=match) as err:
        unet_from_compvis(config, state, **options)
    message = str(err.value)
    assert "\n" not in message, f"not one line: {message}"
    return message


def test_an_unknown_unet_key_is_one_line_naming_it():
    reference = diffusers_unet("sd_v1_5_layout")
    state = to_compvis(reference)
    state[PREFIX + "input_blocks.4.0.extra_layer.weight"] = torch.zeros(3)
    message = refused(our_config(reference), state, re.escape("down.1.res.0.extra_layer.weight"))
    assert "input_blocks.4.0.extra_layer.weight" in message, f"the file's own name is missing: {message}"


def test_a_key_of_no_known_part_of_a_whole_file_is_one_line_naming_it():
    reference = diffusers_unet("sd_v1_5_layout")
    state = {**to_compvis(reference), "conditioner.embedders.0.weight": torch.zeros(1)}
    refused(our_config(reference), state, re.escape("'conditioner.embedders.0.weight'"))


def test_ema_without_an_ema_copy_is_one_line_naming_the_key():
    reference = diffusers_unet("sd_v1_5_layout")
    refused(our_config(reference), to_compvis(reference), r"no EMA copy 'model_ema\.diffusion_model", ema=True)
    refused(our_config(reference), to_compvis(reference, prefix=""), r"ema=True needs a whole SD file", ema=True)


def test_a_config_of_another_layers_per_block_is_refused():
    reference = diffusers_unet("sd_v1_5_layout")
    config = our_config(reference)
    config.layers_per_block = 1
    refused(config, to_compvis(reference), "does not fit the model")


# ----------------------------------------------------------------------------------------- full size, on meta

SD_V1_5, SD_V2_1 = SD15.unet, SD21.unet          # SD's own unet/config.json (what differs from the defaults)
FULL = {"sd_v1_5": (SD_V1_5, UNetConfig()),                  # SD 1: 8 heads; SD 2: heads of 64 channels
        "sd_v2_1": (SD_V2_1, UNetConfig(heads=(5, 10, 20, 20), context_dim=1024, use_linear_projection=True))}


@pytest.mark.parametrize("name", list(FULL))
def test_every_full_size_compvis_key_becomes_exactly_one_of_ours_with_its_shape(name):
    options, config = FULL[name]
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel(**options)
        ours = UNet(config)
    compvis = {k[len(PREFIX):]: v for k, v in to_compvis(reference).items()}
    renamed, origin = rename_keys(compvis, compvis_unet_rules(config))
    expected = ours.state_dict()
    assert len(compvis) == len(expected), f"{len(compvis)} CompVis keys for our {len(expected)}"
    unexplained = sorted(origin[k] for k in set(renamed) - set(expected))
    unsupplied = sorted(set(expected) - set(renamed))
    assert not unexplained, f"{len(unexplained)} CompVis keys no rule maps onto ours, e.g. {unexplained[:3]}"
    assert not unsupplied, f"{len(unsupplied)} of our keys no CompVis key supplies, e.g. {unsupplied[:3]}"
    wrong = [f"{k} <- {origin[k]}" for k in expected if renamed[k].shape != expected[k].shape]
    assert not wrong, f"{len(wrong)} shape mismatches, e.g. {wrong[:3]}"


@pytest.mark.parametrize("name", list(FULL))
def test_full_size_config_is_read_off_the_compvis_tensors(name):
    options, config = FULL[name]
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel(**options)
    assert unet_config_from_compvis(to_compvis(reference)) == config, "heads default to SD's: 8 for SD 1, 64-wide SD 2"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_reduced_config_is_read_off_the_compvis_tensors_given_heads_and_groups(name):
    reference = diffusers_unet(name)
    expected = our_config(reference)
    inferred = unet_config_from_compvis(to_compvis(reference, prefix=""), heads=expected.heads, norm_num_groups=8)
    assert inferred == expected, f"read {inferred}, diffusers' config says {expected}"


def test_heads_of_a_context_neither_sd1_nor_sd2_are_asked_for_in_one_line():
    with pytest.raises(ValueError, match="pass heads=") as err:
        unet_config_from_compvis(to_compvis(diffusers_unet("sd_v1_5_layout")))
    assert "\n" not in str(err.value)
