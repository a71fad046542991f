"""benchmarks/word_noise_levels.py: the captions it edits change exactly one word (chapter 06)."""

from __future__ import annotations

import numpy as np
import pytest
from benchscript import load_benchmark

from minildm.data import ShapeFactors, ShapesDataset
from minildm.judge import factor_words

word_noise_levels = load_benchmark("word_noise_levels")


def caption_words(caption: str) -> dict[str, str]:
    """'a small red circle at the top left' -> its four words (the shape of ShapeFactors.describe's captions)."""
    a, size, colour, kind, *place = caption.split()
    assert a == "a" and place[:2] in (["at", "the"], ["in", "the"]), caption
    return {"kind": kind, "colour": colour, "size": size, "position": " ".join(place[2:])}


@pytest.mark.parametrize("word", ["kind", "colour", "size", "position"])
def test_an_edit_changes_that_word_and_keeps_the_other_three(word):
    rng = np.random.default_rng(0)
    data = ShapesDataset(60, seed=5)
    new_values = set()
    for i in range(len(data)):
        scene = data.factors(i)
        before = {w: v for w, v in factor_words(scene).items() if w != "background"}
        assert caption_words(data[i]["caption"]) == before
        edited, new = word_noise_levels.edited_caption(scene, word, rng)
        after = caption_words(edited)
        assert after[word] == new != before[word]
        assert {w: v for w, v in after.items() if w != word} == {w: v for w, v in before.items() if w != word}
        new_values.add(new)
    assert len(new_values) > 2                     # the new value is drawn, not always the same one


def test_size_and_position_edits_follow_the_data_s_own_draws():
    rng = np.random.default_rng(0)
    # a large shape's margin (0.9 x its circumradius) keeps its centre near the middle: of the eight other places, the
    # data puts it at a side's middle (left, right, top, bottom) far more often than in a corner
    large = ShapeFactors(kind="circle", colour="red", size=0.40, x=0.5, y=0.5, rotation=0.0)
    scene = {"background": "dark", "objects": [large]}
    places = [word_noise_levels.edited_caption(scene, "position", rng)[1] for _ in range(200)]
    sides = sum(place in ("left", "right", "top", "bottom") for place in places)
    assert sides > 150 and "centre" not in places


def test_an_unknown_word_is_refused():
    scene = ShapesDataset(1, seed=5).factors(0)
    with pytest.raises(ValueError, match="unknown word 'background'"):
        word_noise_levels.edited_caption(scene, "background", np.random.default_rng(0))


def test_the_strengths_step_by_two_and_end_at_the_whole_run():
    assert word_noise_levels.strength_grid(25) == [k / 25 for k in range(2, 25, 2)] + [1.0]
    assert word_noise_levels.strength_grid(10) == [0.2, 0.4, 0.6, 0.8, 1.0]
