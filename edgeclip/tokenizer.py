"""The runtime's tokenizers, without torch, equal to open_clip's for each model family.

Two kinds, chosen by the bundle manifest's ``backbone.text`` (written by ``edgeclip init`` from the
model's own open_clip config, see ``edgeclip.train.backbone.text_side``):

- ``clip-bpe``: a port of open_clip's ``SimpleTokenizer`` (CLIP, MobileCLIP, EVA, ConvNeXt, ...):
  cleaning ``lower`` by default (or ``whitespace``/``canonicalize`` when the config says so), no
  extra special tokens, truncation that keeps the first ``context_length - 1`` tokens and ends on
  ``<end_of_text>``, zero padding. The merges file is open_clip's ``bpe_simple_vocab_16e6.txt.gz``;
  a bundle carries its own copy so the runtime does not need open_clip installed.
- ``hf``: a Hugging Face ``tokenizer.json`` run by the ``tokenizers`` library (SigLIP/SigLIP2,
  CLIPA, ...), with open_clip's ``HFTokenizer`` rules: clean, then encode with the file's own
  special tokens, truncate and pad to ``context_length`` with the model's pad id; optionally the
  separator token replaced by 0 (``strip_sep_token``, CLIPA). The file is stored in the bundle.
"""

from __future__ import annotations

import gzip
import zlib
import html
import importlib.util
import string
from functools import lru_cache
from pathlib import Path

import ftfy
import numpy as np
import regex

