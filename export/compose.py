"""Build graphs/gated.onnx around the exported image encoder, without torch (numpy + onnx).

RAIL add-task runs on a device without torch, so the parts of the gated graph that change when
a task is added (gate, head, fusion, routing) are written here with `onnx.helper` and appended
to the traced encoder graph. The encoder is loaded with `load_external_data=False`: its
initialisers keep pointing at `image_encoder.data` in the same folder, nothing is copied.

The decision, for the encoder's output x = embedding [B,D] and the input label_text [L,D]
(docs/ARCHITECTURE.md, "Gated graph contract"):

    p_zs  = softmax(logit_scale * norm(x) norm(label_text)^T)                     [B,L]
    err   = per-task autoencoder errors of x, all tasks at once (batched MatMul)   [B,T]
    ratio = err / thr;  route = -1 where min ratio > 1, else the accepting task with the
            smallest error (gate setting route_rule "nearest", the default) or argmin ratio ("ratio")
    s_A   = relu(x W_r) W (primal) | exp(-g ||x - M||^2) alpha (dual)              [B,C]
    fusion "ddas":  routed -> (1-beta) p_zs + beta (s_A on the route's columns), -1 -> p_zs
    fusion "paper": route = task of argmax p_zs if learned, else -1; routed -> (1-beta) p_zs + beta s_A

Every step is row-wise, so a mixed batch equals its images run one by one; there are no loops.
With zero tasks the graph is plain zero-shot (route -1, gate_ratio [B,0]).

The layout of learned.safetensors is `edgeclip.layout`'s; `edgeclip.train.decision.learned_tensors` packs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeclip.errors import BundleError
from edgeclip.layout import (
    EMBEDDING,
    GATE_KEYS,
    GATE_RATIO,
    GATED_GRAPH,
    HEAD_GRAPH,
    IMAGE_DATA,
    IMAGE_GRAPH,
    LABEL_TEXT,
    OPSET,
    ROUTE,
    SCORES,
)
from edgeclip.manifest import Manifest
from edgeclip.train.decision import DecisionSpec  # numpy only, no torch

_NAMESPACE = "decision/"  # prefix of every node, value and initialiser added to the encoder graph
_SHARED_HINTS = ("rail_w_r",)  # decision constants equal in every version: stored as external data (shared_data_name)


# -- a small graph builder ----------------------------------------------------------------------
class _Builder:
    """Collects nodes and initialisers under one name prefix; `op(...)` returns the output name."""

    def __init__(self, taken: set[str], namespace: str = _NAMESPACE) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._taken = taken
        self._count = 0
        self._namespace = namespace

    def _name(self, hint: str) -> str:
        self._count += 1
        name = f"{self._namespace}{hint}_{self._count}"
        if name in self._taken:
            raise BundleError(f"the encoder graph already uses the name {name}")
        return name

    def const(self, value: Any, hint: str = "c", dtype: Any = np.float32) -> str:
        name = self._name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def ints(self, *values: int) -> str:
        return self.const(list(values), "axes", np.int64)

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        output = out or self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=self._name(op_type), **attrs))
        return output


def _l2_normalise(g: _Builder, x: str) -> str:
    """x / ||x|| over the last axis (rows)."""
    return g.op("Div", x, g.op("ReduceL2", x, g.ints(-1), keepdims=1))


def _zero_shot(g: _Builder, x: str, spec: DecisionSpec) -> str:
    """p_zs [B,L] = softmax(logit_scale * norm(x) norm(label_text)^T)."""
    text_t = g.op("Transpose", _l2_normalise(g, LABEL_TEXT), perm=[1, 0])
    logits = g.op("Mul", g.op("MatMul", _l2_normalise(g, x), text_t), g.const(spec.logit_scale, "logit_scale"))
    return g.op("Softmax", logits, axis=-1)


def _gate_errors(g: _Builder, x: str, learned: Mapping[str, np.ndarray], spec: DecisionSpec) -> str:
    """Reconstruction error of every task's autoencoder [B,T], as batched MatMuls over tasks."""
    mu = np.asarray(learned["gate.mu"], np.float32)[:, None, :]  # [T,1,D]
    if spec.gate_kind == "linear":
        comps = np.asarray(learned["gate.components"], np.float32)  # [T,K,D]
        r = g.op("Sub", g.op("Unsqueeze", x, g.ints(0)), g.const(mu, "gate_mu"))  # [T,B,D]
        coef = g.op("MatMul", r, g.const(comps.transpose(0, 2, 1), "gate_components_t"))  # [T,B,K]
        residual = g.op("Sub", r, g.op("MatMul", coef, g.const(comps, "gate_components")))  # [T,B,D]
    elif spec.gate_kind == "mlp":
        scale = np.asarray(learned["gate.scale"], np.float32).reshape(-1, 1, 1)  # [T,1,1]
        z = g.op("Mul", g.op("Sub", g.op("Unsqueeze", x, g.ints(0)), g.const(mu, "gate_mu")),
                 g.const(scale, "gate_scale"))  # [T,B,D]
        hidden = g.op("Relu", g.op("Add", g.op("MatMul", z, g.const(learned["gate.w1"], "gate_w1")),
                                   g.const(np.asarray(learned["gate.b1"])[:, None, :], "gate_b1")))  # [T,B,H]
        recon = g.op("Add", g.op("MatMul", hidden, g.const(learned["gate.w2"], "gate_w2")),
                     g.const(np.asarray(learned["gate.b2"])[:, None, :], "gate_b2"))  # [T,B,D]
        residual = g.op("Sub", z, recon)
    else:
        raise BundleError(f"unknown gate kind {spec.gate_kind!r}; known: {sorted(GATE_KEYS)}")
    err = g.op("ReduceMean", g.op("Mul", residual, residual), g.ints(2), keepdims=0)  # [T,B]
    if spec.gate_kind == "mlp":  # back to embedding units: divide by scale^2
        err = g.op("Div", err, g.const((scale * scale).reshape(-1, 1), "gate_scale_sq"))
    return g.op("Transpose", err, perm=[1, 0])  # [B,T]


