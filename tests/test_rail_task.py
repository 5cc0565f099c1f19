"""RAIL add-task folds in only the new task's images (issue 23): the solver state P lives in the
bundle's cache, one entry; without it (deleted, after a rollback) every learned image is folded
again, and the head is the joint ridge solution either way."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import edgeclip
from edgeclip.bundle import Bundle
from edgeclip.edgeapp.tasks import rail_learning_state
from edgeclip.layout import LEARNED, RAIL_PROJECTION, RAIL_SOLVER_CACHE, rail_key, rail_task_state
from edgeclip.learned import read_learned


def _task(rng: np.random.Generator, dim: int, n: int = 24) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), np.arange(n) % 3


def _joint_w(root: Path) -> tuple[np.ndarray, np.ndarray]:
    bundle = Bundle.open(root)
    learned, state = read_learned(bundle), rail_learning_state(bundle)
    w_r = learned[rail_key("w_r")].astype(np.float64)
    phi = np.maximum(state["x"].astype(np.float64) @ w_r, 0.0)
    y = np.eye(len(bundle.learned_classes))[state["labels"]]
    gamma = float(bundle.manifest["method"]["settings"]["learner"]["gamma"])
    joint = np.linalg.solve(phi.T @ phi + gamma * np.eye(phi.shape[1]), phi.T @ y)
    return learned[rail_key("w")], joint


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_add_task_folds_only_the_new_images(tmp_path: Path, make_tiny_bundle, monkeypatch) -> None:
    root = make_tiny_bundle(tmp_path / "b", hidden=256)
    clf = edgeclip.load(root)
    dim = int(clf.bundle.manifest["backbone"]["embed_dim"])
    rng = np.random.default_rng(0)
    said: list[str] = []
    from edgeclip.edgeapp import tasks

    real = tasks._learn_head

    def spy(bundle, learner, cache, feats, labels, n_classes, progress):
        real(bundle, learner, cache, feats, labels, n_classes, lambda stage, done, total: said.append(stage))

    cache = root / RAIL_SOLVER_CACHE
    monkeypatch.setattr(tasks, "_learn_head", spy)
    for i in range(3):
        clf = clf.add_task_embeddings(f"t{i}", *_task(rng, dim), [f"a{i}", f"b{i}", f"c{i}"])
        w, joint = _joint_w(root)
        assert _rel(w, joint) < 1e-5
        files = clf.bundle.manifest["files"]  # a version adds what it learned; W_r lives in its own file, once
        assert rail_task_state(i) in files and rail_key("w_r") not in clf.bundle.tensors(LEARNED)
        assert (clf.root / "versions" / clf.version / RAIL_PROJECTION).stat().st_nlink == i + 2
        # one entry, no work file left: the base is written when the factors pass factor_limit(256) = 32
        # columns (task 1: 24 + 24), else the task adds one factor of its own (tasks 0 and 2)
        names = sorted(p.name.split("-")[0] if "-" in p.name else p.name.split(".", 1)[1] for p in cache.iterdir())
        assert names == [["factor", "json", "w64.npy"], ["base", "json", "w64.npy"],
                         ["base", "factor", "json", "w64.npy"]][i]
        if i == 1:
            base = next(cache.glob("base-*.p64"))
            base_stat = base.stat()
    kept = next(cache.glob("base-*.p64"))  # task 2 wrote no base: the same file, untouched
    assert kept == base and kept.stat().st_mtime_ns == base_stat.st_mtime_ns and kept.stat().st_ino == base_stat.st_ino
    assert "folding 24 new images" in said[-1] and "all" not in said[-1]

    before = clf.version
    clf = clf.rollback()  # the cache holds the state of the newer version: all images are folded again
    said.clear()
    clf = clf.add_task_embeddings("t3", *_task(rng, dim), ["a3", "b3", "c3"])
    assert "folding all 72 images (48 learned before)" in said[-1] and clf.version != before
    w, joint = _joint_w(root)
    assert _rel(w, joint) < 1e-5


def test_a_tampered_solver_cache_is_refolded_not_trusted(tmp_path: Path, make_tiny_bundle, monkeypatch) -> None:
    """The cache may come with a bundle from a stranger: an entry naming a file outside the folder, a
    factor of the wrong shape or a garbled entry is dropped, every learned image is folded again, and
    the head is still the joint solution."""
    import json

    from edgeclip.edgeapp import tasks

    root = make_tiny_bundle(tmp_path / "b", hidden=256)
    cache = root / RAIL_SOLVER_CACHE
    rng = np.random.default_rng(1)
    said: list[str] = []
    real = tasks._learn_head
    monkeypatch.setattr(tasks, "_learn_head", lambda b, le, c, f, la, n, p: real(
        b, le, c, f, la, n, lambda stage, done, total: said.append(stage)))
    clf = edgeclip.load(root)
    dim = int(clf.bundle.meta.backbone.embed_dim)
    clf = clf.add_task_embeddings("t0", *_task(rng, dim), ["a0", "b0", "c0"])
    outside = root / "outside.npy"
    np.save(outside, np.zeros((256, 4)))

    def escape(entry: Path) -> None:
        data = json.loads(entry.read_text())
        entry.write_text(json.dumps({**data, "factors": ["../../outside.npy"]}))

    def wrong_shape(entry: Path) -> None:
        np.save(cache / json.loads(entry.read_text())["factors"][0], np.ones((255, 24)))

    def truncated_base(entry: Path) -> None:
        base = cache / json.loads(entry.read_text())["base"]
        with open(base, "r+b") as handle:
            handle.truncate(base.stat().st_size - 8)

    def garbled(entry: Path) -> None:
        entry.write_bytes(b"\xff{not json")

    def zeroed_base(entry: Path) -> None:  # bit rot: same size, same name
        base = cache / json.loads(entry.read_text())["base"]
        base.write_bytes(bytes(base.stat().st_size))

    def no_base(entry: Path) -> None:  # an edited entry: the base dropped, or the factors
        entry.write_text(json.dumps({**json.loads(entry.read_text()), "base": None, "base_sha256": None}))

    def linked_base(entry: Path) -> None:  # a link to a file elsewhere with the same bytes
        base = cache / json.loads(entry.read_text())["base"]
        copy = root / "elsewhere.p64"
        copy.write_bytes(base.read_bytes())
        base.unlink()
        base.symlink_to(copy)

    for i, tamper in enumerate((wrong_shape, escape, truncated_base, garbled, zeroed_base, no_base, linked_base),
                               start=1):
        tamper(next(cache.glob("*.json")))
        said.clear()
        clf = clf.add_task_embeddings(f"t{i}", *_task(rng, dim), [f"a{i}", f"b{i}", f"c{i}"])
        assert f"folding all {24 * (i + 1)} images" in said[-1]
        w, joint = _joint_w(root)
        assert _rel(w, joint) < 1e-5
        assert len(list(cache.glob("*.json"))) == 1
    assert outside.is_file()


def test_info_shows_and_prune_frees_the_solver_cache(tmp_path: Path, make_tiny_bundle) -> None:
    """`info` says how much the derived solver cache takes; `prune --solver-cache` frees it (a dry run
    changes nothing); the next add-task folds every learned image again and is still exact."""
    from cli_helpers import invoke

    root = make_tiny_bundle(tmp_path / "b", hidden=256)
    rng = np.random.default_rng(2)
    clf = edgeclip.load(root)
    dim = int(clf.bundle.meta.backbone.embed_dim)
    for i in range(2):
        clf = clf.add_task_embeddings(f"t{i}", *_task(rng, dim), [f"a{i}", f"b{i}", f"c{i}"])
    cache = root / RAIL_SOLVER_CACHE
    info = invoke("info", "--bundle", str(root))
    assert info.exit_code == 0 and "solver cache:" in info.output and "prune --solver-cache" in info.output
    before = sorted(p.name for p in cache.iterdir())
    dry = invoke("prune", "--bundle", str(root), "--solver-cache", "--dry-run")
    assert dry.exit_code == 0 and "would delete the solver cache" in dry.output
    assert sorted(p.name for p in cache.iterdir()) == before
    done = invoke("prune", "--bundle", str(root), "--solver-cache")
    assert done.exit_code == 0 and "solver cache deleted" in done.output, done.output
    import pytest

    from edgeclip.errors import UsageError

    with pytest.raises(UsageError, match="does not exist"):  # exit 2, as every bundle command
        invoke("prune", "--bundle", str(tmp_path / "nothing-here"))
    assert not any(cache.iterdir()) and "solver cache:" not in invoke("info", "--bundle", str(root)).output
    clf = edgeclip.load(root).add_task_embeddings("t2", *_task(rng, dim), ["a2", "b2", "c2"])
    w, joint = _joint_w(root)
    assert _rel(w, joint) < 1e-5 and len(list(cache.glob("*.json"))) == 1


def test_add_task_embeds_in_small_batches_on_a_cpu(tmp_path: Path, make_tiny_bundle) -> None:
    """On a CPU the encoder runs `CPU_ENCODER_BATCH` images at a time (onnxruntime's arena keeps the
    largest run's activations: ViT-B-16 2.0 GB at 32, 0.8 GB at 8, as fast); the embeddings do not
    depend on the batch size."""
    from PIL import Image

    from edgeclip.edgeapp.runtime import CPU_ENCODER_BATCH, ImageEncoderRunner
    from edgeclip.edgeapp.tasks import embed_domain, load_domain

    root = make_tiny_bundle(tmp_path / "b", hidden=64)
    rng = np.random.default_rng(3)
    for c in ("a", "b"):
        (tmp_path / "d" / "train" / c).mkdir(parents=True)
        for i in range(11):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "d" / "train" / c / f"{i}.png")
    bundle = Bundle.open(root)
    runner = ImageEncoderRunner(bundle, "ort-cpu", preload=False)
    assert runner.session.device == "cpu" and runner.batch_size == CPU_ENCODER_BATCH == 8
    domain = load_domain(tmp_path / "d", None, 0)
    said: list[int] = []
    small, labels, _ = embed_domain(bundle, domain, "ort-cpu", progress=lambda s, done, total: said.append(done))
    assert said[:3] == [8, 16, 22]
    large, labels_large, _ = embed_domain(bundle, domain, "ort-cpu", batch_size=22)
    np.testing.assert_allclose(small, large, atol=1e-5)
    assert (labels == labels_large).all() and small.shape == (22, int(bundle.meta.backbone.embed_dim))


def test_a_file_where_the_solver_cache_belongs_is_replaced(tmp_path: Path, make_tiny_bundle) -> None:
    """`BUNDLE/cache/rail` is edgeclip's: a file there does not stop add-task (it is replaced), and
    `prune --solver-cache` removes it."""
    from cli_helpers import invoke

    root = make_tiny_bundle(tmp_path / "b", hidden=256)
    cache = root / RAIL_SOLVER_CACHE
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("x")
    assert invoke("prune", "--bundle", str(root), "--solver-cache").exit_code == 0 and not cache.exists()
    cache.write_text("x")
    clf = edgeclip.load(root)
    rng = np.random.default_rng(4)
    clf = clf.add_task_embeddings("t0", *_task(rng, int(clf.bundle.meta.backbone.embed_dim)), ["a", "b", "c"])
    assert cache.is_dir() and len(list(cache.glob("*.json"))) == 1


def test_a_read_only_bundle_is_refused_before_the_work(tmp_path: Path, make_tiny_bundle) -> None:
    """add-task onto a bundle it cannot write (EROFS on every write in the bundle: the tests may run as
    root, which ignores chmod) fails in one line before it embeds anything."""
    import subprocess
    import sys

    from PIL import Image

    root = make_tiny_bundle(tmp_path / "b", hidden=64)
    for c in ("a", "b"):
        (tmp_path / "d" / "train" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (40 * i, 90, 200)).save(tmp_path / "d" / "train" / c / f"{i}.png")
    script = ("import errno, os\nreal = os.open\n"
              "def ro(path, flags, *a, **k):\n"
              f"    if str(path).startswith({str(root)!r}) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):\n"
              "        raise OSError(errno.EROFS, 'Read-only file system', str(path))\n"
              "    return real(path, flags, *a, **k)\n"
              "os.open = ro\n"
              "from edgeclip.edgeapp import tasks\n"
              "def never(*a, **k):\n    raise SystemExit('embedded before refusing')\n"
              "tasks.embed_domain = never\n"
              f"import sys\nsys.argv = ['edgeclip', 'add-task', {str(tmp_path / 'd')!r}, '--bundle', {str(root)!r}]\n"
              "from edgeclip.edgeapp.cli.app import main\nmain()")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "read-only file system" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "embedded before" not in done.stderr
    assert Bundle.open(root).version == "v0001"


def test_the_solver_cache_deleted_during_an_add_task_costs_nothing(tmp_path: Path, make_tiny_bundle,
                                                                  monkeypatch) -> None:
    """`prune --solver-cache` (or `rm -rf BUNDLE/cache`) while an add-task folds: the add-task still commits
    its version, exactly, and the cache is whole again after the next one."""
    import shutil

    from edgeclip.edgeapp import tasks

    root = make_tiny_bundle(tmp_path / "b", hidden=256)
    cache = root / RAIL_SOLVER_CACHE
    rng = np.random.default_rng(5)
    clf = edgeclip.load(root)
    dim = int(clf.bundle.meta.backbone.embed_dim)
    clf = clf.add_task_embeddings("t0", *_task(rng, dim), ["a0", "b0", "c0"])
    real = tasks._learn_head

    def deleting(bundle, learner, solver, feats, labels, n_classes, progress):
        def on_progress(stage, done, total):
            if done == 0 and "folding" in stage:
                shutil.rmtree(root / "cache")  # after the parent's state was read, before the fold writes
        real(bundle, learner, solver, feats, labels, n_classes, on_progress)

    monkeypatch.setattr(tasks, "_learn_head", deleting)
    clf = clf.add_task_embeddings("t1", *_task(rng, dim, n=48), ["a1", "b1", "c1"])  # 24 + 48 > 32: a new base
    assert [t.name for t in clf.tasks] == ["t0", "t1"]
    w, joint = _joint_w(root)
    assert _rel(w, joint) < 1e-5
    monkeypatch.setattr(tasks, "_learn_head", real)
    clf = clf.add_task_embeddings("t2", *_task(rng, dim), ["a2", "b2", "c2"])
    w, joint = _joint_w(root)
    assert _rel(w, joint) < 1e-5 and len(list(cache.glob("*.json"))) == 1
