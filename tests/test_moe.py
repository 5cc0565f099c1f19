"""MoE-Adapters model: insertion into open_clip, routing, freezing, pool growth, state, parameter counts."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from moe_helpers import frozen_clip  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from edgeclip.errors import UsageError  # noqa: E402
from edgeclip.train.moe import (  # noqa: E402
    ZERO_SHOT,
    MoECLIP,
    MoEConfig,
    SelectionSet,
    count_selections,
    freeze_experts,
    grow_pools,
    load_moe_state,
    mask_frozen_grads,
    moe_state,
    parameter_count,
    set_trainable,
    text_classifier,
)


def adapted(config: MoEConfig | None = None, tasks: int = 1, seed: int = 0) -> MoECLIP:
    model = MoECLIP(frozen_clip(seed=seed), config).eval()
    for _ in range(tasks):
        model.add_task()
    return model


def randomise(model: MoECLIP, seed: int = 1, scale: float = 1.0) -> None:
    """Give experts and routers non-trivial values (fresh ones add nothing and route all alike)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.named_layers():
            for p in (layer.up_w, layer.up_b, layer.down_b, layer.w_gate, layer.w_noise):
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def inputs(batch: int = 4):
    gen = torch.Generator().manual_seed(7)
    images = torch.randn(batch, 3, 64, 64, generator=gen)
    tokens = open_clip.tokenize([f"a photo of thing {i}" for i in range(batch)])
    return images, tokens


def test_fresh_adapted_model_is_exactly_frozen_clip() -> None:
    ref = frozen_clip()
    model = adapted(tasks=2)
    images, tokens = inputs()
    with torch.no_grad():
        for task in (0, 1, ZERO_SHOT, torch.tensor([0, 1, ZERO_SHOT, 1])):
            assert torch.equal(model.encode_image(images, task), ref.encode_image(images))
            assert torch.equal(model.encode_text(tokens, task), ref.encode_text(tokens))
    # the backbone's parameter names are unchanged; adapters add '<block>.moe.*' only
    names = {n for n, _ in model.backbone_parameters()}
    assert names == {n for n, _ in ref.named_parameters()}


def test_insertion_settings_pick_encoders_and_last_blocks() -> None:
    model = adapted(MoEConfig(encoders=("image",), last_blocks=1))
    assert [n for n, _ in model.named_layers()] == ["visual.transformer.resblocks.1.moe"]
    assert model.encoder_of("visual.transformer.resblocks.1.moe") == "image"
    both = adapted()
    assert sorted({both.encoder_of(n) for n, _ in both.named_layers()}) == ["image", "text"]
    with pytest.raises(UsageError):
        MoEConfig(top_k=3, n_experts=2)
    with pytest.raises(UsageError):
        MoEConfig(encoders=("audio",))


def test_config_is_built_from_the_manifest_s_typed_adapters() -> None:
    """issue 19: the adapters' settings have one form, the schema's `MoEAdapters`; MoEConfig is built
    from it (`MoEConfig.of`) and keeps no dict twin."""
    from edgeclip.manifest import MoEAdapters

    assert MoEConfig.of(MoEAdapters(n_experts=3, encoders=("image",), last_blocks=1)) == MoEConfig(
        n_experts=3, encoders=("image",), last_blocks=1)
    assert MoEConfig.of(MoEAdapters()) == MoEConfig()
    assert not hasattr(MoEConfig, "to_dict") and not hasattr(MoEConfig, "from_dict")
    with pytest.raises(UsageError):  # the ranges are checked as for any configuration
        MoEConfig.of(MoEAdapters(n_experts=2, top_k=3))
    with pytest.raises(TypeError, match="MoEAdapters"):
        MoEConfig.of({"n_experts": 3})  # type: ignore[arg-type]


def test_adapter_changes_output_and_tasks_differ() -> None:
    model = adapted(tasks=2)
    randomise(model)
    images, tokens = inputs()
    with torch.no_grad():
        plain = model.encode_image(images, ZERO_SHOT)
        t0, t1 = model.encode_image(images, 0), model.encode_image(images, 1)
    assert not torch.allclose(t0, plain) and not torch.allclose(t0, t1)


