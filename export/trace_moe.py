"""Trace the MoE-adapted image encoder (MoE-Adapters) to ONNX (torch needed here only).

The graph `moe_encoder.onnx` takes `pixels` [B,3,S,S] and `task_ids` [B] int64 and returns the
L2-normalised adapted embedding [B,D]: `MoECLIP.encode_image(pixels, task_ids, normalize=True)`.
Routing is per sample inside the graph (each sample's router rows are gathered by its task id, as
MoECLIP does), so one batch may mix tasks; task id -1 (`ZERO_SHOT`) gives plain CLIP.

Weights go to `moe_encoder.data`. When `out_dir` already holds the frozen `image_encoder.onnx` +
`.data` (a bundle version's graphs/), the tensors equal to frozen ones (by dtype, shape and bytes)
are referenced from `image_encoder.data` instead (`compose_moe.share_frozen_weights`), so a version
stores only the adapters; exported elsewhere the graph carries the whole backbone and runs on its
own. Either way `compose_moe.build_moe_gated_graph` reads the backbone from `image_encoder.data`.

Exported like the frozen towers (`trace.py`): dynamo exporter, opset 18, example batch 2 with a
dynamic batch dimension, default-domain ops only; refused (`ExportParityError`) when onnxruntime
differs from torch by more than `PARITY_ATOL` on a batch of another size mixing every task and -1.

Tracing costs far more than training a short task (the exporter, not the model), and the graph's
structure does not depend on the adapters' values nor on the number of tasks: routers are gathered
by task id. So the trace runs with every adapter tensor set to distinct random values (the exporter's
optimiser then neither merges equal tensors, e.g. the zero biases of two blocks, nor folds one into a
constant), and each adapter tensor stays an initialiser named after its parameter
(`moe.clip.<layer>.<name>`, `adapter_initializers`). A later task's graph is that graph with its
initialisers rewritten (`fill_moe_template`): a bundle version's `moe_encoder.onnx` is the template
of the next. Every graph, traced or filled, passes the same parity check against torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from edgeclip.errors import UsageError
from edgeclip.export.trace import (
    PARITY_ATOL,
    ExportParityError,
    _check_standard_ops,
    _quiet,
    _torch,
)
from edgeclip.layout import (
    ADAPTED,
    IMAGE_DATA,
    IMAGE_GRAPH,
    MOE_DATA,
    MOE_GRAPH,
    OPSET,
    PIXELS,
    TASK_IDS,
)

log = logging.getLogger(__name__)

_EXAMPLE_BATCH = 2
_CHECK_BATCH = 5  # mixes every task and zero-shot (-1) where the model has few tasks


def _moe_tower(moe_model: Any) -> Any:
    torch = _torch()

    class MoEImageTower(torch.nn.Module):
        """(pixels [B,3,S,S], task_ids [B] int64) -> L2-normalised adapted embedding [B,D]."""

        def __init__(self, moe: Any) -> None:
            super().__init__()
            self.moe = moe

        def forward(self, pixels: Any, task_ids: Any) -> Any:
            return self.moe.encode_image(pixels, task_ids, normalize=True)

    return MoEImageTower(moe_model).eval()


def _image_size(moe_model: Any) -> int:
    size = moe_model.clip.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


_TOWER_PREFIX = "moe.clip."  # the traced tower holds the MoECLIP as `moe`, which holds open_clip's model as `clip`
_TASK_AXIS = ("w_gate", "router_valid")  # [T, ...]: the only adapter tensors whose shape grows with the tasks
_GRAPH_KEYS = ("down_w", "down_b", "up_w", "up_b", "w_gate", "router_valid")  # what the image graph reads


def adapter_initializers(moe_model: Any) -> dict[str, np.ndarray]:
    """{graph initialiser name: value} of every adapter tensor the adapted image graph reads (experts,
    gate routers, router masks of the image layers; numpy, float32 / bool)."""
    out = {}
    for name, layer in moe_model.named_layers():
        if layer.encoder != "image":
            continue
        state = layer.state_dict()
        for key in _GRAPH_KEYS:
            out[f"{_TOWER_PREFIX}{name}.{key}"] = state[key].detach().cpu().numpy().copy()  # not a view
    return out


@contextlib.contextmanager
def _distinct_adapters(moe_model: Any) -> Iterator[dict[str, np.ndarray]]:
    """Inside the block every image adapter tensor holds distinct random values (router masks a
    distinct bit pattern per layer); yields them as `adapter_initializers` does. The real values
    are put back on leaving."""
    torch = _torch()
    saved = []
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        try:
            layers = [layer for _, layer in moe_model.named_layers() if layer.encoder == "image"]
            for number, layer in enumerate(layers, start=1):
                for key in _GRAPH_KEYS:
                    tensor = getattr(layer, key)
                    saved.append((tensor, tensor.detach().clone()))
                    if tensor.dtype == torch.bool:
                        bits = [(number >> (i % 62)) & 1 for i in range(tensor.shape[-1])]
                        tensor.copy_(torch.tensor(bits, dtype=torch.bool).expand_as(tensor))
                    else:
                        tensor.copy_(torch.rand(tensor.shape, generator=generator).to(tensor) + 1.0)
            yield adapter_initializers(moe_model)
        finally:
            for tensor, value in saved:
                tensor.copy_(value)


def _adopt_adapters(proto: onnx.ModelProto, distinct: Mapping[str, np.ndarray]) -> bool:
    """Find each adapter tensor among the traced graph's initialisers by its distinct value and give
    it its parameter's name (the exporter names buffers val_N); True when every one was found once."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in proto.graph.node
           for a in n.attribute):
        return False
    by_shape: dict[tuple[int, tuple[int, ...]], list[TensorProto]] = {}
    for init in proto.graph.initializer:
        by_shape.setdefault((init.data_type, tuple(init.dims)), []).append(init)
    dtype = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.bool_): TensorProto.BOOL}
    rename: dict[str, str] = {}
    for name, value in distinct.items():
        found = [i for i in by_shape.get((dtype.get(value.dtype, -1), value.shape), [])
                 if np.array_equal(numpy_helper.to_array(i), value)]
        if len(found) != 1 or found[0].name in rename:
            return False
        rename[found[0].name] = name
    taken = {i.name for i in proto.graph.initializer} | {v.name for v in proto.graph.input}
    taken |= {o for n in proto.graph.node for o in n.output}
    if any(new in taken and new != old for old, new in rename.items()):
        return False
    for init in proto.graph.initializer:
        init.name = rename.get(init.name, init.name)
    for node in proto.graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
    return True


