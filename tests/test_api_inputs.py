"""The API's edges: in-memory inputs without pixels or of the wrong type, labels given as one string,
names that add-task would refuse, and a domain of identical images (issue 20 item 11)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edgeclip
from edgeclip.errors import DomainError, UsageError


@pytest.fixture(scope="module")
def clf(make_tiny_bundle, tmp_path_factory: pytest.TempPathFactory) -> edgeclip.Classifier:
    return edgeclip.load(make_tiny_bundle(tmp_path_factory.mktemp("api-inputs") / "bundle", hidden=64))


def unit_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_images_without_pixels_are_error_rows_and_wrong_types_usage_errors(clf) -> None:
    good = Image.new("RGB", (16, 16), (10, 200, 30))
    preds = clf.classify([good, Image.new("RGB", (0, 0)), np.zeros((0, 5, 3), np.uint8), good], labels=["a", "b"])
    assert [p.error is None for p in preds] == [True, False, False, True]
    assert preds[1].error == "the image has no pixels (0x0)" and preds[2].error == "the image has no pixels (5x0)"
    assert preds[1].path == "<image 1>" and preds[1].label is None
    for bad in ([good, None], None, 42, [3.5]):
        with pytest.raises(UsageError, match="got (NoneType|int|float)"):
            clf.classify(bad, labels=["a", "b"])


def test_labels_as_one_comma_separated_string(clf) -> None:
    """labels="cat,dog" is two labels (as the CLI's --labels), not seven one-character ones."""
    assert clf.label_space("cat, dog").names == clf.label_space(["cat", "dog"]).names == ["cat", "dog"]
    pred = clf.classify(Image.new("RGB", (16, 16)), labels="cat,dog", top_k=10)[0]
    assert sorted(t["label"] for t in pred.topk) == ["cat", "dog"]
    with pytest.raises(UsageError, match="empty"):
        clf.label_space(" , ")
    with pytest.raises(UsageError, match="must be strings"):
        clf.label_space(["cat", 3])


def test_add_task_embeddings_refuses_what_add_task_refuses(clf) -> None:
    dim = clf.embed_texts(["x"]).shape[1]
    feats, labels = unit_rows(12, dim), np.arange(12) % 2
    before = clf.bundle.version
    with pytest.raises(DomainError, match="'u/1' must not hold '/'"):
        clf.add_task_embeddings("t", feats, labels, ["u/1", "b"])
    with pytest.raises(DomainError, match="task name 'a/b' must not hold '/'"):
        clf.add_task_embeddings("a/b", feats, labels, ["a", "b"])
    with pytest.raises(DomainError, match="containing \\{\\}"):
        clf.add_task_embeddings("t", feats, labels, ["a", "b"], templates=["no placeholder"])
    with pytest.raises(UsageError, match="list of class names"):
        clf.add_task_embeddings("t", feats, labels, "ab")
    assert edgeclip.load(clf.root).version == before


def test_a_domain_of_identical_images_is_learned_and_classified(clf, tmp_path: Path) -> None:
    """All embeddings identical: the gate's threshold stays positive, so the new version opens and classifies."""
    image = Image.new("RGB", (16, 16), (120, 40, 200))
    emb = clf.embed_images([image])
    learned = clf.add_task_embeddings("same", np.repeat(emb, 12, axis=0), np.arange(12) % 2, ["one", "two"])
    assert learned.tasks[-1].threshold > 0
    pred = learned.classify(image)[0]
    assert pred.error is None and pred.route == "same"
    learned.rollback()
