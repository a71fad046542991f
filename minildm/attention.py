"""Attention, softmax(q k^T / sqrt(d)) v, five ways that compute the same function (chapter 04).

The ladder, from the formula to the fast paths:

- `naive`: the formula as written. It materialises the N_q x N_k score matrix: the reference every other rung is
  tested against, and the reason Stable Diffusion runs out of memory at 512x512 and above.
- `sliced`: the same formula over slices of the queries, so only slice x N_k scores exist at once.
- `chunked`: the online softmax (Rabe & Staats 2021; Dao et al. 2022, "FlashAttention") in plain PyTorch. Keys
  and values arrive in chunks; a running max, a running sum and a running weighted sum of values are enough to get
  the exact softmax at the end, so memory is O(N) instead of O(N^2).
- `sdpa`: `torch.nn.functional.scaled_dot_product_attention`, torch's fused kernels.
- `triton`: our own flash-attention kernel in Triton (`minildm/kernels/`), imported only when asked for.

`choose_backend` picks one per device and says why; `attention(..., backend="auto")` follows it. All tensors are
(B, heads, N, d). A mask follows torch's convention: a bool mask says which keys a query may attend to (True =
attend), a float mask is added to the scores; either broadcasts to (B, heads, N_q, N_k). A query that may attend to
no key at all has no answer: naive, sliced and chunked give NaN there, as softmax over nothing does (torch's sdpa
gives 0 on the CPU), so a mask should leave every query at least one key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

BACKENDS = ("naive", "sliced", "chunked", "sdpa", "triton")
DEFAULT_MPS_BUDGET = 1 << 30        # 1 GiB of scores, when torch cannot tell how much memory the Apple GPU has
MPS_BUDGET_SHARE = 0.25             # of torch.mps.recommended_max_memory(): weights and activations need the rest
BLOCK_BYTES = 16 << 20              # the size of one block of scores that `chunked` aims for (see default_query_chunk)


def default_scale(q: Tensor, scale: float | None) -> float:
    """1 / sqrt(d) unless given: it keeps the dot products of unit-variance vectors at unit variance."""
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16 / bfloat16 inputs (exp() of a half overflows past 11.1), the input's own dtype above that."""
    return torch.promote_types(dtype, torch.float32)


def apply_mask(scores: Tensor, mask: Tensor | None) -> Tensor:
    """Masked-out keys get a score of -inf (bool mask) or the mask is added (float mask). (B, heads, N_q, N_k)"""
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask


def naive_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, mask: Tensor | None = None) -> Tensor:
    """The formula as written. Memory grows as N_q x N_k: the whole score matrix is materialised."""
    scale = default_scale(q, scale)
    # BEGIN SOLUTION ch04.naive_attention
    # S = q k^T * scale, with q scaled first: the same numbers, but a float16 q k^T cannot overflow before the scale
    scores = torch.einsum("bhqd,bhkd->bhqk", q * scale, k)            # (B, heads, N_q, N_k)
    scores = apply_mask(scores, mask)
    # P = softmax(S) over the keys; computed in float32 at least, so float16 inputs cannot overflow exp()
    weights = scores.to(softmax_dtype(scores.dtype)).softmax(dim=-1).to(v.dtype)                # (B, heads, N_q, N_k)
    # out = P v
    return torch.einsum("bhqk,bhkd->bhqd", weights, v)                  # (B, heads, N_q, d_v)
    # END SOLUTION


def sliced_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, mask: Tensor | None = None,
                     slice_size: int = 1024) -> Tensor:
    """The naive formula on `slice_size` queries at a time: each query's softmax needs only its own row of scores,
    so rows can be done in turn. Memory O(slice x N_k) instead of O(N_q x N_k); the same arithmetic, one loop."""
    mask = None if mask is None else mask.expand(*q.shape[:2], q.shape[2], k.shape[2])   # a view, no copy
    rows = [naive_attention(q[:, :, i:i + slice_size], k, v, scale,
                            None if mask is None else mask[:, :, i:i + slice_size])
            for i in range(0, q.shape[2], slice_size)]                  # each (B, heads, slice, d_v)
    return torch.cat(rows, dim=2)                                        # (B, heads, N_q, d_v)


