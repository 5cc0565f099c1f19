"""The embedding cache: frozen CLIP image embeddings of files, kept between runs (SQLite, torch-free).

The frozen embedding of a photo never changes when a task is learned, so ``classify`` and
``search`` encode a file once and read its embedding back on later runs (docs/CACHE.md).

- Where: ``$EDGECLIP_CACHE_DIR``, else the user's cache folder (platformdirs:
  ``~/.cache/edgeclip`` on Linux), file ``embeddings.sqlite3``; never inside a photo folder.
- Key: the backbone's identity (``backbone_key``: the image graph's sha256 and the preprocessing),
  the kind of embedding (``FROZEN``, or an MoE task's adapted encoder), and the file's path; an
  entry is used only while the file's identity (device, inode, size, mtime in ns) is unchanged.
- Values: the float32 bytes exactly as the encoder gave them, with a BLAKE2b digest over the key
  and the bytes: an entry whose digest does not match is never used (it is replaced).
- Safety: WAL journal, one short transaction per batch (a killed run leaves whole entries or
  none), a busy timeout for concurrent runs. A cache SQLite reports damaged is deleted and made
  anew (a warning); a cache that cannot be written (read-only, full disk) is skipped with one
  warning: classification never fails because of the cache.
- Bound: ``$EDGECLIP_CACHE_MAX_MB`` (default 512 MiB, about 200,000 photos at D=512); beyond it
  the least recently used entries are evicted down to 90% of the bound.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from edgeclip.manifest import Preprocess

log = logging.getLogger(__name__)

CACHE_ENV = "EDGECLIP_CACHE_DIR"
MAX_MB_ENV = "EDGECLIP_CACHE_MAX_MB"
DEFAULT_MAX_MB = 512
FILE_NAME = "embeddings.sqlite3"
SCHEMA = 1
FROZEN = "frozen"  # the plain frozen image encoder's embedding
_BUSY_MS = 15_000
_SQL_CHUNK = 500  # variables per IN (...) query (SQLite allows 32766; small keeps statements cheap)

_CREATE = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS embeddings (
    backbone TEXT NOT NULL,
    kind TEXT NOT NULL,
    path BLOB NOT NULL,
    dev INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    vector BLOB NOT NULL,
    note TEXT,
    digest BLOB NOT NULL,
    used REAL NOT NULL,
    PRIMARY KEY (backbone, kind, path)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS embeddings_used ON embeddings (used);
"""


