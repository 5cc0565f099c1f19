"""``edgeclip classify``: files and folders through the bundle's gated graph."""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional, TextIO

import typer
from edgeclip.edgeapp.classify import Prediction
from edgeclip.edgeapp.cli.console import err_console, out_console, progress
from edgeclip.edgeapp.cli.options import BackendOpt, BundleOpt, QuietOpt, open_bundle
from rich.markup import escape
from rich.table import Table

from edgeclip.errors import UsageError

EXIT_UNREADABLE = 3


class Precision(str, Enum):
    fp32 = "fp32"
    int8 = "int8"


PrecisionOpt = Annotated[Precision, typer.Option(
    help="fp32, or int8: the int8-quantised encoder on onnxruntime CPU (faster; make it with `edgeclip export --int8`).")]


class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


def _write_json_lines(preds: list[Prediction], stream: TextIO) -> None:
    for pred in preds:
        stream.write(json.dumps(pred.to_dict(), ensure_ascii=False) + "\n")


def _write_csv(preds: list[Prediction], stream: TextIO) -> None:
    writer = csv.writer(stream)
    writer.writerow(["path", "label", "score", "route", "topk", "error", "note"])
    for p in preds:
        topk = ";".join(f"{t['label']}:{t['score']:.6f}" for t in p.topk)
        writer.writerow([p.path, p.label or "", "" if p.score is None else f"{p.score:.6f}", p.route or "", topk, p.error or "",
                         p.note or ""])


def _table(preds: list[Prediction], title: str) -> Table:
    table = Table(title=title, show_lines=False)
    for name in ("file", "label", "score", "route", "top-k"):
        table.add_column(name, overflow="fold")
    for p in preds:  # file names and labels are the user's text, never rich markup
        if p.error:
            table.add_row(escape(p.path), "[red]error[/]", "", "", f"[red]{escape(p.error)}[/]")
        else:
            others = ", ".join(f"{t['label']} {t['score']:.3f}" for t in p.topk[1:])
            table.add_row(escape(p.path), escape(p.label), f"{p.score:.3f}", escape(p.route), escape(others))
    return table


def classify(
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders.", show_default=False)],
    bundle: BundleOpt = None,
    backend: BackendOpt = "auto",
    precision: PrecisionOpt = Precision.fp32,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="How many labels to report per image.")] = 5,
    labels: Annotated[Optional[str], typer.Option(help='Extra zero-shot labels, comma separated: "a,b,c".')] = None,
    labels_file: Annotated[Optional[Path], typer.Option(help="Extra zero-shot labels, one per line.")] = None,
    output_format: Annotated[OutputFormat, typer.Option("--format", help="table, json (JSON Lines) or csv.")] = OutputFormat.table,
    recursive: Annotated[bool, typer.Option("--recursive/--no-recursive", help="Descend into sub-folders.")] = True,
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
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="List the skipped non-image files on stderr.")] = False,
) -> None:
    """Classify images and folders (recursively; images recognised by content or extension).

    Each image is routed by the DDAS gate to the task it belongs to, or to zero-shot CLIP.
    Every file ends up as a row with a label, a row with an error, or a skipped non-image
    (counted; --verbose lists them); a file named like an image (.jpg, .heic, ...) is never skipped.
    --format json writes JSON Lines: path, label, score, route, topk, error, note.
    Exit codes: 0 all inputs done; 3 some inputs could not be read (the rest are still
    classified); 2 usage error; 1 other failure.
    """
    from edgeclip.edgeapp.classify import build_label_space, classify_files, parse_labels
    from edgeclip.edgeapp.runtime import GatedRunner, TextEncoderRunner

    from edgeclip.discover import discover_images, display_path

    loaded = open_bundle(bundle)
    extra = parse_labels(labels, labels_file)
    found = discover_images(paths, recursive=recursive)
    missing = [Prediction(path=display_path(p), error=msg) for p, msg in found.missing]
    if not found.images and not missing:
        raise UsageError("No images found in the given paths.")
    runner = GatedRunner(loaded, backend, precision=precision.value)  # refuses a missing int8 graph early
    label_space = build_label_space(loaded, extra, TextEncoderRunner(loaded, backend).class_embeddings)
    preds: list[Prediction] = list(missing)
    start = time.perf_counter()
    with progress(quiet) as bar:
        task = bar.add_task("classifying", total=len(found.images), info="")
        for pred in classify_files(
            loaded, found.images, runner, label_space, top_k=top_k, batch_size=batch_size,
            on_batch=lambda n: bar.advance(task, n), exact=True if exact_preprocess else None, max_pixels=max_pixels,
        ):
            preds.append(pred)
    elapsed = time.perf_counter() - start
    position = {display_path(path): i for i, path in enumerate(found.images)}
    preds.sort(key=lambda p: position.get(p.path, -1))  # input order (unreadable files of a batch come first)
    done = sum(1 for p in preds if p.error is None)
    failed = len(preds) - done

    stream: TextIO = open(output, "w", encoding="utf-8", newline="") if output else sys.stdout
    try:
        if output_format is OutputFormat.json:
            _write_json_lines(preds, stream)
        elif output_format is OutputFormat.csv:
            _write_csv(preds, stream)
        else:
            weights = " - random weights" if loaded.random_weights else ""
            title = f"{loaded.root} {loaded.version} ({loaded.manifest['backbone']['model']}{weights})"
            if output:
                buffer = io.StringIO()
                from rich.console import Console

                Console(file=buffer, width=160).print(_table(preds, title))
                stream.write(buffer.getvalue())
            else:
                out_console().print(_table(preds, title))
    finally:
        if output:
            stream.close()
    if verbose:
        for path, reason in found.skipped:
            err_console().print(escape(f"skipped {display_path(path)}: {reason}"), highlight=False)
    if not quiet:
        rate = done / elapsed if elapsed > 0 else 0.0
        note = " (random weights: predictions are not meaningful)" if loaded.random_weights else ""
        skipped = f", {len(found.skipped)} skipped (not images)" if found.skipped else ""
        err_console().print(f"{done} classified, {failed} unreadable{skipped}, {rate:.1f} images/s{note}", highlight=False)
    if failed:
        raise typer.Exit(EXIT_UNREADABLE)


def register(app: typer.Typer) -> None:
    app.command()(classify)
