"""Classify past one machine: the classify path on a Ray cluster with Ray Data (the ``ray`` extra).

    import edgeclip, ray
    ray.init()                                    # or ray.init("auto") on a cluster node
    rows = edgeclip.distributed.classify_dataset("/nas/photos", "models/bundles/default")
    rows.write_parquet("/nas/results")            # or: for batch in rows.iter_batches(): ...

The pipeline is Ray Data's standard one for a model over files (the pattern NeMo Curator's CLIP stage uses):

1. the paths (a folder walked on the driver, a list, or a ``ray.data.Dataset`` with a ``path`` column);
2. ``map_batches(decode_batch)`` in Ray **tasks** (one CPU each): decode, orient, resize and crop each file
   (``images.decode_resized``: uint8, a quarter of float32's bytes in the object store); a file that cannot
   be read becomes an error row here, it never fails the job;
3. ``map_batches(GatedClassifier)`` on an **actor pool**: each actor opens the bundle version and builds the
   gated graph's session once (``__init__``), with onnxruntime's threads equal to the actor's CPUs, on
   ``ort-cuda`` when the actor has GPUs; it normalises the pixels and runs the whole decision;
4. rows: ``rows.row_schema`` (the CLI's JSON Lines fields; ``embedding`` when asked), in input order.

Ray retries a task or restarts an actor that dies (Ray Data's defaults: actors restart, tasks are
retried); a block's output is used once, so no row is lost or duplicated. The label space (learned
classes + zero-shot labels) is built once on the driver and shipped to the actors. Every worker reads
the bundle at the same path (a shared file system, or the same copy on every node: docs/SCALE.md).

Module location: ``edgeclip.edgeapp.distributed`` (the runtime layer: it uses the runners and the classify
core); the public name ``edgeclip.distributed`` is the lazy facade in ``edgeclip/__init__.py``. No other
module imports Ray (``.importlinter``: "Ray-free").
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import ray
import ray.data

from edgeclip.bundle import Bundle
from edgeclip.discover import discover_images, display_path
from edgeclip.edgeapp.classify import LabelSpace, Prediction, build_label_space, predictions_from_scores, \
    task_route_names
from edgeclip.edgeapp.rows import predictions_of, rows_table
from edgeclip.errors import ImageError, UsageError
from edgeclip.manifest import Preprocess

# Memory declared per decoding task (a Ray scheduling resource): one large photo decoded at a time plus the
# batch's pixels. Declaring it also keeps the decoding tasks apart from the actors (Ray Data fuses map
# stages only when their remote arguments match).
DECODE_MEMORY = 128 * 1024 * 1024


# ------------------------------------------------------------------ stage 2: decoding, in Ray tasks


def decode_batch(batch: dict[str, np.ndarray], preprocess: bytes, max_pixels: int) -> dict[str, np.ndarray]:
    """A Ray Data batch of inputs (``file``: the exact name as bytes, ``error``: set when the driver already
    knows the entry cannot be read) to decoded images: ``pixels`` uint8 [n,S,S,3] (zeros on error rows),
    ``path``, ``error`` and ``note`` (strings, "" for none). Never raises for a bad file. ``preprocess``:
    the ``manifest.Preprocess`` to decode with, msgspec-JSON encoded (``exact`` already applied).

    A Ray task runs alone in its worker process, so for its duration it sets what the CLI sets for its
    own run (``images.warnings_as_notes``, ``images.pillow_pixel_limit``): Pillow's warnings about a file
    are its note, and edgeclip's ``max_pixels`` is the limit that refuses; both are undone when it returns."""
    from edgeclip.images import DEFAULT_MAX_PIXELS, pillow_pixel_limit, warnings_as_notes

    with warnings_as_notes(), pillow_pixel_limit(max_pixels or DEFAULT_MAX_PIXELS):
        return _decode_batch(batch, msgspec.json.decode(preprocess, type=Preprocess), max_pixels or DEFAULT_MAX_PIXELS)


