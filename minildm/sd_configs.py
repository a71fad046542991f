"""Chapter 09: Stable Diffusion's real configurations, and what they cost.

Stable Diffusion 1.5, 2.1 and SDXL are the same recipe at different sizes: a VAE, a U-Net, one or two CLIP text
encoders. What differs between them is written in the `config.json` of each part of their diffusers folders
(runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1, stabilityai/stable-diffusion-xl-base-1.0). This
file holds those dicts (the keys that matter; a key left out takes diffusers' or transformers' default), and asks
questions of them without a single weight:

- `build_on_meta`: our modules on the meta device, through the same config readers a real load uses (convert.py,
  convert_text.py): shapes only, no memory, so counting SD 1.5's 1.07 billion parameters takes a second.
- `comparison_table`: SD 1 vs SD 2 vs SDXL, read off the dicts (context width, head size, v-prediction, scale).
- `attention_sites`: every kind of attention one U-Net step runs at an image size, how big its naive score
  matrix is, and which backend chapter 04's `choose_backend` picks for it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from minildm.attention import DEFAULT_MPS_BUDGET, BackendChoice, choose_backend, score_matrix_bytes
from minildm.autoencoder import AutoencoderConfig, AutoencoderKL
from minildm.clip_tokenizer import CLIPTokenizer
from minildm.convert import config_from_diffusers, unet_config_from_diffusers
from minildm.convert_text import text_encoder_config_from_transformers
from minildm.text import TextEncoder
from minildm.unet import UNet, UNetConfig

# ------------------------------------------------------------------------------------------ the configs

SD_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)             # attention at the three finest levels
SD_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
# Every SD 1.x / 2.x VAE: 4 levels (f = 8), 4 latent channels, scaling_factor 0.18215 (diffusers' default)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
# OpenAI's CLIP ViT-L/14 text model (SD 1's only text encoder, SDXL's first)
CLIP_VIT_L = dict(vocab_size=49408, max_position_embeddings=77, hidden_size=768, intermediate_size=3072,
                  num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768)
# SD's noise schedule (all three share it); the scheduler class differs
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                    steps_offset=1, set_alpha_to_one=False, clip_sample=False)


@dataclass(frozen=True)
class StableDiffusionConfig:
    """One Stable Diffusion release as its diffusers folder describes it, plus the two facts no config.json holds:
    the encoders' names and which of their hidden states the U-Net reads (that is in the pipeline's code)."""

    name: str
    repo: str
    unet: dict                              # unet/config.json (UNet2DConditionModel)
    vae: dict                               # vae/config.json (AutoencoderKL)
    text_encoders: tuple[dict, ...]         # text_encoder/config.json (CLIPTextConfig), and text_encoder_2/ for SDXL
    encoder_names: tuple[str, ...]
    text_layer: str                         # which hidden state becomes the context c
    scheduler: dict                         # scheduler/scheduler_config.json
    pad_tokens: tuple[str, ...]             # each tokenizer/tokenizer_config.json's pad_token

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)          # each level but the last halves the side

    @property
    def native_size(self) -> int:
        """The image side it was trained at: the U-Net's latent sample_size times the VAE's factor."""
        return self.unet["sample_size"] * self.vae_factor

    @property
    def context_dim(self) -> int:
        return self.unet["cross_attention_dim"]


SD15 = StableDiffusionConfig(
    name="SD 1.5", repo="runwayml/stable-diffusion-v1-5",
    unet=dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
              block_out_channels=(320, 640, 1280, 1280), layers_per_block=2),
    vae=SD_VAE, text_encoders=(CLIP_VIT_L,), encoder_names=("OpenAI CLIP ViT-L/14",),
    text_layer="last of 12, through the final norm",
    scheduler=dict(_class_name="PNDMScheduler", **SD_SCHEDULER, skip_prk_steps=True),
    pad_tokens=("<|endoftext|>",))

SD21 = StableDiffusionConfig(
    name="SD 2.1", repo="stabilityai/stable-diffusion-2-1",
    # diffusers' "attention_head_dim" is the number of heads per level (a misnomer kept since SD 1): 320 / 5 = 64
    unet=dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
              block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, use_linear_projection=True,
              upcast_attention=True),
    vae={**SD_VAE, "sample_size": 768},
    # OpenCLIP ViT-H/14's text model, saved with its 24th block dropped: the last of 23 is SD 2's penultimate
    text_encoders=(dict(vocab_size=49408, max_position_embeddings=77, hidden_size=1024, intermediate_size=4096,
                        num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu", projection_dim=512),),
    encoder_names=("OpenCLIP ViT-H/14",),
    text_layer="penultimate of 24 (the folder keeps 23), through the final norm",
    scheduler=dict(_class_name="DDIMScheduler", **SD_SCHEDULER, prediction_type="v_prediction"),
    pad_tokens=("!",))

SDXL = StableDiffusionConfig(
    name="SDXL 1.0", repo="stabilityai/stable-diffusion-xl-base-1.0",
    unet=dict(sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
              block_out_channels=(320, 640, 1280), layers_per_block=2, use_linear_projection=True,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time",
              addition_embed_type_num_heads=64, addition_time_embed_dim=256,
              projection_class_embeddings_input_dim=2816),        # 1280 (pooled text) + 6 x 256 (sizes and crop)
    vae={**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
    text_encoders=(CLIP_VIT_L,
                   dict(vocab_size=49408, max_position_embeddings=77, hidden_size=1280, intermediate_size=5120,
                        num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu", projection_dim=1280)),
    encoder_names=("OpenAI CLIP ViT-L/14", "OpenCLIP ViT-bigG/14"),
    text_layer="penultimate of each, without the final norm, concatenated",
    scheduler=dict(_class_name="EulerDiscreteScheduler", **SD_SCHEDULER, timestep_spacing="leading"),
    pad_tokens=("<|endoftext|>", "!"))

CONFIGS = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL}
OUT_OF_SCOPE = ("SDXL is out of scope for minildm's classes: its U-Net adds a second conditioning "
                "(addition_embed_type='text_time': the pooled text and the image's size and crop) and reads two text "
                "encoders; minildm builds 'sd15' and 'sd21'")


def get_config(name: str | StableDiffusionConfig) -> StableDiffusionConfig:
    if isinstance(name, StableDiffusionConfig):
        return name
    if name not in CONFIGS:
        raise ValueError(f"unknown Stable Diffusion config {name!r}; choose one of {', '.join(CONFIGS)}")
    return CONFIGS[name]


def reduced(config: StableDiffusionConfig, unet: dict, vae: dict, text_encoder: dict) -> StableDiffusionConfig:
    """The same release with some keys of its dicts overridden (a narrower model with the same layout)."""
    return dataclasses.replace(config, name=f"{config.name} (reduced)", unet={**config.unet, **unet},
                               vae={**config.vae, **vae}, text_encoders=({**config.text_encoders[0], **text_encoder},))


# ------------------------------------------------------------------------------- our modules, on meta

def our_configs(config: str | StableDiffusionConfig):
    """(UNetConfig, AutoencoderConfig, TextEncoderConfig) read from the dicts by the converters a real load uses."""
    config = get_config(config)
    if len(config.text_encoders) != 1 or "addition_embed_type" in config.unet:
        raise ValueError(OUT_OF_SCOPE)
    return (unet_config_from_diffusers(config.unet), config_from_diffusers(config.vae),
            text_encoder_config_from_transformers(config.text_encoders[0]))


def build_modules(config: str | StableDiffusionConfig, device: str | torch.device = "meta"):
    """Our (unet, vae, text_encoder). On "meta" every tensor has a shape and no storage: nothing is allocated and
    nothing is initialised, so the full-size SD 1.5 (4.3 GB in float32) builds in about a second."""
    unet_config, vae_config, text_config = our_configs(config)
    with torch.device(device):
        return UNet(unet_config), AutoencoderKL(vae_config), TextEncoder(text_config)


def build_on_meta(config: str | StableDiffusionConfig):
    return build_modules(config, "meta")


def reference_models(config: str | StableDiffusionConfig, device: str | torch.device = "meta") -> dict[str, nn.Module]:
    """diffusers' UNet2DConditionModel and AutoencoderKL and transformers' CLIPTextModel(s) from the same dicts,
    the oracle our counts and outputs are compared with. Needs diffusers and transformers (imported only here)."""
    import diffusers
    import transformers

    config = get_config(config)
    unet = {k: v for k, v in config.unet.items() if not k.startswith("_")}
    with torch.device(device):
        models = {"unet": diffusers.UNet2DConditionModel(**unet), "vae": diffusers.AutoencoderKL(**config.vae)}
        for i, text in enumerate(config.text_encoders):
            # SDXL's second encoder also projects its pooled output (the U-Net's added conditioning reads it)
            cls = transformers.CLIPTextModelWithProjection if i else transformers.CLIPTextModel
            models["text_encoder" + (f"_{i + 1}" if i else "")] = cls(transformers.CLIPTextConfig(**text))
    return models


# ---------------------------------------------------------------------------------- what they cost

@dataclass(frozen=True)
class PartSize:
    """A part's parameter count and what its weights take in memory (4 bytes each in float32, 2 in float16)."""

    part: str
    parameters: int

    @property
    def float32_bytes(self) -> int:
        return 4 * self.parameters

    @property
    def float16_bytes(self) -> int:
        return 2 * self.parameters


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def parameters_by_part(models: str | StableDiffusionConfig | dict[str, nn.Module]) -> list[PartSize]:
    """Parameters of each part and of the whole (last row); a name or config is built on meta first."""
    if not isinstance(models, dict):
        models = dict(zip(("U-Net", "VAE", "text encoder"), build_on_meta(models)))
    rows = [PartSize(part, count_parameters(model)) for part, model in models.items()]
    return rows + [PartSize("total", sum(row.parameters for row in rows))]


