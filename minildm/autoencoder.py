"""Chapter 02: the variational autoencoder that moves images into a 48x smaller latent space and back.

This is the Stable Diffusion VAE ("AutoencoderKL", Rombach et al. 2022, after Esser et al.'s VQGAN, 2021), built
from the bottom up: a ResBlock, the down- and up-sampling steps, a single-head attention block for the middle, the
encoder, the diagonal Gaussian it outputs, the decoder, and the autoencoder that joins them. Configured like SD v1
(`AutoencoderConfig.sd_v1()`), it is the same function as diffusers' `AutoencoderKL` (tests/oracle proves it), so
real SD weights load through `minildm.convert`.

Shapes: an image is (B, 3, H, W) in [-1, 1]; its latent is (B, 4, H/f, W/f), f = 2^(levels - 1) = 8 for SD.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from minildm.attention import MultiHeadAttention
from minildm.checkpoint import (
    config_from_dict,
    load_config,
    load_state_dict,
    load_strict,
    load_weights_into,
    read_safetensors_metadata,
)
from minildm.saving import parse_json, save_file_atomically


@dataclass
class AutoencoderConfig:
    """Everything needed to rebuild the VAE. The defaults are SD v1's layout; `shapes64()` is our laptop VAE."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple = (128, 256, 512, 512)  # one entry per level; f = 2^(levels - 1)
    layers_per_block: int = 2                          # ResBlocks per encoder level (decoder: one more)
    norm_num_groups: int = 32
    mid_block_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scale_factor: float = 0.18215                      # s: z_0 = s * latent, chosen so z_0 has unit variance
    # provenance (training command, data seed, ...); not used by the model
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"block_out_channels {self.block_out_channels} must all be divisible by norm_num_groups "
                    f"({self.norm_num_groups}); change one or the other"
                )

    @property
    def downsampling_factor(self) -> int:
        """f: every level but the last halves the height and width."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def sd_v1(cls) -> "AutoencoderConfig":
        return cls()

    @classmethod
    def shapes64(cls) -> "AutoencoderConfig":
        """Our tutorial VAE: 64x64x3 -> 4x8x8, the same f = 8 and 4 channels (48x) as SD, at laptop width."""
        return cls(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8, scale_factor=1.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict, source=None) -> "AutoencoderConfig":
        """Exactly the saved config: a missing or unknown field is an error naming `source` (checkpoint.py)."""
        return config_from_dict(cls, d, source)


def check_size_multiple(height: int, width: int, multiple: int, why: str, what: str = "image size") -> None:
    """The one size rule, for the VAE and the pipeline (the U-Net takes any positive side): each side a positive
    multiple of `multiple`, since a network halves it that often (`why` says which). An error suggests the nearest
    size that works."""
    sides = (height, width)
    if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in sides):
        raise TypeError(f"{what} {height}x{width} must be two whole numbers (int), got {type(height).__name__} and "
                        f"{type(width).__name__}")
    fit = "x".join(str(max(multiple, round(s / multiple) * multiple)) for s in sides)   # the nearest that work
    if min(sides) < 1:
        raise ValueError(f"{what} {height}x{width} has a side below 1 ({why}, so each side must be a positive "
                         f"multiple of {multiple}); use {fit}")
    if height % multiple or width % multiple:
        raise ValueError(f"{what} {height}x{width} is not a multiple of {multiple} ({why}); use {fit}")


def latent_shape(height: int, width: int, config: AutoencoderConfig | None = None) -> tuple[int, int, int]:
    """The latent's (C, H/f, W/f) for an image of height x width; a size the VAE cannot halve is an error."""
    # BEGIN SOLUTION ch01.latent_shape
    config = config or AutoencoderConfig()
    f = config.downsampling_factor
    check_size_multiple(height, width, f, f"the VAE divides it by {f}")
    return (config.latent_channels, height // f, width // f)
    # END SOLUTION


def check_images(x: Tensor, config: AutoencoderConfig) -> None:
    """Refuse, with a message that says what to do, images the encoder cannot take."""
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}; "
                         "add a batch dimension with x[None]")
    if x.shape[1] != config.in_channels:
        raise ValueError(
            f"expected {config.in_channels} channels, got {x.shape[1]} (shape {tuple(x.shape)}); "
            "convert greyscale/RGBA images to RGB first"
        )
    latent_shape(x.shape[2], x.shape[3], config)
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or Inf values; check how they were loaded and normalised to [-1, 1]")


