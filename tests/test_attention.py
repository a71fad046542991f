"""The attention ladder of chapter 04: every rung computes softmax(q k^T * scale + mask) v, and these tests hold
each one to `naive_attention`, the formula as written.

First the outputs (float32 over a grid of shapes and masks, then float16 / bfloat16 against the formula in
float64), then the gradients, then the online softmax on its own (chunks of any size, in any order, masked
chunks), large logits, the memory arithmetic and the backend choice, and the errors a user can cause. The Triton
kernel has its own file (test_attention_triton.py).
"""

from __future__ import annotations

import random

import pytest
import torch

import minildm.attention as attention_module
from minildm.attention import (
    BACKENDS,
    DEFAULT_MPS_BUDGET,
    BackendChoice,
    OnlineSoftmax,
    attention,
    choose_backend,
    memory_budget,
    naive_attention,
    online_softmax_step,
    score_matrix_bytes,
)

FAST_PATHS = ("sliced", "chunked", "sdpa")
# small enough that every loop runs several times and ends on a ragged chunk: 50 queries = 16+16+16+2 slices,
# 32+18 query chunks; 77 keys = 4 x 17 + 9
SMALL_CHUNKS = dict(slice_size=16, query_chunk=32, key_chunk=17)
MASKS = ("none", "bool", "float", "key_padding", "2d")
MiB = 2**20


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float, rtol: float = 0.0,
                 equal_nan: bool = False) -> None:
    """Equal shapes, and |actual - expected| <= atol + rtol |expected| everywhere (NaN == NaN only if asked)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    actual, expected = actual.double(), expected.double()
    close = torch.isclose(actual, expected, atol=atol, rtol=rtol, equal_nan=equal_nan)
    if not close.all():
        error = (actual - expected).abs()
        rel = error / expected.abs().clamp_min(1e-300)
        where = tuple(int(i) for i in (~close).nonzero()[0])
        finite = ~close & actual.isfinite() & expected.isfinite()
        errors = (f"max abs error {error[finite].max():.3g}, max rel error {rel[finite].max():.3g}" if finite.any()
                  else "no finite pair differs")
        raise AssertionError(f"{what}: {int((~close).sum())} of {actual.numel()} values differ (atol {atol:.3g}, "
                             f"rtol {rtol:.3g}), {int((~close & ~actual.isfinite()).sum())} of them non-finite; "
                             f"{errors}; first at {where}: {actual[where].item()!r} vs {expected[where].item()!r}")


pytestmark = pytest.mark.usefixtures("one_thread")      # tests/conftest.py: tiny tensors, one thread


def random_qkv(seed: int, batch: int, heads: int, n_q: int, n_k: int, d: int, d_v: int,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit-variance q, k, v of shapes (B, heads, N_q, d), (B, heads, N_k, d), (B, heads, N_k, d_v)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, n_q, d, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(batch, heads, n_k, d, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(batch, heads, n_k, d_v, generator=g, dtype=torch.float64).to(dtype))


def make_mask(kind: str, batch: int, heads: int, n_q: int, n_k: int, dtype: torch.dtype = torch.float32,
              seed: int = 0) -> torch.Tensor | None:
    """One mask of each kind a caller passes. Every query keeps at least one key (the last one, or key 0)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind in ("bool", "float"):
        keep = torch.rand(batch, heads, n_q, n_k, generator=g) < 0.6             # (B, heads, N_q, N_k)
        # every third query also hides its first half of the keys: whole key chunks masked out, so chunked
        # meets rows whose running max is still -inf after a chunk
        keep[:, :, ::3, : n_k // 2] = False
        keep[..., -1] = True
        if kind == "bool":
            return keep
        bias = 2 * torch.randn(batch, heads, n_q, n_k, generator=g, dtype=torch.float64)
        return bias.masked_fill(~keep, float("-inf")).to(dtype)                  # additive, -inf = hidden
    if kind == "key_padding":
        # item b of the batch has n_k - 7 b real tokens and padding after them, as a batch of captions does
        lengths = torch.tensor([max(n_k - 7 * b, 1) for b in range(batch)])
        return (torch.arange(n_k) < lengths.view(-1, 1)).view(batch, 1, 1, n_k)  # (B, 1, 1, N_k)
    if kind == "2d":
        # causal, stretched to N_k keys: query i sees key j iff j / N_k <= i / N_q (query 0 sees key 0 only)
        i, j = torch.arange(n_q).view(-1, 1), torch.arange(n_k).view(1, -1)
        return j * n_q <= i * n_k                                                # (N_q, N_k)
    raise ValueError(kind)


def as_float64(mask: torch.Tensor | None) -> torch.Tensor | None:
    return mask if mask is None or mask.dtype == torch.bool else mask.double()


# ------------------------------------------------------------------------------------ outputs equal naive's


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("n_q, n_k", [(50, 50), (50, 77)], ids=["self", "cross77"])
@pytest.mark.parametrize("d, d_v", [(8, 8), (40, 24), (8, 40)], ids=["d8", "d40-dv24", "d8-dv40"])
@pytest.mark.parametrize("batch, heads", [(1, 1), (3, 4)], ids=["B1-h1", "B3-h4"])
@pytest.mark.parametrize("backend", FAST_PATHS)
def test_sliced_chunked_and_sdpa_equal_naive_in_float32(backend, batch, heads, d, d_v, n_q, n_k, mask_kind):
    q, k, v = random_qkv(batch + 10 * heads + d, batch, heads, n_q, n_k, d, d_v)
    mask = make_mask(mask_kind, batch, heads, n_q, n_k)
    expected = naive_attention(q, k, v, mask=mask)
    actual = attention(q, k, v, backend=backend, mask=mask, **SMALL_CHUNKS)
    assert actual.dtype == torch.float32, actual.dtype
    # an output row is a weighted average of rows of v, so errors are measured in units of max |v|
    assert_close(actual, expected, f"{backend} vs naive, q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}, "
                 f"mask {mask_kind}", atol=1e-5 * v.abs().max().item())


@pytest.mark.parametrize("backend", FAST_PATHS)
def test_default_chunk_sizes_split_1500_tokens_and_still_equal_naive(backend):
    n = 1500                                                       # > 1024: two slices, 2 x 2 blocks of scores
    q, k, v = random_qkv(1, 1, 1, n, n, 8, 8)
    mask = (torch.arange(n) < 1100).view(1, 1, 1, n)               # 400 padded keys, all in the second chunk
    for m, name in ((None, "no mask"), (mask, "a key-padding mask")):
        assert_close(attention(q, k, v, backend=backend, mask=m), naive_attention(q, k, v, mask=m),
                     f"{backend} with default chunks vs naive, N = {n}, {name}", atol=1e-5 * v.abs().max().item())


@pytest.mark.parametrize("backend", ("naive",) + FAST_PATHS)
def test_a_given_scale_replaces_one_over_sqrt_d_in_every_backend(backend):
    q, k, v = random_qkv(2, 2, 3, 20, 30, 8, 5, torch.float64)
    # softmax(q k^T * 0.3) v, written out
    expected = torch.softmax(q @ k.transpose(-1, -2) * 0.3, dim=-1) @ v
    assert_close(attention(q, k, v, backend=backend, scale=0.3, **SMALL_CHUNKS), expected,
                 f"{backend} with scale=0.3 vs the formula", atol=1e-12)


@pytest.mark.parametrize("backend", ("naive",) + FAST_PATHS)
def test_a_key_padding_mask_is_the_same_as_removing_the_padded_keys(backend):
    q, k, v = random_qkv(3, 3, 2, 50, 77, 8, 6, torch.float64)
    mask = make_mask("key_padding", 3, 2, 50, 77)                 # item b keeps its first 77 - 7 b keys
    out = attention(q, k, v, backend=backend, mask=mask, **SMALL_CHUNKS)
    for b in range(3):
        n = 77 - 7 * b
        alone = naive_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n])
        assert_close(out[b:b + 1], alone, f"{backend}: item {b} with a padding mask vs its {n} real keys alone",
                     atol=1e-12)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("backend", ("naive",) + FAST_PATHS)
