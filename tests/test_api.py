"""The public Python API (edgeclip.load / create / Classifier), tested like the CLI: the README's example runs
as written on the demo bundle, and every input kind gives the same prediction as the CLI path."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edgeclip
from edgeclip.errors import DomainError, UsageError

REPO = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no python example"
    return blocks[0]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where `edgeclip demo` ran (it writes ./demo/bundle and ./demo/images)."""
    cwd = tmp_path_factory.mktemp("demo-cwd")
    cli = Path(sys.executable).with_name("edgeclip")
    result = subprocess.run([str(cli), "demo", "--quiet"], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    return cwd


@pytest.mark.slow
def test_readme_example_runs_as_written(demo_dir: Path) -> None:
    example = readme_example()
    assert len([ln for ln in example.splitlines() if ln.strip()]) <= 6
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", example], cwd=demo_dir, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    *rows, last = result.stdout.strip().splitlines()
    assert len(rows) >= 3 and all(len(row.split()) >= 5 for row in rows)  # path label score route error
    assert "(1, " in last and "[" in last  # the tasks' names and one text embedding


@pytest.mark.slow
def test_inputs_paths_pil_and_arrays_agree_and_learning_returns_new_versions(demo_dir: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "bundle"
    shutil.copytree(demo_dir / "demo" / "bundle", root, symlinks=True)
    clf = edgeclip.load(root)
    files = sorted((demo_dir / "demo" / "images" / "query").glob("*.png"))[:3]
    by_path = clf.classify(files, top_k=2)
    by_pil = clf.classify([Image.open(f).convert("RGB") for f in files], top_k=2)
    by_array = clf.classify([np.asarray(Image.open(f).convert("RGB")) for f in files], top_k=2)
    assert [p.label for p in by_path] == [p.label for p in by_pil] == [p.label for p in by_array]
    np.testing.assert_allclose([p.score for p in by_path], [p.score for p in by_array], atol=1e-5)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    mixed = clf.classify([files[0], broken], top_k=1)
    assert mixed[0].error is None and mixed[1].error and mixed[1].label is None
    with pytest.raises(UsageError, match="uint8"):
        clf.classify([np.zeros((4, 4), np.float32)])

    emb = clf.embed_images(files)
    assert emb.shape == (3, int(clf.bundle.manifest["backbone"]["embed_dim"])) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert clf.embed_texts(["a", "b"]).shape == (2, emb.shape[1])

    before = clf.version
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((12, emb.shape[1])).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    learned = clf.add_task_embeddings("given", feats, np.repeat([0, 1, 2], 4), ["ant", "bee", "cow"])
    assert learned.version != before and learned.tasks[-1].name == "given"
    assert learned.tasks[-1].classes == ["ant", "bee", "cow"]
    with pytest.raises(DomainError, match="already learned"):
        learned.add_task_embeddings("given", feats, np.repeat([0, 1, 2], 4), ["ant", "bee", "cow"])
    assert learned.rollback().version == before


def test_facade_is_lazy_and_refuses_unknown_names() -> None:
    code = ("import sys, edgeclip; assert 'edgeclip.edgeapp.api' not in sys.modules; "
            "assert callable(edgeclip.load) and 'torch' not in sys.modules; print(edgeclip.__version__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with pytest.raises(AttributeError):
        edgeclip.no_such_name  # noqa: B018


def test_the_manifest_schema_knows_exactly_the_registered_learners() -> None:
    from edgeclip.manifest import METHODS, method_of
    from edgeclip.train.registry import METHOD_NAMES, all_learners

    assert set(METHODS) == set(METHOD_NAMES) == set(all_learners())
    for name, learner in all_learners().items():  # each learner's settings are its manifest section's
        assert type(method_of(name).settings) is learner.settings_type and learner.name == name
