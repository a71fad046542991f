"""Attention, softmax(q k^T / sqrt(d)) v, written out, plus the fused PyTorch kernel that computes the same thing.

Chapter 04 builds the full ladder (sliced, chunked online-softmax, a Triton kernel) and the rule that picks one per
device. This file starts with the two rungs the VAE already needs: `naive`, the formula exactly as written, which is
the reference every faster path is tested against, and `sdpa`, torch's fused kernel, the default.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("naive", "sdpa")


def naive_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """The formula as written. Memory grows as N_q x N_k: the whole score matrix is materialised."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    # S = q k^T * scale
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale            # (B, heads, N_q, N_k)
    # P = softmax(S) over the keys; computed in float32 so float16 inputs cannot overflow exp()
    weights = scores.float().softmax(dim=-1).to(v.dtype)                # (B, heads, N_q, N_k)
    # out = P v
    return torch.einsum("bhqk,bhkd->bhqd", weights, v)                  # (B, heads, N_q, d)


def attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "auto", *, scale: float | None = None) -> Tensor:
    """Attention over (B, heads, N, d) tensors with the backend of your choice ("auto" = sdpa)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects (B, heads, N, d) tensors, got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if backend == "auto":
        backend = "sdpa"
    if backend == "naive":
        return naive_attention(q, k, v, scale)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(('auto',) + BACKENDS)}")
