"""Bundle management commands: init, add-task, tasks, export, rollback, info, versions, verify, prune."""

from __future__ import annotations

import json
import platform
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgeclip.bundle import Bundle, current_version, disk_usage, format_size, list_versions
from edgeclip.bundle import rollback as rollback_bundle
from edgeclip.edgeapp.cli.console import err_console, new_table, out_console, progress, stage_reporter
from edgeclip.edgeapp.cli.options import BackendOpt, BundleOpt, QuietOpt, bundle_path, open_bundle, require_bundle
from edgeclip.discover import display_path
from edgeclip.edgeapp.cli.output import Interrupted, is_utf, markup, visible
from edgeclip.errors import UsageError
from edgeclip.layout import RAIL_SOLVER_CACHE
from edgeclip.manifest import (
    DEFAULT_BETA,
    DEFAULT_FUSION,
    DEFAULT_GATE_KIND,
    DEFAULT_HIDDEN,
    DEFAULT_MOE_BATCH_SIZE,
    DEFAULT_MOE_ENCODERS,
    DEFAULT_MOE_EXPERTS,
    DEFAULT_MOE_FREEZE_RULE,
    DEFAULT_MOE_ITERATIONS,
    DEFAULT_MOE_LR,
    full_dict,
)
from edgeclip.train.registry import METHOD_NAMES, get_learner
from edgeclip.version import __version__

# --method's choices: the learner registry's names (rail-primal, rail-dual, moe)
Method = Enum("Method", {name.replace("-", "_"): name for name in METHOD_NAMES}, type=str)  # type: ignore[misc]


class TableOrJson(str, Enum):
    """``--format``: a table for people or JSON for programs."""
    table = "table"
    json = "json"