def _decode_batch(batch: dict[str, np.ndarray], cfg: Preprocess, max_pixels: int) -> dict[str, np.ndarray]:
    from edgeclip.images import decode_resized

    files = batch["file"]
    known = batch["error"] if "error" in batch else [""] * len(files)
    n, size = len(files), cfg.image_size
    pixels = np.zeros((n, size, size, 3), np.uint8)
    paths, errors, notes = [], [], []
    for i, (raw, error) in enumerate(zip(files, known)):
        path = Path(os.fsdecode(bytes(raw)))
        paths.append(display_path(path))
        note = None
        if not error:
            try:
                pixels[i], note = decode_resized(path, cfg, max_pixels)
            except ImageError as err:
                error = str(err)
        errors.append(error or "")
        notes.append(note or "")
    return {"path": np.array(paths, dtype=object), "pixels": pixels, "error": np.array(errors, dtype=object),
            "note": np.array(notes, dtype=object)}


# ------------------------------------------------------------------ stage 3: the gated graph, on actors


class GatedClassifier:
    """A Ray Data callable class: opens the bundle version and the gated graph's session once per actor.

    ``__call__(batch)``: decoded images (``decode_batch``'s columns) to rows (``rows.row_schema``), in order.
    threads: onnxruntime's CPU threads (the actor's CPUs); backend: ``ort-cuda`` when the actor has GPUs.
    """

    def __init__(self, root: str, version: str, backend: str, precision: str, threads: int, names: list[str],
                 text: np.ndarray, owners: list[str], top_k: int, embeddings: bool) -> None:
        from edgeclip.edgeapp.runtime import GatedRunner

        self.bundle = Bundle.open(root, version)
        self.runner = GatedRunner(self.bundle, backend, threads=threads, precision=precision)
        self.cfg = self.bundle.meta.preprocess
        self.space = LabelSpace(list(names), np.asarray(text, np.float32), list(owners))
        self.routes = task_route_names(self.bundle)
        self.top_k, self.embeddings = top_k, embeddings

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from edgeclip.images import normalize

        errors = [str(e) for e in batch["error"]]
        notes = [str(n) or None for n in batch["note"]]
        paths = [str(p) for p in batch["path"]]
        good = [i for i, e in enumerate(errors) if not e]
        preds: list[Prediction] = [Prediction(path=p, error=e or None, note=n if e else None)
                                   for p, e, n in zip(paths, errors, notes)]
        if good:
            pixels = np.stack([normalize(np.asarray(batch["pixels"][i]), self.cfg) for i in good])
            result = self.runner.run(pixels, self.space.text)
            scored = predictions_from_scores([paths[i] for i in good], result["scores"], result["route"],
                                             self.space, self.routes, self.top_k, notes=[notes[i] for i in good])
            for i, pred, vector in zip(good, scored, result["embedding"]):
                if self.embeddings and pred.error is None:
                    pred.embedding = np.asarray(vector, np.float32)
                preds[i] = pred
        return rows_table(preds, self.embeddings)


# ------------------------------------------------------------------ the job


def source_rows(source: Any, recursive: bool = True) -> tuple[list[Path], list[tuple[Path, str]]]:
    """A folder, a file or a list of them to (image files in order, entries that cannot be read with why);
    the walk of ``discover_images`` (images recognised by content, hidden entries skipped)."""
    paths = [source] if isinstance(source, (str, bytes, os.PathLike)) else list(source)
    found = discover_images(paths, recursive=recursive)
    return list(found.images), list(found.missing)


def input_dataset(files: Sequence[Path], unreadable: Sequence[tuple[Path, str]] = (),
                  batch_size: int = 32) -> ray.data.Dataset:
    """The job's input: one row per entry (``file``: its exact name as bytes, ``error``: "" or why the driver
    could not read it), unreadable entries first (as the CLI writes them), blocks of about one batch."""
    items = [{"file": os.fsencode(p), "error": why} for p, why in unreadable]
    items += [{"file": os.fsencode(p), "error": ""} for p in files]
    blocks = max(1, min(math.ceil(len(items) / batch_size), 10_000))
    return ray.data.from_items(items, override_num_blocks=blocks)


