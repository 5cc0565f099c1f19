"""The writers' lock (``BUNDLE/.lock``, an advisory flock) and the clean-up of what killed writers left."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Iterator

from edgeclip.errors import BundleError
from edgeclip.store.fs import CURRENT, GRAPH_STORE, LOCK, STORE_TMP, io_errors
from edgeclip.store.stamps import stamps_dir

LOCK_WAIT_S = 30.0  # how long a writer waits for the lock, unless EDGECLIP_LOCK_WAIT says otherwise


def lock_wait_s() -> float:
    """Seconds a writer waits for the lock: ``EDGECLIP_LOCK_WAIT`` (read at each call), else
    ``LOCK_WAIT_S``; BundleError for a value that is not a number >= 0."""
    text = os.environ.get("EDGECLIP_LOCK_WAIT")
    if text is None:
        return LOCK_WAIT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise BundleError(f"EDGECLIP_LOCK_WAIT={text[:40]!r}: expected a number of seconds >= 0")
    return value
_STALE_TMP_S = 120.0  # temporary files older than this are removed by the next writer


@contextlib.contextmanager
def writer_lock(root: Path, wait: float | None = None) -> Iterator[None]:
    """One writer at a time per bundle (advisory flock on ``.lock``; released when the process dies).

    The lock file is opened with O_NOFOLLOW and must be a regular file, so a planted symlink never
    makes edgeclip create or touch a file elsewhere. Waits up to ``wait`` seconds (default
    ``LOCK_WAIT_S``, env ``EDGECLIP_LOCK_WAIT``) for another writer, then raises BundleError."""
    import fcntl

    wait = lock_wait_s() if wait is None else wait
    with io_errors(root, "write"):
        root.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise BundleError(f"Bundle {root}: its {LOCK} is a symlink; refusing to use it.") from None
            raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BundleError(f"Bundle {root}: its {LOCK} is not a regular file; refusing to use it.")
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BundleError(f"Another edgeclip process is writing the bundle {root}; "
                                      "try again when it ends.") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def clean_temporary(root: Path) -> None:
    """Remove what killed writers left (staging folders, half-written CURRENT and stamp files,
    versions being pruned). Only called under the writer lock."""
    now = time.time()
    for stale in list(root.glob(".staging-*")) + list(root.glob(".trash-*")):
        shutil.rmtree(stale, ignore_errors=True)
    for tmp in root.glob(f".{CURRENT}.*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()
    for tmp in (root / GRAPH_STORE).glob(f"{STORE_TMP}*"):  # graph-store files being written
        with contextlib.suppress(OSError):
            tmp.unlink()
    for tmp in stamps_dir().glob(".*.tmp"):  # killed stamp writers (any bundle's; old ones only)
        with contextlib.suppress(OSError):
            if now - tmp.lstat().st_mtime > _STALE_TMP_S:
                tmp.unlink()
