"""Our VAE is diffusers' AutoencoderKL: the same weights give the same posterior and the same decoded image.

Each diffusers model is built with random weights (GroupNorm scales and shifts randomised too, so a norm that is
skipped or misplaced cannot hide behind weight 1 / bias 0), converted with `minildm.convert`, and run side by side.
"""

import re

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from minildm.autoencoder import AutoencoderConfig  # noqa: E402
from minildm.convert import vae_from_compvis, vae_from_diffusers  # noqa: E402

pytestmark = pytest.mark.oracle

# name -> (diffusers AutoencoderKL options, image height, width); every size non-square on purpose
CONFIGS = {
    "sd_v1_layout_reduced_width": (
        dict(block_out_channels=(32, 64, 64, 64), layers_per_block=2, norm_num_groups=32),
        24, 32,
    ),
    "three_levels_one_resblock": (dict(block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8), 16, 24),
    "no_mid_attention": (
        dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False),
        16, 24,
    ),
    "no_quant_convs_8_latent_channels": (
        dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=8,
             use_quant_conv=False, use_post_quant_conv=False),
        24, 16,
    ),
}
ATOL = 1e-5
_cache: dict = {}


def diffusers_vae(name: str, seed: int = 0):
    """A diffusers AutoencoderKL with random weights, built once per config."""
    if name not in _cache:
        options, _, _ = CONFIGS[name]
        levels = len(options["block_out_channels"])
        torch.manual_seed(seed)
        model = diffusers.AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels, **options
        ).eval()
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                torch.nn.init.normal_(module.weight, 1.0, 0.5)
                torch.nn.init.normal_(module.bias, 0.0, 0.5)
        _cache[name] = model
    return _cache[name]


