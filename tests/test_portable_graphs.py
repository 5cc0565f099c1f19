"""Portable graphs (issue 11): after add-tasks, `export --int8` and a rollback, every graph of every
version loads with stock `onnx.load`, passes `onnx.checker.check_model(full_check=True)`, runs in
onnxruntime and in onnx's reference evaluator with the same outputs and passes `polygraphy check
lint`; the backbone's weights are stored once per bundle (the shared graph store, docs/EXPORT.md).

Tiny config, random weights (edgeclip-tiny, 64 px), synthetic demo images."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from edgeclip.edgeapp.demo_data import write_demo_images
from onnx import TensorProto, helper, numpy_helper

from edgeclip.bundle import GRAPH_STORE, Bundle, create_bundle, list_versions, rollback
from edgeclip.errors import BundleError
from edgeclip.layout import EMBEDDING, GATED_GRAPH, IMAGE_DATA, LABEL_TEXT, LEARNED, PIXELS, TOKENS, VOCAB_FILE, ZS_TEXT, graph_file

pytest.importorskip("open_clip")
ort = pytest.importorskip("onnxruntime")


MINIMAL_MANIFEST = {  # the sections a manifest must have (edgeclip.manifest), nothing else
    "backbone": {"model": "edgeclip-tiny", "weights": {"kind": "random", "ref": "0"}},
    "preprocess": {"image_size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    "method": {"name": "rail-primal"},
}


def _graphs(bundle: Bundle) -> list[str]:
    return sorted(n for n in bundle.manifest["files"] if n.endswith(".onnx"))


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """v1 init, v2 add-task, v3 export --int8, v4 add-task, rollback to v3, v5 add-task."""
    from edgeclip.edgeapp.create import init_bundle
    from edgeclip.edgeapp.tasks import add_task
    from edgeclip.export.quantize import export_int8

    base = tmp_path_factory.mktemp("portable")
    domains, _query = write_demo_images(base / "images", train_per_class=5, query_per_class=1)
    root = base / "bundle"
    init_bundle(root, "edgeclip-tiny", random_weights=True, hidden=256)
    add_task(root, domains[0])
    export_int8(Bundle.open(root))
    add_task(root, domains[1])
    assert rollback(root) == "v0003"
    add_task(root, domains[1], name="again")
    assert list_versions(root) == ["v0001", "v0002", "v0003", "v0004", "v0005"]
    return root


def _feeds(bundle: Bundle, session: "ort.InferenceSession") -> dict[str, np.ndarray]:
    from edgeclip.tokenizer import ClipTokenizer

    rng = np.random.default_rng(0)
    size = int(bundle.manifest["preprocess"]["image_size"])
    zs = bundle.tensors(LEARNED)[ZS_TEXT]
    feeds = {}
    for value in session.get_inputs():
        if value.name == PIXELS:
            feeds[value.name] = rng.standard_normal((3, 3, size, size)).astype(np.float32)
        elif value.name == TOKENS:
            tokenizer = ClipTokenizer(bundle.path(VOCAB_FILE), int(bundle.manifest["backbone"]["context_length"]))
            feeds[value.name] = tokenizer(["a photo of a cat.", "a dog", "ring"])
        elif value.name == EMBEDDING:  # the head graph (embedding -> decision)
            rows = rng.standard_normal((3, zs.shape[1])).astype(np.float32)
            feeds[value.name] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        elif value.name == LABEL_TEXT:
            extra = rng.standard_normal((2, zs.shape[1])).astype(np.float32)
            feeds[value.name] = np.concatenate([zs, extra]) if len(zs) else extra
        else:  # pragma: no cover - a new graph input this test does not know
            raise AssertionError(f"unknown input {value.name}")
    return feeds


@pytest.mark.slow
def test_every_graph_of_every_version_loads_and_passes_the_full_checker(bundle_root: Path) -> None:
    checked = 0
    for version in list_versions(bundle_root):
        bundle = Bundle.open(bundle_root, version)
        for name in _graphs(bundle):
            path = bundle.path(name)
            assert path.parent == bundle_root / GRAPH_STORE
            model = onnx.load(str(path))  # stock loader: external data read, hard links/symlinks refused
            onnx.checker.check_model(model, full_check=True)
            onnx.checker.check_model(str(path), full_check=True)  # by path: checks the external data files too
            checked += 1
    assert checked == 4 + 4 + 6 + 6 + 6  # image, text, gated, head (+ int8 encoder and gated from v3)


@pytest.mark.slow
def test_onnxruntime_and_the_reference_evaluator_agree(bundle_root: Path) -> None:
    from onnx.reference import ReferenceEvaluator

    seen: set[Path] = set()
    for version in list_versions(bundle_root):
        bundle = Bundle.open(bundle_root, version)
        for name in _graphs(bundle):
            path = bundle.path(name)
            if path in seen:
                continue
            seen.add(path)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            feeds = _feeds(bundle, session)
            got = session.run(None, feeds)
            want = ReferenceEvaluator(onnx.load(str(path))).run(None, feeds)
            assert len(got) == len(want), name
            for out, a, b in zip(session.get_outputs(), got, want):
                assert a.shape == b.shape and a.dtype == b.dtype, (version, name, out.name)
                if np.issubdtype(a.dtype, np.integer):
                    np.testing.assert_array_equal(a, b, err_msg=f"{version} {name} {out.name}")
                else:
                    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"{version} {name} {out.name}")
    assert len(seen) >= 8  # encoders (3), int8 encoder, gated graphs of v1, v2, v4/v5 and their int8 twins


def _lint(path: Path) -> None:
    """`polygraphy check lint` (its lint needs onnx_graphsurgeon; both in the `test` extra)."""
    pytest.importorskip("polygraphy")
    pytest.importorskip("onnx_graphsurgeon")
    polygraphy = Path(sys.executable).with_name("polygraphy")
    command = [str(polygraphy)] if polygraphy.is_file() else [shutil.which("polygraphy") or "polygraphy"]
    out = subprocess.run([*command, "check", "lint", str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "PASSED" in out.stdout + out.stderr, (path.name, out.stdout[-2000:],
                                                                        out.stderr[-2000:])


@pytest.mark.slow
def test_polygraphy_lint_passes(bundle_root: Path) -> None:
    bundle = Bundle.open(bundle_root)  # v0005 holds every kind of graph: encoders, int8, gated, head
    assert len(_graphs(bundle)) == 6
    for name in _graphs(bundle):
        _lint(bundle.path(name))


def _same_in_ort_and_reference(path: Path, feeds: dict[str, np.ndarray]) -> None:
    from onnx.reference import ReferenceEvaluator

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, feeds)
    want = ReferenceEvaluator(onnx.load(str(path))).run(None, feeds)
    for out, a, b in zip(session.get_outputs(), got, want):
        assert a.shape == b.shape, (path.name, out.name)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"{path.name} {out.name}")


@pytest.mark.slow
def test_moe_graphs_are_portable(tmp_path: Path) -> None:
    """MoE: the adapted encoder reads the backbone from the image encoder's stored weights and
    the gated graph inlines it; both pass the same checks as RAIL's graphs."""
    pytest.importorskip("torch")
    from edgeclip.edgeapp.create import init_bundle
    from edgeclip.edgeapp.tasks import add_task

    from edgeclip.layout import MOE_DATA, MOE_GRAPH, TASK_IDS

    domains, _query = write_demo_images(tmp_path / "images", train_per_class=4, query_per_class=1)
    root = tmp_path / "moe"
    init_bundle(root, "edgeclip-tiny", random_weights=True, method="moe")
    add_task(root, domains[0], iterations=2)
    add_task(root, domains[1], iterations=2)
    bundle = Bundle.open(root)
    files = bundle.manifest["files"]
    assert files[graph_file(IMAGE_DATA)] == Bundle.open(root, "v0001").manifest["files"][graph_file(IMAGE_DATA)]
    size = int(bundle.manifest["preprocess"]["image_size"])
    pixels = np.random.default_rng(1).standard_normal((4, 3, size, size)).astype(np.float32)
    for name in (graph_file(MOE_GRAPH), graph_file(GATED_GRAPH)):
        path = bundle.path(name)
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        _lint(path)
        if name.endswith(MOE_GRAPH):
            feeds = {PIXELS: pixels, TASK_IDS: np.array([-1, 0, 1, 0], np.int64)}
        else:
            zs = bundle.tensors(LEARNED)[ZS_TEXT]
            feeds = {PIXELS: pixels, LABEL_TEXT: zs}
        _same_in_ort_and_reference(path, feeds)
    moe = onnx.load(str(bundle.path(graph_file(MOE_GRAPH))), load_external_data=False)
    locations = {e.value for t in moe.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {bundle.path(graph_file(IMAGE_DATA)).name, bundle.path(graph_file(MOE_DATA)).name}


@pytest.mark.slow
def test_the_store_is_immutable_content_named_and_shared(bundle_root: Path) -> None:
    store = bundle_root / GRAPH_STORE
    files = sorted(store.iterdir())
    assert files and all(p.is_file() and not p.is_symlink() for p in files)
    for path in files:
        assert path.stat().st_nlink == 1, path.name  # onnx refuses external data with several hard links
        assert path.name == hashlib.sha256(path.read_bytes()).hexdigest() + path.suffix
    listed: set[str] = set()
    for version in list_versions(bundle_root):
        bundle = Bundle.open(bundle_root, version)
        assert not (bundle.dir / "graphs").exists()  # no graph is a version file
        names = {bundle.path(n).name for n, e in bundle.manifest["files"].items() if e.get("blob")}
        listed |= names
        for name in _graphs(bundle):
            model = onnx.load(str(bundle.path(name)), load_external_data=False)
            for tensor in model.graph.initializer:
                if tensor.data_location == TensorProto.EXTERNAL:
                    location = {e.key: e.value for e in tensor.external_data}["location"]
                    assert location == Path(location).name and ".." not in location
                    assert location in names  # every data file a graph reads is listed by its version
    assert listed == {p.name for p in files}  # nothing orphaned
    image_data = {Bundle.open(bundle_root, v).manifest["files"][graph_file(IMAGE_DATA)]["sha256"]
                  for v in list_versions(bundle_root)}
    assert len(image_data) == 1  # the backbone's weights: one file for all five versions
    per_version = sum(e["size"] for v in list_versions(bundle_root)
                      for e in Bundle.open(bundle_root, v).manifest["files"].values() if e.get("blob"))
    assert sum(p.stat().st_size for p in files) < per_version / 3


def _tiny_graph(folder: Path, location: str) -> Path:
    """y = x W with W [64,64] stored as external data at `location` (written where onnx allows)."""
    weight = numpy_helper.from_array(np.eye(64, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(folder / "g.onnx"), save_as_external_data=True, location="w.data", size_threshold=0)
    if location != "w.data":
        model = onnx.load(str(folder / "g.onnx"), load_external_data=False)
        for entry in model.graph.initializer[0].external_data:
            if entry.key == "location":
                entry.value = location
        onnx.save_model(model, str(folder / "g.onnx"))
    return folder / "g.onnx"


def test_write_graph_stores_plain_names_and_refuses_escapes(tmp_path: Path) -> None:
    with create_bundle(tmp_path / "b", dict(MINIMAL_MANIFEST)) as writer:
        writer.write_graph(graph_file("g.onnx"), _tiny_graph(tmp_path / "ok", "w.data"))
        writer.write_graph(graph_file("copy.onnx"), _tiny_graph(tmp_path / "ok2", "w.data"))  # same weights
        for bad, message in (("../w.data", "plain file name"), ("sub/w.data", "plain file name"),
                             (str(tmp_path / "ok" / "w.data"), "plain file name"), ("none.data", "missing")):
            with pytest.raises(BundleError, match=message):
                writer.write_graph(graph_file("bad.onnx"), _tiny_graph(tmp_path / f"bad{len(bad)}", bad))
        with pytest.raises(BundleError, match="graphs/<file>"):
            writer.write_graph("elsewhere/g.onnx", tmp_path / "ok" / "g.onnx")
    bundle = Bundle.open(tmp_path / "b")
    assert sorted(bundle.manifest["files"]) == [graph_file("copy.onnx"), graph_file("g.onnx"), graph_file("w.data")]
    data = [p for p in (tmp_path / "b" / GRAPH_STORE).iterdir() if p.suffix == ".data"]
    assert len(data) == 1  # one weights file for both graphs
    session = ort.InferenceSession(str(bundle.path(graph_file("g.onnx"))), providers=["CPUExecutionProvider"])
    x = np.arange(64, dtype=np.float32)[None]
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], x)
    onnx.checker.check_model(str(bundle.path(graph_file("copy.onnx"))), full_check=True)


