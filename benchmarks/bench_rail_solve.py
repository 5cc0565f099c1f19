"""Time and memory of RAIL primal's steps per hidden size: remembering a domain and folding it into
the solution (recursive least squares on the inverse, in memory here; see edgeclip.train.rail.RailPrimal).

    python benchmarks/bench_rail_solve.py [--hidden 1000 2500 5000 10000 15000] [--images 1024]
        [--dim 512] [--classes 100] [--out benchmarks/results/rail_solve.json]

Prints a table and writes JSON (machine, date, command, rows).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import scipy
from common import cpu_name, write_report

from edgeclip.train.rail import RailPrimal


def bench(hidden: int, images: int, dim: int, classes: int) -> dict:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(images, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = rng.integers(0, classes, size=images)
    model = RailPrimal(dim, hidden=hidden)
    start = time.perf_counter()
    model.add_domain(x, labels, classes)
    accumulate = time.perf_counter() - start
    start = time.perf_counter()
    model.solve()
    solve = time.perf_counter() - start
    start = time.perf_counter()
    model.scores(x)
    scores = time.perf_counter() - start
    mem = model.memory_bytes()
    return {"hidden": hidden, "images": images, "dim": dim, "classes": classes,
            "accumulate_s": accumulate, "accumulate_s_per_1000_images": accumulate * 1000 / images,
            "solve_s": solve, "scores_ms_per_image": scores * 1000 / images,
            "state_bytes": mem["x"], "peak_learning_bytes": mem["solve_peak"] + mem["x"] + mem["w_r"] + mem["inverse"],
            "inference_bytes": mem["w_r"] + mem["w"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, nargs="+", default=[1000, 2500, 5000, 10000, 15000])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/rail_solve.json"))
    args = parser.parse_args()
    rows = []
    print(f"{'hidden':>7} {'state (MB)':>10} {'peak learn (GB)':>15} {'infer (MB)':>10} "
          f"{'accum s/1k img':>14} {'solve s':>8} {'scores ms/img':>13}")
    for hidden in args.hidden:
        row = bench(hidden, args.images, args.dim, args.classes)
        rows.append(row)
        print(f"{hidden:>7} {row['state_bytes'] / 1e6:>10.2f} {row['peak_learning_bytes'] / 1e9:>15.2f} "
              f"{row['inference_bytes'] / 1e6:>10.1f} {row['accumulate_s_per_1000_images']:>14.2f} "
              f"{row['solve_s']:>8.2f} {row['scores_ms_per_image']:>13.3f}", flush=True)
    report = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "numpy": np.__version__, "scipy": scipy.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "rows": rows,
    }
    write_report(args.out, report)


if __name__ == "__main__":
    main()