def group_norm(channels: int, groups: int, eps: float = 1e-6) -> nn.GroupNorm:
    # eps = 1e-6 as in the SD VAE (diffusers uses the same), not PyTorch's default 1e-5 (which SD's U-Net uses)
    return nn.GroupNorm(groups, channels, eps=eps)


class ResBlock(nn.Module):
    """x + F(x): two GroupNorm -> SiLU -> 3x3 conv steps, with a 1x1 conv on the skip path when channels change.

    The residual path lets the block start as (almost) the identity, so a deep stack still trains.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0, eps: float = 1e-6):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # BEGIN SOLUTION ch02.resblock
        h = self.conv1(F.silu(self.norm1(x)))                   # (B, C_out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))     # (B, C_out, H, W)
        return self.skip(x) + h
        # END SOLUTION


class VAEDownsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv. Padding only right and bottom (as SD does) keeps the grid aligned."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, (0, 1, 0, 1))                              # (B, C, H+1, W+1)
        return self.conv(x)                                     # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour copy, then a 3x3 conv to smooth (avoids transposed-conv checkerboards).

    `size` asks for another size instead: the U-Net's way up meets skips of an odd side (a 65-wide latent goes
    down to 33, and must come back to 65, not 66), and takes the skip's size, as diffusers' `upsample_size` does."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")   # (B, C, 2H, 2W)
        else:
            x = F.interpolate(x, size=size, mode="nearest")          # (B, C, size[0], size[1])
        return self.conv(x)


class SelfAttention(MultiHeadAttention):
    """Single-head self-attention over the H*W positions of the smallest feature map, with a residual.

    Convolutions see a 3x3 neighbourhood; this block lets every latent position look at every other one once.
    It is cheap here because the map is only (H/f) x (W/f). The layer is chapter 04's, with one head of all C
    channels (and biases on q, k, v, as SD's VAE has).
    """

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, head_dim=channels, qkv_bias=True)
        self.norm = group_norm(channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        _, _, height, width = x.shape
        # softmax(q k^T / sqrt(C)) v over N = H*W positions
        h = super().forward(rearrange(self.norm(x), "b c h w -> b (h w) c"))    # (B, N, C)
        # attention output first, as diffusers adds it: the sum takes that tensor's (channels-last) memory layout,
        # so the convs after it round exactly as diffusers' do (x + h gives the same math, ~1e-5 apart in float32)
        return rearrange(h, "b (h w) c -> b c h w", h=height, w=width) + x


class VAEMidBlock(nn.Module):
    """ResBlock -> attention -> ResBlock at the lowest resolution."""

    def __init__(self, channels: int, groups: int, use_attention: bool):
        super().__init__()
        self.res1 = ResBlock(channels, channels, groups)
        self.attn = SelfAttention(channels, groups) if use_attention else nn.Identity()
        self.res2 = ResBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.res2(self.attn(self.res1(x)))


class VAELevel(nn.Module):
    """One resolution of the encoder or decoder: some ResBlocks, then an optional resample."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, groups: int, resample: nn.Module | None):
        super().__init__()
        self.res = nn.ModuleList(
            ResBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_blocks)
        )
        self.resample = resample if resample is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for block in self.res:
            x = block(x)
        return self.resample(x)


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> moments (B, 2*C_latent, H/f, W/f): the mean and log-variance of the posterior."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        chans, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, chans[0], 3, padding=1)
        self.down = nn.ModuleList()
        for i, out_ch in enumerate(chans):
            is_last = i == len(chans) - 1
            in_ch = chans[max(i - 1, 0)]
            downsample = None if is_last else VAEDownsample(out_ch)
            self.down.append(VAELevel(in_ch, out_ch, config.layers_per_block, groups, downsample))
        self.mid = VAEMidBlock(chans[-1], groups, config.mid_block_attention)
        self.norm_out = group_norm(chans[-1], groups)
        self.conv_out = nn.Conv2d(chans[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)                                     # (B, c0, H, W)
        for level in self.down:
            h = level(h)                                        # ... -> (B, c_last, H/f, W/f)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))          # (B, 2*C_latent, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, C_latent, h, w) -> image (B, 3, h*f, w*f). The encoder's mirror, one more ResBlock per level."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        chans, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, chans[0], 3, padding=1)
        self.mid = VAEMidBlock(chans[0], groups, config.mid_block_attention)
        self.up = nn.ModuleList()
        for i, out_ch in enumerate(chans):
            is_last = i == len(chans) - 1
            in_ch = chans[max(i - 1, 0)]
            upsample = None if is_last else Upsample(out_ch)
            self.up.append(VAELevel(in_ch, out_ch, config.layers_per_block + 1, groups, upsample))
        self.norm_out = group_norm(chans[-1], groups)
        self.conv_out = nn.Conv2d(chans[-1], config.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))                           # (B, c_last, h, w)
        for level in self.up:
            h = level(h)                                        # ... -> (B, c0, h*f, w*f)
        return self.conv_out(F.silu(self.norm_out(h)))          # (B, 3, H, W)


