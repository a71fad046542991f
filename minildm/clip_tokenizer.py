"""CLIP's tokenizer: byte-level byte-pair encoding (BPE), the prompt -> ids step of real Stable Diffusion.

BPE (Sennrich et al. 2016, as GPT-2 and CLIP use it) starts from single characters and replays a list of merges
learned once from a large corpus: "the pair (c, a) was the most frequent, so it became the symbol ca; then (ca, t)
became cat; ...". To tokenize a word we split it into characters and apply the merges in the order they were
learned (their rank) until no learned pair is left. Frequent words end up as one token ("cat</w>"), rare ones as a
few pieces ("jeky", "ll</w>"), and nothing is ever unknown, because every single character is in the vocabulary.

Three details make CLIP's version what it is:
- Byte-level: the text is UTF-8 bytes, and each of the 256 bytes is shown as one printable character (the table in
  `bytes_to_unicode`), so an emoji or a CJK character is a few byte-symbols, never an unknown token.
- Words first: a regex cuts the cleaned, lower-cased text into words, numbers (one digit each) and runs of
  punctuation; merges never cross those boundaries. `</w>` marks a word's last symbol, so "cat</w>" (a whole word)
  and "cat" (the start of "catalog") are different tokens.
- A fixed window: SD reads 77 positions, [<|startoftext|>, up to 75 tokens, <|endoftext|>, padding...].

The vocabulary (`assets/clip/bpe_simple_vocab_16e6.txt.gz`) is the one OpenAI trained CLIP with; see its README.
"""

from __future__ import annotations

import gzip
import json
import textwrap
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import regex
import torch
from torch import Tensor

VOCAB_GZ = Path(__file__).parent / "assets" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
START, END = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
MAX_LENGTH = 77                       # CLIP's context: start + 75 tokens + end
N_MERGES = 49152 - 256 - 2            # CLIP used the first 48,894 merges: 512 byte symbols + merges + 2 specials
                                      # make a vocabulary of 49,408 ids

# The pre-tokenizer: the common English contractions ('s 't 're 've 'm 'll 'd) as their own pieces, runs of letters
# (any script), single digits ("1990" is four tokens), and runs of anything else that is neither space, letter nor
# digit (punctuation, emoji). Whitespace matches nothing, so it disappears here. CLIP's own pattern also starts with
# the two specials; we cut them out before this pattern runs, so they are left out, and "<|ENDOFTEXT|>" in capitals
# becomes plain "<|", "endoftext", "|>" pieces after lower-casing, exactly as in transformers.
PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """Each of the 256 byte values -> one printable character, so that BPE can work on strings without ever seeing
    a space, a control character or half a UTF-8 sequence.

    The 188 bytes that already print as themselves ('!'..'~', '¡'..'¬', '®'..'ÿ') keep their character; the other
    68 (space, controls, ...) take characters from 256 upward in order: byte 0 -> 'Ā', ..., space (32) -> 'Ġ'.
    The table's order (the printable bytes first, then the others) is the order of the vocabulary's first ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def clean_text(text: str) -> str:
    """What CLIP sees: Unicode NFC (an accent joined to its letter), every run of whitespace one space, lower case.
    (OpenAI's code also runs ftfy to repair broken text; transformers skips it, and so do we.)"""
    text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text))
    # One character at a time, as transformers' (Rust) normalizer lowers: Python's text.lower() would turn a word's
    # final capital sigma into 'ς' and "ΟΔΟΣ" into other ids than diffusers gets; per character it is 'σ' everywhere.
    return "".join(char.lower() for char in text)


def read_clip_merges(path=VOCAB_GZ) -> list[tuple[str, str]]:
    """The merges CLIP used: the first 48,894 lines after the header of OpenAI's bpe_simple_vocab_16e6.txt.gz."""
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    return [tuple(line.split()) for line in lines[1:N_MERGES + 1]]


