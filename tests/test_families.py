"""Every open_clip model family: the runtime tokenizes and embeds text exactly as open_clip does,
or `init` refuses the model in one line. Random weights, the smallest config of each family that
builds offline (timm style: one parametrised test over the families).

Families whose tokenizer file lives on the Hugging Face hub (SigLIP, SigLIP2, CLIPA, worldwide)
are tested with a tokenizer of the same structure built in the test (tests/hf_tokenizers.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import pytest

pytest.importorskip("open_clip")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_tokenizers  # noqa: E402

from edgeclip.errors import BackboneLoadError, UsageError  # noqa: E402
from edgeclip.manifest import TextSide  # noqa: E402
from edgeclip.tokenizer import tokenizer_from_spec  # noqa: E402
from edgeclip.train import backbone as bb  # noqa: E402

# The awkward labels: long, unicode, punctuation, case, entities, whitespace, exact boundaries.
LABELS = bb.AWKWARD_LABELS + [
    "mojibake: Ã©tÃ© â€” fixed by ftfy",
    "<start_of_text> inside <end_of_text> text",
    "\u200b zero width \u00a0 nbsp \u3000 ideographic space",
    "combining e\u0301 vs \u00e9",
    "x " * 30,
    "x " * 62,
    "x " * 63,
    "Hello, World! HELLO world hello_world",
    "a" * 300,
]


@dataclass(frozen=True)
class Family:
    name: str
    model: str  # the smallest config of the family that builds offline
    hf_tokenizer: str | None = None  # tests/hf_tokenizers.py builder for hub tokenizers
    embed: bool = True  # whether the text tower is built and exported in the slow test

    def tokenizer_dir(self, tmp: Path) -> str | None:
        return str(hf_tokenizers.BUILDERS[self.hf_tokenizer](tmp / self.hf_tokenizer)) if self.hf_tokenizer else None


FAMILIES = [
    Family("CLIP ViT (edgeclip config)", "edgeclip-tiny"),
    # same text tower class (open_clip CLIP) as edgeclip-tiny: tokens checked, embeddings covered there
    Family("CLIP ViT", "ViT-S-32", embed=False),
    Family("CLIP ResNet", "RN50", embed=False),
    Family("ConvNeXt", "convnext_tiny", embed=False),
    Family("MobileCLIP", "MobileCLIP-S1", embed=False),  # same TextTransformer as MobileCLIP2-S0
    Family("MobileCLIP2", "MobileCLIP2-S0"),
    Family("SigLIP", "ViT-B-16-SigLIP", "t5"),
    Family("SigLIP2", "ViT-B-32-SigLIP2-256", "gemma"),
    Family("CLIPA", "ViT-L-14-CLIPA", "bert", embed=False),  # 400M+ parameters: tokenizer only
    Family("MetaCLIP worldwide", "ViT-L-14-worldwide", "t5", embed=False),  # ViT-L: tokenizer only
    Family("PE-Core", "PE-Core-T-16-384"),
    Family("ViTamin", "ViTamin-S"),
    Family("CoCa", "coca_ViT-B-32"),
    Family("EVA02", "EVA02-B-16"),
]
IDS = [f.model for f in FAMILIES]


def _ids(tokens) -> np.ndarray:
    return tokens.numpy() if hasattr(tokens, "numpy") else np.asarray(tokens)


def _text_side(model: str, spec: dict) -> TextSide:
    """The manifest's typed ``backbone.text`` of a tokenizer's facts (``bb.text_tokenizer``), with the
    text tower's facts no tokenizer reads (the config's D, end-of-text pooling, CLIP's scale)."""
    return msgspec.convert({**spec, "embed_dim": bb.model_config(model)["embed_dim"], "pool": "argmax",
                            "logit_scale": 100.0}, TextSide)


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_runtime_token_ids_equal_open_clip(family: Family, tmp_path: Path) -> None:
    """The torch-free tokenizer rebuilt from the manifest spec gives open_clip's token ids."""
    spec, source, runtime, reference = bb.text_tokenizer(family.model, family.tokenizer_dir(tmp_path))
    assert reference is not None, "open_clip's own tokenizer must be available to compare with"
    want = _ids(reference(LABELS))
    rebuilt = tokenizer_from_spec(_text_side(family.model, spec), source)  # as TextEncoderRunner does
    got = rebuilt(LABELS)
    assert got.dtype == np.int64 and got.shape == want.shape == (len(LABELS), spec["context_length"])
    for label, g, w in zip(LABELS, got, want):
        assert (g == w).all(), f"{family.model}: {label[:40]!r}: {g[:12].tolist()} != {w[:12].tolist()}"
    np.testing.assert_array_equal(runtime(LABELS), got)


