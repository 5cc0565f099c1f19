"""The bundle format: atomic versions, crash safety, validation, rollback."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from edgeclip.bundle import Bundle, create_bundle, list_versions, rollback
from edgeclip.errors import BundleError
from edgeclip.manifest import Task

BASE = {"backbone": {"model": "m", "weights": {"kind": "random", "ref": "0"}},
        "preprocess": {"image_size": 8, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        "method": {"name": "rail-primal"}}


def task(name: str) -> Task:
    return Task(name=name, classes=[f"{name}-a", f"{name}-b"], threshold=1.0)


@pytest.fixture(autouse=True)
def own_stamp_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test its own verification-stamp cache (subprocesses inherit it)."""
    folder = tmp_path_factory.mktemp("stamps")
    monkeypatch.setenv("EDGECLIP_STAMPS_DIR", str(folder))
    return folder


def make_bundle(root: Path) -> Bundle:
    with create_bundle(root, dict(BASE)) as writer:
        writer.write_tensors("learned.safetensors", {"w": np.arange(12, dtype=np.float32).reshape(3, 4)})
        writer.write_bytes("graphs/g.bin", b"graph-v1")
    return Bundle.open(root)


def test_versions_inherit_and_switch(tmp_path: Path) -> None:
    first = make_bundle(tmp_path / "b")
    with first.new_version() as writer:
        writer.add_task(task("t0"))
        writer.write_tensors("learned.safetensors", {"w": np.zeros((3, 5), np.float32)})
    second = Bundle.open(tmp_path / "b")
    assert (first.version, second.version) == ("v0001", "v0002")
    assert second.manifest["parent"] == "v0001"
    assert second.tensors("learned.safetensors")["w"].shape == (3, 5)
    assert second.path("graphs/g.bin").read_bytes() == b"graph-v1"  # inherited
    # the old version is untouched
    assert Bundle.open(tmp_path / "b", "v0001").tensors("learned.safetensors")["w"].sum() == 66


def test_writing_an_inherited_file_never_touches_the_parent(tmp_path: Path) -> None:
    first = make_bundle(tmp_path / "b")
    with first.new_version() as writer:
        with open(writer.writable_path("graphs/g.bin"), "wb") as handle:
            handle.write(b"graph-v2")
    assert Bundle.open(tmp_path / "b", "v0001").path("graphs/g.bin").read_bytes() == b"graph-v1"
    assert Bundle.open(tmp_path / "b").path("graphs/g.bin").read_bytes() == b"graph-v2"


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
        (bundle.dir / "graphs" / "g.bin").unlink()
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
        assert opened.path("graphs/g.bin").read_bytes() == b"graph-v1"
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
from edgeclip.manifest import Task
bundle = Bundle.open(sys.argv[1])
writer = bundle.new_version()
writer.add_task(Task(name="killed", classes=["k"], threshold=1.0))
print("staging", writer.staging, flush=True)
for i in range(40):
    writer.write_tensors(f"part{i}.safetensors", {"x": np.random.rand(200, 200)})
    print("part", i, flush=True)
    if i == 10 and sys.argv[2] == "mid-write":
        time.sleep(60)  # killed here, with parts 11..39 never written
print("written", flush=True)
time.sleep(float(sys.argv[3]))
writer.commit()
print("committed", flush=True)
time.sleep(60)
"""


def _parts(folder: Path) -> int:
    return len(list(folder.glob("part*.safetensors")))


@pytest.mark.parametrize("phase,delay", [("mid-write", 0.0), ("around-commit", 0.05), ("around-commit", 0.3),
                                         ("before-commit", 5.0)])
def test_killed_writer_leaves_previous_version_loadable(tmp_path: Path, phase: str, delay: float) -> None:
    """A writer killed mid-write, around its commit, or just before it never leaves a bundle that
    fails to load: it is either the old version or the complete new one. The abandoned staging
    folder proves where the kill landed (a partial write really was interrupted)."""
    make_bundle(tmp_path / "b")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "b"), phase, str(delay)],
                            stdout=subprocess.PIPE, text=True)
    staging = Path(proc.stdout.readline().split(" ", 1)[1].strip())
    wait_for = "part 10" if phase == "mid-write" else "written"
    while (line := proc.stdout.readline().strip()) != wait_for:
        assert line, "the writer ended early"
    time.sleep(delay / 2 if delay < 1 else 0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    bundle = Bundle.open(tmp_path / "b")
    assert bundle.version in ("v0001", "v0002")
    if phase == "mid-write":  # killed between two tensor files: a partial staging folder, the old version
        assert bundle.version == "v0001" and 11 <= _parts(staging) < 40
    if phase == "before-commit":  # every file written, killed before the commit
        assert bundle.version == "v0001" and _parts(staging) == 40
    if bundle.version == "v0002":
        assert bundle.tasks[-1].name == "killed"
        assert len([f for f in bundle.manifest["files"] if f.startswith("part")]) == 40
    # the next writer cleans the abandoned staging folder and commits normally
    with bundle.new_version():
        pass
    assert not list((tmp_path / "b").glob(".staging-*"))
    assert Bundle.open(tmp_path / "b").version == list_versions(tmp_path / "b")[-1]


def test_crash_between_version_rename_and_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A version folder renamed into place but never made current is ignored; the old one stays current."""
    first = make_bundle(tmp_path / "b")
    import edgeclip.store.writer as module

    real = module.write_atomic_text

    def crash(path: Path, text: str) -> None:
        if path.name != "CURRENT":
            return real(path, text)
        raise KeyboardInterrupt("killed before the switch")

    monkeypatch.setattr(module, "write_atomic_text", crash)
    with pytest.raises(KeyboardInterrupt):
        with first.new_version():
            pass
    monkeypatch.undo()
    assert Bundle.open(tmp_path / "b").version == "v0001"
    with Bundle.open(tmp_path / "b").new_version():
        pass
    assert Bundle.open(tmp_path / "b").version == "v0003"