def test_half_precision_stays_within_two_eps_of_the_float64_formula(backend, dtype, mask_kind):
    """The reference is naive in float64 from the same rounded inputs (and mask), so only the backend's own
    roundings count, each worth u = eps / 2 relative: the output (u max|v|), the weights p, which sum to 1 (u max|v|
    in all), and the scores s. Rounding the scores moves a row by at most u max|s| * 2 max|v| if every error pushed
    the same way, but they are independent and average out over the keys: measured, every backend stays under
    0.8 eps max|v| here. So the tolerance is 2 eps max|v| (float16: 0.007, bfloat16: 0.06): room for another CPU's
    summation order, and still 3 to 6 times tighter than the worst case, eps max|v| (1 + max|s|), max|s| = 5 to 11.
    """
    q, k, v = random_qkv(4, 2, 2, 50, 77, 40, 24, dtype)
    mask = make_mask(mask_kind, 2, 2, 50, 77, dtype)
    expected = naive_attention(q.double(), k.double(), v.double(), mask=as_float64(mask))
    actual = attention(q, k, v, backend=backend, mask=mask, **SMALL_CHUNKS)
    assert actual.dtype == dtype, f"{backend} returned {actual.dtype} for {dtype} inputs"
    tolerance = 2 * torch.finfo(dtype).eps * v.abs().max().item()
    assert_close(actual, expected, f"{backend} in {dtype} vs naive in float64, mask {mask_kind}", atol=tolerance)


