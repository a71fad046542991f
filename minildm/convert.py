"""Other people's VAE weights -> our `AutoencoderKL`, by a handful of renaming rules (never a 1,000-line key table).

Two layouts hold the same Stable Diffusion VAE:

- diffusers (`vae/config.json` + `diffusion_pytorch_model.safetensors`): `encoder.down_blocks.1.resnets.0.conv1.weight`
- CompVis, the original SD single file (`v1-5.ckpt`): `first_stage_model.encoder.down.1.block.0.conv1.weight`

Both name the same tensors ours does, in a different order of words. So a converter is a short, ordered list of
regular-expression rules applied to every key, a check that the result fits our model exactly (`load_strict`: a
key no rule explains, or one the model wants and no file key supplies, is an error that names it), and one tensor
reshape: CompVis wrote the attention projections as 1x1 convolutions, which are Linear layers in disguise.
Plain dicts in, our module out: nothing here imports diffusers.
"""

from __future__ import annotations

import re
from typing import Callable

from torch import Tensor

from minildm.autoencoder import AutoencoderConfig, AutoencoderKL
from minildm.checkpoint import load_strict
from minildm.unet import UNet, UNetConfig

# A rule is (pattern, replacement) for re.sub; the replacement may be a function of the match (see CompVis' decoder).
Rule = tuple[str, "str | Callable[[re.Match], str]"]

# diffusers -> ours. Applied in order, each rule once, to every key. Keys no rule touches (conv_in, conv_out,
# norm1, conv2, quant_conv, ...) are already spelled the same in both layouts.
# The levels, the middle and the ResBlocks are named alike in the VAE and the U-Net:
DIFFUSERS_LEVEL_RULES: list[Rule] = [
    (r"\b(down|up)_blocks\.(\d+)\.resnets\.", r"\1.\2.res."),              # down_blocks.i.resnets.j -> down.i.res.j
    (r"\b(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.", r"\1.\2.resample."),
    (r"\bmid_block\.resnets\.0\.", "mid.res1."),
    (r"\bmid_block\.resnets\.1\.", "mid.res2."),
    (r"\bmid_block\.attentions\.0\.", "mid.attn."),
    (r"\bconv_norm_out\.", "norm_out."),
    (r"\.conv_shortcut\.", ".skip."),
]
DIFFUSERS_VAE_RULES: list[Rule] = [
    *DIFFUSERS_LEVEL_RULES,
    (r"\.attn\.group_norm\.", ".attn.norm."),
    (r"\.attn\.(to_out\.0|proj_attn)\.", ".attn.to_out."),                 # proj_attn: diffusers < 0.14 naming
    (r"\.attn\.query\.", ".attn.to_q."),                                   # query/key/value: diffusers < 0.14
    (r"\.attn\.key\.", ".attn.to_k."),
    (r"\.attn\.value\.", ".attn.to_v."),
]

# diffusers config.json keys that do not change the function the VAE computes.
IGNORED_DIFFUSERS_KEYS = {"sample_size", "force_upcast"}
# The plain blocks we implement; any other block type has a different computation.
PLAIN_BLOCKS = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}


def rename_keys(state_dict: dict[str, Tensor], rules: list[Rule]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Apply `rules` in order to every key. Returns the renamed dict and {new key: original key} for messages."""
    renamed: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for key, tensor in state_dict.items():
        new = key
        for pattern, replacement in rules:
            new = re.sub(pattern, replacement, new)
        if new in renamed:
            raise ValueError(f"keys {origin[new]!r} and {key!r} both become {new!r}; the file holds one tensor twice")
        renamed[new], origin[new] = tensor, key
    return renamed, origin


def linear_from_1x1_conv(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A 1x1 conv weight (C_out, C_in, 1, 1) is a Linear weight (C_out, C_in): drop the 1s of attention weights."""
    out = {}
    for key, tensor in state_dict.items():
        is_attention_weight = re.search(r"\.attn\.to_(q|k|v|out)\.weight$", key) is not None
        if is_attention_weight and tensor.ndim > 2 and all(s == 1 for s in tensor.shape[2:]):
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])     # (C, C, 1, 1) -> (C, C)
        out[key] = tensor
    return out


