"""Bundle management commands: init, add-task, tasks, export, rollback, info."""

from __future__ import annotations

import json
import platform
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from edgeclip.edgeapp.cli.console import err_console, out_console, progress, stage_reporter
from edgeclip.edgeapp.cli.options import BackendOpt, BundleOpt, QuietOpt, bundle_path, open_bundle
from rich.markup import escape
from rich.table import Table

from edgeclip.bundle import Bundle, list_versions
from edgeclip.bundle import rollback as rollback_bundle
from edgeclip.version import __version__


class Method(str, Enum):
    moe = "moe"
    rail_primal = "rail-primal"
    rail_dual = "rail-dual"


class TableOrJson(str, Enum):
    table = "table"
    json = "json"


def init(
    bundle: BundleOpt = None,
    model: Annotated[str, typer.Option(help="open_clip model name, e.g. ViT-B-16, or edgeclip-tiny / edgeclip-small.")] = "ViT-B-16",
    pretrained: Annotated[Optional[str], typer.Option(help="open_clip pretrained tag (e.g. openai) or a local checkpoint file.")] = None,
    random_weights: Annotated[bool, typer.Option("--random-weights", help="Seeded random weights (offline tests and demos only).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the random weights and of the learners.")] = 0,
    method: Annotated[Method, typer.Option(help="Continual learner: moe, rail-primal or rail-dual.")] = Method.rail_primal,
    hidden: Annotated[int, typer.Option(min=1, help="RAIL primal: random hidden layer size (paper 15000; float64 statistics cost 8*hidden^2 bytes).")] = 15000,
    beta: Annotated[float, typer.Option(min=0.0, max=1.0, help="RAIL: weight of the learned scores in the fusion.")] = 0.8,
    fusion: Annotated[str, typer.Option(help="RAIL: 'ddas' (gate by autoencoders, default) or 'paper' (zero-shot top-1).")] = "ddas",
    gate: Annotated[str, typer.Option(help="DDAS autoencoder: 'linear' (closed form, torch-free) or 'mlp'.")] = "linear",
    labels: Annotated[Optional[str], typer.Option(help='Default zero-shot labels, comma separated.')] = None,
    experts: Annotated[int, typer.Option(min=2, help="MoE: experts per block (paper 22).")] = 22,
    last_blocks: Annotated[Optional[int], typer.Option(min=1, help="MoE: adapters only in the last N blocks of each encoder (default all).")] = None,
    encoders: Annotated[str, typer.Option(help="MoE: adapted encoders, 'image,text' (paper), 'image' or 'text'.")] = "image,text",
    freeze_rule: Annotated[str, typer.Option(help="MoE activate-freeze: 'strict' (learned tasks never drift) or 'paper'.")] = "strict",
    batch_size: Annotated[int, typer.Option(min=1, help="MoE: training batch size (paper 64).")] = 64,
    lr: Annotated[float, typer.Option(min=0.0, help="MoE: AdamW learning rate (paper: 1e-4 to 5e-3 per dataset; --preset moe-paper sets them).")] = 1e-3,
    preset: Annotated[Optional[str], typer.Option(help="Every paper default in one word: moe-paper or rail-paper (overrides the options it sets; docs/FULL_SCALE.md lists them).")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Create a new bundle with no task (zero-shot CLIP only), exporting the frozen encoders to ONNX."""
    from edgeclip.edgeapp.classify import parse_labels
    from edgeclip.edgeapp.tasks import MethodSettings, init_bundle, require_torch
    from edgeclip.train.presets import get_preset

    chosen = get_preset(preset)
    preset_train: dict = {}
    if chosen is not None:
        values = chosen.init_settings()
        method = Method(values["method"])
        seed = values["seed"]
        if chosen.method == "moe":
            experts, freeze_rule, batch_size, encoders = (values["experts"], values["freeze_rule"],
                                                          values["batch_size"], values["encoders"])
            preset_train = {"preset": chosen.name, "warmup": chosen.warmup, "warmup_rule": chosen.warmup_rule,
                            "iterations": chosen.iterations_full,
                            "lr_by_dataset": {"full": dict(chosen.lr_full), "few": dict(chosen.lr_few)}}
        else:
            hidden, beta, fusion = values["hidden"], values["beta"], values["fusion"]
    require_torch("edgeclip init (reading open_clip models)")
    moe = {"n_experts": experts, "last_blocks": last_blocks,
           "encoders": [e.strip() for e in encoders.split(",") if e.strip()]}
    settings = MethodSettings(method=method.value, hidden=hidden, beta=beta, fusion=fusion, gate_kind=gate, seed=seed,
                              moe=moe, moe_train={"freeze_rule": freeze_rule, "batch_size": batch_size, "lr": lr, **preset_train})
    root = bundle_path(bundle)
    with progress(quiet) as bar:
        bar.add_task("exporting the frozen encoders", total=None, info="")
        created = init_bundle(root, model, pretrained, random_weights=random_weights, seed=seed, settings=settings,
                              zero_shot_labels=parse_labels(labels, None))
    if not quiet:
        err_console().print(escape(f"created {root} ({created.version}): {model}, {created.weights_label}, method {method.value}"))


def add_task(
    domain_dir: Annotated[Path, typer.Argument(help="Domain folder: DIR/<class>/* or DIR/train/<class>/*.", show_default=False)],
    bundle: BundleOpt = None,
    name: Annotated[Optional[str], typer.Option(help="Task name (default: the folder's name or meta.json's).")] = None,
    shots: Annotated[Optional[int], typer.Option(min=1, help="Use at most K images per class (few-shot).")] = None,
    iterations: Annotated[Optional[int], typer.Option(min=1, help="MoE: training iterations (default 1000).")] = None,
    lr: Annotated[Optional[float], typer.Option(min=1e-12, help="MoE: this task's learning rate (default: the bundle's, or its preset's rate for the dataset).")] = None,
    device: Annotated[str, typer.Option(help="MoE training device: auto, cpu or cuda.")] = "auto",
    backend: BackendOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Learn a new domain into a new bundle version and re-export the gated graph.

    RAIL learns in closed form from the exported encoder (no torch needed); MoE trains
    adapters with torch (pip install 'edgeclip[train]'). An interrupted add-task leaves
    the previous version intact.
    """
    from edgeclip.edgeapp.tasks import add_task as learn

    if device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter(f"expected auto, cpu or cuda, got '{device}'", param_hint="--device")
    root = bundle_path(bundle)
    if lr is not None and Bundle.open(root).method != "moe":
        raise typer.BadParameter("the learning rate applies to MoE bundles only (RAIL learns in closed form)",
                                 param_hint="--lr")
    with progress(quiet) as bar:
        report = stage_reporter(bar)
        learned = learn(root, domain_dir, name=name, shots=shots, iterations=iterations, device=device,
                        backend=backend, progress=report, moe_options={"lr": lr, "shots": shots})
    if not quiet:
        task = learned.tasks[-1]
        err_console().print(escape(
            f"learned task '{task['name']}' ({len(task['classes'])} classes, {task['n_images']} images) "
            f"-> {learned.root} {learned.version} [{learned.weights_label}]"), highlight=False)


def tasks(
    bundle: BundleOpt = None,
    output_format: Annotated[TableOrJson, typer.Option("--format", help="table or json.")] = TableOrJson.table,
) -> None:
    """List the learned tasks: classes, image counts, gate thresholds, versions."""
    loaded = open_bundle(bundle)
    if output_format is TableOrJson.json:
        data = {
            "bundle": str(loaded.root),
            "version": loaded.version,
            "versions": list_versions(loaded.root),
            "method": loaded.method,
            "weights": loaded.manifest["backbone"]["weights"],
            "tasks": loaded.tasks,
        }
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    table = Table(title=f"{loaded.root} {loaded.version} - {loaded.method}, {loaded.weights_label}")
    for col in ("#", "task", "classes", "images", "threshold", "learned"):
        table.add_column(col)
    for i, task in enumerate(loaded.tasks):
        shown = ", ".join(task["classes"][:6]) + (" ..." if len(task["classes"]) > 6 else "")
        table.add_row(str(i), escape(task["name"]), escape(f"{len(task['classes'])}: {shown}"), str(task["n_images"]),
                      f"{task['threshold']:.4g}", task["created_at"])
    out_console().print(table)
    if not loaded.tasks:
        err_console().print("no task learned yet: zero-shot only")


def export(
    bundle: BundleOpt = None,
    tensorrt: Annotated[bool, typer.Option("--tensorrt", help="Build TensorRT engines of the gated and plain graphs (GPU and the trt extra).")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="TensorRT engines in fp16 (default fp32).")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Write a new version with the image encoder quantised to int8 (CPU speed-up, RAIL bundles; classify/bench --precision int8).")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Check the current version's ONNX graphs and, with --tensorrt, build (or reuse cached) TensorRT engines.

    The ONNX graphs themselves are written by init and add-task with every version. --int8 writes
    a new version holding the int8-quantised image encoder and its gated graph (later add-tasks
    keep them in step).
    """
    import onnx
    from edgeclip.export.compose import check_structure

    from edgeclip.layout import GATED_INT8_GRAPH, IMAGE_INT8_GRAPH, graph_file

    loaded = open_bundle(bundle)
    if int8:
        from edgeclip.export.quantize import export_int8

        before = loaded.version
        with progress(quiet) as bar:
            bar.add_task("quantising the image encoder to int8", total=None, info="")
            loaded = export_int8(loaded)
        if not quiet:
            done = f"wrote {loaded.version}" if loaded.version != before else "already present"
            err_console().print(escape(f"{loaded.root}: int8 graphs {done}"), highlight=False)
    table = Table(title=f"{loaded.root} {loaded.version} graphs")
    table.add_column("graph")
    table.add_column("MB", justify="right")
    names = ["graphs/gated.onnx", "graphs/image_encoder.onnx", "graphs/text_encoder.onnx"]
    names += [graph_file(n) for n in (GATED_INT8_GRAPH, IMAGE_INT8_GRAPH) if loaded.has(graph_file(n))]
    for name in names:
        path = loaded.path(name)
        # onnx refuses to read external weights through hard links (inherited files are): check the
        # graph's structure with the weights stood in by inputs; onnxruntime reads them fine.
        check_structure(onnx.load(str(path), load_external_data=False))
        size = sum(p.stat().st_size for p in path.parent.glob(path.stem + ".*"))
        table.add_row(name, f"{size / 1e6:.1f}")
    if tensorrt:
        from edgeclip.edgeapp.bench import warm_up_engines
        from edgeclip.edgeapp.runtime import engine_cache_dir

        with progress(quiet) as bar:
            bar.add_task("building TensorRT engines", total=None, info="")
            warm_up_engines(loaded, "tensorrt", fp16=fp16)
        table.add_row(escape(f"TensorRT engines ({'fp16' if fp16 else 'fp32'}) cached in {engine_cache_dir()}"), "")
    if not quiet:
        out_console().print(table)


def rollback(bundle: BundleOpt = None) -> None:
    """Make the previous bundle version current again (the newer one is kept on disk)."""
    root = bundle_path(bundle)
    version = rollback_bundle(root)
    err_console().print(escape(f"{root}: now at {version}"))


def info(bundle: BundleOpt = None) -> None:
    """Version, available backends, GPU, and a summary of the bundle."""
    from edgeclip.edgeapp.runtime import describe_backends

    table = Table(title=f"edgeclip {__version__}", show_header=False)
    table.add_row("python", platform.python_version())
    table.add_row("platform", f"{platform.system()} {platform.machine()}")
    for key, value in describe_backends().items():
        table.add_row(key, escape(str(value)))
    root = bundle_path(bundle)
    try:
        loaded = Bundle.open(root, verify_hashes=False)
    except Exception as exc:  # info must work without a bundle
        table.add_row("bundle", escape(f"{root}: {exc}"))
    else:
        backbone = loaded.manifest["backbone"]
        table.add_row("bundle", escape(f"{loaded.root} ({loaded.version}; versions {', '.join(list_versions(loaded.root))})"))
        table.add_row("backbone", f"{backbone['model']}, {loaded.weights_label}")
        table.add_row("method", f"{loaded.method} {json.dumps(loaded.manifest['method']['settings'].get('fusion', ''))}")
        table.add_row("tasks", escape(", ".join(t["name"] for t in loaded.tasks)) or "none (zero-shot only)")
        table.add_row("classes", str(len(loaded.learned_classes)))
    out_console().print(table)


def register(app: typer.Typer) -> None:
    app.command()(init)
    app.command("add-task")(add_task)
    app.command()(tasks)
    app.command()(export)
    app.command()(rollback)
    app.command()(info)