# ----------------------------------------------------------------------------------------------- gradients


def tiny_inputs(seed: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = random_qkv(seed, 2, 1, 5, 7, 3, 2, torch.float64)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_()


TINY_CHUNKS = dict(slice_size=2, query_chunk=2, key_chunk=3)       # 5 queries = 2+2+1, 7 keys = 3+3+1


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("backend", ["naive", "sliced", "chunked"])
def test_gradients_of_naive_sliced_and_chunked_pass_gradcheck(backend, mask_kind):
    q, k, v = tiny_inputs()
    mask = make_mask(mask_kind, 2, 1, 5, 7, torch.float64)
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention(q, k, v, backend=backend, mask=mask, **TINY_CHUNKS), (q, k, v)
    ), f"{backend}, mask {mask_kind}"


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("backend", FAST_PATHS)
def test_gradients_with_respect_to_q_k_and_v_equal_naives(backend, mask_kind):
    q, k, v = random_qkv(6, 2, 3, 50, 77, 8, 5, torch.float64)
    mask = make_mask(mask_kind, 2, 3, 50, 77, torch.float64)
    upstream = torch.randn(2, 3, 50, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def grads(name):
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        out = attention(*inputs, backend=name, mask=mask, **SMALL_CHUNKS)
        return torch.autograd.grad(out, inputs, upstream)

    for name, actual, expected in zip("qkv", grads(backend), grads("naive")):
        assert_close(actual, expected, f"d out / d {name}, {backend} vs naive, mask {mask_kind}", atol=1e-12)


def test_chunked_gradient_is_exact_although_the_running_max_is_detached():
    # every key scores higher than the one before, so the running max moves in every chunk and every
    # correction exp(m_old - m_new) is < 1: the max is anything but constant, yet no gradient flows through it
    g = torch.Generator().manual_seed(8)
    q = (torch.ones(1, 2, 4, 3, dtype=torch.float64) + 0.1 * torch.randn(1, 2, 4, 3, generator=g, dtype=torch.float64))
    k = torch.linspace(0, 6, 9, dtype=torch.float64).view(1, 1, 9, 1) * torch.ones(1, 2, 9, 3, dtype=torch.float64)
    k = k + 0.1 * torch.randn(1, 2, 9, 3, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 9, 2, generator=g, dtype=torch.float64)
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    # the premise: the state's max carries no gradient, its sum and acc do
    state = online_softmax_step(OnlineSoftmax.start(q, 2), (q @ k[:, :, :3].transpose(-1, -2)), v[:, :, :3])
    assert not state.max.requires_grad and state.sum.requires_grad and state.acc.requires_grad, (
        state.max.requires_grad, state.sum.requires_grad, state.acc.requires_grad)

    upstream = torch.randn(1, 2, 4, 2, generator=g, dtype=torch.float64)
    expected = torch.autograd.grad(naive_attention(q, k, v), (q, k, v), upstream)
    for key_chunk in (1, 2, 4):
        actual = torch.autograd.grad(attention(q, k, v, backend="chunked", key_chunk=key_chunk), (q, k, v), upstream)
        for name, a, e in zip("qkv", actual, expected):
            assert_close(a, e, f"d out / d {name}, chunked (key_chunk={key_chunk}) vs naive", atol=1e-13)
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, backend="chunked", key_chunk=2), (q, k, v))


