"""Build graphs/gated.onnx for an MoE-Adapters bundle: frozen encoder, DDAS gate, then an `If` that
runs the traced adapted encoder (`moe_encoder.onnx`) only on the images routed to a task.

Graph (x = frozen `embedding` [B,D]; the gate, routing and zero-shot nodes are compose.py's):

    p_zs, gate_ratio, route                              as for RAIL (ddas routing)
    If max(route) >= 0:                                  (else: zeros [B,C], no adapted pass)
        i       = NonZero(route >= 0)                    the n routed images
        a       = moe_encoder(pixels[i], route[i])       adapted embeddings [n,D]
        s_i     = softmax over task t_i's columns of logit_scale * a task_text^T, zero elsewhere
        s_moe   = s_i gathered back to the routed rows of [B,C] (CumSum positions), zeros elsewhere
    scores = routed ? [s_moe, 0 (unlearned labels)] : p_zs

The adapted encoder's nodes are inlined into the `If`'s then-branch under the prefix "moe/". Its
frozen-backbone tensors are matched by value (dtype, shape, bytes) against the image encoder's and
referenced from the outer graph, so they are read from `image_encoder.data`; only the rest (experts,
routers, constants the exporter folded differently) is read from `moe_encoder.data`. torch-free.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeclip.errors import BundleError
from edgeclip.export.compose import (
    _Builder,
    _ddas_route,
    _fuse,
    _gate_errors,
    _load_encoder,
    _names_in,
    _save_gated,
    _value_info,
    _zero_shot,
    build_gated_graph,
    load_graph,
)
from edgeclip.layout import (
    ADAPTED,
    EMBEDDING,
    GATE_RATIO,
    GATED_GRAPH,
    IMAGE_DATA,
    IMAGE_GRAPH,
    MOE_DATA,
    MOE_GRAPH,
    PIXELS,
    TASK_IDS,
    TASK_TEXT,
)
from edgeclip.manifest import Manifest
from edgeclip.train.decision import DecisionSpec

_MOE_PREFIX = "moe/"  # every name of the inlined adapted encoder that is not shared with the frozen one
_BRANCH_PREFIX = "decision/moe_branch/"


@dataclasses.dataclass(frozen=True)
class WeightSharing:
    """Where the inlined adapted encoder's weights come from (bytes of external data)."""

    shared_bytes: int  # frozen tensors read from image_encoder.data (no copy)
    own_bytes: int  # tensors read from moe_encoder.data (adapters and tensors the exporter changed)


# -- loading and matching ------------------------------------------------------------------------
def _load_moe_encoder(graphs_dir: Path, moe: str = MOE_GRAPH, moe_data: str = MOE_DATA,
                      encoder_data: str = IMAGE_DATA) -> onnx.ModelProto:
    model = load_graph(graphs_dir, moe, "export it first (trace_moe.export_moe_encoder)")
    if [i.name for i in model.graph.input] != [PIXELS, TASK_IDS] or [o.name for o in model.graph.output] != [ADAPTED]:
        raise BundleError(f"{moe} must map ({PIXELS}, {TASK_IDS}) to {ADAPTED}")
    for node in model.graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise BundleError(f"{moe}: node {node.name} ({node.op_type}) holds a subgraph; not supported")
    for init in model.graph.initializer:
        if _location(init) not in (None, moe_data, encoder_data):
            raise BundleError(f"{moe}: initialiser {init.name} lives in {_location(init)!r}, "
                              f"expected {moe_data} or {encoder_data}")
    return model


def _location(init: onnx.TensorProto) -> str | None:
    if init.data_location != TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in init.external_data}.get("location")


