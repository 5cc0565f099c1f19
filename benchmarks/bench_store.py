"""Bundle store: how long opening a bundle takes, and classifying one image against `edgeclip --help`.

    python benchmarks/bench_store.py [--bundle DIR] [--model edgeclip-small] [--hidden 15000]
        [--domain dtd10] [--shots 16] [--repeats 7] [--keep-work] [--out benchmarks/results/store.json]

Without --bundle it makes one with the defaults (`edgeclip init --model MODEL --random-weights`,
RAIL primal, hidden 15000) and learns one 16-shot task (a shared dataset, or the demo images where
../shared is absent), so that the version also holds the RAIL learning state, which classify never
reads. Then it measures, in interleaved rounds (median ms):

- `Bundle.open` in-process (manifest read and validated, one lstat per file), the first use of the
  files classify needs with stamps (warm) and without (cold: hashed), and the full hash of every file
  (`Bundle.verify`, what every command paid before the store kept stamps);
- wall time of fresh processes: `edgeclip --help`, `edgeclip tasks`, `edgeclip classify ONE_IMAGE`,
  and a bare `python -c "import <the classify path's modules>"` (the share of imports);
  the goal (issue 11) is classify within 0.5 s of `--help`.

Random weights: the timings do not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_name, sample_interleaved, write_report

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"


def run(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "edgeclip.edgeapp.cli.app", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"edgeclip {' '.join(args)} failed:\n{done.stderr}")


def make_bundle(work: Path, model: str, hidden: int, domain: str, shots: int) -> tuple[Path, Path]:
    """A default bundle with one learned task; returns (bundle, one image)."""
    root = work / "bundle"
    t0 = time.perf_counter()
    run("init", "--bundle", str(root), "--model", model, "--random-weights", "--hidden", str(hidden), "--quiet")
    print(f"init {time.perf_counter() - t0:.1f} s", flush=True)
    if (DATASETS / f"{domain}.tar").is_file():
        from bench_add_task import extract_train_split

        folder = extract_train_split(domain, shots, work / "data")
    else:
        from edgeclip.edgeapp.demo_data import write_demo_images

        domains, _ = write_demo_images(work / "data", train_per_class=shots, query_per_class=0)
        folder = domains[0]
    t0 = time.perf_counter()
    run("add-task", str(folder), "--bundle", str(root), "--quiet")
    print(f"add-task {time.perf_counter() - t0:.1f} s", flush=True)
    image = next(p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    return root, image


def bundle_bench_parser(doc: str | None, results_name: str) -> argparse.ArgumentParser:
    """The options of the benchmarks that time a bundle made by ``make_bundle`` (or given with --bundle)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--image", type=Path)
    parser.add_argument("--model", default="edgeclip-small")
    parser.add_argument("--hidden", type=int, default=15000)
    parser.add_argument("--domain", default="dtd10")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--keep-work", action="store_true", help="Keep the bundle made (its path is printed).")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / results_name)
    return parser


def main() -> None:
    args = bundle_bench_parser(__doc__, "store.json").parse_args()

    from edgeclip.bundle import Bundle, disk_usage, stamps_path
    from edgeclip.layout import LEARNED, VOCAB_FILE, graph_file

    work = Path(tempfile.mkdtemp(prefix="bench-store-"))
    try:
        if args.bundle:
            root, image = args.bundle, args.image
            if image is None:
                raise SystemExit("--bundle needs --image")
        else:
            root, image = make_bundle(work, args.model, args.hidden, args.domain, args.shots)
        bundle = Bundle.open(root)
        classify_files = [graph_file("gated.onnx"), graph_file("image_encoder.onnx"), graph_file("image_encoder.data"),
                          LEARNED, VOCAB_FILE, graph_file("text_encoder.onnx"), graph_file("text_encoder.data")]
        classify_files = [f for f in classify_files if bundle.has(f)]
        stamps = stamps_path(root, bundle.version)
        saved = stamps.read_bytes()

        def first_use(cold: bool) -> None:
            if cold:
                stamps.unlink(missing_ok=True)
            opened = Bundle.open(root)
            for name in classify_files:
                opened.path(name)
            if cold:
                stamps.write_bytes(saved)

        in_process = sample_interleaved({
            "open": lambda: Bundle.open(root),
            "open + classify files (stamps)": lambda: first_use(False),
            "open + classify files (hashed)": lambda: first_use(True),
            "verify every file": lambda: Bundle.open(root).verify(),
        }, args.repeats)
        cli = [sys.executable, "-m", "edgeclip.edgeapp.cli.app"]
        env = dict(os.environ, EDGECLIP_BUNDLE=str(root))

        def proc(*extra: str):
            return lambda: subprocess.run(cli + list(extra), env=env, capture_output=True, check=True)

        processes = sample_interleaved({
            "edgeclip --help": proc("--help"),
            "edgeclip tasks": proc("tasks"),
            "edgeclip classify ONE_IMAGE": proc("classify", str(image), "--format", "json", "--backend", "ort-cpu"),
            # the share of imports: the classify path's modules, nothing run
            "python: import the classify path": lambda: subprocess.run(
                [sys.executable, "-c", "import edgeclip.edgeapp.cli.app, edgeclip.edgeapp.classify, "
                 "edgeclip.edgeapp.runtime, onnxruntime"], check=True),
        }, args.repeats)
    finally:
        pass
    import statistics

    med = {k: statistics.median(v) for k, v in {**in_process, **processes}.items()}
    gap = med["edgeclip classify ONE_IMAGE"] - med["edgeclip --help"]
    files = bundle.manifest["files"]
    result = {
        "benchmark": "bench_store",
        "date": dt.date.today().isoformat(),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "bundle": {"model": bundle.manifest["backbone"]["model"], "weights": bundle.weights_label,
                   "method": bundle.method, "hidden": bundle.manifest["method"]["settings"].get("hidden"),
                   "tasks": [t.name for t in bundle.tasks], "files": len(files),
                   "version_bytes": sum(e["size"] for e in files.values()), "disk_bytes": disk_usage(root),
                   "classify_bytes": sum(files[f]["size"] for f in classify_files)},
        "repeats": args.repeats,
        "median_ms": med,
        "classify_minus_help_ms": gap,
        "classify_over_help": med["edgeclip classify ONE_IMAGE"] / med["edgeclip --help"],
        "goal_classify_minus_help_ms": 500.0,
    }
    print(f"\nbundle: {result['bundle']}")
    print(f"{'measure':<40} {'median ms':>10}")
    for key, value in med.items():
        print(f"{key:<40} {value:>10.1f}")
    print(f"classify - help: {gap:.0f} ms (goal <= 500 ms); classify / help: {result['classify_over_help']:.2f}")
    write_report(args.out, result)
    if not args.bundle and not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    elif not args.bundle:
        print(f"kept {root}")


if __name__ == "__main__":
    main()
