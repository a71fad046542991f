"""Chapter 06: what the latent diffusion trainer trains, and with which settings.

Three pieces of the recipe, kept apart from the loop that uses them (train_ldm.py):

- `LDMTrainConfig`: the run's settings (steps, batch, lr, prediction type, precision, data), checked where they enter;
- `ModelConfigs` / `model_configs`: the networks (U-Net, text encoder) and the noise schedule, from the CLI's strings;
- `Denoiser`: the U-Net and the text encoder as the one module training updates, `check_parts_fit` that they fit
  the space and the image size, and `autocast_dtype`: its precision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from minildm.checkpoint import config_from_dict
from minildm.pipeline import mismatches
from minildm.pixel_space import PixelSpace
from minildm.schedule import PREDICTION_TYPES, NoiseSchedule
from minildm.text import TextEncoder, TextEncoderConfig, Tokenizer
from minildm.timestep_sampling import MIN_SNR_GAMMA, SAMPLINGS
from minildm.unet import UNet, UNetConfig

SPACES = ("latent", "pixel")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class LDMTrainConfig:
    # the defaults: benchmarks/train_speed.py's best measured recipe for 15 minutes on this project's 2-core CPU
    # (chapter 06, "Training against the clock"): min-SNR timesteps, batch 64, lr 2e-3, 7,000 steps on the U-Net
    # model_configs builds (channels 24, 48, attention at 4x4 only: "A cheaper network", "Today's network, narrower")
    steps: int = 7000
    batch_size: int = 64                 # per rank
    lr: float = 2e-3
    warmup_steps: int = 200
    min_lr_fraction: float = 0.05        # cosine decay to 5% of lr (train_vae.learning_rate)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    prediction_type: str = "epsilon"     # what the U-Net learns to predict: epsilon, sample (z_0) or v_prediction
    t_sampling: str = "min_snr"          # how often each timestep is drawn: uniform | min_snr | min_snr_eps | lognormal
    min_snr_gamma: float = MIN_SNR_GAMMA  # min_snr's gamma: below it, the noisier timesteps are drawn more often
    zero_terminal_snr: bool = False      # Lin et al. (2024): the last step pure noise, and sampling starts there
    caption_dropout: float = 0.1         # share of captions replaced by "" (for classifier-free guidance)
    ema_decay: float = 0.999
    precision: str = "auto"              # auto | fp32 | bf16 | fp16 (autocast; auto: bf16/fp16 on CUDA, fp32 else)
    space: str = "latent"                # latent: diffuse the VAE's 4x8x8 latents; pixel: the 3x64x64 images
    vae: str = "shapes64"                # a shipped VAE name or a VAE folder
    seed: int = 0
    data_seed: int = 0
    num_train_images: int = 20_000
    image_size: int = 64
    save_every: int = 500
    sample_every: int = 1000             # write a sample grid every this many steps (0: never)
    log_every: int = 25
    compile: bool = False                # torch.compile the denoiser (inductor; a first step of compiling)

    def __post_init__(self):
        """The choices a typo would silently change (an unknown prediction type used to train a v model)."""
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}; choose one of "
                             f"{', '.join(PREDICTION_TYPES)} (--prediction)")
        if self.space not in SPACES:
            raise ValueError(f"unknown space {self.space!r}; choose latent (the VAE's latents) or pixel (the images)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.t_sampling not in SAMPLINGS:
            raise ValueError(f"unknown t_sampling {self.t_sampling!r}; choose one of {', '.join(SAMPLINGS)} "
                             f"(--t-sampling)")
        if not self.min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {self.min_snr_gamma}; Hang et al. use 5")
        if self.min_snr_gamma != MIN_SNR_GAMMA and self.t_sampling not in ("min_snr", "min_snr_eps"):
            raise ValueError(f"min_snr_gamma is min_snr's; t_sampling {self.t_sampling!r} has none: add --t-sampling "
                             f"min_snr or leave --min-snr-gamma out")
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise ValueError("zero_terminal_snr needs a v or z_0 model: at SNR 0 the input is pure noise, so an eps "
                             "model's z_0 estimate divides by 0; add --prediction v_prediction")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}; 0.1 is usual")


@dataclass
class ModelConfigs:
    """The two networks training builds: the U-Net and the text encoder it reads, plus the noise schedule. The
    schedule's prediction_type (and zero terminal SNR) is not chosen here: the trainer sets it from LDMTrainConfig."""

    unet: UNetConfig = field(default_factory=lambda: UNetConfig(
        block_out_channels=(24, 48), attention_levels=(False, True), layers_per_block=1, heads=4, context_dim=64,
        norm_num_groups=8))
    text_encoder: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(
        vocab_size=Tokenizer().vocab_size, dim=64, depth=2, heads=4))
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)

    def to_dict(self) -> dict:
        return {"unet": asdict(self.unet), "text_encoder": asdict(self.text_encoder),
                "schedule": self.schedule.to_dict()}

    def denoiser(self) -> "Denoiser":
        """The two networks these configs describe, with fresh random weights."""
        return Denoiser(UNet(self.unet), TextEncoder(self.text_encoder))

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfigs":
        return cls(config_from_dict(UNetConfig, d["unet"]), TextEncoderConfig.from_dict(d["text_encoder"]),
                   config_from_dict(NoiseSchedule, d["schedule"]))


