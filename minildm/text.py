"""Chapter 05: from a caption to the context c (B, L, D) that the U-Net's cross-attention reads.

Stable Diffusion v1 reads CLIP's text model (Radford et al. 2021): a tokenizer turns the prompt into a fixed-length
row of ids, [<bos>, words..., <eos>, <pad>...], and a causal transformer turns the ids into one vector per position.
For Shapes captions we build the same two pieces, small enough to read and train on a laptop: a word-level tokenizer
whose vocabulary is every word data.py's captions can hold, and a two-block transformer.
"""

from __future__ import annotations

import difflib
import itertools
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from minildm.attention import MultiHeadAttention
from minildm.checkpoint import config_from_dict, load_config, load_weights_into
from minildm.data import COLOURS, POSITION_WORDS, SHAPE_KINDS, SIZE_WORDS, ShapeFactors, caption
from minildm.saving import model_files, read_json, recover_interrupted_save, write_folder_atomically

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")   # ids 0, 1, 2: padding is id 0, so a fresh tensor of zeros is padding
PAD_ID, BOS_ID, EOS_ID = range(3)
# The longest one-object caption has 8 words ("a medium purple triangle at the bottom right"); n objects joined by
# "and" have 9n - 1, so two objects take 17 + <bos> + <eos> = 19 tokens and three (the most tests/test_data.py
# draws) 28. 32 holds three objects with room to spare, and is still tiny next to CLIP's 77.
MAX_LENGTH = 32
VOCAB_NAME = "vocab.json"


def split_words(prompt: str) -> list[str]:
    """Lowercase, punctuation becomes a space, split on whitespace: "A red, circle!" -> ["a", "red", "circle"]."""
    return re.sub(r"[^\w\s]", " ", prompt.lower()).split()


def caption_words() -> list[str]:
    """Every word a Shapes caption can hold, found by describing one object of every kind, colour, size and place.

    Asking data.py's own `caption` instead of listing the words again keeps the vocabulary in step with the data.
    """
    sizes = [limit - 1e-3 for limit, _ in SIZE_WORDS]            # just under each limit: one size per size word
    thirds = [(i + 0.5) / len(POSITION_WORDS) for i in range(len(POSITION_WORDS))]   # the middle of each third
    objects = [ShapeFactors(kind, colour, size, x, y, 0.0)
               for kind, colour, size, x, y in itertools.product(SHAPE_KINDS, COLOURS, sizes, thirds, thirds)]
    return sorted(set(split_words(caption({"objects": objects}))))  # joined by "and", so "and" is in too


@runtime_checkable
class PromptTokenizer(Protocol):
    """What the pipeline asks of a tokenizer, whichever it is (this file's Shapes words, or CLIP's BPE in
    clip_tokenizer.py): prompts -> ids (B, max_length), and the vocabulary's size for the encoder's embedding.
    A tokenizer that can meet a word it does not know also has `unknown_words(prompts) -> list[str]`, which the
    pipeline calls to refuse such prompts up front; CLIP's byte-level BPE knows every string and has none."""

    max_length: int

    @property
    def vocab_size(self) -> int: ...

    def __call__(self, prompts: str | Sequence[str]) -> Tensor: ...


class TokenBatch(NamedTuple):
    ids: Tensor     # (B, L) long: [<bos>, words..., <eos>, <pad>...]
    mask: Tensor    # (B, L) bool: True at <bos>, the words and <eos>; False at padding