from edgeclip.errors import BundleError, EdgeclipError, MissingExtraError
from edgeclip.manifest import TextSide

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
DEFAULT_CONTEXT_LENGTH = 77
SOT, EOT = "<start_of_text>", "<end_of_text>"
# Merges used by CLIP: the file's first line is a header; the vocabulary is 49408 entries.
_N_MERGES = 49152 - 256 - 2
# The largest tokenizer file read (unpacked): CLIP's merges are 1.3 MB, a tokenizer.json a few MB.
MAX_TOKENIZER_BYTES = 64 << 20
_PATTERN = regex.compile(
    "|".join([SOT, EOT]) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def default_vocab_path() -> Path:
    """open_clip's copy of the merges file, found without importing open_clip (or torch).

    Raises MissingExtraError without open_clip, EdgeclipError when its vocabulary file is missing."""
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


CLEANINGS = ("lower", "whitespace", "canonicalize")
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _basic_clean(text: str) -> str:
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def clean_text(text: str, clean: str = "lower") -> str:
    """open_clip's cleaning functions (``open_clip.tokenizer.get_clean_fn``).

    All start with ftfy and HTML entities unescaped twice, then: ``lower`` collapses whitespace
    runs and lower-cases; ``whitespace`` only collapses whitespace; ``canonicalize`` (SigLIP,
    big_vision) replaces '_' by ' ', removes ASCII punctuation, lower-cases, collapses whitespace.
    Raises ``EdgeclipError`` for another name."""
    text = _basic_clean(text)
    if clean == "lower":
        return " ".join(text.split()).strip().lower()
    if clean == "whitespace":
        return " ".join(text.split()).strip()
    if clean == "canonicalize":
        text = text.replace("_", " ").translate(_NO_PUNCTUATION).lower()
        return " ".join(text.split()).strip()
    raise EdgeclipError(f"Unknown text cleaning '{clean}'; expected one of {', '.join(CLEANINGS)}")


class ClipTokenizer:
    """`tokenizer(texts)` -> int64 `[len(texts), context_length]` token ids, zero padded."""

    def __init__(self, vocab_path: Path | str, context_length: int = DEFAULT_CONTEXT_LENGTH,
                 clean: str = "lower") -> None:
        """`vocab_path`: CLIP's gzipped BPE merges file. Raises EdgeclipError for `context_length`
        < 2 or an unknown `clean`, BundleError when the file is unreadable or not CLIP's merges."""
        if context_length < 2:
            raise EdgeclipError(f"context_length must be at least 2, not {context_length}")
        if clean not in CLEANINGS:
            raise EdgeclipError(f"Unknown text cleaning '{clean}'; expected one of {', '.join(CLEANINGS)}")
        self.clean = clean
        path = Path(vocab_path)
        try:
            with gzip.open(path, "rb") as f:
                data = f.read(MAX_TOKENIZER_BYTES + 1)  # bounded: a gzip bomb stops here
            if len(data) > MAX_TOKENIZER_BYTES:
                raise BundleError(f"{path} unpacks to more than {MAX_TOKENIZER_BYTES >> 20} MiB: not a CLIP BPE "
                                  "merges file")
            lines = data.decode("utf-8").split("\n")
        except (OSError, EOFError, UnicodeDecodeError, zlib.error) as err:
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
        """Number of tokens in the BPE vocabulary (49408 for CLIP)."""
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
        for piece in _PATTERN.findall(clean_text(text, self.clean)):
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


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` with open_clip's ``HFTokenizer`` rules, torch-free.

    `tokenizer(texts)` -> int64 ``[len(texts), context_length]``: each text cleaned (``clean``),
    encoded with the file's special tokens (its post-processor, e.g. T5's trailing ``</s>``),
    truncated to ``context_length`` (room kept for the special tokens, as transformers does) and
    padded with ``pad_id`` on ``padding_side``; with ``strip_sep_id`` every separator token
    becomes 0 (open_clip's ``strip_sep_token``, CLIPA). Raises ``BundleError`` for a file that is
    not a tokenizer, ``MissingExtraError`` without the ``tokenizers`` package.
    """

    def __init__(self, path: Path | str, context_length: int, clean: str = "whitespace", pad_id: int = 0,
                 strip_sep_id: int | None = None, padding_side: str = "right",
                 truncation_side: str = "right") -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - a core dependency
            raise MissingExtraError("Hugging Face tokenizers (SigLIP, CLIPA)", "train", "tokenizers") from exc
        if context_length < 2:
            raise EdgeclipError(f"context_length must be at least 2, not {context_length}")
        if clean not in CLEANINGS:
            raise EdgeclipError(f"Unknown text cleaning '{clean}'; expected one of {', '.join(CLEANINGS)}")
        path = Path(path)
        try:
            size = path.stat().st_size
        except OSError as err:
            raise BundleError(f"cannot read the tokenizer file {path}: {err.strerror or err}") from err
        if size > MAX_TOKENIZER_BYTES:
            raise BundleError(f"the tokenizer file {path} is larger than {MAX_TOKENIZER_BYTES >> 20} MiB: not a tokenizer")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for unreadable/invalid files
            raise BundleError(f"cannot read the tokenizer file {path}: {str(err).splitlines()[0][:200]}") from err
        tok.no_padding()
        tok.no_truncation()
        tok.enable_truncation(max_length=context_length, direction=truncation_side)
        tok.enable_padding(length=context_length, pad_id=int(pad_id), pad_token=tok.id_to_token(int(pad_id)) or "",
                           direction=padding_side)
        self._tok = tok
        self.context_length = int(context_length)
        self.clean = clean
        self.pad_id = int(pad_id)
        self.strip_sep_id = None if strip_sep_id is None else int(strip_sep_id)

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added tokens included."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def __call__(self, texts: list[str] | str) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            return np.zeros((0, self.context_length), np.int64)
        encodings = self._tok.encode_batch([clean_text(t, self.clean) for t in texts])
        out = np.asarray([e.ids for e in encodings], dtype=np.int64)
        if self.strip_sep_id is not None:
            out[out == self.strip_sep_id] = 0
        return out


def tokenizer_from_spec(text: TextSide, file_path: Path | str) -> ClipTokenizer | HFTokenizer:
    """The runtime tokenizer that a manifest's typed ``backbone.text`` (``manifest.TextSide``)
    describes; ``file_path`` is the local copy of its file (``text.file`` inside the bundle). Raises
    ``BundleError`` for an unknown kind (a struct built in code; decoding a manifest refuses one
    first), ``TypeError`` for anything but a ``TextSide``."""
    if not isinstance(text, TextSide):
        raise TypeError(f"tokenizer_from_spec takes a manifest.TextSide, not {type(text).__name__}")
    if text.tokenizer == "clip-bpe":
        return ClipTokenizer(file_path, context_length=text.context_length, clean=text.clean)
    if text.tokenizer == "hf":
        return HFTokenizer(file_path, text.context_length, clean=text.clean, pad_id=text.pad_id,
                           strip_sep_id=text.strip_sep_id, padding_side=text.padding_side or "right",
                           truncation_side=text.truncation_side or "right")
    raise BundleError(f"Unknown tokenizer kind '{text.tokenizer}' in the bundle manifest (expected clip-bpe or hf); "
                      "a newer edgeclip made this bundle")
