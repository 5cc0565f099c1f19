"""RAIL heads (METHODS.md section 3): ridge regression on frozen CLIP image embeddings.

Xu et al., "Advancing Cross-domain Discriminability in Continual Learning of Vision-Language
Models", NeurIPS 2024 (arXiv 2406.18868): primal (random ReLU features) and dual (RBF kernel) forms.

Three learners with one API (`add_domain`, `solve`, `scores`, `state`/`settings`/`from_state`):

- `RailPrimal`: random ReLU features; recursive least squares (Woodbury) on the inverse
  autocorrelation matrix, kept in float64 row panels (`InversePanels`), so an add-task costs what its
  own images cost. Learning domains one by one gives the joint solution.
- `RailDual`: kernel ridge regression with an RBF kernel on the stored embeddings, its inverse
  Cholesky factor grown by blocks (Schur complement).

numpy/scipy only: RAIL add-task runs on a device without torch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.linalg import cho_factor, cho_solve, cholesky, solve_triangular

from edgeclip.errors import BundleError, UsageError
from edgeclip.manifest import DEFAULT_GAMMA, DEFAULT_HIDDEN, DEFAULT_KERNEL_GAMMA, DEFAULT_LAMBDA



def _check_inputs(x: np.ndarray, labels: np.ndarray, dim: int | None, n_classes_total: int) -> None:
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        raise UsageError(f"embeddings must have shape [N, {dim}], got {list(x.shape)}")
    if labels.shape != (x.shape[0],):
        raise UsageError(f"labels must have shape [{x.shape[0]}], got {list(labels.shape)}")
    if x.shape[0] == 0:
        raise UsageError("a domain needs at least one embedding")
    if not np.issubdtype(labels.dtype, np.integer):
        raise UsageError(f"labels must be integers, got {labels.dtype}")
    if labels.min() < 0 or labels.max() >= n_classes_total:
        raise UsageError(f"labels must lie in [0, {n_classes_total}), got [{labels.min()}, {labels.max()}]")


def _label_sums(values: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """values^T Y for one-hot Y without building Y: [n_classes, cols] rows summed per label."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    out = np.zeros((n_classes, values.shape[1]), dtype=values.dtype)
    out[sorted_labels[starts]] = np.add.reduceat(values[order], starts, axis=0)
    return out


def _grow_columns(m: np.ndarray, n_cols: int) -> np.ndarray:
    """Append zero columns (new classes) so `m` has `n_cols` columns."""
    if n_cols < m.shape[1]:
        raise UsageError(f"the label space cannot shrink: {m.shape[1]} classes learned, {n_cols} given")
    if n_cols == m.shape[1]:
        return m
    return np.concatenate([m, np.zeros((m.shape[0], n_cols - m.shape[1]), dtype=m.dtype)], axis=1)