def load_renamed(model, state_dict: dict[str, Tensor], origin: dict[str, str], source: str):
    """`load_strict`, with the original names added to the message so a user can find the key in their file."""
    try:
        return load_strict(model, state_dict, source)
    except ValueError as err:
        message = str(err)
        notes = [f"{new} <- {old}" for new, old in origin.items() if new != old and new in message]
        if notes:
            message += " (renamed from the file's keys: " + ", ".join(notes) + ")"
        raise ValueError(message) from None


def config_from_diffusers(config: dict) -> AutoencoderConfig:
    """Read a diffusers AutoencoderKL config.json dict, refusing options that would change the math we implement.

    A missing key takes diffusers' own default, so the model we build is the one diffusers would build.
    """
    config = {k: v for k, v in config.items() if not k.startswith("_")}   # _class_name, _diffusers_version, ...
    if config.get("act_fn", "silu") != "silu":
        raise ValueError(f"act_fn {config['act_fn']!r} is not supported: our VAE uses SiLU (as every SD VAE does)")
    for key in ("shift_factor", "latents_mean", "latents_std"):
        if config.get(key) is not None:
            raise ValueError(
                f"{key}={config[key]!r}: we model only z_0 = scaling_factor * latent, not a shift or per-channel "
                "statistics (SD3/Flux/SDXL-style VAEs); this VAE would give wrongly scaled latents"
            )
    levels = len(config.get("block_out_channels", (64,)))
    for key, plain in PLAIN_BLOCKS.items():
        types = list(config.get(key, [plain]))
        if any(t != plain for t in types) or len(types) != levels:
            raise ValueError(
                f"{key} {types} is not supported: expected {levels} x {plain!r} (one per block_out_channels entry)"
            )
    known = {
        "in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block", "norm_num_groups",
        "mid_block_add_attention", "use_quant_conv", "use_post_quant_conv", "scaling_factor", "act_fn",
        "shift_factor", "latents_mean", "latents_std", *PLAIN_BLOCKS, *IGNORED_DIFFUSERS_KEYS,
    }
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(
            f"unknown diffusers AutoencoderKL config keys {unknown}: they may change what the model computes, which we "
            "do not implement; drop them from the dict only if you know they are at a no-op value"
        )
    return AutoencoderConfig(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        latent_channels=config.get("latent_channels", 4),
        block_out_channels=tuple(config.get("block_out_channels", (64,))),
        layers_per_block=config.get("layers_per_block", 1),
        norm_num_groups=config.get("norm_num_groups", 32),
        mid_block_attention=config.get("mid_block_add_attention", True),
        use_quant_conv=config.get("use_quant_conv", True),
        use_post_quant_conv=config.get("use_post_quant_conv", True),
        scale_factor=config.get("scaling_factor", 0.18215),
    )


def vae_from_diffusers(config: dict, state_dict: dict[str, Tensor]) -> AutoencoderKL:
    """Build our VAE from a diffusers `AutoencoderKL` config dict and state dict (e.g. SD v1.5's `vae/` folder).

    The keys go through `DIFFUSERS_VAE_RULES`, e.g. `encoder.down_blocks.1.resnets.0.conv_shortcut.weight` ->
    `encoder.down.1.res.0.skip.weight`, `decoder.mid_block.attentions.0.to_out.0.bias` ->
    `decoder.mid.attn.to_out.bias`.
    """
    model = AutoencoderKL(config_from_diffusers(config))
    renamed, origin = rename_keys(state_dict, DIFFUSERS_VAE_RULES)
    return load_renamed(model, linear_from_1x1_conv(renamed), origin, "diffusers AutoencoderKL state dict")


