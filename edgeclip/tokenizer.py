"""CLIP's byte-pair-encoding tokenizer without torch, equal to `open_clip.tokenize`.

A port of open_clip's `SimpleTokenizer` with its defaults (clean='lower', no extra special
tokens, truncation that keeps the first `context_length - 1` tokens and ends on
`<end_of_text>`). The merges file is open_clip's `bpe_simple_vocab_16e6.txt.gz`; a bundle
carries its own copy so the runtime does not need open_clip installed.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
from functools import lru_cache
from pathlib import Path

import ftfy
import numpy as np
import regex

from edgeclip.errors import BundleError, EdgeclipError, MissingExtraError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
DEFAULT_CONTEXT_LENGTH = 77
SOT, EOT = "<start_of_text>", "<end_of_text>"
# Merges used by CLIP: the file's first line is a header; the vocabulary is 49408 entries.
_N_MERGES = 49152 - 256 - 2
_PATTERN = regex.compile(
    "|".join([SOT, EOT]) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def default_vocab_path() -> Path:
    """open_clip's copy of the merges file, found without importing open_clip (or torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError("Finding the CLIP tokenizer vocabulary outside a bundle", "train", "open_clip_torch")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / VOCAB_FILE
        if path.is_file():
            return path
    raise EdgeclipError(f"open_clip is installed but its {VOCAB_FILE} is missing; reinstall open_clip_torch")


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clean_text(text: str) -> str:
    """open_clip's 'lower' cleaning: ftfy, HTML entities unescaped twice, whitespace runs
    collapsed, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


class ClipTokenizer:
    """`tokenizer(texts)` -> int64 `[len(texts), context_length]` token ids, zero padded."""

    def __init__(self, vocab_path: Path | str, context_length: int = DEFAULT_CONTEXT_LENGTH) -> None:
        if context_length < 2:
            raise EdgeclipError(f"context_length must be at least 2, not {context_length}")
        path = Path(vocab_path)
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                lines = f.read().split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as err:
            raise BundleError(f"cannot read the tokenizer vocabulary {path}: {err}") from err
        merges = [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]
        if len(merges) != _N_MERGES or any(len(m) != 2 for m in merges):
            raise BundleError(f"{path} is not a CLIP BPE merges file ({len(merges)} merges, expected {_N_MERGES})")
        self.byte_encoder = bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges]
        vocab += [SOT, EOT]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.sot_token_id = self.encoder[SOT]
        self.eot_token_id = self.encoder[EOT]
        self.context_length = context_length
        self._cache: dict[str, list[int]] = {SOT: [self.sot_token_id], EOT: [self.eot_token_id]}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, token: str) -> list[str]:
        """Merge the characters of one pre-token (already byte-mapped) by merge rank."""
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return list(word)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without start/end tokens."""
        ids: list[int] = []
        for piece in _PATTERN.findall(clean_text(text)):
            cached = self._cache.get(piece)
            if cached is None:
                mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
                cached = [self.encoder[t] for t in self._bpe(mapped)]
                self._cache[piece] = cached
            ids.extend(cached)
        return ids

    def __call__(self, texts: list[str] | str) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = self.eot_token_id
            out[row, : len(ids)] = ids
        return out
