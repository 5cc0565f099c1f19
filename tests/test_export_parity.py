"""End to end on real images: the ONNX gated graph (onnxruntime CPU) against PyTorch + the numpy
reference, for RAIL primal and dual with both fusion rules.

Task 0 = MNIST digits, task 1 = Fashion-MNIST clothes, unseen = CIFAR-10 photos, embedded by the
tiny random-weight backbone in torch; same route and top-1 for every image, scores within 1e-4.
"""

from __future__ import annotations

import export_helpers as eh
import numpy as np
import onnxruntime as ort
import pytest

from edgeclip.export.compose import build_gated_graph
from edgeclip.train.decision import gated_reference

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

UNSEEN = "cifar10"


def _pixels(root, split):
    from edgeclip.images import load_and_preprocess

    cfg = eh.tiny_backbone().preprocess
    classes = sorted(p.name for p in (root / split).iterdir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / split / c).iterdir())]
    return np.stack([load_and_preprocess(f, cfg) for f, _ in files]), np.array([i for _, i in files]), classes


@pytest.fixture(scope="module")
def real(extract_subset):
    mnist = extract_subset("mnist", "train", classes=["0", "1", "2"], per_class=8)
    fashion = extract_subset("fashion_mnist", "train", classes=["trouser", "bag"], per_class=8)
    tests = [extract_subset(n, "test", classes=c, per_class=3) for n, c in
             (("mnist", ["0", "1", "2"]), ("fashion_mnist", ["trouser", "bag"]))]
    unseen = extract_subset(UNSEEN, "test", classes=["airplane", "frog"], per_class=3)
    return [mnist, fashion], tests, unseen


@pytest.mark.parametrize("method,fusion", [("rail-primal", "ddas"), ("rail-primal", "paper"),
                                           ("rail-dual", "ddas"), ("rail-dual", "paper")])
def test_gated_graph_on_real_images(real, tmp_path_factory, tmp_path, method, fusion):
    bb = eh.tiny_backbone()
    train_roots, test_roots, unseen_root = real
    xs, ys, classes, offset = [], [], [], 0
    for root in train_roots:
        pixels, labels, names = _pixels(root, "train")
        xs.append(bb.encode_images(pixels))
        ys.append(labels + offset)
        classes.append(names)
        offset += len(names)
    extra = ["airplane", "frog", "ship"]
    text = bb.class_text_embeddings([c for t in classes for c in t] + extra, ["a photo of a {}."])
    learned, manifest = eh.fit_rail_bundle(xs, ys, text[:offset], method, fusion, classes=classes,
                                           kernel_gamma=300.0)
    graphs = eh.tiny_graphs(tmp_path_factory.getbasetemp())
    path = build_gated_graph(eh.encoder_folder(graphs, tmp_path / "g"), learned, manifest)
    pixels = np.concatenate([_pixels(r, "test")[0] for r in [*test_roots, unseen_root]])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"pixels": pixels, "label_text": text})))
    want = gated_reference(bb.encode_images(pixels), text, learned, manifest)  # torch embeddings
    np.testing.assert_array_equal(got["route"], want["route"])
    np.testing.assert_array_equal(got["scores"].argmax(1), want["scores"].argmax(1))
    assert np.abs(got["scores"] - want["scores"]).max() < 1e-4