def test_graph_folder_stores_only_what_changed(tmp_path: Path) -> None:
    with create_bundle(tmp_path / "b", dict(MINIMAL_MANIFEST)) as writer:
        writer.write_graph(graph_file(GATED_GRAPH), _tiny_graph(tmp_path / "src", "w.data"))
    first = Bundle.open(tmp_path / "b")
    with first.new_version() as writer:
        with writer.graph_folder() as folder:
            assert (folder / "w.data").is_symlink()  # weights are not copied
            model = onnx.load(str(folder / GATED_GRAPH), load_external_data=False)  # names as written
            assert {e.value for e in model.graph.initializer[0].external_data if e.key == "location"} == {"w.data"}
            model.graph.name = "changed"
            onnx.save_model(model, str(folder / "new.onnx"))
    second = Bundle.open(tmp_path / "b")
    files = second.manifest["files"]
    assert files[graph_file(GATED_GRAPH)] == first.manifest["files"][graph_file(GATED_GRAPH)]  # untouched
    assert files[graph_file("new.onnx")]["sha256"] != files[graph_file(GATED_GRAPH)]["sha256"]
    assert not list(second.dir.glob(".graphs-*")) and not list((tmp_path / "b").glob(".staging-*"))
    onnx.checker.check_model(str(second.path(graph_file("new.onnx"))), full_check=True)


def test_graphs_of_an_older_layout_move_into_the_store(tmp_path: Path) -> None:
    """A version whose graphs are hard-linked version files (edgeclip before the store): the next
    graph_folder stores every graph, so stock onnx reads the new version."""
    src = _tiny_graph(tmp_path / "src", "w.data")
    with create_bundle(tmp_path / "b", dict(MINIMAL_MANIFEST)) as writer:
        writer.write_file(graph_file(GATED_GRAPH), src)
        writer.write_file(graph_file("w.data"), src.with_name("w.data"))
    old = Bundle.open(tmp_path / "b")
    with old.new_version() as writer:
        with writer.graph_folder():
            pass
    new = Bundle.open(tmp_path / "b")
    assert all(e["blob"] for e in new.manifest["files"].values()) and not (new.dir / "graphs").exists()
    onnx.checker.check_model(str(new.path(graph_file(GATED_GRAPH))), full_check=True)
    assert old.path(graph_file(GATED_GRAPH)).is_file()  # the old version is untouched
