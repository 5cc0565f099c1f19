"""``edgeclip bench``: latency and throughput of the gated and plain graphs."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from edgeclip.edgeapp.cli.commands_classify import CudaGraphOpt, Precision, PrecisionOpt
from edgeclip.edgeapp.cli.commands_manage import TableOrJson
from edgeclip.edgeapp.cli.console import new_table, out_console, progress
from edgeclip.edgeapp.cli.options import BackendOpt, BundleOpt, QuietOpt, open_bundle
from edgeclip.edgeapp.cli.output import markup
from edgeclip.errors import UsageError


def parse_batch_sizes(text: str) -> list[int]:
    """``"1,8,32"`` -> ``[1, 8, 32]``. Raises UsageError unless every part is a positive integer."""
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
    cuda_graph: CudaGraphOpt = False,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,32",
    iterations: Annotated[int, typer.Option(min=1, help="Timed runs per graph and batch size.")] = 20,
    output_format: Annotated[TableOrJson, typer.Option("--format", help="table or json.")] = TableOrJson.table,
    quiet: QuietOpt = False,
) -> None:
    """Latency (p50/p90/p99 ms) and throughput of the gated graph and the plain CLIP graph, with their ratio.

    --format json writes a list of objects: backend, graph ("gated" or "plain"), batch_size,
    p50_ms, p90_ms, p99_ms, images_per_s, precision, cuda_graph. --precision fp16 (or int8) times
    the fp32 and the fp16 (int8) graphs, interleaved; int8 on onnxruntime CPU only.
    """
    from edgeclip.edgeapp.bench import bench_bundle

    sizes = parse_batch_sizes(batch_sizes)
    loaded = open_bundle(bundle)
    with progress(quiet) as bar:
        task = bar.add_task("benchmarking", total=len(sizes), info="")
        results = bench_bundle(loaded, backend, sizes, iterations, on_step=lambda: bar.advance(task),
                               precision=precision.value, cuda_graph=cuda_graph)
    if output_format is TableOrJson.json:
        typer.echo(json.dumps([r.to_dict() for r in results], indent=2))
        return
    columns = ("backend", "precision", "graph", "batch", "p50 ms", "p90 ms", "p99 ms", "images/s", "gated/plain p50",
               "vs fp32 p50")
    table = new_table(*columns, right=columns,
                      title=markup(f"{loaded.root} {loaded.version}: {loaded.meta.backbone.model}, {loaded.weights_label}"))
    by_key = {(r.precision, r.graph, r.batch_size): r for r in results}
    for r in results:
        plain = by_key[(r.precision, "plain", r.batch_size)]
        ratio = f"{r.p50_ms / plain.p50_ms:.2f}x" if r.graph == "gated" else ""
        fp32 = by_key[("fp32", r.graph, r.batch_size)]
        speed = f"{r.p50_ms / fp32.p50_ms:.2f}x" if r.precision != "fp32" else ""
        table.add_row(r.backend, r.precision, r.graph, str(r.batch_size), f"{r.p50_ms:.2f}", f"{r.p90_ms:.2f}",
                      f"{r.p99_ms:.2f}", f"{r.images_per_s:.1f}", ratio, speed)
    out_console().print(table)


def register(app: typer.Typer) -> None:
    """Add ``bench`` to ``app``."""
    app.command()(bench)
