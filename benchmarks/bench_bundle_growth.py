"""Disk and RAM at the paper's defaults: three 16-shot RAIL primal tasks (hidden 15000) on one bundle.

    python benchmarks/bench_bundle_growth.py [--model edgeclip-small] [--shots 16]
        [--domains dtd10 cifar10 fashion_mnist] [--method rail-primal] [--int8]
        [--out benchmarks/results/bundle_growth.json]

`edgeclip init` (default settings: RAIL primal, hidden 15000, DDAS linear gate), then one
`edgeclip add-task` per domain (first `shots` training images of every class of the shared real
image sets), each in a fresh process so that its peak resident memory (ru_maxrss) is its own.
After every step: the bundle's size on disk (allocated blocks of every file, each inode once)
and what the step added. `--int8` adds an `edgeclip export --int8` step after init.
Backbone: seeded random weights (no pretrained weights can be downloaded here); sizes and
memory do not depend on the weights' values. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from bench_add_task import extract_train_split, run_edgeclip
from common import cpu_name, write_report


def disk_bytes(root: Path) -> int:
    """Bytes the bundle folder occupies (st_blocks * 512 of every file, hard links counted once)."""
    seen, total = set(), 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def largest_files(root: Path, n: int = 6) -> list[dict]:
    rows = [{"path": str(p.relative_to(root)), "bytes": p.stat().st_size} for p in root.rglob("*") if p.is_file()]
    return sorted(rows, key=lambda r: -r["bytes"])[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="edgeclip-small")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--domains", nargs="+", default=["dtd10", "cifar10", "fashion_mnist"])
    parser.add_argument("--method", default="rail-primal")
    parser.add_argument("--int8", action="store_true", help="export the int8 graphs after init")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bundle_growth.json"))
    args = parser.parse_args()

    steps = []
    with tempfile.TemporaryDirectory(prefix="edgeclip-growth-") as tmp:
        tmp_dir = Path(tmp)
        root = tmp_dir / "bundle"
        wall, peak = run_edgeclip(["init", "--bundle", str(root), "--model", args.model, "--random-weights",
                                   "--method", args.method])
        steps.append({"step": "init", "wall_s": wall, "peak_rss_mb": peak, "disk_bytes": disk_bytes(root)})
        if args.int8:
            wall, peak = run_edgeclip(["export", "--bundle", str(root), "--int8"])
            steps.append({"step": "export --int8", "wall_s": wall, "peak_rss_mb": peak, "disk_bytes": disk_bytes(root)})
        for name in args.domains:
            domain = extract_train_split(name, args.shots, tmp_dir / "data" / name)
            wall, peak = run_edgeclip(["add-task", str(domain), "--bundle", str(root)])
            steps.append({"step": f"add-task {name}", "wall_s": wall, "peak_rss_mb": peak,
                          "disk_bytes": disk_bytes(root)})
        manifest = json.loads((root / "versions" / (root / "CURRENT").read_text().strip() / "manifest.json").read_text())
        files = largest_files(root)
    base = steps[1 if args.int8 else 0]["disk_bytes"]
    added = steps[-1]["disk_bytes"] - base
    print(f"{'step':<24} {'wall s':>7} {'peak RSS MB':>11} {'bundle MB':>10} {'added MB':>9}")
    previous = 0
    for row in steps:
        row["added_bytes"] = row["disk_bytes"] - previous
        previous = row["disk_bytes"]
        print(f"{row['step']:<24} {row['wall_s']:>7.1f} {row['peak_rss_mb']:>11} {row['disk_bytes'] / 1e6:>10.1f} "
              f"{row['added_bytes'] / 1e6:>9.1f}")
    print(f"{len(args.domains)} tasks added {added / 1e6:.1f} MB; largest add-task peak "
          f"{max(r['peak_rss_mb'] for r in steps if r['step'].startswith('add-task'))} MB")
    report = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "weights": "random (seeded); sizes and memory do not depend on the weights' values",
        "settings": {"model": args.model, "method": args.method, "shots": args.shots,
                     "hidden": manifest["method"]["settings"].get("hidden"), "domains": args.domains},
        "steps": steps,
        "tasks_added_bytes": added,
        "largest_files": files,
    }
    write_report(args.out, report)


if __name__ == "__main__":
    main()
