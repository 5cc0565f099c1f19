"""RAIL primal's solver state between add-tasks: the inverse autocorrelation matrix P (a float64
base in row panels minus low-rank factors, `edgeclip.train.rail.InversePanels`) and the float64
solution W of everything learned.

It is derived data, so it lives beside the versions, not in them, in ``BUNDLE/cache/rail/``:

- ``<fp>.json``: the entry for the learned images whose `RailPrimal.fingerprint()` is ``fp``
  (settings, W_r, every embedding and label in order). It names the files below; writing it is
  the commit point.
- ``<fp>.w64.npy``: W [hidden, classes] float64.
- ``base-<id>.p64``: P's base (the upper half, raw float64; absent while it is still I / gamma).
- ``factor-<id>.npy``: one low-rank factor [hidden, w] float64 each.

An add-task whose parent version's fingerprint has an entry folds in only its own images, and
writes only what changed: a new factor (tens of MB), and the 0.9 GB base (hidden 15000) only when
the factors reach `factor_limit` columns. Otherwise (the cache deleted, a rollback, a copied
bundle from an older edgeclip) it folds every learned image again, once, and says so. Only the
newest entry and the files it names are kept; deleting the folder is always safe, even while an
add-task runs (it then writes a new entry). The folder may be damaged (bit rot on a device's flash)
or come with a bundle from a stranger: an entry is used only when its names match a fixed pattern
and are no links, its arrays (read with ``allow_pickle=False``) have the expected shapes and dtypes,
every file's sha256 matches the entry (the base is hashed as it is written, and again when it is
resumed: ~1 s at hidden 15000), and the entry's own ``check`` matches its fingerprint; else every
learned image is folded again, with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import uuid
from pathlib import Path

import msgspec
import numpy as np

from edgeclip.errors import BundleError
from edgeclip.layout import RAIL_SOLVER_CACHE
from edgeclip.store.fs import pid_alive
from edgeclip.train.rail import InversePanels, RailPrimal

_BASE_NAME = re.compile(r"base-[0-9a-f]{16}\.p64")
_FACTOR_NAME = re.compile(r"factor-[0-9a-f]{16}\.npy")
_MAX_ENTRY_BYTES = 1 << 20
log = logging.getLogger(__name__)


class SolverEntry(msgspec.Struct, forbid_unknown_fields=True):
    """``<fp>.json``: which files hold P (``base`` None: I / gamma) and its factors, in order, with the
    sha256 of each file's bytes and of W64's; ``check``: the sha256 of the entry itself with its
    fingerprint (`entry_check`), so that an edited or mismatched entry is not taken for the state."""

    hidden: int
    base: str | None
    base_sha256: str | None
    factors: list[str]
    factor_sha256: list[str]
    w64_sha256: str
    check: str = ""


def entry_check(fingerprint: str, entry: SolverEntry) -> str:
    """sha256 of the fingerprint and every field of ``entry`` but ``check``."""
    fields = msgspec.structs.replace(entry, check="")
    return hashlib.sha256(fingerprint.encode() + b"\n" + msgspec.json.encode(fields)).hexdigest()


def _file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 16 MB pieces (a 0.93 GB base: ~1 s)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _array_sha256(array: np.ndarray) -> str:
    """sha256 of an array's bytes in its memory order (a factor is Fortran-ordered, as np.save keeps it:
    hashed without a copy)."""
    if array.flags.f_contiguous and not array.flags.c_contiguous:
        array = array.T
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def _new_name(kind: str, suffix: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:16]}{suffix}"


def _write_synced(path: Path, data: bytes | None = None, array: np.ndarray | None = None) -> None:
    """Write ``data`` (or ``array`` as .npy) to a temporary name, fsync, then rename to ``path``."""
    tmp = path.with_name(f".work-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        with open(tmp, "wb") as handle:
            if array is not None:
                np.save(handle, array, allow_pickle=False)
            else:
                handle.write(data or b"")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


class RailSolverCache:
    """The solver state folder of one bundle (``root/cache/rail``)."""

    def __init__(self, root: Path) -> None:
        self.folder = Path(root) / RAIL_SOLVER_CACHE
        self.work: Path | None = None

    def _entry_path(self, fingerprint: str) -> Path:
        return self.folder / f"{fingerprint}.json"

    def _w64_path(self, fingerprint: str) -> Path:
        return self.folder / f"{fingerprint}.w64.npy"

    def _read_entry(self, learner: RailPrimal) -> tuple[InversePanels, np.ndarray]:
        """The stored P and W64 of the learner's images; raises OSError/ValueError/BundleError/DecodeError
        when absent, edited or damaged (names outside the pattern, links, sizes, shapes, dtypes, any
        file's sha256 or the entry's own check)."""
        fingerprint = learner.fingerprint()
        path = self._entry_path(fingerprint)
        if path.is_symlink() or path.stat().st_size > _MAX_ENTRY_BYTES:
            raise BundleError("bad solver entry")
        entry = msgspec.json.decode(path.read_bytes(), type=SolverEntry)
        if entry.check != entry_check(fingerprint, entry) or entry.hidden != learner.hidden \
                or len(entry.factors) != len(entry.factor_sha256):
            raise BundleError("solver entry does not check")
        if entry.base is not None and not _BASE_NAME.fullmatch(entry.base):
            raise BundleError("bad base name")
        factors = []
        for name, digest in zip(entry.factors, entry.factor_sha256):
            if not _FACTOR_NAME.fullmatch(name) or (self.folder / name).is_symlink():
                raise BundleError("bad factor name")
            factor = np.load(self.folder / name, allow_pickle=False)
            if factor.dtype != np.float64 or factor.ndim != 2 or factor.shape[0] != learner.hidden \
                    or _array_sha256(factor) != digest:
                raise BundleError("bad factor")
            factors.append(factor)
        w64 = np.load(self._w64_path(fingerprint), allow_pickle=False)
        if w64.dtype != np.float64 or w64.shape != (learner.hidden, learner.n_classes) or _array_sha256(w64) != entry.w64_sha256:
            raise BundleError("bad W64")
        if entry.base is None:
            inverse = InversePanels(learner.hidden, identity_gamma=learner.gamma, factors=factors,
                                    factor_names=list(entry.factors))
            return inverse, w64
        base_path = self.folder / entry.base
        inverse = InversePanels(learner.hidden, base_path, factors=factors, factor_names=list(entry.factors))
        if base_path.is_symlink() or not base_path.is_file() or base_path.stat().st_size != inverse.nbytes:
            raise BundleError("missing or truncated base")
        inverse.open()  # held open: a concurrent writer removing the file does not affect this reader
        if _file_sha256(base_path) != entry.base_sha256:
            raise BundleError("damaged base")
        inverse.sha256 = entry.base_sha256
        return inverse, w64

    def resume(self, learner: RailPrimal) -> bool:
        """Give ``learner`` (restored from the parent version, nothing added yet) its stored P and W64
        when the cache holds them for exactly its learned images and every file checks; False when it
        does not (the next solve then folds every learned image). A damaged entry is removed and counts
        as absent."""
        if learner.n_seen == 0:
            return True  # nothing learned: P = I / gamma, nothing to read
        fingerprint = learner.fingerprint()
        if not self._entry_path(fingerprint).is_file():
            return False
        try:
            inverse, w64 = self._read_entry(learner)
            learner.resume(inverse, w64)
            return True
        except (OSError, ValueError, BundleError, msgspec.DecodeError, msgspec.ValidationError):
            log.warning("the RAIL solver cache entry %s does not check; every learned image is folded again",
                        fingerprint[:12])
            with contextlib.suppress(OSError):
                self._entry_path(fingerprint).unlink()  # its files go with the next commit's clean-up
            return False

    def start(self, learner: RailPrimal) -> None:
        """Point the learner's solve at a new work file in the cache folder (removing work files of dead
        processes). Raises BundleError when the folder cannot be written."""
        try:
            if self.folder.is_symlink() or (self.folder.exists() and not self.folder.is_dir()):
                self.folder.unlink()  # a file or link where the folder belongs: ours to replace (derived)
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob(".work-*"):
                pid = stale.name.split("-")[1]
                if pid.isdigit() and not pid_alive(int(pid)):
                    stale.unlink(missing_ok=True)
        except OSError as exc:
            raise BundleError(f"cannot write the RAIL solver cache: {exc.strerror or exc}") from exc
        self.work = self.folder / f".work-{os.getpid()}-{uuid.uuid4().hex[:8]}.p64"
        learner.work_path = self.work

    def commit(self, learner: RailPrimal) -> None:
        """Keep the learner's solved state under its fingerprint: a base the solve wrote (renamed, after
        fsync), the factors not stored yet, W64, then the entry; every file the entry does not name
        is removed (only the newest entry is kept). Best effort after the version is committed: a
        failure only costs the next add-task a full re-fold."""
        if self.work is None:
            return
        inverse, fingerprint = learner.inverse, learner.fingerprint()
        try:
            base = None
            if inverse.path is not None and inverse.identity_gamma is None:
                if Path(inverse.path) == self.work:  # written by this solve
                    base = _new_name("base", ".p64")
                    with open(self.work, "r+b") as handle:  # on disk before it is named (never half a P)
                        os.fsync(handle.fileno())
                    os.replace(self.work, self.folder / base)
                    inverse.path = self.folder / base
                else:
                    base = Path(inverse.path).name
                if inverse.sha256 is None:
                    inverse.sha256 = _file_sha256(self.folder / base)
            digests = []
            for i, factor in enumerate(inverse.factors):
                if inverse.factor_names[i] is None:
                    name = _new_name("factor", ".npy")
                    _write_synced(self.folder / name, array=factor)
                    inverse.factor_names[i] = name
                digests.append(_array_sha256(factor))
            w64 = learner.weights64()
            _write_synced(self._w64_path(fingerprint), array=w64)
            entry = SolverEntry(hidden=learner.hidden, base=base, base_sha256=inverse.sha256 if base else None,
                                factors=[str(n) for n in inverse.factor_names], factor_sha256=digests,
                                w64_sha256=_array_sha256(w64))
            entry = msgspec.structs.replace(entry, check=entry_check(fingerprint, entry))
            _write_synced(self._entry_path(fingerprint), data=msgspec.json.encode(entry))
        except OSError:
            self.discard()
            return
        self.discard()  # a work file the solve left unused (no base was written)
        keep = {self._entry_path(fingerprint).name, self._w64_path(fingerprint).name, *entry.factors}
        if base is not None:
            keep.add(base)
        for path in self.folder.iterdir():
            if path.name not in keep and not path.name.startswith(".work-"):
                with contextlib.suppress(OSError):
                    path.unlink()

    def size(self) -> int:
        """Bytes the folder's files take (0 when there is none)."""
        if not self.folder.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())

    def clear(self) -> int:
        """Delete every entry and its files (derived state: the next add-task folds every learned image
        once); work files of running add-tasks are left to them. Returns the bytes freed."""
        freed = 0
        if self.folder.is_symlink() or (self.folder.exists() and not self.folder.is_dir()):
            self.folder.unlink()  # a file or link where the folder belongs: ours to replace
            return 0
        if not self.folder.is_dir():
            return 0
        for path in self.folder.iterdir():
            pid = path.name.split("-")[1] if path.name.startswith(".work-") else ""
            if pid.isdigit() and pid_alive(int(pid)):
                continue
            with contextlib.suppress(OSError):
                size = path.stat().st_size
                path.unlink()
                freed += size
        return freed

    def discard(self) -> None:
        """Remove this process's work file (a failed or refused add-task, or one the solve never used)."""
        if self.work is not None:
            with contextlib.suppress(OSError):
                self.work.unlink()
            self.work = None
