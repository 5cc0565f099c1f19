"""The MoE gated graph (export/trace_moe.py + export/compose_moe.py) against the reference
(train/decision.py with the adapted embeddings of the torch MoECLIP).

A tiny random backbone with 2 tasks whose experts and routers are random (non-zero), linear DDAS
gates fitted on two synthetic clusters. Checks: same route and top-1, scores within 1e-4, a mixed
batch (task 0, task 1, unseen) equal to one by one, an all-zero-shot batch equal to pure zero-shot,
onnx.checker passes, the backbone's weights read from image_encoder.data, the export refusal.
"""

from __future__ import annotations

import functools
import shutil

import export_helpers as eh
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgeclip.errors import BundleError, UsageError
from edgeclip.export.compose import build_gated_graph, check_structure
from edgeclip.export.compose_moe import build_moe_gated_graph, share_frozen_weights, weight_sharing
from edgeclip.export.trace import ExportParityError
from edgeclip.export.trace_moe import check_moe_parity, export_moe_encoder
from edgeclip.layout import MOE_DATA
from edgeclip.train.decision import gate_states, gated_reference, learned_tensors

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow  # two tiny exports (~20 s)


@functools.lru_cache(maxsize=None)
def _moe_model():
    """MoECLIP on a fresh copy of the tiny backbone (same weights as eh.tiny_backbone), 2 tasks with
    random experts and routers: every routed image really takes an adapted path."""
    from edgeclip.train.backbone import load_backbone
    from edgeclip.train.moe import MoECLIP, MoEConfig

    backbone = load_backbone(eh.TINY, random_weights=True, seed=0)
    torch.manual_seed(3)
    model = MoECLIP(backbone.model, MoEConfig(n_experts=4, top_k=2, bottleneck=8))
    for _ in range(2):
        model.add_task()
    with torch.no_grad():
        for _, layer in model.named_layers():
            layer.up_w.normal_(0.0, 0.3)
            layer.w_gate.normal_(0.0, 1.0)
    return backbone, model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    """(graphs folder with image_encoder + moe_encoder, learned tensors, manifest, label_text)."""
    from edgeclip.train import ddas
    from edgeclip.train.moe import text_classifier

    frozen = eh.tiny_graphs(tmp_path_factory.getbasetemp())
    backbone, model = _moe_model()
    graphs = eh.encoder_folder(frozen, tmp_path_factory.mktemp("moe-graphs"))
    export_moe_encoder(model, graphs)  # beside the frozen encoder: its backbone tensors are shared
    encoder = ort.InferenceSession(str(graphs / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    xs, _ = eh.task_data(lambda p: encoder.run(None, {"pixels": p})[0])
    gates, thresholds = [], []
    for x in xs:
        gate, threshold = ddas.fit_gate(x, kind="linear", k=3, seed=0)
        gates.append(gate.state())
        thresholds.append(threshold)
    text = eh.label_text()
    task_text = np.concatenate([text_classifier(model, t, names, ["a photo of a {}."], backbone.tokenize)
                                for t, names in enumerate(eh.TASK_CLASSES)])
    learned = learned_tensors(text[:5], [len(c) for c in eh.TASK_CLASSES], "linear", gates, "moe",
                              {"task_text": task_text})
    manifest = eh.manifest_for("moe", "ddas", "linear", thresholds)
    build_moe_gated_graph(graphs, learned, manifest)
    return graphs, learned, manifest, text


@pytest.fixture(scope="module")
def gated(setup) -> ort.InferenceSession:
    return ort.InferenceSession(str(setup[0] / "gated.onnx"), providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, pixels: np.ndarray, text: np.ndarray) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"pixels": pixels, "label_text": text})))