def test_mixed_task_batch_equals_one_by_one() -> None:
    model = adapted(tasks=3)
    randomise(model)
    images, tokens = inputs()
    ids = torch.tensor([0, 2, ZERO_SHOT, 1])
    with torch.no_grad():
        mixed_img = model.encode_image(images, ids)
        mixed_txt = model.encode_text(tokens, ids)
        for i, task in enumerate(ids.tolist()):
            one_img = model.encode_image(images[i : i + 1], task)
            one_txt = model.encode_text(tokens[i : i + 1], task)
            torch.testing.assert_close(mixed_img[i : i + 1], one_img, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(mixed_txt[i : i + 1], one_txt, rtol=1e-4, atol=1e-5)
        # the same batch shape with one task everywhere gives bit-identical rows
        same = model.encode_image(images, torch.tensor([0, 0, 0, 0]))
        plain = frozen_clip().encode_image(images)
    assert torch.equal(mixed_img[0], same[0])
    assert torch.equal(mixed_img[2], plain[2])


def test_dense_experts_equal_gathered_experts() -> None:
    sparse = adapted(tasks=2)
    dense = adapted(MoEConfig(dense=True), tasks=2)
    randomise(sparse)
    randomise(dense)
    images, tokens = inputs()
    ids = torch.tensor([1, 0, ZERO_SHOT, 1])
    with torch.no_grad():
        torch.testing.assert_close(dense.encode_image(images, ids), sparse.encode_image(images, ids))
        torch.testing.assert_close(dense.encode_text(tokens, ids), sparse.encode_text(tokens, ids))


def test_noisy_gating_and_dropout_only_in_train_mode() -> None:
    model = adapted(MoEConfig(dropout=0.0))
    randomise(model, scale=0.3)
    images, _ = inputs()
    with torch.no_grad():
        clean = model.encode_image(images, 0)
        assert torch.equal(model.encode_image(images, 0), clean)
        model.train()
        torch.manual_seed(0)
        noisy = [model.encode_image(images, 0) for _ in range(3)]
        model.eval()
        assert torch.equal(model.encode_image(images, 0), clean)
    assert any(not torch.allclose(n, clean) for n in noisy)
    quiet = adapted(MoEConfig(dropout=0.0, noisy_gating=False))
    randomise(quiet, scale=0.3)
    with torch.no_grad():
        reference = quiet.encode_image(images, 0)
        quiet.train()  # train mode leaves the attention fast path: equal up to float rounding
        torch.testing.assert_close(quiet.encode_image(images, 0), reference, rtol=1e-5, atol=1e-5)


def test_text_routing_ignores_the_prompt() -> None:
    model = adapted()
    randomise(model)
    selected = SelectionSet(model)
    tokens = open_clip.tokenize(["a", "a photo of a very different long prompt", "zebra"])
    with torch.no_grad(), model.recording(selected):
        model.encode_text(tokens, 0)
    text_layers = [layer for name, layer in model.named_layers() if model.encoder_of(name) == "text"]
    for layer in text_layers:  # three prompts, yet only top_k experts per block
        assert int(selected.selected[id(layer)].sum()) == model.config.top_k


def test_gradients_of_frozen_experts_and_other_routers_are_masked() -> None:
    model = adapted(tasks=2)
    randomise(model, scale=0.1)
    name, layer = next(model.named_layers())
    layer.frozen[:5] = True
    set_trainable(model, 1)
    model.train()
    images, tokens = inputs()
    img, txt = model(images, 1, tokens, 1)
    (img @ txt.t()).sum().backward()
    mask_frozen_grads(model, 1)
    assert layer.up_w.grad[:5].abs().sum() == 0 and layer.up_w.grad[5:].abs().sum() > 0
    assert layer.w_gate.grad[0].abs().sum() == 0 and layer.w_gate.grad[1].abs().sum() > 0
    assert all(p.grad is None for _, p in model.backbone_parameters())


def test_freeze_rules() -> None:
    model = adapted()
    randomise(model)
    images, tokens = inputs(8)
    with torch.no_grad(), model.recording(count_selections):
        model.encode_image(images, 0)
    name, layer = next(model.named_layers())
    counts = layer.counts[0].clone()
    assert int(counts.sum()) == 8 * model.config.top_k
    frozen = freeze_experts(model, 0, "paper")
    assert int(frozen[name].sum()) == min(2, int((counts > 0).sum()))
    assert set(np.flatnonzero(frozen[name])) <= set(torch.topk(counts, 2).indices.tolist()) | set(
        np.flatnonzero(counts.numpy() == counts[torch.topk(counts, 2).indices[-1]].item())
    )

    strict_model = adapted()
    randomise(strict_model)
    selected = SelectionSet(strict_model)
    with torch.no_grad(), strict_model.recording(selected):
        strict_model.encode_image(images, 0)
    frozen = freeze_experts(strict_model, 0, "strict", selected)
    s_name, s_layer = next(strict_model.named_layers())
    assert np.array_equal(frozen[s_name], selected.selected[id(s_layer)].numpy())
    with pytest.raises(UsageError):
        freeze_experts(strict_model, 0, "strict")
    with pytest.raises(UsageError):
        freeze_experts(strict_model, 0, "loose")


def test_pool_growth_new_experts_are_unreachable_for_earlier_routers() -> None:
    model = adapted(MoEConfig(n_experts=3), tasks=1)
    randomise(model)
    images, _ = inputs()
    with torch.no_grad():
        before = model.encode_image(images, 0)
    for _, layer in model.named_layers():
        layer.frozen[:2] = True  # one free expert left < top_k = 2
    grown = grow_pools(model)
    assert set(grown.values()) == {1}
    assert all(layer.n_experts == 4 for _, layer in model.named_layers())
    task = model.add_task()
    with torch.no_grad():
        for _, layer in model.named_layers():  # the new expert: the best logit for every router, a big output
            layer.w_gate[:, 3] = 1.0
            layer.w_gate[task, :3] = 0.0
            layer.up_w[3] = 1.0
        assert torch.equal(model.encode_image(images, 0), before)  # task 0 can never select it
        layer = next(layer for _, layer in model.named_layers())
        cls = torch.ones(1, layer.width)  # logit d for the new expert (> 0 for the new task's others)
        old_idx, _ = layer.gate(cls * 1e3, torch.tensor([0]))
        new_idx, _ = layer.gate(cls, torch.tensor([task]))
    assert 3 not in old_idx[0].tolist() and 3 in new_idx[0].tolist()


def test_state_round_trip_through_safetensors(tmp_path) -> None:
    model = adapted(MoEConfig(n_experts=3), tasks=2)
    for _, layer in model.named_layers():
        layer.frozen[:2] = True
    grow_pools(model)
    model.add_task()
    randomise(model)
    path = tmp_path / "moe.safetensors"
    save_file(moe_state(model), str(path))
    fresh = adapted(MoEConfig(n_experts=3), tasks=0, seed=0)
    load_moe_state(fresh, load_file(str(path)))
    numpy_state = {k: v.numpy() for k, v in moe_state(model).items()}
    also = adapted(MoEConfig(n_experts=3), tasks=0, seed=0)
    load_moe_state(also, numpy_state)
    images, tokens = inputs()
    ids = torch.tensor([2, 1, 0, ZERO_SHOT])
    with torch.no_grad():
        for other in (fresh, also):
            assert torch.equal(other.encode_image(images, ids), model.encode_image(images, ids))
            assert torch.equal(other.encode_text(tokens, ids), model.encode_text(tokens, ids))
    for key, value in moe_state(model).items():
        assert torch.equal(moe_state(fresh)[key], value), key
    with pytest.raises(UsageError):
        load_moe_state(adapted(MoEConfig(encoders=("image",)), tasks=0), numpy_state)


def test_text_classifier_is_normalised_and_zero_shot_matches_clip() -> None:
    model = adapted()
    randomise(model)
    classes, templates = ["cat", "dog", "car"], ["a photo of a {}.", "a drawing of a {}."]
    per_task = text_classifier(model, 0, classes, templates, open_clip.tokenize)
    assert per_task.shape == (3, model.clip.text_projection.shape[1]) and per_task.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(per_task, axis=1), 1.0, rtol=1e-5)
    zero_shot = text_classifier(model, ZERO_SHOT, classes, templates, open_clip.tokenize)
    with torch.no_grad():
        ref = frozen_clip().encode_text(open_clip.tokenize([t.format(c) for c in classes for t in templates]))
    ref = torch.nn.functional.normalize(ref, dim=-1).reshape(3, 2, -1).mean(1)
    np.testing.assert_allclose(zero_shot, torch.nn.functional.normalize(ref, dim=-1).numpy(), atol=1e-6)
    assert not np.allclose(per_task, zero_shot)