class DiagonalGaussian:
    """The encoder's answer: not one latent but a Gaussian N(mean, diag(exp(logvar))) over latents.

    The log-variance is clamped to [-30, 20] (as in SD) so exp() can neither underflow to a zero std nor overflow.
    """

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)             # (B, C, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """The reparameterisation trick (Kingma & Welling 2014): randomness enters as eps, so gradients reach
        mean and std."""
        # BEGIN SOLUTION ch02.reparameterize
        eps = torch.randn(self.mean.shape, generator=generator, dtype=torch.float32).to(self.mean)
        # z = mean + std * eps,  eps ~ N(0, I)
        return self.mean + self.std * eps
        # END SOLUTION

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(N(mean, var) || N(0, I)) per item, summed over latent dimensions: (B,)."""
        # BEGIN SOLUTION ch02.gaussian_kl
        # KL = 1/2 * sum(mean^2 + var - 1 - log var)
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))
        # END SOLUTION


class AutoencoderKL(nn.Module):
    """The VAE: `encode(x) -> DiagonalGaussian`, `decode(z) -> x`. Latents here are unscaled; multiply by
    `config.scale_factor` to get the z_0 that diffusion works on (see `to_z0` / `from_z0`)."""

    def __init__(self, config: AutoencoderConfig | None = None):
        super().__init__()
        self.config = config or AutoencoderConfig()
        c = 2 * self.config.latent_channels
        self.encoder = Encoder(self.config)
        # 1x1 convs between the encoder/decoder and the latent: kept for weight compatibility with SD
        self.quant_conv = nn.Conv2d(c, c, 1) if self.config.use_quant_conv else nn.Identity()
        self.post_quant_conv = (
            nn.Conv2d(self.config.latent_channels, self.config.latent_channels, 1)
            if self.config.use_post_quant_conv
            else nn.Identity()
        )
        self.decoder = Decoder(self.config)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        check_images(x, self.config)
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"expected latents of shape (B, {self.config.latent_channels}, h, w), got {tuple(z.shape)}"
            )
        return self.decoder(self.post_quant_conv(z))

    def reconstruct(self, x: Tensor) -> Tensor:
        """The deterministic round trip, decode(mean of encode(x)): what PSNR and the figures measure."""
        return self.decode(self.encode(x).mean)

    def forward(self, x: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None):
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    @classmethod
    def from_folder(cls, folder) -> "AutoencoderKL":
        """A model folder (config.json + model.safetensors) -> the model, on the CPU, weights checked strictly."""
        return load_weights_into(cls(load_config(AutoencoderConfig, folder)), folder)

    # The diffusion model works on z_0 = s * latent, so that z_0 has roughly unit variance like the noise.
    def to_z0(self, posterior_sample: Tensor) -> Tensor:
        return posterior_sample * self.config.scale_factor

    def from_z0(self, z0: Tensor) -> Tensor:
        return z0 / self.config.scale_factor


DECODER_FILE_KIND = "minildm-vae-decoder"