# --------------------------------------------------------------------------------------- the online softmax


def fold(scores: torch.Tensor, v: torch.Tensor, chunks: list[tuple[int, int]]) -> tuple[OnlineSoftmax, list]:
    """online_softmax_step over the keys [a, b) of each chunk in turn; returns the final state and every state."""
    state = OnlineSoftmax.start(scores, v.shape[-1])              # only the (B, heads, N_q) of its shape is used
    states = [state]
    for a, b in chunks:
        # the step overwrites its scores with the weights, so it gets a copy
        state = online_softmax_step(state, scores[..., a:b].clone(), v[:, :, a:b])
        states.append(state)
    return state, states


def chunk_bounds(sizes: list[int]) -> list[tuple[int, int]]:
    ends = torch.tensor(sizes).cumsum(0).tolist()
    return [(end - size, end) for size, end in zip(sizes, ends)]


def scores_and_values(seed: int = 9, n_k: int = 23) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(2, 3, 6, n_k, generator=g, dtype=torch.float64),       # S, (B, heads, N_q, N_k)
            torch.randn(2, 3, n_k, 4, generator=g, dtype=torch.float64))           # v, (B, heads, N_k, d_v)


@pytest.mark.parametrize("sizes, shuffle", [
    ([1] * 23, False),                 # one key at a time
    ([1] * 23, True),                  # one key at a time, in a shuffled order
    ([23], False),                     # all at once
    ([5, 5, 5, 5, 3], False),
    ([7, 1, 2, 9, 4], False),          # ragged sizes
    ([7, 1, 2, 9, 4], True),
], ids=["one-key", "one-key-shuffled", "one-chunk", "fives", "ragged", "ragged-shuffled"])
def test_online_softmax_folded_over_chunks_gives_exactly_softmax_times_v(sizes, shuffle):
    scores, v = scores_and_values()
    chunks = chunk_bounds(sizes)
    if shuffle:
        random.Random(0).shuffle(chunks)
    state, _ = fold(scores, v, chunks)
    assert_close(state.result(), scores.softmax(dim=-1) @ v, f"online softmax over chunks {chunks}", atol=1e-12)
    row_max = scores.amax(dim=-1, keepdim=True)
    assert torch.equal(state.max, row_max), f"running max vs the row max: {(state.max - row_max).abs().max()}"
    assert_close(state.sum, (scores - row_max).exp().sum(dim=-1, keepdim=True), "running sum vs sum exp(s - max)",
                 atol=0, rtol=1e-13)


