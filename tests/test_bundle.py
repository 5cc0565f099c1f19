"""The bundle format: atomic versions, crash safety, validation, rollback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgeclip.bundle import Bundle, create_bundle, list_versions, rollback
from edgeclip.errors import BundleError

BASE = {"backbone": {"model": "m", "weights": {"kind": "random", "ref": "0"}},
        "preprocess": {"image_size": 8, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        "method": {"name": "rail-primal"}}


def task(name: str) -> dict:
    return {"name": name, "classes": [f"{name}-a", f"{name}-b"], "threshold": 1.0}


def make_bundle(root: Path) -> Bundle:
    with create_bundle(root, dict(BASE)) as writer:
        writer.write_tensors("learned.safetensors", {"w": np.arange(12, dtype=np.float32).reshape(3, 4)})
        writer.write_bytes("graphs/g.onnx", b"graph-v1")
    return Bundle.open(root)


def test_versions_inherit_and_switch(tmp_path: Path) -> None:
    first = make_bundle(tmp_path / "b")
    with first.new_version() as writer:
        writer.manifest["tasks"].append(task("t0"))
        writer.write_tensors("learned.safetensors", {"w": np.zeros((3, 5), np.float32)})
    second = Bundle.open(tmp_path / "b")
    assert (first.version, second.version) == ("v0001", "v0002")
    assert second.manifest["parent"] == "v0001"
    assert second.tensors("learned.safetensors")["w"].shape == (3, 5)
    assert second.path("graphs/g.onnx").read_bytes() == b"graph-v1"  # inherited
    # the old version is untouched
    assert Bundle.open(tmp_path / "b", "v0001").tensors("learned.safetensors")["w"].sum() == 66


def test_writing_an_inherited_file_never_touches_the_parent(tmp_path: Path) -> None:
    first = make_bundle(tmp_path / "b")
    with first.new_version() as writer:
        with open(writer.writable_path("graphs/g.onnx"), "wb") as handle:
            handle.write(b"graph-v2")
    assert Bundle.open(tmp_path / "b", "v0001").path("graphs/g.onnx").read_bytes() == b"graph-v1"
    assert Bundle.open(tmp_path / "b").path("graphs/g.onnx").read_bytes() == b"graph-v2"


def test_exception_inside_writer_keeps_previous_version(tmp_path: Path) -> None:
    first = make_bundle(tmp_path / "b")
    with pytest.raises(RuntimeError):
        with first.new_version() as writer:
            writer.write_tensors("learned.safetensors", {"w": np.zeros(2, np.float32)})
            raise RuntimeError("boom")
    assert Bundle.open(tmp_path / "b").version == "v0001"
    assert not list((tmp_path / "b").glob(".staging-*"))


def test_rollback_and_refusals(tmp_path: Path) -> None:
    first = make_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match="first one"):
        rollback(tmp_path / "b")
    with first.new_version():
        pass
    assert rollback(tmp_path / "b") == "v0001"
    assert Bundle.open(tmp_path / "b").version == "v0001"
    with pytest.raises(BundleError, match="already holds"):
        create_bundle(tmp_path / "b", dict(BASE))
    with pytest.raises(BundleError, match="No bundle"):
        Bundle.open(tmp_path / "missing")


@pytest.mark.parametrize("damage", ["schema", "missing", "truncated", "hash", "shape", "json"])
def test_validation_errors(tmp_path: Path, damage: str) -> None:
    bundle = make_bundle(tmp_path / "b")
    manifest_path = bundle.dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    tensors = bundle.dir / "learned.safetensors"
    if damage == "schema":
        manifest["schema_version"] = 99
        manifest_path.write_text(json.dumps(manifest))
        expected = "schema version 99"
    elif damage == "missing":
        (bundle.dir / "graphs" / "g.onnx").unlink()
        expected = "missing"
    elif damage == "truncated":
        tensors.write_bytes(tensors.read_bytes()[:-7])
        expected = "truncated"
    elif damage == "hash":
        data = bytearray(tensors.read_bytes())
        data[-1] ^= 0xFF
        tensors.write_bytes(bytes(data))
        # opening reads no content; the damaged file is refused on its first use, and by verify
        opened = Bundle.open(tmp_path / "b")
        assert opened.path("graphs/g.onnx").read_bytes() == b"graph-v1"
        with pytest.raises(BundleError, match="sha256"):
            opened.tensors("learned.safetensors")
        with pytest.raises(BundleError, match="sha256"):
            Bundle.open(tmp_path / "b").verify()
        return
    elif damage == "shape":
        manifest["tensors"]["learned.safetensors"]["w"] = [4, 3]
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(BundleError, match="shape"):
            Bundle.open(tmp_path / "b").tensors("learned.safetensors")
        return
    else:
        manifest_path.write_text("{not json")
        expected = "not valid JSON"
    with pytest.raises(BundleError, match=expected):
        Bundle.open(tmp_path / "b")


WRITER = """
import sys, time, numpy as np
from edgeclip.bundle import Bundle
bundle = Bundle.open(sys.argv[1])
writer = bundle.new_version()
writer.manifest["tasks"].append({"name": "killed", "classes": ["k"], "threshold": 1.0})
for i in range(40):
    writer.write_tensors(f"part{i}.safetensors", {"x": np.random.rand(200, 200)})
    if i == 5:
        print("writing", flush=True)
time.sleep(float(sys.argv[2]))
writer.commit()
print("committed", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.3, 5.0])
def test_killed_writer_leaves_previous_version_loadable(tmp_path: Path, delay: float) -> None:
    """A writer killed at some point (mid-write, around the commit, or before it) never
    leaves a bundle that fails to load: it is either the old version or the complete new one."""
    make_bundle(tmp_path / "b")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "b"), str(delay)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(delay / 2 if delay < 1 else 0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    bundle = Bundle.open(tmp_path / "b")
    assert bundle.version in ("v0001", "v0002")
    if delay == 5.0:
        assert bundle.version == "v0001"
    if bundle.version == "v0002":
        assert bundle.tasks[-1]["name"] == "killed"
        assert len([f for f in bundle.manifest["files"] if f.startswith("part")]) == 40
    # the next writer cleans the abandoned staging folder and commits normally
    with bundle.new_version():
        pass
    assert not list((tmp_path / "b").glob(".staging-*"))
    assert Bundle.open(tmp_path / "b").version == list_versions(tmp_path / "b")[-1]


def test_crash_between_version_rename_and_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A version folder renamed into place but never made current is ignored; the old one stays current."""
    first = make_bundle(tmp_path / "b")
    import edgeclip.bundle as module

    def crash(*_args: object) -> None:
        raise KeyboardInterrupt("killed before the switch")

    monkeypatch.setattr(module, "_write_atomic_text", crash)
    with pytest.raises(KeyboardInterrupt):
        with first.new_version():
            pass
    monkeypatch.undo()
    assert Bundle.open(tmp_path / "b").version == "v0001"
    with Bundle.open(tmp_path / "b").new_version():
        pass
    assert Bundle.open(tmp_path / "b").version == "v0003"
