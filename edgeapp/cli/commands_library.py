"""``edgeclip search`` (rank photos by a text, through the embedding cache) and ``edgeclip cache info|clear``."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgeclip.discover import discover_images, display_path
from edgeclip.edgeapp.cli.commands_classify import EXIT_UNREADABLE, OutputFormat, PrecisionOpt, Precision
from edgeclip.edgeapp.cli.console import err_console, new_table, out_console
from edgeclip.edgeapp.cli.options import BackendOpt, BundleOpt, CacheOpt, QuietOpt, open_bundle
from edgeclip.edgeapp.cli.output import json_text, visible
from edgeclip.errors import UsageError


def search(
    query: Annotated[str, typer.Argument(help='The text to look for, e.g. "a red car", or a learned class name.',
                                         show_default=False)],
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders.", show_default=False)],
    top: Annotated[int, typer.Option("--top", "-n", min=1, help="How many photos to list.")] = 10,
    bundle: BundleOpt = None,
    backend: BackendOpt = "auto",
    precision: PrecisionOpt = Precision.fp32,
    output_format: Annotated[OutputFormat, typer.Option("--format", help="table, json (JSON Lines) or csv.")] = OutputFormat.table,
    recursive: Annotated[bool, typer.Option("--recursive/--no-recursive", help="Descend into sub-folders.")] = True,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per engine call.")] = 16,
    cache: CacheOpt = True,
    quiet: QuietOpt = False,
) -> None:
    """Rank photos by how well they match a text (CLIP similarity), best first.

    A query that names a learned class ranks by that class's score in the bundle's decision (what
    classify reports); any other text by the cosine similarity of CLIP's image and text embeddings.
    Embeddings come from the embedding cache, so a library classified once is searched without
    encoding it again. --format json: one object per photo (rank, path, score); csv: rank, path, score.

    Exit codes: 0 done; 3 some files could not be read (the rest are ranked); 2 usage error.
    """
    import edgeclip.edgeapp.api as api

    loaded = open_bundle(bundle)
    found = discover_images(paths, recursive=recursive)
    given = {os.fspath(p) for p in paths}
    named = [(p, msg) for p, msg in found.missing if os.fspath(p) in given]
    if named:
        raise UsageError(f"expected existing image files or folders: {visible(display_path(named[0][0]))}: {named[0][1]}")
    if not found.images:
        raise UsageError("No images found in the given paths.")
    clf = api.Classifier(loaded, backend, precision.value, cache=cache)
    result = clf.search(query, found.images, top=top, batch_size=batch_size)
    out = out_console()
    if output_format is OutputFormat.json:
        for hit in result.hits:
            out.file.write(json_text({"rank": hit.rank, "path": hit.path, "score": hit.score}) + "\n")
    elif output_format is OutputFormat.csv:
        buffer = io.StringIO()
        rows = csv.writer(buffer, lineterminator="\n")
        rows.writerow(["rank", "path", "score"])
        for hit in result.hits:
            rows.writerow([hit.rank, visible(display_path(hit.path)), f"{hit.score:.6f}"])
        out.file.write(buffer.getvalue())
    else:
        table = new_table("rank", "score", "path", title=visible(f"search: {query}"), right=("rank", "score"))
        for hit in result.hits:
            table.add_row(str(hit.rank), f"{hit.score:.4f}", visible(display_path(hit.path)))
        out.print(table)
    out.file.flush()
    if not quiet:
        note = " (random weights: rankings are not meaningful)" if loaded.random_weights else ""
        err_console().print(f"{result.scored} photos ranked by {result.how}, {len(result.errors)} unreadable"
                            f"{note}", highlight=False)
        for path, message in result.errors[:5]:
            err_console().print(visible(message), highlight=False)
    if result.errors:
        raise typer.Exit(EXIT_UNREADABLE)


cache_app = typer.Typer(help="The embedding cache (frozen image embeddings kept between runs; docs/CACHE.md).",
                        no_args_is_help=True)


@cache_app.command("info")
def cache_info_command() -> None:
    """Where the embedding cache is, its entries and size, and its bound."""
    from edgeclip.edgeapp.embed_cache import cache_info

    info = cache_info()
    mib = 1024 * 1024
    state = "" if info.exists else " (not made yet)"
    out_console().print(f"embedding cache: {visible(info.path)}{state}\n"
                        f"entries: {info.entries} ({info.backbones} backbone(s))\n"
                        f"size on disk: {info.bytes / mib:.1f} MiB of {info.max_bytes / mib:.0f} MiB "
                        f"(least recently used entries are evicted beyond it; $EDGECLIP_CACHE_MAX_MB)",
                        highlight=False, soft_wrap=True)


@cache_app.command("clear")
def cache_clear_command() -> None:
    """Delete the embedding cache (it is rebuilt as photos are classified again)."""
    from edgeclip.edgeapp.embed_cache import clear_cache, default_cache_dir

    freed = clear_cache()
    out_console().print(f"embedding cache cleared: {freed / (1024 * 1024):.1f} MiB freed "
                        f"({visible(default_cache_dir())})", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``search`` and ``cache`` to ``app``."""
    app.command()(search)
    app.add_typer(cache_app, name="cache")
