"""``edgeclip bench`` (latency) and ``edgeclip demo`` (the whole flow offline, in one command)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from edgeclip.edgeapp.cli.commands_classify import Precision, PrecisionOpt
from edgeclip.edgeapp.cli.commands_manage import TableOrJson
from edgeclip.edgeapp.cli.console import err_console, new_table, out_console, progress
from edgeclip.edgeapp.cli.output import markup
from edgeclip.edgeapp.cli.options import BackendOpt, BundleOpt, QuietOpt, open_bundle
from rich.markup import escape
from rich.table import Table

from edgeclip.errors import UsageError


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise UsageError(f"--batch-sizes expects comma-separated positive integers like 1,8,32, got '{text}'") from exc
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--batch-sizes expects comma-separated positive integers like 1,8,32, got '{text}'")
    return sizes


def bench(
    bundle: BundleOpt = None,
    backend: BackendOpt = "auto",
    precision: PrecisionOpt = Precision.fp32,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,32",
    iterations: Annotated[int, typer.Option(min=1, help="Timed runs per graph and batch size.")] = 20,
    output_format: Annotated[TableOrJson, typer.Option("--format", help="table or json.")] = TableOrJson.table,
    quiet: QuietOpt = False,
) -> None:
    """Latency (p50/p90/p99 ms) and throughput of the gated graph and the plain CLIP graph, with their ratio.

    --format json writes a list of objects: backend, graph ("gated" or "plain"), batch_size,
    p50_ms, p90_ms, p99_ms, images_per_s, precision. --precision int8 times the fp32 and the int8
    graphs, interleaved, on onnxruntime CPU.
    """
    from edgeclip.edgeapp.bench import bench_bundle

    sizes = parse_batch_sizes(batch_sizes)
    loaded = open_bundle(bundle)
    with progress(quiet) as bar:
        task = bar.add_task("benchmarking", total=len(sizes), info="")
        results = bench_bundle(loaded, backend, sizes, iterations, on_step=lambda: bar.advance(task),
                               precision=precision.value)
    if output_format is TableOrJson.json:
        typer.echo(json.dumps([r.to_dict() for r in results], indent=2))
        return
    columns = ("backend", "precision", "graph", "batch", "p50 ms", "p90 ms", "p99 ms", "images/s", "gated/plain p50",
               "vs fp32 p50")
    table = new_table(*columns, right=columns,
                      title=markup(f"{loaded.root} {loaded.version}: {loaded.manifest['backbone']['model']}, {loaded.weights_label}"))
    by_key = {(r.precision, r.graph, r.batch_size): r for r in results}
    for r in results:
        plain = by_key[(r.precision, "plain", r.batch_size)]
        ratio = f"{r.p50_ms / plain.p50_ms:.2f}x" if r.graph == "gated" else ""
        fp32 = by_key[("fp32", r.graph, r.batch_size)]
        speed = f"{r.p50_ms / fp32.p50_ms:.2f}x" if r.precision != "fp32" else ""
        table.add_row(r.backend, r.precision, r.graph, str(r.batch_size), f"{r.p50_ms:.2f}", f"{r.p90_ms:.2f}",
                      f"{r.p99_ms:.2f}", f"{r.images_per_s:.1f}", ratio, speed)
    out_console().print(table)


def demo(
    directory: Annotated[Path, typer.Option("--dir", help="Where the demo writes its images and bundle.")] = Path("demo"),
    model: Annotated[str, typer.Option(help="open_clip model name.")] = "edgeclip-tiny",
    pretrained: Annotated[str, typer.Option(help="Pretrained tag or checkpoint; empty = seeded random weights.")] = "",
    method: Annotated[str, typer.Option(help="moe, rail-primal or rail-dual.")] = "rail-primal",
    quiet: QuietOpt = False,
) -> None:
    """The whole flow offline in one command: generate two image domains, create a bundle,
    learn both domains one after the other, classify a folder of new images (learned and unseen).

    Without --pretrained the backbone has seeded random weights (no download is possible offline),
    so the numbers show the mechanics, not CLIP's accuracy.
    """
    from edgeclip.edgeapp.cli.commands_classify import classify
    from edgeclip.edgeapp.cli.commands_manage import Method, add_task, init, tasks
    from edgeclip.edgeapp.demo_data import write_demo_images

    bundle_dir = directory / "bundle"
    if bundle_dir.exists():
        raise UsageError(f"{bundle_dir} exists already; remove it or pass --dir elsewhere.")
    domains, query = write_demo_images(directory / "images")
    hidden = 2000  # enough for the demo's few images; the paper's 15000 costs 1.8 GB of statistics
    init(bundle=bundle_dir, model=model, pretrained=pretrained or None, random_weights=not pretrained,
         method=Method(method), hidden=hidden, quiet=quiet)
    for domain in domains:
        add_task(domain_dir=domain, bundle=bundle_dir, iterations=60, quiet=quiet)
    tasks(bundle=bundle_dir)
    if not quiet:
        err_console().print(escape(f"classifying {query} (images of both learned domains and of an unseen one)"))
    classify(paths=[query], bundle=bundle_dir, top_k=3, quiet=quiet)


def register(app: typer.Typer) -> None:
    app.command()(bench)
    app.command()(demo)