def _ddas_route(g: _Builder, err: str, ratio: str, rule: str) -> str:
    """-1 where no task accepts the image (every ratio > 1); else rule "nearest": the accepting task
    with the smallest error, rule "ratio": the smallest ratio (first on ties, like numpy)."""
    if rule == "nearest":
        accepted = g.op("LessOrEqual", ratio, g.const(1.0, "one"))
        far = g.const(np.finfo(np.float32).max, "far")  # finite: TensorRT-friendly stand-in for inf
        best = g.op("ArgMin", g.op("Where", accepted, err, far), axis=1, keepdims=0)  # [B] int64
    else:
        best = g.op("ArgMin", ratio, axis=1, keepdims=0)
    unseen = g.op("Greater", g.op("ReduceMin", ratio, g.ints(1), keepdims=0), g.const(1.0, "one"))
    return g.op("Where", unseen, g.const(-1, "minus_one", np.int64), best, out=ROUTE)


def _slice_columns(g: _Builder, x: str, start: int, end: int) -> str:
    return g.op("Slice", x, g.ints(start), g.ints(end), g.ints(1))


def _fuse(g: _Builder, p_zs: str, learned_part: str, routed: str, spec: DecisionSpec) -> str:
    """Where(routed, (1-beta) p_zs + beta [learned_part, 0], p_zs) without a dynamic Pad."""
    c = spec.n_learned
    one_minus = g.const(1.0 - spec.beta, "one_minus_beta")
    mixed_learned = g.op("Add", g.op("Mul", _slice_columns(g, p_zs, 0, c), one_minus),
                         g.op("Mul", learned_part, g.const(spec.beta, "beta")))
    mixed_rest = g.op("Mul", _slice_columns(g, p_zs, c, np.iinfo(np.int64).max), one_minus)
    mixed = g.op("Concat", mixed_learned, mixed_rest, axis=1)
    return g.op("Where", g.op("Unsqueeze", routed, g.ints(1)), mixed, p_zs, out=SCORES)