class OnlineSoftmax(NamedTuple):
    """What the online softmax remembers about the keys seen so far, per query (float32, or float64 for float64):
    `max` m = the largest score, `sum` l = sum of exp(score - m), `acc` = sum of exp(score - m) v."""

    max: Tensor          # (B, heads, N_q, 1)
    sum: Tensor          # (B, heads, N_q, 1)
    acc: Tensor          # (B, heads, N_q, d_v)

    @classmethod
    def start(cls, like_q: Tensor, value_dim: int) -> "OnlineSoftmax":
        rows, dtype = (*like_q.shape[:-1], 1), softmax_dtype(like_q.dtype)
        return cls(like_q.new_full(rows, float("-inf"), dtype=dtype),
                   like_q.new_zeros(rows, dtype=dtype),
                   like_q.new_zeros((*like_q.shape[:-1], value_dim), dtype=dtype))

    def result(self) -> Tensor:
        """softmax(S) v = acc / l: the normalisation is done once, at the end. (B, heads, N_q, d_v)"""
        return self.acc / self.sum


def online_softmax_step(state: OnlineSoftmax, scores: Tensor, v_chunk: Tensor) -> OnlineSoftmax:
    """Fold one chunk of keys into the running softmax (Milakov & Gimelshein 2018; the heart of FlashAttention).

    When a larger score arrives, everything summed so far was exponentiated against too small a max: multiplying by
    exp(m_old - m_new) rescales it to the new max, so no score is ever exponentiated above 0 (no overflow) and the
    result is exactly softmax(S) v once all chunks are in. `scores` is (B, heads, N_q, chunk) in the state's dtype;
    it is overwritten by the weights p (one block fewer to allocate, which is most of the time on a CPU).
    """
    # BEGIN SOLUTION ch04.online_softmax
    # m_new = max(m_old, max_j s_j). The max is only a shift that cancels in acc / l, so no gradient flows through it
    new_max = torch.maximum(state.max, scores.detach().amax(dim=-1, keepdim=True))  # (B, heads, N_q, 1)
    # a row that has seen only masked keys (-inf) keeps a max of -inf; subtract 0 there so that exp gives 0, not NaN
    shift = new_max.masked_fill(new_max == float("-inf"), 0.0)
    # p_j = exp(s_j - m_new), and the correction exp(m_old - m_new) for what was summed against m_old
    p = scores.sub_(shift).exp_()                                                   # (B, heads, N_q, chunk)
    correction = torch.exp(state.max - shift)                                       # (B, heads, N_q, 1)
    # l_new = l_old * correction + sum_j p_j ;  acc_new = acc_old * correction + p v
    new_sum = state.sum * correction + p.sum(dim=-1, keepdim=True)
    new_acc = state.acc * correction + torch.matmul(p.to(v_chunk.dtype), v_chunk).to(state.acc.dtype)
    return OnlineSoftmax(new_max, new_sum, new_acc)
    # END SOLUTION