def test_family_configs_are_read_not_assumed(tmp_path: Path) -> None:
    """Cleaning, context length and tokenizer kind come from each model's config."""
    clip = bb.text_tokenizer("MobileCLIP2-S0")[0]
    assert (clip["tokenizer"], clip["clean"], clip["context_length"], clip["eot_id"]) == ("clip-bpe", "lower", 77, 49407)
    assert bb.text_tokenizer("PE-Core-T-16-384")[0]["context_length"] == 32
    siglip = bb.text_tokenizer("ViT-B-16-SigLIP", str(hf_tokenizers.t5_like(tmp_path / "t5")))[0]
    assert (siglip["tokenizer"], siglip["clean"], siglip["context_length"], siglip["pad_id"]) == ("hf", "canonicalize", 64, 1)
    clipa = bb.text_tokenizer("ViT-L-14-CLIPA", str(hf_tokenizers.bert_like(tmp_path / "bert")))[0]
    assert (clipa["clean"], clipa["context_length"], clipa["strip_sep_id"]) == ("whitespace", 32, 3)


def test_tokenizer_file_alone_without_transformers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without transformers the pad token is read from the files beside tokenizer.json."""
    folder = hf_tokenizers.t5_like(tmp_path / "t5")
    with_ref = bb.text_tokenizer("ViT-B-16-SigLIP", str(folder / "tokenizer.json"))
    monkeypatch.setattr(bb, "_hf_reference", lambda *a: None)
    spec, _, runtime, reference = bb.text_tokenizer("ViT-B-16-SigLIP", str(folder / "tokenizer.json"))
    assert reference is None and spec["pad_id"] == with_ref[0]["pad_id"] == 1
    np.testing.assert_array_equal(runtime(LABELS), _ids(with_ref[3](LABELS)))
    (folder / "tokenizer_config.json").unlink()
    (folder / "special_tokens_map.json").unlink()
    with pytest.raises(BackboneLoadError, match="names no pad token"):
        bb.text_tokenizer("ViT-B-16-SigLIP", str(folder))


def test_siglip_offline_without_tokenizer_says_what_to_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(bb, "_hub_reachable", lambda timeout=3.0: False)
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(BackboneLoadError) as info:
        bb.load_backbone("ViT-B-16-SigLIP", random_weights=True)
    message = str(info.value)
    assert "ViT-B-16-SigLIP" in message and "--tokenizer" in message and "offline" in message
    assert "\n" not in message
    with pytest.raises(BackboneLoadError, match="Tokenizer file not found"):
        bb.load_backbone("ViT-B-16-SigLIP", random_weights=True, tokenizer=str(tmp_path / "nothing.json"))
    with pytest.raises(BackboneLoadError, match="only for Hugging Face tokenizer models"):
        bb.text_tokenizer("MobileCLIP2-S0", str(tmp_path))


@pytest.mark.parametrize(
    "model, reason",
    [
        ("roberta-ViT-B-32", "text tower is the Hugging Face transformers model 'roberta-base'"),
        ("xlm-roberta-base-ViT-B-32", "transformers model 'xlm-roberta-base'"),
        ("nllb-clip-base", "transformers model"),
        ("mt5-base-ViT-B-32", "transformers model 'google/mt5-base'"),
    ],
)
def test_unsupported_families_are_refused_in_one_line(model: str, reason: str) -> None:
    with pytest.raises(BackboneLoadError) as info:
        bb.load_backbone(model, random_weights=True)
    assert model in str(info.value) and reason in str(info.value) and "\n" not in str(info.value)


def test_every_registered_model_is_classified() -> None:
    """No open_clip model falls through: each is either supported or refused by check_supported."""
    refused = {}
    for model in bb.known_models():
        try:
            bb.check_supported(model)
        except BackboneLoadError as exc:
            refused[model] = str(exc)
    assert all(m in msg and "\n" not in msg for m, msg in refused.items())
    assert "MobileCLIP2-S0" not in refused and "ViT-B-16-SigLIP" not in refused
    assert {"roberta-ViT-B-32", "nllb-clip-base-siglip"} <= set(refused)


def _reference_ids(family: Family, tokenizer: str | None, model: str) -> np.ndarray:
    spec, _, _, reference = bb.text_tokenizer(model, tokenizer)
    return _ids(reference(LABELS))


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILIES if f.embed], ids=[f.model for f in FAMILIES if f.embed])
def test_runtime_text_embeddings_equal_open_clip(family: Family, tmp_path: Path) -> None:
    """The exported text graph fed by the runtime tokenizer equals open_clip's encode_text on
    open_clip's own tokens (random weights)."""
    import onnxruntime as ort
    import torch

    from edgeclip.export.trace import export_text_encoder
    from edgeclip.layout import TOKENS

    tokenizer = family.tokenizer_dir(tmp_path)
    backbone = bb.load_backbone(family.model, random_weights=True, seed=1, tokenizer=tokenizer)
    assert backbone.text.spec.checked
    graph = export_text_encoder(backbone, tmp_path / "graphs")
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    runtime_ids = backbone.text.tokenizer(LABELS)
    open_clip_ids = _reference_ids(family, tokenizer, family.model)
    np.testing.assert_array_equal(runtime_ids, open_clip_ids)
    (got,) = session.run(None, {TOKENS: runtime_ids})
    with torch.inference_mode():
        want = backbone.model.encode_text(torch.from_numpy(open_clip_ids), normalize=True).float().numpy()
    assert got.shape == (len(LABELS), backbone.embed_dim)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_moe_on_a_non_vit_image_tower_is_refused() -> None:
    mobile = bb.load_backbone("MobileCLIP2-S0", random_weights=True)
    with pytest.raises(UsageError) as info:
        bb.check_method(mobile, "moe")
    message = str(info.value)
    assert "MobileCLIP2-S0" in message and "fastvit" in message and "rail-primal" in message
    bb.check_method(mobile, "rail-primal")
    assert bb.moe_refusal(bb.load_backbone("edgeclip-tiny", random_weights=True)) is None


