"""Our flash-attention forward kernel in Triton (Dao et al. 2022, "FlashAttention"; chapter 04).

The same online softmax as `minildm.attention.chunked_attention`, one level down: each Triton *program* owns
BLOCK_M query rows of one (batch, head). It loads its block of q once, then walks over the keys and values in
blocks of BLOCK_N, keeping the running max m, the running sum l and the float32 accumulator acc in registers. The
BLOCK_M x BLOCK_N block of scores never leaves the chip: memory traffic is O(N) reads of k and v per query block,
and the N_q x N_k score matrix is never written anywhere.

Two tricks the reader should notice:

- exp2 instead of exp: e^x = 2^(x log2 e). Folding log2(e) into the scale (qk_scale = scale * log2 e) makes every
  score a base-2 logit, so the kernel calls exp2, which GPUs compute in one instruction; the softmax is unchanged
  because the factor cancels in 2^(s - m) / sum 2^(s - m).
- Everything is padded: N up to a multiple of the block, d and d_v up to a power of two (Stable Diffusion uses
  d = 40, 80, 160). Loads read 0 outside the tensor and scores of keys past N_k are set to -inf.

Triton chooses between compiling and interpreting when `@triton.jit` runs: for this module when it is imported, and
for Triton's own library (tl.zeros, tl.max and tl.sum are @triton.jit functions too) when triton is. Start Python
with TRITON_INTERPRET=1 and the kernel runs, slowly, on the CPU. The backward pass recomputes through
`chunked_attention`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from minildm.attention import check_inputs, chunked_attention, default_scale

LOG2E = tl.constexpr(1.4426950408889634)          # log2(e): e^x = 2^(x * LOG2E)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def load_tile(base, rows, cols, stride_row, stride_col, n_rows, n_cols, other):
    """A (rows x cols) tile of a matrix laid out by its strides. Entries outside n_rows x n_cols read as `other`
    (0 for q, k, v): that is how a block hanging over the end of N, or a head dim padded to a power of two, stays
    harmless."""
    pointers = base + rows[:, None] * stride_row + cols[None, :] * stride_col      # (len(rows), len(cols))
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)                   # (len(rows), len(cols))
    return tl.load(pointers, mask=inside, other=other)


@triton.jit
def online_softmax_step(m, l, acc, scores, v):
    """Fold one block of keys into the running softmax: the kernel's twin of `attention.online_softmax_step`.

    The scores are base-2 logits (log2 e is folded into the scale), so 2^x replaces e^x; m, l and acc are float32.
    """
    # m_new = max(m_old, max_j s_j)
    m_new = tl.maximum(m, tl.max(scores, axis=1))                                  # (BLOCK_M,)
    # a row that has seen only masked keys keeps m = -inf: shift by 0 there, so 2^(-inf - -inf) cannot give NaN
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)                           # (BLOCK_M,)
    # p_j = 2^(s_j - m_new), and the correction 2^(m_old - m_new) for what was summed against m_old
    p = tl.exp2(scores - shift[:, None])                                           # (BLOCK_M, BLOCK_N)
    correction = tl.exp2(m - shift)                                                # (BLOCK_M,)
    # l_new = l_old * correction + sum_j p_j
    l = l * correction + tl.sum(p, axis=1)                                         # (BLOCK_M,)
    # acc_new = acc_old * correction + p v: p goes to v's dtype for the tensor cores, the sum stays float32
    acc = acc * correction[:, None]                                                # (BLOCK_M, BLOCK_DV)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")                   # (BLOCK_M, BLOCK_DV)
    return m_new, l, acc


@triton.jit
def flash_attention_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr,                  # where each tensor starts
        stride_qb, stride_qh, stride_qn, stride_qd,              # q (B, heads, N_q, d), strides in elements
        stride_kb, stride_kh, stride_kn, stride_kd,              # k (B, heads, N_k, d)
        stride_vb, stride_vh, stride_vn, stride_vd,              # v (B, heads, N_k, d_v)
        stride_mb, stride_mh, stride_mq, stride_mk,              # mask (B, heads, N_q, N_k): 0 where it broadcasts
        stride_ob, stride_oh, stride_on, stride_od,              # out (B, heads, N_q, d_v)
        heads, n_q, n_k, d, d_v, qk_scale,                       # qk_scale = scale * log2(e)
        HAS_MASK: tl.constexpr, IS_BOOL: tl.constexpr,           # no mask / a bool (as bytes) / an additive mask
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,            # query rows per program, keys per loop step
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):          # d and d_v, padded to powers of two
    """out[b, h, rows] = softmax(q k^T * scale + mask) v for BLOCK_M query rows of one (batch, head).

    The grid is (cdiv(N_q, BLOCK_M), B * heads): axis 0 says which rows, axis 1 which (batch, head).
    """
    row_block, batch_head = tl.program_id(0), tl.program_id(1)
    # int64 before multiplying by a stride: B * heads * N * d can pass 2^31 elements
    b, h = (batch_head // heads).to(tl.int64), (batch_head % heads).to(tl.int64)
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)                             # (BLOCK_M,) query indices
    dims, dims_v = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)                   # (BLOCK_D,), (BLOCK_DV,)
    q_ptr += b * stride_qb + h * stride_qh                                         # this (batch, head)'s q ...
    k_ptr += b * stride_kb + h * stride_kh
    v_ptr += b * stride_vb + h * stride_vh
    mask_ptr += b * stride_mb + h * stride_mh
    out_ptr += b * stride_ob + h * stride_oh

    # q_i * scale * log2(e): loaded once, scaled once (in float32), kept in registers for the whole loop
    q = load_tile(q_ptr, rows, dims, stride_qn, stride_qd, n_q, d, 0.0)            # (BLOCK_M, BLOCK_D)
    q = (q.to(tl.float32) * qk_scale).to(q_ptr.dtype.element_ty)
    # the running softmax: m = -inf (no key seen yet), l = 0, acc = 0
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)                       # (BLOCK_M,)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)                                     # (BLOCK_M,)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)                          # (BLOCK_M, BLOCK_DV)

    for start in range(0, n_k, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)                                       # (BLOCK_N,) key indices
        # k^T read straight from memory by swapping the roles of its strides: no transpose is ever stored
        k_t = load_tile(k_ptr, dims, cols, stride_kd, stride_kn, d, n_k, 0.0)      # (BLOCK_D, BLOCK_N)
        v = load_tile(v_ptr, cols, dims_v, stride_vn, stride_vd, n_k, d_v, 0.0)    # (BLOCK_N, BLOCK_DV)
        # S_ij = q_i k_j^T * scale * log2(e), accumulated in float32 ("ieee": no TF32 rounding for float32 inputs)
        scores = tl.dot(q, k_t, input_precision="ieee")                            # (BLOCK_M, BLOCK_N)
        if HAS_MASK and IS_BOOL:
            # a masked-out key scores -inf: 2^-inf = 0, it gets no weight (rows past N_q read 1, "attend", not 0/0)
            keep = load_tile(mask_ptr, rows, cols, stride_mq, stride_mk, n_q, n_k, 1)  # (BLOCK_M, BLOCK_N)
            scores = tl.where(keep != 0, scores, float("-inf"))
        elif HAS_MASK:
            # S + mask, in base-2 units like the scores
            bias = load_tile(mask_ptr, rows, cols, stride_mq, stride_mk, n_q, n_k, 0.0)  # (BLOCK_M, BLOCK_N)
            scores += bias.to(tl.float32) * LOG2E
        # keys past N_k (the last block overhangs) are not keys at all
        scores = tl.where(cols[None, :] < n_k, scores, float("-inf"))
        m, l, acc = online_softmax_step(m, l, acc, scores, v)

    # out = acc / l: the softmax is normalised once, at the end (a row with no key to attend to gives 0 / 0 = NaN)
    out = acc / l[:, None]                                                         # (BLOCK_M, BLOCK_DV)
    pointers = out_ptr + rows[:, None] * stride_on + dims_v[None, :] * stride_od
    tl.store(pointers, out.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < n_q) & (dims_v[None, :] < d_v))


# True when TRITON_INTERPRET=1 was set at import: @triton.jit then made an interpreted function, not a compiled one
INTERPRETED = not isinstance(flash_attention_kernel, triton.runtime.JITFunction)


def block_sizes(head_dim: int, dtype: torch.dtype, interpreted: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) to start from. On a GPU, 64 x 64 for 2-byte dtypes; float32 blocks of k and v take twice
    the shared memory, so BLOCK_N = 32; heads wider than 128 (SD's d = 160 pads to 256) halve BLOCK_M, since the
    float32 accumulator, BLOCK_M x BLOCK_DV, lives in registers. `launch` shrinks the blocks further on GPUs with
    little shared memory. In the interpreter a block is one numpy call: bigger is faster."""
    if interpreted:
        return 64, 64
    return (64 if head_dim <= 128 else 32), (64 if dtype.itemsize == 2 else 32)


