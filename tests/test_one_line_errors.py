"""Failures that printed a traceback now end in one line on stderr (issue 20 item 9): a full disk while
writing tensors, hostile manifests and tokenizer files, graphs that do not fit the bundle, onnxruntime
failures at run time, export of a tampered graph."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeclip.bundle import Bundle

pytestmark = pytest.mark.slow


def one_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr[-3000:]
    return done.stderr.strip()


def cli(*args: object, env: dict | None = None) -> subprocess.CompletedProcess:
    code = f"import sys; sys.argv = ['edgeclip'] + {[str(a) for a in args]!r}\n" \
           "from edgeclip.edgeapp.cli.app import main\nmain()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def tiny(make_tiny_bundle, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from edgeclip.edgeapp.demo_data import write_demo_images

    base = tmp_path_factory.mktemp("one-line")
    domains, query = write_demo_images(base / "images", train_per_class=6, query_per_class=1)
    return {"root": make_tiny_bundle(base / "bundle", hidden=64), "domains": domains, "query": query}


def test_full_disk_during_add_task(tiny: dict, tmp_path: Path) -> None:
    """add-task onto a nearly full file system (a private tmpfs in a user and mount namespace), at several
    amounts of free space: the tensor writes (safetensors) and the rest fail in one line, nothing changes."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("needs unshare -rm (user namespaces) for a small private file system")
    mount = tmp_path / "mnt"
    mount.mkdir()
    script = tmp_path / "full.sh"
    entry = (f"import sys; sys.argv = ['edgeclip', 'add-task', {str(tiny['domains'][0])!r}, '--bundle', "
             f"{str(mount / 'b')!r}, '--quiet']\nfrom edgeclip.edgeapp.cli.app import main\nmain()")
    script.write_text(
        "set -e\n"
        f"mount -t tmpfs -o size=64m tmpfs {mount}\n"
        f"cp -a {tiny['root']} {mount}/b\n"
        f"avail=$(df --output=avail -B1 {mount} | tail -1)\n"
        f"head -c $((avail - $1)) /dev/zero > {mount}/filler || true\n"
        f"set +e\n{sys.executable} -c \"$ENTRY\"\necho \"rc=$?\" >&2\n"
        f"{sys.executable} -c \"from edgeclip.bundle import Bundle; print(Bundle.open('{mount}/b').version)\"\n")
    seen = set()
    for free in (8192, 40960, 400000):
        env = {**os.environ, "ENTRY": entry, "EDGECLIP_STAMPS_DIR": str(tmp_path / "stamps")}
        done = subprocess.run(["unshare", "-rm", "bash", str(script), str(free)], capture_output=True, text=True,
                              timeout=300, env=env)
        lines = done.stderr.strip().splitlines()
        assert lines[-1] == "rc=1" and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert len(lines) == 2 and lines[0].startswith("error: "), done.stderr[-3000:]
        assert done.stdout.strip() == "v0001"  # the version before: nothing half-written became current
        seen.add(lines[0])
    assert any("the disk is full" in line for line in seen), seen


def test_deeply_nested_manifest_in_every_command(tiny: dict, tmp_path: Path) -> None:
    """A manifest nested 100,000 deep (json's RecursionError): every command that reads it says so in one
    line; none prints a traceback."""
    root = tmp_path / "b"
    shutil.copytree(tiny["root"], root)
    manifest = root / "versions" / Bundle.open(root).version / "manifest.json"
    nested = "[" * 100_000 + "]" * 100_000
    manifest.write_text(manifest.read_text().replace('"zero_shot": {', f'"zero_shot": {{"junk": {nested}, ', 1))
    env = {**os.environ, "EDGECLIP_STAMPS_DIR": str(tmp_path / "stamps")}
    commands = [["info"], ["versions"], ["tasks"], ["verify"], ["classify", tiny["query"]],
                ["add-task", tiny["domains"][0]], ["prune", "--keep", "1"], ["rollback"], ["export", "--int8"]]
    for command in commands:
        done = cli(*command, "--bundle", root, env=env)
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) <= 1, (command, done.stderr)
        if command[0] not in ("info", "versions", "prune"):  # these list what they can, and say what is damaged
            assert done.returncode == 1 and "nested too deeply" in done.stderr, (command, done.stderr)


