"""MoE-Adapters training: frozen backbone, activate-freeze (strict: no drift), few-shot, determinism."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from PIL import Image  # noqa: E402
from moe_helpers import TEMPLATE, frozen_clip, make_domain  # noqa: E402

from edgeclip.errors import DomainError, UsageError  # noqa: E402
from edgeclip.train.moe import MoECLIP, MoEConfig, moe_state, text_classifier  # noqa: E402
from edgeclip.train.moe_trainer import (  # noqa: E402
    TrainSettings,
    _transforms,
    cosine_with_warmup,
    select_samples,
    train_task,
)

def quick(**overrides) -> TrainSettings:
    base = dict(iterations=4, batch_size=4, lr=5e-3, warmup=1, seed=0)
    base.update(overrides)
    return TrainSettings(**base)


@torch.no_grad()
def task_outputs(model: MoECLIP, task: int, samples, classes) -> tuple[torch.Tensor, np.ndarray]:
    """The task's image embeddings of its training images (eval transform) and its text classifier."""
    _, evaluate = _transforms(model.clip, (0.9, 1.0))
    model.eval()
    images = torch.stack([evaluate(Image.open(p).convert("RGB")) for p, _ in samples])
    return model.encode_image(images, task, normalize=True), text_classifier(
        model, task, classes, [TEMPLATE], open_clip.tokenize
    )


def test_training_changes_adapters_only_and_reports(tmp_path: Path) -> None:
    samples = make_domain(tmp_path / "d")
    (tmp_path / "d" / "class0" / "broken.png").write_bytes(b"not an image")
    samples.append((str(tmp_path / "d" / "class0" / "broken.png"), 0))
    model = MoECLIP(frozen_clip())
    before = {n: p.detach().clone() for n, p in model.backbone_parameters()}
    adapters_before = {k: v.clone() for k, v in moe_state(model).items()}
    result = train_task(model, samples, ["red", "green", "blue"], TEMPLATE, quick())

    after = dict(model.backbone_parameters())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before), "a backbone parameter changed"
    state = moe_state(model)
    changed = [k for k, v in state.items() if k in adapters_before and not torch.equal(v, adapters_before[k])]
    assert any(k.endswith("up_w") for k in changed) and any(k.endswith("w_gate") for k in changed)
    assert result.task == 0 and len(result.losses) == 4 and all(np.isfinite(result.losses))
    assert [p for p, _ in result.skipped] == [samples[-1][0]] and len(result.samples) == 12
    assert result.images_per_s > 0
    for name, counts in result.counts.items():
        assert counts.sum() > 0
        if name.startswith("visual."):
            assert counts.sum() == 4 * 4 * model.config.top_k  # every image, top-2 each, every step
    assert all(mask.any() for mask in result.frozen.values())
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.slow
def test_training_is_deterministic_on_cpu(tmp_path: Path) -> None:
    samples = make_domain(tmp_path / "d")
    states = []
    for _ in range(2):
        model = MoECLIP(frozen_clip())
        train_task(model, samples, ["a", "b", "c"], TEMPLATE, quick(iterations=3))
        states.append(moe_state(model))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.slow
def test_loader_workers_do_not_change_the_result(tmp_path: Path) -> None:
    """Decoding in 2 DataLoader worker processes trains exactly what decoding in-process does (each
    draw's image and crop are seeded by the draw); the default worker count follows cores and device."""
    from edgeclip.train.moe_trainer import loader_workers

    samples = make_domain(tmp_path / "d")
    states = []
    for workers in (0, 2):
        model = MoECLIP(frozen_clip())
        train_task(model, samples, ["a", "b", "c"], TEMPLATE, quick(iterations=3, workers=workers))
        states.append(moe_state(model))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert loader_workers(torch.device("cpu"), 2) == 0 and loader_workers(torch.device("cpu"), 16) == 1
    assert loader_workers(torch.device("cuda"), 16) == 8 and loader_workers(torch.device("cuda"), 2) == 1


def _drift_after_second_task(tmp_path: Path, rule: str) -> tuple[float, float]:
    first = make_domain(tmp_path / "first", seed=1)
    second = make_domain(tmp_path / "second", seed=2)
    classes = ["a", "b", "c"]
    model = MoECLIP(frozen_clip(), MoEConfig(n_experts=4))
    train_task(model, first, classes, TEMPLATE, quick(freeze_rule=rule))
    image_before, text_before = task_outputs(model, 0, first, classes)
    train_task(model, second, classes, TEMPLATE, quick(freeze_rule=rule, iterations=6, lr=2e-2, seed=1))
    image_after, text_after = task_outputs(model, 0, first, classes)
    return float((image_after - image_before).abs().max()), float(np.abs(text_after - text_before).max())


