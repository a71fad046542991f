"""The conditioning path: the tokenizer covers every Shapes caption and lays ids out as CLIP does; the text encoder
is causal, ignores padding after <eos>, trains (gradients reach the embeddings) and round-trips through a folder."""

from __future__ import annotations

import pytest
import torch

from minildm.data import COLOURS, POSITION_WORDS, SHAPE_KINDS, SIZE_WORDS, ShapeFactors, ShapesDataset, caption
from minildm.text import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    TextEncoder,
    TextEncoderConfig,
    Tokenizer,
    save_text_encoder,
)


def tiny_encoder(tokenizer: Tokenizer, seed: int = 0, **sizes) -> TextEncoder:
    torch.manual_seed(seed)
    config = TextEncoderConfig(tokenizer.vocab_size, tokenizer.max_length, **{"dim": 32, **sizes})
    return TextEncoder(config).eval()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = 1e-6) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    error = (actual - expected).abs()
    if error.max() > atol:
        where = tuple(int(i) for i in (error > atol).nonzero()[0])
        raise AssertionError(f"{what}: max abs error {error.max():.3g} > {atol}; first at {where}")


# ------------------------------------------------------------------------------------------------- the tokenizer


def test_the_vocabulary_covers_every_word_of_2000_random_captions_and_round_trips_them():
    tokenizer = Tokenizer()
    captions = [text for seed, objects in ((0, 1), (1, (1, 2)), (2, (2, 3)), (3, 3))
                for text in ShapesDataset(length=500, seed=seed, num_objects=objects).captions()]
    batch = tokenizer.encode(captions)
    assert batch.ids.shape == (2000, tokenizer.max_length)
    decoded = tokenizer.decode(batch.ids)
    wrong = [(a, b) for a, b in zip(captions, decoded) if a != b]
    assert not wrong, f"{len(wrong)} of 2000 captions did not round-trip; first: {wrong[0]}"


def test_the_vocabulary_is_the_special_tokens_and_the_words_of_data_py():
    expected = ({"a", "the", "at", "in", "and"} | {word for _, word in SIZE_WORDS} | set(COLOURS) | set(SHAPE_KINDS)
                | {word for row in POSITION_WORDS for place in row for word in place.split()})
    tokenizer = Tokenizer()
    assert tokenizer.words[:3] == ["<pad>", "<bos>", "<eos>"] and (PAD_ID, BOS_ID, EOS_ID) == (0, 1, 2)
    assert set(tokenizer.words[3:]) == expected, set(tokenizer.words[3:]) ^ expected
    assert tokenizer.vocab_size == 3 + len(expected) == 26


def test_max_length_holds_the_longest_three_object_caption():
    longest = ShapeFactors("triangle", "purple", 0.3, 0.9, 0.9, 0.0)        # medium, at the bottom right: 8 words
    text = caption({"objects": [longest] * 3})
    batch = Tokenizer().encode([text])
    assert len(text.split()) == 26 and int(batch.mask.sum()) == 28 <= Tokenizer().max_length


def test_the_layout_is_bos_words_eos_then_padding_and_the_mask_marks_the_tokens():
    tokenizer = Tokenizer(max_length=8)
    batch = tokenizer.encode(["A red, circle!", ""])
    ids = tokenizer.ids
    assert batch.ids.dtype == torch.long and batch.mask.dtype == torch.bool
    assert batch.ids.tolist() == [[BOS_ID, ids["a"], ids["red"], ids["circle"], EOS_ID, PAD_ID, PAD_ID, PAD_ID],
                                  [BOS_ID, EOS_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID]]
    assert batch.mask.tolist() == [[True] * 5 + [False] * 3, [True] * 2 + [False] * 6]
    assert tokenizer.decode(batch.ids) == ["a red circle", ""]


def test_a_single_string_is_a_batch_of_one():
    tokenizer = Tokenizer()
    assert torch.equal(tokenizer.encode("a red circle").ids, tokenizer.encode(["a red circle"]).ids)


def test_extra_words_extend_the_vocabulary_without_moving_existing_ids():
    base, extended = Tokenizer(), Tokenizer(extra_words=["pink", "star", "red"])     # "red" is known: not repeated
    assert extended.words == base.words + ["pink", "star"]
    assert extended.decode(extended.encode(["a pink star"]).ids) == ["a pink star"]


@pytest.mark.parametrize("prompts, match", [
    (["a purpel circle"], r"unknown word 'purpel' in prompt 'a purpel circle'; the vocabulary has 26 words "
                          r"\(closest: purple\); extend it with Tokenizer\(extra_words=\['purpel'\]\)"),
    (["a " * 31], r"has 31 words but max_length=32 leaves room for 30"),
    ([], r"at least one prompt, got an empty list"),
    ([b"a red circle"], r"prompts must be strings, got \['bytes'\]"),
])
def test_bad_prompts_are_one_line_errors_that_say_what_to_do(prompts, match):
    with pytest.raises(ValueError, match=match) as info:
        Tokenizer().encode(prompts)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("make, match", [
    (lambda: Tokenizer(extra_words=["Top Left"]), r"not one lowercase word"),
    (lambda: Tokenizer(max_length=1), r"at least 2"),
    (lambda: Tokenizer().decode([[1, 99, 2]]), r"id 99 is outside this vocabulary of 26"),
    (lambda: Tokenizer().decode(torch.ones(8, dtype=torch.long)), r"shape \(B, L\), got \(8,\); for one row pass"),
    (lambda: TextEncoderConfig(26, dim=30, heads=4), r"dim 30 is not divisible by heads 4"),
])
def test_bad_settings_are_one_line_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ------------------------------------------------------------------------------------------------- the encoder


