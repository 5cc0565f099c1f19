"""Classify files and folders with a bundle's gated graph (torch-free).

Decoding and preprocessing run in a thread pool ahead of the engine (``iter_batches``),
so the engine is kept busy while the next batch is decoded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from edgeclip.bundle import Bundle
from edgeclip.discover import display_path
from edgeclip.domain import ZERO_SHOT_ROUTE_NAME
from edgeclip.errors import ImageError, UsageError
from edgeclip.layout import LEARNED, ZS_TEXT

ZERO_SHOT = ZERO_SHOT_ROUTE_NAME  # the route of an image that fits no learned task


@dataclass
class Prediction:
    """One input's result; ``error`` is set (and the rest empty) when the input could not be read.
    ``note``: what the decoder remarked about a file it could read, or None: edgeclip's remarks, and Pillow's
    warnings where the program made them notes (``images.warnings_as_notes``: the CLI does; library code
    leaves them to the application's warning filters).

    ``path`` is the file name as Python decodes it (``os.fspath``: bytes that are not UTF-8
    are lone surrogates, ``surrogateescape``), so ``os.fsencode(path)`` is the file's name.
    ``route`` is the task the DDAS gate sent the image to (or ``zero-shot``); ``label`` is the
    best-scoring label over the whole label space and ``task`` the task that label belongs to
    (``zero-shot`` for an extra label). They differ when the gate routes an image to one task
    but another task's class still scores higher; ``topk`` entries name their task likewise.
    ``embedding`` ([D] float32, unit norm) is set only when asked (``classify_batches(embeddings=True)``)
    and is not part of ``to_dict``.
    """

    path: str
    label: str | None = None
    score: float | None = None
    route: str | None = None
    topk: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    note: str | None = None
    task: str | None = None
    embedding: np.ndarray | None = field(default=None, repr=False, compare=False)  # [D] float32, when asked

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
    owners = [task.name for task in bundle.tasks for _ in task.classes]
    stored = bundle.tensors(LEARNED, keys=[ZS_TEXT])[ZS_TEXT]  # only this tensor is read
    known = {class_key(name) for name in learned} | {class_key(qualified_name(name, owner))
                                                     for name, owner in zip(learned, owners)}
    wanted = list(bundle.meta.zero_shot.labels) + list(extra)
    tasks = {class_key(task.name): task for task in bundle.tasks}
    new_by_key: dict[str, str] = {}
    for name in wanted:  # the one rule: the same class_key is the same class (the learned one wins)
        if class_key(name) not in known:
            qualified = re.fullmatch(r"(.+) \((.+)\)", name.strip())
            task = tasks.get(class_key(qualified.group(2))) if qualified else None
            if task is not None:  # "banana (digits8)": names a learned task, not one of its classes
                shown = ", ".join(task.classes[:10]) + (", ..." if len(task.classes) > 10 else "")
                raise UsageError(f"label '{name}': task '{task.name}' learned no class "
                                 f"'{qualified.group(1)}' (its classes: {shown}); without '({qualified.group(2)})' "
                                 "it is a zero-shot label")
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
    return [task.name for task in bundle.tasks]


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


def as_image(item: Any) -> Any:
    """An in-memory input as a PIL image: a PIL image as is, a uint8 [H,W,3] RGB or [H,W] grey array (grey as a
    grey PIL image is taken).

    Raises UsageError for anything else (None, another type, another array: a caller's mistake, as
    for a bad argument) and ImageError for an image without pixels (0 wide or high: an input that
    cannot be classified, like an empty file, so classify gives it an error row)."""
    from PIL import Image

    if isinstance(item, Image.Image):
        image = item
    else:
        if item is None or not isinstance(item, (np.ndarray, list, tuple)):
            raise UsageError(f"an image input must be a file path, a PIL image or a uint8 [H, W, 3] RGB or [H, W] "
                             f"grey array, got {type(item).__name__}")
        array = np.asarray(item)
        grey = array.dtype == np.uint8 and array.ndim == 2
        if array.dtype != np.uint8 or not (grey or (array.ndim == 3 and array.shape[2] == 3)):
            raise UsageError(f"an image array must be uint8 [H, W, 3] RGB or [H, W] grey, got {array.dtype} "
                             f"{list(array.shape)}")
        if array.shape[0] == 0 or array.shape[1] == 0:
            raise ImageError(f"the image has no pixels ({array.shape[1]}x{array.shape[0]})")
        image = Image.fromarray(array, "L").convert("RGB") if grey else Image.fromarray(array, "RGB")
    if image.width == 0 or image.height == 0:
        raise ImageError(f"the image has no pixels ({image.width}x{image.height})")
    return image


def is_file_input(item: Any) -> bool:
    """Whether a classify input names a file (str, bytes or a path) rather than holding pixels."""
    return isinstance(item, (str, bytes, os.PathLike))


def classify_batches(
    bundle: Bundle,
    items: Iterable[Any],
    runner: Any,
    labels: LabelSpace,
    top_k: int = 5,
    batch_size: int = 32,
    workers: int | None = None,
    exact: bool | None = None,
    max_pixels: int | None = None,
    embeddings: bool = False,
    scorer: Any = None,
) -> Iterator[list[Prediction]]:
    """The streaming core of classify (API, CLI, Ray workers): yield each batch's Predictions in input order.

    items: files (str, bytes or ``os.PathLike``) and in-memory images (PIL or uint8 [H,W,3] RGB arrays),
    read lazily; memory is bounded by the batch and the decode queue (``images.iter_batches``: two
    batches ahead), never by the input's length. A file that cannot be read gives an error Prediction
    (its ``error`` names the cause) in its place; an in-memory image is named ``<image N>`` (N: its
    0-based input position). Decoding runs ``workers`` threads (default: one per core) ahead of the
    engine. ``exact``: True decodes at full resolution (open_clip's pixels), False the fast reduced
    decode, None follows the bundle's ``preprocess.exact``. ``max_pixels``: the decompression-bomb
    limit (default ``images.DEFAULT_MAX_PIXELS``). ``embeddings``: also set ``Prediction.embedding``
    ([D] float32, unit norm, the frozen CLIP image embedding). Raises UsageError for a bad array.

    ``scorer``: an ``edgeapp.library.LibraryScorer`` (``make_scorer``; its own decode settings apply): files
    then go through the embedding cache and the head graph (frozen embedding once, the decision from it),
    in windows of ``scorer.window`` inputs (one list each); in-memory images still go through ``runner``.
    """
    from edgeclip.images import DEFAULT_MAX_PIXELS, decode_and_preprocess, iter_batches, preprocess

    cfg = bundle.meta.preprocess.with_exact(exact)
    limit = max_pixels or DEFAULT_MAX_PIXELS
    names = task_route_names(bundle)
    if scorer is not None:
        yield from _scored_windows(items, runner, labels, names, top_k, scorer, embeddings)
        return

    def decode(item: Any) -> tuple[np.ndarray, str | None]:
        if is_file_input(item):
            return decode_and_preprocess(Path(os.fsdecode(item)), cfg, limit)
        return preprocess(as_image(item), cfg), None

    def name(item: Any, position: int) -> str:
        return os.fspath(Path(os.fsdecode(item))) if is_file_input(item) else f"<image {position}>"

    for batch in iter_batches(items, cfg, batch_size=batch_size, workers=workers, max_pixels=limit, decode=decode):
        scored: list[Prediction] = []
        if len(batch.paths):
            result = runner.run(batch.pixels, labels.text)
            scored = predictions_from_scores([name(item, i) for item, i in zip(batch.paths, batch.indices)],
                                             result["scores"], result["route"], labels, names, top_k,
                                             notes=batch.notes)
            if embeddings:
                for pred, vector in zip(scored, result["embedding"]):
                    pred.embedding = np.asarray(vector, np.float32)
        errors = iter(batch.errors)
        out = []
        for position, row, message in batch.in_input_order():
            if row is None:
                item, _ = next(errors)
                out.append(Prediction(path=name(item, position), error=message))
            else:
                out.append(scored[row])
        yield out


def _scored_windows(items: Iterable[Any], runner: Any, labels: LabelSpace, names: Sequence[str], top_k: int,
                    scorer: Any, embeddings: bool) -> Iterator[list[Prediction]]:
    """``classify_batches`` through a ``LibraryScorer``: one list of Predictions per window, input order."""
    from edgeclip.images import preprocess

    def score(window: list[tuple[int, Any]]) -> list[Prediction]:
        out: dict[int, Prediction] = {}
        files = [(pos, Path(os.fsdecode(item))) for pos, item in window if is_file_input(item)]
        if files:
            got = scorer.score_window([path for _, path in files], labels.text)
            preds = predictions_from_scores(got.paths, got.scores, got.route, labels, names, top_k, notes=got.notes)
            for i, ((pos, path), row) in enumerate(zip(files, got.rows)):
                if row is None:
                    out[pos] = Prediction(path=os.fspath(path), error=got.errors[i])
                    continue
                out[pos] = preds[row]
                if embeddings:
                    out[pos].embedding = np.asarray(got.embedding[row], np.float32)
        memory = []
        for pos, item in window:
            if not is_file_input(item):
                try:
                    memory.append((pos, preprocess(as_image(item), scorer.cfg)))
                except ImageError as exc:  # an image without pixels: an error row, as for a file
                    out[pos] = Prediction(path=f"<image {pos}>", error=str(exc))
        for start in range(0, len(memory), scorer.batch_size):
            chunk = memory[start:start + scorer.batch_size]
            result = runner.run(np.stack([pixels for _, pixels in chunk]), labels.text)
            preds = predictions_from_scores([f"<image {pos}>" for pos, _ in chunk], result["scores"], result["route"],
                                            labels, names, top_k)
            for (pos, _), pred, vector in zip(chunk, preds, result["embedding"]):
                if embeddings:
                    pred.embedding = np.asarray(vector, np.float32)
                out[pos] = pred
        return [out[pos] for pos, _ in window]

    window: list[tuple[int, Any]] = []
    for position, item in enumerate(items):
        window.append((position, item))
        if len(window) == scorer.window:
            yield score(window)
            window = []
    if window:
        yield score(window)


def classify_files(
    bundle: Bundle,
    files: Iterable[Path],
    runner: Any,
    labels: LabelSpace,
    top_k: int = 5,
    batch_size: int = 32,
    workers: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    exact: bool | None = None,
    max_pixels: int | None = None,
    scorer: Any = None,
) -> Iterator[Prediction]:
    """Yield one Prediction per file, in input order (``classify_batches`` flattened); unreadable files
    give an error Prediction (its ``error`` names the file and the cause). ``on_batch(n)`` is called
    after each batch (or ``scorer`` window) of n files."""
    for preds in classify_batches(bundle, files, runner, labels, top_k=top_k, batch_size=batch_size,
                                  workers=workers, exact=exact, max_pixels=max_pixels, scorer=scorer):
        yield from preds
        if on_batch is not None:
            on_batch(len(preds))
