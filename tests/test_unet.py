"""The U-Net's contract (chapter 05): eps_hat has z_t's shape, the timestep embedding is the sinusoid table the
chapter draws, every skip and every parameter takes part, the prompt changes the answer, and a user's mistake is a
one-line ValueError that says what to do. Tiny configs (two or three levels of 16-32 channels, 8x8 latents); no
diffusers needed (tests/oracle/test_unet_parity.py holds the U-Net to diffusers').
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from minildm import checkpoint
from minildm.unet import UNet, UNetConfig, timestep_embedding

# two levels (f = 2), attention at both, 2 heads of 8 and 16 channels, prompts of D = 8
TINY = dict(block_out_channels=(16, 32), attention_levels=(True, True), layers_per_block=1, norm_num_groups=8, heads=2,
            context_dim=8)


def tiny_unet(seed: int = 0, **changes) -> UNet:
    torch.manual_seed(seed)
    return UNet(UNetConfig(**{**TINY, **changes})).eval()


_tiny = tiny_unet()                                                                 # for tests that only call it


pytestmark = pytest.mark.usefixtures("one_thread")      # tests/conftest.py: tiny tensors, one thread


def inputs(batch: int = 2, height: int = 8, width: int = 8, tokens: int = 5, channels: int = 4, context_dim: int = 8,
           seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    zt = torch.randn(batch, channels, height, width, generator=g)
    context = torch.randn(batch, tokens, context_dim, generator=g)
    return zt, context


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = 1e-5):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    err = diff.max().item()
    rel = err / max(expected.abs().max().item(), 1e-12)
    where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    assert err <= atol, f"{what}: max abs error {err:.3g} at {where} (relative {rel:.3g}) > {atol:g}"


def assert_differ(a: torch.Tensor, b: torch.Tensor, what: str, at_least: float = 1e-4):
    change = (a - b).abs().max().item()
    assert change > at_least, f"{what}: max abs change {change:.3g} <= {at_least:g} (scale {b.abs().max().item():.3g})"


# ----------------------------------------------------------------------------------------- shapes

@pytest.mark.parametrize(
    "changes, batch, height, width",
    [
        ({}, 2, 8, 8),                                                             # attention at both levels
        (dict(block_out_channels=(16, 32, 32), attention_levels=(False, True, True), heads=(2, 4, 4)), 1, 8, 12),
        (dict(layers_per_block=2, transformer_depth=2, use_linear_projection=True), 3, 4, 6),
        (dict(attention_levels=(True, False)), 2, 6, 2),                            # SD 1's pattern: none at the last
    ],
    ids=["two_levels", "three_levels_per_level_heads_8x12", "linear_projection_depth_2_4x6", "attention_first_6x2"],
)
def test_eps_hat_has_the_shape_of_z_t_for_any_config_and_non_square_sizes(changes, batch, height, width):
    model = tiny_unet(**changes)
    zt, context = inputs(batch, height, width)
    with torch.no_grad():
        eps = model(zt, torch.arange(batch) * 100, context)
    assert eps.shape == zt.shape, f"eps_hat {tuple(eps.shape)} for z_t {tuple(zt.shape)} ({changes})"
    assert eps.isfinite().all(), f"non-finite eps_hat ({changes})"
    # a channels-last view leaking out of a SpatialTransformer would make every later conv copy its weights
    assert eps.is_contiguous(), f"eps_hat is not in the standard (contiguous) layout ({changes})"


def test_out_channels_set_the_channels_of_the_answer():
    # e.g. a model that also predicts a variance answers 2 x 4 channels for 4 latent channels
    model = tiny_unet(out_channels=8)
    zt, context = inputs()
    with torch.no_grad():
        assert model(zt, 10, context).shape == (2, 8, 8, 8)


def test_sd_v1_default_config_has_859_520_964_parameters():
    with torch.device("meta"):                                                     # shapes only: no 3.4 GB of floats
        model = UNet(UNetConfig())
    count = sum(p.numel() for p in model.parameters())
    assert count == 859_520_964, f"UNet(UNetConfig()) has {count:,} parameters, SD v1's U-Net 859,520,964"


# ----------------------------------------------------------------------------------------- the timestep

def test_timestep_embedding_is_b_by_dim_float32_with_values_in_minus_one_to_one():
    t = torch.tensor([0, 1, 17, 500, 999])
    emb = timestep_embedding(t, 32)
    assert emb.shape == (5, 32) and emb.dtype == torch.float32, f"shape {tuple(emb.shape)}, dtype {emb.dtype}"
    assert emb.abs().max() <= 1.0, f"max |embedding| {emb.abs().max():.6g} > 1"


def test_t_zero_embeds_as_all_cosines_one_then_all_sines_zero_with_flip_sin_to_cos():
    emb = timestep_embedding(torch.tensor([0]), 16)[0]
    expected = torch.cat([torch.ones(8), torch.zeros(8)])                          # [cos(0) ... | sin(0) ...]
    assert torch.equal(emb, expected), f"t = 0 embeds as {emb.tolist()}, expected {expected.tolist()}"
    unflipped = timestep_embedding(torch.tensor([0]), 16, flip_sin_to_cos=False)[0]
    assert torch.equal(unflipped, expected.flip(0)), f"[sin, cos] order: t = 0 embeds as {unflipped.tolist()}"


def test_flip_sin_to_cos_swaps_the_two_halves():
    t = torch.tensor([3.0, 250.5])
    flipped, plain = timestep_embedding(t, 20, True), timestep_embedding(t, 20, False)
    assert torch.equal(flipped, torch.cat([plain[:, 10:], plain[:, :10]], dim=1))


def test_distinct_timesteps_have_distinct_embeddings():
    emb = timestep_embedding(torch.arange(1000), 320)                             # SD's width, every t in [0, T)
    # each row is 160 (cos, sin) pairs, so |e|^2 = 160 and |e_s - e_t|^2 = 2 * 160 - 2 e_s . e_t
    squared = (2 * 160 - 2 * emb @ emb.T).fill_diagonal_(float("inf"))
    closest = squared.min().clamp_min(0).sqrt().item()
    where = tuple(int(i) for i in torch.unravel_index(squared.argmin(), squared.shape))
    assert closest > 0.1, f"timesteps {where} embed only {closest:.3g} apart"


@pytest.mark.parametrize("dim, freq_shift", [(320, 0.0), (16, 0.0), (16, 1.0)])
def test_frequencies_are_geometric_from_one_down_to_about_one_over_10000(dim, freq_shift):
    n_freqs = dim // 2
    emb = timestep_embedding(torch.tensor([1.0]), dim, freq_shift=freq_shift)[0]
    # at t = 1 the angles are the frequencies themselves, all in (0, 1]: recover them from (cos, sin)
    omega = torch.atan2(emb[n_freqs:].double(), emb[:n_freqs].double())                 # (n_freqs,)
    expected = 10_000 ** (-torch.arange(n_freqs, dtype=torch.float64) / (n_freqs - freq_shift))
    assert_close(omega, expected, f"frequencies (dim {dim}, shift {freq_shift})", atol=1e-6)
    assert abs(omega[0].item() - 1) < 1e-6, f"the highest frequency is {omega[0].item()}, expected 1"
    ratios = omega[1:] / omega[:-1]
    assert (ratios - ratios[0]).abs().max() < 1e-5, f"frequency ratios vary: {ratios.min():.6g}..{ratios.max():.6g}"
    lowest = omega[-1].item()
    # 10000^(-(n_freqs-1)/n_freqs): 1.06e-4 at SD's 320 channels; exactly 1e-4 with freq_shift 1
    assert 1e-4 * (1 - 1e-5) <= lowest <= 1e-4 * 10_000 ** (1 / n_freqs) * (1 + 1e-5), f"lowest frequency {lowest:.6g}"


def test_one_number_for_the_batch_equals_the_same_timestep_per_item():
    model = tiny_unet()
    zt, context = inputs(batch=3)
    with torch.no_grad():
        per_item = model(zt, torch.tensor([250, 250, 250]), context)
        for t in (250, 250.0, torch.tensor(250)):
            assert_close(model(zt, t, context), per_item, f"timestep given as {t!r}", atol=0)


def test_each_item_is_denoised_at_its_own_timestep_independently_of_the_batch():
    model = tiny_unet()
    zt, context = inputs(batch=3)
    t = torch.tensor([5, 500, 998])
    with torch.no_grad():
        batched = model(zt, t, context)
        for i in range(3):
            alone = model(zt[i:i + 1], t[i:i + 1], context[i:i + 1])
            assert_close(batched[i:i + 1], alone, f"item {i} (t = {t[i].item()}) batched vs alone")
        assert_differ(model(zt, t.flip(0), context), batched, "reversing the per-item timesteps")


def test_fractional_timesteps_are_accepted_and_answer_differently_from_their_integer_neighbours():
    # Karras-style samplers ask for t such as 811.38; the sinusoids take any real t
    model = tiny_unet()
    zt, context = inputs(batch=1)
    with torch.no_grad():
        below, between, above = (model(zt, t, context) for t in (811.0, 811.38, 812.0))
    assert_differ(between, below, "t = 811.38 vs 811", at_least=1e-7)
    assert_differ(between, above, "t = 811.38 vs 812", at_least=1e-7)


# ----------------------------------------------------------------------------------------- structure

def skip_channels(model: UNet) -> list[int]:
    """The channels of the activations the way down leaves behind, in the order the way up reads them."""
    chans, levels = model.config.block_out_channels, len(model.config.block_out_channels)
    skips = [chans[0]]
    for i, out in enumerate(chans):
        skips += [out] * (model.config.layers_per_block + (0 if i == levels - 1 else 1))
    return skips[::-1]


def test_every_skip_connection_changes_the_answer():
    # zero the skip half of each up ResBlock's concatenated input in turn: each must reach eps_hat
    model = tiny_unet(block_out_channels=(16, 32, 32), attention_levels=(False, True, True), heads=2)
    zt, context = inputs()
    t = torch.tensor([100, 700])
    with torch.no_grad():
        reference = model(zt, t, context)
    skips = iter(skip_channels(model))
    count = 0
    for u, level in enumerate(model.up):
        for j, res in enumerate(level.res):
            channels = next(skips)

            def zero_skip(module, args, channels=channels):
                h, time = args                                                     # h = cat([up path, skip])
                return (torch.cat([h[:, :-channels], torch.zeros_like(h[:, -channels:])], dim=1), time)

            handle = res.register_forward_pre_hook(zero_skip)
            try:
                with torch.no_grad():
                    assert_differ(model(zt, t, context), reference, f"zeroing the skip into up.{u}.res.{j}")
            finally:
                handle.remove()
            count += 1
    # (layers_per_block + 1) ResBlocks per up level, each reading one skip: conv_in's, each down ResBlock's and
    # each resample's
    skips = len(skip_channels(model))
    assert count == skips == 3 * (1 + 1), f"{count} up ResBlocks for {skips} skips"


def test_training_step_gives_every_parameter_a_finite_nonzero_gradient():
    model = tiny_unet(block_out_channels=(16, 32, 32), attention_levels=(True, False, True),
                      transformer_depth=2).train()
    zt, context = inputs()
    target = torch.randn_like(zt, generator=torch.Generator().manual_seed(2))
    loss = torch.nn.functional.mse_loss(model(zt, torch.tensor([3, 900]), context), target)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"{len(missing)} parameters get no gradient, e.g. {missing[:5]}"
    bad = [n for n, p in model.named_parameters() if not p.grad.isfinite().all()]
    assert not bad, f"non-finite gradients in {bad[:5]}"
    zero = [n for n, p in model.named_parameters() if not p.grad.any()]
    assert not zero, f"{len(zero)} parameters get an all-zero gradient, e.g. {zero[:5]}"


def test_a_different_prompt_gives_a_different_answer():
    model = tiny_unet()
    zt, context = inputs()
    other = torch.randn(context.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_differ(model(zt, 400, other), model(zt, 400, context), "a different context")
        # any number of tokens L: the cross-attention's keys and values come from however many there are
        assert model(zt, 400, other[:, :2]).shape == zt.shape


def test_prompt_changes_the_answer_even_with_attention_only_in_the_middle_block():
    model = tiny_unet(attention_levels=(False, False), mid_attention=True)       # diffusers' UNetMidBlock2DCrossAttn
    zt, context = inputs()
    with torch.no_grad():
        assert_differ(model(zt, 400, context.flip(0)), model(zt, 400, context), "swapping the two prompts")


@pytest.mark.parametrize("down, up", [((True, True), (False, True)), ((False, True), (True, True))],
                         ids=["first_level_down_only", "first_level_up_only"])
def test_each_path_attends_where_its_own_levels_say_and_the_prompt_reaches_through_it(down, up):
    model = tiny_unet(attention_levels=down, up_attention_levels=up, mid_attention=False)
    # self.up runs deepest level first: its level order is reversed
    assert [level.attn is not None for level in model.down] == list(down)
    assert [level.attn is not None for level in reversed(model.up)] == list(up)
    # the first level's transformers alone carry the prompt on the path that has them: drop the deepest level's,
    # and a different prompt must still change the answer
    model.down[1].attn = None
    model.up[0].attn = None
    zt, context = inputs()
    with torch.no_grad():
        assert_differ(model(zt, 400, context.flip(0)), model(zt, 400, context), "swapping the two prompts")


def test_the_way_up_attends_where_the_way_down_does_unless_told_otherwise():
    config = UNetConfig(**{**TINY, "attention_levels": (False, True)})
    assert config.up_attention_levels == (False, True)
    up_only = UNetConfig(**{**TINY, "attention_levels": (False, False), "up_attention_levels": (True, False)})
    assert up_only.mid_attention, "the middle attends if any level on either path does"


def test_a_config_saved_before_the_way_up_had_its_own_levels_loads_attending_both_ways(monkeypatch):
    monkeypatch.setattr(checkpoint, "WARNED", set())           # each warning is said once per session
    old = {k: v for k, v in dataclasses.asdict(UNetConfig(**TINY)).items() if k != "up_attention_levels"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = checkpoint.config_from_dict(UNetConfig, old, "old/unet/config.json")
    assert config.up_attention_levels == config.attention_levels == (True, True)
    assert [str(w.message).split("'")[1] for w in caught if "added later" in str(w.message)] == ["up_attention_levels"]


def test_a_unet_without_attention_levels_runs_without_context():
    model = tiny_unet(attention_levels=(False, False))
    zt, _ = inputs()
    with torch.no_grad():
        eps = model(zt, 400)
    assert eps.shape == zt.shape


# ----------------------------------------------------------------------------------------- bad input

def bad_call(model: UNet, what: str):
    zt, context = inputs()
    t = torch.tensor([10, 20])
    return {
        "size_0x8": lambda: model(torch.randn(2, 4, 0, 8), t, context),
        "three_channels": lambda: model(zt[:, :3], t, context),
        "no_batch_dim": lambda: model(zt[0], t[:1], context[:1]),
        "context_dim_16": lambda: model(zt, t, torch.randn(2, 5, 16)),
        "context_2d": lambda: model(zt, t, context[:, 0]),
        "context_batch_1": lambda: model(zt, t, context[:1]),
        "no_context": lambda: model(zt, t),
        "t_negative": lambda: model(zt, torch.tensor([-1, 20]), context),
        "t_equal_to_T": lambda: model(zt, torch.tensor([10, 1000]), context),
        "t_scalar_above_T": lambda: model(zt, 1500.0, context),
        "t_nan_on_the_cpu": lambda: model(zt, torch.tensor([10.0, float("nan")]), context),
        "t_scalar_nan": lambda: model(zt, float("nan"), context),
        "three_timesteps": lambda: model(zt, torch.tensor([1, 2, 3]), context),
    }[what]


BAD_INPUT = {                                                                    # what -> the message it gives
    "size_0x8": r"latent size 0x8 has a side below 1",
    "three_channels": r"z_t must be \(B, 4, h, w\) latents, got shape \(2, 3, 8, 8\)",
    "no_batch_dim": r"z_t must be \(B, 4, h, w\) latents, got shape \(4, 8, 8\)",
    "context_dim_16": r"context must be \(B, L, 8\) token embeddings, got shape \(2, 5, 16\)",
    "context_2d": r"context must be \(B, L, 8\) token embeddings, got shape \(2, 8\)",
    "context_batch_1": r"context has 1 items for 2 latents",
    "no_context": r"context must be \(B, L, 8\) token embeddings, got None",
    "t_negative": r"timesteps must be in \[0, 1000\), got -1",
    "t_equal_to_T": r"timesteps must be in \[0, 1000\), got 10\.\.1000",
    "t_scalar_above_T": r"timesteps must be in \[0, 1000\), got 1500",
    "t_nan_on_the_cpu": r"timesteps must be in \[0, 1000\), got",
    "t_scalar_nan": r"timesteps must be in \[0, 1000\), got nan",
    "three_timesteps": r"3 timesteps for 2 latents",
}


@pytest.mark.parametrize("what", list(BAD_INPUT))
def test_bad_input_is_a_one_line_value_error_that_says_what_was_given(what):
    with pytest.raises(ValueError, match=BAD_INPUT[what]) as err:
        bad_call(_tiny, what)()
    assert "\n" not in str(err.value), f"not one line: {err.value}"


def test_down_levels_keep_one_skip_per_layer_and_resample_and_up_levels_read_them_all():
    model = tiny_unet(block_out_channels=(16, 32, 32), attention_levels=(False, True, True), heads=(2, 4, 4))
    zt, context = inputs(batch=1)
    time = torch.zeros(1, model.config.time_dim)
    h = model.conv_in(zt)
    skips = [h]
    for level in model.down:
        h, level_skips = level(h, time, context)
        skips += level_skips
    shapes = [tuple(s.shape[1:]) for s in skips]
    assert shapes == [(16, 8, 8), (16, 8, 8), (16, 4, 4), (32, 4, 4), (32, 2, 2), (32, 2, 2)], shapes
    h = model.mid(h, time, context)
    for level in model.up:
        h = level(h, skips, time, context)
    assert skips == [] and h.shape == (1, 16, 8, 8), f"{len(skips)} skips left unread, output {tuple(h.shape)}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_checking_gpu_inputs_never_waits_for_the_gpu():
    model = tiny_unet().cuda()
    zt, context = (x.cuda() for x in inputs())
    torch.cuda.set_sync_debug_mode("error")                 # any host sync raises
    try:
        for t in (torch.full((2,), 10, device="cuda"), 250, 250.0):
            assert model.check_inputs(zt, t, context).shape == (2,)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_latent_side_the_levels_do_not_divide_runs_and_comes_back_at_its_own_size():
    """Three halvings of 14 x 21 round up (14 -> 7 -> 4 -> 2, 21 -> 11 -> 6 -> 3); the way up returns to the skips'
    sizes."""
    model = tiny_unet(block_out_channels=(8, 8, 8, 8), attention_levels=(False, False, False, True))     # f = 8
    zt, context = inputs(batch=1, height=14, width=21)
    sizes = []
    hooks = [level.resample.register_forward_hook(lambda m, i, out: sizes.append(tuple(out.shape[-2:])))
             for level in model.up if level.resample is not None]
    try:
        with torch.no_grad():
            eps = model(zt, 1, context)
    finally:
        for hook in hooks:
            hook.remove()
    assert eps.shape == zt.shape, f"{tuple(eps.shape)} for a {tuple(zt.shape)} latent"
    assert sizes == [(4, 6), (7, 11), (14, 21)], f"the upsamples went to {sizes}, not back to the skips' sizes"


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(attention_levels=(True, True, False)), r"attention_levels has 3 entries for 2 levels"),
        (dict(up_attention_levels=(True,)), r"up_attention_levels has 1 entries for 2 levels"),
        (dict(heads=(2, 2, 2)), r"heads has 3 entries for 2 levels"),
        (dict(heads=3), r"16 channels do not split into 3 heads and 8 groups"),
        (dict(heads=(2, 5)), r"32 channels do not split into 5 heads"),
        (dict(block_out_channels=(16, 20)), r"20 channels do not split into 2 heads and 8 groups"),
        (dict(norm_num_groups=6), r"16 channels do not split into 2 heads and 6 groups"),
    ],
    ids=["attention_levels_3_for_2", "up_attention_levels_1_for_2", "heads_3_for_2", "heads_3_of_16", "heads_5_of_32",
         "groups_8_of_20", "groups_6_of_16"],
)
def test_config_that_cannot_be_built_is_a_one_line_value_error(changes, match):
    with pytest.raises(ValueError, match=match) as err:
        UNetConfig(**{**TINY, **changes})
    assert "\n" not in str(err.value), f"not one line: {err.value}"


def test_time_vector_is_four_times_the_first_level_and_latents_shrink_by_two_per_level():
    assert UNetConfig().time_dim == 4 * 320 == 1280
    assert UNetConfig().downsampling_factor == 2 ** 3 and UNetConfig(**TINY).downsampling_factor == 2