def _from_user_dataset(ds: ray.data.Dataset) -> ray.data.Dataset:
    """A user's ``ray.data.Dataset`` with a ``path`` column (strings) as the job's input."""
    if "path" not in (ds.schema().names if ds.schema() is not None else []):
        raise UsageError("classify_dataset: the Dataset needs a 'path' column of file names")

    def to_input(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        files = np.array([os.fsencode(str(p)) for p in batch["path"]], dtype=object)
        return {"file": files, "error": np.array([""] * len(files), dtype=object)}

    return ds.map_batches(to_input, batch_format="numpy")


def cluster_cpus() -> float:
    """The CPUs of the Ray cluster this process is connected to."""
    return float(ray.cluster_resources().get("CPU", 1.0))


def classify_dataset(
    source: Any,
    bundle: str | Path | Bundle,
    *,
    labels: Sequence[str] = (),
    top_k: int = 5,
    batch_size: int = 32,
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    decode_cpus: float = 1.0,
    backend: str = "auto",
    precision: str = "fp32",
    exact: bool | None = None,
    max_pixels: int | None = None,
    embeddings: bool = False,
    recursive: bool = True,
) -> ray.data.Dataset:
    """Classify ``source`` on the Ray cluster this process is connected to (``ray.init`` first; started
    locally when it is not); returns a lazy ``ray.data.Dataset`` of rows (``rows.row_schema(embeddings)``:
    path, label, task, score, route, topk, error, note, [embedding]) in input order.

    source: a folder or file (walked on the driver as ``edgeclip classify`` does: unreadable entries become
    error rows first), a list of them, or a ``ray.data.Dataset`` with a ``path`` column. bundle: its root
    (the current version is read; every worker reads the same path) or an open ``Bundle`` (that version).
    actors: size of the actor pool (default: as many as fit, keeping ``decode_cpus`` free for decoding, or
    one per ``gpus_per_actor`` GPUs). cpus_per_actor: CPUs per actor = onnxruntime's threads (at least 1).
    gpus_per_actor > 0: the actors run on ``ort-cuda`` (backend "auto"). decode_cpus: CPUs per decoding task.
    The other arguments are ``Classifier.classify_iter``'s and ``edgeclip classify``'s. Raises UsageError
    (bad arguments, nothing to classify into), BundleError; a file that cannot be read is an error row.
    """
    if top_k < 1 or batch_size < 1:
        raise UsageError(f"top_k and batch_size must be at least 1, not {top_k} and {batch_size}")
    opened = bundle if isinstance(bundle, Bundle) else Bundle.open(Path(bundle))
    if not ray.is_initialized():
        ray.init()
    space = _label_space(opened, labels, backend)
    if isinstance(source, ray.data.Dataset):
        inputs = _from_user_dataset(source)
    else:
        files, unreadable = source_rows(source, recursive)
        inputs = input_dataset(files, unreadable, batch_size)
    return classify_inputs(inputs, opened, space, top_k=top_k, batch_size=batch_size, actors=actors,
                           cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor, decode_cpus=decode_cpus,
                           backend=backend, precision=precision, exact=exact, max_pixels=max_pixels,
                           embeddings=embeddings)


def _label_space(bundle: Bundle, labels: Sequence[str], backend: str) -> LabelSpace:
    from edgeclip.edgeapp.runtime import TextEncoderRunner

    return build_label_space(bundle, list(labels), TextEncoderRunner(bundle, _driver_backend(backend)).class_embeddings)


def _driver_backend(backend: str) -> str:
    return "ort-cpu" if backend in ("auto", "ort-cuda", "ort-trt", "tensorrt") else backend  # texts: a few rows


def classify_inputs(inputs: ray.data.Dataset, bundle: Bundle, space: LabelSpace, *, top_k: int = 5,
                    batch_size: int = 32, actors: int | None = None, cpus_per_actor: float = 1.0,
                    gpus_per_actor: float = 0.0, decode_cpus: float = 1.0, backend: str = "auto",
                    precision: str = "fp32", exact: bool | None = None, max_pixels: int | None = None,
                    embeddings: bool = False) -> ray.data.Dataset:
    """The pipeline over an input Dataset (``input_dataset``'s columns) with a label space built already:
    decoding tasks, then the actor pool (``classify_dataset`` documents the arguments)."""
    if cpus_per_actor <= 0 or decode_cpus <= 0 or gpus_per_actor < 0:
        raise UsageError("cpus_per_actor and decode_cpus must be > 0, gpus_per_actor >= 0")
    if actors is None:
        if gpus_per_actor > 0:
            actors = max(1, int(float(ray.cluster_resources().get("GPU", 0)) // gpus_per_actor))
        else:
            actors = max(1, int((cluster_cpus() - decode_cpus) // cpus_per_actor))
    if actors < 1:
        raise UsageError(f"actors must be at least 1, not {actors}")
    if gpus_per_actor > 0 and backend == "auto":
        backend = "ort-cuda"
    decoded = inputs.map_batches(
        decode_batch, batch_size=batch_size, batch_format="numpy", num_cpus=decode_cpus,
        compute=ray.data.TaskPoolStrategy(), memory=DECODE_MEMORY,
        fn_kwargs={"preprocess": msgspec.json.encode(bundle.meta.preprocess.with_exact(exact)),
                   "max_pixels": max_pixels or 0})
    settings = {"root": str(bundle.root), "version": bundle.version, "backend": backend, "precision": precision,
                "threads": max(1, int(round(cpus_per_actor))), "names": space.names, "text": space.text,
                "owners": space.owners, "top_k": top_k, "embeddings": embeddings}

    class BoundClassifier(GatedClassifier):  # settings travel with the class (a few KB), not as object-store args
        def __init__(self) -> None:
            super().__init__(**settings)

    rows = decoded.map_batches(
        BoundClassifier, batch_size=batch_size, batch_format="numpy", num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor or None, compute=ray.data.ActorPoolStrategy(size=actors))
    rows.context.execution_options.preserve_order = True  # rows in input order (the CLI writes them so)
    return rows


def iter_prediction_batches(rows: ray.data.Dataset) -> Iterator[list[Prediction]]:
    """Stream a rows Dataset to the driver as lists of Predictions (one per output block, input order);
    the driver holds a few blocks at a time."""
    tables = iter(rows.iter_batches(batch_size=None, batch_format="pyarrow"))
    try:
        for table in tables:
            yield predictions_of(table)
    finally:
        close = getattr(tables, "close", None)
        if close is not None:
            close()



class RaySession:
    """The CLI's connection to Ray (``--ray``): started (and shut down by ``close``) unless this process
    already has one, quiet (no Ray Data progress bars or execution logs: the CLI draws its own)."""

    def __init__(self, started: bool) -> None:
        self.started = started

    @classmethod
    def start(cls, address: str | None, cpus: int | None) -> "RaySession":
        """Connect to the cluster at ``address``, or start Ray on this machine with ``cpus`` CPUs
        (None: all). Raises EdgeclipError (one line) when the cluster cannot be reached."""
        import logging

        from edgeclip.errors import EdgeclipError

        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        if hasattr(context, "print_on_execution_start"):
            context.print_on_execution_start = False
        if ray.is_initialized():
            return cls(False)
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                   "logging_level": logging.ERROR, "configure_logging": False}
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # Ray's C++ notices are not the CLI's output
        try:
            with _stderr_silenced():  # the one notice Ray's C++ prints about that setting, while it starts
                if address is None:
                    ray.init(num_cpus=cpus, **options)
                else:
                    ray.init(address=address, **options)
        except Exception as exc:  # noqa: BLE001 - ray.init raises ConnectionError, RuntimeError, ValueError...
            where = f"the Ray cluster at {address}" if address else "a local Ray"
            raise EdgeclipError(f"Cannot start {where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
        return cls(True)

    def classify(self, files: Sequence[Path], bundle: Bundle, space: LabelSpace, *, batch_size: int = 32,
                 **options: Any) -> Iterator[list[Prediction]]:
        """``files`` classified on the cluster, streamed back as lists of Predictions in input order, each
        with its exact path (``os.fspath``, as the single-process path gives). ``options``: ``classify_inputs``'s."""
        if not files:
            return
        rows = classify_inputs(input_dataset(files, (), batch_size), bundle, space, batch_size=batch_size, **options)
        expected = iter(files)
        batches = iter_prediction_batches(rows)
        try:
            for preds in batches:
                for pred in preds:
                    path = next(expected, None)
                    if path is None or display_path(path) != pred.path:
                        raise RuntimeError(f"Ray returned {pred.path!r} where {path!r} was expected (rows out of order)")
                    pred.path = os.fspath(path)
                yield preds
        finally:  # stopped early (Ctrl-C): Ray Data cancels the running tasks now, while Ray is still up
            batches.close()
        if next(expected, None) is not None:
            raise RuntimeError("Ray returned fewer rows than files")

    def close(self) -> None:
        """Shut Ray down if this session started it."""
        if self.started and ray.is_initialized():
            ray.shutdown()
            self.started = False


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 points at /dev/null inside the block (C++ code writes there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
