"""History and retention: ``rollback`` (switch CURRENT to an earlier version), ``prune`` (remove
versions beyond the retention and the graph-store files nobody refers to), ``set_retention``,
``version_history`` and sizes on disk."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import uuid
from pathlib import Path
from typing import Any

from edgeclip.errors import BundleError
from edgeclip.manifest import check_version_name
from edgeclip.store.fs import CURRENT, GRAPH_STORE, STORED_RE, io_errors, stored_path, write_atomic_text
from edgeclip.store.lock import writer_lock
from edgeclip.store.reader import Bundle, current_version, list_versions, read_manifest
from edgeclip.store.stamps import stamps_path


def rollback(root: Path | str, to: str | None = None) -> str:
    """Make an earlier version current (the parent of the current one unless ``to`` is given).
    Holds the writer lock; a writer that started from the version replaced here will refuse at its
    commit. Raises BundleError."""
    root = Path(root)
    now = current_version(root)
    with writer_lock(root):
        now = current_version(root)
        if to is None:
            parent = read_manifest(root, now)[0].get("parent")
            if not parent:
                raise BundleError(f"Version {now} of {root} is the first one; there is nothing to roll back to.")
            to = parent
        check_version_name(to)
        if to not in list_versions(root):
            raise BundleError(f"Bundle {root} has no complete version '{to}'. Versions: {', '.join(list_versions(root))}")
        Bundle.open(root, to).validate()  # refuse to switch to a damaged version
        with io_errors(root, "write"):
            write_atomic_text(root / CURRENT, to + "\n")
    return to


# --------------------------------------------------------------------------- history, retention, size


def _lineage(root: Path, start: str, limit: int) -> list[str]:
    """``start`` and its ancestors, newest first, at most ``limit``."""
    chain, name = [], start
    while name and len(chain) < limit and name not in chain:
        chain.append(name)
        try:
            name = read_manifest(root, name)[0].get("parent")
        except BundleError:
            break
    return chain


def prune_locked(root: Path, keep: int) -> list[str]:
    kept = set(_lineage(root, current_version(root), max(1, keep)))
    removed = []
    for name in list_versions(root):
        if name in kept:
            continue
        stamps = stamps_path(root, name)
        trash = root / f".trash-{uuid.uuid4().hex[:12]}"
        os.rename(root / "versions" / name, trash)  # atomic: readers see the version whole or not at all
        shutil.rmtree(trash, ignore_errors=True)
        if stamps is not None:
            with contextlib.suppress(OSError):
                stamps.unlink()
        removed.append(name)
    if removed:
        _collect_graph_store(root)
    return removed


def _collect_graph_store(root: Path) -> list[str]:
    """Remove graph-store files no remaining version refers to (under the writer lock: no writer is
    adding files, and every kept version's files stay). Returns the removed file names."""
    referenced = set()
    for name in list_versions(root):
        manifest = read_manifest(root, name)[0]
        referenced |= {stored_path(root, f, e).name for f, e in manifest["files"].items() if e.get("blob")}
    store = root / GRAPH_STORE
    removed = []
    if store.is_dir() and not store.is_symlink():
        for path in store.iterdir():
            if STORED_RE.match(path.name) and path.name not in referenced:
                path.unlink()
                removed.append(path.name)
    return removed


def prune(root: Path | str, keep: int | None = None) -> list[str]:
    """Remove every version except the current one and its ``keep - 1`` nearest ancestors (``keep``
    default: the manifest's ``retention.keep``, else 1). Versions off the current line (left behind
    by a rollback) are removed too. Returns the removed names, oldest first. Raises BundleError."""
    root = Path(root)
    if keep is None:
        keep = Bundle.open(root, verify_hashes=False).meta.retention.keep or 1
    if keep < 1:
        raise BundleError("--keep must be at least 1 (the current version is always kept).")
    current_version(root)  # a bundle is there (never create a folder by locking it)
    with writer_lock(root), io_errors(root, "prune"):
        return prune_locked(root, keep)


def disk_usage(root: Path | str) -> int:
    """Bytes the bundle folder takes on disk (allocated blocks, each hard-linked file counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(folder, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def version_history(root: Path | str) -> list[dict[str, Any]]:
    """One record per complete version, oldest first: ``version``, ``parent``, ``created_at``,
    ``tasks`` (names), ``current`` (bool), ``size`` (bytes of its files), ``added`` (bytes of the files
    it did not inherit from its parent: what writing it added, unchanged by later writes; when the parent
    was pruned, from the older versions that remain) and ``own`` (bytes of the files no other version
    shares with it: what removing it frees now, which later versions sharing its files lower).
    Damaged versions get ``error``."""
    root = Path(root)
    now = current_version(root)
    records, owners = [], {}
    for name in list_versions(root):
        record: dict[str, Any] = {"version": name, "current": name == now}
        try:
            manifest, meta = read_manifest(root, name)
        except BundleError as exc:
            record["error"] = str(exc)
            records.append(record)
            continue
        inodes = set()
        for fname, entry in manifest["files"].items():
            with contextlib.suppress(OSError, BundleError):
                path = stored_path(root, fname, entry) if entry.get("blob") else root / "versions" / name / fname
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode):
                    inodes.add((st.st_ino, st.st_size))
        for key in inodes:
            owners.setdefault(key, set()).add(name)
        record.update(parent=manifest.get("parent"), created_at=manifest.get("created_at"),
                      tasks=[t.name for t in meta.tasks],
                      size=sum(e.get("size", 0) for e in manifest["files"].values()), _inodes=inodes)
        records.append(record)
    by_name = {r["version"]: r.get("_inodes", set()) for r in records}
    for i, record in enumerate(records):
        inodes = record.pop("_inodes", set())
        record["own"] = sum(size for key in inodes for size in [key[1]] if owners[key] == {record["version"]})
        if "error" in record:
            continue
        parent = record.get("parent")
        before = (by_name[parent] if parent in by_name else
                  set().union(*(by_name[r["version"]] for r in records[:i])))
        record["added"] = sum(key[1] for key in inodes if key not in before)
    return records


def set_retention(root: Path | str, keep: int) -> Bundle:
    """Record ``keep`` (0: keep all) as the bundle's retention setting, in a new version with the
    same files (hard links, hashes reused), then prune to it. Returns the new current version."""
    if keep < 0:
        raise BundleError("--keep must be 0 (keep all) or more.")
    bundle = Bundle.open(root)
    with bundle.new_version() as writer:
        writer.set_retention(keep)
    return writer.bundle


def format_size(n_bytes: int) -> str:
    """Bytes as text for reports: ``12.3 MB`` (decimal units)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"
