"""RAIL primal's solver state between add-tasks: the inverse autocorrelation matrix P (float64 row
panels, `edgeclip.train.rail.InversePanels`) and the float64 solution W of everything learned.

It is derived data, so it lives beside the versions, not in them: ``BUNDLE/cache/rail/<fp>.p64``
and ``<fp>.w64.npy``, where ``fp`` is `RailPrimal.fingerprint()` of the learned images (settings,
W_r, every embedding and label in order). An add-task whose parent version's fingerprint has a
state there folds in only its own images; otherwise (the cache deleted, a rollback, a copied
bundle from an older edgeclip) it folds every learned image again, once, and says so. Only the
newest state is kept (hidden 15000: 0.9 GB); deleting the folder is always safe.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import numpy as np

from edgeclip.errors import BundleError
from edgeclip.store.fs import pid_alive
from edgeclip.layout import RAIL_SOLVER_CACHE
from edgeclip.train.rail import InversePanels, RailPrimal


class RailSolverCache:
    """The solver state folder of one bundle (``root/cache/rail``)."""

    def __init__(self, root: Path) -> None:
        self.folder = Path(root) / RAIL_SOLVER_CACHE
        self.work: Path | None = None

    def _paths(self, fingerprint: str) -> tuple[Path, Path]:
        return self.folder / f"{fingerprint}.p64", self.folder / f"{fingerprint}.w64.npy"

    def resume(self, learner: RailPrimal) -> bool:
        """Give ``learner`` (restored from the parent version, nothing added yet) its stored P and W64
        when the cache holds them for exactly its learned images; False when it does not (the next
        solve then folds every learned image). A damaged entry is removed and counts as absent."""
        if learner.n_seen == 0:
            return True  # nothing learned: P = I / gamma, nothing to read
        p_path, w_path = self._paths(learner.fingerprint())
        try:
            inverse = InversePanels(learner.hidden, p_path)
            if not p_path.is_file() or p_path.stat().st_size != inverse.nbytes:
                return False
            w64 = np.load(w_path, allow_pickle=False)
            if w64.dtype != np.float64 or w64.shape != (learner.hidden, learner.n_classes) or not np.isfinite(w64).all():
                raise BundleError("bad W64")
            inverse.open()  # held open: a concurrent writer removing the file does not affect this reader
            learner.resume(inverse, w64)
            return True
        except (OSError, ValueError, BundleError):
            for path in (p_path, w_path):
                with contextlib.suppress(OSError):
                    path.unlink()
            return False

    def start(self, learner: RailPrimal) -> None:
        """Point the learner's solve at a new work file in the cache folder (removing work files of dead
        processes). Raises BundleError when the folder cannot be written."""
        try:
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
        """Keep the learner's solved state under its fingerprint and drop every other entry (only the
        newest is kept). Best effort after the version is committed: a failure only costs the next
        add-task a full re-fold."""
        if self.work is None or not self.work.exists():
            return
        p_path, w_path = self._paths(learner.fingerprint())
        try:
            tmp = self.folder / f".work-{os.getpid()}-{uuid.uuid4().hex[:8]}.w64.npy"
            np.save(tmp, learner.weights64(), allow_pickle=False)
            with open(self.work, "r+b") as handle:  # on disk before it is named (a crash never leaves half a P)
                os.fsync(handle.fileno())
            os.replace(tmp, w_path)
            os.replace(self.work, p_path)
        except OSError:
            self.discard()
            return
        self.work = None
        keep = {p_path.name, w_path.name}
        for entry in self.folder.iterdir():
            if entry.name not in keep and not entry.name.startswith(".work-"):
                with contextlib.suppress(OSError):
                    entry.unlink()

    def discard(self) -> None:
        """Remove this process's work file (a failed or refused add-task)."""
        if self.work is not None:
            with contextlib.suppress(OSError):
                self.work.unlink()
            self.work = None

