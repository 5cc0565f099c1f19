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
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

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


def export_moe_encoder(moe_model: Any, out_dir: Path | str, seed: int = 0) -> Path:
    """Write `moe_encoder.onnx` + `moe_encoder.data` in `out_dir`; returns the graph's path.

    `moe_model`: an `edgeclip.train.moe.MoECLIP` with at least one task (it is put in eval mode:
    no routing noise, no dropout). The export is checked against torch (`ExportParityError`).
    Existing files are replaced (unlinked first), never written through. Raises UsageError when the
    model has no image adapters or no task yet.
    """
    import onnx

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
    proto = program.model_proto
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