def _task_of_column(spec: DecisionSpec) -> np.ndarray:
    return np.repeat(np.arange(spec.n_tasks, dtype=np.int64), spec.sizes)


def _decision(g: _Builder, x: str, learned: Mapping[str, np.ndarray], spec: DecisionSpec) -> None:
    p_zs = _zero_shot(g, x, spec)
    if spec.n_tasks == 0:
        g.op("Identity", p_zs, out=SCORES)
        batch = g.op("Shape", x, start=0, end=1)  # [1]
        g.op("ConstantOfShape", batch, out=ROUTE, value=numpy_helper.from_array(np.array([-1], np.int64)))
        g.op("ConstantOfShape", g.op("Concat", batch, g.ints(0), axis=0), out=GATE_RATIO,
             value=numpy_helper.from_array(np.array([0.0], np.float32)))
        return
    err = _gate_errors(g, x, learned, spec)  # [B,T]
    ratio = g.op("Div", err, g.const(spec.thresholds, "thresholds"), out=GATE_RATIO)  # [B,T]
    s_a = spec.learner.graph_scores(g, x, learned, spec)  # the learner's head, [B,C]
    minus_one = g.const(-1, "minus_one", np.int64)
    if spec.fusion == "ddas":
        route = _ddas_route(g, err, ratio, spec.route_rule)
        masks = (_task_of_column(spec)[None, :] == np.arange(spec.n_tasks)[:, None]).astype(np.float32)
        own = g.op("Mul", s_a, g.op("Gather", g.const(masks, "task_masks"),
                                    g.op("Max", route, g.const(0, "zero_i", np.int64)), axis=0))  # [B,C]
        _fuse(g, p_zs, own, g.op("Greater", route, minus_one), spec)
    else:
        top = g.op("ArgMax", p_zs, axis=1, keepdims=0)  # [B]
        seen = g.op("Less", top, g.const(spec.n_learned, "n_learned", np.int64))
        task = g.op("Gather", g.const(_task_of_column(spec), "column_task", np.int64),
                    g.op("Min", top, g.const(spec.n_learned - 1, "last_learned", np.int64)), axis=0)
        g.op("Where", seen, task, minus_one, out=ROUTE)
        _fuse(g, p_zs, s_a, seen, spec)


# -- the gated graph ---------------------------------------------------------------------------
def load_graph(graphs_dir: Path, name: str, how_to_make: str) -> onnx.ModelProto:
    """A graph of `graphs_dir` without its external weights (nothing is copied), checked for our opset.
    Raises BundleError (with `how_to_make`) when it is missing, or when its opset is not ours."""
    path = graphs_dir / name
    if not path.is_file():
        raise BundleError(f"no graph at {path}; {how_to_make}")
    model = onnx.load(str(path), load_external_data=False)
    opset = {o.domain: o.version for o in model.opset_import}.get("", 0)
    if opset != OPSET:
        raise BundleError(f"{name} has opset {opset}; the gated graph is built for opset {OPSET}")
    return model


def _load_encoder(graphs_dir: Path, encoder: str = IMAGE_GRAPH, encoder_data: str = IMAGE_DATA) -> onnx.ModelProto:
    model = load_graph(graphs_dir, encoder, "export the backbone first")
    for init in model.graph.initializer:
        if init.data_location == TensorProto.EXTERNAL:
            location = {e.key: e.value for e in init.external_data}.get("location")
            if location != encoder_data:
                raise BundleError(f"{encoder}: initialiser {init.name} lives in {location!r}, expected {encoder_data}")
    if [o.name for o in model.graph.output] != [EMBEDDING]:
        raise BundleError(f"{encoder} must have the single output '{EMBEDDING}'")
    return model


def _value_info(name: str, elem: int, dims: list[Any]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, dims)