# --------------------------------------------------------------------------- the typed manifest

INIT_MANIFEST = {  # what `edgeclip init` writes (edgeclip-tiny, rail-primal), files left out
    "backbone": {"model": "edgeclip-tiny", "weights": {"kind": "random", "ref": "0", "sha256": None},
                 "embed_dim": 64, "context_length": 77},
    "preprocess": {"image_size": 64, "mean": [0.48145466, 0.4578275, 0.40821073],
                   "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic", "resize_mode": "shortest"},
    "method": {"name": "rail-primal", "settings": {"beta": 0.8, "fusion": "ddas", "seed": 0, "hidden": 15000,
                                                   "gamma": 0.1, "dim": 64}},
    "gate": {"kind": "linear", "k": 4, "quantile": 0.95},
    "zero_shot": {"templates": ["a photo of a {}."], "logit_scale": 100.0, "labels": []},
    "tasks": [],
}
TASK_RECORD = {"name": "shapes", "classes": ["circle", "square"], "templates": ["a photo of a {}."], "n_images": 12,
               "threshold": 0.000127, "gate": {"kind": "linear", "k": 4}, "source": "/tmp/shapes",
               "created_at": "2026-11-30T11:00:28+00:00"}
MOE_SETTINGS = {"beta": 0.8, "fusion": "ddas", "seed": 0,
                "moe": {"n_experts": 22, "top_k": 2, "encoders": ["image", "text"], "last_blocks": None},
                "train": {"iterations": 1000, "batch_size": 64, "lr": 0.001, "warmup": 100, "freeze_rule": "strict"}}


def test_manifests_as_written_today_validate_with_typed_access() -> None:
    from edgeclip.manifest import validate_manifest

    meta = validate_manifest(INIT_MANIFEST, complete=False)
    assert meta.method.settings.hidden == 15000 and meta.gate.k == 4 and meta.backbone.weights.kind == "random"
    with_task = json.loads(json.dumps(INIT_MANIFEST))
    with_task["tasks"] = [TASK_RECORD]
    with_task["method"]["settings"]["learner"] = {"kind": "rail_primal", "n_classes": 2}
    with_task["quantization"] = {"image_encoder": {"method": "dynamic", "weights": "int8", "activations": "uint8",
                                                   "op_types": ["MatMul"], "onnxruntime": "1.20"}}
    assert validate_manifest(with_task, complete=False).tasks[0].gate.k == 4
    moe = json.loads(json.dumps(INIT_MANIFEST))
    moe["method"] = {"name": "moe", "settings": MOE_SETTINGS}
    moe["tasks"] = [dict(TASK_RECORD, training={"iterations": 5, "final_loss": 0.5, "images_per_s": 3.0,
                                                "experts_frozen": 2, "experts_added": 0, "skipped_images": 0})]
    assert validate_manifest(moe, complete=False).method.name == "moe"
    # defaults are defined once, in the schema
    minimal = validate_manifest(BASE, complete=False)
    assert minimal.zero_shot.templates == ["a photo of a {}."] and minimal.zero_shot.logit_scale == 100.0
    assert minimal.method.settings.beta == 0.8 and minimal.gate.kind == "linear" and minimal.retention.keep == 0


def _assign(node: Any, path: tuple, value: object) -> Any:
    """``node.<path> = value``, unchecked; a frozen section (``preprocess``) is replaced in its parent."""
    head, *rest = path
    if rest:
        setattr(node, head, _assign(getattr(node, head), tuple(rest), value))
    elif type(node).__struct_config__.frozen:
        return msgspec.structs.replace(node, **{head: value})
    else:
        setattr(node, head, value)
    return node


