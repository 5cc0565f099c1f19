"""Classify files and folders with a bundle's gated graph (torch-free).

Decoding and preprocessing run in a thread pool ahead of the engine (``iter_batches``),
so the engine is kept busy while the next batch is decoded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from edgeclip.bundle import Bundle
from edgeclip.discover import display_path
from edgeclip.domain import ZERO_SHOT_ROUTE_NAME
from edgeclip.errors import UsageError
from edgeclip.layout import LEARNED, ZS_TEXT

ZERO_SHOT = ZERO_SHOT_ROUTE_NAME  # the route of an image that fits no learned task


@dataclass
class Prediction:
    """One input's result; ``error`` is set (and the rest empty) when the input could not be read.
    ``note``: what the decoder remarked about a file it could read (Pillow's warnings), or None.

    ``path`` is the file name as Python decodes it (``os.fspath``: bytes that are not UTF-8
    are lone surrogates, ``surrogateescape``), so ``os.fsencode(path)`` is the file's name.
    ``route`` is the task the DDAS gate sent the image to (or ``zero-shot``); ``label`` is the
    best-scoring label over the whole label space and ``task`` the task that label belongs to
    (``zero-shot`` for an extra label). They differ when the gate routes an image to one task
    but another task's class still scores higher; ``topk`` entries name their task likewise.
    """

    path: str
    label: str | None = None
    score: float | None = None
    route: str | None = None
    topk: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    note: str | None = None
    task: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "label": self.label,
            "task": self.task,
            "score": self.score,
            "route": self.route,
            "topk": self.topk,
            "error": self.error,
            "note": self.note,
        }


@dataclass
class LabelSpace:
    """The labels scores are given over: learned classes first, then extra zero-shot labels."""

    names: list[str]
    text: np.ndarray  # [L, D] frozen text embeddings, L2-normalised
    owners: list[str] = field(default_factory=list)  # per label: its task's name, or "zero-shot"

    def owner(self, index: int) -> str:
        return self.owners[index] if index < len(self.owners) else ZERO_SHOT

    @property
    def ambiguous(self) -> frozenset[str]:
        """The ``class_key`` of every learned class name that more than one task learned: such a
        label is told apart by its task (``qualified_name``)."""
        return ambiguous_names(self.names[: len(self.owners)], self.owners)

    def shown_names(self) -> list[str]:
        """Every label as a table shows it: ``3 (digits8)`` where the name is ambiguous."""
        ambiguous = self.ambiguous
        return [shown_name(name, self.owner(i), ambiguous) for i, name in enumerate(self.names)]


def qualified_name(name: str, task: str) -> str:
    """A class name with its task, ``3 (digits8)``: how a class learned by several tasks is shown,
    and how ``--labels`` / the API name one of them."""
    return f"{name} ({task})"


def ambiguous_names(names: Sequence[str], owners: Sequence[str]) -> frozenset[str]:
    """``class_key`` of the names that belong to more than one task (``owners[i]`` owns ``names[i]``)."""
    from edgeclip.domain import class_key

    tasks: dict[str, set[str]] = {}
    for name, owner in zip(names, owners):
        if owner != ZERO_SHOT:
            tasks.setdefault(class_key(name), set()).add(owner)
    return frozenset(key for key, owned in tasks.items() if len(owned) > 1)


def shown_name(name: str, task: str | None, ambiguous: frozenset[str]) -> str:
    """``name``, or ``qualified_name(name, task)`` when the name is in ``ambiguous`` and belongs to a task."""
    from edgeclip.domain import class_key

    if task and task != ZERO_SHOT and class_key(name) in ambiguous:
        return qualified_name(name, task)
    return name


def read_text_file(path: Path, what: str) -> str:
    """A text file people write: UTF-8, with or without a byte-order mark, any line ends.

    Raises UsageError naming the file (and the byte offset of the first byte that is not
    UTF-8) when it cannot be read or decoded."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"Cannot read the {what} {display_path(path)}: {exc.strerror or exc}") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        offset = exc.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        raise UsageError(f"The {what} {display_path(path)} is not UTF-8: byte 0x{data[offset]:02x} at offset "
                         f"{offset} (save it as UTF-8)") from exc


def parse_labels(labels: str | None, labels_file: Path | None) -> list[str]:
    """Labels from ``--labels "a,b"`` or a file with one label a line (blank lines and # comments
    skipped; UTF-8 with or without BOM, LF or CRLF). Labels that are the same class name by
    ``class_key`` (case, Unicode normalisation) are merged into the first one.

    Raises UsageError for an empty list (``--labels ""`` included) or an unreadable file."""
    from edgeclip.domain import class_key

    if labels is not None and labels_file is not None:
        raise UsageError("Give either --labels or --labels-file, not both.")
    if labels_file is not None:
        lines = read_text_file(labels_file, "labels file").splitlines()
        names = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    elif labels is not None:
        names = [part.strip() for part in labels.split(",") if part.strip()]
    else:
        return []
    if not names:
        raise UsageError("The label list is empty: expected --labels \"cat,dog\" or a file with one label a line.")
    merged: dict[str, str] = {}
    for name in names:
        merged.setdefault(class_key(name), name)
    return list(merged.values())


