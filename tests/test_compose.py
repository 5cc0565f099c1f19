"""The composed gated graph (export/compose.py) against the numpy reference (train/decision.py).

Learned tensors come from the project's learners (ddas gates, RAIL heads) fitted on embeddings of
the tiny random-weight backbone. Checks: same route and top-1, scores within 1e-4, a mixed batch
equal to one-by-one, zero tasks = pure zero-shot, onnx.checker passes, no backbone copy.
"""

from __future__ import annotations

from pathlib import Path

import export_helpers as eh
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgeclip.errors import BundleError
from edgeclip.export.compose import build_gated_graph, check_structure, shared_data_name
from edgeclip.train.decision import gated_reference, learned_tensors

pytestmark = pytest.mark.slow  # the tiny backbone is exported once per session (~15 s)

# The tiny random backbone's embeddings of one synthetic cluster lie within ~0.07 of each other, so
# with the paper's kernel width (0.1) K is nearly all ones and alpha ~ 1/lambda: float32 noise of
# ~2e-4 in any implementation. A width matched to the spread restores the conditioning real CLIP
# embeddings have; the paper's width is checked separately below.
DUAL_GAMMA = 300.0


@pytest.fixture(scope="module")
def encoder(graphs: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(graphs / "image_encoder.onnx"), providers=["CPUExecutionProvider"])


def _embed(encoder: ort.InferenceSession):
    return lambda pixels: encoder.run(None, {"pixels": pixels})[0]


def _run(path: Path, pixels: np.ndarray, label_text: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"pixels": pixels, "label_text": label_text})))


def _assert_matches(got: dict[str, np.ndarray], want: dict[str, np.ndarray], atol: float = 1e-4) -> None:
    np.testing.assert_array_equal(got["route"], want["route"])
    np.testing.assert_array_equal(got["scores"].argmax(1), want["scores"].argmax(1))
    assert np.abs(got["scores"] - want["scores"]).max() < atol
    np.testing.assert_allclose(got["gate_ratio"], want["gate_ratio"], rtol=1e-4, atol=1e-6)


def _build(graphs, tmp_path, encoder, method, fusion, gate_kind="linear", kernel_gamma=DUAL_GAMMA):
    xs, ys = eh.task_data(_embed(encoder))
    text = eh.label_text()
    learned, manifest = eh.fit_rail_bundle(xs, ys, text[:5], method, fusion, gate_kind,
                                           kernel_gamma=kernel_gamma)
    path = build_gated_graph(eh.encoder_folder(graphs, tmp_path / "g"), learned, manifest)
    return path, learned, manifest, text


@pytest.mark.parametrize("method", ["rail-primal", "rail-dual"])
@pytest.mark.parametrize("fusion", ["ddas", "paper"])
def test_gated_graph_matches_reference(graphs, encoder, tmp_path, method, fusion):
    path, learned, manifest, text = _build(graphs, tmp_path, encoder, method, fusion)
    check_structure(onnx.load(str(path), load_external_data=False))  # onnx.checker, see compose
    pixels = eh.mixed_batch()
    got = _run(path, pixels, text)
    np.testing.assert_allclose(got["embedding"], _embed(encoder)(pixels), atol=1e-6)
    want = gated_reference(got["embedding"], text, learned, manifest)
    _assert_matches(got, want)
    if fusion == "ddas":  # the mixed batch really mixes: task 0, task 1 and unseen images
        assert set(got["route"].tolist()) == {0, 1, -1}
    assert got["gate_ratio"].shape == (len(pixels), 2) and got["route"].dtype == np.int64
    # a mixed batch equals its images one by one (per-image routing inside the graph)
    one_by_one = [_run(path, pixels[i : i + 1], text) for i in range(len(pixels))]
    for key in ("scores", "route", "gate_ratio"):
        np.testing.assert_allclose(np.concatenate([o[key] for o in one_by_one]), got[key], atol=1e-6)


def test_mlp_gate(graphs, encoder, tmp_path):
    path, learned, manifest, text = _build(graphs, tmp_path, encoder, "rail-primal", "ddas", gate_kind="mlp")
    got = _run(path, eh.mixed_batch(), text)
    _assert_matches(got, gated_reference(got["embedding"], text, learned, manifest))


def test_ratio_routing_rule(graphs, encoder, tmp_path):
    xs, ys = eh.task_data(_embed(encoder))
    text = eh.label_text()
    learned, manifest = eh.fit_rail_bundle(xs, ys, text[:5], "rail-primal", "ddas")
    manifest.gate.settings.route_rule = "ratio"
    path = build_gated_graph(eh.encoder_folder(graphs, tmp_path / "g"), learned, manifest)
    got = _run(path, eh.mixed_batch(), text)
    _assert_matches(got, gated_reference(got["embedding"], text, learned, manifest))


