"""Chapter 09 exercise: CLIP's byte-pair merges (`CLIPTokenizer.bpe`).

Each test carries its task and points (`minildm grade` adds them up). The merges are checked on small vocabularies
worked out by hand (the rank order, every occurrence, the end-of-word mark), against the same rules written here as
the slow, obvious loop (find the lowest-ranked neighbouring pair, merge it, repeat) on thousands of words with CLIP's
real vocabulary, and on ids that transformers' CLIPTokenizer gives for real prompts (tests/test_clip_tokenizer.py
checks those against transformers itself). transformers may not be called.
"""

from __future__ import annotations

import random

import pytest
from taskcheck import fail, forbid

from minildm.clip_tokenizer import END_OF_WORD, CLIPTokenizer

BPE = "ch09.bpe_merge"


@pytest.fixture(scope="module")
def shipped() -> CLIPTokenizer:
    return CLIPTokenizer.shipped()


def tiny(merges: list[tuple[str, str]]) -> CLIPTokenizer:
    """A tokenizer whose vocabulary is the byte symbols of a-z, each with and without </w>, plus the merges."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = [*letters, *(c + END_OF_WORD for c in letters), *(a + b for a, b in merges),
              "<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer({t: i for i, t in enumerate(dict.fromkeys(tokens))}, merges)


def run_bpe(tokenizer: CLIPTokenizer, word: str) -> list[str]:
    tokenizer.cache.clear()                                 # never an answer left over from another call
    try:
        got = tokenizer.bpe(word)
    except NotImplementedError:
        raise
    except Exception as err:                                # noqa: BLE001 - report, not crash
        fail(BPE, f"bpe({word!r}) raised {type(err).__name__}: {err}")
    if not isinstance(got, list) or not all(isinstance(s, str) for s in got):
        fail(BPE, f"bpe({word!r}) must return a list of str, got {got!r:.80}")
    if "".join(got) != word + END_OF_WORD:
        fail(BPE, f"bpe({word!r}) = {got}: its pieces must spell the word with </w> at the end, they spell "
                  f"{''.join(got)!r}")
    return got


def slow_bpe(ranks: dict[tuple[str, str], int], word: str) -> list[str]:
    """The rule as the chapter states it, one merge at a time: the lowest-ranked neighbouring pair, leftmost first."""
    symbols = [*word[:-1], word[-1] + END_OF_WORD]
    while True:
        ranked = [(ranks[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in ranks]
        if not ranked:
            return symbols
        _, i = min(ranked)
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]


@pytest.mark.task(BPE)
@pytest.mark.points(2)
@pytest.mark.parametrize("merges, word, expected", [
    ([("c", "a"), ("ca", "t</w>")], "cat", ["cat</w>"]),
    ([("a", "t</w>"), ("c", "a"), ("ca", "t</w>")], "cat", ["c", "at</w>"]),          # rank beats order in the word
    ([("c", "a"), ("ca", "t</w>"), ("s", "i"), ("t", "t")], "sitt", ["si", "t", "t</w>"]),   # t t</w> is not (t, t)
    ([("a", "a")], "aaaaa", ["aa", "aa", "a</w>"]),                                 # every occurrence, no overlap
    ([("a", "a"), ("aa", "aa")], "aaaab", ["aaaa", "b</w>"]),
    ([("b", "c"), ("a", "b")], "abcd", ["a", "bc", "d</w>"]),                         # lowest rank, not leftmost
    ([("x", "y")], "abc", ["a", "b", "c</w>"]),                                    # nothing to merge
    ([("a", "b")], "q", ["q</w>"]),                                                # one symbol
])
def test_bpe_merges_by_rank_every_occurrence_and_respects_the_end_of_word_mark(merges, word, expected):
    got = run_bpe(tiny(merges), word)
    if got != expected:
        fail(BPE, f"with merges {merges} in that rank order, bpe({word!r}) = {got}, expected {expected}")


@pytest.mark.task(BPE)
@pytest.mark.points(3)
def test_bpe_equals_the_one_merge_at_a_time_rule_on_clips_vocabulary(shipped):
    rng = random.Random(9)
    words = ["photorealistic", "artstation", "rutkowski", "minildm", "sitting", "lighthouse", "watercolour",
             "astronaut", "hyperdetailed", "unrealengine", "aaaaaaaa", "mississippi", "bookkeeper"]
    words += ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 14)))
              for _ in range(1500)]
    for word in words:
        expected = slow_bpe(shipped.ranks, word)
        got = run_bpe(shipped, word)
        if got != expected:
            fail(BPE, f"bpe({word!r}) with CLIP's merges = {got}, expected {expected}")


@pytest.mark.task(BPE)
@pytest.mark.points(2)
def test_real_prompts_get_the_ids_sd_feeds_clip(shipped, monkeypatch):
    forbid(monkeypatch, BPE, "transformers:CLIPTokenizer")
    for prompt, ids in {"a cat, sitting": [320, 2368, 267, 4919],
                        "a photograph of an astronaut riding a horse": [320, 8853, 539, 550, 18376, 6765, 320, 4558],
                        "trending on artstation": None, "don't": [847, 713]}.items():
        shipped.cache.clear()
        got = shipped.encode(prompt)
        if ids is None:                                     # no ids at hand: the pieces must follow the rule
            ids = [shipped.vocab[t] for w in ("trending", "on", "artstation") for t in slow_bpe(shipped.ranks, w)]
        if got != ids:
            fail(BPE, f"encode({prompt!r}) = {got}, expected {ids}")