@pytest.mark.slow
def test_strict_freeze_keeps_task_one_bit_identical(tmp_path: Path) -> None:
    image_drift, text_drift = _drift_after_second_task(tmp_path, "strict")
    assert image_drift == 0.0 and text_drift == 0.0


@pytest.mark.slow
def test_paper_freeze_drift_is_measured(tmp_path: Path) -> None:
    image_drift, text_drift = _drift_after_second_task(tmp_path, "paper")
    print(f"paper rule, task-1 drift after task 2 (synthetic): image {image_drift:.3e}, text {text_drift:.3e}")
    assert np.isfinite(image_drift) and np.isfinite(text_drift)


def test_pool_grows_when_a_block_runs_out_of_free_experts(tmp_path: Path) -> None:
    model = MoECLIP(frozen_clip(), MoEConfig(n_experts=2))  # top-2 of 2: every expert is selected and frozen
    result = train_task(model, make_domain(tmp_path / "d"), ["a", "b", "c"], TEMPLATE, quick(iterations=2))
    assert set(result.grown.values()) == {2} and len(result.grown) == len(list(model.named_layers()))
    assert all(layer.n_experts == 4 and int(layer.frozen.sum()) == 2 for _, layer in model.named_layers())


def test_few_shot_selection_and_refusals(tmp_path: Path) -> None:
    samples = make_domain(tmp_path / "d", per_class=5)
    chosen, skipped = select_samples(samples, 3, shots=2, seed=0)
    assert sorted(c for _, c in chosen) == [0, 0, 1, 1, 2, 2] and not skipped
    assert chosen == select_samples(samples, 3, shots=2, seed=0)[0]
    with pytest.raises(DomainError):
        select_samples([s for s in samples if s[1] == 0], 1, None, 0)
    with pytest.raises(DomainError, match="Class 2"):
        select_samples([s for s in samples if s[1] != 2], 3, None, 0)
    with pytest.raises(UsageError):
        TrainSettings(freeze_rule="loose")
    with pytest.raises(UsageError):
        train_task(MoECLIP(frozen_clip()), samples, ["a", "b", "c"], "no placeholder", quick())


def test_cosine_schedule_with_warmup() -> None:
    factors = [cosine_with_warmup(s, 10, 110) for s in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[60] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:])) and factors[-1] < 1e-3


# ----- real images ---------------------------------------------------------------------------------
def _domain(extract_subset, name: str, classes: list[str], per_class: int, split: str) -> list[tuple[str, int]]:
    root = extract_subset(name, split, classes=classes, per_class=per_class)
    return [(str(p), i) for i, c in enumerate(classes) for p in sorted((root / split / c).iterdir())]


@pytest.mark.slow
@pytest.mark.realdata
def test_real_images_task_one_drift_per_freeze_rule(extract_subset, dataset_meta) -> None:
    """mnist (4 digits) then dtd10 (4 textures) on edgeclip-tiny: how much task 1 moves under each rule."""
    digits = dataset_meta("mnist")["classes"][:4]
    textures = dataset_meta("dtd10")["classes"][:4]
    mnist_train = _domain(extract_subset, "mnist", digits, 6, "train")
    mnist_test = _domain(extract_subset, "mnist", digits, 6, "test")
    dtd_train = _domain(extract_subset, "dtd10", textures, 6, "train")
    report = {}
    start = time.perf_counter()
    for rule in ("strict", "paper"):
        model = MoECLIP(frozen_clip())
        settings = dict(iterations=20, batch_size=8, lr=1e-2, warmup=3, freeze_rule=rule)
        train_task(model, mnist_train, digits, TEMPLATE, TrainSettings(**settings))
        seen_before, text_before = task_outputs(model, 0, mnist_train, digits)
        unseen_before, _ = task_outputs(model, 0, mnist_test, digits)
        train_task(model, dtd_train, textures, TEMPLATE, TrainSettings(**settings, seed=1))
        seen_after, text_after = task_outputs(model, 0, mnist_train, digits)
        unseen_after, _ = task_outputs(model, 0, mnist_test, digits)
        frozen = sum(int(layer.frozen.sum()) for _, layer in model.named_layers())
        report[rule] = {
            "train_images": float((seen_after - seen_before).abs().max()),
            "test_images": float((unseen_after - unseen_before).abs().max()),
            "text": float(np.abs(text_after - text_before).max()),
            "frozen_experts": frozen,
        }
    print(f"task-1 (mnist) max |embedding change| after learning dtd10, {time.perf_counter() - start:.1f} s:")
    for rule, row in report.items():
        print(f"  {rule}: {row}")
    assert report["strict"]["train_images"] == 0.0 and report["strict"]["text"] == 0.0
