"""add-task cost: wall time, images per second and peak memory of learning one domain, per method.

    python benchmarks/bench_add_task.py [--model edgeclip-small] [--domain cifar10] [--shots 16]
        [--moe-iterations 20] [--out benchmarks/results/add_task.json]

Each configuration runs `edgeclip add-task` in a fresh process (after an untimed `edgeclip init`),
so its peak resident memory (ru_maxrss) is its own. Backbone: seeded random weights (no pretrained
weights can be downloaded here); the cost does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from common import write_report

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"


def extract_train_split(name: str, shots: int, dest: Path) -> Path:
    """The first `shots` training images of every class of a shared dataset."""
    taken: dict[str, int] = {}
    with tarfile.open(DATASETS / f"{name}.tar") as tar:
        members = []
        for member in tar.getmembers():
            parts = member.name.split("/")
            if len(parts) == 4 and parts[1] == "train" and member.isfile() and taken.get(parts[2], 0) < shots:
                taken[parts[2]] = taken.get(parts[2], 0) + 1
                members.append(member)
        tar.extractall(dest, members=members, filter="data")
    return dest / name


PEAK_WRAPPER = """
import atexit, resource, sys
atexit.register(lambda: print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr))
sys.argv = ["edgeclip"] + sys.argv[1:]
from edgeclip.edgeapp.cli.app import main
main()
"""


def run_edgeclip(args: list[str]) -> tuple[float, int]:
    """Wall seconds and peak resident memory (MB) of one edgeclip command in a child process."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *args, "--quiet"], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"edgeclip {' '.join(args)} failed:\n{done.stderr}")
    peak_kb = int(done.stderr.split("PEAK_KB")[-1].split()[0])
    return elapsed, peak_kb // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="edgeclip-small")
    parser.add_argument("--domain", default="cifar10")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--moe-iterations", type=int, default=20)
    parser.add_argument("--moe-batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "add_task.json")
    args = parser.parse_args()

    configs = [
        ("rail-dual", ["--method", "rail-dual"]),
        ("rail-primal h=2048", ["--method", "rail-primal", "--hidden", "2048"]),
        ("moe", ["--method", "moe", "--batch-size", str(args.moe_batch)]),
        ("rail-primal h=15000", ["--method", "rail-primal", "--hidden", "15000"]),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        domain = extract_train_split(args.domain, args.shots, Path(tmp) / "data")
        n_images = sum(1 for p in domain.rglob("*") if p.is_file() and p.name != "meta.json")
        for label, init_args in configs:
            bundle = Path(tmp) / label.replace(" ", "_").replace("=", "")
            subprocess.run([sys.executable, "-m", "edgeclip.edgeapp.cli.app", "init", "--bundle", str(bundle),
                            "--model", args.model, "--random-weights", *init_args, "--quiet"], check=True)
            extra = ["--iterations", str(args.moe_iterations)] if label == "moe" else []
            seconds, peak_mb = run_edgeclip(["add-task", str(domain), "--bundle", str(bundle), *extra])
            row = {"config": label, "images": n_images, "seconds": round(seconds, 2),
                   "images_per_s": round(n_images / seconds, 1), "peak_rss_mb": peak_mb}
            if label == "moe":
                manifest = json.loads((bundle / "versions" / "v0002" / "manifest.json").read_text())
                training = manifest["tasks"][0]["training"]
                row["moe_train_images_per_s"] = round(training["images_per_s"], 1)
                row["moe_s_per_iteration"] = round(args.moe_batch / training["images_per_s"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(f"\n{'config':22} {'images':>6} {'seconds':>8} {'images/s':>9} {'peak MB':>8}  MoE s/iter")
    for r in rows:
        print(f"{r['config']:22} {r['images']:>6} {r['seconds']:>8} {r['images_per_s']:>9} {r['peak_rss_mb']:>8}  "
              f"{r.get('moe_s_per_iteration', '')}")
    report = {
        "benchmark": "add_task",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "model": f"{args.model} (random weights, seed 0)",
        "domain": f"{args.domain}, {args.shots} shots per class",
        "moe": f"{args.moe_iterations} iterations at batch {args.moe_batch}",
        "rows": rows,
    }
    write_report(args.out, report)


if __name__ == "__main__":
    main()