def _set_raw(init: TensorProto, value: np.ndarray) -> None:
    """Rewrite an in-memory initialiser with ``value`` (same dtype; dims may change)."""
    fresh = numpy_helper.from_array(np.ascontiguousarray(value), init.name)
    init.CopyFrom(fresh)


def _template_mismatch(proto: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> str | None:
    """Why the adapter values cannot be written into ``proto`` (None when they can): an adapter
    tensor that is not one initialiser of its own, or a shape that changed beyond the task axis."""
    inits = {i.name: i for i in proto.graph.initializer}
    dtype = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.bool_): TensorProto.BOOL}
    for name, value in values.items():
        init = inits.get(name)
        if init is None:
            return f"{name} is not an initialiser of its own"
        if dtype.get(value.dtype) != init.data_type:
            return f"{name} has another dtype"
        old, new = tuple(init.dims), value.shape
        task_axis = name.rsplit(".", 1)[-1] in _TASK_AXIS
        if len(old) != len(new) or (old[1:] if task_axis else old) != (new[1:] if task_axis else new):
            return f"{name} changed shape {old} -> {new}"
    return None


def _trace(tower: Any, pixels: Any, tasks: Any) -> onnx.ModelProto:
    torch = _torch()
    batch = torch.export.Dim("batch")
    with torch.no_grad(), _quiet(), warnings.catch_warnings():
        # pixels and task_ids share one batch Dim; the exporter warns that it keeps one name for it
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
        program = torch.onnx.export(
            tower, (pixels, tasks), dynamo=True, opset_version=OPSET,
            input_names=[PIXELS, TASK_IDS], output_names=[ADAPTED],
            dynamic_shapes={"pixels": {0: batch}, "task_ids": {0: batch}},  # forward's argument names
            optimize=True, verbose=False,
        )
    return program.model_proto


