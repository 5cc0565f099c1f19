"""open_clip backbone loading: registry, random weights, clear offline errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("open_clip")

from edgeclip.train import backbone as bb  # noqa: E402

from edgeclip.errors import BackboneLoadError  # noqa: E402


def test_small_configs_are_registered_models() -> None:
    import open_clip

    bb.register_model_configs()
    assert {"edgeclip-tiny", "edgeclip-small"} <= set(open_clip.list_models())


def test_random_weights_are_seeded_and_recorded() -> None:
    a = bb.load_backbone("edgeclip-tiny", random_weights=True, seed=3)
    b = bb.load_backbone("edgeclip-tiny", random_weights=True, seed=3)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    np.testing.assert_array_equal(a.encode_images(pixels), b.encode_images(pixels))
    assert a.source.to_dict() == {"kind": "random", "ref": "3", "sha256": None, "quick_gelu": False}
    assert "random weights" in a.source.label
    assert a.preprocess["image_size"] == 64 and a.embed_dim == 64
    feats = a.class_text_embeddings(["cat", "dog"], ["a photo of a {}.", "a {}."])
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
    assert not any(p.requires_grad for p in a.model.parameters())


def test_offline_pretrained_tag_fails_fast_with_guidance(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bb, "_cached_tag_file", lambda *a: None)
    monkeypatch.setattr(bb, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(BackboneLoadError) as info:
        bb.load_backbone("ViT-B-32", "openai")
    message = str(info.value)
    assert "ViT-B-32" in message and "openai" in message and "--pretrained /path/to" in message


@pytest.mark.parametrize(
    "model, pretrained, expected",
    [
        ("no-such-model", "openai", "Unknown model 'no-such-model'. Known models:"),
        ("ViT-B-32", "no-such-tag", "Known tags: openai"),
        ("ViT-B-32", "/nowhere/weights.pt", "Checkpoint file not found"),
        ("ViT-B-32", None, "No weights given"),
    ],
)
def test_bad_requests_are_explained(model: str, pretrained: str | None, expected: str) -> None:
    with pytest.raises(BackboneLoadError, match=expected):
        bb.load_backbone(model, pretrained)


def test_local_checkpoint_file_is_loaded_and_hashed(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    source = bb.load_backbone("edgeclip-tiny", random_weights=True, seed=7)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    loaded = bb.load_backbone("edgeclip-tiny", str(path))
    assert loaded.source.kind == "file" and loaded.source.sha256 == bb.sha256_of(path)
    pixels = torch.zeros(1, 3, 64, 64).numpy()
    np.testing.assert_array_equal(loaded.encode_images(pixels), source.encode_images(pixels))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"nothing": torch.zeros(1)}, str(wrong))
    with pytest.raises(BackboneLoadError, match="Cannot load weights"):
        bb.load_backbone("edgeclip-tiny", str(wrong))
