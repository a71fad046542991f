"""CLIP's BPE tokenizer (minildm/clip_tokenizer.py) gives the same ids as transformers' CLIPTokenizer built from the
same vocabulary: on punctuation, digits, contractions, accents, CJK, emoji, the empty prompt, long prompts
(truncated to 75 tokens + the end token) and SD 2's pad id 0. transformers runs offline from vocab.json + merges.txt
that this test writes from the shipped .gz; its comparisons skip when transformers is not installed."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from minildm.clip_tokenizer import END, START, VOCAB_GZ, CLIPTokenizer, bytes_to_unicode
from minildm.pipeline import LatentDiffusion
from minildm.text import PromptTokenizer, Tokenizer

PROMPTS = [
    "", " ", "a photo of a cat", "a cat, sitting", "A Photo Of A CAT", "ASTRONAUT RIDING A HORSE",
    "a   cat \t\n on   a mat  ", "  leading and trailing spaces  ",
    "hello, world!", "what?!", "wow... really?", "(masterpiece), [best quality], {detailed}", "a/b\\c|d",
    "cost: $1,299.99 (50% off)", "#hashtag @user &amp; <html>", "email@example.com", "snake_case-and-kebab",
    "1990", "3d render, 4k, 8k uhd", "2+2=4", "0.5x", "version 1.2.3",
    "don't", "I'll be there", "it's, they're, we've, I'm, she'd", "DON'T STOP", "rock 'n' roll", "o'clock",
    "café crème brûlée", "naïve façade", "Ångström über São Paulo", "e\u0301cole (decomposed accent)",
    "猫が座っている", "一只猫坐在垫子上", "고양이", "кошка сидит на ковре", "ΟΔΟΣ", "مرحبا", "नमस्ते",
    "🐱", "a cat 🐱🐶 and a dog", "👨‍👩‍👧 family", "✨sparkles✨", "♥♥♥",
    "tab\there", "new\nline", "zero\u200bwidth", "non\u00a0breaking space",
    "supercalifragilisticexpialidocious", "a highly detailed digital painting of a lighthouse by the sea at dusk",
    "wow!!! amazing!", "the end <|endoftext|> after", "<|startoftext|>start", "<|ENDOFTEXT|> upper",
    "a photo of a cat " * 20,                                                  # 100 tokens: truncated to 75
]


def write_folder(folder, pad_token: str = END):
    """vocab.json + merges.txt + tokenizer_config.json written straight from the .gz, as CLIP builds its vocab."""
    lines = gzip.open(VOCAB_GZ, "rt", encoding="utf-8").read().split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [line.replace(" ", "") for line in lines] + [START, END]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 77, "bos_token": START, "eos_token": END, "unk_token": END, "pad_token": pad_token}))
    return folder


@pytest.fixture(scope="module")
def ours():
    return CLIPTokenizer.shipped()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_tokenizer")
    return {"sd1": write_folder(root / "sd1"), "sd2": write_folder(root / "sd2", pad_token="!")}


@pytest.fixture(scope="module")
def theirs(folders):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")            # a local folder; never reach for the Hub
        transformers = pytest.importorskip("transformers")
        yield {name: transformers.CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
               for name, path in folders.items()}


def their_ids(tokenizer, prompts):
    out = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    return out.input_ids


def test_shipped_vocabulary_has_clips_size_and_special_ids(ours):
    assert ours.vocab_size == 49408
    assert (ours.start_id, ours.end_id, ours.pad_id) == (49406, 49407, 49407)
    assert ours.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]     # the ids every SD tutorial prints


@pytest.mark.oracle
def test_ids_equal_transformers_on_every_prompt(ours, theirs):
    assert len(PROMPTS) >= 40
    expected = their_ids(theirs["sd1"], PROMPTS)
    got = ours(PROMPTS)
    assert got.shape == expected.shape == (len(PROMPTS), 77)
    wrong = [(p, got[i].tolist(), expected[i].tolist()) for i, p in enumerate(PROMPTS)
             if not torch.equal(got[i], expected[i])]
    assert not wrong, f"{len(wrong)} prompts differ, first: {wrong[0]}"


@pytest.mark.oracle
def test_encode_without_specials_equals_transformers(ours, theirs):
    for prompt in PROMPTS[:-1]:
        assert ours.encode(prompt) == theirs["sd1"].encode(prompt, add_special_tokens=False), prompt


@pytest.mark.oracle
def test_sd2_folder_pads_with_id_0_like_transformers(folders, theirs):
    sd2 = CLIPTokenizer.from_folder(folders["sd2"])
    assert sd2.pad_id == 0
    ids = sd2(PROMPTS)
    assert torch.equal(ids, their_ids(theirs["sd2"], PROMPTS))
    assert ids[0].tolist() == [49406, 49407] + [0] * 75           # the empty prompt: start, end, then "!" padding
    assert sd2.encode("what?!") == [768, 286, 0]                  # the pad token "!" is cut out whole, as in diffusers
    assert torch.equal(CLIPTokenizer.shipped(pad_token="!")(PROMPTS), ids)


def test_prompt_past_77_tokens_keeps_75_tokens_and_the_end_token(ours):
    long = "a photo of a cat " * 20
    assert len(ours.encode(long)) == 100
    ids = ours(long)[0]
    assert ids[0] == 49406 and ids[-1] == 49407
    assert ids[1:-1].tolist() == ours.encode(long)[:75]


def test_folder_tokenizer_equals_the_shipped_one(ours, folders):
    from_folder = CLIPTokenizer.from_folder(folders["sd1"])
    assert from_folder.vocab == ours.vocab and from_folder.ranks == ours.ranks and from_folder.pad_id == 49407


def test_save_then_from_folder_round_trips(ours, tmp_path):
    ours.save(tmp_path)
    again = CLIPTokenizer.from_folder(tmp_path)
    assert again.vocab == ours.vocab and again.ranks == ours.ranks and again.pad_id == ours.pad_id
    assert torch.equal(again(PROMPTS[:10]), ours(PROMPTS[:10]))


def test_decode_inverts_encode_up_to_cleaning(ours):
    assert ours.decode(ours("A photo of a  Cat, 🐱!")[0]) == "a photo of a cat , 🐱!"    # one token "🐱!"
    assert ours.decode(ours.encode("café 猫")) == "café 猫"


def test_both_tokenizers_satisfy_the_pipeline_interface(ours):
    shapes = Tokenizer()
    for tokenizer in (shapes, ours):
        ids = tokenizer(["a red circle", ""])
        assert ids.dtype == torch.long and ids.shape == (2, tokenizer.max_length)
        assert int(ids.max()) < tokenizer.vocab_size
        assert isinstance(tokenizer, PromptTokenizer)
    assert shapes.unknown_words(["a red zebra", "a blue circle"]) == ["zebra"]
    assert not hasattr(ours, "unknown_words")


def test_check_prompts_accepts_any_text_with_a_tokenizer_that_knows_every_string(ours):
    pipe = LatentDiffusion.__new__(LatentDiffusion)           # check_prompts reads only the tokenizer
    pipe.tokenizer = ours
    assert pipe.check_prompts(["a zebra 🦓", ""]) == ["a zebra 🦓", ""]
    pipe.tokenizer = Tokenizer()
    with pytest.raises(ValueError, match="unknown words 'zebra'"):
        pipe.check_prompts("a zebra")


def test_folder_missing_merges_is_one_clear_line(folders, tmp_path):
    (tmp_path / "vocab.json").write_bytes((folders["sd1"] / "vocab.json").read_bytes())
    with pytest.raises(FileNotFoundError) as error:
        CLIPTokenizer.from_folder(tmp_path)
    message = str(error.value)
    assert "\n" not in message and f"{tmp_path}: missing merges.txt;" in message    # what, where, and only that
    assert "CLIPTokenizer.shipped()" in message                                   # what to do


def test_folder_whose_pad_token_is_not_in_the_vocabulary_is_refused(folders, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((folders["sd1"] / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(ValueError, match="'<pad>' is not in this vocabulary"):
        CLIPTokenizer.from_folder(tmp_path)


def test_non_string_prompts_are_refused(ours):
    with pytest.raises(ValueError, match="prompts must be a str"):
        ours([1, 2])
    with pytest.raises(ValueError, match="prompts must be a str"):
        ours([])


def test_folder_with_a_broken_merges_line_is_one_clear_line(folders, tmp_path):
    (tmp_path / "vocab.json").write_bytes((folders["sd1"] / "vocab.json").read_bytes())
    (tmp_path / "merges.txt").write_text("#version: 0.2\ni n\nt h e\n", encoding="utf-8")
    with pytest.raises(ValueError, match="merges.txt: every line .* got 't h e'") as error:
        CLIPTokenizer.from_folder(tmp_path)
    assert "\n" not in str(error.value)
