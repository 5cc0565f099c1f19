"""DDAS gate, edgeclip's version (METHODS.md section 2): one autoencoder per task on the frozen
CLIP image embedding, a threshold calibrated on held-out images, a decision per image.

- `LinearAutoencoder`: closed form (mean + top-k principal directions), numpy only, so a RAIL
  task can learn its gate on a device without torch.
- `MLPAutoencoder`: D -> hidden -> D with ReLU, trained with torch (imported inside `fit`);
  its errors are computed from numpy weights, so the runtime needs no torch.
- `route(errors, thresholds)`: -1 (zero-shot) when no task accepts the image (err_t > thr_t for
  every t); otherwise rule "nearest" (default) picks the accepting task with the smallest error,
  rule "ratio" (METHODS.md's first wording) the smallest err_t / thr_t. Errors of both kinds are
  in the same units (mean squared distance in embedding space), so they compare across tasks.
  docs/LEARNERS.md has the measurements behind the default.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from edgeclip.errors import BundleError, UsageError
from edgeclip.extras import import_torch_module
from edgeclip.manifest import DEFAULT_GATE_K, DEFAULT_GATE_QUANTILE

QUANTILE = DEFAULT_GATE_QUANTILE  # threshold = this quantile of a task's held-out reconstruction errors
# The smallest threshold (mean squared residual per coordinate): a task whose held-out images are all
# reconstructed exactly (identical images) still accepts its own images and those within float noise.
MIN_THRESHOLD = 1e-7
HOLDOUT = 0.2
K = DEFAULT_GATE_K  # principal directions of the linear gate (measured best, docs/LEARNERS.md)
ROUTE_RULES = ("nearest", "ratio")
ROUTE_RULE = "nearest"  # measured on real images: "ratio" sends a tight domain's images to a broad one


def _check_x(x: np.ndarray, dim: int | None = None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        raise UsageError(f"embeddings must have shape [N, {dim or 'D'}], got {list(x.shape)}")
    return x


class Autoencoder(Protocol):
    """One task's DDAS gate (METHODS.md section 2): ``LinearAutoencoder`` or ``MLPAutoencoder``."""

    kind: str

    def errors(self, x: np.ndarray) -> np.ndarray:
        """Reconstruction errors [N] float32 of embeddings x [N, D], in embedding units (mean squared)."""
        ...

    def state(self) -> dict[str, np.ndarray]:
        """The weights as named float32 arrays (for safetensors)."""
        ...

    def settings(self) -> dict:
        """JSON-ready settings, with "kind" ("linear" or "mlp")."""
        ...


class LinearAutoencoder:
    """Optimal linear autoencoder of rank k: reconstruct x as mu + (x - mu) P^T P (METHODS.md section 2).

    mu [D] and P [k, D] float32 (orthonormal rows: the top-k right singular vectors of the centred data).
    The closed form replaces the paper's gradient-trained AlexNet-feature autoencoder (MoE-Adapters'
    DDAS, arXiv 2403.11549), so it learns torch-free. Raises BundleError when the shapes disagree.
    """

    kind = "linear"

    def __init__(self, mu: np.ndarray, components: np.ndarray) -> None:
        self.mu = np.asarray(mu, dtype=np.float32)  # [D]
        self.components = np.asarray(components, dtype=np.float32)  # [k, D]
        if self.components.ndim != 2 or self.components.shape[1] != self.mu.shape[0]:
            raise BundleError(f"components {list(self.components.shape)} do not match mean {list(self.mu.shape)}")

    @classmethod
    def fit(cls, x: np.ndarray, k: int) -> LinearAutoencoder:
        """The rank-``k`` optimum for embeddings x [N, D] (float32, unit rows), by SVD in float64.

        Raises UsageError when x is not 2-D or k is outside [0, min(N, D)].
        """
        x = _check_x(x).astype(np.float64)
        if not 0 <= k <= min(x.shape):
            raise UsageError(f"k must lie in [0, {min(x.shape)}] for {x.shape[0]} images of dim {x.shape[1]}")
        mu = x.mean(axis=0)
        _, _, vt = np.linalg.svd(x - mu, full_matrices=False)
        return cls(mu, vt[:k])

    def errors(self, x: np.ndarray) -> np.ndarray:
        """Mean squared residual per image [N] float32 after projecting x - mu onto span(P).

        x: [N, D] float32. Raises UsageError on another shape.
        """
        r = _check_x(x, self.mu.shape[0]) - self.mu  # [N, D]
        residual = r - (r @ self.components.T) @ self.components
        return (residual * residual).mean(axis=1)

    def state(self) -> dict[str, np.ndarray]:
        """{"mu": [D], "components": [k, D]} float32."""
        return {"mu": self.mu, "components": self.components}

    def settings(self) -> dict:
        """{"kind": "linear", "k": rank}."""
        return {"kind": self.kind, "k": int(self.components.shape[0])}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], settings: dict) -> LinearAutoencoder:
        """Rebuild from ``state()`` output (settings unused); raises BundleError on inconsistent shapes,
        KeyError on a missing key."""
        return cls(state["mu"], state["components"])