def launch(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, mask: Tensor | None = None,
           block_m: int | None = None, block_n: int | None = None) -> Tensor:
    """Check and prepare the arguments, then run `flash_attention_kernel` over (cdiv(N_q, BLOCK_M), B * heads).

    Any strides work, so rearranged views need no copy; a mask is expanded to (B, heads, N_q, N_k) as a view, with
    stride 0 along the dimensions it broadcasts over, and a bool mask is read as bytes (True = 1 = attend).
    """
    check_inputs(q, k, v, mask)
    if q.dtype not in DTYPES:
        raise ValueError(f"the triton kernel takes float16, bfloat16 or float32 tensors, got {q.dtype}; "
                         "use backend='chunked' or 'naive' for other dtypes")
    batch, heads, n_q, d = q.shape
    n_k, d_v = k.shape[2], v.shape[3]
    out = torch.empty((batch, heads, n_q, d_v), dtype=q.dtype, device=q.device)    # (B, heads, N_q, d_v)
    has_mask, is_bool = mask is not None, mask is not None and mask.dtype == torch.bool
    if mask is None:
        mask, mask_strides = out, (0, 0, 0, 0)            # never read (HAS_MASK=False): any pointer will do
    else:
        if is_bool:
            mask = mask.view(torch.uint8)                 # the same bytes, as numbers: 1 = attend, 0 = hide
        mask = mask.expand(batch, heads, n_q, n_k)        # a view, no copy: stride 0 where it broadcasts
        mask_strides = mask.stride()
    block_d, block_dv = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(d_v))
    default_m, default_n = block_sizes(max(block_d, block_dv), q.dtype, INTERPRETED)
    block_m, block_n = block_m or default_m, block_n or default_n
    if min(block_m, block_n) < 16 or block_m & (block_m - 1) or block_n & (block_n - 1):
        raise ValueError(f"block sizes must be powers of two >= 16 (tl.dot needs 16), got {block_m} x {block_n}")
    while True:
        try:
            flash_attention_kernel[(triton.cdiv(n_q, block_m), batch * heads)](
                q, k, v, mask, out,
                *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
                heads, n_q, n_k, d, d_v, default_scale(q, scale) * math.log2(math.e),
                HAS_MASK=has_mask, IS_BOOL=is_bool,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv)
            return out
        except triton.runtime.OutOfResources:
            # the k and v blocks need more shared memory than this GPU has (a T4 has 64 KiB): halve them and retry
            if max(block_m, block_n) == 16:
                raise
            block_m, block_n = (block_m, block_n // 2) if block_n > 16 else (block_m // 2, block_n)


class FlashAttention(torch.autograd.Function):
    """Forward: our kernel. Backward: recompute the same function through `chunked_attention` and differentiate
    that, which is exact (it is the same function) and O(N) in memory, though slower than a backward kernel."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float | None, mask: Tensor | None,
                block_m: int | None = None, block_n: int | None = None) -> Tensor:
        ctx.save_for_backward(q, k, v, mask)
        ctx.scale = scale
        return launch(q, k, v, scale, mask, block_m, block_n)                      # (B, heads, N_q, d_v)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, mask = ctx.saved_tensors
        wanted = ctx.needs_input_grad[:3]
        if not any(wanted):                               # only the mask asked: it gets none
            return None, None, None, None, None, None, None
        with torch.enable_grad():
            inputs = [x.detach().requires_grad_(need) for x, need in zip((q, k, v), wanted)]
            out = chunked_attention(*inputs, scale=ctx.scale, mask=mask)           # (B, heads, N_q, d_v)
            grads = iter(torch.autograd.grad(out, [x for x in inputs if x.requires_grad], grad_out))
        dq, dk, dv = (next(grads) if need else None for need in wanted)
        # no gradient for the scale, the mask (a mask is a choice, not a parameter) or the block sizes
        return dq, dk, dv, None, None, None, None