def unet_levels(unet: dict) -> list[dict]:
    """Per level of a diffusers U-Net dict: channels, whether it attends, heads, head size (channels per head) and
    transformer depth. Read off the dict itself, so it works for SDXL too (our UNetConfig cannot hold it)."""
    channels = tuple(unet.get("block_out_channels", (320, 640, 1280, 1280)))

    def per_level(value) -> tuple:                       # diffusers takes one value for all levels, or one each
        return tuple(value) if isinstance(value, (list, tuple)) else (value,) * len(channels)

    down = unet.get("down_block_types", SD_DOWN)
    heads = per_level(unet.get("num_attention_heads") or unet.get("attention_head_dim", 8))   # the misnomer
    depth = per_level(unet.get("transformer_layers_per_block", 1))
    return [dict(channels=c, attends=kind.startswith("CrossAttn"), heads=h, head_size=c // h, depth=d)
            for c, kind, h, d in zip(channels, down, heads, depth)]


def comparison_table() -> list[dict[str, str]]:
    """One row per release, the facts chapter 09 compares, computed from the dicts above."""
    vocab = CLIPTokenizer.shipped().vocab                    # token -> id, for the pad tokens' ids
    rows = []
    for config in CONFIGS.values():
        levels = unet_levels(config.unet)

        def attending(key: str, levels=levels) -> str:   # "-" where a level has no attention
            return ", ".join(str(lv[key]) if lv["attends"] else "-" for lv in levels)

        widths = " + ".join(str(t["hidden_size"]) for t in config.text_encoders)
        encoders = " + ".join(f"{n} ({t['hidden_size']})" for n, t in zip(config.encoder_names, config.text_encoders))
        latent = config.unet["sample_size"]
        try:
            unet_params = f"{count_parameters(build_on_meta(config)[0]):,}"
        except ValueError:                                  # SDXL: diffusers' count if it is here, else blank
            try:
                unet_params = f"{count_parameters(reference_models(config)['unet']):,} (diffusers; not ours)"
            except ImportError:
                unet_params = ""
        rows.append({
            "model": config.name, "text encoder(s)": encoders,
            "context width": f"{config.context_dim}" + (f" = {widths}" if len(config.text_encoders) > 1 else ""),
            "hidden state read": config.text_layer,
            "pad token (id)": " / ".join(f"{t} ({vocab[t]})" for t in config.pad_tokens),
            "native size": f"{config.native_size}x{config.native_size}",
            "latent": f"{config.vae.get('latent_channels', 4)}x{latent}x{latent}",
            "prediction": config.scheduler.get("prediction_type", "epsilon"),
            "scheduler": config.scheduler["_class_name"],
            "linear projections": str(config.unet.get("use_linear_projection", False)),
            "channels per level": ", ".join(str(lv["channels"]) for lv in levels),
            "heads per level": attending("heads"),
            "head size per level": attending("head_size"),
            "transformer depth": attending("depth") + f" (middle {levels[-1]['depth']})",
            "VAE scale factor": str(config.vae.get("scaling_factor", 0.18215)),
            "U-Net parameters": unet_params,
        })
    return rows


# ------------------------------------------------------------------------- attention in one step

@dataclass(frozen=True)
class AttentionSite:
    """One kind of attention layer in a U-Net step (or the VAE's decode), with its sizes and backend choices."""

    site: str
    grid: str                      # latent positions as h x w
    batch: int
    n_q: int
    n_k: int
    heads: int
    head_size: int
    layers: int                    # how many such layers run
    per: str                       # ... per sampler "step" or per "image" (the VAE decodes once)
    score_bytes: int               # one naive float32 score matrix, batch x heads x n_q x n_k
    mps: BackendChoice
    cuda: BackendChoice
    cpu: BackendChoice


def attention_sites(unet_config: UNetConfig, vae_config: AutoencoderConfig, height: int, width: int, batch: int = 2,
                    context_length: int = 77, mps_budget: int = DEFAULT_MPS_BUDGET,
                    vae_batch: int | None = None) -> list[AttentionSite]:
    """Every kind of attention one evaluation of the U-Net runs at a height x width image, and the VAE decoder's.

    batch = 2: classifier-free guidance runs the prompt's half and the negative (or empty) prompt's half as one
    batch. Down levels hold layers_per_block SpatialTransformers, up levels one more, the middle one, each with
    transformer_depth blocks of one self-attention (N_k = N_q, the latent positions) and one cross-attention (N_k =
    the prompt's tokens). The VAE decodes once per image (vae_batch, default batch // 2), one head over all channels.
    """
    f = vae_config.downsampling_factor
    if height % f or width % f:
        raise ValueError(f"image size {height}x{width} is not divisible by the VAE's factor {f}; use multiples of {f}")
    h, w = height // f, width // f                                   # the latent's side
    vae_batch = max(batch // 2, 1) if vae_batch is None else vae_batch

    def site(name, grid_h, grid_w, n_k, heads, head_size, layers, per="step", b=batch) -> AttentionSite:
        n_q = grid_h * grid_w
        q, k = (b, heads, n_q, head_size), (b, heads, n_k, head_size)       # (B, heads, N, d)
        return AttentionSite(name, f"{grid_h}x{grid_w}", b, n_q, n_k, heads, head_size, layers, per,
                             score_matrix_bytes(b, heads, n_q, n_k, torch.float32),
                             choose_backend("mps", torch.float32, q, k, budget=mps_budget),
                             choose_backend("cuda", torch.float16, q, k), choose_backend("cpu", torch.float32, q, k))

    c, sites = unet_config, []
    for level, (channels, heads) in enumerate(zip(c.block_out_channels, c.level_heads)):
        # down L + up (L + 1) SpatialTransformers, on each path that attends at this level
        per_level = (c.layers_per_block * c.attention_levels[level]
                     + (c.layers_per_block + 1) * c.up_attention_levels[level])
        if not per_level:
            continue
        gh, gw = h // 2**level, w // 2**level                        # each level halves the side
        layers = per_level * c.transformer_depth
        sites.append(site(f"level {level} self", gh, gw, gh * gw, heads, channels // heads, layers))
        sites.append(site(f"level {level} cross", gh, gw, context_length, heads, channels // heads, layers))
    if c.mid_attention:
        levels = len(c.block_out_channels) - 1
        gh, gw, channels, heads = h // 2**levels, w // 2**levels, c.block_out_channels[-1], c.level_heads[-1]
        sites.append(site("middle self", gh, gw, gh * gw, heads, channels // heads, c.transformer_depth))
        sites.append(site("middle cross", gh, gw, context_length, heads, channels // heads, c.transformer_depth))
    if vae_config.mid_block_attention:
        channels = vae_config.block_out_channels[-1]
        sites.append(site("VAE decoder middle", h, w, h * w, 1, channels, 1, per="image", b=vae_batch))
    return sites


def sites_for(config: str | StableDiffusionConfig, height: int, width: int, **options) -> list[AttentionSite]:
    unet_config, vae_config, _ = our_configs(config)
    return attention_sites(unet_config, vae_config, height, width, **options)


# ------------------------------------------------------------------------------------------ printing

def size_text(n_bytes: int) -> str:
    """1073741824 -> '1 GiB', 20185088 -> '19.25 MiB': binary units, as chapter 04's table."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= size:
            return f"{n_bytes / size:,.3f}".rstrip("0").rstrip(".") + f" {unit}"
    return f"{n_bytes} B"


def format_table(rows: list[dict], transpose: bool = False) -> str:
    """Rows of {column: value} as an aligned text table; transpose puts the columns down the side."""
    if transpose:
        columns = [str(row[next(iter(row))]) for row in rows]        # the first column names each row
        keys = list(rows[0])[1:]
        rows = [{"": key, **{name: row[key] for name, row in zip(columns, rows)}} for key in keys]
    keys = list(rows[0])
    cells = [[str(key) for key in keys]] + [[str(row[key]) for key in keys] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(keys))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells]
    return "\n".join([lines[0], "  ".join("-" * width for width in widths), *lines[1:]])


__all__ = ["CONFIGS", "SD15", "SD21", "SDXL", "AttentionSite", "PartSize", "StableDiffusionConfig",
           "attention_sites", "build_modules", "build_on_meta", "comparison_table", "format_table", "get_config",
           "our_configs", "parameters_by_part", "reduced", "reference_models", "sites_for", "size_text",
           "unet_levels"]