def build_gated_graph(graphs_dir: Path | str, learned: Mapping[str, np.ndarray], meta: Manifest,
                      encoder: str = IMAGE_GRAPH, encoder_data: str = IMAGE_DATA, output: str = GATED_GRAPH) -> Path:
    """Write `gated.onnx` beside `image_encoder.onnx` in `graphs_dir`; returns its path.

    `learned`: learned.safetensors' tensors (layout: `learned_tensors`); `meta`: the typed
    manifest of the version being written (method, gate kind, tasks with thresholds, zero_shot).
    `encoder`/`encoder_data`/`output` name another encoder graph of `graphs_dir` (whose external
    weights must all live in `encoder_data`) and the file to write, e.g. the int8 encoder and
    `gated_int8.onnx` (edgeclip.export.quantize). Decision: METHODS.md sections 2 (DDAS gate) and
    3 (RAIL-Fusion). Raises BundleError when the encoder graph is missing, of another opset, or
    its weights or output are not where expected, or when an MoE bundle with tasks is given
    (``compose_moe.build_moe_gated_graph`` builds those).
    """
    graphs_dir = Path(graphs_dir)
    spec = DecisionSpec.from_bundle(learned, meta)
    if spec.learner.learns_from_images and spec.n_tasks:
        raise BundleError("an MoE bundle with tasks needs the adapted encoder: "
                          "use edgeclip.export.compose_moe.build_moe_gated_graph")
    model = _load_encoder(graphs_dir, encoder, encoder_data)
    g = _Builder(_names_in(model.graph))
    _decision(g, EMBEDDING, learned, spec)
    return _save_gated(graphs_dir, model, g, spec, meta.embed_dim, output)


def _names_in(graph: onnx.GraphProto) -> set[str]:
    """Node, value and initialiser names of a graph (new names must avoid them)."""
    return ({n.name for n in graph.node} | {v for n in graph.node for v in n.output}
            | {i.name for i in graph.initializer} | {i.name for i in graph.input})


def _save_gated(graphs_dir: Path, model: onnx.ModelProto, g: _Builder, spec: DecisionSpec, dim: int,
                output: str = GATED_GRAPH) -> Path:
    """Append the decision `g` to the encoder `model`, set the contract's inputs and outputs, save
    `output` (default gated.onnx; external initialisers stay references) and check it."""
    graph = model.graph
    graph.node.extend(g.nodes)
    graph.initializer.extend(g.inits)
    graph.input.append(_value_info(LABEL_TEXT, TensorProto.FLOAT, ["labels", dim]))
    batch = graph.input[0].type.tensor_type.shape.dim[0].dim_param or "batch"
    embedding = graph.output[0]
    del graph.output[:]
    graph.output.extend([
        _value_info(SCORES, TensorProto.FLOAT, [batch, "labels"]),
        _value_info(ROUTE, TensorProto.INT64, [batch]),
        _value_info(GATE_RATIO, TensorProto.FLOAT, [batch, spec.n_tasks]),
        embedding,
    ])
    graph.name = "edgeclip_gated"
    del model.metadata_props[:]
    helper.set_model_props(model, {"edgeclip.method": spec.method, "edgeclip.fusion": spec.fusion,
                                   "edgeclip.tasks": str(spec.n_tasks)})
    out = graphs_dir / output
    _externalise_shared(graphs_dir, graph, output)
    tmp = out.with_name(f".{out.name}.tmp")
    onnx.save_model(model, str(tmp))  # external initialisers stay references to the encoder's .data
    tmp.replace(out)
    check_structure(model)
    return out


def shared_data_name(output: str) -> str:
    """The external-data file of a gated graph's decision constants that stay the same from version
    to version (RAIL primal's random layer W_r): ``<graph stem>.shared.data`` beside the graph. In a
    bundle its bytes are identical in every version, so the graph store keeps one copy."""
    return f"{Path(output).stem}.shared.data"


