"""``edgeclip classify``: files and folders through the bundle's gated graph."""

from __future__ import annotations

import os
import signal
import threading
import time
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from edgeclip.discover import discover_images, display_path
from edgeclip.edgeapp.classify import Prediction
from edgeclip.edgeapp.cli.console import err_console, out_console, progress
from edgeclip.edgeapp.cli.options import BackendOpt, CacheOpt, cache_note, BundleOpt, QuietOpt, open_bundle
from edgeclip.edgeapp.cli.output import Interrupted, markup, stdout_is_terminal, visible
from edgeclip.edgeapp.cli.resume import Previous, key_of, read_previous
from edgeclip.edgeapp.cli.results import CsvWriter, JsonLinesWriter, ParquetWriter, ResultWriter, TableWriter, stdout
from edgeclip.errors import UsageError
from edgeclip.extras import import_ray_module, require_ray

if TYPE_CHECKING:
    from edgeclip.bundle import Bundle
    from edgeclip.edgeapp.classify import LabelSpace

EXIT_UNREADABLE = 3


class Precision(str, Enum):
    """``--precision``: fp32 graphs, the fp16 encoders, or the int8-quantised image encoder."""
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


PrecisionOpt = Annotated[Precision, typer.Option(
    help="fp32; fp16: the fp16 encoders, decision in fp32 (any onnxruntime backend; make them with `edgeclip export "
         "--precision fp16`); int8: the int8-quantised encoder on onnxruntime CPU (`edgeclip export --int8`).")]
CudaGraphOpt = Annotated[bool, typer.Option(
    "--cuda-graph", help="CUDA graphs on ort-cuda: batches padded to fixed sizes, one captured graph each (less "
                         "launch overhead at small batches, more GPU memory).")]


class OutputFormat(str, Enum):
    """``--format`` of ``classify``: table, JSON Lines, CSV or Parquet (``results``)."""
    table = "table"
    json = "json"
    csv = "csv"
    parquet = "parquet"


