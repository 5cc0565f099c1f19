"""Tracing the towers to ONNX (export/trace.py): files, opset, dynamic batch, parity with torch."""

from __future__ import annotations

from pathlib import Path

import export_helpers as eh
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgeclip.export.compose import check_structure
from edgeclip.export.trace import PARITY_ATOL, ExportParityError, check_parity

pytestmark = pytest.mark.slow


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("stem,inp,out", [("image_encoder", "pixels", "embedding"),
                                          ("text_encoder", "tokens", "text_embedding")])
def test_graph_files_and_signature(graphs, stem, inp, out):
    model = onnx.load(str(graphs / f"{stem}.onnx"), load_external_data=False)
    check_structure(model)  # onnx.checker; by path it refuses the hard links other tests make
    assert {o.domain: o.version for o in model.opset_import}[""] == 18
    assert {n.domain for n in model.graph.node} <= {""} and not model.functions
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {f"{stem}.data"}
    assert [i.name for i in model.graph.input] == [inp] and [o.name for o in model.graph.output] == [out]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert (graphs / f"{stem}.onnx").stat().st_size < (graphs / f"{stem}.data").stat().st_size


@pytest.mark.parametrize("batch", [1, 5])
def test_image_encoder_parity(graphs, batch):
    bb = eh.tiny_backbone()
    pixels = np.random.default_rng(batch).standard_normal((batch, 3, 64, 64)).astype(np.float32)
    got = _session(graphs / "image_encoder.onnx").run(None, {"pixels": pixels})[0]
    want = bb.encode_images(pixels)
    assert got.shape == (batch, bb.embed_dim)
    assert np.abs(got - want).max() < PARITY_ATOL
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_text_encoder_parity(graphs):
    bb = eh.tiny_backbone()
    texts = ["a photo of a cat.", "an origami crane", "a" * 500, ""]  # incl. truncation and empty
    tokens = bb.tokenize(texts).numpy().astype(np.int64)
    got = _session(graphs / "text_encoder.onnx").run(None, {"tokens": tokens})[0]
    assert np.abs(got - bb.encode_texts(texts)).max() < PARITY_ATOL


def test_parity_check_refuses_a_wrong_graph(graphs):
    example = np.zeros((2, 3, 64, 64), np.float32)
    with pytest.raises(ExportParityError, match="refused"):
        check_parity(graphs / "image_encoder.onnx", lambda x: np.zeros((2, 64), np.float32), example)


@pytest.mark.realdata
def test_image_encoder_parity_on_real_images(graphs, extract_subset):
    from edgeclip.images import load_and_preprocess

    bb = eh.tiny_backbone()
    cfg = bb.preprocess
    files = []
    for name in ("caltech101", "cifar10", "mnist"):
        root = extract_subset(name, "test", per_class=1)
        files += sorted(p for p in (root / "test").rglob("*") if p.is_file())[:4]
    pixels = np.stack([load_and_preprocess(f, cfg) for f in files])
    got = _session(graphs / "image_encoder.onnx").run(None, {"pixels": pixels})[0]
    assert np.abs(got - bb.encode_images(pixels)).max() < PARITY_ATOL
