"""Store files on disk: names of the bundle's fixed entries, containment checks (``lstat`` before any
read: regular files reached through real folders), atomic writes, and one-line OS errors.

Every function here is torch-free and reads no file content except ``sha256_of``."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import os
import re
import shutil
import stat
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from edgeclip.errors import BundleError
from edgeclip.layout import GRAPHS_DIR

MANIFEST = "manifest.json"
CURRENT = "CURRENT"
LOCK = ".lock"
LAST_VERSION = "LAST_VERSION"  # the highest version name ever issued: names are never reused
_FINITE_CHUNK = 1 << 24  # elements checked at a time by the finiteness check
GRAPH_STORE = GRAPHS_DIR  # BUNDLE/graphs/: the shared, content-named graph store
STORED_RE = re.compile(r"^[0-9a-f]{64}\.(onnx|data)$")  # a file of the graph store
STORE_TMP = ".tmp-"  # prefix of a store file being written (removed by the next writer)


def utc_now() -> str:
    """The current UTC time as ISO 8601 text, to the second (manifest timestamps)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def link_or_copy(src: Path | str, dst: Path | str) -> None:
    """A hard link where the file system allows, a copy otherwise. Safe for bundle files: versions
    are immutable and every writer unlinks a file before writing it."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


# --------------------------------------------------------------------------- errors and containment

WRITE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
                 errno.EROFS: "it lies on a read-only file system", errno.EACCES: "permission denied",
                 errno.EPERM: "permission denied", errno.ENOTDIR: "a part of its path is a file, not a folder",
                 errno.EEXIST: "a file is in the way"}


def probe_writable(root: Path, action: str = "write") -> None:
    """Create and remove a small file in ``root`` so that a bundle that cannot be written (read-only
    file system, permissions) is refused before minutes of work, not after. Raises BundleError
    (`io_error`'s one line). A full disk may still be found later, when the large files are written."""
    probe = root / f".probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise io_error(root, action, exc) from None


def safetensors_os_error(exc: Exception) -> Exception:
    """The OSError inside a safetensors ``SafetensorError`` ("... I/O error: No space left on device (os
    error 28)"), so that a full disk while writing tensors is reported like any other write error; any
    other exception is returned as it is."""
    found = re.search(r"\(os error (\d+)\)", str(exc)) if type(exc).__name__ == "SafetensorError" else None
    if found is None:
        return exc
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


def io_error(root: Path, action: str, exc: OSError) -> BundleError:
    """One line for an OS error while using the bundle, without the path of the file involved."""
    reason = WRITE_ERRNOS.get(exc.errno or 0, exc.strerror or type(exc).__name__)
    return BundleError(f"Cannot {action} the bundle {root}: {reason}.")


@contextlib.contextmanager
def io_errors(root: Path, action: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise io_error(root, action, exc) from exc


def check_root(root: Path) -> None:
    """Refuse a bundle path that exists and is not a folder."""
    try:
        st = os.stat(root)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise io_error(root, "read", exc) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise BundleError(f"{root} is a file, not a bundle folder.")


def safe_lstat(base: Path, rel: str, root: Path, label: str) -> os.stat_result:
    """lstat of ``base/rel`` after checking that ``base`` and every folder on the way are real
    folders (not symlinks) and the file a regular file. Raises BundleError naming only ``label``."""
    missing = f"Bundle {root} {label}: file '{rel}' is missing."
    path = base
    for part in Path(rel).parts[:-1]:
        path = path / part
        st = _lstat(path, root, missing)
        if not stat.S_ISDIR(st.st_mode):
            raise BundleError(f"Bundle {root} {label}: '{rel}' lies in '{part}', which is not a plain folder "
                              "(a symlink or a file); refusing it.")
    st = _lstat(base / rel, root, missing)
    if not stat.S_ISREG(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise BundleError(f"Bundle {root} {label}: file '{rel}' is {kind}; refusing it.")
    return st


def _lstat(path: Path, root: Path, missing: str) -> os.stat_result:
    """os.lstat, with BundleError(``missing``) for an absent path and a one-line error for any other OS error."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        raise BundleError(missing) from None
    except OSError as exc:
        raise io_error(root, "read", exc) from exc


def check_dir(path: Path, root: Path, what: str) -> None:
    st = _lstat(path, root, f"Bundle {root}: {what} is missing.")
    if not stat.S_ISDIR(st.st_mode):
        raise BundleError(f"Bundle {root}: {what} is not a plain folder (a symlink or a file); refusing it.")


def check_finite_arrays(arrays: Mapping[str, np.ndarray], where: str) -> None:
    """BundleError naming the first tensor holding NaN or Inf (checked in chunks: no full-size copy)."""
    for key, value in arrays.items():
        arr = np.asarray(value)
        if arr.dtype.kind not in "fc":
            continue
        flat = arr.reshape(-1)
        for start in range(0, flat.size, _FINITE_CHUNK):
            if not np.isfinite(flat[start:start + _FINITE_CHUNK]).all():
                raise BundleError(f"{where}: tensor '{key}' holds non-finite values (NaN or Inf).")


def stored_path(root: Path, name: str, entry: Mapping[str, Any]) -> Path:
    """The graph-store file of a manifest entry with ``"blob": true``: ``root/graphs/<sha256><suffix>``.
    Raises BundleError for an entry that is not a store file (bad hash or suffix)."""
    stored = f"{entry.get('sha256')}{Path(name).suffix}"
    if not STORED_RE.match(stored):
        raise BundleError(f"Bundle {root}: file '{name}' is marked as a shared graph but '{stored}' is not a "
                          "graph-store name (<sha256>.onnx or <sha256>.data).")
    return Path(root) / GRAPH_STORE / stored


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a work file's owner: its leftovers are cleaned
    only once it is gone). A process of another user counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
