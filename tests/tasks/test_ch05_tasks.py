"""Chapter 05 exercises: the timestep embedding, the ResBlock that hears the time, and the transformer block.

Each test carries its task and points (`minildm grade` adds them up). The expected values are computed here from
the chapter's definitions, in float64 and from functional pieces (F.group_norm, F.conv2d, F.layer_norm, F.linear,
a softmax written out) with the block's own weights, never through the package's modules. The properties the
chapter states are checked too: t = 0 embeds as [1, ..., 1, 0, ..., 0]; the time is one shift per channel that
norm2 sees (so a shift shared by a whole GroupNorm group is removed); the prompt reaches the block only through the
cross-attention, whose keys are the prompt's tokens; gradients pass gradcheck. Nothing may be handed to diffusers,
and the time-aware ResBlock may not call chapter 02's forward.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from taskcheck import check_close, fail, forbid
from torch import nn

from minildm.unet import TimestepResBlock, TransformerBlock, timestep_embedding

EMBEDDING = "ch05.timestep_embedding"
RESBLOCK = "ch05.resblock"
BLOCK = "ch05.cross_attention_block"

FORBIDDEN_EMBEDDING = ("diffusers.models.embeddings:get_timestep_embedding",)
FORBIDDEN_RESBLOCK = ("minildm.autoencoder:ResBlock.forward", "diffusers.models.resnet:ResnetBlock2D")
FORBIDDEN_BLOCK = ("diffusers.models.attention:BasicTransformerBlock",)


# what an error inside the exercise most likely means, added to the failure
SHAPES = {
    RESBLOCK: "x is (B, C_in, H, W) and time (B, time_dim); time_proj makes one shift per item and channel, "
              "(B, C_out), which [:, :, None, None] spreads over every position",
    BLOCK: "attn1 reads norm1(x) alone; attn2 takes its queries from norm2(x) (B, N, dim) and its keys and values "
           "from the context as given (B, L, context_dim)",
}


def run(task: str, what: str, module, *inputs):
    """module(*inputs), with an error that is not the student's own stub reported as a failure that says where."""
    try:
        return module(*inputs)
    except (NotImplementedError, AssertionError):
        raise                                   # the stub itself, or a forbidden call: the message says it all
    except Exception as err:                    # noqa: BLE001 - report, not crash
        shapes = ", ".join(f"{tuple(i.shape)}" for i in inputs if isinstance(i, torch.Tensor))
        fail(task, f"{what} on inputs of shapes {shapes} raised {type(err).__name__}: {err}; {SHAPES[task]}")


def gradcheck(task: str, function, inputs: tuple[torch.Tensor, ...], what: str) -> None:
    try:
        ok = torch.autograd.gradcheck(function, inputs, eps=1e-6, atol=1e-5, raise_exception=False)
    except (NotImplementedError, AssertionError):
        raise
    except Exception as err:                    # noqa: BLE001 - report, not crash
        fail(task, f"gradcheck could not run {what}: {type(err).__name__}: {err}; {SHAPES[task]}")
    if not ok:
        fail(task, f"{what}: the gradients (autograd) do not match finite differences in float64; is every step a "
                   "differentiable torch operation on the inputs?")


# ------------------------------------------------------------------------------------ ch05.timestep_embedding


def sinusoids(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0) -> torch.Tensor:
    """The chapter's definition in float64: half frequencies from 1 down, angles t * freq, cos and sin of them."""
    n_freqs = dim // 2
    i = torch.arange(n_freqs, dtype=torch.float64)
    freqs = torch.exp(-math.log(10_000) * i / (n_freqs - freq_shift))          # (dim/2,) from 1 down
    angles = t.double().cpu()[:, None] * freqs[None, :]                       # (B, dim/2)
    parts = [angles.cos(), angles.sin()] if flip_sin_to_cos else [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=-1)                                           # (B, dim)


# float32 angles of t up to 1000 are good to ~1e-4 (the reference is within 6e-5 of the float64 definition)
ANGLE_ATOL = 5e-4

TIMESTEPS = {
    "integer": torch.tensor([0, 1, 10, 250, 499, 999]),                                  # int64, as samplers give
    "fractional": torch.tensor([0.25, 3.5, 12.75, 640.125, 999.9], dtype=torch.float64),  # sigma-space samplers
}


