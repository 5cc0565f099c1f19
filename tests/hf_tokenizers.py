"""Hugging Face tokenizers built offline in the tests, shaped like the ones open_clip models name.

The real files (SigLIP's T5 SentencePiece, SigLIP2's Gemma, CLIPA's BERT WordPiece) live on the
Hugging Face hub, which the tests cannot reach; these are trained here on a small corpus with the
same structure: the same kind of model, normaliser, special tokens, post-processor and pad token.
Each is written as a folder (tokenizer.json + tokenizer_config.json + special_tokens_map.json) as
`save_pretrained` writes it, which both open_clip's HFTokenizer (transformers) and edgeclip read.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "a photo of a cat", "a photo of a dog", "a blurry photo of a large red bus", "an origami airplane",
    "Café naïve façade quotes single ellipsis", "日本語のテキスト 中文 한국어 русский",
    "it's they're we've I'm you'll he'd", "numbers 1234567890 3.14159 -42", "snake case camel case kebab case",
    "the quick brown fox jumps over the lazy dog", "emoji and flags", "punctuation question marks brackets",
] * 20


def _write(folder: Path, tok, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config}))
    specials = {k: v for k, v in config.items() if k.endswith("_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    return folder


def t5_like(folder: Path) -> Path:
    """SigLIP (timm/ViT-B-16-SigLIP): SentencePiece unigram, `$A </s>`, pad = `</s>` (id 1)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("  ", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"],
                                                           unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return _write(folder, tok, {"pad_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>",
                                "model_max_length": 64})


def gemma_like(folder: Path) -> Path:
    """SigLIP2 (Gemma): byte-fallback BPE, `$A <eos>`, pad = `<pad>` (id 0), case kept."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 1)])
    return _write(folder, tok, {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"})


def bert_like(folder: Path) -> Path:
    """CLIPA (bert-base-uncased): WordPiece, lower case, `[CLS] $A [SEP]`, pad `[PAD]` (id 0)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return _write(folder, tok, {"pad_token": "[PAD]", "sep_token": "[SEP]", "cls_token": "[CLS]", "unk_token": "[UNK]"})


BUILDERS = {"t5": t5_like, "gemma": gemma_like, "bert": bert_like}