def parse_ints(text: str | None, name: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--{name} takes comma-separated integers like 64,128; got {text!r}") from None


def model_configs(space: str = "latent", channels: str | None = None, attention: str | None = None,
                  heads: int | str = 4,
                  layers_per_block: int = 1, text_dim: int = 64, text_depth: int = 2,
                  norm_num_groups: int = 8, attention_up: str | None = None) -> ModelConfigs:
    """The networks for `space`: 4 channels in and out for latents, 3 for pixels; the rest is one recipe.

    By default the levels are 24 and 48 channels wide and only the deepest attends (4x4 for 8x8 latents): the 8x8
    level's attention cost 31% of a step and the model followed its prompts worse with it, for the same training
    time, and the narrower levels save another 16% of a step for as good a model in 7,000 steps (chapter 06, "A
    cheaper network" and "Today's network, narrower"). The shipped model: channels 32,64, attention 1,1.
    `attention_up` gives the way up its own levels (default: the same as the way down's): the way up has one more
    layer per level than the way down, so at 8x8 it holds two of the three SpatialTransformers.
    `heads` is one count for every level and the text encoder, or one per level ("1,4": one head of 24 channels at
    8x8, four of 12 at 4x4), the text encoder then taking the deepest level's, the one that attends by default.
    """
    block_out_channels = parse_ints(channels, "channels") or (24, 48)
    levels = len(block_out_channels)

    def per_level(values: tuple[int, ...], name: str, one_for_all: bool = False) -> tuple[int, ...]:
        """`values` checked to hold one entry per level (or one for all, where `one_for_all`)."""
        if len(values) != levels and not (one_for_all and len(values) == 1):
            fix = "give one count for all levels or one per level" if one_for_all else "give one 0/1 each"
            raise ValueError(f"--{name} has {len(values)} entries for {levels} levels; {fix}")
        return values

    # (0, ..., 0, 1): attention at the last (deepest, lowest-resolution) level only
    attends = per_level(parse_ints(attention, "attention") or (0,) * (levels - 1) + (1,), "attention")
    attends_up = per_level(parse_ints(attention_up, "attention-up") or attends, "attention-up")
    level_heads = per_level((heads,) if isinstance(heads, int) else parse_ints(heads, "heads"), "heads",
                            one_for_all=True)
    latent_channels = 4 if space == "latent" else 3
    unet = UNetConfig(in_channels=latent_channels, out_channels=latent_channels, block_out_channels=block_out_channels,
                      attention_levels=tuple(bool(a) for a in attends),
                      up_attention_levels=tuple(bool(a) for a in attends_up), layers_per_block=layers_per_block,
                      heads=level_heads if len(level_heads) > 1 else level_heads[0], context_dim=text_dim,
                      norm_num_groups=norm_num_groups)
    text = TextEncoderConfig(vocab_size=Tokenizer().vocab_size, dim=text_dim, depth=text_depth, heads=level_heads[-1])
    return ModelConfigs(unet, text, NoiseSchedule())


class Denoiser(nn.Module):
    """The U-Net and the text encoder as one module: what training updates, what the EMA follows, what DDP wraps.

    The text encoder is trained together with the U-Net, from scratch, as in the LDM paper's text-to-image model
    (Rombach et al. 2022); SD v1 instead froze a pretrained CLIP text encoder.
    """

    def __init__(self, unet: UNet, text_encoder: TextEncoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, zt: Tensor, t: Tensor, ids: Tensor) -> Tensor:
        return self.unet(zt, t, self.text_encoder(ids))                   # (B, C, h, w)


def check_parts_fit(autoencoder: nn.Module, denoiser: Denoiser, tokenizer: Tokenizer, schedule: NoiseSchedule,
                    image_size: int) -> None:
    """The parts must fit as any pipeline's must (pipeline.mismatches), and the --image-size images must halve as
    often as the VAE and the U-Net downsample."""
    space = "the pixel space" if isinstance(autoencoder, PixelSpace) else "the VAE"
    problems = mismatches(autoencoder, denoiser.unet, denoiser.text_encoder, tokenizer, schedule, names={"vae": space},
                          image_size=image_size)
    if problems:
        raise ValueError("the model settings do not fit: " + "; ".join(problems) + "; change --channels, --text-dim "
                         "or --image-size so they agree")


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for `precision`, or None for plain float32. auto: bfloat16 on CUDA GPUs that have it
    (same range as float32, no loss scaling), float16 on older GPUs; float32 on the CPU and MPS, where half-precision
    training is slower or less complete."""
    choices = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision not in choices:
        raise ValueError(f"unknown precision {precision!r}; choose auto, fp32, bf16 or fp16")
    return choices[precision]