@pytest.mark.parametrize("path, value, field", [
    (("gate", "bogus"), 1, "$.gate"),
    (("colour",), "red", "colour"),
    (("gate", "k"), "four", "$.gate.k"),
    (("method", "name"), "svm", "$.method.name"),
    (("method", "settings", "beta"), 2.0, "$.method.settings.beta"),
    (("tasks",), [{"name": "t", "classes": [], "threshold": 1.0}], "$.tasks[0].classes"),
    (("tasks",), [{"name": "t", "classes": ["a"], "threshold": -1.0}], "$.tasks[0].threshold"),
    (("tasks",), [{"name": "t", "classes": ["a"], "threshold": 1.0, "extra": 1}], "$.tasks[0]"),
    (("backbone", "weights", "kind"), "url", "$.backbone.weights.kind"),
    (("preprocess", "mean"), [0.5], "$.preprocess.mean"),
])
def test_invalid_or_unknown_manifest_fields_are_refused_by_name(tmp_path: Path, path: tuple, value: object,
                                                                 field: str) -> None:
    from edgeclip.manifest import validate_manifest

    bad = json.loads(json.dumps(INIT_MANIFEST))
    node = bad
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(BundleError, match=re.escape(field)):
        validate_manifest(bad, complete=False)
    # refused before anything is written ...
    with pytest.raises(BundleError, match=re.escape(field)):
        create_bundle(tmp_path / "new", bad)
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new.init-*"))
    # ... at commit, where the typed manifest can hold the bad value (the previous version stays current) ...
    first = make_bundle(tmp_path / "b")
    typed: object = first.meta
    for key in path[:-1]:
        typed = getattr(typed, key, None)
    if path[-1] in getattr(type(typed), "__struct_fields__", ()):
        with pytest.raises(BundleError, match=re.escape(field)):
            with first.new_version() as writer:
                _assign(writer.meta, path, value)  # structs do not check on assignment: the commit must
    assert Bundle.open(tmp_path / "b").version == "v0001" and not list((tmp_path / "b").glob(".staging-*"))
    # ... and when read
    manifest_path = first.dir / "manifest.json"
    written = json.loads(manifest_path.read_text())
    node = written
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    manifest_path.write_text(json.dumps(written))
    with pytest.raises(BundleError, match=re.escape(field)):
        Bundle.open(tmp_path / "b")


def test_non_finite_numbers_in_a_manifest_are_refused(tmp_path: Path) -> None:
    first = make_bundle(tmp_path / "b")
    path = first.dir / "manifest.json"
    path.write_text(path.read_text().replace('"tasks": []', '"tasks": [{"name": "t", "classes": ["a"], "threshold": NaN}]'))
    with pytest.raises(BundleError, match="NaN"):
        Bundle.open(tmp_path / "b")


# --------------------------------------------------------------------------- concurrency (real processes)

RACER = """
import sys, time, numpy as np
from pathlib import Path
from edgeclip.bundle import Bundle
from edgeclip.errors import BundleError
from edgeclip.manifest import Task
root, name, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
bundle = Bundle.open(root)                      # reads the parent, without the lock (like add-task)
print("opened", bundle.version, flush=True)
while not go.exists():
    time.sleep(0.01)
try:
    with bundle.new_version() as writer:
        writer.add_task(Task(name=name, classes=[name + "-c"], threshold=1.0))
        writer.write_tensors("learned.safetensors", {"w": np.full((3, 4), len(name), np.float32)})
        time.sleep(float(sys.argv[4]))
except BundleError as exc:
    print("refused:", exc, flush=True)
    sys.exit(1)
print("committed", flush=True)
"""


def _racer(root: Path, name: str, go: Path, hold: float = 0.3) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", RACER, str(root), name, str(go), str(hold)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("opened")
    return proc


def test_two_concurrent_writers_never_lose_an_update(tmp_path: Path) -> None:
    """Both start from v0001; exactly one commits, the other refuses with a clear message, and the
    winner's task is in the bundle (the store's compare-and-swap at commit)."""
    make_bundle(tmp_path / "b")
    go = tmp_path / "go"
    procs = {name: _racer(tmp_path / "b", name, go) for name in ("alpha", "beta")}
    go.touch()
    outs = {name: proc.communicate(timeout=60) for name, proc in procs.items()}
    codes = {name: proc.returncode for name, proc in procs.items()}
    assert sorted(codes.values()) == [0, 1], outs
    winner = next(n for n, c in codes.items() if c == 0)
    loser = next(n for n, c in codes.items() if c == 1)
    assert "changed while this command ran" in outs[loser][0] and "Traceback" not in outs[loser][1]
    bundle = Bundle.open(tmp_path / "b")
    assert [t.name for t in bundle.tasks] == [winner]
    assert bundle.tensors("learned.safetensors")["w"][0, 0] == len(winner)
    assert list_versions(tmp_path / "b") == ["v0001", "v0002"]