def test_a_chunk_of_masked_keys_leaves_the_state_unchanged():
    scores, v = scores_and_values()
    scores[:, :, :2, 8:15] = float("-inf")          # rows 0-1: the middle chunk, keys 8..14, all masked
    scores[:, :, 2:4, 0:8] = float("-inf")          # rows 2-3: the first chunk all masked (the max starts at -inf)
    state, states = fold(scores, v, [(0, 8), (8, 15), (15, 23)])
    for name, before, after in zip(OnlineSoftmax._fields, states[1], states[2]):
        assert torch.equal(before[:, :, :2], after[:, :, :2]), (
            f"state.{name} of rows 0-1 changed over a chunk of masked keys: {before[:, :, :2]} -> {after[:, :, :2]}")
    first = states[1]
    assert (first.max[:, :, 2:4] == float("-inf")).all() and (first.sum[:, :, 2:4] == 0).all() and (
        first.acc[:, :, 2:4] == 0).all(), f"a row that has seen only masked keys: {first}"
    assert all(not torch.isnan(x).any() for s in states for x in s), "NaN in a state"
    assert_close(state.result(), scores.softmax(dim=-1) @ v, "online softmax with masked chunks", atol=1e-12)


def test_a_query_masked_everywhere_gives_nan_like_naive():
    """Softmax over no keys at all is 0 / 0: we choose to say so (NaN), as naive does, rather than invent an
    answer. Only that row is NaN; the state never is (its sum is 0 and its acc 0) until `result` divides."""
    scores, v = scores_and_values()
    scores[:, :, 3] = float("-inf")
    state, states = fold(scores, v, chunk_bounds([5, 5, 5, 5, 3]))
    assert all(not torch.isnan(x).any() for s in states for x in s), "NaN in a state before the division"
    out = state.result()
    assert torch.isnan(out[:, :, 3]).all() and not torch.isnan(out[:, :, [0, 1, 2, 4, 5]]).any(), out
    assert_close(out, scores.softmax(dim=-1) @ v, "online softmax vs softmax with a fully masked row", atol=1e-12,
                 equal_nan=True)

    q, k, v = random_qkv(10, 2, 2, 50, 77, 8, 4, torch.float64)
    mask = make_mask("bool", 2, 2, 50, 77)
    mask[:, :, 20] = False                                          # query 20 may attend to no key
    expected = naive_attention(q, k, v, mask=mask)
    assert torch.isnan(expected[:, :, 20]).all() and not torch.isnan(expected[:, :, :20]).any(), expected
    for backend in ("sliced", "chunked"):
        assert_close(attention(q, k, v, backend=backend, mask=mask, **SMALL_CHUNKS), expected,
                     f"{backend} vs naive with a fully masked query", atol=1e-12, equal_nan=True)


# -------------------------------------------------------------------------------------------- large logits


def careless_online_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_chunk: int) -> torch.Tensor:
    """The online softmax without the running max: l = sum exp(s), acc = sum exp(s) v. Exact in exact arithmetic,
    and fine for small scores; exp(s) overflows once s passes 88.7 (float32) or 709.8 (float64)."""
    scale = q.shape[-1] ** -0.5
    total, acc = 0, 0
    for j in range(0, k.shape[2], key_chunk):
        p = torch.exp(q @ k[:, :, j:j + key_chunk].transpose(-1, -2) * scale)      # (B, heads, N_q, chunk)
        total = total + p.sum(dim=-1, keepdim=True)
        acc = acc + p @ v[:, :, j:j + key_chunk]
    return acc / total


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_chunked_stays_exact_at_logits_of_1e4_where_a_careless_online_softmax_overflows(dtype):
    # entries of +-1 and d = 16 (scale 1/4): every score is a whole number / 4, exact in any float, so naive and
    # chunked see the very same scores, ties included
    g = torch.Generator().manual_seed(11)
    q, k = (torch.randint(0, 2, (2, 2, n, 16), generator=g).to(dtype) * 2 - 1 for n in (40, 60))
    v = torch.randn(2, 2, 60, 5, generator=g, dtype=torch.float64).to(dtype)
    k[:, :, -1] = k[:, :, 0]                        # key 59 is a copy of key 0, and query 0 is key 0: its
    q[:, :, 0] = k[:, :, 0]                         # two best keys tie (16 / 4 = 4), 59 keys apart
    careless = careless_online_attention(q, k, v, key_chunk=7)
    assert_close(careless, naive_attention(q, k, v), "the careless helper on ordinary logits (|s| <= 4)",
                 atol=1e-5 * v.abs().max().item())

    q, k = 100 * q, 100 * k                         # scores x 10^4: multiples of 5,000 up to 40,000
    careless = careless_online_attention(q, k, v, key_chunk=7)
    assert not torch.isfinite(careless).all(), "exp(1e4) should overflow without the running max"
    chunked = attention(q, k, v, backend="chunked", query_chunk=16, key_chunk=7)
    assert torch.isfinite(chunked).all(), f"chunked has {int((~torch.isfinite(chunked)).sum())} non-finite values"
    assert_close(chunked, naive_attention(q, k, v), f"chunked vs naive at logits of 1e4 in {dtype}",
                 atol=1e-5 * v.abs().max().item())
    assert_close(chunked[:, :, 0], (v[:, :, 0] + v[:, :, -1]) / 2, "query 0, whose max is shared by keys 0 and 59",
                 atol=1e-6)


