"""Trace the frozen open_clip towers to ONNX (torch needed here only).

Each tower is wrapped in a thin module whose forward is exactly the computation the graph
must hold (the L2-normalised embedding), exported with the dynamo exporter (the TorchScript
exporter fails on open_clip ViTs: "aten::_native_multi_head_attention"), with an example
batch of 2 (an example of 1 specialises the batch dimension) and a dynamic batch dimension.
Weights go to one external-data file beside the graph, named by a plain file name (no folder,
no ``..``), so a gated graph composed later can point at the same file instead of copying the
backbone. A bundle keeps both in its shared graph store under content names
(``VersionWriter.write_graph``; docs/EXPORT.md, "Graph store"), where stock onnx reads them.

Export is refused (`ExportParityError`) when onnxruntime differs from torch beyond tolerance
on a random batch of another size than the example.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeclip.errors import EdgeclipError
from edgeclip.layout import (
    EMBEDDING,
    IMAGE_DATA,
    IMAGE_GRAPH,
    OPSET,
    PIXELS,
    TEXT_DATA,
    TEXT_EMBEDDING,
    TEXT_GRAPH,
    TOKENS,
)

log = logging.getLogger(__name__)

PARITY_ATOL = 1e-4  # max abs difference allowed between onnxruntime and torch (float32)
_EXAMPLE_BATCH = 2  # >1: the dynamo exporter specialises size-1 dimensions
_CHECK_BATCH = 3  # differs from the example, so the check also proves the batch is dynamic


class ExportParityError(EdgeclipError):
    """The exported graph does not compute what the torch module computes."""


def _torch() -> Any:
    from edgeclip.train.backbone import import_torch_stack

    torch, _ = import_torch_stack()
    return torch


def _image_tower(model: Any) -> Any:
    torch = _torch()

    class ImageTower(torch.nn.Module):
        """pixels [B,3,S,S] -> L2-normalised embedding [B,D]."""

        def __init__(self, clip: Any) -> None:
            super().__init__()
            self.clip = clip

        def forward(self, pixels: Any) -> Any:
            return self.clip.encode_image(pixels, normalize=True)

    return ImageTower(model).eval()


def _text_tower(model: Any) -> Any:
    torch = _torch()

    class TextTower(torch.nn.Module):
        """tokens [N,ctx] int64 -> L2-normalised text embedding [N,D]."""

        def __init__(self, clip: Any) -> None:
            super().__init__()
            self.clip = clip

        def forward(self, tokens: Any) -> Any:
            return self.clip.encode_text(tokens, normalize=True)

    return TextTower(model).eval()


@contextlib.contextmanager
def _quiet() -> Any:
    """The dynamo exporter prints progress lines on stdout; keep them out of the CLI's output."""
    with contextlib.redirect_stdout(io.StringIO()) as captured:
        yield
    for line in captured.getvalue().splitlines():
        log.debug("%s", line)


def _export(module: Any, example: Any, input_name: str, output_name: str, graph: Path, data_name: str) -> Path:
    import onnx

    torch = _torch()
    graph.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), _quiet():
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_shapes={input_name: {0: torch.export.Dim("batch")}},  # forward's argument is named so
            optimize=True,
            verbose=False,
        )
    proto = program.model_proto
    _check_standard_ops(proto, graph.name)
    data_path = graph.parent / data_name
    if data_path.exists():
        data_path.unlink()  # onnx appends to an existing data file
    onnx.save_model(
        proto, str(graph), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name,
        size_threshold=1024,  # small constants (shapes) stay inline: shape inference reads them
    )
    onnx.checker.check_model(str(graph))
    return graph


def _check_standard_ops(proto: Any, what: str) -> None:
    """Only default-domain ONNX ops, no local functions: what onnxruntime and TensorRT both run."""
    domains = {node.domain for node in proto.graph.node} - {"", "ai.onnx"}
    if domains or len(proto.functions):
        raise EdgeclipError(f"{what}: the exporter left non-standard ops (domains {sorted(domains)}, "
                            f"{len(proto.functions)} functions)")
    opset = {o.domain: o.version for o in proto.opset_import}.get("", None)
    if opset != OPSET:
        raise EdgeclipError(f"{what}: exported with opset {opset}, expected {OPSET}")


