"""VAE files as users have them: swap the weights of one into a VAE that already runs (chapter 08, chapter 09).

The fine-tuned SD VAEs people download ("vae-ft-mse-840000-ema-pruned.safetensors", a `.ckpt`, a diffusers `vae/`
folder) hold weights only, no config: a VAE file for SD has SD's VAE architecture, so the config is the pipeline
VAE's own. What the file's keys tell us is its layout, found by the words its keys use:

- CompVis (the original SD code): `decoder.up.0.block.1.conv1.weight`, `decoder.mid.block_1...`, maybe under
  `first_stage_model.` (the VAE part of a whole SD checkpoint);
- diffusers: `decoder.up_blocks.0.resnets.1.conv1.weight`, `decoder.mid_block...`;
- ours (a minildm `model.safetensors`): `decoder.up.0.res.1.conv1.weight`, `decoder.mid.res1...`;

and what it holds: a full VAE (`encoder.*`, `quant_conv`, `decoder.*`, `post_quant_conv`), whose encoder then
replaces ours too, or a decoder only (`decoder.*` + `post_quant_conv`), which replaces the decoder alone. The
weights go through convert.py's rules into a fresh copy of the VAE, checked strictly; only when every tensor fits
are the modules swapped in, so a file that fails leaves the VAE as it was.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

from torch import Tensor, nn

from minildm.autoencoder import DECODER_FILE_KIND, AutoencoderKL, swap_decoder
from minildm.checkpoint import load_state_dict, read_safetensors_metadata
from minildm.convert import (
    COMPVIS_VAE_PREFIX,
    DIFFUSERS_VAE_RULES,
    Rule,
    compvis_vae_rules,
    linear_from_1x1_conv,
    load_renamed,
    rename_keys,
)

VAE_PARTS = ("encoder.", "quant_conv.", "decoder.", "post_quant_conv.")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors")
EXPECTED = ("give a VAE file in CompVis layout (e.g. vae-ft-mse-840000-ema-pruned.safetensors or .ckpt, full or "
            "decoder-only), a diffusers vae/ folder or its diffusion_pytorch_model.safetensors, or a decoder file "
            "written by save_decoder_file")


def weights_file(path: Path) -> Path:
    """A file is itself; a diffusers `vae/` folder (or a pipeline folder holding one) -> its weights file."""
    if not path.is_dir():
        return path
    folder = path / "vae" if (path / "vae").is_dir() else path
    for name in DIFFUSERS_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: a folder with no VAE weights (looked for {', '.join(DIFFUSERS_WEIGHTS)}); "
                            + EXPECTED)


def layout_of(keys: list[str], path: Path) -> str:
    """Which converter's words the keys use: 'diffusers', 'compvis' or 'minildm'."""
    text = "\n".join(keys)
    if re.search(r"\b(down|up)_blocks\.|\bmid_block\.", text):
        return "diffusers"
    if re.search(r"\.(block|block_1|attn_1|nin_shortcut)\.", text):
        return "compvis"
    if re.search(r"\.(res|res1)\.", text):
        return "minildm"
    raise ValueError(f"{path}: VAE keys in no layout we know (first: {keys[0]}); " + EXPECTED)


def vae_weights(state_dict: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """The VAE's own keys: `first_stage_model.` dropped (a whole SD checkpoint keeps its VAE there), nothing else."""
    if any(k.startswith(COMPVIS_VAE_PREFIX) for k in state_dict):
        state_dict = {k[len(COMPVIS_VAE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(COMPVIS_VAE_PREFIX)}
    if not any(k.startswith("decoder.") for k in state_dict):
        first = next(iter(state_dict), "none: the file is empty")
        raise ValueError(f"{path}: not a VAE file: no key starts with 'decoder.' or 'first_stage_model.decoder.' "
                         f"(first key: {first}); " + EXPECTED)
    foreign = [k for k in state_dict if not k.startswith(VAE_PARTS)]
    if foreign:
        raise ValueError(f"{path}: not a VAE file: {len(foreign)} keys outside encoder/decoder/quant_conv/"
                         f"post_quant_conv (first: {foreign[0]}); " + EXPECTED)
    return state_dict


def read_vae_file(vae: AutoencoderKL, path: str | os.PathLike) -> tuple[AutoencoderKL, bool]:
    """The weights in `path`, loaded strictly into a new VAE of `vae`'s config. Returns (donor, has_encoder)."""
    path = weights_file(Path(path))
    state_dict = vae_weights(load_state_dict(path, "VAE file"), path)
    layout = layout_of(list(state_dict), path)
    rules: list[Rule] = {"diffusers": DIFFUSERS_VAE_RULES, "minildm": [],
                         "compvis": compvis_vae_rules(len(vae.config.block_out_channels))}[layout]
    renamed, origin = rename_keys(state_dict, rules)
    donor = AutoencoderKL(copy.deepcopy(vae.config))
    has_encoder = any(k.startswith("encoder.") for k in state_dict)
    # a decoder-only file fills the decoder and post_quant_conv; a full file fills all four parts
    decoder_only = nn.ModuleDict({"decoder": donor.decoder, "post_quant_conv": donor.post_quant_conv})
    target = donor if has_encoder else decoder_only
    c = vae.config
    fits = (f"block_out_channels={c.block_out_channels}, layers_per_block={c.layers_per_block}, "
            f"latent_channels={c.latent_channels}")
    try:
        load_renamed(target, linear_from_1x1_conv(renamed), origin, f"{path} ({layout} layout)")
    except ValueError as err:
        reason = str(err).replace("; check that config.json matches the weights and that they were saved from this "
                                  "kind of model", "")
        raise ValueError(f"{reason}; a VAE file must have the pipeline VAE's architecture ({fits}): give one made "
                         f"for this model (for SD 1.x/2.x: an SD VAE such as vae-ft-mse-840000)") from None
    return donor, has_encoder


def swap_vae_file(vae: AutoencoderKL, path: str | os.PathLike) -> AutoencoderKL:
    """Replace `vae`'s weights with a VAE file's: the decoder (+ post_quant_conv) always, the encoder (+ quant_conv)
    when the file has one. Our own decoder files (save_decoder_file) go through `swap_decoder` as before."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such VAE file; " + EXPECTED)
    if path.is_file() and path.suffix == ".safetensors":
        if read_safetensors_metadata(path, "VAE file").get("kind") == DECODER_FILE_KIND:
            return swap_decoder(vae, path)
    donor, has_encoder = read_vae_file(vae, path)
    device = next(vae.parameters()).device
    parts = ("encoder", "quant_conv", "decoder", "post_quant_conv") if has_encoder else ("decoder", "post_quant_conv")
    for name in parts:
        setattr(vae, name, getattr(donor, name).to(device))
    return vae


__all__ = ["read_vae_file", "swap_vae_file"]
