"""VAE files as users have them (issue 14 item 5): `LatentDiffusion.swap_vae` takes SD's CompVis files (full or
decoder-only, with or without `first_stage_model.`, .safetensors or .ckpt), diffusers' layout and our decoder files.

The files are written here from a small VAE of ours by test-local inverses of convert.py's renamings (written from
the published key names, not from minildm's rules; tests/oracle/test_vae_files_oracle.py checks them against
diffusers). Each swap must decode exactly as the source VAE does; each bad file is one line and changes nothing.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from minildm.autoencoder import AutoencoderConfig, AutoencoderKL, save_decoder_file
from tests.test_pipeline import tiny_pipe
from tests.weights import randomise_norms

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_LEVELS = 2                       # tiny_pipe's VAE: block_out_channels=(8, 16)


def source_vae(seed: int = 7, **changes) -> AutoencoderKL:
    """A VAE of the pipeline's architecture with other weights (norms randomised too, so none hides at 1 / 0)."""
    torch.manual_seed(seed)
    options = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, scale_factor=0.5)
    return randomise_norms(AutoencoderKL(AutoencoderConfig(**{**options, **changes})).eval())


def to_compvis(state_dict: dict, prefix: str = "") -> dict:
    """Our keys -> CompVis keys (the SD .ckpt names): decoder levels counted from the lowest resolution up,
    `block`/`block_1`/`attn_1`/`nin_shortcut`, attention projections as 1x1 convs."""
    out = {}
    for key, tensor in state_dict.items():
        key = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up.{NUM_LEVELS - 1 - int(m[1])}.", key)
        key = re.sub(r"\.(down|up)\.(\d+)\.res\.", r".\1.\2.block.", key)
        key = re.sub(r"^encoder\.(down\.\d+)\.resample\.", r"encoder.\1.downsample.", key)
        key = re.sub(r"^decoder\.(up\.\d+)\.resample\.", r"decoder.\1.upsample.", key)
        key = key.replace(".mid.res1.", ".mid.block_1.").replace(".mid.res2.", ".mid.block_2.")
        key = re.sub(r"\.attn\.to_(q|k|v)\.", r".attn.\1.", key).replace(".attn.to_out.", ".attn.proj_out.")
        key = key.replace(".mid.attn.", ".mid.attn_1.").replace(".skip.", ".nin_shortcut.")
        if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", key):
            tensor = tensor[:, :, None, None]                              # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
        out[prefix + key] = tensor.clone()
    return out


def to_diffusers(state_dict: dict) -> dict:
    """Our keys -> diffusers AutoencoderKL keys (diffusion_pytorch_model.safetensors)."""
    out = {}
    for key, tensor in state_dict.items():
        key = re.sub(r"\.(down|up)\.(\d+)\.res\.", r".\1_blocks.\2.resnets.", key)
        key = re.sub(r"\.(down|up)\.(\d+)\.resample\.", r".\1_blocks.\2.\1samplers.0.", key)
        key = key.replace(".mid.res1.", ".mid_block.resnets.0.").replace(".mid.res2.", ".mid_block.resnets.1.")
        key = key.replace(".mid.attn.norm.", ".mid_block.attentions.0.group_norm.")
        key = key.replace(".mid.attn.to_out.", ".mid_block.attentions.0.to_out.0.")
        key = key.replace(".mid.attn.", ".mid_block.attentions.0.")
        key = key.replace(".norm_out.", ".conv_norm_out.").replace(".skip.", ".conv_shortcut.")
        out[key] = tensor.clone()
    return out


def decoder_only(state_dict: dict) -> dict:
    return {k: v for k, v in state_dict.items() if re.match(r"^(first_stage_model\.)?(decoder|post_quant_conv)\.", k)}


def latents() -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def images() -> torch.Tensor:
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1


def weights(vae: AutoencoderKL) -> dict:
    return {k: v.clone() for k, v in vae.state_dict().items()}


def assert_weights_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} changed"


def assert_decodes_like(pipe, source: AutoencoderKL) -> None:
    with torch.no_grad():
        assert torch.equal(pipe.vae.decode(latents()), source.decode(latents()))


def assert_encodes_like(pipe, source: AutoencoderKL) -> None:
    with torch.no_grad():
        assert torch.equal(pipe.vae.encode(images()).mean, source.encode(images()).mean)


def write(tmp_path, name: str, state_dict: dict):
    path = tmp_path / name
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save({"state_dict": state_dict}, path)                     # the Lightning .ckpt nesting SD uses
    return path


# ------------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("prefix", ["", "first_stage_model."])
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_full_compvis_vae_file_replaces_encoder_and_decoder_exactly(tmp_path, prefix, suffix):
    source, pipe = source_vae(), tiny_pipe()
    pipe.swap_vae(write(tmp_path, "vae-ft" + suffix, to_compvis(source.state_dict(), prefix)))
    assert_decodes_like(pipe, source)
    assert_encodes_like(pipe, source)
    assert_weights_equal(weights(pipe.vae), weights(source))


