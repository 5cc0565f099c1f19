"""RAIL-Fusion (METHODS.md section 3): zero-shot CLIP probabilities mixed with learned scores.

numpy reference implementations, batch-vectorised; the exported ONNX graph is checked against
these. Label space: columns 0..C_learned-1 are the learned classes in global order (task 0's
first), columns C_learned..L-1 are the labels of domains never learned.

Rules:
- `fuse_paper`: the paper's gate, on the zero-shot top-1 class.
- `fuse_gated`: per-image routes (a task index or -1), e.g. from the DDAS gate (`ddas.route`).
"""

from __future__ import annotations

import numpy as np

from edgeclip.errors import UsageError
from edgeclip.manifest import DEFAULT_BETA, DEFAULT_LOGIT_SCALE

BETA = DEFAULT_BETA  # the paper's weight of the learned scores
LOGIT_SCALE = DEFAULT_LOGIT_SCALE  # CLIP's trained temperature (the bundle records its model's own)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis; same shape as ``logits``; -inf entries give 0
    (a row needs one finite entry)."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _normalise(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def zero_shot_probs(img: np.ndarray, text: np.ndarray, logit_scale: float = LOGIT_SCALE) -> np.ndarray:
    """softmax(logit_scale * cos(img, text)): img [B, D], text [L, D] -> [B, L] float32.

    RAIL-Fusion's p_zs (METHODS.md section 3; RAIL, arXiv 2406.18868); rows need not be normalised.
    Raises UsageError on mismatched shapes.
    """
    img, text = np.asarray(img, np.float32), np.asarray(text, np.float32)
    if img.ndim != 2 or text.ndim != 2 or img.shape[1] != text.shape[1]:
        raise UsageError(f"need img [B, D] and text [L, D], got {list(img.shape)} and {list(text.shape)}")
    return softmax(logit_scale * _normalise(img) @ _normalise(text).T)


def _check(p_zs: np.ndarray, s_a: np.ndarray) -> None:
    if p_zs.ndim != 2 or s_a.ndim != 2 or p_zs.shape[0] != s_a.shape[0] or s_a.shape[1] > p_zs.shape[1]:
        raise UsageError(f"need p_zs [B, L] and s_a [B, C <= L], got {list(p_zs.shape)} and {list(s_a.shape)}")


def _pad(s_a: np.ndarray, n_labels: int) -> np.ndarray:
    """Zero-pad learned scores [B, C] to the whole label space [B, L]."""
    return np.pad(s_a, ((0, 0), (0, n_labels - s_a.shape[1])))


def fuse_paper(p_zs: np.ndarray, s_a: np.ndarray, beta: float = BETA) -> np.ndarray:
    """(1 - beta) p_zs + beta pad(s_a) where argmax p_zs is a learned class, else p_zs.

    p_zs [B, L]; s_a [B, C_learned] (the learned classes are p_zs's first C_learned columns).
    RAIL-Fusion as published (METHODS.md section 3; RAIL, arXiv 2406.18868), beta = 0.8 there.
    Returns [B, L]. Raises UsageError on mismatched shapes.
    """
    _check(p_zs, s_a)
    seen = p_zs.argmax(axis=1) < s_a.shape[1]  # [B]
    mixed = (1.0 - beta) * p_zs + beta * _pad(s_a, p_zs.shape[1])
    return np.where(seen[:, None], mixed, p_zs)


def task_masks(task_offsets: np.ndarray, task_sizes: np.ndarray, n_learned: int) -> np.ndarray:
    """[T, C_learned] float32, 1 on each task's own classes.

    task_offsets, task_sizes: [T] int (each task's first column and class count in global order).
    """
    cols = np.arange(n_learned)
    offsets, sizes = np.asarray(task_offsets)[:, None], np.asarray(task_sizes)[:, None]
    return ((cols >= offsets) & (cols < offsets + sizes)).astype(np.float32)


def fuse_gated(p_zs: np.ndarray, s_a: np.ndarray, route: np.ndarray, task_offsets: np.ndarray,
               task_sizes: np.ndarray, beta: float = BETA) -> np.ndarray:
    """Per image: route t >= 0 -> (1 - beta) p_zs + beta pad(s_a restricted to task t's classes);
    route -1 -> p_zs. route [B] int, task_offsets / task_sizes [T] (column ranges in s_a).

    edgeclip's gated fusion (METHODS.md section 3, "a better gate": the DDAS route of section 2).
    p_zs [B, L], s_a [B, C_learned] -> [B, L]. Raises UsageError on mismatched shapes or a route
    outside [-1, T).
    """
    _check(p_zs, s_a)
    route = np.asarray(route, dtype=np.int64)
    if route.shape != (p_zs.shape[0],) or route.min(initial=0) < -1 or route.max(initial=0) >= len(task_sizes):
        raise UsageError(f"route must be [B] in [-1, {len(task_sizes)}), got {route}")
    masks = task_masks(task_offsets, task_sizes, s_a.shape[1])  # [T, C]
    own = s_a * masks[np.maximum(route, 0)]  # [B, C]; rows routed to -1 are discarded below
    mixed = (1.0 - beta) * p_zs + beta * _pad(own, p_zs.shape[1])
    return np.where((route >= 0)[:, None], mixed, p_zs)