def classify(
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders.", show_default=False)],
    bundle: BundleOpt = None,
    backend: BackendOpt = "auto",
    precision: PrecisionOpt = Precision.fp32,
    cuda_graph: CudaGraphOpt = False,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="How many labels to report per image.")] = 5,
    labels: Annotated[Optional[str], typer.Option(help='Extra zero-shot labels, comma separated: "a,b,c".')] = None,
    labels_file: Annotated[Optional[Path], typer.Option(help="Extra zero-shot labels, one per line.")] = None,
    output_format: Annotated[OutputFormat, typer.Option(
        "--format", help="table, json (JSON Lines), csv or parquet (the default with -o NAME.parquet).")] = OutputFormat.table,
    recursive: Annotated[bool, typer.Option("--recursive/--no-recursive", help="Descend into sub-folders.")] = True,
    follow_links: Annotated[bool, typer.Option(
        "--follow-links", help="Follow symbolic links to folders inside the given folders (each folder once). "
                               "By default they are counted, not followed; --verbose lists them.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per engine call.")] = 16,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write results to this file instead of stdout.")] = None,
    quiet: QuietOpt = False,
    exact_preprocess: Annotated[bool, typer.Option(
        "--exact-preprocess",
        help="Decode every image at full resolution, exactly as open_clip does (slower). By default large "
             "images are decoded reduced (JPEG DCT scaling, integer reduce) to just cover the model input.")] = False,
    max_pixels: Annotated[Optional[int], typer.Option(
        "--max-pixels", min=1,
        help="Refuse images with more pixels than this to decode, as possible decompression bombs "
             "[default: 89478485]. Large JPEGs count at their reduced size.")] = None,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="List the skipped non-image files and folder links on stderr.")] = False,
    cache: CacheOpt = True,
    resume: Annotated[bool, typer.Option(
        "--resume", help="With -o FILE: skip the files FILE already holds (a stopped run's rows) and add the rest.")] = False,
    ray_target: Annotated[Optional[str], typer.Option(
        "--ray", metavar="ADDRESS|local[:N]",
        help="Classify on a Ray cluster (the [ray] extra): its ADDRESS (e.g. auto, HOST:6379, ray://HOST:10001), "
             "or local[:N] for Ray on this machine with N CPUs (default all). Results as without it.")] = None,
    actors: Annotated[Optional[int], typer.Option(
        min=1, help="--ray: actors running the gated graph [default: as many as fit, one CPU kept for decoding].")] = None,
    cpus_per_actor: Annotated[float, typer.Option(
        min=0.01, help="--ray: CPUs per actor (onnxruntime threads).")] = 1.0,
    gpus_per_actor: Annotated[float, typer.Option(
        min=0.0, help="--ray: GPUs per actor; above 0 the actors run on ort-cuda.")] = 0.0,
) -> None:
    """Classify images and folders (recursively; images recognised by content or extension).

    Every file ends up as a row with a label, a row with an error, or a skipped non-image
    (counted; --verbose lists them); a file named like an image (.jpg, .heic, ...) is never skipped.

    Each image is routed by the DDAS gate to the task it belongs to (route), or to zero-shot
    CLIP. The label is the best label over all learned classes and extra labels; task names
    the task it belongs to, which differs from route when another task's class scores higher.

    Rows are written as each batch finishes (Ctrl-C keeps them). --format json writes JSON
    Lines: path, label, task, score, route, topk, error, note (exact paths; bytes that are not
    UTF-8 as \\udcNN escapes). --format csv: path, label, task, score, route, error, note, then
    label_N, score_N, task_N per rank.

    --ray ADDRESS|local[:N] runs the same job on a Ray cluster (docs/SCALE.md): the same rows in the
    same order. -o NAME.parquet writes Parquet. --resume with -o FILE skips the files FILE holds.

    Exit codes: 0 all inputs done; 3 some inputs could not be read (the rest are still
    classified); 2 usage error (a path that does not exist included); 130 interrupted.
    """
    from edgeclip.edgeapp.classify import build_label_space, classify_batches, parse_labels
    from edgeclip.edgeapp.library import make_scorer
    from edgeclip.edgeapp.runtime import TextEncoderRunner

    if output is not None and output.suffix.lower() == ".parquet" and output_format is OutputFormat.table:
        output_format = OutputFormat.parquet
    if output_format is OutputFormat.parquet and output is None:
        raise UsageError("--format parquet needs -o FILE.parquet (Parquet is not written to stdout)")
    if resume and (output is None or output_format is OutputFormat.table):
        raise UsageError("--resume needs -o FILE with --format json, csv or parquet")
    cluster = RayTarget.parse(ray_target) if ray_target is not None else None
    loaded = open_bundle(bundle)
    extra = parse_labels(labels, labels_file)
    found = discover_images(paths, recursive=recursive, follow_links=follow_links)
    given = {os.fspath(p) for p in paths}
    named = [(p, msg) for p, msg in found.missing if os.fspath(p) in given]  # a path the user gave: exit 2
    if named:
        shown = "; ".join(f"{visible(display_path(p))}: {msg}" for p, msg in named[:3])
        more = f" (and {len(named) - 3} more)" if len(named) > 3 else ""
        raise UsageError(f"expected existing image files or folders: {shown}{more}")
    if not found.images and not found.missing:
        skipped = f" ({len(found.skipped)} non-image files skipped; --verbose lists them)" if found.skipped else ""
        if found.links:
            skipped += f" ({len(found.links)} folder links not followed; --follow-links follows them)"
        raise UsageError(f"No images found in the given paths{skipped}.")
    # files: frozen embedding (embedding cache or encoder) -> head graph; refuses a missing fp16/int8 graph early.
    # On a Ray cluster the actors run the gated graph (no embedding cache there).
    scorer = None if cluster else make_scorer(loaded, backend, precision.value, batch_size=batch_size, cache=cache,
                                              exact=True if exact_preprocess else None, max_pixels=max_pixels,
                                              cuda_graph=cuda_graph)
    label_space = build_label_space(loaded, extra, TextEncoderRunner(loaded, backend).class_embeddings)
    ranks = min(top_k, len(label_space.names))
    previous = Previous()
    if resume:
        assert output is not None
        header = CsvWriter(stdout, ranks).header() if output_format is OutputFormat.csv else None
        previous = read_previous(output, output_format.value, header)
    images = [p for p in found.images if key_of(p, output_format.value) not in previous]
    # entries found inside the folders that cannot be read (a link loop, an unlistable folder): error rows
    unreadable = [Prediction(path=os.fspath(p), error=msg) for p, msg in found.missing
                  if key_of(p, output_format.value) not in previous]
    writer = _writer(output_format, output, loaded, images, label_space, top_k, previous if resume else None)
    total = len(images)
    done = failed = 0
    start = time.perf_counter()
    session = None
    try:
        if not (resume and previous.rows and output_format is not OutputFormat.parquet):
            writer.start()
        if unreadable:
            writer.write(unreadable)
            failed += len(unreadable)
        with progress(quiet) as bar, StopAtBatchEnd() as stop:
            task = bar.add_task("classifying", total=total, info="")
            if cluster is None:
                batches = classify_batches(loaded, images, None, label_space, top_k=top_k, scorer=scorer)
            else:
                session = cluster.connect()
                batches = session.classify(images, loaded, label_space, top_k=top_k, batch_size=batch_size,
                                           actors=actors, cpus_per_actor=cpus_per_actor,
                                           gpus_per_actor=gpus_per_actor, backend=backend,
                                           precision=precision.value, exact=True if exact_preprocess else None,
                                           max_pixels=max_pixels)
            for preds in batches:
                writer.write(preds)  # the batch is complete: its rows go out now, in input order
                failed += sum(1 for p in preds if p.error)
                done += sum(1 for p in preds if p.error is None)
                bar.advance(task, len(preds))
                stop.check()
    except KeyboardInterrupt as exc:
        where = f"in {visible(display_path(output))}" if output else "above" if stdout_is_terminal() else "on stdout"
        raise Interrupted(f"interrupted after {done + failed} of {total} images; results so far {where}") from exc
    finally:
        writer.close()
        if session is not None:
            batches.close()  # the Ray job stops before Ray does
            session.close()
    elapsed = time.perf_counter() - start
    if verbose:
        for path, reason in found.skipped:
            err_console().print(markup(f"skipped {display_path(path)}: {reason}"), highlight=False)
        for path in found.links:
            err_console().print(markup(f"not followed {display_path(path)}: a link to a folder"), highlight=False)
    if not quiet:
        rate = done / elapsed if elapsed > 0 else 0.0
        note = " (random weights: predictions are not meaningful)" if loaded.random_weights else ""
        skipped = f", {len(found.skipped)} skipped (not images)" if found.skipped else ""
        if found.links:
            skipped += f", {len(found.links)} folder links not followed (--follow-links follows them)"
        kept = f", {previous.rows} already in {visible(display_path(output))}" if resume and output else ""
        counts = f"; {scorer.counts.describe()}{cache_note(scorer)}" if scorer is not None else ""
        err_console().print(f"{done} classified, {failed} unreadable{skipped}{kept}, {rate:.1f} images/s{note}{counts}",
                            highlight=False)
    if failed:
        raise typer.Exit(EXIT_UNREADABLE)


