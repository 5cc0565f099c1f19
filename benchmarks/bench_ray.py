"""Rows per second of the Ray path (`edgeclip.distributed`, 1 and 2 actors on a local Ray) beside the
single process (`Classifier.classify_iter`) on the same real images, and the driver's memory.

    .venv/bin/python benchmarks/bench_ray.py [--images 600] [--model edgeclip-tiny] [--cpus 2]

Images: the first N test images of caltech101 (../shared/datasets, longest side 224, JPEG). The bundle is
created with seeded random weights (no pretrained weights offline): the timings measure the pipeline, the
predictions mean nothing. Each Ray run is timed twice: end to end (from the call to the last row, actor
start-up and session creation included), with the time to its first row (Ray computes ahead and keeps
input order, so rows arrive in bursts: no steady rate is reported). The driver's RSS is
sampled every 20 ms; "driver peak" is its highest value during the run minus the value before it.
Prints a table and writes benchmarks/results/bench_ray.json.
"""

from __future__ import annotations

import argparse
import json
import tarfile
import tempfile
import threading
import time
from pathlib import Path

from common import cpu_name

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


class PeakRss:
    """The process's highest RSS (MB) while the block runs, above its RSS at the start."""

    def __enter__(self) -> "PeakRss":
        self.start, self.peak, self._stop = rss_mb(), 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mb() - self.start)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb() - self.start)


def extract(n: int, dest: Path) -> list[Path]:
    files: list[Path] = []
    with tarfile.open(DATASETS / "caltech101.tar") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and "/test/" in m.name
                          and m.name.endswith((".jpg", ".png"))), key=lambda m: m.name)[:n]
        tar.extractall(dest, members=members, filter="data")
    files = sorted(p for p in dest.rglob("*") if p.is_file())
    return files


def timed_rows(batches) -> tuple[int, float, float]:
    """(rows, seconds to the last row, seconds to the first row)."""
    start = time.perf_counter()
    first = None
    rows = 0
    for batch in batches:
        rows += len(batch)
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return rows, end - start, (first or end) - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--model", default="edgeclip-tiny")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_ray.json")
    args = parser.parse_args()

    import edgeclip
    from edgeclip.edgeapp.distributed import RaySession

    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        files = extract(args.images, Path(tmp) / "images")
        bundle = Path(tmp) / "bundle"
        t0 = time.perf_counter()
        edgeclip.create(bundle, args.model, random_weights=True, seed=0,
                        zero_shot_labels=["airplane", "face", "motorbike", "leopard", "watch", "car"])
        print(f"bundle {args.model} created in {time.perf_counter() - t0:.0f} s; {len(files)} images")
        clf = edgeclip.load(bundle, backend="ort-cpu")
        results = []

        def single() -> dict:
            with PeakRss() as mem:
                rows, total, first = timed_rows([p] for p in clf.classify_iter(files, batch_size=args.batch_size))
            return {"path": "single process (classify_iter)", "actors": None, "rows": rows, "total_s": total,
                    "first_row_s": first, "driver_peak_mb": mem.peak}

        list(clf.classify_iter(files[:64], batch_size=args.batch_size))  # warm: sessions, caches
        results.append(single())
        t0 = time.perf_counter()
        session = RaySession.start(None, args.cpus)
        ray_start = time.perf_counter() - t0
        try:
            for actors in (1, 2, 1, 2):  # twice each: the second run finds worker processes started
                cpus = min(1.0, (args.cpus - 1) / actors)  # one CPU is kept for the decoding tasks
                with PeakRss() as mem:
                    ds = edgeclip.distributed.classify_dataset(files, bundle, batch_size=args.batch_size,
                                                               actors=actors, cpus_per_actor=cpus)
                    from edgeclip.edgeapp.distributed import iter_prediction_batches

                    rows, total, first = timed_rows(iter_prediction_batches(ds))
                results.append({"path": f"Ray, {actors} actor{'s' if actors > 1 else ''} x {cpus:g} CPU",
                                "actors": actors, "rows": rows, "total_s": total, "first_row_s": first,
                                "driver_peak_mb": mem.peak})
        finally:
            session.close()
        results.append(single())

    print(f"\n{cpu_name()}; local Ray with {args.cpus} CPUs (started in {ray_start:.1f} s); model {args.model} "
          f"(random weights); {len(files)} caltech101 images; batch {args.batch_size}")
    print(f"{'path':38} {'rows':>5} {'rows/s end-to-end':>18} {'first row s':>12} {'driver peak MB':>15}")
    for r in results:
        r["rows_per_s"] = r["rows"] / r["total_s"]
        print(f"{r['path']:38} {r['rows']:>5} {r['rows_per_s']:>18.1f} {r['first_row_s']:>12.1f} "
              f"{r['driver_peak_mb']:>15.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "model": args.model, "weights": "random (seeded)", "images": len(files), "batch_size": args.batch_size,
              "ray_cpus": args.cpus, "ray_start_s": ray_start, "runs": results}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
