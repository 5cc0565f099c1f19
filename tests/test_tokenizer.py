"""edgeapp.tokenizer: token for token equal to open_clip.tokenize, and clear failures."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import msgspec
import numpy as np
import pytest

from edgeclip.errors import BundleError, EdgeclipError, MissingExtraError
from edgeclip.manifest import TextSide, parse_section
from edgeclip.tokenizer import ClipTokenizer, HFTokenizer, clean_text, default_vocab_path, tokenizer_from_spec

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


@pytest.mark.parametrize("clean", ["lower", "whitespace", "canonicalize"])
def test_cleanings_match_open_clip(clean):
    """The three cleaning functions model configs name (SigLIP: canonicalize; HF default: whitespace)."""
    tokenizer_module = pytest.importorskip("open_clip.tokenizer")
    reference = tokenizer_module.get_clean_fn(clean)
    for text in TRICKY:
        assert clean_text(text, clean) == reference(text), text


@pytest.mark.parametrize("clean", ["whitespace", "canonicalize"])
def test_clip_bpe_with_another_cleaning_matches_open_clip(clean):
    tokenizer_module = pytest.importorskip("open_clip.tokenizer")
    reference = tokenizer_module.SimpleTokenizer(clean=clean, context_length=40)
    ours = ClipTokenizer(default_vocab_path(), context_length=40, clean=clean)
    np.testing.assert_array_equal(ours(TRICKY), reference(TRICKY).numpy())


def test_unknown_cleaning_and_kind_are_refused(tmp_path):
    with pytest.raises(EdgeclipError, match="Unknown text cleaning 'upper'"):
        clean_text("x", "upper")
    with pytest.raises(EdgeclipError, match="Unknown text cleaning"):
        ClipTokenizer(default_vocab_path(), clean="upper")
    with pytest.raises(BundleError, match="Unknown tokenizer kind 'sentencepiece'"):  # a struct built in code
        tokenizer_from_spec(_text_side(tokenizer="sentencepiece", file="x"), tmp_path / "x")
    with pytest.raises(BundleError, match=r"Invalid enum value .sentencepiece. - at `\$.text.tokenizer`"):  # refused when read
        parse_section({"backbone": {"model": "ViT-B-32", "weights": {"kind": "random", "ref": "0"},
                                    "text": msgspec.to_builtins(_text_side(tokenizer="sentencepiece"))}}, "backbone")
    with pytest.raises(TypeError, match="TextSide"):  # issue 19: the typed section is the only form
        tokenizer_from_spec({"tokenizer": "clip-bpe", "file": "x"}, default_vocab_path())  # type: ignore[arg-type]


def _text_side(**fields) -> TextSide:
    """A manifest ``backbone.text``: CLIP's by default, ``fields`` changed."""
    return TextSide(**{"tokenizer": "clip-bpe", "file": "tokenizer/bpe_simple_vocab_16e6.txt.gz", "clean": "lower",
                       "context_length": 77, "pad_id": 0, "embed_dim": 512, "pool": "argmax", "logit_scale": 100.0,
                       **fields})


def test_hf_tokenizer_rules(tmp_path):
    """Truncation keeps room for the end token, padding uses the pad id, strip_sep zeroes [SEP]."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import hf_tokenizers

    t5 = hf_tokenizers.t5_like(tmp_path / "t5") / "tokenizer.json"
    tok = HFTokenizer(t5, context_length=8, clean="canonicalize", pad_id=1)
    ids = tok(["a photo of a cat", "x " * 50, ""])
    assert ids.shape == (3, 8) and ids.dtype == np.int64
    assert ids[1, -1] == 1 and (ids[2] == 1).all()  # ends on </s>; the empty label is </s> + pads
    spec = _text_side(tokenizer="hf", file="tokenizer/tokenizer.json", context_length=8, clean="canonicalize", pad_id=1)
    np.testing.assert_array_equal(tokenizer_from_spec(spec, t5)(["a photo of a cat"]), ids[:1])
    clip = tokenizer_from_spec(_text_side(context_length=40), default_vocab_path())
    np.testing.assert_array_equal(clip(TRICKY), ClipTokenizer(default_vocab_path(), context_length=40)(TRICKY))
    bert = hf_tokenizers.bert_like(tmp_path / "bert") / "tokenizer.json"
    stripped = HFTokenizer(bert, context_length=6, pad_id=0, strip_sep_id=3)(["a photo", "a photo of a cat dog"])
    assert 3 not in stripped and stripped[0, 0] == 2
    assert tok(["a"]).shape == (1, 8) and tok([]).shape == (0, 8)


def test_bad_hf_tokenizer_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(BundleError, match="cannot read the tokenizer file"):
        HFTokenizer(tmp_path / "tokenizer.json", context_length=8)
    with pytest.raises(BundleError, match="cannot read the tokenizer file"):
        HFTokenizer(tmp_path / "missing.json", context_length=8)
