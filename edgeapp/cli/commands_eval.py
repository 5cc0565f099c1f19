"""``edgeclip eval``: the papers' continual-learning protocols (MTIL, X-TAIL) on a copy of a bundle."""

from __future__ import annotations

import json
import tempfile
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from edgeclip.edgeapp.cli.console import err_console, out_console, progress, stage_reporter
from edgeclip.edgeapp.cli.options import BackendOpt, BundleOpt, QuietOpt, bundle_path, require_bundle
from edgeclip.edgeapp.cli.output import Interrupted, markup, visible


class Protocol(str, Enum):
    """``--protocol`` (METHODS.md section 4): MTIL (each image over its domain's classes) or X-TAIL (all classes)."""
    mtil = "mtil"
    xtail = "xtail"


class Gate(str, Enum):
    """``--gate``: the DDAS gate, or RAIL-Fusion's paper rule (zero-shot top-1 in a learned domain)."""
    ddas = "ddas"
    paper = "paper"


class Decision(str, Enum):
    """``--decision``: the numpy reference decision, or the exported gated graph."""
    reference = "reference"
    graph = "graph"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def matrix_table(result: Any, timing: list[Any], title: str) -> Table:
    """Rows: zero-shot, then after each learning step; columns: domains, routing, learn time."""
    table = Table(title=markup(title))
    table.add_column("after step", overflow="fold")
    for name in result.domains:
        table.add_column(markup(name), justify="right", overflow="fold")
    xtail = bool(result.routing)  # routed matrices: the share of images the gate routed right
    if xtail:
        table.add_column("routed right %", justify="right")
    table.add_column("learn s", justify="right")
    table.add_row("(zero-shot)", *[_pct(v) for v in result.zero_shot], *([""] if xtail else []), "")
    for i, row in enumerate(result.matrix):
        cells = [f"[bold]{v:.1f}[/]" if j == i else f"{v:.1f}" for j, v in enumerate(row)]
        route = [_pct(result.routing[i]["overall"])] if xtail else []
        table.add_row(markup(f"{i + 1} {result.domains[i]}"), *cells, *route, f"{timing[i].learn_s:.1f}")
    return table


def summary_table(results: list[Any]) -> Table:
    """One row per matrix of the run (gated headline, oracle, zero-shot): Transfer / Average / Last."""
    table = Table(title="Every matrix of the run: Transfer / Average / Last (%)")
    for col in ("protocol", "matrix", "kind", "Transfer", "Average", "Last"):
        table.add_column(col, justify="right" if col[0].isupper() else "left")
    for r in results:
        m = r.metrics()
        table.add_row(r.protocol, r.gate, r.kind, _pct(m["transfer"]), _pct(m["average"]), _pct(m["last"]))
    return table


def metrics_table(result: Any) -> Table:
    """Transfer / Average / Last (%) per domain and their mean, from an evaluation result."""
    m = result.metrics()
    table = Table(title="Transfer / Average / Last (%)")
    table.add_column("metric")
    for name in result.domains:
        table.add_column(markup(name), justify="right", overflow="fold")
    table.add_column("mean", justify="right", style="bold")
    for key in ("transfer", "average", "last"):
        table.add_row(key.capitalize(), *[_pct(v) for v in m["per_domain"][key]], _pct(m[key]))
    return table


