"""History and retention: ``rollback`` (switch CURRENT to an earlier version), ``prune`` (remove
versions beyond the retention and the graph-store files nobody refers to), ``set_retention``,
``version_history`` and sizes on disk."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeclip.errors import BundleError
from edgeclip.manifest import check_version_name
from edgeclip.store.fs import CURRENT, GRAPH_STORE, STORED_RE, io_errors, stored_path, write_atomic_text
from edgeclip.store.lease import in_use, removal_lock
from edgeclip.store.lock import clean_temporary, writer_lock
from edgeclip.store.reader import Bundle, current_version, list_versions, manifest_identity, read_manifest
from edgeclip.store.stamps import stamps_path


def rollback(root: Path | str, to: str | None = None, expect: Bundle | None = None) -> str:
    """Make an earlier version current (the parent of the current one unless ``to`` is given).
    Holds the writer lock; a writer that started from the version replaced here will refuse at its
    commit. ``expect``: the version the caller read (``Classifier.rollback``); refuses when CURRENT is
    no longer that very version (compared by manifest identity), so a stale object never undoes
    another process's work, and ``to`` defaults to ``expect``'s parent. Raises BundleError."""
    root = Path(root)
    now = current_version(root)
    with writer_lock(root):
        now = current_version(root)
        if expect is not None:
            moved = now != expect.version
            if not moved and expect.identity:
                moved = manifest_identity(root, now) != expect.identity
            if moved:
                raise BundleError(f"The bundle {root} changed since version {expect.version} was read: {now} is "
                                  "current now. Nothing was rolled back; reload and decide again.")
        if to is None:
            parent = read_manifest(root, now)[0].get("parent")
            if not parent:
                raise BundleError(f"Version {now} of {root} is the first one; there is nothing to roll back to.")
            to = parent
        check_version_name(to)
        if to not in list_versions(root):
            raise BundleError(f"Bundle {root} has no complete version '{to}'. Versions: {', '.join(list_versions(root))}")
        target = Bundle.open(root, to)
        try:
            target.validate()  # refuse to switch to a damaged version
        finally:
            target.release()
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


def intact(root: Path, version: str) -> bool:
    """Whether ``rollback`` would accept ``version``: its manifest valid and every file a regular file
    of the recorded size and sha256 (stamps honoured: the store's rule for files in use)."""
    try:
        bundle = Bundle.open(root, version)
    except BundleError:
        return False
    try:
        bundle.validate()
        return True
    except BundleError:
        return False
    finally:
        bundle.release()


@dataclass
class PrunePlan:
    """What a prune removes and what it keeps beyond the retention, and why (``plan_prune``).

    ``remove``: versions to remove, oldest first; ``kept``: version -> reason, for versions kept although
    the retention alone would remove them; ``removed``: filled by ``execute_prune``."""

    current: str
    keep: int
    remove: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)

    def summary(self, done: bool) -> str:
        """One line: what goes (or went) and what stays beyond the retention, and why."""
        gone = self.removed if done else self.remove
        text = f"{'removed' if done else 'would remove'} {len(gone)} version(s)"
        text += f" ({', '.join(gone)})" if gone else ""
        if self.kept:
            text += "; kept " + ", ".join(f"{name} ({why})" for name, why in sorted(self.kept.items()))
        return text


NEWER = "off the current line: work a rollback left; --include-newer removes it"
IN_USE = "in use by a reader"
ROLLBACK_TARGET = "the newest intact version: the current one is damaged"


def plan_prune(root: Path, keep: int, include_newer: bool = False) -> PrunePlan:
    """Decide a prune without changing anything. Kept: the current version and its ``keep - 1`` nearest
    ancestors; versions off the current line (work a rollback left: not an ancestor of the current
    version, newer than its oldest ancestor on disk) unless ``include_newer``; the
    newest intact version when no kept version is intact (a prune never leaves the bundle without a
    version to roll back to); versions a reader holds (``edgeclip.store.lease``). Raises BundleError."""
    current = current_version(root)
    plan = PrunePlan(current=current, keep=keep)
    line = _lineage(root, current, len(list_versions(root)) + 1)  # the current version and its ancestors on disk
    oldest = min(int(name[1:]) for name in line)
    for name in list_versions(root):
        if name in line[:max(1, keep)]:
            continue
        if name not in line and int(name[1:]) > oldest and not include_newer:  # names are issued in order
            plan.kept[name] = NEWER
        else:
            plan.remove.append(name)
    staying = [name for name in reversed(list_versions(root)) if name not in plan.remove]
    if not any(intact(root, name) for name in staying):
        rescue = next((name for name in reversed(plan.remove) if intact(root, name)), None)
        if rescue is not None:
            plan.remove.remove(rescue)
            plan.kept[rescue] = ROLLBACK_TARGET
    for name in list(plan.remove):
        if in_use(root / "versions" / name):
            plan.remove.remove(name)
            plan.kept[name] = IN_USE
    return plan


