"""Chapter 04 exercises: attention as written (naive_attention) and one step of the online softmax.

Each test carries its task and points (`minildm grade` adds them up). Inputs are random over several seeds and
shapes (self- and cross-attention, head dims that are not powers of two, masks); the expected values are computed
here in float64 from the definition softmax(q k^T * scale + mask) v, never through the package. The properties the
chapter states are checked: half-precision inputs with large logits stay finite (the softmax is taken in float32),
folding the keys in chunks of any size and order gives exactly the softmax, and a chunk of masked keys changes
nothing. Neither task may hand the work to torch's fused kernel, to another backend or to diffusers.
"""

from __future__ import annotations

import math

import pytest
import torch
from taskcheck import check_close, fail, forbid

from minildm import attention as attn

NAIVE = "ch04.naive_attention"
ONLINE = "ch04.online_softmax"

FUSED = ("torch.nn.functional:scaled_dot_product_attention", "torch._C._nn:scaled_dot_product_attention",
         "diffusers.models.attention_processor:Attention")
FORBIDDEN_NAIVE = FUSED + ("minildm.attention:chunked_attention", "minildm.attention:online_softmax_step",
                           "minildm.attention:sdpa_attention", "minildm.attention:triton_attention")
FORBIDDEN_ONLINE = FUSED + ("minildm.attention:naive_attention", "minildm.attention:sliced_attention",
                            "minildm.attention:sdpa_attention", "minildm.attention:triton_attention")