def check_parity(
    graph: Path, reference: Callable[[np.ndarray], np.ndarray], example: np.ndarray, atol: float = PARITY_ATOL
) -> float:
    """Run `graph` in onnxruntime (CPU) on `example` and compare with `reference`; returns the max
    absolute difference. Raises ExportParityError on a shape mismatch or a difference beyond `atol`."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: example})
    want = reference(example)
    if got.shape != want.shape:
        raise ExportParityError(f"{graph.name}: onnxruntime gives shape {got.shape}, torch {want.shape}")
    diff = float(np.max(np.abs(got - want))) if got.size else 0.0
    if not diff <= atol:
        raise ExportParityError(f"{graph.name}: onnxruntime differs from torch by {diff:.3g} (> {atol:g}); "
                                "the export is refused")
    log.info("%s: onnxruntime vs torch max abs diff %.3g", graph.name, diff)
    return diff


def _run_torch(module: Any, dtype: Any) -> Callable[[np.ndarray], np.ndarray]:
    torch = _torch()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(x)).to(dtype)).float().numpy()

    return run


@contextlib.contextmanager
def _explained(backbone: Any, tower: str) -> Any:
    """Any exporter failure becomes one line naming the model and the tower (never a traceback)."""
    try:
        yield
    except EdgeclipError:
        raise
    except Exception as exc:  # torch.export / onnx raise many kinds
        lines = str(exc).strip().splitlines()
        raise EdgeclipError(
            f"Cannot export the {tower} encoder of '{getattr(backbone, 'name', '?')}' to ONNX: {type(exc).__name__}: "
            f"{(lines[0] if lines else '')[:300]} (see docs/MODELS.md for the supported families)"
        ) from exc


def export_image_encoder(backbone: Any, out_dir: Path | str, seed: int = 0) -> Path:
    """Write `image_encoder.onnx` + `image_encoder.data` in `out_dir`; returns the graph's path.

    `backbone`: an `edgeclip.train.backbone.Backbone` (its `.model` and `.preprocess` are used).
    Raises `ExportParityError` when onnxruntime disagrees with torch, `EdgeclipError` when the
    exporter fails.
    """
    with _explained(backbone, "image"):
        return _export_image_encoder(backbone, out_dir, seed)


def _export_image_encoder(backbone: Any, out_dir: Path | str, seed: int) -> Path:
    torch = _torch()
    size = backbone.preprocess.image_size
    tower = _image_tower(backbone.model)
    example = torch.randn(_EXAMPLE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(seed))
    graph = _export(tower, example, PIXELS, EMBEDDING, Path(out_dir) / IMAGE_GRAPH, IMAGE_DATA)
    check = np.random.default_rng(seed).standard_normal((_CHECK_BATCH, 3, size, size)).astype(np.float32)
    check_parity(graph, _run_torch(tower, torch.float32), check)
    return graph


def export_text_encoder(backbone: Any, out_dir: Path | str, seed: int = 0) -> Path:
    """Write `text_encoder.onnx` + `text_encoder.data` in `out_dir`; returns the graph's path.

    The example and check tokens come from `backbone.tokenize`, the bundle's runtime tokenizer
    (so the graph is checked on the very ids the runtime feeds it: [N, context_length] int64).
    Raises `ExportParityError` or `EdgeclipError` as ``export_image_encoder``."""
    with _explained(backbone, "text"):
        return _export_text_encoder(backbone, out_dir)


def _export_text_encoder(backbone: Any, out_dir: Path | str) -> Path:
    torch = _torch()
    tower = _text_tower(backbone.model)
    prompts = ["a photo of a cat.", "a blurry photo of a large red bus."]
    example = backbone.tokenize(prompts).to(torch.int64)
    graph = _export(tower, example, TOKENS, TEXT_EMBEDDING, Path(out_dir) / TEXT_GRAPH, TEXT_DATA)
    check = backbone.tokenize(["a photo of a dog.", "Café naïve, A LONG LABEL " * 8, "x"]).to(torch.int64).numpy()
    check_parity(graph, _run_torch(tower, torch.int64), check)
    return graph