class _RandomFeatures:
    """phi(x) = ReLU(x W_r), W_r uniform(+-1/sqrt(dim)) drawn once and stored with the model."""

    def __init__(self, dim: int, hidden: int, gamma: float, seed: int, w_r: np.ndarray | None = None) -> None:
        """Raises UsageError unless dim, hidden >= 1 and gamma > 0; BundleError when a given
        ``w_r`` is not [dim, hidden]."""
        if dim < 1 or hidden < 1 or gamma <= 0:
            raise UsageError(f"need dim >= 1, hidden >= 1, gamma > 0; got {dim}, {hidden}, {gamma}")
        self.dim, self.hidden, self.gamma, self.seed = int(dim), int(hidden), float(gamma), int(seed)
        if w_r is None:
            bound = 1.0 / np.sqrt(dim)
            w_r = np.random.default_rng(seed).uniform(-bound, bound, size=(dim, hidden))
        self.w_r = np.asarray(w_r, dtype=np.float32)  # [dim, hidden]
        if self.w_r.shape != (self.dim, self.hidden):
            raise BundleError(f"RAIL w_r has shape {list(self.w_r.shape)}, expected {[self.dim, self.hidden]}")
        self.n_classes = 0
        self.n_seen = 0
        self.w = np.zeros((hidden, 0), dtype=np.float32)  # float32 solution used by scores
        self._w64: np.ndarray | None = np.zeros((hidden, 0))  # float64 solution, None when not solved here
        self._stale = False  # domains added since the last solve

    def phi64(self, x: np.ndarray) -> np.ndarray:
        """Hidden features phi(x) = ReLU(x W_r), x [N, dim] -> [N, hidden] float64 (W_r is float32,
        so its float64 cast is exact)."""
        return np.maximum(np.asarray(x, dtype=np.float64) @ self.w_r.astype(np.float64), 0.0)

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Regression scores relu(x W_r) W: x [N, dim] -> [N, n_classes] float32. Raises UsageError on
        a wrong shape, or when domains were added since the last ``solve()``."""
        if self._stale:
            raise UsageError("domains were added since the last solve(): call solve() first")
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise UsageError(f"embeddings must have shape [N, {self.dim}], got {list(x.shape)}")
        return np.maximum(x @ self.w_r, 0.0) @ self.w

    def weights64(self) -> np.ndarray:
        """The float64 ridge solution [hidden, n_classes] (for exactness checks). Raises UsageError
        when it was not solved in this process (restored state) or is stale."""
        if self._w64 is None or self._stale:
            raise UsageError("no float64 solution in this process: call solve() first")
        return self._w64

    def settings(self) -> dict:
        return {"dim": self.dim, "hidden": self.hidden, "gamma": self.gamma, "seed": self.seed,
                "n_classes": self.n_classes, "n_seen": self.n_seen}

    def _restore_counts(self, state: dict[str, np.ndarray], settings: dict) -> None:
        self.n_classes, self.n_seen = int(settings["n_classes"]), int(settings["n_seen"])
        self.w = np.asarray(state["w"], dtype=np.float32)


_BATCH = 1024  # most images folded into the primal inverse at once (the Woodbury rank): Phi, U are hidden x this
_PANEL_ROWS = 512  # rows of the base inverse held in memory at once (hidden 15000: 61 MB per panel)
_FACTOR_WIDTH = 1024  # most low-rank columns kept beside the base before they are folded into it


def factor_limit(hidden: int) -> int:
    """How many low-rank columns `InversePanels` keeps beside its base before it folds them in:
    ``min(_FACTOR_WIDTH, hidden // 8)``, so that applying them costs at most a quarter of what the
    base costs (4 hidden w b flops against 2 hidden^2 b) and they take at most 8 MB per 1,000 hidden."""
    return max(1, min(_FACTOR_WIDTH, int(hidden) // 8))


class InversePanels:
    """The symmetric P = (Phi^T Phi + gamma I)^-1 (float64 [hidden, hidden]) as a base B minus a
    low-rank part: P = B - sum_j F_j F_j^T.

    B is kept as its upper triangle in row panels: panel i holds rows [r0, r1) and columns
    [r0, hidden), row-major; only one or two panels are in memory at once, so a hidden-15000 base
    (0.9 GB on disk, the upper half) is used with ~120 MB of RAM. ``path`` None keeps the panels in
    memory (small hidden, tests); a path keeps them in that file (raw float64, panels one after
    another). ``identity_gamma``: B = I / gamma, nothing stored.

    The factors F_j (float64 [hidden, w_j]) are the Woodbury downdates of the folds since B was last
    written (`downdate`): while their widths sum to at most `factor_limit(hidden)`, a fold writes
    no part of B, only its own hidden x b factor (an add-task of a few hundred images then writes
    tens of MB instead of the 0.9 GB base: time, and flash wear on a device). ``factor_names``: the
    stored name of each factor (None: not stored yet), kept for `edgeapp.rail_solver`."""

    def __init__(self, hidden: int, path: Path | None = None, identity_gamma: float | None = None,
                 rows: int | None = None, factors: list[np.ndarray] | None = None,
                 factor_names: list[str | None] | None = None) -> None:
        self.hidden, self.path, self.identity_gamma = int(hidden), path, identity_gamma
        self.rows = int(rows or _PANEL_ROWS)
        self.bounds = [(r0, min(r0 + self.rows, self.hidden)) for r0 in range(0, self.hidden, self.rows)]
        sizes = [(r1 - r0) * (self.hidden - r0) for r0, r1 in self.bounds]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # in float64 elements
        self._memory: list[np.ndarray] | None = None if path is not None else []
        self._handle = None
        self.sha256: str | None = None  # of the base file's bytes, when this object wrote it or was told it
        self.factors: list[np.ndarray] = list(factors or [])
        self.factor_names: list[str | None] = list(factor_names or [None] * len(self.factors))
        for f in self.factors:
            if f.dtype != np.float64 or f.ndim != 2 or f.shape[0] != self.hidden:
                raise BundleError(f"a RAIL solver factor has shape {list(f.shape)} {f.dtype}, expected "
                                  f"[{self.hidden}, w] float64")

    def open(self) -> None:
        """Open the file now and keep it open (a reader is then unaffected by the file's removal)."""
        if self.path is not None and self._handle is None:
            self._handle = open(self.path, "rb", buffering=0)

    @property
    def nbytes(self) -> int:
        """Bytes the stored base takes (hidden (hidden + 1) / 2 + the panels' ragged edges) x 8."""
        return int(self.offsets[-1]) * 8

    @property
    def width(self) -> int:
        """Columns in the low-rank part (the sum of the factors' widths)."""
        return sum(f.shape[1] for f in self.factors)

    def read(self, i: int) -> np.ndarray:
        """Panel i of the base: B[r0:r1, r0:] float64 [r1 - r0, hidden - r0]."""
        r0, r1 = self.bounds[i]
        if self.identity_gamma is not None:
            panel = np.zeros((r1 - r0, self.hidden - r0))
            panel[np.arange(r1 - r0), np.arange(r1 - r0)] = 1.0 / self.identity_gamma
            return panel
        if self._memory is not None:
            return self._memory[i].copy()
        self.open()
        self._handle.seek(int(self.offsets[i]) * 8)  # type: ignore[union-attr]
        panel = np.fromfile(self._handle, dtype=np.float64, count=int(self.offsets[i + 1] - self.offsets[i]))
        if panel.size != self.offsets[i + 1] - self.offsets[i]:
            raise BundleError("the RAIL solver state file is truncated")
        return panel.reshape(r1 - r0, self.hidden - r0)

    def times(self, phi: np.ndarray) -> np.ndarray:
        """U = P Phi^T: phi float64 [b, hidden] -> [hidden, b], reading each base panel once
        (2 hidden^2 b flops over the upper triangle, plus 4 hidden w b for the factors)."""
        if self.identity_gamma is not None:
            u = phi.T / self.identity_gamma
        else:
            u = np.zeros((self.hidden, phi.shape[0]))
            for i, (r0, r1) in enumerate(self.bounds):
                panel = self.read(i)  # rows r0:r1, columns r0:
                u[r0:r1] += panel @ phi[:, r0:].T
                u[r1:] += panel[:, r1 - r0:].T @ phi[:, r0:r1].T  # the lower triangle by symmetry
        for f in self.factors:
            u -= f @ (phi @ f).T
        return u

    def downdate(self, v: np.ndarray, out: Path | None) -> InversePanels:
        """P - V V^T (v float64 [hidden, b]) as a new InversePanels. While the factors' widths stay
        within `factor_limit`, V joins them and the base is shared, untouched; otherwise every
        factor is folded into a new base at ``out`` (None: in memory), which may be this object's own
        file (updated in place) or a new one (this one stays as it was)."""
        factors, names = [*self.factors, v], [*self.factor_names, None]
        if self.width + v.shape[1] <= factor_limit(self.hidden):
            shared = InversePanels(self.hidden, self.path, self.identity_gamma, self.rows, factors, names)
            shared._memory, shared._handle, shared.sha256 = self._memory, self._handle, self.sha256
            return shared
        result = InversePanels(self.hidden, out, rows=self.rows)
        in_place = out is not None and self.path is not None and Path(out) == Path(self.path)
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)  # a cache folder deleted meanwhile
        handle = None if out is None else open(out, "r+b" if in_place else "wb")
        digest = hashlib.sha256()  # of the file's bytes: the panels are written in order, back to back
        try:
            for i, (r0, r1) in enumerate(self.bounds):
                panel = self.read(i)
                for f in factors:
                    panel -= f[r0:r1] @ f[r0:].T
                if handle is None:
                    result._memory.append(panel)  # type: ignore[union-attr]
                else:
                    handle.seek(int(self.offsets[i]) * 8)
                    panel.tofile(handle)
                    digest.update(panel.data)
        finally:
            if handle is not None:
                handle.close()
        result.sha256 = digest.hexdigest() if handle is not None else None
        return result

    def dense(self) -> np.ndarray:
        """The whole symmetric P [hidden, hidden] (small hidden only: tests)."""
        full = np.zeros((self.hidden, self.hidden))
        for i, (r0, r1) in enumerate(self.bounds):
            full[r0:r1, r0:] = self.read(i)
        upper = np.triu(full)
        dense = upper + np.triu(full, 1).T
        for f in self.factors:
            dense -= f @ f.T
        return dense


class RailPrimal(_RandomFeatures):
    """Primal RAIL (METHODS.md section 3): W = argmin ||Phi W - Y||^2 + gamma ||W||^2 over every
    embedding learned so far; Phi = ReLU(X W_r), W_r [dim, hidden] float32 seeded uniform(+-1/sqrt(dim)).

    Learning is the paper's recursive least squares (Woodbury identity on the inverse
    autocorrelation matrix), in float64: with P = (Phi^T Phi + gamma I)^-1 and a batch of b new
    images Phi_b [b, hidden] with one-hot labels Y_b,

        U = P Phi_b^T,  S = I_b + Phi_b U,  W <- W + U S^-1 (Y_b - Phi_b W),  P <- P - U S^-1 U^T

    which is the joint ridge solution over everything folded in so far (any order). P is kept as a
    base B minus low-rank factors (`InversePanels`): a batch costs 2 hidden^2 b flops for U (one pass
    over B, panel by panel) plus, every `factor_limit(hidden)` images (1,024 at hidden 15000), the
    fold of the pending factors into B (hidden^2 w flops and one write of B). So an add-task costs
    what its own images cost, whatever was learned before, and its memory is set by ``hidden`` and
    the batch (hidden 15000, b <= 1024: ~0.5 GB of arrays), not by the history. P (B: hidden^2 / 2
    float64, 0.9 GB on disk at hidden 15000, plus the factors) is derived state: `edgeapp.tasks`
    keeps it in the bundle's solver cache; without it, `solve` folds every learned image again
    (history-proportional, once).

    What a version keeps is what was learned: the embeddings X [n, dim] float32 and their labels
    [n] int64 (keys ``x``, ``labels``), from which P and W can always be rebuilt.
    """

    def __init__(self, dim: int, hidden: int = DEFAULT_HIDDEN, gamma: float = DEFAULT_GAMMA, seed: int = 0,
                 w_r: np.ndarray | None = None) -> None:
        """dim: embedding size D; hidden: random features (the paper's 15000); gamma: ridge
        (paper 0.1); seed draws W_r unless ``w_r`` is given. Raises UsageError on non-positive
        sizes or gamma, BundleError on a ``w_r`` of the wrong shape."""
        super().__init__(dim, hidden, gamma, seed, w_r)
        self.x = np.zeros((0, self.dim), dtype=np.float32)  # every embedding learned [n, dim]
        self.labels = np.zeros(0, dtype=np.int64)  # their global class indices [n]
        self.n_folded = 0  # images folded into (P, W64)
        self.inverse = InversePanels(self.hidden, identity_gamma=self.gamma)  # P for the folded images
        self.work_path: Path | None = None  # where solve() writes P (None: in memory)

    def add_domain(self, x: np.ndarray, labels: np.ndarray, n_classes_total: int) -> None:
        """Remember one domain's embeddings [N, dim] (cast to float32) and labels [N] in
        [0, n_classes_total); `solve()` then folds them in. Raises UsageError on bad shapes
        or labels, or when the label space would shrink."""
        x, labels = np.asarray(x), np.asarray(labels)
        _check_inputs(x, labels, self.dim, n_classes_total)
        if n_classes_total < self.n_classes:
            raise UsageError(f"the label space cannot shrink: {self.n_classes} classes learned, {n_classes_total} given")
        x = np.asarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise UsageError("embeddings must be finite (found NaN or Inf)")
        self.x = np.concatenate([self.x, x])
        self.labels = np.concatenate([self.labels, labels.astype(np.int64)])
        self.n_classes, self.n_seen = int(n_classes_total), len(self.labels)
        self._stale = True

    @property
    def pending(self) -> int:
        """Images added but not folded into the solution yet (what the next `solve` costs)."""
        return self.n_seen - self.n_folded

    def solve(self, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Fold the pending images into P and W, ``_BATCH`` at a time; returns W float32
        [hidden, n_classes] (float64 in `weights64()`). ``progress(done, total)`` after each batch.
        P goes to ``work_path`` (a new file the first time, then updated in place) or memory."""
        if self._w64 is None:  # restored without its float64 solution: rebuild from every image
            self.n_folded, self._w64 = 0, np.zeros((self.hidden, self.n_classes))
            self.inverse = InversePanels(self.hidden, identity_gamma=self.gamma)
        w64 = _grow_columns(self._w64, self.n_classes)
        total, start = self.pending, self.n_folded
        batch = -(-total // -(-total // _BATCH)) if total else 1  # equal batches of at most _BATCH
        for lo in range(start, self.n_seen, batch):
            hi = min(lo + batch, self.n_seen)
            w64 = self._fold(self.x[lo:hi], self.labels[lo:hi], w64)
            self.n_folded = hi
            if progress:
                progress(hi - start, total)
        self._w64 = w64
        self.w = w64.astype(np.float32)
        self._stale = False
        return self.w

    def _fold(self, x: np.ndarray, labels: np.ndarray, w64: np.ndarray) -> np.ndarray:
        """One Woodbury step for b images (x [b, dim], labels [b]); returns the new W64, updates P.
        Holds Phi and U (hidden x b float64 each) at most; V overwrites U and becomes a factor of P."""
        phi = self.phi64(x)  # [b, hidden]
        u = self.inverse.times(phi)  # [hidden, b]
        s = phi @ u
        s[np.diag_indices_from(s)] += 1.0
        chol = cholesky(s, lower=True, check_finite=False)
        residual = -(phi @ w64)
        del phi
        residual[np.arange(len(labels)), labels] += 1.0  # Y_b - Phi_b W
        w64 = w64 + u @ cho_solve((chol, True), residual, check_finite=False)
        # V = U L^-T (so V V^T = U S^-1 U^T), solved in place over U: U^T is U's memory in Fortran order
        v = solve_triangular(chol, u.T, lower=True, overwrite_b=True, check_finite=False).T
        del u
        self.inverse = self.inverse.downdate(v, self.work_path)
        return w64

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held: `w_r`, the learned embeddings `x` + `labels`, the inference weights `w`, and
        `solve_peak`, the working memory of a solve (hidden x batch float64 for Phi and U, P's
        low-rank factors, two panels of its base and W64), which does not depend on how many images
        were learned; `inverse`, P's base kept on disk (or in memory without a ``work_path``)."""
        h, c, n = self.hidden, max(self.n_classes, 1), self.n_seen
        b = _BATCH
        panel = min(_PANEL_ROWS, h) * h * 8
        solve = 2 * h * b * 8 + h * factor_limit(h) * 8 + 2 * panel + 2 * h * c * 8 + b * b * 8
        return {"w_r": self.dim * h * 4, "x": n * (self.dim * 4 + 8), "w": h * c * 4, "solve_peak": solve,
                "inverse": self.inverse.nbytes}

    def state(self) -> dict[str, np.ndarray]:
        """w_r, w (inference) and x, labels (to keep learning later)."""
        return {"w_r": self.w_r, "w": self.w, "x": self.x, "labels": self.labels}

    def settings(self) -> dict:
        """JSON-able record to restore the learner with ``from_state``: kind, dim, hidden, gamma, seed,
        n_classes, n_seen."""
        return {"kind": "rail_primal", **super().settings()}

    def fingerprint(self) -> str:
        """sha256 of what the solution is a function of (settings, W_r, every learned embedding and
        label, in order): names the solver state P that belongs to this learner's images."""
        digest = hashlib.sha256(f"rail-primal-v1 {self.dim} {self.hidden} {self.gamma!r} {self.n_classes}".encode())
        for array in (self.w_r, self.x, self.labels):
            digest.update(np.ascontiguousarray(array).data)
        return digest.hexdigest()

    def resume(self, inverse: InversePanels, w64: np.ndarray) -> None:
        """Continue from a stored solver state: P and the float64 W of every image learned so far
        (what `solve` left; ``edgeapp.tasks`` keeps them, named by `fingerprint`). Raises BundleError
        when they do not fit this learner."""
        if inverse.hidden != self.hidden or w64.shape != (self.hidden, self.n_classes):
            raise BundleError("the RAIL solver state does not match the bundle's learner")
        self.inverse, self._w64, self.n_folded = inverse, np.asarray(w64, np.float64), self.n_seen

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], settings: dict) -> RailPrimal:
        """Restore from `state()` and `settings()`. Raises BundleError when the embeddings needed to keep
        learning are missing or inconsistent (e.g. a state written by an older edgeclip, which kept
        the hidden x hidden statistics instead). The solver state P is not part of it: `resume`
        gives it, or the next `solve` folds every learned image again."""
        obj = cls(int(settings["dim"]), int(settings["hidden"]), float(settings["gamma"]),
                  int(settings["seed"]), w_r=state["w_r"])
        obj._restore_counts(state, settings)
        if "x" in state and "labels" in state:
            obj.x = np.asarray(state["x"], dtype=np.float32)
            obj.labels = np.asarray(state["labels"], dtype=np.int64)
        elif obj.n_seen:
            raise BundleError("the RAIL primal learning state has no embeddings 'x'/'labels' (written by an older "
                              "edgeclip, which kept hidden x hidden statistics); re-create the bundle to keep learning")
        if obj.x.shape != (obj.n_seen, obj.dim) or obj.labels.shape != (obj.n_seen,):
            raise BundleError(f"RAIL primal state: x {list(obj.x.shape)} and labels {list(obj.labels.shape)} do not "
                              f"match n_seen {obj.n_seen}, dim {obj.dim}")
        if obj.n_seen and (obj.labels.min() < 0 or obj.labels.max() >= obj.n_classes or not np.isfinite(obj.x).all()):
            raise BundleError("RAIL primal state: labels out of range or non-finite embeddings")
        obj._w64 = None  # resume() or a full re-fold gives the float64 solution
        return obj