def default_query_chunk(q: Tensor, key_chunk: int) -> int:
    """Query rows per block, so that a block of scores (B x heads x rows x key_chunk, in the softmax's dtype) is about
    16 MiB. Bigger blocks mean fewer Python steps, but glibc hands every block of 32 MiB or more fresh from the
    operating system, and on a CPU those page faults cost more than the steps saved (chapter 04 measures it)."""
    bytes_per_row = q.shape[0] * q.shape[1] * key_chunk * torch.empty((), dtype=softmax_dtype(q.dtype)).element_size()
    return max(16, BLOCK_BYTES // bytes_per_row)


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, mask: Tensor | None = None,
                      query_chunk: int | None = None, key_chunk: int = 512) -> Tensor:
    """The online-softmax (flash) algorithm over key/value chunks, in plain PyTorch.

    Only a query_chunk x key_chunk block of scores exists at any time, whatever N is (by default about 16 MiB); the
    softmax is taken in float32 (at least) whatever the input dtype. This is the algorithm AUTOMATIC1111 runs on Apple
    GPUs as "sub-quadratic attention".
    """
    scale = default_scale(q, scale)
    query_chunk = query_chunk or default_query_chunk(q, key_chunk)
    n_q, n_k = q.shape[2], k.shape[2]
    mask = None if mask is None else mask.expand(*q.shape[:2], n_q, n_k)           # a view, no copy
    rows = []
    for i in range(0, n_q, query_chunk):
        q_rows = q[:, :, i:i + query_chunk] * scale                      # (B, heads, cq, d): scale once, not per key
        state = OnlineSoftmax.start(q_rows, v.shape[-1])
        for j in range(0, n_k, key_chunk):
            # S_ij = q_i k_j^T * scale, one block of the score matrix
            k_chunk = k[:, :, j:j + key_chunk]                          # (B, heads, ck, d)
            scores = torch.matmul(q_rows, k_chunk.transpose(-1, -2)).to(state.acc.dtype)      # (B, heads, cq, ck)
            scores = apply_mask(scores, None if mask is None else mask[:, :, i:i + query_chunk, j:j + key_chunk])
            state = online_softmax_step(state, scores, v[:, :, j:j + key_chunk])
            del scores                  # now the weights p: free the block before the next one is allocated
        rows.append(state.result().to(v.dtype))                          # (B, heads, cq, d_v)
    return torch.cat(rows, dim=2)                                        # (B, heads, N_q, d_v)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, mask: Tensor | None = None) -> Tensor:
    """torch's fused kernels (flash / memory-efficient on CUDA, a flash loop on the CPU): the same function."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def triton_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, mask: Tensor | None = None) -> Tensor:
    """Our flash-attention kernel (minildm/kernels/triton_flash.py); Triton is imported only here."""
    from minildm.kernels import flash_attention

    return flash_attention(q, k, v, scale=default_scale(q, scale), mask=mask)


# --------------------------------------------------------------------------------------------------- the choice

def score_matrix_bytes(batch: int, heads: int, n_q: int, n_k: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one naive score matrix, B x heads x N_q x N_k numbers. SD v1 at 512x512: 8 heads over 64 x 64 = 4096
    latent positions is 8 x 4096^2 x 4 bytes = 512 MiB per image in float32 (naive holds two such: S and P)."""
    return batch * heads * n_q * n_k * torch.empty((), dtype=dtype).element_size()


def memory_budget(device: torch.device | str) -> tuple[int, str]:
    """How many bytes of scores `auto` allows on an Apple GPU before it switches to `chunked`, and its source."""
    mps = getattr(torch, "mps", None)
    recommended = getattr(mps, "recommended_max_memory", None)
    if torch.device(device).type == "mps" and recommended is not None:
        try:
            total = int(recommended())
            return int(total * MPS_BUDGET_SHARE), f"a quarter of the {total / 2**30:.1f} GiB Metal recommends"
        except RuntimeError:                      # MPS not usable in this process: fall back to the default
            pass
    return DEFAULT_MPS_BUDGET, "the 1 GiB default (torch cannot tell this device's memory)"


@dataclass(frozen=True)
class BackendChoice:
    """The backend `auto` runs, and why, in words a reader can check."""

    backend: str
    reason: str

    def __str__(self) -> str:
        return f"{self.backend}: {self.reason}"


def choose_backend(device: torch.device | str, dtype: torch.dtype, q_shape: tuple[int, ...],
                   k_shape: tuple[int, ...], budget: int | None = None) -> BackendChoice:
    """The one place that decides which backend `auto` runs, from the device, dtype and (B, heads, N, d) sizes.

    CUDA and the CPU: sdpa, whose fused kernels never hold the score matrix. Apple's MPS: sdpa while the naive score
    matrix fits the memory budget, else chunked (sdpa on MPS materialises it); the scores are counted in float32,
    the dtype the softmax is taken in. `budget` (bytes) overrides the device's.
    """
    device = torch.device(device)
    batch, heads, n_q, _ = q_shape
    n_k = k_shape[2]
    scores = score_matrix_bytes(batch, heads, n_q, n_k, torch.float32)
    if device.type == "cuda":
        return BackendChoice("sdpa", "CUDA: torch's fused flash / memory-efficient kernels, O(N) memory "
                                     "(backend='triton' runs ours)")
    if device.type == "mps":
        limit, source = (budget, "the budget given") if budget is not None else memory_budget(device)
        size = f"the {scores / 2**20:,.1f} MiB naive score matrix ({batch}x{heads}x{n_q}x{n_k} float32)"
        if scores > limit:
            return BackendChoice("chunked", f"MPS: {size} exceeds {limit / 2**20:,.0f} MiB, {source}; "
                                            "the online softmax needs O(N) memory")
        return BackendChoice("sdpa", f"MPS: {size} fits in {limit / 2**20:,.0f} MiB, {source}")
    return BackendChoice("sdpa", f"{device.type.upper()}: torch's fused kernel is the fastest here and never holds "
                                 f"the score matrix ({dtype} inputs)")