@pytest.mark.parametrize("prefix", ["", "first_stage_model."])
def test_decoder_only_compvis_file_replaces_the_decoder_and_keeps_the_encoder(tmp_path, prefix):
    source, pipe = source_vae(), tiny_pipe()
    encoder_before = {k: v for k, v in weights(pipe.vae).items() if k.startswith(("encoder.", "quant_conv."))}
    pipe.swap_vae(write(tmp_path, "decoder.safetensors", decoder_only(to_compvis(source.state_dict(), prefix))))
    assert_decodes_like(pipe, source)
    after = weights(pipe.vae)
    assert_weights_equal({k: after[k] for k in encoder_before}, encoder_before)


def test_whole_sd_checkpoint_gives_its_vae(tmp_path):
    source, pipe = source_vae(), tiny_pipe()
    state = to_compvis(source.state_dict(), "first_stage_model.")
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(3)     # the U-Net's keys are not read
    pipe.swap_vae(write(tmp_path, "sd.safetensors", state))
    assert_decodes_like(pipe, source)


def test_diffusers_state_dict_file_and_vae_folder_swap_exactly(tmp_path):
    source = source_vae()
    state = to_diffusers(source.state_dict())
    pipe = tiny_pipe()
    pipe.swap_vae(write(tmp_path, "diffusion_pytorch_model.safetensors", state))
    assert_decodes_like(pipe, source)
    assert_encodes_like(pipe, source)
    folder = tmp_path / "sd" / "vae"
    folder.mkdir(parents=True)
    write(folder, "diffusion_pytorch_model.safetensors", decoder_only(state))
    for path in (folder, folder.parent):                                  # the vae/ folder, or the pipeline folder
        pipe = tiny_pipe()
        pipe.swap_vae(path)
        assert_decodes_like(pipe, source)


def test_float16_file_fills_a_float32_vae(tmp_path):
    source, pipe = source_vae(), tiny_pipe()
    half = {k: v.half() for k, v in to_compvis(source.state_dict()).items()}
    pipe.swap_vae(write(tmp_path, "vae.fp16.safetensors", half))
    expected = {k: v.half().float() for k, v in source.state_dict().items()}
    assert_weights_equal(weights(pipe.vae), expected)


def test_our_decoder_file_still_swaps_through_swap_vae_and_swap_vae_decoder(tmp_path):
    source = source_vae()
    save_decoder_file(source, tmp_path / "decoder.safetensors")
    for swap in ("swap_vae", "swap_vae_decoder"):
        pipe = tiny_pipe()
        getattr(pipe, swap)(tmp_path / "decoder.safetensors")
        assert_decodes_like(pipe, source)


# ------------------------------------------------------------------------------------------- bad input


def unet_file(tmp_path):
    pipe = tiny_pipe()
    state = {f"model.diffusion_model.{k}": v for k, v in pipe.unet.state_dict().items()}
    return write(tmp_path, "unet.safetensors", state)


def truncated_file(tmp_path):
    path = write(tmp_path, "vae.safetensors", to_compvis(source_vae().state_dict()))
    path.write_bytes(path.read_bytes()[:-100])
    return path


def pickle_file(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this ran",))
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"decoder.conv_in.weight": Payload()}}, path)
    return path


def wider_vae_file(tmp_path):
    return write(tmp_path, "wide.safetensors", to_compvis(source_vae(block_out_channels=(16, 32), norm_num_groups=8)
                                                          .state_dict()))


def missing_key_file(tmp_path):
    state = decoder_only(to_compvis(source_vae().state_dict()))
    del state["decoder.up.1.upsample.conv.weight"]                       # CompVis up.1 is our decoder.up.0
    return write(tmp_path, "holed.safetensors", state)


BAD = {
    "unet_file": (unet_file, r"not a VAE file: no key starts with 'decoder\.'"),
    "truncated": (truncated_file, "not a readable VAE file"),
    "pickle_payload": (pickle_file, "refused to load.*print.*not a tensor"),
    "other_width": (wider_vae_file, r"shape mismatches.*must have the pipeline VAE's architecture.*\(8, 16\)"),
    "missing_key": (missing_key_file, r"1 missing keys \(first: decoder\.up\.0\.resample\.conv\.weight\)"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_vae_file_is_one_clear_line_and_leaves_the_vae_unchanged(tmp_path, capsys, name):
    make, words = BAD[name]
    pipe = tiny_pipe()
    before = weights(pipe.vae)
    path = make(tmp_path)
    with pytest.raises(ValueError, match=words) as info:
        pipe.swap_vae(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "this ran" not in capsys.readouterr().out
    assert_weights_equal(weights(pipe.vae), before)


def test_missing_file_and_empty_folder_say_what_to_give(tmp_path):
    pipe = tiny_pipe()
    with pytest.raises(FileNotFoundError, match="no such VAE file.*CompVis layout"):
        pipe.swap_vae(tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError, match="a folder with no VAE weights.*diffusion_pytorch_model"):
        pipe.swap_vae(tmp_path)


def test_our_own_vae_weights_file_swaps_exactly(tmp_path):
    source, pipe = source_vae(), tiny_pipe()
    pipe.swap_vae(write(tmp_path, "model.safetensors", source.state_dict()))
    assert_decodes_like(pipe, source)
    assert_encodes_like(pipe, source)