def execute_prune(root: Path, plan: PrunePlan) -> PrunePlan:
    """Remove the plan's versions (under the writer lock), each renamed to ``.trash-*`` first (atomic for
    readers) while holding its removal lock; a version a reader took meanwhile is kept. Then removes the
    graph-store files no remaining version refers to. Returns ``plan`` with ``removed`` filled."""
    for name in plan.remove:
        folder = root / "versions" / name
        stamps = stamps_path(root, name)
        trash = root / f".trash-{uuid.uuid4().hex[:12]}"
        with removal_lock(folder) as free:
            if not free:
                plan.kept[name] = IN_USE
                continue
            os.rename(folder, trash)  # atomic: readers see the version whole or not at all
        shutil.rmtree(trash, ignore_errors=True)
        if stamps is not None:
            with contextlib.suppress(OSError):
                stamps.unlink()
        plan.removed.append(name)
    if plan.removed:
        _collect_graph_store(root)
    return plan


def prune_locked(root: Path, keep: int, include_newer: bool = False) -> list[str]:
    """Plan and execute a prune; the caller holds the writer lock. Returns the removed names."""
    return execute_prune(root, plan_prune(root, keep, include_newer)).removed


def _collect_graph_store(root: Path) -> list[str]:
    """Remove graph-store files no remaining version refers to (under the writer lock: no writer is
    adding files, and every kept version's files stay). Nothing is removed while any remaining version's
    manifest cannot be read (its graphs are unknown). Returns the removed file names."""
    referenced = set()
    for name in list_versions(root):
        try:
            manifest = read_manifest(root, name)[0]
            referenced |= {stored_path(root, f, e).name for f, e in manifest["files"].items() if e.get("blob")}
        except BundleError:
            return []
    store = root / GRAPH_STORE
    removed = []
    if store.is_dir() and not store.is_symlink():
        for path in store.iterdir():
            if STORED_RE.match(path.name) and path.name not in referenced:
                path.unlink()
                removed.append(path.name)
    return removed


def _retention_keep(root: Path, keep: int | None) -> int:
    if keep is None:
        bundle = Bundle.open(root, verify_hashes=False)
        keep = bundle.meta.retention.keep or 1
        bundle.release()
    if keep < 1:
        raise BundleError("--keep must be at least 1 (the current version is always kept).")
    return keep


def run_prune(root: Path | str, keep: int | None = None, include_newer: bool = False,
              dry_run: bool = False) -> PrunePlan:
    """Plan a prune (``plan_prune``; ``keep`` default: the manifest's ``retention.keep``, else 1) and,
    unless ``dry_run``, execute it under the writer lock, after removing what a killed prune or writer
    left (``.trash-*``, ``.staging-*``). Returns the plan, ``removed`` filled. Raises BundleError."""
    root = Path(root)
    keep = _retention_keep(root, keep)
    current_version(root)  # a bundle is there (never create a folder by locking it)
    if dry_run:
        return plan_prune(root, keep, include_newer)
    with writer_lock(root), io_errors(root, "prune"):
        clean_temporary(root)
        return execute_prune(root, plan_prune(root, keep, include_newer))


def prune(root: Path | str, keep: int | None = None, include_newer: bool = False) -> list[str]:
    """Remove every version except the current one and its ``keep - 1`` nearest ancestors (``keep``
    default: the manifest's ``retention.keep``, else 1), keeping versions off the current line (work a
    rollback left, unless ``include_newer``), the newest intact version when the current one is damaged, and versions
    in use by a reader (``plan_prune``). Returns the removed names, oldest first. Raises BundleError."""
    return run_prune(root, keep, include_newer).removed


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
            if not os.path.lexists(root / "versions" / name):
                continue  # pruned meanwhile: gone, not damaged
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