@pytest.mark.parametrize("backend", ("naive",) + FAST_PATHS)
def test_float16_logits_in_the_hundreds_stay_finite_because_the_softmax_is_taken_in_float32(backend):
    q, k, v = random_qkv(12, 2, 2, 40, 60, 8, 5, torch.float16)
    q, k = 10 * q, 10 * k                              # |s| up to ~400: exp(s) overflows float16 past 11.1
    scores = q.double() @ k.double().transpose(-1, -2) / 8**0.5
    assert scores.abs().max() > 100, scores.abs().max()
    out = attention(q, k, v, backend=backend, **SMALL_CHUNKS)
    assert out.dtype == torch.float16 and torch.isfinite(out).all(), (
        f"{backend}: {int((~torch.isfinite(out)).sum())} non-finite of {out.numel()}")
    # and each output is still an average of rows of v
    low, high = v.amin(dim=2, keepdim=True), v.amax(dim=2, keepdim=True)
    assert ((out >= low) & (out <= high)).all(), f"{backend}: an output outside the range of v"


@pytest.mark.parametrize("backend", ("naive",) + FAST_PATHS)
def test_float16_scores_that_fit_after_scaling_do_not_overflow_before_it(backend):
    # q . k_0 = 40 * 40 * 64 = 102,400 is past float16's largest number (65,504); q . k_0 / sqrt(64) = 12,800 is not.
    # Each key scores 128 less than the one before, so the answer is v_0 (chunked and sdpa scale q first)
    d = 64
    q = torch.full((1, 1, 3, d), 40.0, dtype=torch.float16)
    k = (40 * (1 - torch.arange(5.0) / 100)).view(1, 1, 5, 1).expand(1, 1, 5, d).to(torch.float16)
    v = torch.randn(1, 1, 5, 4, generator=torch.Generator().manual_seed(13)).to(torch.float16)
    out = attention(q, k, v, backend=backend, slice_size=2, query_chunk=2, key_chunk=2)
    assert_close(out, v[:, :, :1].expand(1, 1, 3, 4), f"{backend} in float16 with scaled scores of 12,800", atol=0)


# --------------------------------------------------------------------------------------- memory and choice


def test_score_matrix_of_sd_v1_at_512_is_512_mib_and_doubles_with_cfg_and_halves_in_float16():
    # 8 heads over 64 x 64 = 4096 latent positions: 8 x 4096^2 x 4 bytes
    assert score_matrix_bytes(1, 8, 4096, 4096) == 512 * MiB, score_matrix_bytes(1, 8, 4096, 4096) / MiB
    assert score_matrix_bytes(2, 8, 4096, 4096) == 1 << 30, "classifier-free guidance runs a batch of 2: 1 GiB"
    assert score_matrix_bytes(1, 8, 4096, 4096, torch.float16) == 256 * MiB
    assert score_matrix_bytes(1, 8, 4096, 77, torch.float64) == 8 * 4096 * 77 * 8       # cross-attention


