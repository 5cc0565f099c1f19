"""MoE add-task's fixed cost (everything but the training steps), before and after, in one run.

    python benchmarks/bench_moe_add_task.py [--model edgeclip-small] [--domains dtd10,mnist] [--shots 16]
        [--iterations 5] [--batch 16] [--base a146dfb] [--out benchmarks/results/moe_add_task.json]

Two code versions run side by side: `--base` (default a146dfb, the commit the GPU figures of issue 21
were measured on), checked out with `git worktree` into a temporary folder and imported from there,
and this checkout. Each gets its own bundle (`edgeclip init`, untimed), then learns the same domains
one after another (`edgeclip add-task`, each in a fresh process, the two versions interleaved so that
load from other processes hits both alike). Per add-task: wall time of the command, the training
loop's own time (iterations x batch / the images per second the bundle records), and the fixed cost
= wall - training loop: start-up and imports, loading the backbone, the strict rule's selections,
embedding the domain, text classifiers, the gate, exporting the adapted encoder, composing the gated
graph, writing the version. The first task traces the adapted encoder in both versions; later tasks
fill the parent's graph template in this checkout.

Backbone: seeded random weights (no pretrained weights can be downloaded here); the cost does not
depend on the weights' values. Images: the first `--shots` training images per class of the shared
datasets. Prints a table and writes JSON (machine, date, command, figures).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_add_task import extract_train_split
from common import cpu_name, write_report

REPO = Path(__file__).resolve().parents[1]

# Runs the edgeclip CLI of the checkout at argv[1]: its packages are imported from there (the layout's
# package-dir mapping), ahead of the editable install of this checkout.
RUNNER = r"""
import importlib.machinery, importlib.util, sys
root = sys.argv.pop(1)
dirs = {"edgeclip": "edgeclip", "edgeclip.edgeapp": "edgeapp", "edgeclip.train": "train",
        "edgeclip.export": "export", "edgeclip.models": "models"}

class Checkout:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name in dirs:
            folder = f"{root}/{dirs[name]}"
            return importlib.util.spec_from_file_location(name, f"{folder}/__init__.py",
                                                          submodule_search_locations=[folder])
        if name.startswith("edgeclip."):
            parent = sys.modules[name.rpartition(".")[0]]
            return importlib.machinery.PathFinder.find_spec(name, list(parent.__path__))
        return None

sys.meta_path.insert(0, Checkout)
import edgeclip.train
assert edgeclip.train.__path__[0].startswith(root), edgeclip.train.__path__
sys.argv = ["edgeclip"] + sys.argv[1:]
from edgeclip.edgeapp.cli.app import main
main()
"""


def run_cli(checkout: Path, args: list[str]) -> float:
    """Wall seconds of one edgeclip command of ``checkout`` in a fresh process."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RUNNER, str(checkout), *args, "--quiet"],
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"edgeclip {' '.join(args)} ({checkout}) failed:\n{done.stderr[-3000:]}")
    return elapsed


def training_seconds(bundle: Path, batch: int) -> tuple[float, int]:
    """The last task's training-loop seconds and image count, from the current version's manifest."""
    version = (bundle / "CURRENT").read_text().strip()
    task = json.loads((bundle / "versions" / version / "manifest.json").read_text())["tasks"][-1]
    training = task["training"]
    return training["iterations"] * batch / training["images_per_s"], int(task["n_images"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="edgeclip-small")
    parser.add_argument("--domains", default="dtd10,mnist")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--base", default="a146dfb")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "moe_add_task.json")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-moe-add-") as tmp:
        work = Path(tmp)
        base = work / "base"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base), args.base],
                       check=True, capture_output=True)
        try:
            versions = {f"base {args.base}": base, "this checkout": REPO}
            domains = [extract_train_split(d, args.shots, work / "data") for d in args.domains.split(",")]
            bundles = {}
            for label, checkout in versions.items():
                bundles[label] = work / f"bundle-{len(bundles)}"
                run_cli(checkout, ["init", "--bundle", str(bundles[label]), "--model", args.model,
                                   "--random-weights", "--method", "moe", "--batch-size", str(args.batch)])
            for number, domain in enumerate(domains, start=1):
                for label, checkout in versions.items():
                    wall = run_cli(checkout, ["add-task", str(domain), "--bundle", str(bundles[label]),
                                              "--iterations", str(args.iterations), "--device", "cpu"])
                    train, images = training_seconds(bundles[label], args.batch)
                    rows.append({"version": label, "task": number, "domain": domain.name, "images": images,
                                 "wall_s": round(wall, 2), "training_loop_s": round(train, 2),
                                 "fixed_s": round(wall - train, 2)})
                    print(f"task {number} {domain.name:8s} {label:22s} wall {wall:6.1f} s  training {train:5.1f} s"
                          f"  fixed {wall - train:6.1f} s", flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], capture_output=True)

    base_label = f"base {args.base}"
    print(f"\n{'task':>4} {'domain':8} {'version':22} {'wall s':>7} {'train s':>8} {'fixed s':>8} {'fixed/base':>10}")
    for row in rows:
        ref = next(r for r in rows if r["task"] == row["task"] and r["version"] == base_label)
        row["fixed_vs_base"] = round(row["fixed_s"] / ref["fixed_s"], 3)
        print(f"{row['task']:>4} {row['domain']:8} {row['version']:22} {row['wall_s']:7.1f} {row['training_loop_s']:8.1f}"
              f" {row['fixed_s']:8.1f} {row['fixed_vs_base']:10.2f}")
    report = {
        "benchmark": "bench_moe_add_task",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "note": "shared machine under load from other developers; compare within one run"},
        "settings": {"model": args.model, "weights": "random (seed 0)", "domains": args.domains, "shots": args.shots,
                     "iterations": args.iterations, "batch": args.batch, "device": "cpu", "base": args.base},
        "rows": rows,
    }
    write_report(args.out, report)


if __name__ == "__main__":
    main()
