"""open_clip backbone loading: registry, random weights, clear offline errors."""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest

pytest.importorskip("open_clip")

from edgeclip.errors import BackboneLoadError  # noqa: E402
from edgeclip.bundle import weights_label  # noqa: E402
from edgeclip.manifest import Weights  # noqa: E402
from edgeclip.train import backbone as bb  # noqa: E402


def test_small_configs_are_known_without_changing_open_clips_registry() -> None:
    """edgeclip-tiny/small are built and tokenized, and open_clip's model registry is as it was (issue 19:
    `open_clip.add_model_config` mutated it)."""
    import open_clip

    before = open_clip.list_models()
    assert {"edgeclip-tiny", "edgeclip-small"} <= set(bb.known_models())
    assert bb.canonical_model_name("EDGECLIP-TINY") == "edgeclip-tiny"
    assert bb.model_config("edgeclip-small")["embed_dim"] > 0
    backbone = bb.load_backbone("edgeclip-tiny", random_weights=True, seed=1)
    assert backbone.text is not None and backbone.text.spec.checked
    assert bb.reference_tokenizer("edgeclip-tiny")(["a cat"]).shape == (1, 77)
    assert open_clip.list_models() == before and open_clip.get_model_config("edgeclip-tiny") is None


def test_own_configs_build_as_open_clips_factory_builds_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same seed gives the same weights, activation and preprocessing as `open_clip.create_model` of the
    registered config (what edgeclip did before): bundles made with random weights rebuild the same."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    config = bb.model_config("edgeclip-tiny")
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "edgeclip-tiny", config)  # the old registration, undone
    for quick_gelu in (False, True):
        torch.manual_seed(7)
        want = open_clip.create_model("edgeclip-tiny", force_quick_gelu=quick_gelu)
        torch.manual_seed(7)
        got = bb.create_model("edgeclip-tiny", quick_gelu=quick_gelu)
        assert type(got) is type(want) and got.visual.preprocess_cfg == want.visual.preprocess_cfg
        assert [type(m).__name__ for m in got.modules()] == [type(m).__name__ for m in want.modules()]
        for (name, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in want.state_dict().items()}, str(path))
    loaded = bb.create_model("edgeclip-tiny", str(path), quick_gelu=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), want.state_dict().values()))


def test_random_weights_are_seeded_and_recorded() -> None:
    a = bb.load_backbone("edgeclip-tiny", random_weights=True, seed=3)
    b = bb.load_backbone("edgeclip-tiny", random_weights=True, seed=3)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    np.testing.assert_array_equal(a.encode_images(pixels), b.encode_images(pixels))
    assert a.source == Weights(kind="random", ref="3", sha256=None, quick_gelu=False)
    assert "random weights" in weights_label(a.source)
    assert a.preprocess.image_size == 64 and a.embed_dim == 64
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
    # which file to fetch and where it goes
    assert "https://huggingface.co/timm/vit_base_patch32_clip_224.openai/resolve/main/" in message
    assert "~/.cache/huggingface/hub" in message


def test_model_names_match_case_insensitively() -> None:
    assert bb.canonical_model_name("vit-b-32") == "ViT-B-32"
    assert bb.canonical_model_name("EDGECLIP-TINY") == "edgeclip-tiny"
    assert bb.load_backbone("Edgeclip-Tiny", random_weights=True).name == "edgeclip-tiny"
    with pytest.raises(BackboneLoadError, match="Known models: ViT-B-32"):
        bb.canonical_model_name("vit-b-32x")


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


def _activations(model) -> set[str]:
    import open_clip

    return {type(m).__name__ for m in model.modules() if isinstance(m, (open_clip.transformer.QuickGELU,))} or {"GELU"}