def rbf_kernel(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
    """RBF kernel exp(-gamma ||a_i - b_j||^2): a [N, D], b [M, D] -> [N, M], in the dtype of the inputs."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.exp(-gamma * np.maximum(sq, 0.0))


class RailDual:
    """Dual RAIL (METHODS.md section 3): alpha = (K + lam I)^-1 Y over every embedding seen
    (memory M), K = rbf_kernel(M, M, gamma_kernel); scores s(x) = k(x, M) alpha.

    A new domain X grows the lower Cholesky factor L of K + lam I by one block row (Schur
    complement): Z = L^-1 k(M, X), L22 = chol(k(X, X) + lam I - Z^T Z), L <- [[L, 0], [Z^T, L22]].
    This is what a from-scratch Cholesky computes, so it equals the re-solve. (Growing the
    explicit inverse by the same block formula lost 2% relative accuracy at lam = 1e-3 on
    clustered unit vectors, where cond(K + lam I) ~ 3e5; the factor keeps ~1e-10.)
    Memory: M float32 [n, D] and L float64 [n, n] (n = 16,000 images: 2 GB) while learning; the
    state keeps M, the labels and alpha, and `from_state` re-factors (O(n^3 / 3)).
    """

    def __init__(self, gamma_kernel: float = DEFAULT_KERNEL_GAMMA, lam: float = DEFAULT_LAMBDA) -> None:
        """Paper settings: gamma_kernel 0.1, lam 0.001. Raises UsageError unless both are > 0."""
        if gamma_kernel <= 0 or lam <= 0:
            raise UsageError(f"need gamma_kernel > 0 and lam > 0, got {gamma_kernel}, {lam}")
        self.gamma_kernel, self.lam = float(gamma_kernel), float(lam)
        self.memory = np.zeros((0, 0), dtype=np.float32)  # [n, D]
        self.labels = np.zeros(0, dtype=np.int64)
        self.chol = np.zeros((0, 0))  # lower Cholesky factor of K + lam I, float64 [n, n]
        self.n_classes = 0
        self._alpha64 = np.zeros((0, 0))
        self.alpha = np.zeros((0, 0), dtype=np.float32)

    def _kernel64(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return rbf_kernel(np.asarray(a, np.float64), np.asarray(b, np.float64), self.gamma_kernel)

    def _onehot(self) -> np.ndarray:
        y = np.zeros((len(self.labels), self.n_classes))
        y[np.arange(len(self.labels)), self.labels] = 1.0
        return y

    def add_domain(self, x: np.ndarray, labels: np.ndarray, n_classes_total: int) -> None:
        """Add one domain's embeddings [N, dim] (cast to float32) and labels [N] in [0, n_classes_total)
        (METHODS.md section 3, dual form): grows the Cholesky factor of K + lam I by one block (Schur
        complement) and re-solves alpha, equal to a re-solve from scratch. Raises UsageError on bad
        shapes or labels, or when the label space would shrink."""
        x, labels = np.asarray(x, dtype=np.float32), np.asarray(labels)
        _check_inputs(x, labels, self.memory.shape[1] if len(self.memory) else None, n_classes_total)
        if n_classes_total < self.n_classes:
            raise UsageError(f"the label space cannot shrink: {self.n_classes} classes learned")
        d = self._kernel64(x, x) + self.lam * np.eye(len(x))  # [n2, n2]
        if len(self.memory) == 0:
            self.chol = cholesky(d, lower=True)
            self.memory = x.copy()
        else:
            z = solve_triangular(self.chol, self._kernel64(self.memory, x), lower=True)  # [n1, n2]
            l22 = cholesky(d - z.T @ z, lower=True)  # factor of the Schur complement
            self.chol = np.block([[self.chol, np.zeros(z.shape)], [z.T, l22]])
            self.memory = np.concatenate([self.memory, x])
        self.labels = np.concatenate([self.labels, labels.astype(np.int64)])
        self.n_classes = int(n_classes_total)
        self._set_alpha(cho_solve((self.chol, True), self._onehot(), check_finite=False))

    def resolve(self) -> np.ndarray:
        """Re-solve from scratch (Cholesky of the full K + lam I); the reference for the block update."""
        k = self._kernel64(self.memory, self.memory) + self.lam * np.eye(len(self.memory))
        self._set_alpha(cho_solve(cho_factor(k), self._onehot()))
        return self.alpha

    def _set_alpha(self, alpha64: np.ndarray) -> None:
        self._alpha64 = alpha64
        self.alpha = alpha64.astype(np.float32)

    def solve(self) -> np.ndarray:
        """alpha float32 [n, n_classes]; always current after add_domain."""
        return self.alpha

    def weights64(self) -> np.ndarray:
        """The float64 solution alpha [n, n_classes] (for exactness checks)."""
        return self._alpha64

    def scores(self, x: np.ndarray) -> np.ndarray:
        """k(x, M) alpha: x [N, D] -> [N, n_classes] float32. Raises UsageError on a wrong shape."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.memory.shape[1]:
            raise UsageError(f"embeddings must have shape [N, {self.memory.shape[1]}], got {list(x.shape)}")
        return rbf_kernel(x, self.memory, self.gamma_kernel) @ self.alpha

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held: ``memory`` [n, dim] float32, ``chol`` [n, n] float64, ``alpha`` [n, n_classes] float32."""
        n, d, c = self.memory.shape[0], self.memory.shape[1], max(self.n_classes, 1)
        return {"memory": n * d * 4, "chol": n * n * 8, "alpha": n * c * 4}

    def state(self) -> dict[str, np.ndarray]:
        """memory, alpha (inference) and labels: what was learned. The Cholesky factor (n x n float64)
        is not kept; `from_state` re-factors K + lam I from the memory (equal to ~1e-13)."""
        return {"memory": self.memory, "labels": self.labels, "alpha": self.alpha}

    def settings(self) -> dict:
        """JSON-able record to restore the learner with ``from_state``: kind, gamma_kernel, lam, n_classes."""
        return {"kind": "rail_dual", "gamma_kernel": self.gamma_kernel, "lam": self.lam,
                "n_classes": self.n_classes}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], settings: dict) -> RailDual:
        """Restore from `state()` and `settings()`: the factor of K + lam I is computed again from the
        memory (a state of an older edgeclip that kept it, key `chol`, is used as is); scores use the
        stored float32 alpha, so a restored head scores exactly as the saved one. Raises BundleError
        when memory, labels and alpha disagree in size."""
        obj = cls(float(settings["gamma_kernel"]), float(settings["lam"]))
        obj.memory = np.asarray(state["memory"], dtype=np.float32)
        obj.labels = np.asarray(state["labels"], dtype=np.int64)
        obj.n_classes = int(settings["n_classes"])
        n = len(obj.memory)
        if obj.memory.ndim != 2 or obj.labels.shape != (n,) or ("alpha" in state and len(state["alpha"]) != n):
            raise BundleError(f"RAIL dual state: memory {list(obj.memory.shape)}, labels {list(obj.labels.shape)} "
                              "and alpha do not match")
        if "chol" in state:
            obj.chol = np.asarray(state["chol"], dtype=np.float64)
        elif n:
            obj.chol = cholesky(obj._kernel64(obj.memory, obj.memory) + obj.lam * np.eye(n), lower=True)
        obj._set_alpha(cho_solve((obj.chol, True), obj._onehot(), check_finite=False))
        if "alpha" in state:
            obj.alpha = np.asarray(state["alpha"], dtype=np.float32)
        return obj
