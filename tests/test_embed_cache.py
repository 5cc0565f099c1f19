"""The embedding cache (edgeapp/embed_cache.py) and the library path over it (edgeapp/library.py):
exact bytes back, file changes and damaged entries never trusted, a damaged database rebuilt, concurrent
and killed writers leaving a usable cache, the size bound; classify through the CLI gives the same rows
cached, fresh and --no-cache, before and after a RAIL add-task, with no encoder run on the cached runs."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgeclip.edgeapp.embed_cache import FILE_NAME, EmbeddingCache, FileId, backbone_key, cache_info, clear_cache
from edgeclip.manifest import Preprocess

CLI = Path(sys.executable).with_name("edgeclip")
DIM = 8


def _files(folder: Path, n: int) -> list[FileId]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = folder / f"{i}.bin"
        path.write_bytes(bytes([i % 256]) * (i + 1))
        fid = FileId.of(path)
        assert fid is not None
        out.append(fid)
    return out


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def test_entries_come_back_bit_exact_and_changed_files_miss(tmp_path: Path) -> None:
    ids = _files(tmp_path / "photos", 5)
    vec = _vectors(5)
    with EmbeddingCache("bb", DIM, tmp_path / "cache") as cache:
        assert cache.lookup(ids) == {}
        cache.store([(fid, v, "a note" if i == 2 else None) for i, (fid, v) in enumerate(zip(ids, vec))])
    with EmbeddingCache("bb", DIM, tmp_path / "cache") as cache:
        found = cache.lookup(ids)
        assert sorted(found) == list(range(5))
        assert all(found[i].vector.tobytes() == vec[i].tobytes() for i in range(5))
        assert found[2].note == "a note" and found[0].note is None
        assert EmbeddingCache("other backbone", DIM, tmp_path / "cache").lookup(ids) == {}
        assert cache.lookup(ids, kind="moe:x:0") == {}
    # a rewritten file (new mtime and size) and a replaced one (new inode) are encoded again
    path0, path1 = Path(os.fsdecode(ids[0].path)), Path(os.fsdecode(ids[1].path))
    path0.write_bytes(b"changed content")
    path1.unlink()
    path1.write_bytes(bytes([1]) * 2)
    os.utime(path1, ns=(ids[1].mtime_ns, ids[1].mtime_ns))  # same size and mtime, another inode
    now = [FileId.of(Path(os.fsdecode(f.path))) for f in ids]
    with EmbeddingCache("bb", DIM, tmp_path / "cache") as cache:
        assert sorted(cache.lookup(now)) == ([2, 3, 4] if now[1].ino != ids[1].ino else [1, 2, 3, 4])
    assert not list((tmp_path / "photos").glob("*.sqlite3*"))  # never inside the photo folder


def test_a_damaged_entry_is_ignored_and_a_damaged_database_is_rebuilt(tmp_path: Path, caplog) -> None:
    ids = _files(tmp_path / "photos", 3)
    cache_dir = tmp_path / "cache"
    with EmbeddingCache("bb", DIM, cache_dir) as cache:
        cache.store(zip(ids, _vectors(3), [None] * 3))
    db = sqlite3.connect(cache_dir / FILE_NAME)
    db.execute("UPDATE embeddings SET vector=? WHERE path=?", (_vectors(1, seed=9)[0].tobytes(), ids[1].path))
    db.commit()
    db.close()
    with EmbeddingCache("bb", DIM, cache_dir) as cache:
        assert sorted(cache.lookup(ids)) == [0, 2]  # the flipped vector fails its digest
    # garbage over the whole file: detected, rebuilt empty, and usable again
    for suffix in ("-wal", "-shm"):
        Path(f"{cache_dir / FILE_NAME}{suffix}").unlink(missing_ok=True)
    (cache_dir / FILE_NAME).write_bytes(b"this is not a database" * 500)
    with EmbeddingCache("bb", DIM, cache_dir) as cache:
        assert cache.lookup(ids) == {}
        assert cache.disabled is None
        cache.store(zip(ids, _vectors(3), [None] * 3))
        assert sorted(cache.lookup(ids)) == [0, 1, 2]
    assert "damaged" in caplog.text


def test_the_backbone_key_is_the_one_caches_were_made_with() -> None:
    """The key of a bundle's preprocessing (the schema's ``Preprocess``) is the same hex as the key the
    retired ``PreprocessConfig.to_dict`` gave (issue 19): users' caches stay valid across the change."""
    cfg = Preprocess(64, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    graphs = ["a" * 64, "b" * 64]
    assert backbone_key(graphs, cfg) == "889d9bcd179e962da52c0ed4ae8291fb2aafc396be5429389aba5435945c1b2c"
    assert backbone_key(graphs, cfg.with_exact(True)) == "e716f4562dfaece5d7727b2c6acdf70d597399f8e2f8b6572c636ee366305f45"


def test_an_unwritable_cache_turns_itself_off(tmp_path: Path) -> None:
    ids = _files(tmp_path / "photos", 2)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cache = EmbeddingCache("bb", DIM, blocker / "cache")
    assert cache.lookup(ids) == {}
    cache.store(zip(ids, _vectors(2), [None] * 2))  # no exception: the run goes on without a cache
    assert cache.disabled


def test_the_size_bound_evicts_the_least_recently_used(tmp_path: Path) -> None:
    ids = _files(tmp_path / "photos", 300)
    dim = 1024  # 4 KiB per entry: 300 entries are about 1.2 MiB, over a 0.5 MiB bound
    cache = EmbeddingCache("bb", dim, tmp_path / "cache", max_bytes=512 * 1024)
    vec = np.ones((300, dim), np.float32)
    for start in range(0, 300, 50):
        cache.store([(ids[i], vec[i], None) for i in range(start, start + 50)])
    left = cache.lookup(ids)
    assert 0 < len(left) < 300
    assert max(left) == 299 and min(left) > 0  # the newest stay, the oldest went
    cache.close()
    assert (tmp_path / "cache" / FILE_NAME).stat().st_size < 1024 * 1024
    info = cache_info(tmp_path / "cache")
    assert info.entries == len(left) and info.backbones == 1
    assert clear_cache(tmp_path / "cache") > 0 and cache_info(tmp_path / "cache").entries == 0


_WRITER = """
import sys, numpy as np
from pathlib import Path
from edgeclip.edgeapp.embed_cache import EmbeddingCache, FileId
folder, cache_dir, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
ids = [FileId.of(p) for p in sorted(folder.iterdir())]
cache = EmbeddingCache("bb", 256, cache_dir)
rng = np.random.default_rng(seed)
print("ready", flush=True)
while True:
    for start in range(0, len(ids), 20):
        chunk = ids[start:start + 20]
        cache.store([(f, rng.standard_normal(256).astype(np.float32), None) for f in chunk])
        assert len(cache.lookup(chunk)) == len(chunk), cache.disabled
"""


def test_concurrent_and_killed_writers_leave_a_usable_cache(tmp_path: Path) -> None:
    ids = _files(tmp_path / "photos", 200)
    cache_dir = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / "photos"), str(cache_dir), str(seed)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(2.0)  # both write and read concurrently meanwhile
        for proc in procs:
            assert proc.poll() is None, proc.stderr.read()  # no writer failed on a lock
            proc.send_signal(signal.SIGKILL)  # killed in the middle of their transactions
            proc.wait()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    db = sqlite3.connect(cache_dir / FILE_NAME)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    with EmbeddingCache("bb", 256, cache_dir) as cache:
        found = cache.lookup(ids)  # every entry present passes its digest: none torn
        assert len(found) > 0 and cache.disabled is None
        cache.store([(ids[0], np.zeros(256, np.float32), None)])
        assert cache.lookup(ids[:1])[0].vector.tobytes() == np.zeros(256, np.float32).tobytes()