def inputs(name: str, latent_channels: int, f: int):
    _, height, width = CONFIGS[name]
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, height, width, generator=g) * 2 - 1                 # images in [-1, 1]
    z = torch.randn(2, latent_channels, height // f, width // f, generator=g)
    return x, z


def assert_matches(ours: torch.Tensor, reference: torch.Tensor, what: str, atol: float = ATOL):
    assert ours.shape == reference.shape, f"{what}: ours {tuple(ours.shape)} vs diffusers {tuple(reference.shape)}"
    diff = (ours - reference).abs()
    err = diff.max().item()
    rel = err / max(reference.abs().max().item(), 1e-12)
    where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    assert err <= atol, (f"{what}: max abs error {err:.3g} at {where} (relative {rel:.3g}) > {atol:g}; "
                         f"shape {tuple(reference.shape)}")


def assert_same_function(ours, reference, name: str, label: str):
    x, z = inputs(name, reference.config.latent_channels, 2 ** (len(reference.config.block_out_channels) - 1))
    with torch.no_grad():
        ref_posterior = reference.encode(x).latent_dist
        posterior = ours.encode(x)
        assert_matches(posterior.mean, ref_posterior.mean, f"{label} encode mean")
        assert_matches(posterior.logvar, ref_posterior.logvar, f"{label} encode logvar")
        assert_matches(ours.decode(z), reference.decode(z).sample, f"{label} decode")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_converted_diffusers_vae_gives_same_posterior_and_decoded_image(name):
    reference = diffusers_vae(name)
    ours = vae_from_diffusers(dict(reference.config), reference.state_dict()).eval()
    assert ours.config.scale_factor == reference.config.scaling_factor
    assert_same_function(ours, reference, name, name)


def test_old_diffusers_attention_names_convert_to_the_same_weights():
    # diffusers < 0.14 called the VAE attention's projections query/key/value/proj_attn
    reference = diffusers_vae("three_levels_one_resblock")
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {
        re.sub(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f"attentions.0.{old_names[m[1]]}.", k): v
        for k, v in reference.state_dict().items()
    }
    assert any(".proj_attn." in k for k in old), "the test did not rename anything"
    new_model = vae_from_diffusers(dict(reference.config), reference.state_dict())
    old_model = vae_from_diffusers(dict(reference.config), old)
    for key, tensor in new_model.state_dict().items():
        assert torch.equal(tensor, old_model.state_dict()[key]), f"{key} differs between new and old attention names"


# --- CompVis (original SD single file) layout --------------------------------------------------------------------
# diffusers ships only the CompVis -> diffusers direction (convert_ldm_vae_checkpoint). So this test writes the
# CompVis layout itself, from the published key names, with its own small table (independent of minildm.convert's
# rules), and first checks that diffusers' converter reads that layout back to exactly the original weights.


def to_compvis(state_dict: dict, num_levels: int) -> dict:
    """diffusers keys -> CompVis keys, as in the SD v1 .ckpt files (attention projections as 1x1 convs)."""
    plain = [
        ("conv_norm_out.", "norm_out."), (".conv_shortcut.", ".nin_shortcut."),
        ("mid_block.resnets.0.", "mid.block_1."), ("mid_block.resnets.1.", "mid.block_2."),
        ("mid_block.attentions.0.", "mid.attn_1."), ("attn_1.group_norm.", "attn_1.norm."),
        ("attn_1.to_q.", "attn_1.q."), ("attn_1.to_k.", "attn_1.k."), ("attn_1.to_v.", "attn_1.v."),
        ("attn_1.to_out.0.", "attn_1.proj_out."),
    ]
    out = {}
    for key, tensor in state_dict.items():
        for old, new in plain:
            key = key.replace(old, new)
        key = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", key)
        key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", key)
        # CompVis numbers decoder levels by resolution: up.{n-1} is the first one applied
        key = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{num_levels - 1 - int(m[1])}.block.", key)
        key = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{num_levels - 1 - int(m[1])}.upsample.", key)
        if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", key):
            tensor = tensor[:, :, None, None]                                # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
        out["first_stage_model." + key] = tensor.clone()
    return out


@pytest.mark.parametrize("name", ["sd_v1_layout_reduced_width", "three_levels_one_resblock"])
def test_compvis_checkpoint_gives_same_function_as_diffusers(name):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    reference = diffusers_vae(name)
    options, _, _ = CONFIGS[name]
    compvis = to_compvis(reference.state_dict(), len(options["block_out_channels"]))

    # the layout written above is the one diffusers itself reads
    back = convert_ldm_vae_checkpoint(compvis, dict(reference.config))
    expected = reference.state_dict()
    assert sorted(back) == sorted(expected), f"diffusers reads different keys: {sorted(set(back) ^ set(expected))[:5]}"
    for key in expected:
        assert torch.equal(back[key], expected[key]), f"diffusers reads {key} differently from the CompVis layout"

    compvis["cond_stage_model.transformer.embeddings.weight"] = torch.zeros(3)   # a whole SD file: not VAE keys
    config = AutoencoderConfig(
        block_out_channels=options["block_out_channels"],
        layers_per_block=options["layers_per_block"],
        norm_num_groups=options["norm_num_groups"],
    )
    ours = vae_from_compvis(compvis, config).eval()
    assert_same_function(ours, reference, name, f"{name} (CompVis)")


# --- refusals ------------------------------------------------------------------------------------------------------


def small():
    reference = diffusers_vae("no_mid_attention")
    return dict(reference.config), dict(reference.state_dict())


def test_extra_key_is_refused_naming_it():
    config, state = small()
    state["encoder.extra_layer.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=re.escape("encoder.extra_layer.weight")):
        vae_from_diffusers(config, state)


def test_missing_key_is_refused_naming_it():
    config, state = small()
    del state["encoder.down_blocks.0.resnets.0.conv1.weight"]
    with pytest.raises(ValueError, match=re.escape("encoder.down.0.res.0.conv1.weight")):
        vae_from_diffusers(config, state)


def test_wrong_shape_is_refused_naming_our_key_and_the_files_key():
    config, state = small()
    state["decoder.up_blocks.0.resnets.1.conv2.weight"] = torch.zeros(32, 32, 1, 1)
    with pytest.raises(ValueError) as err:
        vae_from_diffusers(config, state)
    message = str(err.value)
    assert "decoder.up.0.res.1.conv2.weight" in message and "(32, 32, 1, 1)" in message, message
    assert "decoder.up_blocks.0.resnets.1.conv2.weight" in message, message


def test_compvis_missing_key_is_refused_naming_it():
    reference = diffusers_vae("three_levels_one_resblock")
    compvis = to_compvis(reference.state_dict(), 3)
    del compvis["first_stage_model.decoder.up.2.upsample.conv.weight"]      # CompVis up.2 is our decoder.up.0
    config = AutoencoderConfig(block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8)
    with pytest.raises(ValueError, match=re.escape("decoder.up.0.resample.conv.weight")):
        vae_from_compvis(compvis, config)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"act_fn": "gelu"}, "act_fn"),
        ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, "AttnDownEncoderBlock2D"),
        ({"up_block_types": ["UpDecoderBlock2D"]}, "up_block_types"),
        ({"shift_factor": 0.1159}, "shift_factor"),
        ({"some_new_option": 1}, "some_new_option"),
    ],
)
def test_config_options_we_do_not_model_are_refused(change, words):
    config, state = small()
    config.update(change)
    with pytest.raises(ValueError, match=re.escape(words)):
        vae_from_diffusers(config, state)