class MLPAutoencoder:
    """z = (x - mu) * scale; z_hat = relu(z W1 + b1) W2 + b2; error = mean (z - z_hat)^2 / scale^2.

    Centring and the scalar scale (1 / RMS of the centred data) put the input near unit
    variance, so one learning rate suits any embedding size; dividing by scale^2 returns the
    error to embedding units, comparable with other tasks' gates of either kind.

    mu [D], w1 [D, H], b1 [H], w2 [H, D], b2 [D] float32 (METHODS.md section 2, the "small MLP
    autoencoder", e.g. 512 -> 128 -> 512). Raises BundleError when the shapes disagree.
    """

    kind = "mlp"

    def __init__(self, mu: np.ndarray, scale: float, w1: np.ndarray, b1: np.ndarray,
                 w2: np.ndarray, b2: np.ndarray) -> None:
        self.mu = np.asarray(mu, dtype=np.float32)  # [D]
        self.scale = np.float32(scale)
        self.w1, self.b1 = np.asarray(w1, np.float32), np.asarray(b1, np.float32)  # [D, H], [H]
        self.w2, self.b2 = np.asarray(w2, np.float32), np.asarray(b2, np.float32)  # [H, D], [D]
        d, h = self.mu.shape[0], self.b1.shape[0]
        if self.w1.shape != (d, h) or self.w2.shape != (h, d) or self.b2.shape != (d,):
            raise BundleError("MLP autoencoder weights have inconsistent shapes")

    @classmethod
    def fit(cls, x: np.ndarray, hidden: int = 128, steps: int = 300, lr: float = 1e-3,
            batch: int = 256, seed: int = 0) -> MLPAutoencoder:
        """Adam on MSE over x [N,D] (float32, unit rows), minibatches drawn by a seeded generator;
        deterministic on CPU. hidden: H units; steps: optimiser steps; lr: Adam learning rate; batch:
        minibatch size. Needs torch (``edgeclip.train.ddas_mlp``); raises MissingExtraError without it,
        UsageError when x is not 2-D."""
        trainer = import_torch_module("edgeclip.train.ddas_mlp", "training an MLP gate")
        mu, scale, w1, b1, w2, b2 = trainer.fit_mlp_autoencoder(_check_x(x), hidden, steps, lr, batch, seed)
        return cls(mu, scale, w1, b1, w2, b2)

    def errors(self, x: np.ndarray) -> np.ndarray:
        """Mean squared reconstruction error per image [N] float32 in embedding units, numpy only.

        x: [N, D] float32. Raises UsageError on another shape.
        """
        z = (_check_x(x, self.mu.shape[0]) - self.mu) * self.scale
        residual = z - (np.maximum(z @ self.w1 + self.b1, 0.0) @ self.w2 + self.b2)
        return (residual * residual).mean(axis=1) / (self.scale * self.scale)

    def state(self) -> dict[str, np.ndarray]:
        """{"mu" [D], "scale" [1], "w1" [D, H], "b1" [H], "w2" [H, D], "b2" [D]} float32."""
        return {"mu": self.mu, "scale": np.array([self.scale], np.float32),
                "w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2}

    def settings(self) -> dict:
        """{"kind": "mlp", "hidden": H}."""
        return {"kind": self.kind, "hidden": int(self.b1.shape[0])}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], settings: dict) -> MLPAutoencoder:
        """Rebuild from ``state()`` output (settings unused); raises BundleError on inconsistent shapes,
        KeyError on a missing key."""
        return cls(state["mu"], float(np.asarray(state["scale"]).reshape(-1)[0]),
                   state["w1"], state["b1"], state["w2"], state["b2"])


_KINDS = {"linear": LinearAutoencoder, "mlp": MLPAutoencoder}


