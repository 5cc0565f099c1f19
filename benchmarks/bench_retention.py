"""The store under retention: what the safety rules cost a write and a reader.

    python benchmarks/bench_retention.py [--graph-mb 256] [--repeats 5] [--out benchmarks/results/retention.json]

Builds a bundle whose graph store holds one real ONNX graph with a GRAPH_MB weights file (seeded
constant weights: the timings do not depend on their values), sets retention keep 1, and measures in
interleaved rounds (median ms):

- a commit with retention keep 1: a new version (one small tensor file), then the prune plan, which
  checks that the current version is intact (stamps honoured) before removing the parent. "stamps
  carried": the new version keeps the stamps of the shared graph its parent verified (what the writer
  does); "stamps dropped": the same with the stamp cache emptied first, so the check hashes the graph
  (what it would cost without carrying them);
- ``plan_prune`` alone (``edgeclip prune --dry-run``);
- ``Bundle.open`` + release (manifest read and hashed for the compare-and-swap identity, one lstat per
  file, the reader lease: a directory fd and a shared flock).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import cpu_name, time_interleaved

REPO = Path(__file__).resolve().parents[1]
BASE = {"backbone": {"model": "m", "weights": {"kind": "random", "ref": "0"}},
        "preprocess": {"image_size": 8, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        "method": {"name": "rail-primal"}}


def make_graph(folder: Path, mb: int) -> Path:
    """y = x + w with w (mb MB of float32) in the external file g.data."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = mb * (1 << 20) // 4
    weight = numpy_helper.from_array(np.ones(n, np.float32), "w")
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])], [weight])
    folder.mkdir(parents=True)
    onnx.save_model(helper.make_model(graph), str(folder / "g.onnx"), save_as_external_data=True,
                    location="g.data", size_threshold=0)
    return folder / "g.onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--graph-mb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "retention.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-retention-"))
    stamps = work / "stamps"
    os.environ["EDGECLIP_STAMPS_DIR"] = str(stamps)
    from edgeclip.bundle import Bundle, create_bundle, plan_prune, set_retention

    root = work / "bundle"
    try:
        with create_bundle(root, dict(BASE)) as writer:
            writer.write_tensors("learned.safetensors", {"w": np.zeros((3, 4), np.float32)})
            writer.write_graph("graphs/g.onnx", make_graph(work / "src", args.graph_mb))
        set_retention(root, 1)
        counter = iter(range(10**6))

        def use_graph() -> None:  # a reader (add-task's embedding, classify) uses and stamps the graph
            bundle = Bundle.open(root)
            bundle.path("graphs/g.onnx"), bundle.path("graphs/g.data")
            bundle.release()

        def commit() -> None:
            with Bundle.open(root).new_version() as writer:
                writer.write_tensors("learned.safetensors", {"w": np.full((3, 4), next(counter), np.float32)})

        def carried() -> None:
            use_graph()
            commit()

        def dropped() -> None:
            use_graph()
            shutil.rmtree(stamps, ignore_errors=True)
            commit()

        def open_release() -> None:
            Bundle.open(root).release()

        results = time_interleaved({"commit + retention keep 1, stamps carried": carried,
                                    "commit + retention keep 1, stamps dropped": dropped,
                                    "plan_prune (prune --dry-run)": lambda: plan_prune(root, 1),
                                    "Bundle.open + release": open_release}, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'graph weights':<48} {args.graph_mb} MB, medians of {args.repeats} interleaved rounds")
    for name, ms in results.items():
        print(f"{name:<48} {ms:9.1f} ms")
    record = {"date": dt.date.today().isoformat(), "machine": f"{cpu_name()}, {os.cpu_count()} cores, "
              f"{platform.system()} (shared with other developers: compare ratios)", "command": " ".join(sys.argv),
              "graph_mb": args.graph_mb, "repeats": args.repeats, "median_ms": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