@pytest.mark.task(EMBEDDING)
@pytest.mark.points(6)
@pytest.mark.parametrize("dim", [8, 32, 320])
@pytest.mark.parametrize("kind", ["integer", "fractional"])
@pytest.mark.parametrize("flip_sin_to_cos, freq_shift", [(True, 0.0), (False, 0.0), (True, 1.0), (False, 1.0)])
def test_timestep_embedding_is_cos_and_sin_of_t_at_geometric_frequencies(monkeypatch, dim, kind, flip_sin_to_cos,
                                                                         freq_shift):
    t = TIMESTEPS[kind]
    forbid(monkeypatch, EMBEDDING, *FORBIDDEN_EMBEDDING)
    out = timestep_embedding(t, dim, flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift)
    order = "[cos, sin]" if flip_sin_to_cos else "[sin, cos]"
    swapped = sinusoids(t, dim, not flip_sin_to_cos, freq_shift)
    if isinstance(out, torch.Tensor) and out.shape == swapped.shape and (out.double() - swapped).abs().max() < 1e-3:
        fail(EMBEDDING, f"timestep_embedding(dim={dim}, flip_sin_to_cos={flip_sin_to_cos}) has its halves the wrong "
                        f"way round: expected {order}")
    check_close(out, sinusoids(t, dim, flip_sin_to_cos, freq_shift), EMBEDDING,
                f"timestep_embedding of {kind} timesteps {t.tolist()}, dim={dim}, {order}, freq_shift={freq_shift}",
                atol=ANGLE_ATOL, rtol=0, dtype=torch.float32)


@pytest.mark.task(EMBEDDING)
@pytest.mark.points(3)
def test_timestep_embedding_known_values(monkeypatch):
    forbid(monkeypatch, EMBEDDING, *FORBIDDEN_EMBEDDING)
    # t = 0: every angle is 0, so cos = 1 and sin = 0
    zero = torch.zeros(2, dtype=torch.long)
    ones_then_zeros = torch.cat([torch.ones(2, 4), torch.zeros(2, 4)], dim=1)
    check_close(timestep_embedding(zero, 8), ones_then_zeros, EMBEDDING,
                "timestep_embedding(t=0, dim=8) with [cos, sin]: expected [1, 1, 1, 1, 0, 0, 0, 0]", atol=1e-7)
    check_close(timestep_embedding(zero, 8, flip_sin_to_cos=False), ones_then_zeros.flip(1), EMBEDDING,
                "timestep_embedding(t=0, dim=8) with [sin, cos]: expected [0, 0, 0, 0, 1, 1, 1, 1]", atol=1e-7)
    # the first frequency is 1 (the sinusoid of t itself); with freq_shift = 1 the last is exactly 1/10,000
    t = torch.tensor([2.0, 1000.0])
    out = timestep_embedding(t, 8, flip_sin_to_cos=False, freq_shift=1.0)
    check_close(out[:, [0, 4]] if isinstance(out, torch.Tensor) else out,
                torch.stack([t.sin(), t.cos()], dim=1), EMBEDDING,
                "columns 0 and 4 (sin and cos at the first frequency, 1) for t = 2 and 1000", atol=ANGLE_ATOL)
    last = t.double() / 10_000
    check_close(out[:, [3, 7]], torch.stack([last.sin(), last.cos()], dim=1), EMBEDDING,
                "columns 3 and 7 (sin and cos at the last frequency, 1/10,000 when freq_shift = 1) for t = 2 and "
                "1000", atol=1e-6)


@pytest.mark.task(EMBEDDING)
@pytest.mark.points(2)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float64, torch.float16])
def test_timestep_embedding_is_float32_on_the_device_of_t(monkeypatch, dtype):
    forbid(monkeypatch, EMBEDDING, *FORBIDDEN_EMBEDDING)
    t = torch.tensor([5, 700, 40]).to(dtype)
    out = timestep_embedding(t, 16)
    check_close(out, sinusoids(t, 16), EMBEDDING, f"timestep_embedding of {dtype} timesteps {t.tolist()}",
                atol=ANGLE_ATOL, rtol=0, dtype=torch.float32)
    # on the meta device tensors have shapes and dtypes but no values: anything made on the CPU instead shows
    try:
        meta = timestep_embedding(torch.zeros(3, dtype=dtype, device="meta"), 16)
    except NotImplementedError:
        raise
    except Exception as err:                    # noqa: BLE001 - report, not crash
        fail(EMBEDDING, f"timestep_embedding of t on the 'meta' device raised {type(err).__name__}: {err}; make the "
                        "frequencies on t.device (torch.arange(..., device=t.device))")
    if meta.device != torch.device("meta") or meta.shape != (3, 16) or meta.dtype != torch.float32:
        fail(EMBEDDING, f"timestep_embedding of 3 timesteps on 'meta' gave a {meta.dtype} tensor of shape "
                        f"{tuple(meta.shape)} on {meta.device}; expected float32 (3, 16) on t's device")


