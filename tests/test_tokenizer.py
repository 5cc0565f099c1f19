"""edgeapp.tokenizer: token for token equal to open_clip.tokenize, and clear failures."""

from __future__ import annotations

import gzip
import importlib.util

import numpy as np
import pytest

from edgeclip.errors import BundleError, MissingExtraError
from edgeclip.tokenizer import ClipTokenizer, default_vocab_path

TRICKY = [
    "a photo of a cat.",
    "",
    "   \t\n ",
    "A PHOTO OF A DOG",
    "Café naïve façade — “quotes” ‘single’ … ellipsis",
    "日本語のテキスト 中文 한국어 العربية русский",
    "emoji 😀👍🏽 and flags 🇫🇷",
    "&amp;amp; &lt;b&gt;bold&lt;/b&gt; &quot;x&quot; &#39;y&#39; &nbsp;",
    "mojibake: Ã©tÃ© â€” fixed by ftfy",
    "it's they're we've I'm you'll he'd",
    "numbers 1234567890 3.14159 1e-5 -42",
    "punctuation!!! ??? ... --- ((( ))) [x] {y} <z>",
    "<start_of_text> inside <end_of_text> text",
    "under_score snake_case CamelCase kebab-case",
    "tab\tseparated\nnew line\r\nwindows",
    "a" * 300,
    "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    " ".join(f"word{i}" for i in range(120)),  # far longer than 77 tokens: truncated
    "x " * 75,  # exactly at the boundary
    "x " * 76,
    "\u200b zero width \u00a0 nbsp \u3000 ideographic space",
    "combining e\u0301 vs \u00e9",
]


@pytest.fixture(scope="module")
def open_clip_tokenize():
    return pytest.importorskip("open_clip").tokenize


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip not installed: no vocabulary to test with")
    return ClipTokenizer(default_vocab_path())


def test_tricky_strings_match_open_clip(tokenizer, open_clip_tokenize):
    got = tokenizer(TRICKY)
    assert got.dtype == np.int64 and got.shape == (len(TRICKY), 77)
    np.testing.assert_array_equal(got, open_clip_tokenize(TRICKY).numpy())


def test_structure(tokenizer):
    ids = tokenizer(["", "a dog", " ".join(["dog"] * 100)])
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    assert (sot, eot) == (49406, 49407) and tokenizer.vocab_size == 49408
    assert list(ids[0, :3]) == [sot, eot, 0]
    assert ids[1, 0] == sot and ids[1, 3] == eot and not ids[1, 4:].any()
    assert ids[2, 0] == sot and ids[2, -1] == eot and (ids[2, 1:-1] == ids[1, 2]).all()  # truncated, ends on eot
    np.testing.assert_array_equal(tokenizer("a dog"), ids[1:2])  # one string alone


def test_other_context_length(open_clip_tokenize):
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip not installed")
    short = ClipTokenizer(default_vocab_path(), context_length=8)
    texts = TRICKY[:6] + ["one two three four five six seven eight nine"]
    np.testing.assert_array_equal(short(texts), open_clip_tokenize(texts, context_length=8).numpy())


@pytest.mark.realdata
@pytest.mark.parametrize("dataset", ["caltech101", "cifar10", "dtd10", "mnist", "fashion_mnist"])
def test_dataset_prompts_match_open_clip(dataset, dataset_meta, tokenizer, open_clip_tokenize):
    meta = dataset_meta(dataset)
    texts = list(meta["classes"]) + [t.replace("{}", c) for c in meta["classes"] for t in meta["templates"]]
    np.testing.assert_array_equal(tokenizer(texts), open_clip_tokenize(texts).numpy())


def test_default_vocab_path_without_open_clip(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingExtraError, match="open_clip_torch"):
        default_vocab_path()


def test_bad_vocabulary_files(tmp_path):
    with pytest.raises(BundleError, match="cannot read"):
        ClipTokenizer(tmp_path / "missing.txt.gz")
    (tmp_path / "plain.txt.gz").write_text("not gzip")
    with pytest.raises(BundleError, match="cannot read"):
        ClipTokenizer(tmp_path / "plain.txt.gz")
    with gzip.open(tmp_path / "short.txt.gz", "wt") as f:
        f.write("#version: 0.2\na b\nc d\n")
    with pytest.raises(BundleError, match="not a CLIP BPE merges file"):
        ClipTokenizer(tmp_path / "short.txt.gz")
