"""API papercuts a new user met: one path is one image, folders are taken as classify takes them, grey arrays
like grey PIL images, errors of add_task(pairs) name no temporary folder, create() errors name its arguments."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edgeclip
from edgeclip.errors import EdgeclipError


@pytest.fixture(scope="module")
def clf(make_tiny_bundle, tmp_path_factory: pytest.TempPathFactory):
    return edgeclip.load(make_tiny_bundle(tmp_path_factory.mktemp("papercuts") / "bundle"))


def test_one_path_folders_and_grey_arrays(clf, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), np.uint8)).save(folder / f"{i}.png")
    one = clf.embed_images(str(folder / "0.png"))  # a string is one file, not its letters
    assert one.shape == (1, clf.embed_images([folder / "0.png"]).shape[1])
    assert np.array_equal(clf.embed_images(folder / "0.png"), one)
    all_three = clf.embed_images([folder])  # a folder: its images, as classify takes them
    assert all_three.shape[0] == 3 and np.array_equal(all_three[:1], one)
    grey = rng.integers(0, 255, (30, 20), np.uint8)
    from_array = clf.embed_images(grey)
    from_pil = clf.embed_images(Image.fromarray(grey, "L"))
    assert from_array.shape == (1, one.shape[1]) and np.allclose(from_array, from_pil, atol=1e-6)
    assert clf.classify(grey, labels=["cat", "dog"], top_k=1)[0].label in ("cat", "dog")


def test_errors_of_pairs_and_create_speak_the_api(clf, tmp_path: Path) -> None:
    pairs = [(np.zeros((8, 8, 3), np.uint8), "cat")]  # one class, one image: not a task
    with pytest.raises(EdgeclipError) as err:
        clf.add_task("pets", pairs)
    assert "edgeclip-task-" not in str(err.value) and "/tmp" not in str(err.value), err.value
    with pytest.raises(EdgeclipError) as err:
        edgeclip.create(tmp_path / "new", "edgeclip-tiny")  # neither weights nor random_weights
    assert "--" not in str(err.value) and "pretrained=" in str(err.value) and "random_weights=True" in str(err.value)
