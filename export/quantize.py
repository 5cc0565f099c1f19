"""int8 dynamic quantisation of the frozen image encoder: an optional CPU speed-up (torch-free).

`onnxruntime.quantization.quantize_dynamic` stores the weights of every MatMul and Gemm as int8
(symmetric, per tensor) and quantises their activations to uint8 at run time
(DynamicQuantizeLinear + MatMulInteger, default ONNX domain, opset kept at 18). Convolutions
(the patch embedding), LayerNorm, softmax and the decision itself stay float32.

Files written into a version's `graphs/` (names in `edgeclip.edgeapp.runtime`):
- `image_encoder_int8.onnx` + `image_encoder_int8.data`: input `pixels`, output `embedding`, as the
  fp32 encoder;
- `gated_int8.onnx`: the same decision as `gated.onnx` (`compose.build_gated_graph`) composed on the
  int8 encoder, its weights read from `image_encoder_int8.data`.

The fp32 encoder is read from copies in a temporary folder: `quantize_dynamic` loads the weights
with onnx, which refuses external data reached through a symlink (as in
`VersionWriter.graph_folder`) or a hard link. `export_int8` stores the results in the bundle's
shared graph store (content-named, plain external-data names: docs/EXPORT.md, "Graph store").
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeclip.bundle import Bundle
from edgeclip.errors import BundleError, UsageError
from edgeclip.export.compose import build_gated_graph, check_structure
from edgeclip.layout import (
    GATED_INT8_GRAPH,
    IMAGE_DATA,
    IMAGE_GRAPH,
    IMAGE_INT8_DATA,
    IMAGE_INT8_GRAPH,
    INT8_GRAPHS,
    graph_file,
)
from edgeclip.manifest import Manifest, Quantization, QuantizedEncoder
from edgeclip.train.registry import get_learner

QUANTIZED_OPS = ("MatMul", "Gemm")

_INLINE_BELOW = 1024  # bytes; smaller tensors stay inline (onnxruntime's shape inference reads them)


def quantize_image_encoder(graphs_dir: Path | str) -> Path:
    """Write `image_encoder_int8.onnx` (+ `.data`) beside `image_encoder.onnx`; returns its path.

    Existing int8 files are unlinked first (they may be links into the graph store), never written through.
    Raises BundleError when the fp32 image encoder or its data is missing.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graphs_dir = Path(graphs_dir)
    for name in (IMAGE_GRAPH, IMAGE_DATA):
        if not (graphs_dir / name).is_file():
            raise BundleError(f"no {name} in {graphs_dir}; export the backbone first")
    # the work folder lies inside graphs_dir (a bundle writer's staging area), not in the system temp
    # folder: a killed export leaves its copy of the encoder where the next writer removes it
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=graphs_dir) as tmp:
        work = Path(tmp)
        for name in (IMAGE_GRAPH, IMAGE_DATA):  # copies, not links: onnx reads their weights
            shutil.copyfile(graphs_dir / name, work / name)  # follows a symlink into the store
        quantized = work / "int8.onnx"
        with _quiet_root_warning():
            quantize_dynamic(str(work / IMAGE_GRAPH), str(quantized), weight_type=QuantType.QInt8,
                             op_types_to_quantize=list(QUANTIZED_OPS), use_external_data_format=True)
        model = onnx.load(str(quantized))  # weights loaded into memory from the temporary folder
    out, data = graphs_dir / IMAGE_INT8_GRAPH, graphs_dir / IMAGE_INT8_DATA
    for path in (out, data):
        path.unlink(missing_ok=True)  # onnx appends to an existing .data file
    onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=IMAGE_INT8_DATA, size_threshold=_INLINE_BELOW)
    data.chmod(0o644)  # onnx creates it private; the other version files are world-readable
    check_structure(onnx.load(str(out), load_external_data=False))
    return out


@contextmanager
def _quiet_root_warning() -> Iterator[None]:
    """Silence quantize_dynamic's advice to run `quant_pre_process` first: its symbolic shape
    inference fails on the dynamo-exported encoder (onnxruntime 1.32), and quantising without it works."""

    def keep(record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def build_gated_int8(graphs_dir: Path | str, learned: Mapping[str, np.ndarray], meta: Manifest) -> Path:
    """`gated_int8.onnx`: the bundle's decision composed on the int8 encoder (as `gated.onnx` on fp32)."""
    return build_gated_graph(graphs_dir, learned, meta, encoder=IMAGE_INT8_GRAPH,
                             encoder_data=IMAGE_INT8_DATA, output=GATED_INT8_GRAPH)


def has_int8(files: Mapping[str, Any]) -> bool:
    """Whether a version's file table (manifest `files`) holds the int8 graphs."""
    return all(graph_file(name) in files for name in INT8_GRAPHS)


def export_int8(bundle: Bundle) -> Bundle:
    """A new version of `bundle` with the int8 encoder and `gated_int8.onnx` (later add-tasks keep
    the int8 gated graph in step). Returns the bundle unchanged when it has them already.

    MoE bundles are refused (UsageError): their adapted encoder is not quantised.
    """
    if get_learner(bundle.method).learns_from_images:
        raise UsageError("--int8 is offered for RAIL bundles only: an MoE bundle's adapted image encoder "
                         "(graphs/moe_encoder.onnx) is not quantised.")
    if has_int8(bundle.meta.files):
        return bundle
    import onnxruntime

    from edgeclip.learned import read_learned

    with bundle.new_version() as writer:
        with writer.graph_folder() as graphs:  # the new graphs go to the bundle's shared graph store
            quantize_image_encoder(graphs)
            build_gated_int8(graphs, read_learned(bundle), writer.meta)
        writer.set_quantization(Quantization(QuantizedEncoder(
            method="dynamic", weights="int8", activations="uint8", op_types=list(QUANTIZED_OPS),
            onnxruntime=onnxruntime.__version__)))
    return writer.bundle