@pytest.fixture
def fake_quickgelu_tag(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A pretrained tag 'fakeai' of edgeclip-tiny trained with QuickGELU (like 'openai'), served by a
    fake hub: not in the cache, the hub reachable, the download writes a real checkpoint file."""
    import open_clip
    from safetensors.torch import save_file

    tags = dict(open_clip.pretrained._PRETRAINED.get("edgeclip-tiny", {}))
    tags["fakeai"] = {"hf_hub": "fake-org/edgeclip-tiny-fakeai/", "quick_gelu": True,
                      "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "edgeclip-tiny", tags)
    weights = {k: v.contiguous() for k, v in bb.load_backbone("edgeclip-tiny", random_weights=True, seed=5).model.state_dict().items()}
    downloads: list[str] = []
    cache: dict[str, str] = {}

    def download(cfg, *args, **kwargs):
        path = tmp_path / "hub" / "open_clip_model.safetensors"
        path.parent.mkdir(exist_ok=True)
        save_file(weights, str(path))
        downloads.append(cfg["hf_hub"])
        cache["file"] = str(path)
        return str(path)

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", download)
    monkeypatch.setattr(bb, "_cached_tag_file", lambda *a: cache.get("file"))
    monkeypatch.setattr(bb, "_hub_reachable", lambda timeout=3.0: True)
    return downloads


def test_quickgelu_decided_once_on_the_download_branch(fake_quickgelu_tag: list[str]) -> None:
    """The first (online) load downloads and builds QuickGELU, as the tag's metadata says; it is
    recorded, and a later load from the cache (MoE add-task) builds the same activation."""
    first = bb.load_backbone("edgeclip-tiny", "fakeai")
    assert fake_quickgelu_tag == ["fake-org/edgeclip-tiny-fakeai/"]
    assert first.source.quick_gelu is True and first.manifest_entry()["weights"]["quick_gelu"] is True
    assert _activations(first.model) == {"QuickGELU"}
    assert first.preprocess.mean == (0.5, 0.5, 0.5)  # the tag's preprocessing, not the file's
    again = bb.load_backbone("edgeclip-tiny", source=msgspec.convert(first.manifest_entry()["weights"], Weights))
    assert fake_quickgelu_tag == ["fake-org/edgeclip-tiny-fakeai/"]  # from the cache this time
    assert _activations(again.model) == {"QuickGELU"}
    pixels = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    np.testing.assert_array_equal(first.encode_images(pixels), again.encode_images(pixels))


def test_recorded_activation_wins_over_defaults() -> None:
    """A bundle's recorded activation is used even where the model config says otherwise."""
    qg = bb.load_backbone("edgeclip-tiny", source=Weights("random", "0", quick_gelu=True))
    assert _activations(qg.model) == {"QuickGELU"}
    old = bb.load_backbone("edgeclip-tiny", source=Weights(kind="random", ref="0"))
    assert old.source.quick_gelu is False and _activations(old.model) == {"GELU"}


def test_checkpoint_errors_name_the_keys(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in bb.load_backbone("edgeclip-tiny", random_weights=True).model.state_dict().items()}
    partial = dict(list(state.items())[5:])
    partial["extra.head.weight"] = torch.zeros(3)
    path = tmp_path / "partial.safetensors"
    save_file(partial, str(path))
    with pytest.raises(BackboneLoadError) as info:
        bb.load_backbone("edgeclip-tiny", str(path))
    message = str(info.value)
    first_missing = sorted(list(state)[:5])[0]
    assert f"5 of the model's {len(state)} keys are missing" in message and first_missing in message
    assert "1 of the file's" in message and "extra.head.weight" in message
    assert "--model" not in message and "\n" not in message

    reshaped = dict(state)
    key = "text_projection"
    reshaped[key] = torch.zeros(reshaped[key].shape[0] + 1, reshaped[key].shape[1])
    path = tmp_path / "reshaped.pt"
    torch.save(reshaped, str(path))  # a plain .pt state dict is read with weights_only=True
    with pytest.raises(BackboneLoadError) as info:
        bb.load_backbone("edgeclip-tiny", str(path))
    assert "1 tensors differ in shape" in str(info.value) and key in str(info.value)
    assert "--model" not in str(info.value)


def test_quickgelu_hint_only_when_the_keys_match(tmp_path: Path) -> None:
    class Boom(RuntimeError):
        pass

    state_file = tmp_path / "same.safetensors"
    from safetensors.torch import save_file

    model = bb.load_backbone("edgeclip-tiny", random_weights=True).model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(state_file))
    # a stand-in for open_clip serving this architecture as an open_clip model name (edgeclip's own configs
    # are not open_clip's: they are built without it)
    fake = type("OC", (), {"create_model": staticmethod(lambda *a, **k: model), "list_models": staticmethod(
        lambda: ["tiny-arch", "tiny-arch-quickgelu"])})
    message = bb.explain_checkpoint(fake, "tiny-arch", str(state_file), False, Boom("odd failure"))
    assert "odd failure" in message and "--model tiny-arch-quickgelu" in message
    assert "--model" not in bb.explain_checkpoint(fake, "tiny-arch", str(state_file), True, Boom("x"))


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # making the archive, not reading it
def test_torchscript_archive_is_refused_with_a_conversion_how_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    path = tmp_path / "ViT-B-32.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    loads: list[str] = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append("torch.load") or {})
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: loads.append("torch.jit.load") or None)
    with pytest.raises(BackboneLoadError) as info:
        bb.load_backbone("edgeclip-tiny", str(path))
    message = str(info.value)
    assert "TorchScript archive" in message and "load_openai_model" in message and "--model edgeclip-tiny-quickgelu" in message
    assert "\n" not in message and loads == []