ClassEncoder = Callable[[Sequence[str], Sequence[str]], np.ndarray]  # (classes, templates) -> [C, D]


def build_label_space(bundle: Bundle, extra: Sequence[str], encode_classes: ClassEncoder) -> LabelSpace:
    """Learned classes (stored text embeddings, no text encoder needed) plus the bundle's default
    zero-shot labels and ``extra`` ones, encoded now by ``encode_classes``
    (``TextEncoderRunner.class_embeddings``, the exported text encoder).

    An extra label that names a learned class is that class, not a new label: by its name (``3``:
    every task's class of that name) or task-qualified (``3 (digits8)``, ``qualified_name``), the
    way a name learned by several tasks is told apart."""
    from edgeclip.domain import class_key

    learned = bundle.learned_classes
    owners = [task["name"] for task in bundle.tasks for _ in task["classes"]]
    stored = bundle.tensors(LEARNED, keys=[ZS_TEXT])[ZS_TEXT]  # only this tensor is read
    known = {class_key(name) for name in learned} | {class_key(qualified_name(name, owner))
                                                     for name, owner in zip(learned, owners)}
    wanted = list(bundle.meta.zero_shot.labels) + list(extra)
    new_by_key: dict[str, str] = {}
    for name in wanted:  # the one rule: the same class_key is the same class (the learned one wins)
        if class_key(name) not in known:
            new_by_key.setdefault(class_key(name), name)
    new = list(new_by_key.values())
    if not learned and not new:
        raise UsageError(
            "This bundle has learned no task yet, so there is nothing to classify into: "
            "pass --labels \"a,b,...\" (zero-shot) or learn a task with 'edgeclip add-task'."
        )
    if not new:
        return LabelSpace(list(learned), stored.astype(np.float32), owners)
    templates = bundle.meta.zero_shot.templates
    feats = encode_classes(new, templates)
    return LabelSpace(list(learned) + new, np.concatenate([stored.astype(np.float32), feats]),
                      owners + [ZERO_SHOT] * len(new))


def task_route_names(bundle: Bundle) -> list[str]:
    return [task["name"] for task in bundle.tasks]


def predictions_from_scores(
    paths: Sequence[Path],
    scores: np.ndarray,
    routes: np.ndarray,
    labels: LabelSpace,
    task_names: Sequence[str],
    top_k: int,
    notes: Sequence[str | None] | None = None,
) -> list[Prediction]:
    """Turn the graph's outputs into per-input results (top-k by score); ``notes[i]`` is input i's note.
    A row of scores that is not finite becomes an error result, never a NaN score."""
    k = min(top_k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    out = []
    finite = np.isfinite(scores).all(axis=1)
    for i, path in enumerate(paths):
        if not finite[i]:  # never print NaN as a score: a damaged graph or weights
            out.append(Prediction(path=os.fspath(path), error="the graph gave non-finite scores for this image "
                                  "(damaged graph weights? run 'edgeclip verify')", note=notes[i] if notes else None))
            continue
        top = [{"label": labels.names[j], "score": float(scores[i, j]), "task": labels.owner(int(j))} for j in order[i]]
        route = int(routes[i])
        out.append(
            Prediction(
                path=os.fspath(path),
                label=top[0]["label"],
                task=top[0]["task"],
                score=top[0]["score"],
                route=ZERO_SHOT if route < 0 else task_names[route],
                topk=top,
                note=notes[i] if notes else None,
            )
        )
    return out


def classify_files(
    bundle: Bundle,
    files: Iterable[Path],
    scorer: Any,
    labels: LabelSpace,
    top_k: int = 5,
    on_batch: Callable[[int], None] | None = None,
) -> Iterator[Prediction]:
    """Yield one Prediction per file, in input order; unreadable files give an error Prediction
    (its ``error`` names the file and the cause).

    ``scorer``: an ``edgeapp.library.LibraryScorer`` (``make_scorer``): the files' frozen embeddings
    from the embedding cache or the image encoder (decoding in a thread pool ahead of it), then the
    bundle's decision from the embeddings. ``on_batch(n)`` is called after each window of ``n`` files."""
    names = task_route_names(bundle)
    for window in scorer.iter_scored(files, labels.text):
        preds = predictions_from_scores(window.paths, window.scores, window.route, labels, names, top_k,
                                        notes=window.notes)
        for i, (path, row) in enumerate(zip(window.order, window.rows)):
            yield preds[row] if row is not None else Prediction(path=os.fspath(path), error=window.errors[i])
        if on_batch is not None:
            on_batch(len(window.order))