# --------------------------------------------------------------------------- through the CLI


def _cli(*args: str, cwd: Path | None = None):
    """The console entry point in a fresh interpreter: what a user sees (stderr, exit code)."""
    import subprocess

    code = f"import sys; sys.argv = ['edgeclip'] + {list(map(str, args))!r}\nfrom edgeclip.edgeapp.cli.app import main\nmain()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, cwd=cwd)


def _one_line_error(result, *needles: str) -> None:
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    text = " ".join(lines)
    assert lines and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in text, result.stderr


def test_cli_refuses_an_unsupported_family_in_one_line(tmp_path: Path) -> None:
    _one_line_error(_cli("init", "--bundle", tmp_path / "a", "--model", "roberta-ViT-B-32", "--random-weights"),
                    "roberta-ViT-B-32", "not supported")
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_cli_refuses_moe_on_fastvit_in_one_line(tmp_path: Path) -> None:
    moe = _cli("init", "--bundle", tmp_path / "b", "--model", "MobileCLIP2-S0", "--random-weights", "--method", "moe")
    _one_line_error(moe, "MobileCLIP2-S0", "--method moe is not supported")
    assert moe.returncode == 2 and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_mobileclip2_with_rail_end_to_end(tmp_path: Path) -> None:
    """MobileCLIP2-S0 (FastViT image tower): init, add-task, classify, eval, int8 export, bench."""
    import json
    import shutil

    from edgeclip.bundle import Bundle
    from edgeclip.edgeapp.demo_data import write_demo_images

    domains, query = write_demo_images(tmp_path / "images", train_per_class=6, query_per_class=2)
    tests, _ = write_demo_images(tmp_path / "test-images", train_per_class=2, query_per_class=0, seed=1)
    for domain, test in zip(domains, tests):
        shutil.move(str(test / "train"), str(domain / "test"))
    root = tmp_path / "bundle"
    result = _cli("init", "--bundle", root, "--model", "MobileCLIP2-S0", "--random-weights", "--hidden", "256", "--quiet")
    assert result.returncode == 0, result.stderr
    manifest = Bundle.open(root).manifest
    text = manifest["backbone"]["text"]
    assert manifest["backbone"]["image_tower"].startswith("TimmModel:fastvit")
    assert text["tokenizer"] == "clip-bpe" and text["checked"]
    assert Bundle.open(root).meta.backbone.text.scoring == "softmax"  # the default, left out of the JSON
    assert manifest["zero_shot"]["logit_scale"] == pytest.approx(text["logit_scale"])  # the model's own scale
    result = _cli("eval", *map(str, domains), "--bundle", root, "--out", tmp_path / "eval", "--shots", "4")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "eval" / "results.json").is_file()
    result = _cli("add-task", domains[0], "--bundle", root, "--quiet")
    assert result.returncode == 0, result.stderr
    result = _cli("classify", query, "--bundle", root, "--format", "json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]  # JSON Lines
    assert rows and all(r["label"] for r in rows)
    result = _cli("export", "--int8", "--bundle", root)
    assert result.returncode == 0, result.stderr
    result = _cli("classify", query, "--bundle", root, "--precision", "int8", "--format", "json")
    assert result.returncode == 0, result.stderr
    result = _cli("bench", "--bundle", root, "--batch-sizes", "1", "--iterations", "2", "--format", "json")
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_mobileclip_s1_with_rail_init_add_task_classify_int8(tmp_path: Path) -> None:
    """MobileCLIP-S1 (FastViT MCi1): init, add-task, classify in fp32 and int8 (the export's parity
    checks run inside init and export)."""
    import json

    from edgeclip.edgeapp.demo_data import write_demo_images

    domains, query = write_demo_images(tmp_path / "images", train_per_class=4, query_per_class=1)
    root = tmp_path / "bundle"
    for args in (("init", "--bundle", root, "--model", "MobileCLIP-S1", "--random-weights", "--hidden", "128", "--quiet"),
                 ("add-task", domains[1], "--bundle", root, "--quiet"),
                 ("export", "--int8", "--bundle", root)):
        result = _cli(*args)
        assert result.returncode == 0, result.stderr
    for precision in ("fp32", "int8"):
        result = _cli("classify", query, "--bundle", root, "--precision", precision, "--format", "json")
        assert result.returncode == 0, result.stderr
        assert [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


@pytest.mark.slow
def test_siglip_with_a_tokenizer_file_end_to_end(tmp_path: Path) -> None:
    """SigLIP (timm ViT, HF tokenizer, sigmoid scoring): init with --tokenizer, add-task, classify;
    the bundle carries the tokenizer file and the runtime classifies without open_clip's."""
    import json

    from edgeclip.bundle import Bundle
    from edgeclip.edgeapp.demo_data import write_demo_images

    folder = hf_tokenizers.t5_like(tmp_path / "t5")
    domains, query = write_demo_images(tmp_path / "images", train_per_class=4, query_per_class=1)
    root = tmp_path / "bundle"
    result = _cli("init", "--bundle", root, "--model", "ViT-B-16-SigLIP", "--random-weights", "--hidden", "128",
                  "--tokenizer", folder, "--quiet")
    assert result.returncode == 0, result.stderr
    bundle = Bundle.open(root)
    text = bundle.manifest["backbone"]["text"]
    assert (text["tokenizer"], text["clean"], text["context_length"], text["scoring"]) == ("hf", "canonicalize", 64, "sigmoid")
    assert text["logit_bias"] == pytest.approx(-10.0) and bundle.path(text["file"]).read_bytes() == (folder / "tokenizer.json").read_bytes()
    result = _cli("add-task", domains[0], "--bundle", root, "--quiet")
    assert result.returncode == 0, result.stderr
    result = _cli("classify", query, "--bundle", root, "--format", "json")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
