"""``edgeclip demo``: the whole flow offline in one command, through the library (not the
other commands): generate two image domains, create a bundle, learn both domains one after
the other, classify new images of both and images of no learned domain, and say how it went.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Annotated

import typer

from edgeclip.edgeapp.cli.commands_manage import Method
from edgeclip.edgeapp.cli.console import err_console, new_table, out_console, progress, stage_reporter
from edgeclip.edgeapp.cli.options import QuietOpt
from edgeclip.edgeapp.cli.output import markup
from edgeclip.edgeapp.cli.results import shown_label
from edgeclip.errors import UsageError

MARKER = ".edgeclip-demo"  # written into --dir: a re-run may replace what the demo wrote there
DEMO_HIDDEN = 2000  # enough for the demo's few images (a smaller W_r: a smaller, faster gated graph)
DEMO_ITERATIONS = 60  # MoE training iterations per domain


def prepare_dir(directory: Path) -> None:
    """Make ``directory`` ready for a (re-)run: a folder the demo wrote before is emptied of the
    demo's images and bundle; any other non-empty folder is refused (UsageError)."""
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"--dir {directory} is a file; give a folder for the demo")
    if directory.is_dir() and any(directory.iterdir()):
        if not (directory / MARKER).is_file():
            raise UsageError(f"--dir {directory} holds files the demo did not write; give an empty or new folder")
        for name in ("bundle", "images"):
            shutil.rmtree(directory / name, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MARKER).write_text("written by 'edgeclip demo'; a new run replaces bundle/ and images/\n",
                                    encoding="utf-8")


def demo(
    directory: Annotated[Path, typer.Option("--dir", help="Where the demo writes its images and bundle (re-running replaces them).")] = Path("demo"),
    model: Annotated[str, typer.Option(help="open_clip model name.")] = "edgeclip-tiny",
    pretrained: Annotated[str, typer.Option(help="Pretrained tag or checkpoint; empty = seeded random weights.")] = "",
    method: Annotated[Method, typer.Option(help="The learner: rail-primal, rail-dual or moe.")] = Method("rail-primal"),
    quiet: QuietOpt = False,
) -> None:
    """The whole flow offline in one command: generate two image domains (shapes, stripes),
    create a bundle, learn both domains one after the other, then classify new images of both
    and images of no learned domain, each shown beside its expected label and route.

    Without --pretrained the backbone has seeded random weights (no download is possible
    offline): the demo's images are made so that even then the gate routes them right, but
    the numbers show the mechanics, not CLIP's accuracy. Re-running with the same --dir
    replaces what the previous run wrote.
    """
    from edgeclip.edgeapp.api import create_with_cli_words as create
    from edgeclip.edgeapp.demo_data import UNSEEN, write_demo
    from edgeclip.extras import require_torch

    require_torch("edgeclip demo (creating a bundle from an open_clip model)")
    prepare_dir(directory)
    say = (lambda text: None) if quiet else (lambda text: err_console().print(markup(text), highlight=False))
    images = write_demo(directory / "images")
    bundle_dir = directory / "bundle"
    weights = pretrained or "seeded random weights"
    say(f"1. wrote two domains of training images and a query folder under {directory / 'images'}")
    with progress(quiet, lines=True) as bar:
        bar.add_task(f"exporting {model} ({weights})", total=None, info="")
        clf = create(bundle_dir, model, pretrained or None, method=method.value, random_weights=not pretrained,
                     hidden=DEMO_HIDDEN)
    say(f"2. created the bundle {bundle_dir}: {model}, {weights}, learner {method.value}")
    for step, domain in enumerate(images.domains, 3):
        with progress(quiet, lines=True) as bar:
            clf = clf.add_task(None, domain, iterations=DEMO_ITERATIONS, progress=stage_reporter(bar))
        task = clf.tasks[-1]
        say(f"{step}. learned task '{task.name}' ({', '.join(task.classes)}; {task.n_images} images) "
            f"-> version {clf.version}")
    step = 3 + len(images.domains)
    loaded = clf.bundle
    files = sorted(images.query.iterdir())
    preds = clf.classify(files, top_k=3)
    say(f"{step}. classified the {len(preds)} images of {images.query}:")

    table = new_table("image", "expected", "predicted", "ok", "route", "expected route",
                      title=markup(f"{bundle_dir} {loaded.version}: {model}, {loaded.weights_label}"))
    right = total = routed = unseen_total = unseen_zero = 0
    for pred in preds:
        name = os.path.basename(pred.path)
        label, domain = images.expected.get(name, (None, UNSEEN))
        expected_route = "zero-shot" if domain == UNSEEN else domain
        if domain == UNSEEN:
            unseen_total += 1
            unseen_zero += pred.route == "zero-shot"
            ok = "-"
        else:
            total += 1
            right += pred.label == label
            routed += pred.route == domain
            ok = "yes" if pred.label == label else "NO"
        table.add_row(markup(name), markup(label or "(no learned class)"), markup(shown_label(pred) if pred.label else pred.error or ""), ok,
                      markup(pred.route or ""), expected_route)
    out_console().print(table)
    if quiet:
        return
    summary = [
        f"accuracy on the learned domains: {right}/{total} ({100 * right / max(total, 1):.0f}%)",
        f"routing: {routed}/{total} images of a learned domain went to their task; "
        f"{unseen_zero}/{unseen_total} unseen images went to zero-shot",
    ]
    if loaded.random_weights:
        summary.append("random weights: the images were made easy to tell apart; with real CLIP weights "
                       "(--pretrained openai) the same flow works on photos")
    summary += [
        "look at: 'route' - the DDAS gate sends each image to the task it belongs to, and images of no "
        "learned domain to zero-shot CLIP; 'predicted' beside 'expected' - what each task learned",
        f"next: edgeclip tasks --bundle {bundle_dir}; edgeclip classify YOUR_IMAGES --bundle {bundle_dir}; "
        f"edgeclip add-task YOUR_DOMAIN --bundle {bundle_dir}",
    ]
    for line in summary:
        say(line)


def register(app: typer.Typer) -> None:
    """Add the demo commands to ``app``."""
    app.command()(demo)