class StopAtBatchEnd:
    """Ctrl-C during classify stops at the end of the running batch, after its rows are written,
    so "interrupted after N" counts exactly the rows written. A second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: object = None

    def _handler(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        """Raise KeyboardInterrupt when a Ctrl-C came in (call between batches)."""
        if self.requested:
            raise KeyboardInterrupt

    def __enter__(self) -> "StopAtBatchEnd":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
            if self._previous is signal.SIG_IGN:  # started with Ctrl-C ignored (nohup, a background job)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                self._previous = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]


def _writer(fmt: OutputFormat, output: Path | None, loaded: "Bundle", images: list[Path], label_space: "LabelSpace",
            top_k: int, previous: Previous | None = None) -> ResultWriter:
    """The streaming writer of ``fmt``, to ``output`` (UTF-8) or stdout; ``previous``: --resume (append)."""
    if fmt is OutputFormat.parquet:
        assert output is not None
        require_ray("Parquet results")
        try:
            return ParquetWriter(output, keep=previous.table if previous is not None else None)
        except OSError as exc:
            raise UsageError(f"Cannot write {visible(display_path(output))}: {exc.strerror or exc}") from exc
    if output is not None:
        try:
            file = open(output, "a" if previous is not None else "w", encoding="utf-8", errors="backslashreplace",
                        newline="")
        except OSError as exc:
            raise UsageError(f"Cannot write {visible(display_path(output))}: {exc.strerror or exc}") from exc
        stream = lambda: file  # noqa: E731
    else:
        file = None
        stream = stdout
    if fmt is OutputFormat.json:
        writer: ResultWriter = JsonLinesWriter(stream)
    elif fmt is OutputFormat.csv:
        writer = CsvWriter(stream, min(top_k, len(label_space.names)))
    else:
        weights = " - random weights" if loaded.random_weights else ""
        title = visible(f"{loaded.root} {loaded.version} ({loaded.meta.backbone.model}{weights})")
        width = out_console().width if output is None and stdout_is_terminal() else None
        writer = TableWriter(stream, title, [os.fspath(p) for p in images], label_space.shown_names(),
                             [t.name for t in loaded.tasks], width, label_space.ambiguous)
    writer.owned = file
    return writer


class RayTarget:
    """``--ray``: a cluster address, or ``local[:N]`` (Ray on this machine with N CPUs)."""

    def __init__(self, address: str | None, cpus: int | None) -> None:
        self.address, self.cpus = address, cpus

    @classmethod
    def parse(cls, value: str) -> "RayTarget":
        """``local``, ``local:N`` (N >= 1) or an address; UsageError otherwise (before anything is read)."""
        text = value.strip()
        if text == "local" or text.startswith("local:"):
            count = text.partition(":")[2]
            if text != "local" and not (count.isdigit() and int(count) >= 1):
                raise UsageError(f"--ray {value!r}: expected local, local:N (N CPUs, N >= 1) or a cluster address")
            return cls(None, int(count) if count else None)
        if not text:
            raise UsageError("--ray needs a cluster address or local[:N]")
        return cls(text, None)

    def connect(self) -> object:
        """A ``distributed.RaySession`` (Ray imported now: MissingExtraError without the [ray] extra)."""
        distributed = import_ray_module("edgeclip.edgeapp.distributed", "--ray")
        return distributed.RaySession.start(self.address, self.cpus)


def register(app: typer.Typer) -> None:
    """Add ``classify`` to ``app``."""
    app.command()(classify)
