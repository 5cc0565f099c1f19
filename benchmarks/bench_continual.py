"""Continual learning on the five shared domains: X-TAIL and MTIL matrices per method and gate.

    python benchmarks/bench_continual.py [--model edgeclip-small] [--shots 16] [--hidden 4096]
        [--methods rail-primal rail-dual] [--test-per-domain 200] [--out benchmarks/results/]

Order: caltech101, cifar10, dtd10, mnist, fashion_mnist (`../shared/datasets`). Random weights
(seeded; nothing can be downloaded here). For each method the bundle learns the domains in
order through `pipeline.add_task`; `edgeapp/evaluate.py` scores every domain after every step
under MTIL (task known) and X-TAIL (union of all class names) with each RAIL gate (the paper's
zero-shot top-1 rule, DDAS). References: zero-shot (before any step) and a per-domain upper
bound (the same learner, a fresh bundle, that domain alone, scored in the same label space).
Checks that hold whatever the backbone: RAIL's head after the last step equals the head
trained jointly on all domains' features at once (relative weight error and Last accuracy),
and the share of unseen-domain images each gate sends to zero-shot.
Prints tables and writes benchmarks/results/continual.json (machine, date, command, all figures).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import cpu_name
from rich.console import Console
from rich.table import Table

from edgeclip.bundle import Bundle
from edgeclip.edgeapp import eval_scoring, evaluate
from edgeclip.edgeapp import tasks as pipeline
from edgeclip.learned import read_learned
from edgeclip.edgeapp.create import init_bundle
from edgeclip.train.decision import RAIL_KEYS
from edgeclip.train.registry import get_learner

ORDER = ("caltech101", "cifar10", "dtd10", "mnist", "fashion_mnist")
REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"


def extract(datasets: Path, dest: Path) -> list[Path]:
    dirs = []
    for name in ORDER:
        if not (dest / name).is_dir():
            with tarfile.open(datasets / f"{name}.tar") as tar:
                tar.extractall(dest, filter="data")
        dirs.append(dest / name)
    return dirs


def train_features(bundle: Bundle, domains: list[evaluate.EvalDomain], shots: int, seed: int,
                   backend: str) -> tuple[np.ndarray, np.ndarray, int]:
    """The few-shot training embeddings add-task learns from, all domains, global labels."""
    feats, labels, offset = [], [], 0
    for d in domains:
        x, y, _ = pipeline.embed_domain(bundle, pipeline.load_domain(d.learn_dir, shots, seed), backend)
        feats.append(x)
        labels.append(y + offset)
        offset += len(d.classes)
    return np.concatenate(feats), np.concatenate(labels), offset


def joint_check(final: Bundle, feats: np.ndarray, labels: np.ndarray, n_classes: int,
                scorer: eval_scoring.Scorer, gates: list[str]) -> dict[str, Any]:
    """RAIL trained on all domains at once vs learned one domain after another."""
    learner = pipeline.rail_learner(Bundle.open(final.root, version="v0001"))
    learner.add_domain(feats, labels, n_classes)
    learner.solve()
    joint = learner.state()
    learned = read_learned(final)
    keys = RAIL_KEYS[final.method]
    weight = keys[-1]  # w (primal) or alpha (dual)
    a, b = np.asarray(learned[f"rail.{weight}"], np.float64), np.asarray(joint[weight], np.float64)
    swapped = dict(learned)
    for key in keys:
        swapped[f"rail.{key}"] = np.asarray(joint[key], np.float32)
    n = len(final.tasks)
    cont = scorer.score(final, list(range(n)), ["mtil", "xtail"], gates)
    jnt = scorer.score(final, list(range(n)), ["mtil", "xtail"], gates, tensors=swapped)
    return {
        "weights": weight,
        "relative_error": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
        "last_continual": {f"{p}/{g}": float(np.mean(v)) for (p, g), v in cont.accuracy.items()},
        "last_joint": {f"{p}/{g}": float(np.mean(v)) for (p, g), v in jnt.accuracy.items()},
    }


def unseen_share(result: evaluate.ProtocolResult, sizes: list[int]) -> float | None:
    """Of all unseen-domain test images over steps 1..n-1, the percent routed to zero-shot."""
    num = den = 0.0
    for i, stats in enumerate(result.routing):
        unseen = sum(sizes[i + 1:])
        if unseen and stats["unseen_to_zero_shot"] is not None:
            num += stats["unseen_to_zero_shot"] * unseen
            den += unseen
    return num / den if den else None


def run_method(method: str, args: argparse.Namespace, dirs: list[Path], work: Path, per_class: list[int],
               console: Console, shared: dict[str, Any]) -> dict[str, Any]:
    settings = {"hidden": args.hidden, "moe_train": {"batch_size": args.moe_batch_size}}
    closed_form = not get_learner(method).learns_from_images  # RAIL: every gate, scored from the embeddings
    iterations = None if closed_form else args.moe_iterations
    t0 = time.perf_counter()
    source = work / method / "source"
    init_bundle(source, args.model, random_weights=True, seed=args.seed, method=method, **settings)
    init_s = time.perf_counter() - t0
    gates = list(evaluate.GATES) if closed_form else ["ddas"]
    protocols = ["mtil", "xtail"]
    preset = args.preset if closed_form else None  # moe-paper has no lr for cifar10
    run = evaluate.run_protocols(source, dirs, work / method / "run", protocols=protocols, gates=gates,
                                 shots=args.shots, test_per_class=per_class, backend=args.backend,
                                 iterations=iterations, preset=preset)
    beta = run.preset["settings"]["beta"] if run.preset else None
    scorer = eval_scoring.Scorer(run.suite, backend=args.backend, beta=beta)
    sizes = [len(x) for x in run.suite.features]

    upper: dict[str, list[float]] = {}
    upper_s = []
    for j, domain in enumerate(run.suite.domains):
        t1 = time.perf_counter()
        alone = evaluate.copy_bundle(source, work / method / f"upper-{domain.name}")
        bundle = pipeline.add_task(alone, domain.learn_dir, name=domain.name, shots=args.shots, backend=args.backend,
                                   iterations=iterations)
        for (p, g), acc in scorer.score(bundle, [j], protocols, gates).accuracy.items():
            upper.setdefault(f"{p}/{g}", []).append(acc[j])
        upper_s.append(time.perf_counter() - t1)

    out: dict[str, Any] = {
        "method": method, "settings": dataclasses.asdict(settings),
        "init_s": init_s, "results": {}, "preset": run.preset, "upper_bound": upper, "upper_bound_learn_s": upper_s,
        "timing": [vars(t) for t in run.timing], "embed_test_s": run.suite.seconds,
        "shared_class_names": {d.name: list(d.shared) for d in run.suite.domains if d.shared},
    }
    for (p, g), result in run.results.items():
        entry = result.to_dict()
        if p == "xtail":
            entry["unseen_to_zero_shot_pooled"] = unseen_share(result, sizes)
        out["results"][f"{p}/{g}"] = entry
    if closed_form:
        if "train" not in shared:
            shared["train"] = train_features(Bundle.open(source), run.suite.domains, args.shots, args.seed,
                                             args.backend)
        out["joint"] = joint_check(Bundle.open(run.bundle_dir), *shared["train"], scorer, gates)
    else:  # MoE, strict freeze: a learned task's accuracy (task known) never changes after it is learned
        matrix = np.asarray(run.results[("mtil", evaluate.KNOWN_TASK)].matrix)
        out["mtil_learned_columns_unchanged"] = bool(all(
            np.all(matrix[j:, j] == matrix[j, j]) for j in range(matrix.shape[1])))
    shared.setdefault("suite", run.suite)
    print_method(out, run.suite.names, console)
    return out


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def print_method(out: dict[str, Any], names: list[str], console: Console) -> None:
    for key, r in out["results"].items():
        table = Table(title=f"{out['method']} {key}: accuracy % (rows: after learning step i)")
        table.add_column("step")
        for n in names:
            table.add_column(n, justify="right")
        table.add_row("zero-shot", *map(_f, r["zero_shot"]))
        for i, row in enumerate(r["matrix"]):
            table.add_row(f"{i + 1} {names[i]}", *map(_f, row))
        if key in out["upper_bound"]:
            table.add_row("upper bound", *map(_f, out["upper_bound"][key]))
        for m in ("transfer", "average", "last"):
            table.add_row(m, *map(_f, r["per_domain"][m]))
        console.print(table)
    summary = Table(title=f"{out['method']}: headline (means, %)")
    for col in ("protocol/gate", "Transfer", "Average", "Last", "zero-shot", "upper bound", "unseen->zero-shot"):
        summary.add_column(col, justify="right")
    for key, r in out["results"].items():
        summary.add_row(key, _f(r["transfer"]), _f(r["average"]), _f(r["last"]), _f(float(np.mean(r["zero_shot"]))),
                        _f(float(np.mean(out["upper_bound"][key])) if key in out["upper_bound"] else None),
                        _f(r.get("unseen_to_zero_shot_pooled")))
    console.print(summary)
    if "joint" in out:
        j = out["joint"]
        console.print(f"{out['method']}: continual vs joint head, relative error of {j['weights']} = "
                      f"{j['relative_error']:.2e}; Last continual {j['last_continual']} joint {j['last_joint']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=Path, default=DATASETS)
    parser.add_argument("--model", default="edgeclip-small")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=4096, help="RAIL primal hidden size")
    parser.add_argument("--methods", nargs="+", default=["rail-primal", "rail-dual"])
    parser.add_argument("--test-per-domain", type=int, default=200,
                        help="about this many test images per domain (floor(N / classes) per class, at least 1)")
    parser.add_argument("--moe-iterations", type=int, default=100, help="MoE training iterations per task")
    parser.add_argument("--moe-batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default=None,
                        help="rail-paper: the paper's per-run settings for the RAIL methods (fusion weight, one "
                             "template, duplicate names kept); the bundle keeps --hidden and --seed")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    console = Console(width=160)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgeclip-bench-") as tmp:
        work = args.work or Path(tmp)
        dirs = extract(args.datasets, work / "datasets")
        per_class = []
        for d in dirs:
            n_classes = len([p for p in (d / "test").iterdir() if p.is_dir()])
            per_class.append(max(1, args.test_per_domain // n_classes))
        shared: dict[str, Any] = {}
        methods = [run_method(m, args, dirs, work, per_class, console, shared) for m in args.methods]
    record = {
        "benchmark": "continual",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "model": args.model, "weights": f"random (seed {args.seed})", "shots": args.shots,
        "domains": list(ORDER), "test_per_class": per_class,
        "test_images": [len(x) for x in shared["suite"].features],
        "wall_s": time.perf_counter() - started,
        "methods": methods,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("continual.json" if not args.preset else f"continual_{args.preset}.json")
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    console.print(f"wrote {path} ({record['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
