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
from edgeclip.manifest import Task

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
            writer.add_task(Task(name=name, classes=[f"{name}-a", f"{name}-b"], threshold=1.0))
            writer.write_tensors("learned.safetensors",
                                 {"w": np.full((3, 4), len(writer.meta.tasks), np.float32)})
        parent = None


def task_names(root: Path) -> list[str]:
    bundle = Bundle.open(root)
    try:
        return [t.name for t in bundle.tasks]
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
    assert bundle.version == "v0003" and [t.name for t in bundle.tasks] == ["t1", "t2"]


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


# --------------------------------------------------------------------------- 7. graphs read only listed files

def small_graph(folder: Path, name: str = "g") -> Path:
    """A real ONNX graph (y = x + w) whose weight w lies in the external file ``<name>.data``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(64, dtype=np.float32), "w")
    node = helper.make_node("Add", ["x", "w"], ["y"])
    graph = helper.make_graph([node], name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])], [weight])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.onnx"
    onnx.save_model(helper.make_model(graph), str(path), save_as_external_data=True, location=f"{name}.data",
                    size_threshold=0)
    return path


def graph_bundle(tmp_path: Path) -> Path:
    root = tmp_path / "b"
    with create_bundle(root, dict(BASE)) as writer:
        writer.write_tensors("learned.safetensors", {"w": np.zeros((3, 4), np.float32)})
        writer.write_graph("graphs/g.onnx", small_graph(tmp_path / "src"))
    return root


def test_a_graph_may_read_only_weight_files_its_version_lists(tmp_path: Path) -> None:
    from edgeclip.bundle import verify_bundle

    root = graph_bundle(tmp_path)
    Bundle.open(root).verify()
    assert Bundle.open(root).path("graphs/g.onnx").is_file()
    with Bundle.open(root).new_version() as writer:  # a version whose graph reads a file it does not list
        writer.remove("graphs/g.data")
    with pytest.raises(BundleError, match="not a file of this version"):
        Bundle.open(root).path("graphs/g.onnx")
    assert [name for name, _ in verify_bundle(root)] == ["v0002"]


def test_a_hard_linked_store_file_is_refused_by_verify_and_load(tmp_path: Path) -> None:
    from edgeclip.bundle import verify_bundle

    root = graph_bundle(tmp_path)
    data = Bundle.open(root).path("graphs/g.data")
    os.link(data, tmp_path / "twin")  # another name for the same file, outside the bundle
    problems = verify_bundle(root)
    assert len(problems) == 1 and "hard links" in problems[0][1]
    with pytest.raises(BundleError, match="hard links"):
        Bundle.open(root).path("graphs/g.onnx")
    (tmp_path / "twin").unlink()
    assert verify_bundle(root) == []


# --------------------------------------------------------------------------- real bundles (slow: a tiny exported model)

@pytest.fixture(scope="module")
def demo_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    from edgeclip.edgeapp.demo_data import write_demo_images

    return write_demo_images(tmp_path_factory.mktemp("demo") / "images", train_per_class=4, query_per_class=1)


def _add_task_cli(root: Path, domain: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeclip.edgeapp.cli.app", "add-task", str(domain), "--bundle",
                           str(root), "--name", name, "--quiet"], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_long_running_classifier_survives_keep_1_and_its_stale_rollback_refuses(
        make_tiny_bundle, demo_images: tuple[list[Path], Path], tmp_path: Path) -> None:
    import edgeclip

    domains, query = demo_images
    root = make_tiny_bundle(tmp_path / "b", labels=("a red square", "a blue circle"))
    set_retention(root, 1)
    clf = edgeclip.load(root)
    before = [(p.path, p.label, p.score) for p in clf.classify([query])]
    assert before and all(label for _, label, _ in before)
    done = _add_task_cli(root, domains[0], "one")  # another process learns; retention keeps 1
    assert done.returncode == 0, done.stderr
    after = [(p.path, p.label, p.score) for p in clf.classify([query])]
    assert after == before  # its own version, whole: no error rows, no mix with the new one
    with pytest.raises(BundleError, match="changed since version"):
        clf.rollback()  # would undo "one" (another process's work)
    assert [t.name for t in Bundle.open(root).tasks] == ["one"]
    held = clf.version
    assert held in list_versions(root)
    del clf
    import gc

    gc.collect()
    assert held in prune(root, keep=1)


CONCURRENT_WORKER = r'''
import json, sys, time, traceback
from pathlib import Path
import edgeclip
from edgeclip.bundle import Bundle, prune, rollback, verify_bundle
from edgeclip.errors import BundleError

role, root, out, flag_dir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
domains, query = [Path(p) for p in json.loads(sys.argv[5])], Path(sys.argv[6])
log = {"role": role, "ok": 0, "refused": 0, "failures": [], "learned": []}

def writers_done():
    return len(list(flag_dir.glob("done-*"))) >= 2

def rows_ok(preds):
    bad = [p.error for p in preds if p.error]
    if bad or not preds:
        raise AssertionError(f"error rows: {bad[:2]}")

try:
    if role.startswith("add"):
        for r in range(2):
            domain, name = domains[r % len(domains)], f"{role}-{r}"
            try:
                edgeclip.load(root).add_task(name, domain)
                log["learned"].append(name); log["ok"] += 1
            except BundleError as exc:
                if "changed while" not in str(exc) and "Another edgeclip process" not in str(exc):
                    raise
                log["refused"] += 1
        (flag_dir / f"done-{role}").touch()
    else:
        reader = edgeclip.load(root) if role == "reader" else None
        rounds = 0
        while rounds < 2 or (not writers_done() and rounds < 200):
            rounds += 1
            try:
                if role == "reader":
                    rows_ok(reader.classify([query]))
                elif role == "classify":
                    rows_ok(edgeclip.load(root).classify([query]))
                elif role == "verify":
                    problems = verify_bundle(root)
                    if problems:
                        raise AssertionError(f"verify: {problems}")
                elif role == "prune":
                    prune(root, keep=1 + rounds % 2)
                    time.sleep(0.1)
                elif role == "rollback":
                    time.sleep(0.5)
                    rollback(root)
                log["ok"] += 1
            except BundleError as exc:
                text = str(exc)
                expected = ("Another edgeclip process", "first one", "no complete version")
                if role in ("rollback", "prune") and any(w in text for w in expected):
                    log["refused"] += 1
                else:
                    raise
except Exception:
    log["failures"].append(traceback.format_exc(limit=3)[-600:])
out.write_text(json.dumps(log))
'''


@pytest.mark.slow
def test_eight_processes_with_retention_lose_nothing_and_never_fail_a_reader(
        make_tiny_bundle, demo_images: tuple[list[Path], Path], tmp_path: Path) -> None:
    """add-task x2, rollback, prune, classify (API, fresh each round), the real CLI classify, verify and a
    long-running reader, all at once on one bundle with retention (keep 2; prunes to 1 and 2), until both
    writers finished 2 rounds each: no finished task lost, no reader or verify failure."""
    import json

    domains, query = demo_images
    root = make_tiny_bundle(tmp_path / "b", labels=("a red square", "a blue circle"))
    set_retention(root, 2)  # the parent stays: rollbacks happen too
    script, flags = tmp_path / "worker.py", tmp_path / "flags"
    script.write_text(CONCURRENT_WORKER)
    flags.mkdir()
    roles = ["add-a", "add-b", "rollback", "prune", "classify", "verify", "reader"]
    procs = {role: subprocess.Popen([sys.executable, str(script), role, str(root), str(tmp_path / f"{role}.json"),
                                     str(flags), json.dumps([str(d) for d in domains]), str(query)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for role in roles}
    cli_runs = []
    while not all(proc.poll() is not None for proc in procs.values()) and len(cli_runs) < 20:  # the 8th: real CLI
        done = subprocess.run([sys.executable, "-m", "edgeclip.edgeapp.cli.app", "classify", str(query), "--bundle",
                               str(root), "--format", "json"], capture_output=True, text=True, timeout=300)
        cli_runs.append(done)
    logs = {}
    for role, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        logs[role] = json.loads((tmp_path / f"{role}.json").read_text())
    print({role: (log["ok"], log["refused"]) for role, log in logs.items()}, "cli classify runs:", len(cli_runs))
    failures = {role: log["failures"] for role, log in logs.items() if log["failures"]}
    assert not failures, failures
    for done in cli_runs:
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    learned = logs["add-a"]["learned"] + logs["add-b"]["learned"]
    assert learned and all(log["ok"] > 0 for log in logs.values() if log["role"] in ("classify", "reader", "verify"))
    on_disk = set()
    for name in list_versions(root):
        bundle = Bundle.open(root, name)
        on_disk |= {t.name for t in bundle.tasks}
        bundle.release()
    assert set(learned) <= on_disk  # every finished task is still in some version (a rollback only undoes)
    from edgeclip.bundle import verify_bundle

    assert verify_bundle(root) == []


def test_a_new_version_keeps_the_stamps_of_the_shared_graphs_its_parent_verified(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Retention checks that the current version is intact after every write: a graph the parent's
    reader already verified is not hashed again (a gigabyte of weights on an edge device)."""
    import edgeclip.store.reader as reader_module

    root = graph_bundle(tmp_path)
    parent = Bundle.open(root)
    parent.path("graphs/g.onnx"), parent.path("graphs/g.data")  # a reader used (and stamped) the graph
    parent.release()
    hashed: list[str] = []
    real = reader_module.sha256_of
    monkeypatch.setattr(reader_module, "sha256_of", lambda path: hashed.append(Path(path).name) or real(path))
    set_retention(root, 1)  # a write, then retention checks the new version is intact
    bundle = Bundle.open(root)
    bundle.path("graphs/g.onnx"), bundle.path("graphs/g.data")
    assert hashed == [] and list_versions(root) == [bundle.version]