def eval_command(
    domain_dirs: Annotated[list[Path], typer.Argument(help="Domain folders with train/ and test/, in learning order.",
                                                      show_default=False)],
    bundle: BundleOpt = None,
    protocol: Annotated[Optional[Protocol], typer.Option(help="mtil (each domain's own classes) or xtail (union of all class names); default: the preset's, else xtail.")] = None,
    shots: Annotated[Optional[int], typer.Option(min=1, help="Learn from at most K training images per class.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for results.json and matrix.png.")] = Path("eval-results"),
    gate: Annotated[Optional[Gate], typer.Option(help="X-TAIL gate of a RAIL bundle: ddas or paper (default: the bundle's).")] = None,
    test_per_class: Annotated[Optional[int], typer.Option(min=1, help="Score at most K test images per class (deterministic draw).")] = None,
    decision: Annotated[Decision, typer.Option(help="reference: numpy reference of the gated graph on cached embeddings (RAIL); graph: run graphs/gated.onnx on the pixels.")] = Decision.reference,
    iterations: Annotated[Optional[int], typer.Option(min=1, help="MoE: training iterations per task.")] = None,
    preset: Annotated[Optional[str], typer.Option(help="moe-paper or rail-paper: the paper's per-run settings (lr per dataset, iterations, warm-up, templates, fusion, gate per batch); docs/FULL_SCALE.md.")] = None,
    route_batch: Annotated[Optional[int], typer.Option(min=1, help="MoE MTIL: the gate decides once per batch of N test images (the official evaluation: 128; default per image).")] = None,
    backend: BackendOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Run a continual-learning protocol: learn the domains in order on a COPY of the bundle
    (the bundle itself is never changed) and, after each step, classify every domain's test split.

    Prints the accuracy matrix, Transfer / Average / Last and the routing accuracy; writes
    results.json and matrix.png (a heatmap) to --out. The bundle must have no task yet (edgeclip init).
    """
    from edgeclip.edgeapp.eval_heatmap import write_heatmap
    from edgeclip.edgeapp.eval_summary import run_summary
    from edgeclip.edgeapp.evaluate import run_protocols
    from edgeclip.train.presets import get_preset

    source = require_bundle(bundle_path(bundle))
    chosen = get_preset(preset)
    protocol_name = protocol.value if protocol else (chosen.protocol if chosen else "xtail")
    try:
        with tempfile.TemporaryDirectory(prefix="edgeclip-eval-") as tmp, progress(quiet, lines=True) as bar:
            report = stage_reporter(bar)
            run = run_protocols(source, domain_dirs, Path(tmp) / "work", protocols=[protocol_name],
                                gates=[gate.value] if gate else None, shots=shots, test_per_class=test_per_class,
                                decision=decision.value, backend=backend, iterations=iterations, progress=report,
                                preset=preset, route_batch=route_batch)
    except KeyboardInterrupt as exc:
        from edgeclip.bundle import current_version

        raise Interrupted(f"interrupted: no results written; eval works on a copy, {visible(source)} is still at "
                          f"{current_version(source)}") from exc
    summary = run_summary(run, source)
    result = next(iter(run.results.values()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    weights = " - random weights" if run.random_weights else ""
    title = f"{protocol_name.upper()} ({result.gate}), {run.method}{weights}: accuracy % on each domain's test split"
    write_heatmap(result, out / "matrix.png", title)
    if quiet:
        return
    console = out_console()
    console.print(matrix_table(result, run.timing, title))
    console.print(metrics_table(result))
    console.print(summary_table(list(run.results.values())))
    notes = err_console()
    if run.preset and run.preset["bundle_differs"]:
        shown = ", ".join(f"{k} {v['bundle']} (preset {v['preset']})" for k, v in run.preset["bundle_differs"].items())
        notes.print(f"the bundle was not made with --preset {run.preset['name']}: {shown}", highlight=False)
    for name, shared in summary["shared_class_names"].items():
        shown = ", ".join(f"'{c}'" for c in shared[:5]) + (f" and {len(shared) - 5} more" if len(shared) > 5 else "")
        notes.print(markup(f"{name}: {len(shared)} class name(s) an earlier domain has too ({shown}): each is its own "
                           f"task's class, shown as '{shared[0]} ({name})' where it is ambiguous"), highlight=False)
    for domain in run.suite.domains:
        if domain.split_note:
            notes.print(markup(domain.split_note), highlight=False)
    if run.suite.unreadable:
        notes.print(f"{len(run.suite.unreadable)} test images could not be read (listed in results.json)")
    if run.random_weights:
        notes.print("random weights: zero-shot is near chance; the numbers show the mechanics, not CLIP's accuracy")
    notes.print(markup(f"decision: {summary['decision']}; wrote {out / 'results.json'} and {out / 'matrix.png'}"),
                highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``eval`` to ``app``."""
    app.command(name="eval")(eval_command)