def _adapt(pixels: np.ndarray):
    """The reference's adapted embeddings: the torch MoECLIP with the gate's routes."""
    _, model = _moe_model()

    def adapt(route: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model.encode_image(torch.from_numpy(pixels), torch.from_numpy(route), normalize=True).numpy()

    return adapt


def _assert_matches(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    np.testing.assert_array_equal(got["route"], want["route"])
    np.testing.assert_array_equal(got["scores"].argmax(1), want["scores"].argmax(1))
    assert np.abs(got["scores"] - want["scores"]).max() < 1e-4
    np.testing.assert_allclose(got["gate_ratio"], want["gate_ratio"], rtol=1e-4, atol=1e-6)


def test_mixed_batch_matches_reference_and_one_by_one(setup, gated):
    graphs, learned, manifest, text = setup
    pixels = eh.mixed_batch()
    got = _run(gated, pixels, text)
    assert set(got["route"].tolist()) == {0, 1, -1}  # the batch really mixes task 0, task 1 and unseen
    want = gated_reference(got["embedding"], text, learned, manifest, adapt=_adapt(pixels))
    _assert_matches(got, want)
    routed = got["route"] >= 0
    # routed rows: the task's softmax on its own columns only, nothing on other tasks' or extra labels
    offsets, sizes = learned["task.offset"], learned["task.size"]
    for row, task in zip(got["scores"][routed], got["route"][routed]):
        own = np.zeros(len(text), bool)
        own[offsets[task]: offsets[task] + sizes[task]] = True
        assert np.all(row[~own] == 0) and abs(row[own].sum() - 1) < 1e-5
    # the adapters matter: the learned scores differ from what the frozen embedding would give
    frozen = gated_reference(got["embedding"], text, learned, manifest, adapt=lambda r: got["embedding"])
    assert np.abs(frozen["scores"][routed] - got["scores"][routed]).max() > 1e-3
    one_by_one = [_run(gated, pixels[i: i + 1], text) for i in range(len(pixels))]
    for key in ("scores", "route", "gate_ratio", "embedding"):
        np.testing.assert_allclose(np.concatenate([o[key] for o in one_by_one]), got[key], atol=1e-6)


def test_all_zero_shot_batch_is_pure_zero_shot(setup, gated):
    graphs, learned, manifest, text = setup
    size = eh.tiny_backbone().preprocess.image_size
    pixels = eh.cluster_pixels(2, 3, size, seed=5)  # the unseen cluster
    got = _run(gated, pixels, text)
    np.testing.assert_array_equal(got["route"], -1)
    encoder = ort.InferenceSession(str(graphs / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    zero_shot = encoder.run(None, {"pixels": pixels})[0]
    np.testing.assert_allclose(got["embedding"], zero_shot, atol=1e-6)
    from edgeclip.train import fusion

    assert np.abs(got["scores"] - fusion.zero_shot_probs(zero_shot, text, 100.0)).max() < 1e-5
    _assert_matches(got, gated_reference(got["embedding"], text, learned, manifest, adapt=_adapt(pixels)))


def test_all_routed_batch(setup, gated):
    graphs, learned, manifest, text = setup
    size = eh.tiny_backbone().preprocess.image_size
    pixels = np.concatenate([eh.cluster_pixels(c, 4, size, seed=9) for c in (1, 0)])
    pixels = pixels[_run(gated, pixels, text)["route"] >= 0]  # the gate's 95% threshold rejects a few
    got = _run(gated, pixels, text)
    assert len(pixels) >= 4 and set(got["route"].tolist()) == {0, 1}
    _assert_matches(got, gated_reference(got["embedding"], text, learned, manifest, adapt=_adapt(pixels)))
    learned_only = _run(gated, pixels, text[:5])  # a label space of exactly the learned classes
    np.testing.assert_allclose(learned_only["scores"], got["scores"][:, :5], atol=1e-6)


def test_structure_and_weight_sharing(setup):
    graphs = setup[0]
    model = onnx.load(str(graphs / "gated.onnx"), load_external_data=False)
    check_structure(model)  # onnx.checker with shape inference, subgraph included
    assert {o.name for o in model.graph.output} == {"scores", "route", "gate_ratio", "embedding"}
    assert [n.op_type for n in model.graph.node].count("If") == 1
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {18}
    assert not model.functions and {n.domain for n in model.graph.node} <= {""}
    # the frozen backbone is read from image_encoder.data; moe_encoder.data keeps only the rest
    frozen_bytes = (graphs / "image_encoder.data").stat().st_size
    sharing = weight_sharing(model)
    assert sharing.shared_bytes > 0.9 * frozen_bytes
    assert sharing.own_bytes <= (graphs / MOE_DATA).stat().st_size < 0.5 * frozen_bytes
    moe = onnx.load(str(graphs / "moe_encoder.onnx"), load_external_data=False)
    assert weight_sharing(moe).shared_bytes == sharing.shared_bytes


def test_self_contained_export_then_shared(setup, tmp_path):
    """Exported into an empty folder the adapted encoder carries the backbone and runs alone;
    share_frozen_weights then moves its frozen tensors to image_encoder.data, outputs unchanged."""
    graphs = setup[0]
    _, model = _moe_model()
    alone = export_moe_encoder(model, tmp_path / "alone")  # parity-checked on its own
    frozen_bytes = (graphs / "image_encoder.data").stat().st_size
    assert (alone.parent / MOE_DATA).stat().st_size > frozen_bytes
    folder = eh.encoder_folder(graphs, tmp_path / "shared")
    for name in ("moe_encoder.onnx", MOE_DATA):
        shutil.copy(alone.parent / name, folder / name)
    inode = (folder / "image_encoder.data").stat().st_ino
    sharing = share_frozen_weights(folder)
    assert (folder / MOE_DATA).stat().st_size == sharing.own_bytes < 0.5 * frozen_bytes
    assert (folder / "image_encoder.data").stat().st_ino == inode  # the (hard-linked) frozen file untouched
    check_moe_parity(folder / "moe_encoder.onnx", model)


def test_moe_without_tasks_is_zero_shot_and_rail_builder_refuses_moe(setup, tmp_path):
    graphs, learned, manifest, text = setup
    dim = text.shape[1]
    empty = learned_tensors(np.zeros((0, dim), np.float32), [], "linear", [], "moe",
                            {"task_text": np.zeros((0, dim), np.float32)})
    folder = eh.encoder_folder(graphs, tmp_path / "g")
    path = build_moe_gated_graph(folder, empty, eh.manifest_for("moe", "ddas", "linear", [], classes=[]))
    got = _run(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), eh.mixed_batch(1), text)
    np.testing.assert_array_equal(got["route"], -1)
    with pytest.raises(BundleError, match="compose_moe"):
        build_gated_graph(folder, learned, manifest)
    with pytest.raises(BundleError, match="moe_encoder"):
        build_moe_gated_graph(folder, learned, manifest)  # no adapted encoder in that folder
    with pytest.raises(UsageError, match="task_text"):
        learned_tensors(text[:5], [3, 2], "linear", gate_states(learned, "linear"), "moe",
                        {"task_text": np.zeros((4, dim), np.float32)})


def test_export_refused_when_onnx_differs(setup):
    graphs = setup[0]
    _, model = _moe_model()
    layer = next(layer for _, layer in model.named_layers() if layer.encoder == "image")
    with torch.no_grad():
        layer.up_b.add_(1.0)  # the torch model drifts from the exported graph
    try:
        with pytest.raises(ExportParityError):
            check_moe_parity(graphs / "moe_encoder.onnx", model)
    finally:
        with torch.no_grad():
            layer.up_b.sub_(1.0)


def test_composing_needs_no_torch():
    """compose_moe (run on a device after a task was learned elsewhere) and the reference import without torch."""
    from cli_helpers import run_without_torch

    result = run_without_torch("import edgeclip.export.compose_moe, edgeclip.train.decision\nprint('ok')")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_gated_graph_loads_without_onnxruntime_warnings(setup, capfd) -> None:
    """No initialiser listed among the graph inputs, none twice; onnxruntime's log at WARNING is empty."""
    graphs = setup[0]
    model = onnx.load(str(graphs / "gated.onnx"), load_external_data=False)
    names = [i.name for i in model.graph.initializer]
    assert len(names) == len(set(names))
    assert not {i.name for i in model.graph.input} & set(names)
    capfd.readouterr()
    options = ort.SessionOptions()
    options.log_severity_level = 1  # INFO and up reach the log; warnings are what must not be there
    session = ort.InferenceSession(str(graphs / "gated.onnx"), options, providers=["CPUExecutionProvider"])
    session.run(None, {"pixels": eh.mixed_batch(1), "label_text": setup[3]})
    err = capfd.readouterr().err
    assert not [line for line in err.splitlines() if "[W:onnxruntime" in line or "[E:onnxruntime" in line], err


def test_tie_rule_and_template_fill(setup, tmp_path):
    """All-zero routers (every gate logit equal, as after a 1-iteration task) export within the parity
    bound: torch breaks ties as ONNX TopK does (lower index first). The next task's graph, filled into
    the first one's (2 routers instead of 1), equals a fresh trace; a pool that grew needs a trace."""
    from edgeclip.export.trace_moe import fill_moe_template
    from edgeclip.train.backbone import load_backbone
    from edgeclip.train.moe import MoECLIP, MoEConfig

    torch.manual_seed(5)
    model = MoECLIP(load_backbone(eh.TINY, random_weights=True, seed=0).model, MoEConfig()).eval()  # 22 experts
    model.add_task()
    with torch.no_grad():
        for _, layer in model.named_layers():
            layer.up_w.normal_(0.0, 0.3)  # experts differ, routers stay zero: the tie decides the output
    first = eh.encoder_folder(setup[0], tmp_path / "first")
    assert check_moe_parity(export_moe_encoder(model, first), model) <= 1e-5
    model.add_task()
    with torch.no_grad():
        for _, layer in model.named_layers():
            layer.w_gate[1].normal_(0.0, 1.0)
            layer.down_b.normal_(0.0, 0.1)
    filled = fill_moe_template(first, model, tmp_path / "filled")
    assert filled is not None
    traced = export_moe_encoder(model, tmp_path / "traced")
    pixels, tasks = eh.mixed_batch(), np.arange(12) % 3 - 1
    outputs = [ort.InferenceSession(str(g), providers=["CPUExecutionProvider"]).run(
        None, {"pixels": pixels, "task_ids": tasks})[0] for g in (filled, traced)]
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-6)
    for _, layer in model.named_layers():
        layer.grow(2)
    assert fill_moe_template(first, model, tmp_path / "grown") is None  # the experts' shapes changed
