"""The embedding cache in one run, through the real CLI (a fresh `edgeclip` process each, as users run it):

1. `edgeclip classify TEST` with an empty embedding cache (every photo decoded and encoded, then stored);
2. the same again: every embedding from the cache (no decode, no encoder);
3. `edgeclip add-task` of a second domain, then `edgeclip classify TEST` again: the new labels from the
   cached embeddings (gate and heads only);
4. the same after the add-task with `--no-cache` (what re-labelling cost before the cache); its rows must
   equal run 3's exactly.

Images: the real test split of mnist (2,992 digits) from ../shared/datasets; tasks: a few images per class
of mnist's and fashion_mnist's train splits (RAIL primal). The bundle is made with random weights (no
weights can be downloaded here): the timings are real, the labels are not meaningful.

Usage: python benchmarks/bench_cache.py [--model edgeclip-small] [--per-class 20] [--bundle DIR]
Writes benchmarks/results/cache.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import cpu_name  # noqa: E402

SHARED = HERE.parent.parent / "shared" / "datasets"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/datasets")
CLI = Path(sys.executable).with_name("edgeclip")


def extract(name: str, dest: Path, split: str, per_class: int | None) -> Path:
    """``dest/name/split`` with at most ``per_class`` images per class (all when None), plus meta.json."""
    out = dest / name
    counts: dict[str, int] = {}
    with tarfile.open(SHARED / f"{name}.tar") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.name.endswith("meta.json"):
                tar.extract(member, dest, filter="data")
            elif len(parts) == 4 and parts[1] == split and member.isfile():
                if per_class is None or counts.get(parts[2], 0) < per_class:
                    counts[parts[2]] = counts.get(parts[2], 0) + 1
                    tar.extract(member, dest, filter="data")
    return out / split if split == "test" else out


def timed(args: list[str], env: dict[str, str]) -> tuple[float, str, str]:
    start = time.perf_counter()
    result = subprocess.run([str(CLI), *args], capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"edgeclip {' '.join(args[:2])} failed ({result.returncode}): {result.stderr[-2000:]}")
    return elapsed, result.stdout, result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="edgeclip-small")
    parser.add_argument("--per-class", type=int, default=20, help="training images per class of each task")
    parser.add_argument("--bundle", type=Path, help="a bundle with no task to copy (else one is made)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cache.json")
    args = parser.parse_args()
    if not (SHARED / "mnist.tar").exists():
        raise SystemExit(f"needs {SHARED}/mnist.tar and fashion_mnist.tar")
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "EDGECLIP_CACHE_DIR": str(work / "cache"), "EDGECLIP_ENGINE_CACHE": str(work / "engines")}
        test = extract("mnist", work / "test", "test", None)
        first_task = extract("mnist", work / "train", "train", args.per_class)
        second_task = extract("fashion_mnist", work / "train", "train", args.per_class)
        n_images = sum(1 for p in test.rglob("*") if p.is_file())
        bundle = work / "bundle"
        if args.bundle:
            shutil.copytree(args.bundle, bundle, symlinks=True)
        else:
            timed(["init", "--bundle", str(bundle), "--model", args.model, "--random-weights", "--quiet"], env)
        timed(["add-task", str(first_task), "--bundle", str(bundle), "--quiet"], env)
        classify = ["classify", str(test), "--bundle", str(bundle), "--format", "json"]
        rows: list[dict] = []

        def run(name: str, extra: list[str] = ()) -> str:
            elapsed, out, summary = timed([*classify, *extra], env)
            rows.append({"run": name, "seconds": round(elapsed, 2), "images_per_s": round(n_images / elapsed, 1),
                         "summary": summary})
            print(f"{name:<38} {elapsed:8.2f} s  {summary}", flush=True)
            return out

        run("1. first classify (empty cache)")
        run("2. cached classify")
        add_start = time.perf_counter()
        timed(["add-task", str(second_task), "--bundle", str(bundle), "--quiet"], env)
        add_seconds = time.perf_counter() - add_start
        after = run("3. after add-task, cached")
        fresh = run("4. after add-task, --no-cache", ["--no-cache"])
        equal = after == fresh
        cache_bytes = sum(f.stat().st_size for f in (work / "cache").iterdir())
    by = {r["run"][:2]: r["seconds"] for r in rows}
    result = {
        "benchmark": "bench_cache",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} (shared with other developers' jobs)",
        "model": f"{args.model}, random weights",
        "images": n_images,
        "runs": rows,
        "add_task_seconds": round(add_seconds, 1),
        "speedup_cached_vs_first": round(by["1."] / by["2."], 1),
        "speedup_after_add_task_vs_no_cache": round(by["4."] / by["3."], 1),
        "speedup_after_add_task_vs_first": round(by["1."] / by["3."], 1),
        "rows_equal_no_cache": equal,
        "cache_bytes": cache_bytes,
        "command": "python benchmarks/bench_cache.py " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{n_images} images ({args.model}, random weights); add-task took {add_seconds:.1f} s")
    print(f"cached / first: {result['speedup_cached_vs_first']}x; after add-task cached vs --no-cache: "
          f"{result['speedup_after_add_task_vs_no_cache']}x (vs the first run: {result['speedup_after_add_task_vs_first']}x); "
          f"rows equal: {equal}; cache on disk {cache_bytes / 1e6:.1f} MB")
    if not equal:
        raise SystemExit("the cached rows differ from the --no-cache rows")


if __name__ == "__main__":
    main()
