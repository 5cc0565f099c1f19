"""The store under retention (issue 20): version names never reused, a compare-and-swap on the parent
manifest's identity, prunes that never destroy the way back, readers and verify that survive prunes,
and a stale rollback that refuses. Races are driven deterministically: a "slow writer" is a Bundle
opened before the other commands run, exactly what add-task holds while it learns."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeclip.bundle import Bundle, create_bundle, list_versions, plan_prune, prune, rollback, set_retention
from edgeclip.errors import BundleError

BASE = {"backbone": {"model": "m", "weights": {"kind": "random", "ref": "0"}},
        "preprocess": {"image_size": 8, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        "method": {"name": "rail-primal"}}


@pytest.fixture(autouse=True)
def own_stamp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGECLIP_STAMPS_DIR", str(tmp_path / "stamps"))


def make(root: Path, tasks: list[str] = ()) -> Path:
    """A bundle v0001 (no task), then one version per task name, each with its own learned tensors."""
    with create_bundle(root, dict(BASE)) as writer:
        writer.write_tensors("learned.safetensors", {"w": np.zeros((3, 4), np.float32)})
    grow(root, list(tasks))
    return root


def grow(root: Path, names: list[str], parent: Bundle | None = None) -> None:
    for name in names:
        with (parent or Bundle.open(root)).new_version() as writer:
            writer.manifest["tasks"].append({"name": name, "classes": [f"{name}-a", f"{name}-b"], "threshold": 1.0})
            writer.write_tensors("learned.safetensors",
                                 {"w": np.full((3, 4), len(writer.manifest["tasks"]), np.float32)})
        parent = None


def task_names(root: Path) -> list[str]:
    bundle = Bundle.open(root)
    try:
        return [t["name"] for t in bundle.tasks]
    finally:
        bundle.release()


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- 1. ids and compare-and-swap

def test_version_names_are_never_reused_after_a_prune(tmp_path: Path) -> None:
    root = make(tmp_path / "b", ["t1", "t2"])  # v0001..v0003
    rollback(root, "v0002")
    assert prune(root, keep=1, include_newer=True) == ["v0001", "v0003"]
    grow(root, ["t3"])
    assert list_versions(root) == ["v0002", "v0004"]  # never a second "v0003"


def test_the_reused_id_race_loses_no_finished_task(tmp_path: Path) -> None:
    """add-task A read v0003 and is slow; meanwhile rollback, prune --keep 1 and add-task D run.
    A must refuse at its commit, and D's task stays."""
    root = make(tmp_path / "b", ["t1", "t2"])
    slow_a = Bundle.open(root)  # A has read its parent (v0003) and is still learning
    rollback(root, "v0002")
    prune(root, keep=1, include_newer=True)
    grow(root, ["d"])  # D
    with pytest.raises(BundleError, match="changed while this command ran"):
        grow(root, ["a"], parent=slow_a)
    assert task_names(root) == ["t1", "d"]
    assert slow_a.tensors("learned.safetensors")["w"][0, 0] == 2  # A's parent stayed readable throughout


def test_the_compare_and_swap_compares_the_parent_manifest_not_its_name(tmp_path: Path) -> None:
    """Even where a name repeats (a bundle whose high-water mark was lost), a writer whose parent was
    replaced by another version of the same name refuses."""
    root = make(tmp_path / "b", ["t1", "t2"])
    slow_a = Bundle.open(root)
    slow_a.release()  # A read its parent and let go of it (e.g. an older edgeclip held no lease)
    rollback(root, "v0002")
    prune(root, keep=1, include_newer=True)
    (root / "LAST_VERSION").unlink()
    grow(root, ["d"])
    assert Bundle.open(root).version == "v0003"  # the name came back ...
    with pytest.raises(BundleError, match="changed while this command ran"):
        grow(root, ["a"], parent=slow_a)  # ... but not the version A started from
    assert task_names(root) == ["t1", "d"]


# --------------------------------------------------------------------------- 2. prune keeps the way back

def test_prune_keeps_work_a_rollback_left_unless_asked(tmp_path: Path) -> None:
    root = make(tmp_path / "b", ["t1", "t2", "t3", "t4", "t5"])  # v0001..v0006
    rollback(root, "v0004")
    plan = plan_prune(root, keep=3)
    assert plan.remove == ["v0001"] and set(plan.kept) == {"v0005", "v0006"}
    assert list_versions(root) == [f"v000{i}" for i in range(1, 7)]  # planning changes nothing
    assert prune(root, keep=3) == ["v0001"]
    assert prune(root, keep=3, include_newer=True) == ["v0005", "v0006"]
    assert list_versions(root) == ["v0002", "v0003", "v0004"]