def save_decoder_file(vae: AutoencoderKL, path) -> None:
    """Write a "VAE file": the decoder alone (+ post_quant_conv), with the config in the file's metadata.

    Any model whose encoder produces the same latent space can swap it in (`swap_decoder`): this is what SD's
    "vae-ft-mse" files are for, a better decoder for latents the diffusion model already knows how to make.
    """
    weights = {k: v for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    meta = {"kind": DECODER_FILE_KIND, "config": json.dumps(vae.config.to_dict())}
    save_file_atomically(weights, path, metadata=meta)


def swap_decoder(vae: AutoencoderKL, path) -> AutoencoderKL:
    """Replace `vae`'s decoder with the one in a VAE file (the file's decoder may be wider or deeper)."""
    meta = read_safetensors_metadata(path, "VAE file")
    if meta.get("kind") != DECODER_FILE_KIND or "config" not in meta:
        raise ValueError(f"{path}: not a minildm VAE decoder file (metadata kind={meta.get('kind')!r}); give a "
                         f"decoder.safetensors written by save_decoder_file")
    source = f"{path} (the config in its metadata)"
    file_config = AutoencoderConfig.from_dict(parse_json(meta["config"], source), source)
    if file_config.latent_channels != vae.config.latent_channels:
        raise ValueError(
            f"{path}: decoder expects {file_config.latent_channels} latent channels but this VAE makes "
            f"{vae.config.latent_channels}; a decoder can only be swapped within the same latent space"
        )
    donor = AutoencoderKL(file_config)
    parts = nn.ModuleDict({"decoder": donor.decoder, "post_quant_conv": donor.post_quant_conv})
    load_strict(parts, load_state_dict(path, "VAE file"), str(path))
    device = next(vae.parameters()).device
    vae.decoder, vae.post_quant_conv = donor.decoder.to(device), donor.post_quant_conv.to(device)
    return vae


def reconstruction_loss(x_hat: Tensor, x: Tensor, kind: str = "l1") -> Tensor:
    """Per-image reconstruction error, summed over pixels: (B,).

    L1 is the median's loss: it does not average an uncertain edge into grey mush, so reconstructions stay sharp
    (the CompVis recipe uses L1, plus a perceptual loss we cannot download). MSE is what PSNR measures. "l1+mse"
    adds both: sharp edges from L1, and MSE's strong pull on the large errors that dominate PSNR.
    """
    diff = x_hat - x
    if kind == "l1":
        per_pixel = diff.abs()
    elif kind == "mse":
        per_pixel = diff.pow(2)
    elif kind == "l1+mse":
        per_pixel = diff.abs() + diff.pow(2)
    else:
        raise ValueError(f"unknown reconstruction loss {kind!r}; choose l1, mse or l1+mse")
    return per_pixel.flatten(1).sum(dim=1)


def vae_loss(x_hat: Tensor, x: Tensor, posterior: DiagonalGaussian, kl_weight: float,
             kind: str = "l1") -> tuple[Tensor, dict]:
    """The VAE objective (negative ELBO with a small beta): reconstruction + beta * KL(q(z|x) || N(0, I)).

    A tiny beta (SD: 1e-6) keeps the latent space smooth and bounded without blurring the reconstructions.
    """
    rec = reconstruction_loss(x_hat, x, kind).mean()
    kl = posterior.kl().mean()
    # L = E[rec] + beta * E[KL]
    loss = rec + kl_weight * kl
    return loss, {"rec": rec, "kl": kl}


def check_halvable_latent(height: int, width: int) -> None:
    """The scale-equivariance loss pools the latent 2x: both its sides must be even."""
    if height % 2 or width % 2:
        raise ValueError(f"the scale-equivariance loss halves the latent, which is {height}x{width} here; use an "
                         "image size whose latent is even on both sides (a multiple of 16 for the f = 8 VAEs)")


def scale_equivariance_loss(vae: "AutoencoderKL", z: Tensor, x: Tensor, kind: str = "l1") -> Tensor:
    """The decoder asked to commute with 2x downsampling (Skorokhodov et al. 2025, "Improving the Diffusability of
    Autoencoders"): the latent z (B, C, h, w), average-pooled to (B, C, h/2, w/2), must decode to x average-pooled
    to (B, 3, H/2, W/2). A latent whose coarse version still means the coarse image has less high-frequency detail
    for a diffusion model to learn. Returns the mean over the batch of the per-image reconstruction loss."""
    check_halvable_latent(z.shape[-2], z.shape[-1])
    # L_SE = rec(D(pool_2(z)), pool_2(x))
    return reconstruction_loss(vae.decode(F.avg_pool2d(z, 2)), F.avg_pool2d(x, 2), kind).mean()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def compression_ratio(height: int, width: int, config: AutoencoderConfig | None = None, channels: int = 3) -> float:
    """Pixel values per latent value: 512*512*3 / (4*64*64) = 48 for SD."""
    c, h, w = latent_shape(height, width, config)
    return (channels * height * width) / (c * h * w)


__all__ = [
    "AutoencoderConfig",
    "AutoencoderKL",
    "DiagonalGaussian",
    "Decoder",
    "Encoder",
    "ResBlock",
    "check_halvable_latent",
    "compression_ratio",
    "count_parameters",
    "latent_shape",
    "reconstruction_loss",
    "save_decoder_file",
    "scale_equivariance_loss",
    "swap_decoder",
    "vae_loss",
]