def _external_bytes(init: onnx.TensorProto, folder: Path) -> bytes:
    info = {e.key: e.value for e in init.external_data}
    with open(folder / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        return f.read(int(info["length"]))


def _content_key(init: onnx.TensorProto, folder: Path) -> tuple[int, tuple[int, ...], bytes]:
    return init.data_type, tuple(init.dims), hashlib.sha256(_external_bytes(init, folder)).digest()


def _frozen_twins(encoder: onnx.ModelProto, moe: onnx.ModelProto, folder: Path) -> dict[str, str]:
    """{adapted-encoder initialiser: image-encoder initialiser with the same dtype, shape and bytes}."""
    frozen = {_content_key(i, folder): i.name for i in encoder.graph.initializer if _location(i)}
    twins = {}
    for init in moe.graph.initializer:
        if _location(init):
            twin = frozen.get(_content_key(init, folder))
            if twin is not None:
                twins[init.name] = twin
    return twins


def weight_sharing(gated: onnx.ModelProto, frozen: str = IMAGE_DATA, own: str = MOE_DATA) -> WeightSharing:
    """Bytes of external data a gated graph reads from the frozen and from the adapted weights file,
    named by their external-data locations (in a bundle's graph store: ``Bundle.path(...).name``)."""
    sizes = {}
    for init in gated.graph.initializer:
        location = _location(init)
        if location:
            length = int({e.key: e.value for e in init.external_data}["length"])
            sizes[location] = sizes.get(location, 0) + length
    return WeightSharing(shared_bytes=sizes.get(frozen, 0), own_bytes=sizes.get(own, 0))


def share_frozen_weights(graphs_dir: Path | str, encoder: str = IMAGE_GRAPH, encoder_data: str = IMAGE_DATA,
                         moe: str = MOE_GRAPH, moe_data: str = MOE_DATA) -> WeightSharing:
    """Rewrite `moe_encoder.onnx` + `.data` in `graphs_dir` so that its frozen-backbone tensors are
    read from `image_encoder.data` (same folder) and `moe_encoder.data` keeps only the rest (other
    names: the fp16 graphs, `edgeclip.export.fp16`).

    Afterwards the adapted encoder runs only beside image_encoder.data (as bundle graphs do).
    Files are replaced, never written through: links into the graph store (VersionWriter.graph_folder)
    stay intact.
    """
    graphs_dir = Path(graphs_dir)
    frozen_model = _load_encoder(graphs_dir, encoder, encoder_data)
    adapted = _load_moe_encoder(graphs_dir, moe, moe_data, encoder_data)
    twins = _frozen_twins(frozen_model, adapted, graphs_dir)
    frozen = {i.name: i for i in frozen_model.graph.initializer}
    data_tmp = graphs_dir / f".{moe_data}.tmp"
    with open(data_tmp, "wb") as out:
        for init in adapted.graph.initializer:
            if init.name in twins:
                del init.external_data[:]
                init.external_data.extend(frozen[twins[init.name]].external_data)
            elif _location(init) == moe_data:
                payload = _external_bytes(init, graphs_dir)
                offset = out.tell()
                out.write(payload)
                del init.external_data[:]
                for key, value in (("location", moe_data), ("offset", str(offset)), ("length", str(len(payload)))):
                    init.external_data.add(key=key, value=value)
    graph_tmp = graphs_dir / f".{moe}.tmp"
    onnx.save_model(adapted, str(graph_tmp))
    data_tmp.replace(graphs_dir / moe_data)  # rename: an old file (a link into the store) is replaced, not overwritten
    graph_tmp.replace(graphs_dir / moe)
    return weight_sharing(adapted, encoder_data, moe_data)


# -- inlining the adapted encoder ----------------------------------------------------------------
def _inline_moe(moe: onnx.ModelProto, twins: Mapping[str, str], inputs: Mapping[str, str],
                taken: set[str]) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """The adapted encoder's nodes renamed for the then-branch, the initialisers it needs in the
    outer graph (renamed, external ones still in moe_encoder.data), and its output's new name."""
    rename = dict(inputs)
    rename.update(twins)
    inits = []
    for init in moe.graph.initializer:
        if init.name in twins:
            continue
        copy = onnx.TensorProto()
        copy.CopyFrom(init)
        copy.name = rename[init.name] = _fresh(f"{_MOE_PREFIX}{init.name}", taken)
        inits.append(copy)
    nodes = []
    for node in moe.graph.node:
        for out in node.output:
            if out:
                rename[out] = _fresh(f"{_MOE_PREFIX}{out}", taken)
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = _fresh(f"{_MOE_PREFIX}{node.name or node.op_type}", taken)
        del copy.input[:], copy.output[:]
        copy.input.extend(rename[i] if i else "" for i in node.input)
        copy.output.extend(rename[o] if o else "" for o in node.output)
        nodes.append(copy)
    return nodes, inits, rename[ADAPTED]


def _fresh(name: str, taken: set[str]) -> str:
    if name in taken:
        raise BundleError(f"the gated graph already uses the name {name}")
    taken.add(name)
    return name


# -- the decision ----------------------------------------------------------------------------------
def _task_scores(b: _Builder, adapted: str, tasks: str, learned: Mapping[str, np.ndarray], spec: DecisionSpec) -> str:
    """[n,C]: softmax(logit_scale * adapted task_text^T) over each row's task's columns, 0 elsewhere."""
    task_text = np.asarray(learned[TASK_TEXT], np.float32)  # [C,D]
    columns = np.arange(spec.n_learned)
    own = (columns >= spec.offsets[:, None]) & (columns < (spec.offsets + spec.sizes)[:, None])  # [T,C]
    logits = b.op("Mul", b.op("MatMul", adapted, b.const(task_text.T, "task_text_t")),
                  b.const(spec.logit_scale, "logit_scale"))
    mask = b.op("Gather", b.const(own, "task_columns", np.bool_), tasks, axis=0)  # [n,C]
    far = b.const(-np.finfo(np.float32).max, "minus_far")
    probs = b.op("Softmax", b.op("Where", mask, logits, far), axis=-1)
    return b.op("Where", mask, probs, b.const(0.0, "zero"))


def _adapted_branch(g: _Builder, moe: onnx.ModelProto, twins: Mapping[str, str], route: str, routed: str,
                    zeros: str, learned: Mapping[str, np.ndarray], spec: DecisionSpec,
                    taken: set[str]) -> onnx.GraphProto:
    """then-branch: the adapted pass on the routed images only, scattered back into zeros [B,C]."""
    b = _Builder(taken, _BRANCH_PREFIX)
    index = b.op("Reshape", b.op("NonZero", routed), b.ints(-1))  # [n]
    pixels = b.op("Gather", PIXELS, index, axis=0)
    tasks = b.op("Gather", route, index, axis=0)
    nodes, inits, adapted = _inline_moe(moe, twins, {PIXELS: pixels, TASK_IDS: tasks}, taken)
    head = _Builder(taken, _BRANCH_PREFIX + "head/")
    scores = _task_scores(head, adapted, tasks, learned, spec)
    # back to [B,C]: row b takes routed row number cumsum(routed)[b] - 1 (NonZero lists the routed rows
    # in batch order), zeros where b is not routed. A Gather, not a ScatterND: exact, and onnxruntime's
    # CUDA ScatterND warns on every load that it assumes unique indices.
    order = head.op("Sub", head.op("CumSum", head.op("Cast", routed, to=TensorProto.INT64),
                                   head.const(0, "axis", np.int64)), head.const(1, "one_i", np.int64))
    rows = head.op("Gather", scores, head.op("Max", order, head.const(0, "zero_i", np.int64)), axis=0)  # [B,C]
    out = head.op("Where", head.op("Unsqueeze", routed, head.ints(1)), rows, zeros)
    g.inits.extend(b.inits + inits + head.inits)  # outer initialisers: the branch reads them by name
    return helper.make_graph(b.nodes + nodes + head.nodes, "adapted", [],
                             [_value_info(out, TensorProto.FLOAT, ["batch", spec.n_learned])])


def _moe_decision(g: _Builder, moe: onnx.ModelProto, twins: Mapping[str, str], learned: Mapping[str, np.ndarray],
                  spec: DecisionSpec, taken: set[str]) -> None:
    x = EMBEDDING
    p_zs = _zero_shot(g, x, spec)
    err = _gate_errors(g, x, learned, spec)
    ratio = g.op("Div", err, g.const(spec.thresholds, "thresholds"), out=GATE_RATIO)
    route = _ddas_route(g, err, ratio, spec.route_rule)
    batch = g.op("Shape", PIXELS, start=0, end=1)
    zeros = g.op("ConstantOfShape", g.op("Concat", batch, g.ints(spec.n_learned), axis=0),
                 value=numpy_helper.from_array(np.array([0.0], np.float32)))  # [B,C]
    routed = g.op("Greater", route, g.const(-1, "minus_one", np.int64))  # [B]
    any_routed = g.op("GreaterOrEqual", g.op("ReduceMax", route, keepdims=0), g.const(0, "zero_i", np.int64))
    then_branch = _adapted_branch(g, moe, twins, route, routed, zeros, learned, spec, taken)
    idle = _Builder(taken, _BRANCH_PREFIX + "idle/")
    skipped = idle.op("Identity", zeros)
    else_branch = helper.make_graph(idle.nodes, "frozen_only", [],
                                    [_value_info(skipped, TensorProto.FLOAT, ["batch", spec.n_learned])])
    s_moe = g.op("If", any_routed, then_branch=then_branch, else_branch=else_branch)
    _fuse(g, p_zs, s_moe, routed, dataclasses.replace(spec, beta=1.0))  # beta 1: routed rows = [s_moe, 0]


def build_moe_gated_graph(graphs_dir: Path | str, learned: Mapping[str, np.ndarray], meta: Manifest,
                          encoder: str = IMAGE_GRAPH, encoder_data: str = IMAGE_DATA, moe: str = MOE_GRAPH,
                          moe_data: str = MOE_DATA, output: str = GATED_GRAPH) -> Path:
    """Write `gated.onnx` beside `image_encoder.onnx` and `moe_encoder.onnx` in `graphs_dir`; returns its path.

    `learned`: learned.safetensors' tensors (compose.learned_tensors with method "moe": gate tensors
    and `task_text` [C,D]); `meta`: the version's typed manifest (method "moe", gate kind and settings,
    tasks with thresholds, zero_shot.logit_scale). With no task the graph is plain zero-shot.
    `encoder`, `encoder_data`, `moe`, `moe_data`, `output`: other graph names of `graphs_dir` (the fp16
    graphs, `edgeclip.export.fp16`).
    Raises BundleError when the method is not "moe", `task_text` is missing or of the wrong shape,
    or the adapted encoder graph does not have the expected inputs, outputs and weights.
    """
    graphs_dir = Path(graphs_dir)
    spec = DecisionSpec.from_bundle(learned, meta)
    if not spec.learner.learns_from_images:
        raise BundleError(f"build_moe_gated_graph serves MoE bundles, not {spec.method!r}")
    if spec.n_tasks == 0:
        return build_gated_graph(graphs_dir, learned, meta, encoder, encoder_data, output)
    if TASK_TEXT not in learned or np.shape(learned[TASK_TEXT])[0] != spec.n_learned:
        raise BundleError(f"learned tensors need {TASK_TEXT} [{spec.n_learned}, D]")
    model = _load_encoder(graphs_dir, encoder, encoder_data)
    adapted = _load_moe_encoder(graphs_dir, moe, moe_data, encoder_data)
    twins = _frozen_twins(model, adapted, graphs_dir)
    taken = _names_in(model.graph)
    g = _Builder(taken)
    _moe_decision(g, adapted, twins, learned, spec, taken)
    return _save_gated(graphs_dir, model, g, spec, meta.embed_dim, output)