def default_cache_dir() -> Path:
    """``$EDGECLIP_CACHE_DIR``, else the user cache folder of platformdirs (``~/.cache/edgeclip`` on Linux)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("edgeclip", appauthor=False))


def default_max_bytes() -> int:
    """The size bound: ``$EDGECLIP_CACHE_MAX_MB`` MiB (default 512)."""
    try:
        mb = float(os.environ.get(MAX_MB_ENV, DEFAULT_MAX_MB))
    except ValueError:
        mb = DEFAULT_MAX_MB
    return max(1, int(mb * 1024 * 1024))


def backbone_key(graph_sha256: Sequence[str], preprocess: Preprocess) -> str:
    """The backbone's identity: sha256 over the image graph's file hashes (graph and weights) and the
    preprocessing (image size, mean, std, interpolation, resize mode; ``exact`` only when set, so keys
    made before that field existed stay the same). Hex string."""
    identity = msgspec.structs.asdict(preprocess)
    if not preprocess.exact:
        del identity["exact"]
    text = json.dumps({"graph": list(graph_sha256), "preprocess": identity}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class FileId:
    """A file's identity: its path (bytes) and what ``stat`` says of its content."""

    path: bytes
    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | Path) -> FileId | None:
        """The identity of ``path`` now (absolute, symlinks followed), or None when it cannot be stat'ed."""
        try:
            absolute = os.path.abspath(os.fspath(path))
            st = os.stat(absolute)
        except (OSError, ValueError):
            return None
        return cls(os.fsencode(absolute), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class Entry:
    """A cached embedding: ``vector`` [D] float32 exactly as stored, and the decoder's note (or None)."""

    vector: np.ndarray
    note: str | None


def _digest(backbone: str, kind: str, fid: FileId, vector: bytes, note: str | None) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for part in (backbone.encode(), kind.encode(), fid.path,
                 f"{fid.dev}:{fid.ino}:{fid.size}:{fid.mtime_ns}".encode(), vector, (note or "").encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


@dataclass
class CacheInfo:
    """What ``edgeclip cache info`` prints."""

    path: Path
    exists: bool
    entries: int
    backbones: int
    bytes: int
    max_bytes: int


class EmbeddingCache:
    """The embedding cache of one backbone (``backbone``: ``backbone_key``) and embedding size ``dim``.

    ``lookup(ids, kind)`` -> {index: Entry} for the entries still valid; ``store(items, kind)`` writes
    (FileId, [D] float32, note) entries in one transaction. Both never raise for cache trouble: a damaged
    database is rebuilt, one that cannot be written is turned off for the rest of the run (one warning).
    """

    def __init__(self, backbone: str, dim: int, folder: Path | None = None, max_bytes: int | None = None) -> None:
        self.backbone, self.dim = backbone, int(dim)
        self.folder = Path(folder) if folder is not None else default_cache_dir()
        self.path = self.folder / FILE_NAME
        self.max_bytes = max_bytes or default_max_bytes()
        self.disabled: str | None = None  # why the cache is off for this run
        self.hits = self.misses = self.stored = 0
        self._db: sqlite3.Connection | None = None

    # -- connection -------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        self.folder.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=_BUSY_MS / 1000, isolation_level=None, check_same_thread=False)
        try:
            db.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # before the first table: space can be given back
                db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: a power cut may lose the last batches, never tear one
            db.executescript(_CREATE)
            row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA),))
            elif row[0] != str(SCHEMA):
                raise sqlite3.DatabaseError(f"cache schema {row[0]}, expected {SCHEMA}")
        except BaseException:
            db.close()
            raise
        self._db = db
        return db

    def _rebuild(self, why: str) -> None:
        """Delete a damaged database (and its WAL) and start an empty one."""
        log.warning("the embedding cache %s was damaged (%s): rebuilt empty", self.path, why)
        self.close()
        for suffix in ("", "-wal", "-shm", "-journal"):
            try:
                os.unlink(f"{self.path}{suffix}")
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._disable(f"cannot remove the damaged cache: {exc.strerror or exc}")
                return

    def _disable(self, why: str) -> None:
        if self.disabled is None:
            self.disabled = why
            log.warning("embedding cache off for this run: %s (%s)", why, self.path)
        self.close()

    def _guarded(self, work: Any, default: Any) -> Any:
        """Run ``work(db)``; a damaged database is rebuilt and the work tried once more; other
        trouble (locked past the timeout, read-only, full disk) turns the cache off."""
        for attempt in (0, 1):
            if self.disabled is not None:
                return default
            try:
                return work(self._connect())
            except sqlite3.DatabaseError as exc:
                text = str(exc).lower()
                damaged = type(exc) is sqlite3.DatabaseError or any(
                    word in text for word in ("malformed", "not a database", "schema", "no such"))
                if damaged and attempt == 0:
                    self._rebuild(str(exc))
                    continue
                self._disable(str(exc))
            except OSError as exc:
                self._disable(exc.strerror or str(exc))
        return default

    def close(self) -> None:
        """Close the connection (the data stays)."""
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None

    # -- entries ----------------------------------------------------------------------------------
    def lookup(self, ids: Sequence[FileId | None], kind: str = FROZEN) -> dict[int, Entry]:
        """The valid entries among ``ids`` (index into ``ids`` -> Entry). An entry is valid when the file's
        identity matches, the vector has ``dim`` float32 values and the digest matches its key and bytes."""
        wanted = {fid.path: i for i, fid in enumerate(ids) if fid is not None}
        if not wanted:
            return {}

        def work(db: sqlite3.Connection) -> dict[int, Entry]:
            found: dict[int, Entry] = {}
            paths = list(wanted)
            for start in range(0, len(paths), _SQL_CHUNK):
                chunk = paths[start:start + _SQL_CHUNK]
                rows = db.execute(
                    "SELECT path, dev, ino, size, mtime_ns, vector, note, digest FROM embeddings "
                    f"WHERE backbone=? AND kind=? AND path IN ({','.join('?' * len(chunk))})",
                    [self.backbone, kind, *chunk]).fetchall()
                for path, dev, ino, size, mtime_ns, vector, note, digest in rows:
                    i = wanted.get(bytes(path))
                    if i is None:
                        continue
                    fid = ids[i]
                    assert fid is not None
                    if (dev, ino, size, mtime_ns) != (fid.dev, fid.ino, fid.size, fid.mtime_ns):
                        continue  # the file changed: encode it again
                    if len(vector) != 4 * self.dim or digest != _digest(self.backbone, kind, fid, vector, note):
                        log.warning("embedding cache: a damaged entry was ignored (it will be replaced)")
                        continue
                    found[i] = Entry(np.frombuffer(vector, dtype="<f4").astype(np.float32), note)
            if found:
                now = time.time()
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.executemany("UPDATE embeddings SET used=? WHERE backbone=? AND kind=? AND path=?",
                                   [(now, self.backbone, kind, ids[i].path) for i in found])  # type: ignore[union-attr]
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            return found

        found = self._guarded(work, {})
        self.hits += len(found)
        self.misses += len(wanted) - len(found)
        return found

    def store(self, items: Iterable[tuple[FileId, np.ndarray, str | None]], kind: str = FROZEN) -> None:
        """Write entries (FileId, vector [D] float32, note) in one transaction, then keep the size bound."""
        rows = []
        now = time.time()
        for fid, vector, note in items:
            data = np.ascontiguousarray(vector, dtype="<f4").tobytes()
            if len(data) != 4 * self.dim:
                raise ValueError(f"an embedding of {len(data) // 4} values, expected {self.dim}")
            rows.append((self.backbone, kind, fid.path, fid.dev, fid.ino, fid.size, fid.mtime_ns, data, note,
                         _digest(self.backbone, kind, fid, data, note), now))
        if not rows:
            return

        def work(db: sqlite3.Connection) -> bool:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT OR REPLACE INTO embeddings VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._bound(db)
            return True

        if self._guarded(work, False):
            self.stored += len(rows)

    def _bound(self, db: sqlite3.Connection) -> None:
        """Evict the least recently used entries while the data pages exceed the bound."""
        page = db.execute("PRAGMA page_size").fetchone()[0]
        used = (db.execute("PRAGMA page_count").fetchone()[0] - db.execute("PRAGMA freelist_count").fetchone()[0]) * page
        if used <= self.max_bytes:
            return
        total = db.execute("SELECT count(*) FROM embeddings").fetchone()[0]
        if not total:
            return
        drop = max(1, int(total * (1 - 0.9 * self.max_bytes / used)))
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM embeddings WHERE (backbone, kind, path) IN "
                       "(SELECT backbone, kind, path FROM embeddings ORDER BY used LIMIT ?)", (drop,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("PRAGMA incremental_vacuum")
        log.info("embedding cache: %d least recently used entries evicted (bound %d MiB)", drop,
                 self.max_bytes // (1024 * 1024))

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cache_info(folder: Path | None = None) -> CacheInfo:
    """Entries, backbones and bytes on disk of the cache in ``folder`` (default: ``default_cache_dir``).
    A damaged cache reports what its files take and 0 entries."""
    folder = Path(folder) if folder is not None else default_cache_dir()
    path = folder / FILE_NAME
    size = sum(os.path.getsize(f"{path}{s}") for s in ("", "-wal", "-shm") if os.path.exists(f"{path}{s}"))
    entries = backbones = 0
    if path.exists():
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=_BUSY_MS / 1000)
            try:
                entries = db.execute("SELECT count(*) FROM embeddings").fetchone()[0]
                backbones = db.execute("SELECT count(DISTINCT backbone) FROM embeddings").fetchone()[0]
            finally:
                db.close()
        except sqlite3.Error:
            pass
    return CacheInfo(path, path.exists(), entries, backbones, size, default_max_bytes())


def clear_cache(folder: Path | None = None) -> int:
    """Delete the cache's files; returns the bytes freed. Runs still holding it open keep writing to
    the removed file, which disappears when they end."""
    info = cache_info(folder)
    for suffix in ("", "-wal", "-shm", "-journal"):
        try:
            os.unlink(f"{info.path}{suffix}")
        except FileNotFoundError:
            pass
    return info.bytes