# -- classify through the cache ----------------------------------------------------------------------
def _classify(bundle: Path, query: Path, env: dict[str, str], *extra: str) -> tuple[list[dict], str]:
    result = subprocess.run([str(CLI), "classify", str(query), "--bundle", str(bundle), "--format", "json",
                             "--top-k", "3", *extra], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 3, result.stderr[-2000:]  # the broken file, every time (errors are not cached)
    return [json.loads(line) for line in result.stdout.splitlines()], result.stderr


@pytest.mark.slow
def test_classify_cached_equals_fresh_before_and_after_add_task(make_tiny_bundle, tmp_path: Path) -> None:
    from edgeclip.edgeapp.demo_data import write_demo_images

    bundle = make_tiny_bundle(tmp_path / "bundle")
    domains, query = write_demo_images(tmp_path / "images", train_per_class=6, query_per_class=3)
    (query / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    env = {**os.environ, "EDGECLIP_CACHE_DIR": str(tmp_path / "cache")}
    subprocess.run([str(CLI), "add-task", str(domains[0]), "--bundle", str(bundle), "--quiet"], env=env, check=True,
                   capture_output=True, timeout=300)

    def run(*extra: str) -> tuple[list[dict], str]:
        rows, err = _classify(bundle, query, env, *extra)
        return rows, err

    first, err1 = run()
    assert "0 embeddings from the cache" in err1 and [r["path"] for r in first if r["error"]] == [str(query / "broken.png")]
    cached, err2 = run()
    assert cached == first
    assert " 0 encoded" in err2 and f"{len(first) - 1} embeddings from the cache" in err2
    fresh, err3 = run("--no-cache")
    assert fresh == first and "0 embeddings from the cache" in err3
    # a new task: the cached photos are re-labelled from their embeddings, no encoder run
    subprocess.run([str(CLI), "add-task", str(domains[1]), "--bundle", str(bundle), "--quiet"], env=env, check=True,
                   capture_output=True, timeout=300)
    after, err4 = run()
    assert " 0 encoded" in err4
    fresh_after, _ = run("--no-cache")
    assert after == fresh_after
    assert {r["route"] for r in after} != {r["route"] for r in first}  # the second task is routed to now
    info = subprocess.run([str(CLI), "cache", "info"], capture_output=True, text=True, env=env, timeout=120)
    assert info.returncode == 0 and f"entries: {len(first) - 1} (1 backbone(s))" in info.stdout, info.stdout
    assert str(tmp_path / "cache") in info.stdout and "512 MiB" in info.stdout
    cleared = subprocess.run([str(CLI), "cache", "clear"], capture_output=True, text=True, env=env, timeout=120)
    assert cleared.returncode == 0 and "cleared" in cleared.stdout
    assert not (tmp_path / "cache" / FILE_NAME).exists()


@pytest.mark.slow
def test_moe_reclassification_recomputes_only_the_adapted_encoder(make_tiny_bundle, tmp_path: Path) -> None:
    """MoE: the frozen embedding, gate and zero-shot rows come from the cache; routed images need the adapted
    encoder, cached per MoE graph: a second run computes nothing, a run after add-task recomputes only the
    adapted embeddings. Rows equal --no-cache runs, and the gated graph's (in-memory images) within 1e-4."""
    from PIL import Image

    import edgeclip
    from edgeclip.edgeapp.demo_data import write_demo_images

    bundle = make_tiny_bundle(tmp_path / "bundle", method="moe", labels=("cat", "dog"))
    domains, query = write_demo_images(tmp_path / "images", train_per_class=6, query_per_class=3)
    (query / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    env = {**os.environ, "EDGECLIP_CACHE_DIR": str(tmp_path / "cache")}

    def learn(domain: Path) -> None:  # in this process: torch is imported once
        edgeclip.load(bundle).add_task(None, domain, iterations=2)

    learn(domains[0])
    first, err1 = _classify(bundle, query, env)
    routed = sum(1 for r in first if r["route"] not in (None, "zero-shot"))
    assert routed and f"MoE adapted encoder: {routed} run, 0 from the cache" in err1
    cached, err2 = _classify(bundle, query, env)
    assert cached == first and " 0 encoded; MoE adapted encoder: 0 run" in err2
    learn(domains[1])
    after, err3 = _classify(bundle, query, env)
    routed = sum(1 for r in after if r["route"] not in (None, "zero-shot"))
    assert " 0 encoded" in err3 and f"MoE adapted encoder: {routed} run, 0 from the cache" in err3
    assert _classify(bundle, query, env, "--no-cache")[0] == after
    # the numpy MoE scoring from embeddings agrees with the exported gated graph
    files = sorted(p for p in query.glob("*.png") if p.name != "broken.png")
    clf = edgeclip.load(bundle)
    by_file = clf.classify(files, top_k=3)
    by_graph = clf.classify([Image.open(p).convert("RGB") for p in files], top_k=3)
    for a, b in zip(by_file, by_graph):
        assert (a.route, a.label) == (b.route, b.label)
        assert abs(a.score - b.score) < 1e-4