def test_parameter_count_formula_tiny() -> None:
    model = adapted(tasks=3)
    count = parameter_count(model)
    e, r = 22, 64
    expected_experts = sum(e * (2 * layer.width * r + r + layer.width) for _, layer in model.named_layers())
    assert count.experts == expected_experts
    assert count.routers == 3 * sum(2 * layer.width * e for _, layer in model.named_layers())
    assert count.total == sum(p.numel() for p in model.adapter_parameters())


@pytest.mark.slow
def test_vit_b16_paper_configuration_has_51_06m_parameters() -> None:
    """Experts in all 12 blocks of both encoders (widths 768 and 512) plus 11 task routers (gate + noise)."""
    model = MoECLIP(frozen_clip("ViT-B-16"))
    count = parameter_count(model, n_tasks=11)
    print(f"ViT-B-16: experts {count.experts:,}, routers {count.routers:,}, total {count.total:,}")
    assert count.experts == 43_625_472
    assert count.routers == 7_434_240
    assert round(count.total / 1e6, 2) == 51.06


def test_top_k_ties_take_the_lower_index() -> None:
    """ONNX TopK's rule on every device: largest first, equal values by lower index, -inf last."""
    from edgeclip.train.moe import top_k_indices

    values = torch.tensor([[0.0] * 22, [0.0, 1.0, 0.0, 1.0] + [0.0] * 18, [float("-inf"), 0.0, 0.0, -1.0] + [-2.0] * 18])
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        got = top_k_indices(values.to(device), 2).cpu().tolist()
        assert got == [[0, 1], [1, 3], [1, 2]], device
    counts = torch.tensor([3, 5, 5, 0, 5])  # the paper rule's most-selected experts, ties likewise
    assert top_k_indices(counts, 2).tolist() == [1, 2]
