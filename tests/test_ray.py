"""The Ray path (edgeclip.distributed, `edgeclip classify --ray`) on the session's local Ray (`ray_cluster`:
`ray.init(num_cpus=2)`): the same rows as the single process on real images and broken files, a worker
killed mid-job loses and duplicates no row, Ctrl-C and --resume behave as without Ray."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import bundle, entry_code, images, invoke  # noqa: F401  (fixtures)

pytest.importorskip("ray")
pytest.importorskip("open_clip")

# Two actors of half a CPU each leave one of the cluster's two CPUs to the decoding tasks.
TWO_ACTORS = ["--actors", "2", "--cpus-per-actor", "0.5"]


@pytest.fixture(scope="module")
def photos(extract_subset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real images of three sets, broken files, and a file name that is not UTF-8."""
    root = tmp_path_factory.mktemp("ray-photos")
    for name, classes, n in (("cifar10", ["cat", "ship"], 8), ("dtd10", None, 1), ("caltech101", ["airplane"], 4)):
        source = extract_subset(name, "test", classes, n)
        for folder in sorted((source / "test").iterdir()):
            shutil.copytree(folder, root / name / folder.name)
    real = sorted(p for p in root.rglob("*") if p.is_file())
    broken = root / "broken"
    broken.mkdir()
    (broken / "empty.jpg").write_bytes(b"")
    (broken / "text.png").write_text("not an image")
    data = real[0].read_bytes()
    (broken / "truncated.jpg").write_bytes(data[: len(data) // 3])
    shutil.copy(real[1], os.fsencode(broken) + b"/caf\xe9.jpg")
    return root


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()]


def assert_same_rows(single: list[dict], ray_rows: list[dict]) -> None:
    assert [r["path"] for r in ray_rows] == [r["path"] for r in single]
    for a, b in zip(single, ray_rows):
        assert (a["label"], a["task"], a["route"], a["error"], a["note"]) == \
               (b["label"], b["task"], b["route"], b["error"], b["note"]), a["path"]
        if a["error"] is None:
            assert abs(a["score"] - b["score"]) <= 1e-5
            assert [t["label"] for t in a["topk"]] == [t["label"] for t in b["topk"]]
            assert max(abs(x["score"] - y["score"]) for x, y in zip(a["topk"], b["topk"])) <= 1e-5


def test_ray_local_gives_the_single_process_rows(ray_cluster, bundle: Path, photos: Path, tmp_path: Path) -> None:
    single, on_ray = tmp_path / "single.jsonl", tmp_path / "ray.jsonl"
    args = ["classify", photos, "--bundle", bundle, "--format", "json", "--top-k", "3", "--batch-size", "8", "-q"]
    first = invoke(*args, "-o", single)
    second = invoke(*args, "-o", on_ray, "--ray", "local:2", *TWO_ACTORS)
    assert first.exit_code == second.exit_code == 3  # broken files: exit 3, the rest classified
    expected, got = rows_of(single), rows_of(on_ray)
    assert len(expected) == 30 + 4 and sum(r["error"] is not None for r in expected) == 3
    assert {r["route"] for r in expected if r["route"]} - {"zero-shot"}, "no image was routed to a task"
    assert any(os.fsencode(r["path"]).endswith(b"/caf\xe9.jpg") for r in got)  # exact non-UTF-8 name
    assert_same_rows(expected, got)



def test_the_api_returns_a_dataset_of_rows(ray_cluster, bundle: Path, photos: Path) -> None:
    import edgeclip
    from edgeclip.discover import display_path

    ds = edgeclip.distributed.classify_dataset([photos / "broken", photos / "cifar10"], bundle, top_k=2,
                                               batch_size=8, embeddings=True)
    rows = ds.take_all()
    assert {"path", "label", "task", "score", "route", "topk", "error", "note", "embedding"} <= set(rows[0])
    local = edgeclip.load(bundle).classify([photos / "broken", photos / "cifar10"], top_k=2)
    assert [r["path"] for r in rows] == [display_path(p.path) for p in local]  # bytes not UTF-8 shown as \xNN
    assert [r["label"] for r in rows] == [p.label for p in local]
    assert [r["error"] is None for r in rows] == [p.error is None for p in local]
    assert all(len(r["embedding"]) == 64 for r in rows if r["error"] is None)
    # a Dataset of paths as the source
    paths = ray_cluster.data.from_items([{"path": str(p)} for p in sorted((photos / "cifar10").rglob("*.*"))])
    again = edgeclip.distributed.classify_dataset(paths, bundle, top_k=2, batch_size=8).take_all()
    assert [r["label"] for r in again] == [r["label"] for r in rows if "cifar10" in r["path"]]


def _actor_processes() -> list[int]:
    """The gated-graph actors of this test process's own Ray (children of its raylet): nothing else."""
    me, parents, names = os.getpid(), {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                names[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes()
            except (OSError, ValueError, IndexError):
                continue
    raylets = {pid for pid, parent in parents.items() if parent == me and b"raylet" in names[pid]}
    return [pid for pid, parent in parents.items()
            if parent in raylets and names[pid].startswith(b"ray::MapWorker(MapBatches(BoundClassifier))")]


def test_a_worker_killed_mid_job_loses_and_duplicates_no_row(ray_cluster, bundle: Path, photos: Path,
                                                              tmp_path: Path) -> None:
    from edgeclip.bundle import Bundle
    from edgeclip.edgeapp.classify import build_label_space
    from edgeclip.edgeapp.distributed import RaySession
    from edgeclip.edgeapp.runtime import TextEncoderRunner

    real = sorted((photos / "cifar10").rglob("*.*"))
    many = tmp_path / "many"
    many.mkdir()
    files = []
    for i in range(240):  # hard links: many files, little disk
        files.append(many / f"{i:04d}.jpg")
        os.link(real[i % len(real)], files[-1])
    opened = Bundle.open(bundle)
    space = build_label_space(opened, [], TextEncoderRunner(opened, "ort-cpu").class_embeddings)
    session = RaySession.start(None, None)  # the session's Ray
    batches = session.classify(files, opened, space, batch_size=4, actors=2, cpus_per_actor=0.5)
    got = list(next(batches))
    actors = []
    deadline = time.time() + 60
    while len(actors) < 2 and time.time() < deadline:
        got += next(batches)
        actors = _actor_processes()
    assert actors, "no actor process found"
    os.kill(actors[0], signal.SIGKILL)
    before = len(got)
    for preds in batches:
        got += preds
    assert before < len(files), "the job was done before the kill"
    assert [p.path for p in got] == [os.fspath(f) for f in files]  # none lost, none twice, in order
    assert all(p.error is None for p in got)


def test_ctrl_c_then_resume_on_ray(ray_cluster, bundle: Path, photos: Path, tmp_path: Path) -> None:
    """A real SIGINT to a CLI connected to a cluster by its address (the session's Ray: no start-up to wait
    for): rows so far kept, exit 130, one line; --resume adds exactly the rest."""
    real = sorted((photos / "cifar10").rglob("*.*"))
    many = tmp_path / "many"
    many.mkdir()
    for i in range(400):
        os.link(real[i % len(real)], many / f"{i:04d}.jpg")
    out = tmp_path / "out.jsonl"
    address = ray_cluster.get_runtime_context().gcs_address
    cmd = ["classify", str(many), "--bundle", str(bundle), "--format", "json", "--batch-size", "2", "-o", str(out),
           "--ray", address, *TWO_ACTORS]
    proc = subprocess.Popen([sys.executable, "-c", entry_code(cmd)], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while (not out.exists() or out.stat().st_size == 0) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    rows = rows_of(out)
    assert proc.returncode == 130, err
    assert 0 < len(rows) < 400
    assert err.strip().splitlines()[-1] == f"interrupted after {len(rows)} of 400 images; results so far in {out}", err
    with open(out, "a", encoding="utf-8") as f:
        f.write('{"path": "torn by a kil')  # a killed writer's last line
    resume = cmd[:6] + cmd[8:10]  # without --batch-size 2 and --ray ADDRESS ...
    result = invoke(*resume, "--ray", "local", "--resume", "-q")
    assert result.exit_code == 0, result.output
    paths = [r["path"] for r in rows_of(out)]
    assert sorted(paths) == sorted(str(p) for p in many.iterdir()) and len(set(paths)) == 400