# ------------------------------------------------------------------------------------------------ the entrance

def check_inputs(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> None:
    """The user's tensors, checked where they enter: a one-line error that says what was expected."""
    shapes = f"q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects (B, heads, N, d) tensors, got {shapes}; split heads first, e.g. "
                         "rearrange(x, 'b n (h d) -> b h n d', h=heads)")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"batch and head counts must match (and k, v must have the same N), got {shapes}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dim d to take q k^T, got {q.shape[-1]} and {k.shape[-1]} "
                         f"({shapes})")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"attention needs at least one query and one key, got {shapes}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share a dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on "
                         f"{q.device}/{k.device}/{v.device}")
    if mask is None:
        return
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    try:
        fits = torch.broadcast_shapes(mask.shape, target) == target
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to (B, heads, N_q, N_k) = {target}; "
                         f"use (B, 1, 1, N_k) to hide keys, or (N_q, N_k) for one pattern for all")
    if mask.dtype != torch.bool and mask.dtype != q.dtype:
        raise ValueError(f"a mask is either bool (True = attend) or a float mask of q's dtype {q.dtype} added to the "
                         f"scores, got {mask.dtype}; convert it with mask.bool() or mask.to(q.dtype)")
    if mask.device != q.device:
        raise ValueError(f"the mask is on {mask.device} but q, k, v are on {q.device}; move it with mask.to(q.device)")


def attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "auto", *, scale: float | None = None,
              mask: Tensor | None = None, slice_size: int = 1024, query_chunk: int | None = None,
              key_chunk: int = 512) -> Tensor:
    """softmax(q k^T * scale + mask) v over (B, heads, N, d) tensors -> (B, heads, N_q, d_v).

    `backend` is one of "auto" (choose_backend's pick), "naive", "sliced", "chunked", "sdpa" or "triton"; the
    chunk sizes tune `sliced` and `chunked` and change nothing but memory and speed (query_chunk=None: rows for
    a block of about 16 MiB).
    """
    check_inputs(q, k, v, mask)
    for name, size in (("slice_size", slice_size), ("query_chunk", query_chunk), ("key_chunk", key_chunk)):
        if size is None and name == "query_chunk":
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive whole number of rows, got {size!r}; try 1024")
    if backend == "auto":
        backend = choose_backend(q.device, q.dtype, q.shape, k.shape).backend
    if backend == "naive":
        return naive_attention(q, k, v, scale, mask)
    if backend == "sliced":
        return sliced_attention(q, k, v, scale, mask, slice_size=slice_size)
    if backend == "chunked":
        return chunked_attention(q, k, v, scale, mask, query_chunk=query_chunk, key_chunk=key_chunk)
    if backend == "sdpa":
        return sdpa_attention(q, k, v, scale, mask)
    if backend == "triton":
        return triton_attention(q, k, v, scale, mask)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(('auto',) + BACKENDS)} "
                     "('auto' picks the best for this device)")


# ------------------------------------------------------------------------------------------------ the layer

class MultiHeadAttention(nn.Module):
    """Project to queries, keys and values, split the channels into heads, attend, merge, project back.

    Self-attention when no context is given (keys and values come from x itself); cross-attention when it is (the
    U-Net's latent positions read the prompt's tokens). The projections and their names are diffusers' `Attention`
    (to_q, to_k, to_v without bias, to_out with bias), so real Stable Diffusion weights load by a rename.
    """

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None,
                 qkv_bias: bool = False):
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, query_dim)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        context = x if context is None else context                               # (B, N_k, D_context)
        # (B, N, heads * d) -> (B, heads, N, d): each head attends on its own slice of the channels
        q, k, v = (rearrange(proj(source), "b n (h d) -> b h n d", h=self.heads)
                   for proj, source in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        out = attention(q, k, v, mask=mask)                                       # (B, heads, N_q, d)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))                # (B, N_q, query_dim)