SD_512 = ((1, 8, 4096, 40), (1, 8, 4096, 40))                   # 512 MiB of float32 scores
SD_512_CROSS = ((1, 8, 4096, 40), (1, 8, 77, 40))               # 9.6 MiB


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "cuda", torch.device("cuda", 0)])
@pytest.mark.parametrize("shapes", [SD_512, SD_512_CROSS], ids=["self", "cross"])
def test_cpu_and_cuda_choose_sdpa_whatever_the_size(device, shapes):
    choice = choose_backend(device, torch.float16, *shapes)        # only device.type is read: no GPU needed
    assert choice.backend == "sdpa", str(choice)
    assert torch.device(device).type.upper() in choice.reason, str(choice)


def test_mps_chooses_chunked_above_the_budget_and_sdpa_at_or_below_it():
    at = choose_backend("mps", torch.float16, *SD_512, budget=512 * MiB)
    below = choose_backend("mps", torch.float16, *SD_512, budget=512 * MiB + 1)
    above = choose_backend("mps", torch.float16, *SD_512, budget=512 * MiB - 1)
    assert (at.backend, below.backend, above.backend) == ("sdpa", "sdpa", "chunked"), (str(at), str(below), str(above))
    cfg = choose_backend("mps", torch.float32, (2, 8, 4096, 40), (2, 8, 4096, 40), budget=768 * MiB)
    assert cfg.backend == "chunked", f"a batch of 2 doubles the scores to 1 GiB: {cfg}"
    # without budget=: the device's own, which is the 1 GiB default where torch cannot tell
    default = choose_backend("mps", torch.float32, *SD_512)
    expected = "sdpa" if memory_budget("mps")[0] >= 512 * MiB else "chunked"
    assert default.backend == expected, f"{default} (budget {memory_budget('mps')})"


def test_the_reason_names_the_device_the_mib_of_scores_and_the_budget():
    choice = choose_backend("mps", torch.float32, *SD_512, budget=256 * MiB)
    assert choice == BackendChoice(choice.backend, choice.reason) and choice.backend == "chunked", choice
    for words in ("MPS", "512.0 MiB", "1x8x4096x4096", "256 MiB", "the budget given"):
        assert words in choice.reason, f"{words!r} is not in the reason {choice.reason!r}"
    assert str(choice) == f"chunked: {choice.reason}", str(choice)
    fits = choose_backend("mps", torch.float32, *SD_512_CROSS, budget=1 << 30)
    assert fits.backend == "sdpa" and "9.6 MiB" in fits.reason and "1,024 MiB" in fits.reason, str(fits)


def test_memory_budget_off_apple_gpus_is_the_documented_1_gib_default():
    budget, source = memory_budget("cpu")
    assert budget == DEFAULT_MPS_BUDGET == 1 << 30, budget
    assert "1 GiB default" in source, source


def test_auto_on_the_cpu_gives_exactly_sdpas_result():
    q, k, v = random_qkv(14, 2, 2, 50, 77, 8, 8)
    mask = make_mask("float", 2, 2, 50, 77)
    assert torch.equal(attention(q, k, v, mask=mask), attention(q, k, v, backend="sdpa", mask=mask))


def test_auto_runs_the_backend_that_choose_backend_picks(monkeypatch):
    asked, ran = [], []
    real_chunked = attention_module.chunked_attention

    def pick_chunked(*args, **kwargs):
        asked.append(args)
        return BackendChoice("chunked", "the test says so")

    def spy(*args, **kwargs):
        ran.append(kwargs)
        return real_chunked(*args, **kwargs)

    monkeypatch.setattr(attention_module, "choose_backend", pick_chunked)
    monkeypatch.setattr(attention_module, "chunked_attention", spy)
    q, k, v = random_qkv(15, 1, 2, 50, 77, 8, 8)
    out = attention(q, k, v, query_chunk=32, key_chunk=17)
    assert asked == [(q.device, q.dtype, q.shape, k.shape)], asked
    assert ran == [dict(query_chunk=32, key_chunk=17)], f"chunked ran {len(ran)} times: {ran}"
    assert_close(out, naive_attention(q, k, v), "auto (-> chunked) vs naive", atol=1e-5 * v.abs().max().item())


