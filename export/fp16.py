"""fp16 graphs of a bundle: the encoders in float16, the decision in float32 (torch-free).

`edgeclip export --precision fp16` (`export_fp16`) writes a new version holding

- `image_encoder_fp16.onnx` + `image_encoder_fp16.data`: the frozen image encoder with its float
  tensors and compute in float16; input `pixels` and output `embedding` stay float32 (a Cast at each
  end), so everything downstream is unchanged;
- for an MoE bundle with tasks, `moe_encoder_fp16.onnx` + `moe_encoder_fp16.data`: the adapted encoder
  converted likewise, its frozen-backbone tensors read from `image_encoder_fp16.data` (matched by
  value, as `compose_moe.share_frozen_weights` does for fp32);
- `gated_fp16.onnx`: the bundle's decision (`compose.build_gated_graph` / `compose_moe.build_moe_gated_graph`)
  composed on the fp16 encoders. The DDAS gate, the heads and the fusion read the float32 embedding and
  stay float32, so thresholds, scores and routes keep their meaning.

Later add-tasks keep `gated_fp16.onnx` (and the MoE adapted encoder) in step (`write_fp16_graphs`),
as for int8. The conversion is onnxruntime's own `onnxruntime.transformers.float16.convert_float_to_float16`
(the onnxconverter-common converter shipped inside onnxruntime) with `keep_io_types=True`; ops it
blocks (TopK among them, so the MoE routers' top-k selects on float32 logits) stay float32 behind
Casts. onnxruntime runs the float16 graph on CPU too: ops without a CPU float16 kernel get Casts
around them at session creation. All files go to the bundle's content-addressed graph store.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from edgeclip.bundle import Bundle
from edgeclip.errors import BundleError
from edgeclip.export.compose import build_gated_graph, check_structure
from edgeclip.layout import (
    FP16_GRAPHS,
    GATED_FP16_GRAPH,
    IMAGE_FP16_DATA,
    IMAGE_FP16_GRAPH,
    IMAGE_GRAPH,
    MOE_FP16_DATA,
    MOE_FP16_GRAPH,
    MOE_GRAPH,
    graph_file,
)
from edgeclip.manifest import Manifest
from edgeclip.train.registry import get_learner

log = logging.getLogger(__name__)

_INLINE_BELOW = 1024  # bytes; smaller tensors stay inline (as the other exported graphs)


def _with_weights(folder: Path, name: str) -> onnx.ModelProto:
    """Graph `name` of `folder` with its external tensors read into memory. Read with plain file
    reads: onnx refuses external data reached through the links of a writer's graph folder."""
    path = folder / name
    if not path.is_file():
        raise BundleError(f"no {name} in {folder}")
    model = onnx.load(str(path), load_external_data=False)
    for init in model.graph.initializer:
        if init.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in init.external_data}
        location = Path(info["location"])
        if location.name != info["location"] or location.name.startswith("."):
            raise BundleError(f"{name}: initialiser {init.name} names an external file outside its folder")
        with open(folder / location, "rb") as f:
            f.seek(int(info.get("offset", 0)))
            init.raw_data = f.read(int(info["length"]))
        del init.external_data[:]
        init.data_location = TensorProto.DEFAULT
    return model


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with float tensors and compute in float16, its inputs and outputs kept float32
    (onnxruntime's `convert_float_to_float16(keep_io_types=True)`). `model` holds its weights."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # the converter re-infers shapes; stale value_info (a traced graph's example batch, kept by a graph
    # filled from a template) contradicts that, so only the inputs and outputs keep theirs
    del model.graph.value_info[:]
    with warnings.catch_warnings():  # values beyond float16's range are clamped: the converter warns per tensor
        warnings.simplefilter("ignore", UserWarning)
        try:
            converted = convert_float_to_float16(model, keep_io_types=True)
        except onnx.shape_inference.InferenceError as exc:  # shapes that onnx cannot infer again
            log.info("fp16: onnx shape inference failed (%s); converting without it", exc)
            converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    model = converted
    _sort_nodes(model.graph)  # the converter appends its input Casts last; the ONNX checker wants order
    return model


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """Order `graph`'s nodes so that each comes after the producers of its inputs (stable, Kahn).
    Raises BundleError on a cycle or an input nothing produces."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    todo, ordered = list(graph.node), []
    while todo:
        left = []
        for node in todo:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                left.append(node)
        if len(left) == len(todo):
            raise BundleError(f"fp16 conversion left node {left[0].name} ({left[0].op_type}) with an unknown input")
        todo = left
    copies = [onnx.NodeProto() for _ in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def _save(model: onnx.ModelProto, folder: Path, name: str, data: str) -> Path:
    """Save `model` as `name` + external `data` in `folder`, replacing (never writing through) old files."""
    out, data_path = folder / name, folder / data
    for path in (out, data_path):
        path.unlink(missing_ok=True)  # onnx appends to an existing .data file; a link into the store stays intact
    onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=_INLINE_BELOW)
    if data_path.exists():
        data_path.chmod(0o644)  # onnx creates it private; the other version files are world-readable
    saved = onnx.load(str(out), load_external_data=False)
    try:
        check_structure(saved)
    except onnx.shape_inference.InferenceError as exc:  # as in convert_to_fp16: the structure is still checked
        log.info("fp16: %s: onnx shape inference failed (%s); checked without it", name, exc)
        onnx.checker.check_model(saved)
    return out


def convert_image_encoder(graphs_dir: Path | str) -> Path:
    """Write `image_encoder_fp16.onnx` (+ `.data`) beside `image_encoder.onnx`; returns its path.
    Raises BundleError when the fp32 encoder is missing."""
    graphs_dir = Path(graphs_dir)
    return _save(convert_to_fp16(_with_weights(graphs_dir, IMAGE_GRAPH)), graphs_dir, IMAGE_FP16_GRAPH, IMAGE_FP16_DATA)


def convert_moe_encoder(graphs_dir: Path | str) -> Path:
    """Write `moe_encoder_fp16.onnx` (+ `.data`) from `moe_encoder.onnx` (whose frozen tensors live in
    `image_encoder.data`), its frozen-backbone tensors then read from `image_encoder_fp16.data`."""
    from edgeclip.export.compose_moe import share_frozen_weights

    graphs_dir = Path(graphs_dir)
    _save(convert_to_fp16(_with_weights(graphs_dir, MOE_GRAPH)), graphs_dir, MOE_FP16_GRAPH, MOE_FP16_DATA)
    share_frozen_weights(graphs_dir, encoder=IMAGE_FP16_GRAPH, encoder_data=IMAGE_FP16_DATA,
                         moe=MOE_FP16_GRAPH, moe_data=MOE_FP16_DATA)
    return graphs_dir / MOE_FP16_GRAPH


def has_fp16(files: Mapping[str, Any]) -> bool:
    """Whether a version's file table (manifest `files`) holds the fp16 graphs."""
    return all(graph_file(name) in files for name in FP16_GRAPHS)


def _adapted(meta: Manifest) -> bool:
    """An MoE bundle with tasks: its gated graph runs the adapted encoder."""
    return get_learner(meta.method.name).learns_from_images and bool(meta.tasks)


def write_fp16_graphs(graphs_dir: Path | str, learned: Mapping[str, np.ndarray], meta: Manifest,
                      adapted_changed: bool = True) -> Path:
    """`gated_fp16.onnx` for the version being written (and, for an MoE bundle with tasks whose
    adapted encoder changed, `moe_encoder_fp16.onnx` first); `image_encoder_fp16.onnx` must be there."""
    graphs_dir = Path(graphs_dir)
    if _adapted(meta):
        from edgeclip.export.compose_moe import build_moe_gated_graph

        if adapted_changed or not (graphs_dir / MOE_FP16_GRAPH).is_file():
            convert_moe_encoder(graphs_dir)
        return build_moe_gated_graph(graphs_dir, learned, meta, encoder=IMAGE_FP16_GRAPH,
                                     encoder_data=IMAGE_FP16_DATA, moe=MOE_FP16_GRAPH, moe_data=MOE_FP16_DATA,
                                     output=GATED_FP16_GRAPH)
    return build_gated_graph(graphs_dir, learned, meta, encoder=IMAGE_FP16_GRAPH,
                             encoder_data=IMAGE_FP16_DATA, output=GATED_FP16_GRAPH)


def export_fp16(bundle: Bundle) -> Bundle:
    """A new version of `bundle` with the fp16 encoders and `gated_fp16.onnx` (later add-tasks keep
    them in step). Returns the bundle unchanged when it has them already. Raises BundleError when a
    graph is missing or malformed."""
    if has_fp16(bundle.meta.files):
        return bundle
    from edgeclip.learned import read_learned

    with bundle.new_version() as writer:
        with writer.graph_folder() as graphs:  # the new graphs go to the bundle's shared graph store
            convert_image_encoder(graphs)
            write_fp16_graphs(graphs, read_learned(bundle), writer.meta)
    return writer.bundle