class Tokenizer:
    """Words -> ids, CLIP's layout. `words` (default: every caption word) and then `extra_words` follow the
    special tokens, in that order, so extending the vocabulary never moves an existing word's id."""

    def __init__(self, words: Sequence[str] | None = None, extra_words: Sequence[str] = (),
                 max_length: int = MAX_LENGTH):
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (room for <bos> and <eos>), got {max_length}")
        for word in extra_words:
            if split_words(word) != [word]:
                raise ValueError(f"extra word {word!r} is not one lowercase word without punctuation, so no prompt "
                                 f"could produce it; give single words like 'pink'")
        words = caption_words() if words is None else list(words)
        self.words = list(dict.fromkeys([*SPECIAL_TOKENS, *words, *extra_words]))   # in order, without repeats
        self.ids = {word: i for i, word in enumerate(self.words)}
        self.max_length = max_length

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def word_ids(self, prompt: str) -> list[int]:
        words = split_words(prompt)
        if len(words) > self.max_length - 2:
            raise ValueError(f"prompt {textwrap.shorten(prompt, 40)!r} has {len(words)} words but max_length="
                             f"{self.max_length} leaves room for {self.max_length - 2} (plus <bos> and <eos>); shorten "
                             f"it or use Tokenizer(max_length=...) with an encoder of that length")
        for word in words:
            if word not in self.ids:
                close = difflib.get_close_matches(word, self.words[len(SPECIAL_TOKENS):], n=3)
                raise ValueError(f"unknown word {word!r} in prompt {textwrap.shorten(prompt, 60)!r}; the vocabulary "
                                 f"has {self.vocab_size} words (closest: {', '.join(close) or 'none'}); extend it with "
                                 f"Tokenizer(extra_words=[{word!r}]) and train the encoder with it")
        return [self.ids[word] for word in words]

    def unknown_words(self, prompts: Sequence[str]) -> list[str]:
        """The words of `prompts` that are not in the vocabulary, sorted, without repeats."""
        return sorted({word for prompt in prompts for word in split_words(prompt) if word not in self.ids})

    def __call__(self, prompts: str | Sequence[str]) -> Tensor:
        """Prompts -> ids (B, L), the PromptTokenizer interface."""
        return self.encode(prompts).ids

    def encode(self, prompts: str | Sequence[str]) -> TokenBatch:
        """Prompts -> ids and mask, (B, L). A single string is a batch of one; "" is the empty prompt of CFG."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode needs at least one prompt, got an empty list; pass [''] for the empty prompt")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be strings, got {[type(p).__name__ for p in prompts]}")
        ids = torch.full((len(prompts), self.max_length), PAD_ID, dtype=torch.long)          # (B, L)
        for row, prompt in enumerate(prompts):
            tokens = [BOS_ID, *self.word_ids(prompt), EOS_ID]
            ids[row, :len(tokens)] = torch.tensor(tokens)
        return TokenBatch(ids, ids != PAD_ID)

    def decode(self, ids: Tensor | Sequence[Sequence[int]]) -> list[str]:
        """ids (B, L) -> one string per row: the words between <bos> and the first <eos>."""
        if isinstance(ids, Tensor) and ids.ndim != 2:
            raise ValueError(f"decode expects ids of shape (B, L), got {tuple(ids.shape)}; for one row pass ids[None]")
        rows = ids.tolist() if isinstance(ids, Tensor) else [list(row) for row in ids]
        bad = [i for row in rows for i in row if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"id {bad[0]} is outside this vocabulary of {self.vocab_size} words; decode ids made "
                             f"by the same tokenizer")
        rows = [row[:row.index(EOS_ID)] if EOS_ID in row else row for row in rows]
        return [" ".join(self.words[i] for i in row if i >= len(SPECIAL_TOKENS)) for row in rows]

    @classmethod
    def from_folder(cls, folder) -> "Tokenizer":
        """The tokenizer saved beside a text encoder by `save_text_encoder` (its vocab.json)."""
        recover_interrupted_save(folder)
        path = Path(folder) / VOCAB_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; a text encoder folder saved by save_text_encoder holds it")
        saved = read_json(path)
        words = saved.get("words") if isinstance(saved, dict) else None
        max_length = saved.get("max_length") if isinstance(saved, dict) else None
        if (not isinstance(words, list) or not all(isinstance(w, str) for w in words)
                or tuple(words[:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS or not isinstance(max_length, int)):
            raise ValueError(f"{path}: expected {{\"words\": [{', '.join(SPECIAL_TOKENS)}, words...], \"max_length\": "
                             f"an integer}}; restore the file from where it came (its ids must match the encoder)")
        tokenizer = cls(words=words[len(SPECIAL_TOKENS):], max_length=max_length)
        if tokenizer.words != words:          # a repeated word would shift every later id
            raise ValueError(f"{path}: the vocabulary repeats a word, so its ids are ambiguous; restore the file from "
                             f"where it came")
        return tokenizer


ACTIVATIONS = ("gelu", "quick_gelu")


@dataclass
class TextEncoderConfig:
    """Everything needed to rebuild the text encoder; vocab_size and max_length come from the tokenizer.

    The last four fields make it CLIP's text model as Stable Diffusion reads it (`sd_v1`, `sd_v2`); their defaults
    are the Shapes encoder's, which predates them (checkpoint.ADDED_FIELDS says so for configs saved without them).
    """

    vocab_size: int
    max_length: int = MAX_LENGTH
    dim: int = 64           # D, the width of the context the U-Net's cross-attention reads
    depth: int = 2          # transformer blocks
    heads: int = 4
    mlp_ratio: int = 4      # the MLP's hidden width is mlp_ratio * dim, unless intermediate_size says otherwise
    activation: str = "gelu"                # or "quick_gelu", x * sigmoid(1.702 x): OpenAI's CLIP (SD 1)
    intermediate_size: int | None = None    # the MLP's hidden width; None: mlp_ratio * dim
    layer_norm_eps: float = 1e-5
    output_layer: int = -1  # which block's output goes through the final norm: -1 the last, -2 the one before (SD 2)

    def __post_init__(self):
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}; each head takes dim / heads "
                             f"channels, so pick e.g. dim={self.heads * 16}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {ACTIVATIONS}; CLIP ViT-L (SD 1) uses "
                             f"'quick_gelu', OpenCLIP ViT-H (SD 2) 'gelu'")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise ValueError(f"intermediate_size must be a positive width or None (mlp_ratio * dim), "
                             f"got {self.intermediate_size}")
        if not -self.depth <= self.output_layer <= -1:
            raise ValueError(f"output_layer {self.output_layer} names no block of {self.depth}: use -1 (the last "
                             f"block's output) down to {-self.depth}; SD 2 reads -2")

    @property
    def mlp_width(self) -> int:
        return self.intermediate_size or self.mlp_ratio * self.dim

    @classmethod
    def sd_v1(cls) -> "TextEncoderConfig":
        """OpenAI's CLIP ViT-L/14 text model, Stable Diffusion 1.x's: 123,060,480 parameters."""
        return cls(vocab_size=49408, max_length=77, dim=768, depth=12, heads=12, activation="quick_gelu",
                   intermediate_size=3072)

    @classmethod
    def sd_v2(cls) -> "TextEncoderConfig":
        """OpenCLIP ViT-H/14's text model as Stable Diffusion 2.x reads it: the penultimate block's output."""
        return cls(vocab_size=49408, max_length=77, dim=1024, depth=24, heads=16, activation="gelu",
                   intermediate_size=4096, output_layer=-2)

    @classmethod
    def from_dict(cls, d: dict, source=None) -> "TextEncoderConfig":
        """Exactly the saved config: a missing or unknown field is an error naming `source` (checkpoint.py)."""
        return config_from_dict(cls, d, source)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): OpenAI's cheaper approximation of GELU, which CLIP (and so SD 1) was trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class TextTransformerBlock(nn.Module):
    """Pre-LayerNorm block, as in CLIP and GPT-2: each sub-layer reads a normalised copy and adds to the residual."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        dim, width, eps = config.dim, config.mlp_width, config.layer_norm_eps
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = MultiHeadAttention(dim, config.heads, dim // config.heads, qkv_bias=True)   # CLIP: q, k, v biases
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        act = QuickGELU() if config.activation == "quick_gelu" else nn.GELU()
        self.mlp = nn.Sequential(nn.Linear(dim, width), act, nn.Linear(width, dim))

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        h = h + self.attn(self.norm1(h), mask=mask)      # (B, L, D)
        return h + self.mlp(self.norm2(h))               # (B, L, D)


class TextEncoder(nn.Module):
    """ids (B, L) -> context c (B, L, D): token + position embeddings, `depth` causal transformer blocks, a LayerNorm.

    The attention is causal, as in CLIP's text model: position i sees positions 0..i only, so its vector depends on
    the prompt so far and never on what follows. That also makes a padding mask unnecessary: padding comes after
    <eos>, so no position up to <eos> can see it. The padding positions still see the whole prompt and carry it
    along; SD's U-Net reads all L positions, padding included, and so does ours.
    """

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.position_embedding = nn.Embedding(config.max_length, config.dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)        # CLIP's initialisation
        nn.init.normal_(self.position_embedding.weight, std=0.01)
        self.blocks = nn.ModuleList(TextTransformerBlock(config) for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        # causal[i, j] = (j <= i): True = may attend. A buffer so it follows .to(device), but not saved.
        causal = torch.ones(config.max_length, config.max_length, dtype=torch.bool).tril()   # (L, L)
        self.register_buffer("causal_mask", causal, persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        self.check_ids(ids)
        positions = torch.arange(ids.shape[1], device=ids.device)                  # (L,)
        h = self.token_embedding(ids) + self.position_embedding(positions)         # (B, L, D)
        # output_layer -1 runs every block; -2 (SD 2) stops one short, so the last block's weights go unused
        for block in self.blocks[:len(self.blocks) + 1 + self.config.output_layer]:
            h = block(h, self.causal_mask)                                         # (B, L, D)
        return self.final_norm(h)                                                  # c: (B, L, D)

    def check_ids(self, ids: Tensor) -> None:
        L, vocab = self.config.max_length, self.config.vocab_size
        if not isinstance(ids, Tensor) or ids.dtype != torch.long or ids.ndim != 2 or ids.shape[1] != L:
            given = f"{ids.dtype} ids of shape {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"expected long ids of shape (B, {L}), got {given}; "
                             f"make them with Tokenizer(max_length={L}).encode(prompts).ids")
        if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"ids must lie in [0, {vocab}), got values from {ids.min().item()} to "
                             f"{ids.max().item()}; use the tokenizer this encoder was built for")

    def encode_prompts(self, tokenizer: PromptTokenizer, prompts: str | Sequence[str],
                       device: torch.device | str | None = None) -> Tensor:
        """Prompts -> context (B, L, D) in one call, on `device` (default: where the encoder's weights are)."""
        device = self.token_embedding.weight.device if device is None else device
        return self(tokenizer(prompts).to(device))

    @classmethod
    def from_folder(cls, folder) -> "TextEncoder":
        """A model folder (config.json + model.safetensors) -> the encoder, on the CPU, weights checked strictly."""
        return load_weights_into(cls(load_config(TextEncoderConfig, folder)), folder)


def text_encoder_files(encoder: TextEncoder, tokenizer: Tokenizer) -> dict:
    """The encoder's model folder, with its tokenizer's vocabulary (vocab.json): ids mean nothing without it."""
    config = encoder.config
    if (tokenizer.vocab_size, tokenizer.max_length) != (config.vocab_size, config.max_length):
        raise ValueError(f"the tokenizer ({tokenizer.vocab_size} words, max_length {tokenizer.max_length}) does not "
                         f"fit the encoder ({config.vocab_size}, {config.max_length}); save the pair that was trained")
    vocab = {"words": tokenizer.words, "max_length": tokenizer.max_length}
    return model_files(encoder, config, extra_files={VOCAB_NAME: vocab})


def save_text_encoder(folder, encoder: TextEncoder, tokenizer: Tokenizer) -> Path:
    """Save the encoder and its vocabulary as a model folder."""
    return write_folder_atomically(folder, text_encoder_files(encoder, tokenizer), kind="model")
