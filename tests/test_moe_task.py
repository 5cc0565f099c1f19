"""MoE add-task at the bundle level (edgeapp/moe_task.py): a 1-iteration task passes the export's
parity check (one top-k tie rule), the strict freeze keeps an old task's deployed scores bit-identical
(stored text classifiers, frozen experts), and a later task's adapted encoder is the parent's graph
with new initialisers (no re-trace)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

from test_moe_trainer import make_domain  # noqa: E402

from edgeclip.bundle import Bundle  # noqa: E402
from edgeclip.edgeapp.runtime import GatedRunner  # noqa: E402
from edgeclip.edgeapp.tasks import add_task  # noqa: E402
from edgeclip.images import iter_batches  # noqa: E402
from edgeclip.layout import LEARNED, TASK_TEXT  # noqa: E402


def _deployed(root: Path, paths: list[str]) -> dict[str, np.ndarray]:
    """The current version's gated graph (onnxruntime CPU) on ``paths``: scores over the learned labels, routes."""
    bundle = Bundle.open(root)
    cfg = bundle.meta.preprocess
    pixels = np.concatenate([b.pixels for b in iter_batches(paths, cfg, batch_size=64)])
    runner = GatedRunner(bundle, "ort-cpu", optimized_cache=False, preload=False)
    return runner.run(pixels, bundle.tensors(LEARNED)["zs_text"])


def _moe_nodes(root: Path) -> list[tuple[str, tuple[str, ...]]]:
    graph = onnx.load(str(Bundle.open(root).path("graphs/moe_encoder.onnx")), load_external_data=False).graph
    return [(n.op_type, tuple(n.input)) for n in graph.node]


def test_one_iteration_task_then_strict_freeze_keeps_old_scores_bit_identical(tmp_path: Path, make_tiny_bundle) -> None:
    root = make_tiny_bundle(tmp_path / "b", method="moe")
    make_domain(tmp_path / "first", n_classes=3, per_class=4, seed=1)
    make_domain(tmp_path / "second", n_classes=3, per_class=4, seed=2)
    first = sorted(str(p) for p in (tmp_path / "first").rglob("*.png"))
    # one iteration leaves most gate logits exactly equal (zero router rows): accepted only when torch
    # breaks the ties as ONNX TopK does (the export's parity check at 1e-4)
    add_task(root, tmp_path / "first", name="first", iterations=1)
    before = _deployed(root, first)
    text_before = Bundle.open(root).tensors(LEARNED)[TASK_TEXT]
    nodes_before = _moe_nodes(root)
    add_task(root, tmp_path / "second", name="second", iterations=4, moe_options={"lr": 5e-2})
    after = _deployed(root, first)
    bundle = Bundle.open(root)
    assert [t.name for t in bundle.tasks] == ["first", "second"]
    # the second task's adapted encoder: the parent's nodes, new initialisers (routers of 2 tasks)
    assert _moe_nodes(root) == nodes_before
    text_after = bundle.tensors(LEARNED)[TASK_TEXT]
    assert np.array_equal(text_after[:3], text_before)  # task 1's classifier: stored, not recomputed
    both = (before["route"] == 0) & (after["route"] == 0)
    assert both.sum() >= 6, (before["route"], after["route"])  # most of task 1's images route to it
    assert np.array_equal(after["scores"][both][:, :3], before["scores"][both])  # bit-identical