# ----------------------------------------------------------------------------------------------- bad input

Q, K, V = random_qkv(16, 2, 3, 5, 7, 8, 4)


@pytest.mark.parametrize("q, k, v, options, match", [
    (Q[0], K[0], V[0], {},
     r"expects \(B, heads, N, d\) tensors, got q\(3, 5, 8\) k\(3, 7, 8\) v\(3, 7, 4\); split heads first"),
    (Q, K[:1], V[:1], {}, r"batch and head counts must match .*got q\(2, 3, 5, 8\) k\(1, 3, 7, 8\)"),
    (Q, K[:, :2], V[:, :2], {}, r"batch and head counts must match .*got q\(2, 3, 5, 8\) k\(2, 2, 7, 8\)"),
    (Q, K, V[:, :, :6], {}, r"k, v must have the same N\), got .*k\(2, 3, 7, 8\) v\(2, 3, 6, 4\)"),
    (Q, K[..., :6], V, {}, r"same head dim d to take q k\^T, got 8 and 6"),
    (Q, K.double(), V, {}, r"share a dtype and device, got torch.float32/torch.float64/torch.float32"),
    (Q, K, V, dict(mask=torch.ones(2, 3, 5, 8, dtype=torch.bool)),
     r"mask of shape \(2, 3, 5, 8\) does not broadcast to \(B, heads, N_q, N_k\) = \(2, 3, 5, 7\); "
     r"use \(B, 1, 1, N_k\)"),
    (Q, K, V, dict(mask=torch.ones(1, 2, 3, 5, 7, dtype=torch.bool)), r"mask of shape \(1, 2, 3, 5, 7\) does not"),
    (Q, K, V, dict(mask=torch.zeros(2, 3, 5, 7, dtype=torch.float64)),
     r"a float mask of q's dtype torch.float32 added to the scores, got torch.float64; convert it with"),
    (Q, K, V, dict(mask=torch.ones(2, 3, 5, 7, dtype=torch.int64)), r"either bool .* got torch.int64"),
    (Q[:, :, :0], K, V, {}, r"at least one query and one key, got q\(2, 3, 0, 8\)"),
    (Q, K[:, :, :0], V[:, :, :0], {}, r"at least one query and one key"),
    (Q, K, V, dict(slice_size=True), r"slice_size must be a positive whole number of rows, got True"),
    (Q, K, V, dict(backend="flash"),
     r"unknown attention backend 'flash'; choose one of auto, naive, sliced, chunked, sdpa, triton"),
    (Q, K, V, dict(slice_size=0), r"slice_size must be a positive whole number of rows, got 0; try 1024"),
    (Q, K, V, dict(query_chunk=16.0), r"query_chunk must be a positive whole number of rows, got 16.0"),
    (Q, K, V, dict(key_chunk=0), r"key_chunk must be a positive whole number of rows, got 0"),
    (Q, K, V, dict(key_chunk=2.5), r"key_chunk must be a positive whole number of rows, got 2.5"),
], ids=["3-d", "batch", "heads", "k-v-length", "head-dim", "dtypes", "mask-shape", "mask-5-d", "mask-dtype",
        "mask-int", "no-queries", "no-keys", "slice-bool", "backend", "slice-0", "query-chunk-float", "key-chunk-0",
        "key-chunk-float"])
def test_bad_input_is_a_one_line_value_error_that_says_what_was_given(q, k, v, options, match):
    with pytest.raises(ValueError, match=match) as err:
        attention(q, k, v, **options)
    assert "\n" not in str(err.value), str(err.value)


def test_the_unknown_backend_message_lists_every_backend():
    with pytest.raises(ValueError) as err:
        attention(Q, K, V, backend="Naive")
    assert all(repr(name)[1:-1] in str(err.value) for name in ("auto",) + BACKENDS), str(err.value)