def test_a_file_system_without_flock_opens_and_prunes_without_leases(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import fcntl

    import edgeclip.store.lease as lease_module

    def no_locks(_fd: int, _op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    root = make(tmp_path / "b", ["t1"])
    monkeypatch.setattr(lease_module, "fcntl", type("NoFlock", (), {"flock": staticmethod(no_locks),
                                                                    "LOCK_SH": fcntl.LOCK_SH, "LOCK_EX": fcntl.LOCK_EX,
                                                                    "LOCK_NB": fcntl.LOCK_NB}))
    reader = Bundle.open(root)
    assert reader.tensors("learned.safetensors")["w"][0, 0] == 1
    grow(root, ["t2"])
    assert prune(root, keep=1) == ["v0001", "v0002"]


def test_a_writers_parent_kept_by_the_retention_stays_leased(tmp_path: Path) -> None:
    root = make(tmp_path / "b", ["t1"])
    set_retention(root, 2)
    parent = Bundle.open(root)
    grow(root, ["t2"], parent=parent)  # retention keep 2 keeps the parent: its object holds its lease again
    assert parent.version in list_versions(root)
    assert plan_prune(root, 1).kept == {parent.version: "in use by a reader"}
    assert parent.tensors("learned.safetensors")["w"][0, 0] == 1