def _externalise_shared(graphs_dir: Path, graph: onnx.GraphProto, output: str) -> None:
    """Move the decision's version-invariant constants (`_SHARED_HINTS`) to `shared_data_name(output)`
    (replaced, never written through: it may be a link into a bundle's graph store)."""
    path = graphs_dir / shared_data_name(output)
    path.unlink(missing_ok=True)
    shared = [t for t in graph.initializer
              if any(t.name.startswith(f"{_NAMESPACE}{hint}_") for hint in _SHARED_HINTS) and t.raw_data]
    if not shared:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as out:
        for tensor in shared:
            offset = out.tell()
            out.write(tensor.raw_data)
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key, value in (("location", path.name), ("offset", str(offset)), ("length", str(out.tell() - offset))):
                tensor.external_data.add(key=key, value=value)
    tmp.replace(path)


def check_structure(model: onnx.ModelProto) -> None:
    """onnx.checker (with shape inference) on the graph, external initialisers stood in by inputs.

    Checks the structure only, so it runs where the weights are not readable by onnx (a graph folder
    whose data files are symlinks into the graph store); stored graphs also pass the full checker
    with their weights (tests/test_portable_graphs.py). Raises onnx's ValidationError (or
    InferenceError) on a malformed graph.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    external = [t for t in probe.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    for tensor in external:
        probe.graph.input.append(_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        probe.graph.initializer.remove(tensor)
    onnx.checker.check_model(probe, full_check=True)


# -- the head graph: from a cached embedding to scores ----------------------------------------------
def build_head_graph(learned: Mapping[str, np.ndarray], meta: Manifest) -> onnx.ModelProto:
    """The gated graph's decision without the encoder: inputs `embedding` [B,D] float32 (the frozen image
    embedding, e.g. from the embedding cache) and `label_text` [L,D]; outputs `scores` [B,L], `route` [B]
    int64, `gate_ratio` [B,T]. The same nodes as the gated graph's (``_decision``), kept in memory (nothing
    is written). For an MoE bundle with tasks `scores` is the zero-shot p_zs and `route` the DDAS route:
    the routed rows' scores need the adapted encoder (``edgeclip.train.decision.moe_scores``).

    Raises BundleError as ``DecisionSpec.from_bundle`` does.
    """
    spec = DecisionSpec.from_bundle(learned, meta)
    dim = int(meta.backbone.embed_dim)
    g = _Builder({EMBEDDING, LABEL_TEXT})
    if spec.learner.learns_from_images and spec.n_tasks:  # MoE: the gate and zero-shot part
        p_zs = _zero_shot(g, EMBEDDING, spec)
        g.op("Identity", p_zs, out=SCORES)
        err = _gate_errors(g, EMBEDDING, learned, spec)
        ratio = g.op("Div", err, g.const(spec.thresholds, "thresholds"), out=GATE_RATIO)
        _ddas_route(g, err, ratio, spec.route_rule)
    else:
        _decision(g, EMBEDDING, learned, spec)
    graph = helper.make_graph(
        g.nodes, "edgeclip_head",
        [_value_info(EMBEDDING, TensorProto.FLOAT, ["batch", dim]), _value_info(LABEL_TEXT, TensorProto.FLOAT, ["labels", dim])],
        [_value_info(SCORES, TensorProto.FLOAT, ["batch", "labels"]), _value_info(ROUTE, TensorProto.INT64, ["batch"]),
         _value_info(GATE_RATIO, TensorProto.FLOAT, ["batch", spec.n_tasks])],
        g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgeclip")
    model.ir_version = min(model.ir_version, 9)  # onnxruntime >= 1.17 reads IR 9
    return model


def write_head_graph(graphs_dir: Path | str, learned: Mapping[str, np.ndarray], meta: Manifest) -> Path:
    """Write ``build_head_graph``'s graph as `head.onnx` in `graphs_dir` (RAIL primal's W_r as the external
    data `head.shared.data`, equal in every version); returns its path. Raises BundleError as
    ``DecisionSpec.from_bundle`` does."""
    graphs_dir = Path(graphs_dir)
    model = build_head_graph(learned, meta)
    _externalise_shared(graphs_dir, model.graph, HEAD_GRAPH)
    check_structure(model)
    out = graphs_dir / HEAD_GRAPH
    tmp = out.with_name(f".{out.name}.tmp")
    onnx.save_model(model, str(tmp))
    tmp.replace(out)
    return out
