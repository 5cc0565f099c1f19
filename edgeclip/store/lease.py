"""Reader leases: a version a live reader holds is never removed.

A reader (``Bundle.open``) holds a shared ``flock`` on its version's folder for as long as the
``Bundle`` lives (or until ``Bundle.release``). ``prune`` removes a version only after taking an
exclusive ``flock`` on that folder without waiting; a version some reader holds is kept and removed
by a later prune. The kernel drops the locks of a process that dies, so a killed reader never holds
a version for ever. Nothing is written: a read-only bundle is leased just the same. On a file system
without ``flock`` (some network mounts) there are no leases, and prune removes what its plan says.

A reader that asks for the current version and finds it removed between reading ``CURRENT`` and
taking its lease reads ``CURRENT`` again (``Bundle.open``), so it always gets one whole version.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import weakref
from pathlib import Path
from typing import Iterator


class VersionGone(Exception):
    """The version folder was removed (or is being removed) while a reader opened it."""


class Lease:
    """A shared lock on one version folder; released by ``release`` or when garbage-collected."""

    def __init__(self, fd: int):
        self._release = weakref.finalize(self, os.close, fd)

    def release(self) -> None:
        """Let go of the version (idempotent)."""
        self._release()

    @property
    def held(self) -> bool:
        """Whether the lease is still held."""
        return self._release.alive


def take_lease(folder: Path) -> Lease | None:
    """A shared lease on the version folder ``folder``. Raises VersionGone when the folder is missing
    or being removed; None when the folder cannot be opened for another reason (no lease, best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise VersionGone(str(folder)) from None
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        held, now = os.fstat(fd), os.lstat(folder)  # still the folder of that name (not renamed to trash)
        if (held.st_dev, held.st_ino) != (now.st_dev, now.st_ino):
            raise VersionGone(str(folder))
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        raise VersionGone(str(folder)) from None
    except OSError:  # a file system without flock (ENOLCK, EOPNOTSUPP): no leases there
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return Lease(fd)


@contextlib.contextmanager
def removal_lock(folder: Path) -> Iterator[bool]:
    """An exclusive lock on a version folder, taken without waiting: yields True when no reader holds
    the version (it may be removed while the block runs), False when one does."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        except OSError:  # a file system without flock: no reader can hold a lease there either
            pass
        yield True
    finally:
        os.close(fd)


def in_use(folder: Path) -> bool:
    """Whether a reader holds the version folder now (for a prune plan; the answer may change)."""
    with removal_lock(folder) as free:
        return not free and folder.is_dir()