def compvis_vae_rules(num_levels: int) -> list[Rule]:
    """CompVis -> ours. The decoder's levels are numbered the other way round in CompVis: up.{n-1} runs first."""
    return [
        # CompVis decoder.up.i is our decoder.up.(n-1-i): ours counts in the order the levels run
        (r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}."),
        (r"^(encoder\.down|decoder\.up)\.(\d+)\.block\.", r"\1.\2.res."),   # down.i.block.j -> down.i.res.j
        (r"\.(down|up)sample\.", ".resample."),
        (r"\.mid\.block_1\.", ".mid.res1."),
        (r"\.mid\.block_2\.", ".mid.res2."),
        (r"\.mid\.attn_1\.", ".mid.attn."),
        (r"\.attn\.(q|k|v)\.", r".attn.to_\1."),
        (r"\.attn\.proj_out\.", ".attn.to_out."),
        (r"\.nin_shortcut\.", ".skip."),
    ]


COMPVIS_VAE_PREFIX = "first_stage_model."


def vae_from_compvis(state_dict: dict[str, Tensor], config: AutoencoderConfig | None = None) -> AutoencoderKL:
    """Build our VAE from the original CompVis / SD single-file layout (`config` defaults to SD v1's VAE).

    Pass either the VAE's own keys or a whole SD checkpoint: if any key starts with "first_stage_model.", only those
    keys are the VAE (the rest are the UNet and the text encoder) and the prefix is dropped. The attention's q, k, v,
    proj_out are 1x1 convs there and become our Linear layers.
    """
    config = config or AutoencoderConfig.sd_v1()
    if any(k.startswith(COMPVIS_VAE_PREFIX) for k in state_dict):
        state_dict = {k[len(COMPVIS_VAE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(COMPVIS_VAE_PREFIX)}
    renamed, origin = rename_keys(state_dict, compvis_vae_rules(len(config.block_out_channels)))
    model = AutoencoderKL(config)
    return load_renamed(model, linear_from_1x1_conv(renamed), origin, "CompVis VAE state dict")


# ------------------------------------------------------------------------------------------------ the U-Net

# diffusers UNet2DConditionModel -> ours: the VAE's level and mid-block rules, and the transformer's few renames.
DIFFUSERS_UNET_RULES: list[Rule] = [
    *DIFFUSERS_LEVEL_RULES,
    (r"^time_embedding\.linear_1\.", "time_mlp.0."),
    (r"^time_embedding\.linear_2\.", "time_mlp.2."),
    (r"\.time_emb_proj\.", ".time_proj."),
    (r"\b(down|up)_blocks\.(\d+)\.attentions\.", r"\1.\2.attn."),
    (r"\.transformer_blocks\.", ".blocks."),
    (r"\.to_out\.0\.", ".to_out."),
    (r"\.ff\.net\.0\.proj\.", ".ff.proj."),                             # GEGLU's one matrix for value and gate
    (r"\.ff\.net\.2\.", ".ff.out."),
]

# Block types with the computation we implement, and config keys that must keep diffusers' default value.
UNET_BLOCKS = {"down": ("CrossAttnDownBlock2D", "DownBlock2D"), "up": ("CrossAttnUpBlock2D", "UpBlock2D"),
               "mid": "UNetMidBlock2DCrossAttn"}
UNET_DEFAULTS = {"center_input_sample": False, "act_fn": "silu", "downsample_padding": 1, "mid_block_scale_factor": 1,
                 "time_embedding_type": "positional", "resnet_time_scale_shift": "default",
                 "only_cross_attention": False, "dual_cross_attention": False, "class_embed_type": None,
                 "addition_embed_type": None,
                 "encoder_hid_dim": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
                 "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "num_class_embeds": None,
                 "timestep_post_act": None, "projection_class_embeddings_input_dim": None, "attention_type": "default",
                 "time_embedding_dim": None, "time_embedding_act_fn": None, "class_embeddings_concat": False,
                 "cross_attention_norm": None, "mid_block_only_cross_attention": None, "addition_time_embed_dim": None,
                 "encoder_hid_dim_type": None, "reverse_transformer_layers_per_block": None}
# no effect on the function: our softmax is float32 anyway, and there is no addition embedding to give heads to
UNET_IGNORED = {"sample_size", "upcast_attention", "addition_embed_type_num_heads"}


def unet_config_from_diffusers(config: dict) -> UNetConfig:
    """Read a diffusers UNet2DConditionModel config dict; an option that changes the math we implement is refused."""
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    for key, default in UNET_DEFAULTS.items():
        if key in config and config[key] != default:
            raise ValueError(f"{key}={config[key]!r} is not supported (we implement {default!r}, as SD 1 and 2 use)")
    down = list(config.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    up = list(config.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
    if any(t not in UNET_BLOCKS["down"] for t in down) or any(t not in UNET_BLOCKS["up"] for t in up):
        raise ValueError(f"block types {down} / {up} are not supported: "
                         f"use {UNET_BLOCKS['down']} / {UNET_BLOCKS['up']}")
    if len(up) != len(down):
        raise ValueError(f"up_block_types {up} and down_block_types {down} must have one entry per level each")
    attention = tuple(t.startswith("CrossAttn") for t in down)
    up_attention = tuple(t.startswith("CrossAttn") for t in reversed(up))     # diffusers lists the way up deepest first
    if config.get("mid_block_type", UNET_BLOCKS["mid"]) != UNET_BLOCKS["mid"]:
        raise ValueError(f"mid_block_type {config['mid_block_type']!r} is not supported: use {UNET_BLOCKS['mid']!r}")
    unknown = sorted(set(config) - set(UNET_DEFAULTS) - UNET_IGNORED - {
        "in_channels", "out_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "up_block_types",
        "mid_block_type", "block_out_channels", "layers_per_block", "norm_num_groups", "norm_eps",
        "cross_attention_dim", "attention_head_dim", "num_attention_heads", "use_linear_projection",
        "transformer_layers_per_block", "dropout"})
    if unknown:
        raise ValueError(f"unknown diffusers UNet2DConditionModel config keys {unknown}: they may change what the "
                         "model computes; drop them only if you know they are at a no-op value")
    def one_for_all_levels(key: str, default):
        value = config.get(key, default)
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                raise ValueError(f"{key}={value!r}: we use one value for every level; give a single number")
            value = value[0]
        return value

    depth = one_for_all_levels("transformer_layers_per_block", 1)
    # diffusers' "attention_head_dim" has meant the number of heads since SD 1 (a historical misnomer)
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    return UNetConfig(
        in_channels=config.get("in_channels", 4), out_channels=config.get("out_channels", 4),
        block_out_channels=tuple(config.get("block_out_channels", (320, 640, 1280, 1280))),
        layers_per_block=one_for_all_levels("layers_per_block", 2), attention_levels=attention,
        up_attention_levels=up_attention, mid_attention=True,
        heads=tuple(heads) if isinstance(heads, (list, tuple)) else heads, transformer_depth=depth,
        context_dim=one_for_all_levels("cross_attention_dim", 1280), norm_num_groups=config.get("norm_num_groups", 32),
        norm_eps=config.get("norm_eps", 1e-5), use_linear_projection=config.get("use_linear_projection", False),
        dropout=config.get("dropout", 0.0), flip_sin_to_cos=config.get("flip_sin_to_cos", True),
        freq_shift=config.get("freq_shift", 0))


def unet_from_diffusers(config: dict, state_dict: dict[str, Tensor]) -> UNet:
    """Build our U-Net from a diffusers `UNet2DConditionModel` config dict and state dict (SD v1.5's `unet/`).

    e.g. `down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.weight` ->
    `down.1.attn.0.blocks.0.ff.proj.weight`.
    """
    model = UNet(unet_config_from_diffusers(config))
    renamed, origin = rename_keys(state_dict, DIFFUSERS_UNET_RULES)
    return load_renamed(model, renamed, origin, "diffusers UNet2DConditionModel state dict")


# ------------------------------------------------------------------------------------------------ CompVis U-Net

# The transformer blocks inside a CompVis SpatialTransformer are spelled as diffusers' (attn1.to_q, ff.net.2, ...).
TRANSFORMER_RULES: list[Rule] = [
    (r"\.transformer_blocks\.", ".blocks."),
    (r"\.to_out\.0\.", ".to_out."),
    (r"\.ff\.net\.0\.proj\.", ".ff.proj."),
    (r"\.ff\.net\.2\.", ".ff.out."),
]
# The ResBlock's inner layers are numbered Sequentials in CompVis: in_layers = (norm, SiLU, conv), emb_layers =
# (SiLU, Linear), out_layers = (norm, SiLU, dropout, conv). Only the numbers of layers with weights appear.
COMPVIS_RESBLOCK_RULES: list[Rule] = [
    (r"\.in_layers\.0\.", ".norm1."),
    (r"\.in_layers\.2\.", ".conv1."),
    (r"\.emb_layers\.1\.", ".time_proj."),
    (r"\.out_layers\.0\.", ".norm2."),
    (r"\.out_layers\.3\.", ".conv2."),
    (r"\.skip_connection\.", ".skip."),
]


def compvis_unet_rules(config: UNetConfig) -> list[Rule]:
    """CompVis -> ours. CompVis numbers the U-Net's blocks in one flat list per path, in the order they run:

    input_blocks.0 is conv_in; then each level has layers_per_block blocks (a ResBlock at .0, its transformer at .1
    if the level attends) and, except the last level, one more block holding only the downsample (.0.op). So with
    L = layers_per_block, input block k >= 1 is level (k-1) // (L+1), layer (k-1) % (L+1); SD 1 (L = 2):
    input_blocks.4 -> level 1, layer 0; input_blocks.6 -> level 1's downsample. The way up has L+1 layers per level
    and no separate downsample block: output block k is level k // (L+1), layer k % (L+1), and the level's last
    block ends with the upsample (.1.conv, or .2.conv after a transformer).
    """
    per_level = config.layers_per_block + 1

    def down(m: re.Match, what: str) -> str:
        level, layer = divmod(int(m[1]) - 1, per_level)
        return f"down.{level}.{what.format(layer=layer)}."

    def up(m: re.Match, what: str) -> str:
        level, layer = divmod(int(m[1]), per_level)
        return f"up.{level}.{what.format(layer=layer)}."

    return [
        (r"^time_embed\.(0|2)\.", r"time_mlp.\1."),                                # Linear, SiLU, Linear
        (r"^input_blocks\.0\.0\.", "conv_in."),
        (r"^input_blocks\.(\d+)\.0\.op\.", lambda m: down(m, "resample.conv")),
        (r"^input_blocks\.(\d+)\.0\.", lambda m: down(m, "res.{layer}")),
        (r"^input_blocks\.(\d+)\.1\.", lambda m: down(m, "attn.{layer}")),
        (r"^middle_block\.0\.", "mid.res1."),
        # ResBlock, transformer, ResBlock; a U-Net without the middle transformer would have its res2 at .1
        (r"^middle_block\.1\.", "mid.attn." if config.mid_attention else "mid.res2."),
        (r"^middle_block\.2\.", "mid.res2."),
        (r"^output_blocks\.(\d+)\.0\.", lambda m: up(m, "res.{layer}")),
        (r"^output_blocks\.(\d+)\.[12]\.conv\.", lambda m: up(m, "resample.conv")),  # a transformer has no .conv
        (r"^output_blocks\.(\d+)\.1\.", lambda m: up(m, "attn.{layer}")),
        (r"^out\.0\.", "norm_out."),                                                 # GroupNorm, SiLU, conv
        (r"^out\.2\.", "conv_out."),
        *COMPVIS_RESBLOCK_RULES,
        *TRANSFORMER_RULES,
    ]


COMPVIS_UNET_PREFIX = "model.diffusion_model."
COMPVIS_EMA_PREFIX = "model_ema."
# Keys of a whole SD single file that are not the U-Net: the VAE, the text encoder, the EMA copy when not chosen,
# and the training-time DDPM schedule buffers (our samplers compute the schedule from the config).
COMPVIS_OTHER_PARTS = ("first_stage_model.", "cond_stage_model.", COMPVIS_EMA_PREFIX)
COMPVIS_DDPM_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights",
}


def compvis_ema_key(key: str) -> str:
    """CompVis' EMA copy flattens a name by dropping its dots (LitEma): model.diffusion_model.out.0.weight ->
    model_ema.diffusion_modelout0weight."""
    return COMPVIS_EMA_PREFIX + key.removeprefix("model.").replace(".", "")


def compvis_unet_weights(state_dict: dict[str, Tensor], ema: bool = False) -> dict[str, Tensor]:
    """The U-Net's own keys (without `model.diffusion_model.`) out of a whole SD file, or of a bare U-Net dict.

    With `ema=True` each U-Net tensor is taken from the file's EMA copy instead (the weights SD samples with).
    """
    if not any(k.startswith(COMPVIS_UNET_PREFIX) for k in state_dict):
        if ema:
            raise ValueError("ema=True needs a whole SD file with model.diffusion_model. and model_ema. keys; this "
                             "state dict holds no model.diffusion_model. key: load it with ema=False")
        return dict(state_dict)                                         # a bare U-Net: every key must be explained
    unet = {}
    for key, tensor in state_dict.items():
        if key.startswith(COMPVIS_UNET_PREFIX):
            if ema:
                ema_key = compvis_ema_key(key)
                if ema_key not in state_dict:
                    raise ValueError(f"ema=True but the file has no EMA copy {ema_key!r} of {key!r}; load it with "
                                     "ema=False (its EMA weights may have been pruned or already merged)")
                tensor = state_dict[ema_key]
            unet[key[len(COMPVIS_UNET_PREFIX):]] = tensor
        elif not (key.startswith(COMPVIS_OTHER_PARTS) or key in COMPVIS_DDPM_BUFFERS):
            raise ValueError(f"key {key!r} is neither the U-Net ({COMPVIS_UNET_PREFIX}...) nor a part we know to skip "
                             f"({', '.join(COMPVIS_OTHER_PARTS)}, the DDPM buffers); is this an SD 1/2 checkpoint?")
    return unet


def unet_config_from_compvis(state_dict: dict[str, Tensor], heads: int | tuple[int, ...] | None = None,
                             norm_num_groups: int = 32) -> UNetConfig:
    """Read a CompVis U-Net's config off its tensors' shapes (a whole SD file or the U-Net's keys alone).

    Channels come from each level's first ResBlock, the levels from the downsamples (.op), layers_per_block from
    the number of input blocks (1 + levels * layers + levels - 1), attention from which blocks have a proj_in,
    linear projections from proj_in's rank, the context width from attn2.to_k. Two things have no tensor: the
    GroupNorm groups (SD: 32), and the heads, which only split the channels. `heads=None` takes SD's: 8 for SD 1's
    768-wide CLIP context, heads of 64 channels for SD 2's 1024-wide OpenCLIP context; give them for any other.
    """
    unet = compvis_unet_weights(state_dict)
    try:
        conv_in = unet["input_blocks.0.0.weight"]
        out_channels = unet["out.2.weight"].shape[0]
    except KeyError as err:
        raise ValueError(f"no {err.args[0]!r} key: this is not a CompVis U-Net state dict (input_blocks, "
                         "middle_block, output_blocks)") from None
    levels = 1 + sum(re.fullmatch(r"input_blocks\.\d+\.0\.op\.weight", k) is not None for k in unet)
    blocks = 1 + max(int(m[1]) for k in unet if (m := re.match(r"input_blocks\.(\d+)\.", k)))
    layers_per_block = (blocks - levels) // levels
    first_blocks = [1 + level * (layers_per_block + 1) for level in range(levels)]
    channels = tuple(unet[f"input_blocks.{k}.0.out_layers.3.weight"].shape[0] for k in first_blocks)
    attention_levels = tuple(f"input_blocks.{k}.1.proj_in.weight" in unet for k in first_blocks)
    # the way up runs deepest level first, L + 1 blocks each: level i's first output block is (levels - 1 - i)(L + 1)
    up_attention_levels = tuple(f"output_blocks.{(levels - 1 - level) * (layers_per_block + 1)}.1.proj_in.weight"
                                in unet for level in range(levels))
    proj_in = [v for k, v in unet.items() if k.endswith(".proj_in.weight")]
    to_k = [v for k, v in unet.items() if k.endswith(".attn2.to_k.weight")]
    if not proj_in or not to_k:
        raise ValueError("the U-Net has no SpatialTransformer (no proj_in / attn2.to_k keys): build its UNetConfig "
                         "yourself and call unet_from_compvis")
    first_attention = next(k for k in unet if k.endswith(".proj_in.weight")).removesuffix("proj_in.weight")
    depth = len({k for k in unet if k.startswith(first_attention + "transformer_blocks.")
                 and k.endswith(".attn2.to_k.weight")})
    context_dim = to_k[0].shape[1]
    if heads is None:
        if context_dim not in (768, 1024):
            raise ValueError(f"the context is {context_dim} wide, neither SD 1's 768 nor SD 2's 1024: the number of "
                             "heads cannot be read off the tensors; pass heads=")
        heads = 8 if context_dim == 768 else tuple(c // 64 for c in channels)
    return UNetConfig(in_channels=conv_in.shape[1], out_channels=out_channels, block_out_channels=channels,
                      layers_per_block=layers_per_block, attention_levels=attention_levels,
                      up_attention_levels=up_attention_levels,
                      mid_attention="middle_block.1.proj_in.weight" in unet, heads=heads, transformer_depth=depth,
                      context_dim=context_dim, norm_num_groups=norm_num_groups,
                      use_linear_projection=proj_in[0].ndim == 2)


def unet_from_compvis(config: UNetConfig, state_dict: dict[str, Tensor], ema: bool = False) -> UNet:
    """Build our U-Net from the original CompVis / SD single-file layout (`v1-5-pruned.ckpt`, `v2-1_768.safetensors`).

    `state_dict` is a whole SD file (the U-Net's keys start with "model.diffusion_model."; the VAE, text encoder,
    DDPM buffers and unchosen EMA copy are skipped) or the U-Net's keys alone. The config says what the file
    cannot: SD 1 is `UNetConfig()`, SD 2 has heads of 64 channels, linear projections and 1024-wide context.
    e.g. `input_blocks.4.1.transformer_blocks.0.ff.net.2.weight` -> `down.1.attn.0.blocks.0.ff.out.weight`.
    """
    renamed, origin = rename_keys(compvis_unet_weights(state_dict, ema), compvis_unet_rules(config))
    source = "CompVis U-Net state dict" + (" (EMA weights)" if ema else "")
    return load_renamed(UNet(config), renamed, origin, source)


__all__ = ["DIFFUSERS_LEVEL_RULES", "DIFFUSERS_UNET_RULES", "DIFFUSERS_VAE_RULES", "compvis_vae_rules",
           "config_from_diffusers", "unet_config_from_diffusers", "unet_from_diffusers", "vae_from_compvis",
           "vae_from_diffusers",
           "COMPVIS_RESBLOCK_RULES", "TRANSFORMER_RULES", "compvis_unet_rules", "compvis_unet_weights",
           "unet_config_from_compvis", "unet_from_compvis"]