def init(
    bundle: BundleOpt = None,
    model: Annotated[str, typer.Option(help="open_clip model name, e.g. ViT-B-16, or edgeclip-tiny / edgeclip-small.")] = "ViT-B-16",
    pretrained: Annotated[Optional[str], typer.Option(help="open_clip pretrained tag (e.g. openai) or a local checkpoint file.")] = None,
    random_weights: Annotated[bool, typer.Option("--random-weights", help="Seeded random weights (offline tests and demos only).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the random weights and of the learners.")] = 0,
    method: Annotated[Method, typer.Option(help=f"Continual learner: {', '.join(METHOD_NAMES)}.")] = Method("rail-primal"),
    hidden: Annotated[Optional[int], typer.Option(min=1, show_default=False, help=f"RAIL primal: random hidden layer size (default and paper {DEFAULT_HIDDEN}). add-task folds each new image into the inverse autocorrelation matrix, kept beside the versions in BUNDLE/cache/rail (4*hidden^2 bytes: 0.9 GB at 15000, once more than hidden/8 images are learned; 'prune --solver-cache' frees it), with ~0.5 GB of working memory whatever was learned before.")] = None,
    beta: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, show_default=False, help=f"RAIL: weight of the learned scores in the fusion (default {DEFAULT_BETA}).")] = None,
    fusion: Annotated[Optional[str], typer.Option(show_default=False, help=f"RAIL: 'ddas' (gate by autoencoders) or 'paper' (zero-shot top-1); default '{DEFAULT_FUSION}'.")] = None,
    gate: Annotated[Optional[str], typer.Option(show_default=False, help=f"DDAS autoencoder: 'linear' (closed form, torch-free) or 'mlp'; default '{DEFAULT_GATE_KIND}'.")] = None,
    labels: Annotated[Optional[str], typer.Option(help='Default zero-shot labels, comma separated.')] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="SigLIP and other Hugging Face tokenizer models: their tokenizer.json (or its folder); default: the local Hugging Face cache.")] = None,
    experts: Annotated[Optional[int], typer.Option(min=2, show_default=False, help=f"MoE: experts per block (default: the paper's {DEFAULT_MOE_EXPERTS}).")] = None,
    last_blocks: Annotated[Optional[int], typer.Option(min=1, help="MoE: adapters only in the last N blocks of each encoder (default all).")] = None,
    encoders: Annotated[str, typer.Option(help="MoE: adapted encoders, 'image,text' (paper), 'image' or 'text'.")] = ",".join(DEFAULT_MOE_ENCODERS),
    freeze_rule: Annotated[Optional[str], typer.Option(show_default=False, help=f"MoE activate-freeze: 'strict' (learned tasks never drift) or 'paper'; default '{DEFAULT_MOE_FREEZE_RULE}'.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, show_default=False, help=f"MoE: training batch size (default: the paper's {DEFAULT_MOE_BATCH_SIZE}).")] = None,
    lr: Annotated[Optional[float], typer.Option(min=0.0, show_default=False, help=f"MoE: AdamW learning rate (default {DEFAULT_MOE_LR:g}; paper: 1e-4 to 5e-3 per dataset; --preset moe-paper sets them).")] = None,
    preset: Annotated[Optional[str], typer.Option(help="Every paper default in one word: moe-paper or rail-paper (overrides the options it sets; docs/FULL_SCALE.md lists them).")] = None,
    keep: Annotated[int, typer.Option(min=0, help="Retention: after each new version (add-task, export --int8) keep only the current one and its N-1 nearest ancestors (0: keep all; see 'edgeclip prune').")] = 0,
    quiet: QuietOpt = False,
) -> None:
    """Create a new bundle with no task (zero-shot CLIP only), exporting the frozen encoders to ONNX."""
    from edgeclip.edgeapp.api import create_with_cli_words as create
    from edgeclip.edgeapp.classify import parse_labels
    from edgeclip.train.presets import get_preset

    chosen = get_preset(preset)
    preset_train: dict = {}
    if chosen is not None:
        values = chosen.init_settings()
        method = Method(values["method"])
        seed = values["seed"]
        if get_learner(chosen.method).learns_from_images:
            experts, freeze_rule, batch_size, encoders = (values["experts"], values["freeze_rule"],
                                                          values["batch_size"], values["encoders"])
            preset_train = {"preset": chosen.name, "warmup": chosen.warmup, "warmup_rule": chosen.warmup_rule,
                            "iterations": chosen.iterations_full,
                            "lr_by_dataset": {"full": dict(chosen.lr_full), "few": dict(chosen.lr_few)}}
        else:
            hidden, beta, fusion = values["hidden"], values["beta"], values["fusion"]
    moe = {k: v for k, v in {"n_experts": experts, "last_blocks": last_blocks,
                             "encoders": [e.strip() for e in encoders.split(",") if e.strip()]}.items() if v is not None}
    moe_train = {k: v for k, v in {"freeze_rule": freeze_rule, "batch_size": batch_size, "lr": lr}.items() if v is not None}
    root = bundle_path(bundle)
    from edgeclip.extras import import_torch_module

    backbone = import_torch_module("edgeclip.train.backbone", "edgeclip init (reading open_clip models)")
    model = backbone.canonical_model_name(model)  # an unknown name is a usage error before any progress line
    with progress(quiet) as bar:
        bar.add_task("exporting the frozen encoders", total=None, info="")
        created = create(root, model, pretrained, method=method.value, random_weights=random_weights, seed=seed,
                         zero_shot_labels=parse_labels(labels, None), tokenizer=tokenizer, keep=keep, hidden=hidden,
                         beta=beta, fusion=fusion, gate_kind=gate, moe=moe,
                         moe_train={**moe_train, **preset_train}).bundle
    if not quiet:
        err_console().print(markup(f"created {root} ({created.version}): {model}, {created.weights_label}, method {method.value}"),
                            highlight=False)


def add_task(
    domain_dir: Annotated[Path, typer.Argument(help="Domain folder: DIR/<class>/* or DIR/train/<class>/*.", show_default=False)],
    bundle: BundleOpt = None,
    name: Annotated[Optional[str], typer.Option(help="Task name (default: the folder's name or meta.json's).")] = None,
    shots: Annotated[Optional[int], typer.Option(min=1, help="Use at most K images per class (few-shot).")] = None,
    iterations: Annotated[Optional[int], typer.Option(min=1, help=f"MoE: training iterations (default {DEFAULT_MOE_ITERATIONS}).")] = None,
    lr: Annotated[Optional[float], typer.Option(min=1e-12, help="MoE: this task's learning rate (default: the bundle's, or its preset's rate for the dataset).")] = None,
    device: Annotated[str, typer.Option(help="MoE training device: auto, cpu or cuda.")] = "auto",
    backend: BackendOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Learn a new domain into a new bundle version and re-export the gated graph.

    RAIL learns in closed form from the exported encoder (no torch needed); MoE trains
    adapters with torch (pip install 'edgeclip[train]'). An interrupted add-task leaves
    the previous version intact. Unreadable images are named in a warning and left out;
    each class needs at least 1 readable image and the task at least 3.
    """
    from edgeclip.edgeapp.tasks import add_task as learn

    if device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter(f"expected auto, cpu or cuda, got '{device}'", param_hint="--device")
    if name is not None and not name.strip():
        raise UsageError("--name is empty: give the task a name, or leave --name out to use the folder's")
    root = require_bundle(bundle_path(bundle))
    if lr is not None and not get_learner(Bundle.open(root).method).learns_from_images:
        raise typer.BadParameter("the learning rate applies to MoE bundles only (RAIL learns in closed form)",
                                 param_hint="--lr")
    try:
        with progress(quiet, lines=True) as bar:
            report = stage_reporter(bar)
            learned = learn(root, domain_dir, name=name.strip() if name else None, shots=shots, iterations=iterations,
                            device=device, backend=backend, progress=report, moe_options={"lr": lr, "shots": shots})
    except KeyboardInterrupt as exc:
        raise Interrupted(f"interrupted: nothing was learned; {visible(root)} is still at {current_version(root)}") from exc
    if not quiet:
        task = learned.tasks[-1]
        unreadable = f", {task.unreadable_images} unreadable left out" if task.unreadable_images else ""
        err_console().print(markup(
            f"learned task '{task.name}' ({len(task.classes)} classes, {task.n_images} images{unreadable}) "
            f"-> {learned.root} {learned.version} [{learned.weights_label}]; "
            f"bundle size on disk {format_size(disk_usage(learned.root))}"), highlight=False)


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
            "weights": full_dict(loaded.meta.backbone.weights),
            "tasks": full_dict(loaded.tasks),
        }
        typer.echo(json.dumps(data, indent=2, ensure_ascii=not is_utf(sys.stdout)))
        return
    table = new_table("#", "task", "classes", "images", "threshold", "learned",
                      title=markup(f"{loaded.root} {loaded.version} - {loaded.method}, {loaded.weights_label}"),
                      right=("#", "images", "threshold"))
    for i, task in enumerate(loaded.tasks):
        shown = ", ".join(task.classes[:6]) + (" ..." if len(task.classes) > 6 else "")
        table.add_row(str(i), markup(task.name), markup(f"{len(task.classes)}: {shown}"), str(task.n_images),
                      f"{task.threshold:.4g}", markup(task.created_at or "-"))
    out_console().print(table)
    if not loaded.tasks:
        err_console().print("no task learned yet: zero-shot only")


class ExportPrecision(str, Enum):
    """``export --precision``: the extra graphs to write (fp16; int8 = ``--int8``)."""
    fp16 = "fp16"
    int8 = "int8"


def export(
    bundle: BundleOpt = None,
    tensorrt: Annotated[bool, typer.Option("--tensorrt", help="Build TensorRT engines of the gated and plain graphs (GPU and the trt extra).")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="TensorRT engines in fp16 (default fp32).")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Write a new version with the image encoder quantised to int8 (CPU speed-up, RAIL bundles; classify/bench --precision int8).")] = False,
    precision: Annotated[Optional[ExportPrecision], typer.Option(help="fp16: write a new version with fp16 encoders (the MoE adapted one too) and their gated graph (the decision stays fp32; classify/bench --precision fp16). int8: as --int8.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Check the current version's ONNX graphs and, with --tensorrt, build (or reuse cached) TensorRT engines.

    The ONNX graphs themselves are written by init and add-task with every version. --int8 writes
    a new version holding the int8-quantised image encoder and its gated graph; --precision fp16
    one holding the fp16 encoders and their gated graph (later add-tasks keep them in step).
    --fp16 (with --tensorrt) is TensorRT's own fp16 engine build from the fp32 graph.
    """
    import onnx

    from edgeclip.export.compose import check_structure
    from edgeclip.layout import (
        GATED_FP16_GRAPH,
        GATED_INT8_GRAPH,
        IMAGE_FP16_GRAPH,
        IMAGE_INT8_GRAPH,
        MOE_FP16_GRAPH,
        graph_file,
    )

    if fp16 and not tensorrt:
        raise UsageError("--fp16 applies to TensorRT engines only: add --tensorrt (or leave --fp16 out)")
    loaded = open_bundle(bundle)
    if precision is ExportPrecision.fp16:
        from edgeclip.export.fp16 import export_fp16

        before = loaded.version
        with progress(quiet) as bar:
            bar.add_task("converting the encoders to fp16", total=None, info="")
            loaded = export_fp16(loaded)
        if not quiet:
            done = f"wrote {loaded.version}" if loaded.version != before else "already present"
            err_console().print(markup(f"{loaded.root}: fp16 graphs {done}"), highlight=False)
    if int8 or precision is ExportPrecision.int8:
        from edgeclip.export.quantize import export_int8

        before = loaded.version
        with progress(quiet) as bar:
            bar.add_task("quantising the image encoder to int8", total=None, info="")
            loaded = export_int8(loaded)
        if not quiet:
            done = f"wrote {loaded.version}" if loaded.version != before else "already present"
            err_console().print(markup(f"{loaded.root}: int8 graphs {done}"), highlight=False)
    table = new_table("graph", "MB", title=markup(f"{loaded.root} {loaded.version} graphs"), right=("MB",))
    names = ["graphs/gated.onnx", "graphs/image_encoder.onnx", "graphs/text_encoder.onnx"]
    names += [graph_file(n) for n in (GATED_INT8_GRAPH, IMAGE_INT8_GRAPH, GATED_FP16_GRAPH, IMAGE_FP16_GRAPH,
                                      MOE_FP16_GRAPH) if loaded.has(graph_file(n))]
    for name in names:
        path = loaded.path(name)
        model = onnx.load(str(path), load_external_data=False)
        check_structure(model)  # cheap: the weights stood in by inputs (tests run the full checker)
        data = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        size = path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in data)  # graph store
        table.add_row(name, f"{size / 1e6:.1f}")
    if tensorrt:
        from edgeclip.edgeapp.bench import warm_up_engines
        from edgeclip.edgeapp.runtime import engine_cache_dir

        with progress(quiet) as bar:
            bar.add_task("building TensorRT engines", total=None, info="")
            warm_up_engines(loaded, "tensorrt", fp16=fp16)
        table.add_row(markup(f"TensorRT engines ({'fp16' if fp16 else 'fp32'}) cached in {engine_cache_dir()}"), "")
    if not quiet:
        out_console().print(table)


def rollback(
    bundle: BundleOpt = None,
    to: Annotated[Optional[str], typer.Option("--to", help="Version to make current (e.g. v0002); default: the current version's parent.")] = None,
) -> None:
    """Make an earlier bundle version current again (newer versions stay on disk until 'edgeclip prune --include-newer')."""
    root = require_bundle(bundle_path(bundle))
    if to is not None:
        to = _known_version(root, to)
    version = rollback_bundle(root, to)
    err_console().print(markup(f"{root}: now at {version}"), highlight=False)


def _known_version(root: Path, name: str) -> str:
    """``name`` as the bundle spells it (``v2`` and ``2`` mean ``v0002``); UsageError naming the versions when
    the bundle has no such version."""
    import re

    known = list_versions(root)
    match = re.fullmatch(r"[vV]?0*(\d+)", name.strip())
    wanted = f"v{int(match.group(1)):04d}" if match else name
    if wanted not in known:
        raise UsageError(f"--to {visible(name)}: {visible(display_path(root))} has no version '{visible(name)}'; "
                         f"its versions: {', '.join(known)}")
    return wanted


def info(bundle: BundleOpt = None) -> None:
    """Version, available backends, GPU, and a summary of the bundle (plain "key: value" lines)."""
    from edgeclip.edgeapp.runtime import describe_backends

    rows: list[tuple[str, object]] = [
        ("edgeclip", __version__),
        ("python", platform.python_version()),
        ("platform", f"{platform.system()} {platform.machine()}"),
    ]
    rows += list(describe_backends().items())
    root = bundle_path(bundle)
    try:
        loaded = Bundle.open(root, verify_hashes=False)
    except Exception as exc:  # info must work without a bundle
        rows.append(("bundle", f"{root}: {exc}"))
    else:
        rows += [
            ("bundle", f"{loaded.root} ({loaded.version}; versions {', '.join(list_versions(loaded.root))})"),
            ("backbone", f"{loaded.meta.backbone.model}, {loaded.weights_label}"),
            ("method", f"{loaded.method}, fusion {loaded.meta.method.settings.fusion}"),
            ("tasks", ", ".join(t.name for t in loaded.tasks) or "none (zero-shot only)"),
            ("classes", len(loaded.learned_classes)),
            ("size on disk", format_size(disk_usage(loaded.root))),
        ]
        from edgeclip.edgeapp.rail_solver import RailSolverCache

        solver = RailSolverCache(loaded.root).size()
        if solver:
            rows.append(("solver cache", f"{format_size(solver)} in {RAIL_SOLVER_CACHE} (RAIL primal's inverse, "
                                         "derived: 'edgeclip prune --solver-cache' frees it; the next add-task then "
                                         "folds every learned image once)"))
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        if isinstance(value, (list, tuple)):
            value = ", ".join(str(v) for v in value) or "none"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        typer.echo(visible(f"{key + ':':<{width + 1}} {value}"))


def versions(
    bundle: BundleOpt = None,
    output_format: Annotated[TableOrJson, typer.Option("--format", help="table or json.")] = TableOrJson.table,
) -> None:
    """The bundle's version history: parent, date, tasks, size (all its files) and added (what writing it added:
    the files it did not inherit from its parent; later writes do not change it). JSON also gives own (what
    removing the version would free now)."""
    from edgeclip.bundle import version_history

    root = require_bundle(bundle_path(bundle))
    history = version_history(root)
    total = disk_usage(root)
    if output_format is TableOrJson.json:
        typer.echo(json.dumps({"bundle": str(root), "size_on_disk": total, "versions": history}, indent=2,
                              ensure_ascii=False))
        return
    table = new_table("version", "parent", "created", "tasks", "size", "added", right=("size", "added"),
                      title=markup(f"{root} - {len(history)} versions, {format_size(total)} on disk"))
    for rec in history:
        name = rec["version"] + (" *" if rec["current"] else "")
        if "error" in rec:
            table.add_row(name, "", "", markup(rec["error"]), "", "")
            continue
        table.add_row(name, rec["parent"] or "-", rec["created_at"] or "", markup(", ".join(rec["tasks"])) or "-",
                      format_size(rec["size"]), format_size(rec["added"]))
    out_console().print(table)


def verify(
    bundle: BundleOpt = None,
    version: Annotated[Optional[str], typer.Option(help="Verify only this version (default: every version).")] = None,
) -> None:
    """Hash every file of every version against its manifest (slow on large bundles; other commands
    only check the files they use). Exit 1 when any file is damaged."""
    from edgeclip.bundle import verify_bundle

    root = require_bundle(bundle_path(bundle))
    problems = verify_bundle(root, [version] if version else None)  # versions a concurrent prune removes are skipped
    for _name, problem in problems:
        err_console().print(f"[bold red]damaged:[/] {markup(problem)}", highlight=False)
    if problems:
        raise typer.Exit(1)
    count = 1 if version else len(list_versions(root))
    err_console().print(markup(f"{root}: {count} version(s) intact ({format_size(disk_usage(root))} on disk)"),
                        highlight=False)


def prune(
    bundle: BundleOpt = None,
    keep: Annotated[Optional[int], typer.Option(min=1, help="Versions to keep: the current one and its nearest ancestors (default: the bundle's retention setting, else 1).")] = None,
    save: Annotated[bool, typer.Option("--save", help="Also record --keep as the bundle's retention setting, applied after every later write.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would be removed and kept, and change nothing.")] = False,
    include_newer: Annotated[bool, typer.Option("--include-newer", help="Also remove versions off the current line: work a rollback left behind (newer than the version rolled back to), which you may want back.")] = False,
    solver_cache: Annotated[bool, typer.Option("--solver-cache", help=f"Also delete RAIL primal's solver cache ({RAIL_SOLVER_CACHE}: up to 4*hidden^2 bytes, 0.9 GB at hidden 15000). It is derived: the next add-task folds every learned image into it again, once.")] = False,
) -> None:
    """Remove old versions: the current one's ancestors beyond its KEEP-1 nearest. Kept regardless:
    versions off the current line, left by a rollback (unless --include-newer), the newest intact version when the
    current one is damaged, and versions a running reader holds. Readers are never disturbed."""
    from edgeclip.bundle import run_prune, set_retention

    root = bundle_path(bundle)
    if not (root / "versions").is_dir():
        require_bundle(root)  # nothing there is a bundle: exit 2, as every bundle command (a damaged one stays 1)
    if save and keep is None:
        raise typer.BadParameter("--save needs --keep N", param_hint="--save")
    from edgeclip.edgeapp.rail_solver import RailSolverCache

    solver = RailSolverCache(root)
    if dry_run:
        plan = run_prune(require_bundle(root), keep, include_newer=include_newer, dry_run=True)
        extra = f"; would delete the solver cache ({format_size(solver.size())})" if solver_cache else ""
        typer.echo(visible(f"{root}: {plan.summary(done=False)}{extra} (dry run: nothing changed)"))
        return
    before = disk_usage(root) if (root / "CURRENT").exists() else 0
    if save:
        set_retention(root, keep)
    plan = run_prune(root, keep, include_newer=include_newer)
    cleared = f"; solver cache deleted ({format_size(solver.clear())})" if solver_cache else ""
    after = disk_usage(root)
    err_console().print(markup(f"{root}: {plan.summary(done=True)}{cleared}; {format_size(after)} on disk "
                               f"(freed {format_size(max(0, before - after))})"), highlight=False)


def register(app: typer.Typer) -> None:
    """Add the bundle-management commands to ``app``."""
    app.command()(init)
    app.command("add-task")(add_task)
    app.command()(tasks)
    app.command()(export)
    app.command()(rollback)
    app.command()(info)
    app.command()(versions)
    app.command()(verify)
    app.command()(prune)