@pytest.mark.task(EMBEDDING)
@pytest.mark.points(1)
def test_each_timestep_gets_its_own_row(monkeypatch):
    forbid(monkeypatch, EMBEDDING, *FORBIDDEN_EMBEDDING)
    t = torch.tensor([3, 999, 0, 512, 77])
    out = timestep_embedding(t, 32)
    order = torch.tensor([4, 2, 0, 3, 1])
    check_close(timestep_embedding(t[order], 32), out[order] if isinstance(out, torch.Tensor) else out, EMBEDDING,
                "the embedding of the timesteps reordered, against the rows reordered", atol=1e-6)


# ---------------------------------------------------------------------------------------------- ch05.resblock


def randomised(module: nn.Module, seed: int, spread: float = 0.3) -> nn.Module:
    """Random weights everywhere, norm gains near 1 (so that mixing up norm1 and norm2 shows), in float64."""
    g = torch.Generator().manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for name, p in module.named_parameters():
            gain = name.split(".")[-2].startswith("norm") and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * spread + (1.0 if gain else 0.0))
    return module.eval()


def resblock_by_hand(block: TimestepResBlock, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
    """The chapter's time-aware ResBlock from functional pieces and the block's own weights (eval: no dropout)."""
    n1, n2 = block.norm1, block.norm2
    h = F.group_norm(x, n1.num_groups, n1.weight, n1.bias, eps=n1.eps)
    h = F.conv2d(F.silu(h), block.conv1.weight, block.conv1.bias, padding=1)             # (B, C_out, H, W)
    shift = F.linear(F.silu(time), block.time_proj.weight, block.time_proj.bias)         # (B, C_out)
    h = h + shift[:, :, None, None]                                                      # the same at every position
    h = F.group_norm(h, n2.num_groups, n2.weight, n2.bias, eps=n2.eps)
    h = F.conv2d(F.silu(h), block.conv2.weight, block.conv2.bias, padding=1)
    shortcut = x if isinstance(block.skip, nn.Identity) else F.conv2d(x, block.skip.weight, block.skip.bias)
    return shortcut + h


def resblock_inputs(seed: int, batch: int, channels: int, h: int, w: int, time_dim: int):
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(batch, channels, h, w, generator=g, dtype=torch.float64)
    time = torch.randn(batch, time_dim, generator=g, dtype=torch.float64) * 2            # one vector per item
    return x, time


RESBLOCK_CASES = [  # seed, B, C_in, C_out, time_dim, groups, H, W
    (0, 2, 8, 8, 12, 4, 5, 6),            # the same channels: the skip is the identity
    (1, 3, 8, 16, 20, 4, 6, 6),           # more channels: a 1x1 conv on the skip
    (2, 2, 12, 6, 7, 3, 4, 7),            # fewer
]


@pytest.mark.task(RESBLOCK)
@pytest.mark.points(6)
@pytest.mark.parametrize("seed, batch, c_in, c_out, time_dim, groups, h, w", RESBLOCK_CASES)
def test_timestep_resblock_matches_the_chapter_computed_by_hand(monkeypatch, seed, batch, c_in, c_out, time_dim,
                                                                groups, h, w):
    block = randomised(TimestepResBlock(c_in, c_out, time_dim, groups, 1e-5), seed)
    x, time = resblock_inputs(seed, batch, c_in, h, w, time_dim)
    expected = resblock_by_hand(block, x, time)
    forbid(monkeypatch, RESBLOCK, *FORBIDDEN_RESBLOCK)
    what = f"TimestepResBlock({c_in}, {c_out}, time_dim={time_dim}, groups={groups})"
    with torch.no_grad():
        out = run(RESBLOCK, what, block, x, time)
    check_close(out, expected, RESBLOCK, f"{what} on x{tuple(x.shape)} and time{tuple(time.shape)}, float64",
                atol=1e-10, rtol=1e-8, dtype=torch.float64)


@pytest.mark.task(RESBLOCK)
@pytest.mark.points(3)
def test_the_time_is_a_shift_per_channel_that_norm2_sees(monkeypatch):
    # GroupNorm subtracts each group's mean over its channels and positions: a shift shared by all the channels of a
    # group, at every position, is removed by norm2. So if time_proj gives every channel of a group the same value,
    # the output cannot depend on the time; with a time_proj that differs channel by channel it must.
    c_in, c_out, time_dim, groups = 6, 8, 5, 2
    block = randomised(TimestepResBlock(c_in, c_out, time_dim, groups, 1e-5), 3)
    x, time = resblock_inputs(3, 2, c_in, 5, 5, time_dim)
    other_time = time.flip(0) * 3 - 1
    forbid(monkeypatch, RESBLOCK, *FORBIDDEN_RESBLOCK)
    with torch.no_grad():
        first, second = (run(RESBLOCK, "TimestepResBlock(6, 8, time_dim=5, groups=2)", block, x, t)
                         for t in (time, other_time))
        if not isinstance(first, torch.Tensor) or (first - second).abs().max() < 1e-3:
            fail(RESBLOCK, "the output does not change when `time` does: add time_proj(SiLU(time)) to the features, "
                           "one value per item and channel")
        g = torch.Generator().manual_seed(4)
        per_group = c_out // groups
        block.time_proj.weight.copy_(torch.randn(groups, time_dim, generator=g, dtype=torch.float64)
                                     .repeat_interleave(per_group, dim=0))
        block.time_proj.bias.copy_(torch.randn(groups, generator=g, dtype=torch.float64)
                                   .repeat_interleave(per_group, dim=0))
        first, second = (run(RESBLOCK, "TimestepResBlock(6, 8, time_dim=5, groups=2)", block, x, t)
                         for t in (time, other_time))
    change = (first - second).abs().max().item()
    if change > 1e-9:
        fail(RESBLOCK, f"with a time_proj that gives every channel of a GroupNorm group the same shift, changing "
                       f"`time` still changed the output (by up to {change:.3g}); norm2 removes exactly such a shift, "
                       "so the time must be added after conv1 and before norm2, the same at every position")


@pytest.mark.task(RESBLOCK)
@pytest.mark.points(1)
def test_timestep_resblock_applies_dropout_before_its_second_conv(monkeypatch):
    block = randomised(TimestepResBlock(4, 8, 6, 2, 1e-5, dropout=1.0), 5).train()       # p = 1 zeroes all it sees
    x, time = resblock_inputs(5, 2, 4, 4, 5, 6)
    # everything reaching conv2 (the time's shift included) is zero, so only its bias is left on the residual path
    expected = F.conv2d(x, block.skip.weight, block.skip.bias) + block.conv2.bias.view(1, -1, 1, 1)
    forbid(monkeypatch, RESBLOCK, *FORBIDDEN_RESBLOCK)
    with torch.no_grad():
        out = run(RESBLOCK, "TimestepResBlock(4, 8, dropout=1.0) in training mode", block, x, time)
    check_close(out, expected, RESBLOCK, "TimestepResBlock with dropout p = 1 in training mode (only the skip and "
                "conv2's bias are left)", atol=1e-10, rtol=1e-8)


@pytest.mark.task(RESBLOCK)
@pytest.mark.points(2)
def test_timestep_resblock_gradients_pass_gradcheck_in_float64(monkeypatch):
    block = randomised(TimestepResBlock(4, 6, 5, 2, 1e-5), 6)
    x, time = resblock_inputs(6, 1, 4, 3, 3, 5)
    forbid(monkeypatch, RESBLOCK, *FORBIDDEN_RESBLOCK)
    gradcheck(RESBLOCK, block, (x.requires_grad_(), time.requires_grad_()),
              "TimestepResBlock(4, 6) with respect to x and time")


# ---------------------------------------------------------------------------------- ch05.cross_attention_block


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def attention_by_hand(attn: nn.Module, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Multi-head attention from the layer's weights: queries from x, keys and values from context."""
    heads = attn.heads
    q, k, v = (F.linear(source, proj.weight, proj.bias)
               for proj, source in ((attn.to_q, x), (attn.to_k, context), (attn.to_v, context)))
    batch, n_q, inner = q.shape
    d = inner // heads
    q, k, v = (s.view(batch, -1, heads, d).transpose(1, 2) for s in (q, k, v))           # (B, heads, N, d)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)                                       # (B, heads, N_q, N_k)
    weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    out = (weights / weights.sum(dim=-1, keepdim=True)) @ v                               # (B, heads, N_q, d)
    out = out.transpose(1, 2).reshape(batch, n_q, inner)
    return F.linear(out, attn.to_out.weight, attn.to_out.bias)                            # (B, N_q, dim)


def geglu_by_hand(ff: nn.Module, x: torch.Tensor) -> torch.Tensor:
    value, gate = F.linear(x, ff.proj.weight, ff.proj.bias).chunk(2, dim=-1)
    return F.linear(value * F.gelu(gate), ff.out.weight, ff.out.bias)


def block_by_hand(block: TransformerBlock, x: torch.Tensor, context: torch.Tensor,
                  cross: bool = True) -> torch.Tensor:
    """x + attn1(norm1 x), then x + attn2(norm2 x, context), then x + ff(norm3 x); cross=False skips the middle."""
    h = layer_norm(x, block.norm1)
    x = attention_by_hand(block.attn1, h, h) + x                                          # positions <-> positions
    if cross:
        x = attention_by_hand(block.attn2, layer_norm(x, block.norm2), context) + x       # positions <- tokens
    return geglu_by_hand(block.ff, layer_norm(x, block.norm3)) + x


def block_inputs(seed: int, batch: int, n: int, tokens: int, dim: int, context_dim: int):
    g = torch.Generator().manual_seed(seed + 200)
    x = torch.randn(batch, n, dim, generator=g, dtype=torch.float64)
    context = torch.randn(batch, tokens, context_dim, generator=g, dtype=torch.float64)
    return x, context


def random_block(seed: int, dim: int, heads: int, context_dim: int) -> TransformerBlock:
    # weights of spread 0.4 make the attention far from uniform, so that a query or key taken from the wrong place
    # shows; the LayerNorm gains stay near 1
    return randomised(TransformerBlock(dim, heads, context_dim), seed, spread=0.4)


BLOCK_CASES = [  # seed, B, N (latent positions), L (prompt tokens), dim, heads, context_dim
    (0, 2, 6, 5, 16, 4, 12),
    (1, 1, 9, 3, 8, 2, 8),
    (2, 3, 4, 7, 12, 3, 20),
]


@pytest.mark.task(BLOCK)
@pytest.mark.points(6)
@pytest.mark.parametrize("seed, batch, n, tokens, dim, heads, context_dim", BLOCK_CASES)
def test_transformer_block_matches_the_chapter_composed_from_its_weights(monkeypatch, seed, batch, n, tokens, dim,
                                                                         heads, context_dim):
    block = random_block(seed, dim, heads, context_dim)
    x, context = block_inputs(seed, batch, n, tokens, dim, context_dim)
    expected = block_by_hand(block, x, context)
    forbid(monkeypatch, BLOCK, *FORBIDDEN_BLOCK)
    what = f"TransformerBlock(dim={dim}, heads={heads}, context_dim={context_dim})"
    with torch.no_grad():
        out = run(BLOCK, what, block, x, context)
    check_close(out, expected, BLOCK, f"{what} on x{tuple(x.shape)} ({n} positions) and context"
                f"{tuple(context.shape)} ({tokens} tokens), float64", atol=1e-10, rtol=1e-8, dtype=torch.float64)


@pytest.mark.task(BLOCK)
@pytest.mark.points(3)
def test_the_prompt_enters_only_through_the_cross_attention(monkeypatch):
    block = random_block(3, 16, 4, 12)
    x, context = block_inputs(3, 2, 6, 5, 16, 12)
    _, other_context = block_inputs(4, 2, 6, 5, 16, 12)
    forbid(monkeypatch, BLOCK, *FORBIDDEN_BLOCK)
    what = "TransformerBlock(dim=16, heads=4, context_dim=12)"
    with torch.no_grad():
        first, second = (run(BLOCK, what, block, x, c) for c in (context, other_context))
        if not isinstance(first, torch.Tensor) or (first - second).abs().max() < 1e-3:
            fail(BLOCK, "the output does not change when the context does: the cross-attention (attn2) must read "
                        "its keys and values from the context")
        # attn2's output projection zeroed: the cross-attention adds nothing, so the prompt can matter no more
        block.attn2.to_out.weight.zero_()
        block.attn2.to_out.bias.zero_()
        first, second = (run(BLOCK, what, block, x, c) for c in (context, other_context))
        expected = block_by_hand(block, x, context, cross=False)
    change = (first - second).abs().max().item()
    if change > 1e-12:
        fail(BLOCK, f"with attn2's output projection zeroed, changing the context still changed the output (by up to "
                    f"{change:.3g}); the context may enter only through attn2")
    check_close(first, expected, BLOCK, "the block with attn2's output zeroed (x + attn1(norm1 x), then "
                "+ ff(norm3 x))", atol=1e-10, rtol=1e-8)


@pytest.mark.task(BLOCK)
@pytest.mark.points(2)
def test_the_cross_attention_keys_are_the_prompt_tokens_in_any_order(monkeypatch):
    # 6 latent positions read 5 prompt tokens of another width (12): only keys and values can come from the prompt.
    # Attention has no notion of order, so shuffling the prompt's tokens changes nothing, and shuffling the
    # positions shuffles the output's rows the same way.
    block = random_block(5, 16, 2, 12)
    x, context = block_inputs(5, 2, 6, 5, 16, 12)
    g = torch.Generator().manual_seed(6)
    positions, tokens = torch.randperm(6, generator=g), torch.randperm(5, generator=g)
    forbid(monkeypatch, BLOCK, *FORBIDDEN_BLOCK)
    what = "TransformerBlock(dim=16, heads=2, context_dim=12)"
    with torch.no_grad():
        out = run(BLOCK, what, block, x, context)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, 6, 16):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            fail(BLOCK, f"6 positions of width 16 reading 5 tokens of width 12 gave {shape}; expected (2, 6, 16): "
                        "one row per position (the queries), whatever the prompt's length")
        check_close(run(BLOCK, what, block, x, context[:, tokens]), out, BLOCK,
                    f"the output with the prompt's tokens shuffled to {tokens.tolist()}", atol=1e-10, rtol=1e-8)
        check_close(run(BLOCK, what, block, x[:, positions], context), out[:, positions], BLOCK,
                    f"the output for the positions shuffled to {positions.tolist()}, against its rows shuffled",
                    atol=1e-10, rtol=1e-8)


@pytest.mark.task(BLOCK)
@pytest.mark.points(1)
def test_with_every_output_projection_zeroed_the_block_is_the_identity(monkeypatch):
    # each step adds its answer to its own input: when attn1, attn2 and ff all answer 0, x passes through untouched
    block = random_block(7, 8, 2, 6)
    with torch.no_grad():
        for layer in (block.attn1.to_out, block.attn2.to_out, block.ff.out):
            layer.weight.zero_()
            layer.bias.zero_()
    x, context = block_inputs(7, 2, 5, 4, 8, 6)
    forbid(monkeypatch, BLOCK, *FORBIDDEN_BLOCK)
    with torch.no_grad():
        out = run(BLOCK, "TransformerBlock(dim=8, heads=2, context_dim=6)", block, x, context)
    check_close(out, x, BLOCK, "the block with attn1, attn2 and ff answering 0 (it must return x: each step is "
                "x = step(norm(x)) + x)", atol=1e-12, rtol=0)


@pytest.mark.task(BLOCK)
@pytest.mark.points(2)
def test_transformer_block_gradients_pass_gradcheck_in_float64(monkeypatch):
    block = random_block(8, 4, 2, 3)
    x, context = block_inputs(8, 1, 3, 2, 4, 3)
    forbid(monkeypatch, BLOCK, *FORBIDDEN_BLOCK)
    gradcheck(BLOCK, block, (x.requires_grad_(), context.requires_grad_()),
              "TransformerBlock(dim=4, heads=2, context_dim=3) with respect to x and context")