def clip_vocab(merges: Sequence[tuple[str, str]]) -> list[str]:
    """Token strings in id order, built as CLIP builds them: the 256 byte symbols, the same with </w>, one token per
    merge (its two halves joined), then the two specials (49406 and 49407 with CLIP's merges)."""
    symbols = list(bytes_to_unicode().values())
    return [*symbols, *(s + END_OF_WORD for s in symbols), *("".join(pair) for pair in merges), START, END]


class CLIPTokenizer:
    """Prompts -> ids (B, 77) as Stable Diffusion feeds CLIP's text encoder; equal to transformers' CLIPTokenizer.

    `tokenizer(prompts)` gives [start, tokens..., end, pad...] rows; `encode(text)` the tokens alone; `decode` the
    way back. Build it from the shipped vocabulary (`shipped()`) or a diffusers `tokenizer/` folder (`from_folder`).
    """

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], pad_token: str = END,
                 max_length: int = MAX_LENGTH):
        self.vocab = dict(vocab)                                   # token string -> id
        self.tokens = {i: token for token, i in vocab.items()}     # id -> token string
        self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}    # lower rank = learned earlier
        for token in (START, END, pad_token):
            if token not in self.vocab:
                raise ValueError(f"token {token!r} is not in this vocabulary of {len(vocab)} tokens; a CLIP "
                                 f"vocabulary holds {START} and {END}, and the pad token must be one of its tokens")
        self.start_id, self.end_id, self.pad_id = self.vocab[START], self.vocab[END], self.vocab[pad_token]
        self.max_length = max_length
        self.byte_symbol = bytes_to_unicode()                                   # byte -> printable character
        self.symbol_byte = {s: b for b, s in self.byte_symbol.items()}          # and back, for decode
        self.cache = {}                                          # pre-token (byte symbols) -> its BPE tokens
        # The special tokens are cut out of the raw text before anything else and kept whole, as transformers does
        # with its "added tokens". With SD 2's pad token "!" that means every "!" in a prompt is id 0 (not "!</w>",
        # 256) and "what?!" is three tokens, not two. A quirk of transformers, kept so that our ids equal diffusers';
        # SD 2 itself was trained through open_clip's tokenizer, to which "!" is an ordinary token.
        self.specials = list(dict.fromkeys([START, END, pad_token]))
        longest_first = sorted(self.specials, key=len, reverse=True)
        self.special_pattern = regex.compile("(" + "|".join(regex.escape(t) for t in longest_first) + ")")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @classmethod
    def shipped(cls, pad_token: str = END) -> "CLIPTokenizer":
        """CLIP's own vocabulary, shipped with minildm (a single-file checkpoint carries no tokenizer). Pads with
        the end token, as SD 1's tokenizer does; SD 2's pads with "!" (id 0): `shipped(pad_token="!")`."""
        merges = read_clip_merges()
        return cls({token: i for i, token in enumerate(clip_vocab(merges))}, merges, pad_token=pad_token)

    @classmethod
    def from_folder(cls, folder) -> "CLIPTokenizer":
        """A diffusers/transformers `tokenizer/` folder: vocab.json, merges.txt, and the pad token and length from
        tokenizer_config.json or special_tokens_map.json when present (SD 2 pads with "!", id 0)."""
        folder = Path(folder)
        missing = [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: missing {' and '.join(missing)}; a CLIP tokenizer folder holds "
                                    f"vocab.json and merges.txt (as in a diffusers pipeline's tokenizer/); copy them "
                                    f"there or use CLIPTokenizer.shipped()")
        vocab = read_json_file(folder / "vocab.json")
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise ValueError(f"{folder / 'vocab.json'}: expected {{token: id, ...}}; restore the file from the "
                             f"pipeline it came from")
        lines = [line for line in (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
                 if line and not line.startswith("#version")]                   # "#version: 0.2", then "i n", ...
        bad = [line for line in lines if len(line.split()) != 2]
        if bad:
            raise ValueError(f"{folder / 'merges.txt'}: every line after '#version' must be two symbols separated by "
                             f"a space, got {bad[0]!r:.40}; restore the file from the pipeline it came from")
        merges = [tuple(line.split()) for line in lines]
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):    # the second wins, as in transformers
            if (folder / name).is_file():
                config.update(read_json_file(folder / name))
        pad = config.get("pad_token", END)
        pad = pad.get("content", END) if isinstance(pad, dict) else pad       # {"content": "!", ...} or "!"
        length = config.get("model_max_length", MAX_LENGTH)
        length = length if isinstance(length, int) and 2 <= length <= 10_000 else MAX_LENGTH   # some say 1e30
        return cls(vocab, merges, pad_token=pad, max_length=length)

    def bpe(self, word: str) -> list[str]:
        """One pre-token (already byte symbols) -> its BPE tokens, merging the lowest-ranked pair first."""
        if word in self.cache:
            return self.cache[word]
        symbols = [*word[:-1], word[-1] + END_OF_WORD]            # "cat" -> ["c", "a", "t</w>"]
        # BEGIN SOLUTION ch09.bpe_merge
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break                                             # no learned merge left: done
            merged, i = [], 0
            while i < len(symbols):                               # merge every occurrence, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        # END SOLUTION
        self.cache[word] = symbols
        return symbols

    def tokenize(self, text: str) -> list[str]:
        """Text -> token strings: cut out the specials, clean the rest, cut it into pre-tokens, show each as byte
        symbols, run BPE on each."""
        tokens = []
        for part in self.special_pattern.split(text):            # "hi!" -> ["hi", "!", ""] when "!" is special
            if part in self.specials:
                tokens.append(part)
                continue
            for piece in PATTERN.findall(clean_text(part)):
                tokens.extend(self.bpe("".join(self.byte_symbol[b] for b in piece.encode("utf-8"))))
        return tokens

    def encode(self, text: str) -> list[int]:
        """Text -> ids, without the start and end tokens and without truncation: "a cat" -> [320, 2368]."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes one str, got {type(text).__name__}; for a batch call the tokenizer")
        return [self.vocab[token] for token in self.tokenize(text)]

    def __call__(self, prompts: str | Sequence[str]) -> Tensor:
        """Prompts -> ids (B, max_length): [start, first max_length - 2 tokens, end, pad...], as SD tokenizes."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a str or a non-empty list of str, got {prompts!r:.80}; '' is the "
                             f"empty prompt")
        ids = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)      # (B, L)
        for row, prompt in enumerate(prompts):
            tokens = [self.start_id, *self.encode(prompt)[:self.max_length - 2], self.end_id]   # truncate, keep end
            ids[row, :len(tokens)] = torch.tensor(tokens)
        return ids

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """ids (one row) -> text: tokens up to the first end token, start dropped, each </w> a space."""
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        if ids and isinstance(ids[0], list):
            raise ValueError(f"decode takes one row of ids, got {len(ids)} rows; decode each row")
        ids = ids[:ids.index(self.end_id)] if self.end_id in ids else ids
        bad = [i for i in ids if i not in self.tokens]
        if bad:
            raise ValueError(f"id {bad[0]} is not in this vocabulary of {self.vocab_size} tokens; decode ids made by "
                             f"the same tokenizer")
        symbols = "".join(self.tokens[i] for i in ids if i != self.start_id)
        text = bytes(self.symbol_byte[s] for s in symbols).decode("utf-8", errors="replace")
        return text.replace(END_OF_WORD, " ").strip()

    def save(self, folder) -> None:
        """Write a transformers-style folder (vocab.json, merges.txt, tokenizer_config.json) that from_folder and
        transformers' CLIPTokenizer.from_pretrained both read."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        merges = sorted(self.ranks, key=self.ranks.get)
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                           encoding="utf-8")
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length, "bos_token": START,
                  "eos_token": END, "unk_token": END, "pad_token": self.tokens[self.pad_id]}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")


def read_json_file(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({textwrap.shorten(str(error), 60)}); restore the file from the "
                         f"pipeline it came from") from None