def test_the_encoder_turns_ids_into_a_float_context_of_shape_b_l_d():
    tokenizer = Tokenizer(max_length=12)
    encoder = tiny_encoder(tokenizer)
    context = encoder.encode_prompts(tokenizer, ["a red circle", "", "a large blue square in the centre"])
    assert context.shape == (3, 12, 32) and context.dtype == torch.float32
    assert torch.isfinite(context).all()


def test_a_token_changes_its_own_and_later_positions_but_never_earlier_ones():
    tokenizer = Tokenizer(max_length=10)
    encoder = tiny_encoder(tokenizer)
    ids = tokenizer.encode(["a small red circle at the top"]).ids                 # words at positions 1..7
    changed = ids.clone()
    changed[0, 4] = tokenizer.ids["square"]                                        # circle -> square
    with torch.no_grad():
        before, after = encoder(ids), encoder(changed)
    assert_close(after[:, :4], before[:, :4], "positions before the changed token")
    moved = (after - before).abs().amax(dim=-1)[0]                                 # (L,)
    assert (moved[4:] > 1e-4).all(), f"positions 4.. should all change, change per position {moved.tolist()}"


def test_what_follows_eos_does_not_change_positions_up_to_eos():
    tokenizer = Tokenizer(max_length=12)
    encoder = tiny_encoder(tokenizer)
    ids = tokenizer.encode(["a red circle"]).ids                                  # <eos> at position 4
    noisy = ids.clone()
    noisy[0, 5:] = torch.randint(0, tokenizer.vocab_size, (7,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(encoder(noisy)[:, :5], encoder(ids)[:, :5], "positions up to <eos>")


def test_gradients_reach_the_embeddings_of_the_tokens_used():
    tokenizer = Tokenizer(max_length=8)
    encoder = tiny_encoder(tokenizer).train()
    batch = tokenizer.encode(["a red circle"])
    weights = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1))   # sum() alone: LayerNorm zeroes it
    (encoder(batch.ids) * weights).sum().backward()
    grad = encoder.token_embedding.weight.grad.abs().sum(dim=-1)                   # (vocab,)
    used = set(batch.ids[0].tolist())
    assert all(grad[i] > 0 for i in used), f"no gradient for some used ids {sorted(used)}: {grad.tolist()}"
    assert all(grad[i] == 0 for i in range(tokenizer.vocab_size) if i not in used)
    assert encoder.position_embedding.weight.grad.abs().sum(dim=-1).gt(0).all()


@pytest.mark.parametrize("ids, match", [
    (torch.ones(8, dtype=torch.long), r"expected long ids of shape \(B, 8\), got torch.int64 ids of shape \(8,\)"),
    (torch.ones(2, 9, dtype=torch.long), r"shape \(2, 9\); make them with Tokenizer\(max_length=8\)"),
    (torch.ones(2, 8), r"got torch.float32 ids"),
    (torch.full((1, 8), 26), r"ids must lie in \[0, 26\), got values from 26 to 26"),
    (torch.full((1, 8), -1), r"got values from -1 to -1"),
])
def test_bad_ids_are_one_line_errors(ids, match):
    with pytest.raises(ValueError, match=match) as info:
        tiny_encoder(Tokenizer(max_length=8))(ids)
    assert "\n" not in str(info.value)


def test_save_and_load_round_trip_gives_the_same_tokenizer_and_the_same_context(tmp_path):
    tokenizer = Tokenizer(extra_words=["pink"], max_length=12)
    encoder = tiny_encoder(tokenizer, seed=3, depth=1)
    save_text_encoder(tmp_path / "text", encoder, tokenizer)
    tokenizer_again = Tokenizer.from_folder(tmp_path / "text")
    encoder_again = TextEncoder.from_folder(tmp_path / "text")
    assert tokenizer_again.words == tokenizer.words and tokenizer_again.max_length == 12
    assert encoder_again.config == encoder.config
    prompts = ["a pink circle", ""]
    with torch.no_grad():
        assert torch.equal(encoder_again.eval().encode_prompts(tokenizer_again, prompts),
                           encoder.encode_prompts(tokenizer, prompts))


def test_saving_a_tokenizer_that_does_not_fit_the_encoder_is_refused(tmp_path):
    encoder = tiny_encoder(Tokenizer())
    with pytest.raises(ValueError, match=r"tokenizer \(27 words, max_length 32\) does not fit the encoder \(26, 32\)"):
        save_text_encoder(tmp_path / "text", encoder, Tokenizer(extra_words=["pink"]))
    assert not (tmp_path / "text").exists()