def export_moe_encoder(moe_model: Any, out_dir: Path | str, seed: int = 0) -> Path:
    """Write `moe_encoder.onnx` + `moe_encoder.data` in `out_dir`; returns the graph's path.

    `moe_model`: an `edgeclip.train.moe.MoECLIP` with at least one task (it is put in eval mode:
    no routing noise, no dropout). The export is checked against torch (`ExportParityError`).
    Existing files are replaced (unlinked first), never written through. Raises UsageError when the
    model has no image adapters or no task yet.
    """
    torch = _torch()
    if "image" not in moe_model.config.encoders:
        raise UsageError("this MoE model has no image-encoder adapters: the plain image encoder serves it")
    if moe_model.n_tasks < 1:
        raise UsageError("the MoE model has no task yet: nothing to export beyond the plain image encoder")
    moe_model.eval()
    tower = _moe_tower(moe_model)
    size = _image_size(moe_model)
    n_tasks = moe_model.n_tasks
    device = next(moe_model.parameters()).device
    pixels = torch.randn(_EXAMPLE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(device)
    tasks = torch.tensor([n_tasks - 1, 0], dtype=torch.int64, device=device)
    graph = Path(out_dir) / MOE_GRAPH
    graph.parent.mkdir(parents=True, exist_ok=True)
    values = adapter_initializers(moe_model)
    with _distinct_adapters(moe_model) as distinct:
        proto = _trace(tower, pixels, tasks)
    if _adopt_adapters(proto, distinct) and _template_mismatch(proto, values) is None:
        for init in proto.graph.initializer:
            if init.name in values:
                _set_raw(init, values[init.name])
    else:  # pragma: no cover - an exporter that still merged or folded an adapter tensor: trace the real values
        proto = _trace(tower, pixels, tasks)
    _check_standard_ops(proto, graph.name)
    for old in (graph, graph.parent / MOE_DATA):
        old.unlink(missing_ok=True)  # onnx appends to a data file; an old one may be a link into the graph store
    onnx.save_model(proto, str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=MOE_DATA, size_threshold=1024)
    onnx.checker.check_model(str(graph))
    if (graph.parent / IMAGE_GRAPH).is_file() and (graph.parent / IMAGE_DATA).is_file():
        from edgeclip.export.compose_moe import share_frozen_weights

        share_frozen_weights(graph.parent)
    check_moe_parity(graph, moe_model, seed)
    return graph


def check_moe_parity(graph: Path, moe_model: Any, seed: int = 0, atol: float = PARITY_ATOL) -> float:
    """onnxruntime (CPU) vs torch on a random batch whose task ids cycle through -1, 0, .., T-1;
    returns the max absolute difference. Raises ExportParityError beyond `atol`."""
    import onnxruntime as ort

    torch = _torch()
    size = _image_size(moe_model)
    pixels = np.random.default_rng(seed + 1).standard_normal((_CHECK_BATCH, 3, size, size)).astype(np.float32)
    tasks = (np.arange(_CHECK_BATCH) % (moe_model.n_tasks + 1) - 1).astype(np.int64)
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {PIXELS: pixels, TASK_IDS: tasks})
    with torch.inference_mode():
        device = next(moe_model.parameters()).device
        want = moe_model.encode_image(torch.from_numpy(pixels).to(device), torch.from_numpy(tasks).to(device),
                                      normalize=True).float().cpu().numpy()
    diff = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("inf")
    if not diff <= atol:
        raise ExportParityError(f"{graph.name}: onnxruntime differs from torch by {diff:.3g} (> {atol:g}) "
                                f"(shapes {got.shape} vs {want.shape}); the export is refused")
    return diff


