"""The noise predictor: a U-Net that reads z_t, the timestep t and the prompt's tokens, and answers eps_hat (ch05).

Read it bottom up, the way it is built: the timestep becomes a vector (sinusoids + an MLP); a ResBlock is the VAE's,
with that vector added in the middle; a SpatialTransformer lets every latent position attend to every other
(self-attention) and to the prompt (cross-attention); down levels halve the resolution, the middle attends at the
smallest, and up levels double it again, each concatenating the activations the way down left behind at the same
resolution (the skip connections that make it a "U"). Configured like Stable Diffusion v1 it is the same function
as diffusers' `UNet2DConditionModel` (tests/oracle compares them), so SD's weights load by renaming keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from minildm.attention import MultiHeadAttention
from minildm.autoencoder import ResBlock, Upsample, check_size_multiple, group_norm
from minildm.checkpoint import load_config, load_weights_into


@dataclass
class UNetConfig:
    """What SD v1 and our classroom U-Nets need. The defaults are Stable Diffusion v1's (859,520,964 parameters)."""

    in_channels: int = 4                                       # latent channels in ...
    out_channels: int = 4                                      # ... and eps_hat channels out
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)   # one entry per resolution level
    layers_per_block: int = 2                                  # ResBlocks per down level (up levels have one more)
    attention_levels: tuple[bool, ...] = (True, True, True, False)   # which levels have SpatialTransformers (down)
    up_attention_levels: tuple[bool, ...] | None = None        # the way up's, if not the same (None: the same, as SD)
    mid_attention: bool | None = None                          # the middle's; None: if any level attends (SD: yes)
    heads: int | tuple[int, ...] = 8                           # attention heads, for all levels or per level
    transformer_depth: int = 1                                 # transformer blocks per SpatialTransformer
    context_dim: int = 768                                     # D of the prompt's token embeddings (CLIP ViT-L: 768)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False                        # SD 2: Linear proj_in/out; SD 1: 1x1 convs
    dropout: float = 0.0
    num_timesteps: int = 1000                                  # T: valid timesteps are [0, T)
    flip_sin_to_cos: bool = True                               # timestep embedding as [cos, sin] (SD) or [sin, cos]
    freq_shift: float = 0.0                                    # diffusers' downscale_freq_shift (SD: 0)

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        self.attention_levels = tuple(self.attention_levels)
        if self.up_attention_levels is None:
            self.up_attention_levels = self.attention_levels
        self.up_attention_levels = tuple(self.up_attention_levels)
        if self.mid_attention is None:
            self.mid_attention = any(self.attention_levels + self.up_attention_levels)
        self.heads = tuple(self.heads) if isinstance(self.heads, (list, tuple)) else self.heads
        levels = len(self.block_out_channels)
        if len(self.attention_levels) != levels:
            raise ValueError(f"attention_levels has {len(self.attention_levels)} entries for {levels} levels "
                             f"(block_out_channels={self.block_out_channels}); give one True/False per level")
        if len(self.up_attention_levels) != levels:
            raise ValueError(f"up_attention_levels has {len(self.up_attention_levels)} entries for {levels} levels "
                             f"(block_out_channels={self.block_out_channels}); give one True/False per level, "
                             "or None for the same as attention_levels")
        for channels, heads in zip(self.block_out_channels, self.level_heads):
            if channels % heads or channels % self.norm_num_groups:
                raise ValueError(f"{channels} channels do not split into {heads} heads and {self.norm_num_groups} "
                                 "groups; use channel counts divisible by both")

    @property
    def level_heads(self) -> tuple[int, ...]:
        heads = self.heads if isinstance(self.heads, tuple) else (self.heads,) * len(self.block_out_channels)
        if len(heads) != len(self.block_out_channels):
            raise ValueError(f"heads has {len(heads)} entries for {len(self.block_out_channels)} levels")
        return heads

    @property
    def downsampling_factor(self) -> int:
        """How much smaller the deepest level's feature map is: each level but the last halves the sides. A side
        need not be a multiple of it: a halving rounds up, and the way up returns to the skips' sizes."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def time_dim(self) -> int:
        return 4 * self.block_out_channels[0]                      # SD: 1280


# ----------------------------------------------------------------------------------------- the timestep

def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0) -> Tensor:
    """Sinusoids of t at dim/2 frequencies from 1 down to 1/10,000 (Vaswani et al. 2017's positions, here for t).

    Low frequencies tell far-apart timesteps apart, high ones neighbours; an MLP on top turns them into whatever
    the ResBlocks need. (B,) -> (B, dim), float32.
    """
    # BEGIN SOLUTION ch05.timestep_embedding
    half = dim // 2
    # omega_i = 10000^(-i / (half - shift)), i = 0 .. half-1
    exponent = -math.log(10_000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    angles = t.float()[:, None] * exponent.exp()[None, :]                          # (B, half)
    sin, cos = angles.sin(), angles.cos()
    return torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)       # (B, dim)
    # END SOLUTION


class TimestepResBlock(ResBlock):
    """The VAE's ResBlock (chapter 02) with the timestep told in the middle: a per-channel shift of the features.

    Every block of the U-Net hears t, so each can act differently at high noise (find the layout) and low noise
    (fix the edges).
    """

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, groups: int, eps: float,
                 dropout: float = 0.0):
        super().__init__(in_channels, out_channels, groups, dropout, eps)
        self.time_proj = nn.Linear(time_dim, out_channels)

    def forward(self, x: Tensor, time: Tensor) -> Tensor:
        # BEGIN SOLUTION ch05.resblock
        h = self.conv1(F.silu(self.norm1(x)))                                      # (B, C_out, H, W)
        # + W silu(emb_t): one shift per channel, the same at every position
        h = h + self.time_proj(F.silu(time))[:, :, None, None]                     # (B, C_out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))                        # (B, C_out, H, W)
        return self.skip(x) + h
        # END SOLUTION


# ----------------------------------------------------------------------------------------- attention

class GEGLU(nn.Module):
    """The transformer's feed-forward: x -> (x W + b) * GELU(x V + c) -> back to dim (Shazeer 2020, "GLU Variants").
    One matrix makes both halves; the gate decides, per feature, how much of the other half passes."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)                                # (B, N, 4 dim) each
        return self.out(value * F.gelu(gate))                                      # (B, N, dim)


class TransformerBlock(nn.Module):
    """Self-attention, then cross-attention to the prompt, then GEGLU; each behind a LayerNorm, each a residual."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = MultiHeadAttention(dim, heads, dim // heads)                  # positions <-> positions
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = MultiHeadAttention(dim, heads, dim // heads, context_dim)     # positions <- tokens
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLU(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        # BEGIN SOLUTION ch05.cross_attention_block
        x = self.attn1(self.norm1(x)) + x                                          # (B, N, dim)
        # queries from the latent positions, keys and values from the prompt's L tokens
        x = self.attn2(self.norm2(x), context) + x                                 # (B, N, dim)
        return self.ff(self.norm3(x)) + x                                          # (B, N, dim)
        # END SOLUTION


class SpatialTransformer(nn.Module):
    """Treat the (H, W) feature map as a sequence of H*W tokens, run transformer blocks on it, and fold it back.

    The 1x1 convs (SD 1) or Linear layers (SD 2) in and out are the same map on each position; the residual
    around the whole thing lets a freshly initialised transformer start as the identity.
    """

    def __init__(self, channels: int, heads: int, context_dim: int, depth: int, groups: int,
                 linear_projection: bool):
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = group_norm(channels, groups)                                   # eps 1e-6, as diffusers
        projection = nn.Linear if linear_projection else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = projection(channels, channels)
        self.blocks = nn.ModuleList([TransformerBlock(channels, heads, context_dim) for _ in range(depth)])
        self.proj_out = projection(channels, channels)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        h = self.norm(x)
        if not self.linear_projection:
            h = self.proj_in(h)                                                    # (B, C, H, W)
        h = rearrange(h, "b c h w -> b (h w) c")                                   # (B, H*W, C): positions as tokens
        if self.linear_projection:
            h = self.proj_in(h)
        for block in self.blocks:
            h = block(h, context)                                                  # (B, H*W, C)
        if self.linear_projection:
            h = self.proj_out(h)
        # .contiguous(): the view has channels-last strides, and a conv that reads it would pass that layout on to
        # every layer after it (each conv then copies its weights to match, forward and backward)
        h = rearrange(h, "b (h w) c -> b c h w", h=height, w=width).contiguous()   # (B, C, H, W)
        if not self.linear_projection:
            h = self.proj_out(h)
        return h + x


# ----------------------------------------------------------------------------------------- the levels

class UNetDownsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv (padding 1 on every side, unlike the VAE's)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)                                                        # (B, C, H/2, W/2)


class UNetLevel(nn.Module):
    """One resolution of the U: ResBlocks, each followed by a SpatialTransformer if the level attends, then a
    resample (down or up) unless it is the last level of its path. The two paths differ only in their skips."""

    def __init__(self, in_channels: list[int], out_channels: int, config: UNetConfig, heads: int, attend: bool,
                 resample: nn.Module | None):
        super().__init__()
        c = config
        self.res = nn.ModuleList([TimestepResBlock(i, out_channels, c.time_dim, c.norm_num_groups, c.norm_eps,
                                                   c.dropout) for i in in_channels])
        self.attn = nn.ModuleList([SpatialTransformer(out_channels, heads, c.context_dim, c.transformer_depth,
                                                      c.norm_num_groups, c.use_linear_projection)
                                   for _ in in_channels]) if attend else None
        self.resample = resample

    def layer(self, i: int, h: Tensor, time: Tensor, context: Tensor) -> Tensor:
        h = self.res[i](h, time)
        return self.attn[i](h, context) if self.attn is not None else h


class UNetDownLevel(UNetLevel):
    """On the way down, every layer's output and the downsample's are kept: they are this level's skips."""

    def forward(self, h: Tensor, time: Tensor, context: Tensor) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for i in range(len(self.res)):
            h = self.layer(i, h, time, context)                                    # (B, C_i, h_i, w_i)
            skips.append(h)
        if self.resample is not None:
            h = self.resample(h)                                                   # (B, C_i, h_i / 2, w_i / 2)
            skips.append(h)
        return h, skips


class UNetUpLevel(UNetLevel):
    """On the way up, each layer first takes the last skip off the stack (the way down's output at this
    resolution) and reads it concatenated to its input along the channels."""

    def forward(self, h: Tensor, skips: list[Tensor], time: Tensor, context: Tensor) -> Tensor:
        for i in range(len(self.res)):
            h = self.layer(i, torch.cat([h, skips.pop()], dim=1), time, context)  # (B, C_i, h_i, w_i)
        if self.resample is not None:
            # up to the size of the skip the next level reads: 2 h_i, or 2 h_i - 1 where the way down rounded up
            h = self.resample(h, size=skips[-1].shape[-2:])                        # (B, C_i, ~2 h_i, ~2 w_i)
        return h


class UNetMidBlock(nn.Module):
    """ResBlock -> SpatialTransformer -> ResBlock at the smallest resolution, where attention is cheapest."""

    def __init__(self, channels: int, config: UNetConfig, heads: int):
        super().__init__()
        c = config
        self.res1 = TimestepResBlock(channels, channels, c.time_dim, c.norm_num_groups, c.norm_eps, c.dropout)
        self.attn = SpatialTransformer(channels, heads, c.context_dim, c.transformer_depth, c.norm_num_groups,
                                       c.use_linear_projection) if c.mid_attention else None
        self.res2 = TimestepResBlock(channels, channels, c.time_dim, c.norm_num_groups, c.norm_eps, c.dropout)

    def forward(self, h: Tensor, time: Tensor, context: Tensor) -> Tensor:
        h = self.res1(h, time)
        return self.res2(self.attn(h, context) if self.attn is not None else h, time)


# ----------------------------------------------------------------------------------------- the U-Net

class UNet(nn.Module):
    """eps_hat = UNet(z_t, t, context): (B, C, h, w), (B,) or a number, (B, L, D) -> (B, C, h, w)."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = c = config or UNetConfig()
        chans, heads, levels = c.block_out_channels, c.level_heads, len(c.block_out_channels)
        self.time_mlp = nn.Sequential(nn.Linear(chans[0], c.time_dim), nn.SiLU(), nn.Linear(c.time_dim, c.time_dim))
        self.conv_in = nn.Conv2d(c.in_channels, chans[0], 3, padding=1)

        # down: level i turns chans[i-1] into chans[i]; every ResBlock output, and every resample, is kept for a skip
        self.down = nn.ModuleList()
        skips = [chans[0]]                                                         # conv_in's output is the first
        for i, out in enumerate(chans):
            last = i == levels - 1
            ins = [chans[max(i - 1, 0)]] + [out] * (c.layers_per_block - 1)
            self.down.append(UNetDownLevel(ins, out, c, heads[i], c.attention_levels[i],
                                            None if last else UNetDownsample(out)))
            skips += [out] * (c.layers_per_block + (0 if last else 1))
        self.mid = UNetMidBlock(chans[-1], c, heads[-1])

        # up: mirror image, one more ResBlock per level, each reading its input concatenated with a skip
        self.up = nn.ModuleList()
        previous = chans[-1]
        for i, out in enumerate(reversed(chans)):
            level = levels - 1 - i
            ins = [(previous if j == 0 else out) + skips.pop() for j in range(c.layers_per_block + 1)]
            self.up.append(UNetUpLevel(ins, out, c, heads[level], c.up_attention_levels[level],
                                       Upsample(out) if level > 0 else None))
            previous = out
        self.norm_out = group_norm(chans[0], c.norm_num_groups, c.norm_eps)
        self.conv_out = nn.Conv2d(chans[0], c.out_channels, 3, padding=1)

    def check_inputs(self, zt: Tensor, t: Tensor, context: Tensor | None) -> Tensor:
        """The user's tensors, checked where they enter; returns t as one timestep per item, (B,)."""
        c = self.config
        if zt.ndim != 4 or zt.shape[1] != c.in_channels:
            raise ValueError(f"z_t must be (B, {c.in_channels}, h, w) latents, got shape {tuple(zt.shape)}")
        check_size_multiple(zt.shape[2], zt.shape[3], 1, "any positive size: the way up returns to the skips' sizes",
                            what="latent size")
        if any(c.attention_levels + c.up_attention_levels) or c.mid_attention:
            if context is None or context.ndim != 3 or context.shape[-1] != c.context_dim:
                got = "None" if context is None else f"shape {tuple(context.shape)}"
                raise ValueError(f"context must be (B, L, {c.context_dim}) token embeddings, got {got}")
            if context.shape[0] != zt.shape[0]:
                raise ValueError(f"context has {context.shape[0]} items for {zt.shape[0]} latents; give one prompt "
                                 "embedding per latent")
        if isinstance(t, Tensor) and t.device.type != "cpu":
            # On a GPU the range is not checked: reading a comparison back would make the CPU wait for the GPU at
            # every step. The samplers and the trainer make their GPU timesteps in range themselves.
            t = t.to(zt.device).reshape(-1)
        else:
            # a number or a CPU tensor: checked on the host, which costs nothing
            t = torch.as_tensor(t)
            if not ((t >= 0) & (t < c.num_timesteps)).all():                      # NaN fails this too
                raise ValueError(f"timesteps must be in [0, {c.num_timesteps}), got {t.min().item()}.."
                                 f"{t.max().item()}")
            # a number is filled in on the device (no copy, so no wait); a CPU tensor is copied there
            t = torch.full((1,), t.item(), device=zt.device) if t.ndim == 0 else t.to(zt.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(zt.shape[0])                                              # one timestep for the batch
        if t.numel() != zt.shape[0]:
            raise ValueError(f"{t.numel()} timesteps for {zt.shape[0]} latents; give one, or one per latent")
        return t

    def forward(self, zt: Tensor, t: Tensor | float, context: Tensor | None = None) -> Tensor:
        t = self.check_inputs(zt, t, context)
        c = self.config
        # the timestep as a vector every ResBlock hears: sinusoids (float32) -> MLP
        emb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift).to(zt.dtype)
        time = self.time_mlp(emb)                                                  # (B, time_dim)

        h = self.conv_in(zt)                                                       # (B, C_0, h, w)
        skips = [h]                                                                # a stack: last kept, first read
        for level in self.down:
            h, level_skips = level(h, time, context)                               # (B, C_i, h_i / 2, w_i / 2)
            skips += level_skips                                                   # (the last level halves nothing)
        h = self.mid(h, time, context)                                             # (B, C_last, h / f, w / f)
        for level in self.up:
            h = level(h, skips, time, context)                                     # pops one skip per ResBlock
        return self.conv_out(F.silu(self.norm_out(h)))                             # (B, C_out, h, w)

    @classmethod
    def from_folder(cls, folder) -> "UNet":
        """A model folder (config.json + model.safetensors) -> the U-Net, on the CPU, weights checked strictly."""
        return load_weights_into(cls(load_config(UNetConfig, folder)), folder)