def autoencoder_from_state(state: dict[str, np.ndarray], settings: dict) -> Autoencoder:
    """Rebuild either kind from its state and settings (settings["kind"] picks the class).

    Raises BundleError on an unknown kind or inconsistent shapes.
    """
    kind = settings.get("kind")
    if kind not in _KINDS:
        raise BundleError(f"unknown autoencoder kind {kind!r}; known: {sorted(_KINDS)}")
    return _KINDS[kind].from_state(state, settings)


def calibrate_threshold(errors_heldout: np.ndarray, quantile: float = QUANTILE) -> float:
    """The `quantile` of held-out reconstruction errors: that share of the task's images is accepted.

    errors_heldout: [M] float (``Autoencoder.errors`` of held-out images). The calibrated threshold
    replaces the paper's hand-set 0.0655 (METHODS.md section 2); it is at least ``MIN_THRESHOLD``
    (positive, as routing requires, even when every held-out error is 0: a domain of identical images).
    Raises UsageError when there are no errors or the quantile is outside (0, 1].
    """
    errors_heldout = np.asarray(errors_heldout)
    if errors_heldout.size == 0 or not 0.0 < quantile <= 1.0:
        raise UsageError(f"need held-out errors and a quantile in (0, 1], got {errors_heldout.size}, {quantile}")
    return max(float(np.quantile(errors_heldout, quantile)), MIN_THRESHOLD)


def fit_gate(x: np.ndarray, kind: str = "linear", k: int = K, holdout_fraction: float = HOLDOUT,
             quantile: float = QUANTILE, seed: int = 0, **mlp_options) -> tuple[Autoencoder, float]:
    """Fit one task's autoencoder on a random (1 - holdout_fraction) of x and calibrate its
    threshold on the rest (METHODS.md section 2). `k`: principal directions (linear); mlp_options go to
    MLPAutoencoder.fit.

    x: [N, D] float32, unit rows (frozen CLIP image embeddings of the task). Returns (autoencoder,
    threshold in the autoencoder's error units). Raises UsageError when x is not 2-D, cannot be split
    (at least one held-out image and two training images), or ``kind`` is unknown; MissingExtraError
    for "mlp" without torch.
    """
    x = _check_x(x)
    n_hold = int(round(holdout_fraction * x.shape[0]))
    if not 1 <= n_hold < x.shape[0] - 1:
        raise UsageError(f"{x.shape[0]} images cannot be split with holdout_fraction={holdout_fraction}")
    perm = np.random.default_rng(seed).permutation(x.shape[0])
    held, train = x[perm[:n_hold]], x[perm[n_hold:]]
    if kind == "linear":
        ae: Autoencoder = LinearAutoencoder.fit(train, min(k, *train.shape))
    elif kind == "mlp":
        ae = MLPAutoencoder.fit(train, seed=seed, **mlp_options)
    else:
        raise UsageError(f"unknown gate kind {kind!r}; known: {sorted(_KINDS)}")
    return ae, calibrate_threshold(ae.errors(held), quantile)


def route(errors: np.ndarray, thresholds: np.ndarray, rule: str = ROUTE_RULE) -> tuple[np.ndarray, np.ndarray]:
    """Per image, never per batch: (route [B] int64, a task index or -1 for zero-shot;
    ratios [B, T] = err / thr). errors [B, T], thresholds [T] > 0. See the module docstring.

    METHODS.md section 2 (edgeclip's per-image DDAS decision). Raises UsageError on mismatched shapes,
    a non-positive threshold or an unknown ``rule``.
    """
    errors, thresholds = np.asarray(errors), np.asarray(thresholds)
    if errors.ndim != 2 or thresholds.shape != (errors.shape[1],) or np.any(thresholds <= 0):
        raise UsageError(f"need errors [B, T] and positive thresholds [T], got {list(errors.shape)}, "
                         f"{list(thresholds.shape)}")
    if rule not in ROUTE_RULES:
        raise UsageError(f"unknown routing rule {rule!r}; known: {list(ROUTE_RULES)}")
    ratios = errors / thresholds
    if ratios.shape[1] == 0:
        return np.full(ratios.shape[0], -1, dtype=np.int64), ratios
    accepted = ratios <= 1.0
    best = (np.where(accepted, errors, np.inf) if rule == "nearest" else ratios).argmin(axis=1)
    return np.where(accepted.any(axis=1), best, -1).astype(np.int64), ratios