def test_retention_after_add_task_keeps_work_a_rollback_left(tmp_path: Path) -> None:
    root = make(tmp_path / "b", ["t1", "t2"])
    set_retention(root, 2)  # v0004, prunes to v0003, v0004
    grow(root, ["t3"])  # v0005
    rollback(root, "v0004")
    grow(root, ["t3b"])  # v0006 from v0004: retention keeps v0005 (off the current line)
    assert list_versions(root) == ["v0004", "v0005", "v0006"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove", "manifest"])
def test_prune_after_damage_to_the_current_version_keeps_an_intact_one(tmp_path: Path, damage: str) -> None:
    root = make(tmp_path / "b", ["t1", "t2"])
    current = root / "versions" / "v0003"
    if damage == "flip":
        flip_a_byte(current / "learned.safetensors")
    elif damage == "truncate":
        (current / "learned.safetensors").write_bytes(b"")
    elif damage == "remove":
        (current / "learned.safetensors").unlink()
    else:
        (current / "manifest.json").write_text("{", encoding="utf-8")
    if damage != "manifest":
        with pytest.raises(BundleError):
            Bundle.open(root).validate()
    removed = prune(root, keep=1)
    assert "v0002" not in removed and "v0002" in list_versions(root)
    assert rollback(root, "v0002") == "v0002"
    Bundle.open(root).verify()


def test_prune_cleans_what_a_killed_prune_left(tmp_path: Path) -> None:
    root = make(tmp_path / "b", ["t1"])
    trash = root / ".trash-0123456789ab"
    (trash / "sub").mkdir(parents=True)
    (trash / "sub" / "file").write_bytes(b"x")
    prune(root, keep=5)
    assert not trash.exists()


# --------------------------------------------------------------------------- 3. readers survive retention

def test_a_version_a_reader_holds_is_kept_until_it_lets_go(tmp_path: Path) -> None:
    root = make(tmp_path / "b", ["t1"])
    set_retention(root, 1)
    reader = Bundle.open(root)  # v0003
    grow(root, ["t2", "t3"])  # retention keep 1 after each
    assert reader.tensors("learned.safetensors")["w"][0, 0] == 1  # still whole
    assert "v0003" in list_versions(root) and plan_prune(root, 1).kept == {"v0003": "in use by a reader"}
    reader.release()
    assert prune(root, keep=1) == ["v0003"]


def test_a_killed_reader_does_not_hold_a_version_for_ever(tmp_path: Path) -> None:
    root = make(tmp_path / "b", ["t1"])
    code = ("import sys; from edgeclip.bundle import Bundle; b = Bundle.open(sys.argv[1]); "
            "print(b.version, flush=True); sys.stdin.read()")
    reader = subprocess.Popen([sys.executable, "-c", code, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert reader.stdout.readline().strip() == "v0002"
        grow(root, ["t2"])
        assert prune(root, keep=1) == ["v0001"]  # v0002 is held by the other process
        os.kill(reader.pid, signal.SIGKILL)
        reader.wait(timeout=30)
        assert prune(root, keep=1) == ["v0002"]
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()


def test_opening_the_current_version_reads_current_again_when_its_version_vanished(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader read CURRENT (v0002), then a writer switched to v0003 and pruned v0002 before the reader
    took its lease: the reader opens v0003, whole."""
    import edgeclip.store.reader as reader_module

    root = make(tmp_path / "b", ["t1", "t2"])
    prune(root, keep=1)
    real, calls = reader_module.current_version, []

    def stale_then_real(path: Path) -> str:
        calls.append(path)
        return "v0002" if len(calls) == 1 else real(path)

    monkeypatch.setattr(reader_module, "current_version", stale_then_real)
    bundle = Bundle.open(root)
    assert bundle.version == "v0003" and [t["name"] for t in bundle.tasks] == ["t1", "t2"]


# --------------------------------------------------------------------------- 4. verify under a prune

def test_verify_skips_a_version_pruned_while_it_ran(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edgeclip.store.verify as verify_module
    from edgeclip.bundle import verify_bundle

    root = make(tmp_path / "b", ["t1", "t2"])
    listed = list_versions(root)  # verify listed the versions, then a prune removed two
    monkeypatch.setattr(verify_module, "list_versions", lambda _root: listed)
    prune(root, keep=1)
    assert verify_bundle(root) == []
    flip_a_byte(root / "versions" / "v0003" / "learned.safetensors")
    assert [name for name, _ in verify_bundle(root)] == ["v0003"]  # real damage is still reported


# --------------------------------------------------------------------------- 5. a stale rollback

def test_a_stale_rollback_refuses_and_changes_nothing(tmp_path: Path) -> None:
    root = make(tmp_path / "b", ["t1"])
    stale = Bundle.open(root)  # v0002
    grow(root, ["t2", "t3"])  # another process: v0003, v0004
    with pytest.raises(BundleError, match="changed since version v0002 was read"):
        rollback(root, expect=stale)
    assert Bundle.open(root).version == "v0004"
    fresh = Bundle.open(root)
    assert rollback(root, expect=fresh) == "v0003"  # the parent of the version it read