def draw(seed: int, batch: int, heads: int, n_q: int, n_k: int, d: int, d_v: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, heads, n, d, generator=g, dtype=torch.float64).to(dtype) for n in (n_q, n_k))
    v = torch.randn(batch, heads, n_k, d_v, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def key_mask(seed: int, batch: int, n_q: int, n_k: int, kind: str):
    """None, a bool mask that keeps at least one key per query, or an additive float mask."""
    g = torch.Generator().manual_seed(seed + 1000)
    if kind == "none":
        return None
    if kind == "bool":
        keep = torch.rand(batch, 1, n_q, n_k, generator=g) > 0.4
        keep[..., 0] = True                                          # every query sees at least one key
        return keep
    return torch.randn(n_q, n_k, generator=g, dtype=torch.float64)  # (N_q, N_k), broadcast over batch and heads


def by_definition(q, k, v, scale: float, mask=None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v in float64, written out from the definition."""
    scores = q.double() @ k.double().transpose(-1, -2) * scale                  # (B, heads, N_q, N_k)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask.double()
    weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    return (weights / weights.sum(dim=-1, keepdim=True)) @ v.double()          # (B, heads, N_q, d_v)


# -------------------------------------------------------------------------------------- ch04.naive_attention

NAIVE_CASES = [  # seed, B, heads, N_q, N_k, d, d_v, mask
    (0, 1, 1, 5, 5, 4, 4, "none"),
    (1, 2, 3, 17, 17, 40, 40, "none"),
    (2, 2, 2, 9, 77, 8, 8, "none"),           # cross-attention: 9 latent positions read 77 text tokens
    (3, 3, 4, 12, 7, 16, 6, "bool"),
    (4, 2, 1, 10, 13, 5, 5, "float"),
]


@pytest.mark.task(NAIVE)
@pytest.mark.points(4)
@pytest.mark.parametrize("seed, batch, heads, n_q, n_k, d, d_v, mask_kind", NAIVE_CASES)
def test_naive_attention_is_softmax_of_the_scaled_scores_times_v(monkeypatch, seed, batch, heads, n_q, n_k, d, d_v,
                                                                 mask_kind):
    q, k, v = draw(seed, batch, heads, n_q, n_k, d, d_v)
    mask = key_mask(seed, batch, n_q, n_k, mask_kind)
    scale = 1 / math.sqrt(d)
    forbid(monkeypatch, NAIVE, *FORBIDDEN_NAIVE)
    out = attn.naive_attention(q, k, v, scale, mask)
    check_close(out, by_definition(q, k, v, scale, mask), NAIVE,
                f"naive_attention of q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} with mask={mask_kind}",
                atol=1e-12, rtol=1e-10, dtype=torch.float64)


@pytest.mark.task(NAIVE)
@pytest.mark.points(1)
def test_naive_attention_uses_the_scale_it_is_given_and_one_over_sqrt_d_by_default(monkeypatch):
    q, k, v = draw(5, 2, 2, 6, 8, 9, 3)
    forbid(monkeypatch, NAIVE, *FORBIDDEN_NAIVE)
    check_close(attn.naive_attention(q, k, v), by_definition(q, k, v, 1 / 3), NAIVE,
                "naive_attention with scale=None (d = 9, so the scale is 1/3)", atol=1e-12, rtol=1e-10)
    check_close(attn.naive_attention(q, k, v, 0.75), by_definition(q, k, v, 0.75), NAIVE,
                "naive_attention with scale=0.75", atol=1e-12, rtol=1e-10)


@pytest.mark.task(NAIVE)
@pytest.mark.points(2)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_naive_attention_in_half_precision_with_large_logits_stays_finite(monkeypatch, dtype):
    # scores up to ~ 300: exp(300) overflows float16 (max 65504) and, without subtracting the max, float32 too
    q, k, v = draw(6, 1, 2, 8, 8, 16, 16)
    q, k, v = (q * 5).to(dtype), (k * 5).to(dtype), v.to(dtype)
    forbid(monkeypatch, NAIVE, *FORBIDDEN_NAIVE)
    out = attn.naive_attention(q, k, v, 1.0)
    expected = by_definition(q, k, v, 1.0)                 # from the same rounded inputs, in float64
    if isinstance(out, torch.Tensor) and not torch.isfinite(out).all():
        biggest = float((q.double() @ k.double().mT).abs().max())
        fail(NAIVE, f"naive_attention in {dtype} with scores up to {biggest:.0f}"
                    f" gave {int((~torch.isfinite(out)).sum())} non-finite values; take the softmax in float32")
    # half precision keeps ~3 significant digits: the scores are rounded before the softmax sees them
    check_close(out, expected, NAIVE, f"naive_attention in {dtype} with large logits", atol=0.05, rtol=0.02,
                dtype=dtype)


@pytest.mark.task(NAIVE)
@pytest.mark.points(1)
def test_naive_attention_passes_gradients_to_q_k_and_v(monkeypatch):
    q, k, v = draw(7, 1, 2, 4, 5, 3, 2)
    mask = key_mask(7, 1, 4, 5, "bool")
    inputs = tuple(t.clone().requires_grad_(True) for t in (q, k, v))
    forbid(monkeypatch, NAIVE, *FORBIDDEN_NAIVE)
    out = attn.naive_attention(*inputs, 0.5, mask)
    if not isinstance(out, torch.Tensor) or out.grad_fn is None:
        fail(NAIVE, "naive_attention's output has no gradient: build it from q, k and v with differentiable ops")
    reference = tuple(t.clone().requires_grad_(True) for t in (q, k, v))
    expected_grads = torch.autograd.grad(by_definition(*reference, 0.5, mask).sum(), reference)
    grads = torch.autograd.grad(out.sum(), inputs)
    for name, got, want in zip("qkv", grads, expected_grads):
        check_close(got, want, NAIVE, f"d sum(attention) / d {name}", atol=1e-10, rtol=1e-8)


# -------------------------------------------------------------------------------------- ch04.online_softmax


def fold(scores: torch.Tensor, v: torch.Tensor, bounds: list[tuple[int, int]]) -> attn.OnlineSoftmax:
    """Feed the key chunks [a, b) in the given order through online_softmax_step."""
    state = attn.OnlineSoftmax.start(scores[..., :1], v.shape[-1])          # (B, heads, N_q, 1) says the rows
    for a, b in bounds:
        state = attn.online_softmax_step(state, scores[..., a:b].clone(), v[:, :, a:b])
        if not isinstance(state, attn.OnlineSoftmax):
            fail(ONLINE, f"online_softmax_step must return an OnlineSoftmax(max, sum, acc), got {type(state).__name__}")
    return state


def chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, n)) for a in range(0, n, size)]


ONLINE_CASES = [  # seed, B, heads, N_q, N_k, d_v, chunk size
    (0, 1, 1, 3, 8, 2, 3),
    (1, 2, 3, 5, 20, 4, 7),
    (2, 1, 2, 4, 9, 5, 1),        # one key at a time
    (3, 2, 1, 6, 16, 3, 16),      # one chunk: the plain softmax
]


@pytest.mark.task(ONLINE)
@pytest.mark.points(4)
@pytest.mark.parametrize("seed, batch, heads, n_q, n_k, d_v, size", ONLINE_CASES)
def test_folding_the_keys_in_chunks_gives_exactly_softmax_times_v(monkeypatch, seed, batch, heads, n_q, n_k, d_v,
                                                                  size):
    g = torch.Generator().manual_seed(seed)
    scores = 3 * torch.randn(batch, heads, n_q, n_k, generator=g, dtype=torch.float64)
    v = torch.randn(batch, heads, n_k, d_v, generator=g, dtype=torch.float64)
    forbid(monkeypatch, ONLINE, *FORBIDDEN_ONLINE)
    state = fold(scores, v, chunks(n_k, size))
    row_max = scores.amax(dim=-1, keepdim=True)
    check_close(state.max, row_max, ONLINE, f"the running max after all {n_k} keys (chunks of {size})", atol=0)
    check_close(state.sum, torch.exp(scores - row_max).sum(dim=-1, keepdim=True), ONLINE,
                f"the running sum l = sum exp(s - m) after all {n_k} keys (chunks of {size})", atol=1e-12, rtol=1e-12)
    check_close(state.result(), torch.softmax(scores, dim=-1) @ v, ONLINE,
                f"acc / l after all {n_k} keys in chunks of {size}", atol=1e-12, rtol=1e-10, dtype=torch.float64)


@pytest.mark.task(ONLINE)
@pytest.mark.points(2)
@pytest.mark.parametrize("seed", [4, 5])
def test_the_order_of_the_chunks_does_not_matter(monkeypatch, seed):
    g = torch.Generator().manual_seed(seed)
    scores = 4 * torch.randn(2, 2, 5, 23, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 23, 3, generator=g, dtype=torch.float64)
    bounds = chunks(23, 5)
    shuffled = [bounds[i] for i in torch.randperm(len(bounds), generator=g).tolist()]
    forbid(monkeypatch, ONLINE, *FORBIDDEN_ONLINE)
    check_close(fold(scores, v, shuffled).result(), torch.softmax(scores, dim=-1) @ v, ONLINE,
                f"acc / l with the chunks in the order {shuffled}", atol=1e-12, rtol=1e-10)


@pytest.mark.task(ONLINE)
@pytest.mark.points(2)
def test_huge_scores_never_overflow_because_each_exp_is_taken_below_the_running_max(monkeypatch):
    # scores in the thousands, rising chunk by chunk: exp(s) alone is inf even in float64 past ~710
    g = torch.Generator().manual_seed(6)
    scores = 1000 * torch.randn(1, 2, 4, 12, generator=g, dtype=torch.float64) + torch.arange(12) * 300.0
    v = torch.randn(1, 2, 12, 3, generator=g, dtype=torch.float64)
    forbid(monkeypatch, ONLINE, *FORBIDDEN_ONLINE)
    state = fold(scores, v, chunks(12, 4))
    for name in ("max", "sum", "acc"):
        value = getattr(state, name)
        if not torch.isfinite(value).all():
            fail(ONLINE, f"with scores up to {float(scores.max()):.0f} the running {name} became non-finite: "
                         "exponentiate s - m_new, never s itself")
    check_close(state.result(), torch.softmax(scores, dim=-1) @ v, ONLINE, "acc / l with scores in the thousands",
                atol=1e-12, rtol=1e-10)


@pytest.mark.task(ONLINE)
@pytest.mark.points(2)
def test_a_chunk_of_masked_keys_changes_nothing_and_makes_no_nan(monkeypatch):
    g = torch.Generator().manual_seed(7)
    scores = torch.randn(2, 1, 3, 12, generator=g, dtype=torch.float64)
    v = torch.randn(2, 1, 12, 4, generator=g, dtype=torch.float64)
    masked = scores.clone()
    masked[..., :4] = -math.inf                       # the first chunk: every key hidden (a padded prompt, say)
    masked[..., 8:] = -math.inf                       # and the last one
    forbid(monkeypatch, ONLINE, *FORBIDDEN_ONLINE)
    state = fold(masked, v, chunks(12, 4))
    if not all(torch.isfinite(getattr(state, n)).all() for n in ("sum", "acc")):
        fail(ONLINE, "after a chunk whose keys are all masked (-inf) the running sum or acc is NaN: where m_new is "
                     "still -inf, subtract 0 instead, so that exp(-inf) = 0")
    check_close(state.result(), torch.softmax(scores[..., 4:8], dim=-1) @ v[:, :, 4:8], ONLINE,
                "acc / l when only keys 4..7 of 12 are visible", atol=1e-12, rtol=1e-10)


@pytest.mark.task(ONLINE)
@pytest.mark.points(1)
def test_the_state_keeps_float32_for_half_precision_values(monkeypatch):
    g = torch.Generator().manual_seed(8)
    scores = 30 * torch.randn(1, 2, 4, 10, generator=g)                        # float32: the step's input dtype
    v = torch.randn(1, 2, 10, 8, generator=g).half()
    forbid(monkeypatch, ONLINE, *FORBIDDEN_ONLINE)
    state = fold(scores, v, chunks(10, 3))
    if state.acc.dtype != torch.float32 or state.sum.dtype != torch.float32:
        fail(ONLINE, f"the running sum and acc are {state.sum.dtype} and {state.acc.dtype} for float32 scores and "
                     "float16 values; keep them in the state's dtype (float32)")
    check_close(state.result(), torch.softmax(scores.double(), -1) @ v.double(), ONLINE,
                "acc / l with float16 values (the weights meet v in float16, so ~3 digits)", atol=5e-3, rtol=5e-3)