def _tampered(tiny: dict, tmp_path: Path, edit) -> Path:
    """A copy of the tiny bundle whose current manifest (and files) ``edit(version_dir, manifest)`` changed."""
    import json

    root = tmp_path / "b"
    shutil.copytree(tiny["root"], root)
    vdir = root / "versions" / Bundle.open(root).version
    manifest = json.loads((vdir / "manifest.json").read_text())
    edit(vdir, manifest)
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.mark.parametrize("case", ["image_size", "context_length", "gzip_bomb"])
def test_memory_bombs_are_refused_at_read(tiny: dict, tmp_path: Path, case: str) -> None:
    """A huge image_size or context length in the manifest, or a tokenizer file that unpacks to gigabytes,
    is refused when read (bounded), not a MemoryError."""
    import gzip
    import hashlib

    def edit(vdir: Path, manifest: dict) -> None:
        if case == "image_size":
            manifest["preprocess"]["image_size"] = 10**9
        elif case == "context_length":
            manifest["backbone"]["context_length"] = 10**9
            if manifest["backbone"].get("text"):
                manifest["backbone"]["text"]["context_length"] = 10**9
        else:
            name = next(n for n in manifest["files"] if n.startswith("tokenizer/"))
            (vdir / name).unlink()
            with gzip.open(vdir / name, "wb") as f:  # 80 MiB unpacked, ~80 KB packed
                for _ in range(80):
                    f.write(b"a" * (1 << 20))
            data = (vdir / name).read_bytes()
            manifest["files"][name].update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))

    root = _tampered(tiny, tmp_path, edit)
    env = {**os.environ, "EDGECLIP_STAMPS_DIR": str(tmp_path / "stamps")}
    line = one_line(cli("classify", tiny["query"], "--labels", "a,b", "--bundle", root, env=env))
    expected = {"image_size": "$.preprocess.image_size", "context_length": "context_length",
                "gzip_bomb": "unpacks to more than 64 MiB"}[case]
    assert expected in line, line


def test_export_int8_on_a_tampered_graph(tiny: dict, tmp_path: Path) -> None:
    """A graph replaced by garbage (manifest hash updated to match): export --int8 says so in one line."""
    import hashlib

    def edit(vdir: Path, manifest: dict) -> None:
        data = b"not an onnx graph"
        sha = hashlib.sha256(data).hexdigest()
        (vdir.parents[1] / "graphs" / f"{sha}.onnx").write_bytes(data)
        manifest["files"]["graphs/image_encoder.onnx"].update(sha256=sha, size=len(data))

    root = _tampered(tiny, tmp_path, edit)
    env = {**os.environ, "EDGECLIP_STAMPS_DIR": str(tmp_path / "stamps")}
    for args in (["export", "--int8"], ["export"]):
        line = one_line(cli(*args, "--bundle", root, env=env))
        assert "graph 'graphs/image_encoder.onnx' cannot be read" in line, line


def test_gated_graph_that_does_not_fit_the_tasks(tiny: dict, tmp_path: Path) -> None:
    """A version whose gated graph is another version's (two tasks where the manifest has one): classify
    refuses in one line instead of an IndexError."""
    import json

    import numpy as np

    import edgeclip

    root = tmp_path / "b"
    shutil.copytree(tiny["root"], root)
    clf = edgeclip.load(root)
    dim = clf.embed_texts(["x"]).shape[1]
    rng = np.random.default_rng(0)
    for i in range(2):
        feats = rng.standard_normal((12, dim)).astype(np.float32)
        feats /= np.linalg.norm(feats, axis=1, keepdims=True)
        clf = clf.add_task_embeddings(f"t{i}", feats, np.arange(12) % 2, [f"a{i}", f"b{i}"])
    two = {name: clf.bundle.manifest["files"][name] for name in ("graphs/gated.onnx", "graphs/head.onnx")}
    clf = clf.rollback()
    path = root / "versions" / clf.version / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"].update(two)  # files run through the head graph, in-memory images through the gated one
    path.write_text(json.dumps(manifest))
    env = {**os.environ, "EDGECLIP_STAMPS_DIR": str(tmp_path / "stamps")}
    line = one_line(cli("classify", tiny["query"], "--bundle", root, env=env))  # the graph itself fails
    assert "onnxruntime failed running" in line, line
    line = one_line(cli("classify", tiny["query"], "--labels", "x,y", "--bundle", root, env=env))  # it runs
    assert "do not fit version" in line, line


def test_onnxruntime_failure_at_run_time_is_an_engine_error(tmp_path: Path) -> None:
    """onnxruntime's own exception types (here: a Reshape that cannot hold at run time) become EngineError."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from edgeclip.edgeapp.runtime import select_backend
    from edgeclip.errors import EngineError

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        [helper.make_tensor("shape", TensorProto.INT64, [1], [3])])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    session = select_backend("ort-cpu").session(path, optimized_cache=False)
    assert session.run({"x": np.ones(3, np.float32)})["y"].shape == (3,)
    with pytest.raises(EngineError, match="onnxruntime failed running g.onnx: .*Reshape"):
        session.run({"x": np.ones(4, np.float32)})