def test_dual_with_paper_kernel_width(graphs, encoder, tmp_path):
    """gamma 0.1 on near-duplicate embeddings: ill-conditioned, yet same decisions and ~1e-4 scores."""
    path, learned, manifest, text = _build(graphs, tmp_path, encoder, "rail-dual", "ddas", kernel_gamma=0.1)
    got = _run(path, eh.mixed_batch(), text)
    _assert_matches(got, gated_reference(got["embedding"], text, learned, manifest), atol=1e-3)


def test_extra_labels_only_learned(graphs, encoder, tmp_path):
    """label_text with exactly the learned classes (no extra labels) works too."""
    path, learned, manifest, text = _build(graphs, tmp_path, encoder, "rail-primal", "ddas")
    got = _run(path, eh.mixed_batch(), text[:5])
    _assert_matches(got, gated_reference(got["embedding"], text[:5], learned, manifest))


def test_zero_tasks_is_zero_shot(graphs, encoder, tmp_path):
    text = eh.label_text()
    learned = learned_tensors(np.zeros((0, text.shape[1]), np.float32), [], "linear", [], "rail-primal",
                              {"w_r": np.zeros((text.shape[1], 4)), "w": np.zeros((4, 0))})
    manifest = eh.manifest_for("rail-primal", "ddas", "linear", [], classes=[])
    path = build_gated_graph(eh.encoder_folder(graphs, tmp_path / "g"), learned, manifest)
    pixels = eh.mixed_batch(2)
    got = _run(path, pixels, text)
    want = gated_reference(got["embedding"], text, learned, manifest)
    assert got["gate_ratio"].shape == (len(pixels), 0)
    np.testing.assert_array_equal(got["route"], np.full(len(pixels), -1))
    _assert_matches(got, want)


def test_gated_graph_shares_the_backbone_weights(graphs, encoder, tmp_path):
    path, *_ = _build(graphs, tmp_path, encoder, "rail-primal", "ddas")
    model = onnx.load(str(path), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    locations = {t.name: {e.key: e.value for e in t.external_data}["location"] for t in external}
    # the backbone from the encoder's weights; RAIL's random layer (equal in every version) from its own file
    shared = {name for name, loc in locations.items() if loc == shared_data_name("gated.onnx")}
    assert shared and all(name.startswith("decision/rail_w_r_") for name in shared)
    assert set(locations.values()) == {"image_encoder.data", "gated.shared.data"}
    assert (path.parent / "gated.shared.data").stat().st_size == 4 * np.prod(
        [d for t in external if t.name in shared for d in t.dims])
    assert path.stat().st_size < (path.parent / "image_encoder.data").stat().st_size
    assert {o.name for o in model.graph.output} == {"scores", "route", "gate_ratio", "embedding"}
    assert {n.domain for n in model.graph.node} <= {""}


def test_inconsistent_manifest_is_refused(graphs, encoder, tmp_path):
    xs, ys = eh.task_data(_embed(encoder))
    learned, manifest = eh.fit_rail_bundle(xs, ys, eh.label_text()[:5], "rail-primal")
    manifest.tasks = manifest.tasks[:1]
    with pytest.raises(BundleError, match="task"):
        build_gated_graph(eh.encoder_folder(graphs, tmp_path / "g"), learned, manifest)


@pytest.mark.parametrize("method", ["rail-primal", "rail-dual"])
@pytest.mark.parametrize("gate_kind", ["linear", "mlp"])
def test_head_graph_from_the_embedding_matches_the_gated_graph(graphs, encoder, tmp_path, method, gate_kind):
    """head.onnx (the decision from a cached embedding) gives the gated graph's routes and scores from the
    gated graph's own embedding output, and passes onnx.checker; W_r goes to head.shared.data."""
    from edgeclip.export.compose import write_head_graph

    path, learned, manifest, text = _build(graphs, tmp_path, encoder, method, "ddas", gate_kind=gate_kind)
    got = _run(path, eh.mixed_batch(), text)
    head_path = write_head_graph(tmp_path / "g", learned, manifest)
    check_structure(onnx.load(str(head_path), load_external_data=False))
    assert (tmp_path / "g" / "head.shared.data").exists() == (method == "rail-primal")
    head = ort.InferenceSession(str(head_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in head.get_outputs()]
    out = dict(zip(names, head.run(None, {"embedding": got["embedding"], "label_text": text})))
    np.testing.assert_array_equal(out["route"], got["route"])
    np.testing.assert_allclose(out["scores"], got["scores"], atol=1e-6)
    np.testing.assert_allclose(out["gate_ratio"], got["gate_ratio"], rtol=1e-5, atol=1e-6)