def test_rollback_during_a_write_is_not_undone(tmp_path: Path) -> None:
    """A rollback that succeeds while a writer is learning stays in effect: the writer refuses."""
    first = make_bundle(tmp_path / "b")
    with first.new_version() as writer:
        writer.add_task(task("t0"))
    go = tmp_path / "go"
    proc = _racer(tmp_path / "b", "late", go, hold=0.0)
    done = subprocess.run([sys.executable, "-m", "edgeclip.edgeapp.cli.app", "rollback", "--bundle", str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    go.touch()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "v0001" in out and "Traceback" not in err
    assert Bundle.open(tmp_path / "b").version == "v0001"


def test_readers_never_block_on_a_writer(tmp_path: Path) -> None:
    first = make_bundle(tmp_path / "b")
    writer = first.new_version()  # holds the lock
    try:
        start = time.perf_counter()
        assert Bundle.open(tmp_path / "b").tensors("learned.safetensors")["w"].shape == (3, 4)
        assert time.perf_counter() - start < 1.0
    finally:
        writer.abort()


def test_a_second_writer_waits_then_refuses_a_held_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = make_bundle(tmp_path / "b")
    monkeypatch.setenv("EDGECLIP_LOCK_WAIT", "0.2")  # read when a writer waits, not at import
    holder = first.new_version()
    try:
        with pytest.raises(BundleError, match="Another edgeclip process"):
            first.new_version()
    finally:
        holder.abort()
    with first.new_version():  # free again
        pass


# --------------------------------------------------------------------------- containment

def _rewrite_manifest(bundle: Bundle, edit) -> None:
    path = bundle.dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _entry_for(path: Path) -> dict:
    import hashlib

    return {"blob": False, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "size": path.stat().st_size}


@pytest.mark.parametrize("name", ["../outside/secret.bin", "/etc/hostname", "graphs/../../outside/secret.bin",
                                  "graphs//g.onnx", ".hidden", "graphs/./g.onnx", "a\\b"])
def test_manifest_names_outside_the_bundle_are_refused_without_disclosure(tmp_path: Path, name: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.bin"
    secret.write_bytes(b"s" * 4321)
    bundle = make_bundle(tmp_path / "b")
    _rewrite_manifest(bundle, lambda m: m["files"].__setitem__(name, _entry_for(secret)))
    with pytest.raises(BundleError, match="invalid bundle file name") as err:
        Bundle.open(tmp_path / "b")
    assert "4321" not in str(err.value) and "secret" not in str(err.value).replace(name[:80], "")
    assert secret.read_bytes() == b"s" * 4321


def test_symlinks_and_special_files_in_a_bundle_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "g.bin").write_bytes(b"graph-v1")  # same content: its hash would match
    bundle = make_bundle(tmp_path / "b")
    target = bundle.dir / "graphs" / "g.bin"
    target.unlink()
    target.symlink_to(outside / "g.bin")
    with pytest.raises(BundleError, match="symlink") as err:
        Bundle.open(tmp_path / "b")
    assert str(outside) not in str(err.value)
    # a symlinked folder on the way
    target.unlink()
    (outside / "graphs").mkdir()
    (outside / "graphs" / "g.bin").write_bytes(b"graph-v1")
    os.rmdir(bundle.dir / "graphs")
    (bundle.dir / "graphs").symlink_to(outside / "graphs")
    with pytest.raises(BundleError, match="not a plain folder"):
        Bundle.open(tmp_path / "b")
    # a fifo where a file should be
    (bundle.dir / "graphs").unlink()
    (bundle.dir / "graphs").mkdir()
    os.mkfifo(bundle.dir / "graphs" / "g.bin")
    with pytest.raises(BundleError, match="not a regular file"):
        Bundle.open(tmp_path / "b")


def test_a_symlinked_lock_or_current_is_refused(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    elsewhere = tmp_path / "elsewhere.txt"
    (tmp_path / "b" / ".lock").unlink()
    (tmp_path / "b" / ".lock").symlink_to(elsewhere)
    with pytest.raises(BundleError, match="symlink"):
        bundle.new_version()
    with pytest.raises(BundleError, match="symlink"):
        rollback(tmp_path / "b", "v0001")
    assert not elsewhere.exists()
    (tmp_path / "b" / ".lock").unlink()
    (tmp_path / "b" / "CURRENT").unlink()
    secret = tmp_path / "secret.txt"
    secret.write_text("v0001-top-secret\n")
    (tmp_path / "b" / "CURRENT").symlink_to(secret)
    with pytest.raises(BundleError, match="CURRENT") as err:
        Bundle.open(tmp_path / "b")
    assert "top-secret" not in str(err.value)


PICKLE_MARKER = "pickle-ran"


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_named_like_a_tensor_file_is_never_unpickled(tmp_path: Path) -> None:
    import pickle

    bundle = make_bundle(tmp_path / "b")
    marker = tmp_path / PICKLE_MARKER
    tensors = bundle.dir / "learned.safetensors"
    tensors.unlink()
    tensors.write_bytes(pickle.dumps({"w": _Evil(str(marker))}))
    _rewrite_manifest(bundle, lambda m: m["files"].__setitem__("learned.safetensors", _entry_for(tensors)))
    with pytest.raises(BundleError, match="not a valid safetensors file"):
        Bundle.open(tmp_path / "b").tensors("learned.safetensors")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../x", "/abs", "graphs/../../x", "manifest.json", ".lock"])
def test_the_writer_refuses_names_outside_its_version(tmp_path: Path, name: str) -> None:
    bundle = make_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match="invalid bundle file name"):
        with bundle.new_version() as writer:
            writer.write_bytes(name, b"x")
    assert not (tmp_path / "x").exists() and Bundle.open(tmp_path / "b").version == "v0001"


# --------------------------------------------------------------------------- finite numbers

def test_writing_non_finite_tensors_is_refused(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    for bad in (np.nan, np.inf):
        with pytest.raises(BundleError, match="'w'.*non-finite"):
            with bundle.new_version() as writer:
                writer.write_tensors("learned.safetensors", {"w": np.array([[1.0, bad]], np.float32)})
    assert Bundle.open(tmp_path / "b").version == "v0001"


def test_loading_non_finite_tensors_names_file_and_tensor(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    bundle = make_bundle(tmp_path / "b")
    tensors = bundle.dir / "learned.safetensors"
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    values[1, 2] = np.nan
    tensors.unlink()
    save_file({"w": values}, str(tensors))
    _rewrite_manifest(bundle, lambda m: m["files"].__setitem__("learned.safetensors", _entry_for(tensors)))
    with pytest.raises(BundleError, match=r"'learned.safetensors'.*tensor 'w'.*non-finite"):
        Bundle.open(tmp_path / "b").tensors("learned.safetensors")


# --------------------------------------------------------------------------- fast open

@pytest.fixture
def count_hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import edgeclip.store.reader
    import edgeclip.store.writer

    seen: list[str] = []
    real = edgeclip.store.reader.sha256_of

    def counting(path: Path) -> str:
        seen.append(Path(path).name)
        return real(path)

    for module in (edgeclip.store.reader, edgeclip.store.writer):  # the readers' and the writer's hashing
        monkeypatch.setattr(module, "sha256_of", counting)
    return seen


def test_open_reads_no_content_and_stamps_skip_verified_files(tmp_path: Path, count_hashes: list[str]) -> None:
    make_bundle(tmp_path / "b")
    count_hashes.clear()
    bundle = Bundle.open(tmp_path / "b")
    assert count_hashes == []  # sizes only
    bundle.tensors("learned.safetensors")
    bundle.tensors("learned.safetensors")
    assert count_hashes == []  # the writer stamped what it hashed
    from edgeclip.bundle import stamps_path

    stamps_path(tmp_path / "b", "v0001").unlink()
    fresh = Bundle.open(tmp_path / "b")
    fresh.tensors("learned.safetensors")
    assert count_hashes == ["learned.safetensors"]  # only the file used, once
    Bundle.open(tmp_path / "b").tensors("learned.safetensors")
    assert count_hashes == ["learned.safetensors"]  # stamped now
    # the same size, new content: the stamp no longer matches, the hash catches it
    path = fresh.dir / "graphs" / "g.bin"
    path.write_bytes(b"graph-v9")
    with pytest.raises(BundleError, match="sha256"):
        Bundle.open(tmp_path / "b").path("graphs/g.bin")
    count_hashes.clear()
    with pytest.raises(BundleError, match="sha256"):
        Bundle.open(tmp_path / "b").verify()  # verify hashes everything, stamps or not
    assert set(count_hashes) <= {"learned.safetensors", "g.bin"} and "g.bin" in count_hashes


def test_a_new_version_does_not_rehash_inherited_files(tmp_path: Path, count_hashes: list[str]) -> None:
    first = make_bundle(tmp_path / "b")
    count_hashes.clear()
    with first.new_version() as writer:
        writer.write_bytes("notes.txt", b"new")
    assert count_hashes == ["notes.txt"]
    second = Bundle.open(tmp_path / "b")
    assert second.manifest["files"]["graphs/g.bin"] == first.manifest["files"]["graphs/g.bin"]
    second.verify()


def test_a_damaged_parent_file_is_not_laundered_into_a_new_version(tmp_path: Path) -> None:
    first = make_bundle(tmp_path / "b")
    (first.dir / "graphs" / "g.bin").write_bytes(b"graph-XX")
    with pytest.raises(BundleError, match="sha256"):
        Bundle.open(tmp_path / "b").new_version()
    assert list_versions(tmp_path / "b") == ["v0001"]


# --------------------------------------------------------------------------- init, failures, temporary files

INIT_KILLED = """
import sys, time, numpy as np
from edgeclip.bundle import create_bundle
sys.path.insert(0, sys.argv[2])
from test_bundle import BASE
writer = create_bundle(sys.argv[1], dict(BASE))
for i in range(30):
    writer.write_tensors(f"part{i}.safetensors", {"x": np.random.rand(100, 100)})
    if i == 3:
        print("writing", flush=True)
time.sleep(float(sys.argv[3]))
writer.commit()
print("committed", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("delay", [0.0, 5.0])
def test_an_interrupted_init_leaves_nothing_or_a_complete_bundle(tmp_path: Path, delay: float) -> None:
    root = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-c", INIT_KILLED, str(root), str(Path(__file__).parent), str(delay)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.05 if delay else 0.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if root.exists():
        assert len(Bundle.open(root).manifest["files"]) == 30
        return
    assert list(tmp_path.glob(".b.init-*"))  # the killed init's work folder, hidden beside the bundle
    with pytest.raises(BundleError, match="No bundle"):
        Bundle.open(root)
    make_bundle(root)  # re-running works, and removes the dead init's leftovers
    assert Bundle.open(root).version == "v0001" and not list(tmp_path.glob(".b.init-*"))


def test_init_into_an_empty_folder_and_refusals(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    make_bundle(tmp_path / "empty")
    assert Bundle.open(tmp_path / "empty").version == "v0001"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("mine")
    with pytest.raises(BundleError, match="not empty"):
        create_bundle(tmp_path / "full", dict(BASE))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BundleError, match="is a file"):
        create_bundle(tmp_path / "afile", dict(BASE))
    with pytest.raises(BundleError, match="is a file"):
        Bundle.open(tmp_path / "afile")


@pytest.mark.parametrize("code, words", [(28, "disk is full"), (30, "read-only"), (13, "permission denied")])
def test_disk_errors_while_writing_are_one_line_bundle_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              code: int, words: str) -> None:
    import safetensors.numpy

    first = make_bundle(tmp_path / "b")

    def failing(*_args: object, **_kwargs: object) -> None:
        raise OSError(code, os.strerror(code), str(tmp_path / "b" / "somewhere"))

    monkeypatch.setattr(safetensors.numpy, "save_file", failing)
    with pytest.raises(BundleError, match=words) as err:
        with first.new_version() as writer:
            writer.write_tensors("learned.safetensors", {"w": np.zeros(3, np.float32)})
    assert "\n" not in str(err.value) and "somewhere" not in str(err.value)
    assert Bundle.open(tmp_path / "b").version == "v0001" and not list((tmp_path / "b").glob(".staging-*"))


def test_temporary_files_are_removed_by_the_next_write(tmp_path: Path) -> None:
    first = make_bundle(tmp_path / "b")
    root = tmp_path / "b"
    old = time.time() - 3600
    from edgeclip.bundle import stamps_dir

    leftovers = [root / ".CURRENT.abc.tmp", stamps_dir() / ".v0001.abc.tmp"]
    for path in leftovers:
        path.write_text("x")
        os.utime(path, (old, old))
    (root / ".staging-dead").mkdir()
    (root / ".trash-dead").mkdir()
    with first.new_version():
        pass
    assert not any(p.exists() for p in leftovers + [root / ".staging-dead", root / ".trash-dead"])


# --------------------------------------------------------------------------- history and retention

def _grow(root: Path, names: list[str]) -> None:
    for name in names:
        with Bundle.open(root).new_version() as writer:
            writer.add_task(task(name))
            writer.write_tensors("learned.safetensors", {"w": np.full((3, 4), len(writer.meta.tasks), np.float32)})


def test_history_added_sizes_do_not_change_after_later_writes(tmp_path: Path) -> None:
    """'added' (what writing a version added: files not inherited from its parent) is fixed once the
    version is written; 'own' (what removing it frees) falls as later versions share its files."""
    from edgeclip.bundle import version_history

    root = tmp_path / "b"
    make_bundle(root)
    _grow(root, ["t1"])
    with Bundle.open(root).new_version() as writer:  # a file written once, then inherited by every later version
        writer.write_bytes("once.bin", b"x" * 5000)
    first = {r["version"]: r for r in version_history(root)}
    _grow(root, ["t2", "t3"])
    later = {r["version"]: r for r in version_history(root)}
    assert all(later[v]["added"] == first[v]["added"] for v in first)
    assert first["v0003"]["added"] >= 5000 and later["v0004"]["added"] < 5000  # v0004 inherits once.bin
    assert later["v0003"]["own"] < first["v0003"]["own"]  # shared now: removing v0003 frees less
    assert later["v0001"]["added"] == later["v0001"]["size"]  # the first version added all it holds


def test_history_rollback_to_and_prune(tmp_path: Path) -> None:
    from edgeclip.bundle import prune, version_history

    root = tmp_path / "b"
    make_bundle(root)
    _grow(root, ["t1", "t2", "t3"])
    history = version_history(root)
    assert [r["version"] for r in history] == ["v0001", "v0002", "v0003", "v0004"]
    assert history[-1]["tasks"] == ["t1", "t2", "t3"] and history[-1]["current"]
    assert history[1]["own"] > 0 and history[1]["size"] >= history[1]["own"]
    assert rollback(root, "v0002") == "v0002"
    with pytest.raises(BundleError, match="no complete version 'v0009'"):
        rollback(root, "v0009")
    with pytest.raises(BundleError, match="invalid version name"):
        rollback(root, "../v0001")
    from edgeclip.bundle import stamps_path

    first_stamps = stamps_path(root, "v0001")
    assert first_stamps.is_file()
    _grow(root, ["t2b"])  # v0005, parent v0002: v0003 and v0004 are off the current line
    assert prune(root, keep=2) == ["v0001"]  # the work a rollback left stays without include_newer
    assert list_versions(root) == ["v0002", "v0003", "v0004", "v0005"]
    assert prune(root, keep=2, include_newer=True) == ["v0003", "v0004"]
    assert list_versions(root) == ["v0002", "v0005"]
    bundle = Bundle.open(root)
    assert [t.name for t in bundle.tasks] == ["t1", "t2b"]
    bundle.verify()
    Bundle.open(root, "v0002").verify()
    assert not first_stamps.exists()


def test_retention_setting_prunes_after_each_write(tmp_path: Path) -> None:
    from edgeclip.bundle import set_retention

    root = tmp_path / "b"
    make_bundle(root)
    _grow(root, ["t1", "t2"])
    set_retention(root, 2)
    assert list_versions(root) == ["v0003", "v0004"]
    _grow(root, ["t3", "t4"])
    assert list_versions(root) == ["v0005", "v0006"]
    assert Bundle.open(root).meta.retention.keep == 2
    assert [t.name for t in Bundle.open(root).tasks] == ["t1", "t2", "t3", "t4"]


# --------------------------------------------------------------------------- the store commands

def _cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeclip.edgeapp.cli.app", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_store_commands_end_to_end(tmp_path: Path) -> None:
    root = tmp_path / "b"
    make_bundle(root)
    _grow(root, ["t1", "t2"])
    done = _cli("versions", "--bundle", root, "--format", "json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert [v["tasks"] for v in data["versions"]] == [[], ["t1"], ["t1", "t2"]] and data["size_on_disk"] > 0
    assert _cli("verify", "--bundle", root).returncode == 0
    assert _cli("rollback", "--bundle", root, "--to", "v0002").returncode == 0
    assert Bundle.open(root).version == "v0002"
    damaged = root / "versions" / "v0003" / "learned.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 1
    damaged.write_bytes(bytes(data))
    done = _cli("verify", "--bundle", root)
    assert done.returncode == 1 and "v0003" in done.stderr and "learned.safetensors" in done.stderr
    assert "Traceback" not in done.stderr
    done = _cli("prune", "--bundle", root, "--keep", "1", "--dry-run")
    assert done.returncode == 0 and "would remove 1 version(s) (v0001)" in done.stdout, done.stdout
    assert "kept v0003 (off the current line" in done.stdout and len(list_versions(root)) == 3
    done = _cli("prune", "--bundle", root, "--keep", "1", "--include-newer")
    assert done.returncode == 0 and "v0001, v0003" in done.stderr
    assert list_versions(root) == ["v0002"] and _cli("verify", "--bundle", root).returncode == 0


@pytest.mark.parametrize("case", ["file", "missing", "readonly"])
def test_store_failures_are_one_line_without_traceback(tmp_path: Path, case: str) -> None:
    root = tmp_path / "b"
    if case == "file":
        root.write_text("not a bundle")
        args: tuple = ("rollback", "--bundle", root)
        code = ""
    elif case == "missing":
        args = ("versions", "--bundle", root)
        code = ""
    else:  # EROFS on every write in the bundle (the tests may run as root, which ignores chmod)
        make_bundle(root)
        _grow(root, ["t1"])
        args = ("rollback", "--bundle", root)
        code = ("import errno, os\nreal = os.open\n"
                "def ro(path, flags, *a, **k):\n"
                f"    if str(path).startswith({str(root)!r}) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):\n"
                "        raise OSError(errno.EROFS, 'Read-only file system', str(path))\n"
                "    return real(path, flags, *a, **k)\n"
                "os.open = ro\n")
    script = code + f"import sys\nsys.argv = ['edgeclip'] + {[str(a) for a in args]!r}\n" \
                    "from edgeclip.edgeapp.cli.app import main\nmain()"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode in (1, 2), done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    if case == "readonly":
        assert "read-only" in done.stderr and Bundle.open(root).version == "v0002"


# --------------------------------------------------------------------------- the real CLI (slow: exports a tiny model)

@pytest.fixture(scope="module")
def tiny_cli_bundle(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("open_clip")
    from edgeclip.edgeapp.demo_data import write_demo_images

    base = tmp_path_factory.mktemp("store-cli")
    domains, query = write_demo_images(base / "images", train_per_class=6, query_per_class=1)
    root = base / "bundle"
    done = _cli("init", "--bundle", root, "--model", "edgeclip-tiny", "--random-weights", "--hidden", "256", "--quiet")
    assert done.returncode == 0, done.stderr
    return {"root": root, "domains": domains, "query": query}


@pytest.mark.slow
def test_init_keep_sets_the_retention(tiny_cli_bundle: dict, tmp_path: Path) -> None:
    root = tmp_path / "b"
    done = _cli("init", "--bundle", root, "--model", "edgeclip-tiny", "--random-weights", "--hidden", "64",
                "--keep", "2", "--quiet")
    assert done.returncode == 0, done.stderr
    for domain, name in zip(tiny_cli_bundle["domains"], ["a", "b"]):
        done = _cli("add-task", domain, "--bundle", root, "--name", name, "--quiet")
        assert done.returncode == 0, done.stderr
    assert list_versions(root) == ["v0002", "v0003"] and Bundle.open(root).meta.retention.keep == 2


def _fresh_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns(".lock", ".stamps"))
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("same_name", [False, True])
def test_two_concurrent_add_tasks_lose_nothing(tiny_cli_bundle: dict, tmp_path: Path, same_name: bool) -> None:
    root = _fresh_copy(tiny_cli_bundle["root"], tmp_path / "b")
    names = ["same", "same"] if same_name else ["one", "two"]
    procs = [subprocess.Popen([sys.executable, "-m", "edgeclip.edgeapp.cli.app", "add-task", str(domain),
                               "--bundle", str(root), "--name", name],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for domain, name in zip(tiny_cli_bundle["domains"], names)]
    results = [(proc, *proc.communicate(timeout=300)) for proc in procs]
    ok = [name for (proc, _out, _err), name in zip(results, names) if proc.returncode == 0]
    for proc, _out, err in results:
        assert "Traceback" not in err
        if proc.returncode != 0:
            assert proc.returncode == 1 and ("changed while" in err or "already learned" in err), err
    assert ok, [r[2] for r in results]
    learned = [t.name for t in Bundle.open(root).tasks]
    assert sorted(learned) == sorted(ok)  # every reported success is in the bundle, nothing else
    if same_name:
        assert learned == ["same"]


@pytest.mark.slow
def test_classify_refuses_non_finite_learned_tensors(tiny_cli_bundle: dict, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    root = _fresh_copy(tiny_cli_bundle["root"], tmp_path / "b")
    bundle = Bundle.open(root)
    path = bundle.dir / "rail_projection.safetensors"  # W_r, stored once (edgeclip.learned)
    arrays = load_file(str(path))
    arrays["rail.w_r"][0, 0] = np.nan
    path.unlink()  # this version's link only: the other versions keep theirs
    save_file(arrays, str(path))
    _rewrite_manifest(bundle, lambda m: m["files"].__setitem__(path.name, _entry_for(path)))
    done = _cli("add-task", tiny_cli_bundle["domains"][0], "--bundle", root)  # learning reads every tensor
    assert done.returncode == 1 and Bundle.open(root).version == bundle.version
    assert path.name in done.stderr and "rail.w_r" in done.stderr and "Traceback" not in done.stderr
    # classify reads only zs_text (its W_r is the graph's, checked when written): it still never prints NaN
    query = next(iter(sorted(tiny_cli_bundle["query"].iterdir())))
    done = _cli("classify", query, "--bundle", root, "--labels", "a cat,a dog", "--format", "json")
    assert done.returncode == 0 and "NaN" not in done.stdout and "Traceback" not in done.stderr


@pytest.mark.slow
def test_info_and_add_task_print_the_size_on_disk(tiny_cli_bundle: dict, tmp_path: Path) -> None:
    root = _fresh_copy(tiny_cli_bundle["root"], tmp_path / "b")
    done = _cli("add-task", tiny_cli_bundle["domains"][0], "--bundle", root)
    assert done.returncode == 0 and "size on disk" in done.stderr, done.stderr
    done = _cli("info", "--bundle", root)
    assert done.returncode == 0 and "size on disk" in done.stdout


def test_a_symlinked_version_folder_is_never_read(tmp_path: Path) -> None:
    from edgeclip.bundle import version_history

    make_bundle(tmp_path / "b")
    shutil.copytree(tmp_path / "b" / "versions" / "v0001", tmp_path / "outside")
    (tmp_path / "b" / "versions" / "v0002").symlink_to(tmp_path / "outside")
    with pytest.raises(BundleError, match="not a plain folder"):
        Bundle.open(tmp_path / "b", "v0002")
    with pytest.raises(BundleError, match="not a plain folder"):
        rollback(tmp_path / "b", "v0002")
    assert "not a plain folder" in version_history(tmp_path / "b")[-1]["error"]