def _external(init: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in init.external_data}


def fill_moe_template(template_dir: Path | str, moe_model: Any, out_dir: Path | str, seed: int = 0) -> Path | None:
    """Write `moe_encoder.onnx` + `moe_encoder.data` for ``moe_model`` into `out_dir` from the graph
    in `template_dir` (a version's graphs: `moe_encoder.onnx`, its `moe_encoder.data`, and the
    `image_encoder.data` its frozen tensors are read from): the same nodes, the adapter initialisers
    rewritten with the model's values (`adapter_initializers`; the routers may have more tasks),
    every other tensor kept where it is (frozen ones in `image_encoder.data`; the rest copied).

    Returns the graph's path, or None when the template cannot take these values (an adapter tensor
    merged or folded by an older export, a pool that grew): then trace (`export_moe_encoder`).
    The graph is checked against torch like a traced one (`ExportParityError`); for the check,
    `out_dir` gets `image_encoder.data` as a hard link (or copy) of the template folder's file.
    Files in `out_dir` are replaced, never written through.
    """
    template_dir, out_dir = Path(template_dir), Path(out_dir)
    proto = onnx.load(str(template_dir / MOE_GRAPH), load_external_data=False)
    if [i.name for i in proto.graph.input] != [PIXELS, TASK_IDS] or [o.name for o in proto.graph.output] != [ADAPTED]:
        return None
    values = adapter_initializers(moe_model)
    if _template_mismatch(proto, values) is not None:
        return None
    if any(init.data_location == TensorProto.EXTERNAL and _external(init).get("location") not in (MOE_DATA, IMAGE_DATA)
           for init in proto.graph.initializer):
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    graph, data = out_dir / MOE_GRAPH, out_dir / MOE_DATA
    data_tmp = out_dir / f".{MOE_DATA}.tmp"
    with open(data_tmp, "wb") as out, open(template_dir / MOE_DATA, "rb") as old:
        for init in proto.graph.initializer:
            if init.name in values:
                payload = np.ascontiguousarray(values[init.name]).tobytes()
                dims = values[init.name].shape
            elif init.data_location == TensorProto.EXTERNAL and _external(init)["location"] == MOE_DATA:
                info = _external(init)
                old.seek(int(info.get("offset", 0)))
                payload, dims = old.read(int(info["length"])), tuple(init.dims)
            else:
                continue  # embedded, or a frozen tensor read from image_encoder.data: unchanged
            offset = out.tell()
            out.write(payload)
            fresh = TensorProto(name=init.name, data_type=init.data_type, dims=[int(d) for d in dims],
                                data_location=TensorProto.EXTERNAL)
            for key, value in (("location", MOE_DATA), ("offset", str(offset)), ("length", str(len(payload)))):
                fresh.external_data.add(key=key, value=value)
            init.CopyFrom(fresh)
    graph_tmp = out_dir / f".{MOE_GRAPH}.tmp"
    onnx.save_model(proto, str(graph_tmp))
    data_tmp.replace(data)
    graph_tmp.replace(graph)
    frozen = out_dir / IMAGE_DATA
    if template_dir.resolve() != out_dir.resolve() or frozen.is_symlink():
        _link_or_copy((template_dir / IMAGE_DATA).resolve(), frozen)
    try:
        check_moe_parity(graph, moe_model, seed)
    except Exception as exc:  # noqa: BLE001 - the template did not fit (parity, or onnxruntime refused it): trace
        log.warning("the adapted encoder's stored graph does not fit the new adapters (%s); tracing it anew",
                    _first_line(exc))
        return None
    return graph


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` becomes a regular file with ``source``'s bytes (onnxruntime refuses symlinked data)."""
    import shutil

    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    tmp.replace(target)
