"""Learning that scales with the bundle: eight real domains learned one after another with RAIL primal at
the defaults (hidden 15000), each add-task's time, peak memory and bundle growth, in one run.

    python benchmarks/bench_learning_growth.py [--model edgeclip-tiny] [--hidden 15000]
        [--per-class N] [--out benchmarks/results/learning_growth.json] [--plot docs/learning_growth.png]
    python benchmarks/bench_learning_growth.py --same-domain-model ViT-B-16 [--history 19063]
        [--out benchmarks/results/learning_growth_vit_b_16.json]

Domains: the five shared real image sets (../shared/datasets) at full size, caltech101's 101 classes split
into four domains of consecutive classes (caltech101-1 .. -4, 26/25/25/25 classes) so that there are
eight: caltech101-1, mnist, fashion_mnist, cifar10, dtd10, caltech101-2, caltech101-3, caltech101-4
(19,721 training images). ``--per-class N`` keeps the first N images of every class (a quick check).

Steps, each `edgeclip` command in a fresh process (its peak resident memory, ru_maxrss, is its own):
`init --random-weights` (seeded random weights: no pretrained weights can be downloaded here; time and
memory do not depend on the weights' values), then a reference: the last domain learned first, into a
copy of the empty bundle; then the eight add-tasks in order. After each: wall time, peak RSS, the
bundle's size on disk (versions and graph store; the RAIL solver cache `cache/rail` counted apart), and
what `edgeclip versions` says each version added ("added"), which must not change after later writes.
Prints a table, writes JSON and a picture (time and memory against images learned; the picture needs
matplotlib: ``pip install -e '.[bench]'``).

``--same-domain-model`` measures only the same-domain ratio, with a backbone of real size (the paper's
ViT-B-16, seeded random weights): the last domain learned first, into an empty bundle, and learned
after ``--history`` other images. The history is folded in through the API (`add_task_embeddings`,
seven tasks of the real sequence's sizes) from seeded random unit embeddings: what an add-task costs
does not depend on the embeddings' values, and encoding 19,063 images with ViT-B-16 would take
hours on 2 cores. Both measured add-tasks run the CLI on the same real folder, in fresh processes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from common import cpu_name, report_header, write_report

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
ORDER = ["caltech101-1", "mnist", "fashion_mnist", "cifar10", "dtd10", "caltech101-2", "caltech101-3",
         "caltech101-4"]
CALTECH_PARTS = 4

PEAK_WRAPPER = """
import atexit, resource, sys
atexit.register(lambda: print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr))
sys.argv = ["edgeclip"] + sys.argv[1:]
from edgeclip.edgeapp.cli.app import main
main()
"""


def run_edgeclip(args: list[str]) -> tuple[float, int, float]:
    """Wall seconds, peak resident memory (MB) and CPU seconds (user + system) of one edgeclip command
    in a child process. CPU time is what the command cost; wall time also counts the other jobs of a
    shared machine."""
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *args], capture_output=True, text=True)
    elapsed, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise RuntimeError(f"edgeclip {' '.join(args)} failed:\n{done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, int(done.stderr.split("PEAK_KB")[-1].split()[0]) // 1024, cpu


def extract(name: str, dest: Path, per_class: int | None) -> Path:
    """The train split (and meta.json) of a shared set, the first ``per_class`` images of every class."""
    taken: dict[str, int] = {}
    with tarfile.open(DATASETS / f"{name}.tar") as tar:
        members = []
        for member in tar.getmembers():
            parts = member.name.split("/")
            if parts == [name, "meta.json"]:
                members.append(member)
            elif len(parts) == 4 and parts[1] == "train" and member.isfile():
                if per_class is None or taken.get(parts[2], 0) < per_class:
                    taken[parts[2]] = taken.get(parts[2], 0) + 1
                    members.append(member)
        tar.extractall(dest, members=members, filter="data")
    return dest / name


def split_caltech(root: Path, dest: Path) -> list[Path]:
    """caltech101's classes (sorted) in CALTECH_PARTS consecutive groups, each a domain folder of its own."""
    meta = json.loads((root / "meta.json").read_text())
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    size = -(-len(classes) // CALTECH_PARTS)
    out = []
    for k in range(CALTECH_PARTS):
        part = dest / f"caltech101-{k + 1}"
        (part / "train").mkdir(parents=True)
        for name in classes[k * size:(k + 1) * size]:
            (root / "train" / name).rename(part / "train" / name)
        (part / "meta.json").write_text(json.dumps({**meta, "name": part.name}))
        out.append(part)
    return out


def count_images(domain: Path) -> int:
    return sum(1 for p in (domain / "train").rglob("*") if p.is_file())


def sizes(root: Path) -> tuple[int, int]:
    """(bytes of the bundle without its solver cache, bytes of the cache): allocated blocks, hard links once."""
    seen: set[tuple[int, int]] = set()
    bundle = cache = 0
    for folder, _dirs, files in os.walk(root):
        in_cache = Path(folder).is_relative_to(root / "cache")
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                if in_cache:
                    cache += st.st_blocks * 512
                else:
                    bundle += st.st_blocks * 512
    return bundle, cache


def versions(root: Path) -> dict[str, dict]:
    from edgeclip.bundle import version_history

    return {r["version"]: {"size": r.get("size"), "added": r.get("added"), "own": r.get("own")}
            for r in version_history(root)}


def plot(rows: list[dict], reference: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    learned = [r["learned_before"] / 1000 for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), dpi=80)
    if all("cpu_s" in r for r in rows):
        axes[0].plot(learned, [1000 * r["cpu_s"] / r["images"] for r in rows], "o-", label="add-task, CPU time")
        axes[0].axhline(1000 * reference["cpu_s"] / reference["images"], color="grey", ls="--",
                        label=f"{reference['domain']} learned first (CPU)")
    axes[0].plot(learned, [1000 * r["wall_s"] / r["images"] for r in rows], "o:", alpha=0.6,
                 label="add-task, wall time (shared machine)")
    axes[0].axhline(1000 * reference["wall_s"] / reference["images"], color="grey", ls=":",
                    label=f"{reference['domain']} learned first (wall)")
    axes[0].set(xlabel="images learned before (thousands)", ylabel="ms per new image", ylim=(0, None))
    axes[0].legend(fontsize=8)
    axes[1].plot(learned, [r["peak_rss_mb"] / 1024 for r in rows], "o-")
    axes[1].axhline(1.0, color="red", ls=":", label="1 GB goal")
    axes[1].set(xlabel="images learned before (thousands)", ylabel="peak RSS of add-task (GB)", ylim=(0, 1.2))
    axes[1].legend(fontsize=8)
    axes[2].plot(learned, [r["version_added_bytes"] / 1e6 for r in rows], "o-", label="a version adds")
    axes[2].plot(learned, [r["cache_bytes"] / 1e6 for r in rows], "s--", label="solver cache (one, replaced)")
    axes[2].set(xlabel="images learned before (thousands)", ylabel="disk (MB, log scale)", yscale="log")
    axes[2].legend(fontsize=8)
    for ax, name in zip(axes, ["time", "memory", "disk"]):
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


HISTORY_SIZES = [766, 6000, 5000, 5000, 800, 755, 742]  # the real sequence before its last domain (19,063)
HISTORY_SCRIPT = """
import sys
import numpy as np
import edgeclip
root, total = sys.argv[1], int(sys.argv[2])
sizes = [int(s) for s in sys.argv[3].split(",")]
clf = edgeclip.load(root)
dim = int(clf.bundle.meta.backbone.embed_dim)
rng = np.random.default_rng(0)
for i, n in enumerate(sizes):
    n = max(10, round(n * total / sum(sizes)))
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    clf = clf.add_task_embeddings(f"history{i}", x, np.arange(n) % 10, [f"h{i}c{k}" for k in range(10)])
print(len(clf.bundle.tasks))
"""


def same_domain(args: argparse.Namespace) -> None:
    """The last domain learned first and after ``args.history`` other images, with ``args.same_domain_model``."""
    with tempfile.TemporaryDirectory(prefix="edgeclip-same-domain-") as tmp:
        tmp_dir = Path(tmp)
        data = tmp_dir / "data"
        domain = split_caltech(extract("caltech101", data, args.per_class), data)[-1]
        images = count_images(domain)
        root, first = tmp_dir / "bundle", tmp_dir / "first"
        wall, peak, _cpu = run_edgeclip(["init", "--bundle", str(root), "--model", args.same_domain_model,
                                         "--random-weights", "--hidden", str(args.hidden), "--quiet"])
        print(f"init {args.same_domain_model}: {wall:.1f} s, peak {peak} MB", flush=True)
        shutil.copytree(root, first)
        runs = {}
        wall, peak, cpu = run_edgeclip(["add-task", str(domain), "--bundle", str(first), "--quiet"])
        runs["first"] = {"learned_before": 0, "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak}
        print(f"{domain.name} learned first: {wall:.1f} s wall, {cpu:.1f} s CPU, peak {peak} MB", flush=True)
        shutil.rmtree(first)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", HISTORY_SCRIPT, str(root), str(args.history),
                        ",".join(map(str, HISTORY_SIZES))], check=True, capture_output=True)
        print(f"history: {args.history} random unit embeddings folded in {time.perf_counter() - start:.0f} s", flush=True)
        wall, peak, cpu = run_edgeclip(["add-task", str(domain), "--bundle", str(root), "--quiet"])
        runs["after"] = {"learned_before": args.history, "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak}
        print(f"{domain.name} after {args.history}: {wall:.1f} s wall, {cpu:.1f} s CPU, peak {peak} MB", flush=True)
    cpu_ratio = runs["after"]["cpu_s"] / runs["first"]["cpu_s"]
    wall_ratio = runs["after"]["wall_s"] / runs["first"]["wall_s"]
    print(f"{domain.name} ({images} images, {args.same_domain_model}): after {args.history} learned images x{cpu_ratio:.2f} "
          f"CPU, x{wall_ratio:.2f} wall of learning it first (goal <= 1.5)")
    report = {
        **report_header("random (seeded); the history is seeded random unit embeddings (cost does not depend on "
                        "values)"),
        "settings": {"model": args.same_domain_model, "method": "rail-primal", "hidden": args.hidden,
                     "domain": domain.name, "images": images, "history": args.history},
        "runs": runs, "ratio": {"cpu": cpu_ratio, "wall": wall_ratio},
    }
    write_report(args.out, report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="edgeclip-tiny")
    parser.add_argument("--hidden", type=int, default=15000)
    parser.add_argument("--per-class", type=int, default=None, help="first N training images of every class")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "learning_growth.json")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "learning_growth.png")
    parser.add_argument("--replot", type=Path, help="only draw the picture again from a JSON this script wrote")
    parser.add_argument("--same-domain-model", help="only the same-domain ratio, with this backbone (e.g. ViT-B-16)")
    parser.add_argument("--history", type=int, default=sum(HISTORY_SIZES), help="images learned before (with "
                        "--same-domain-model)")
    args = parser.parse_args()
    if args.same_domain_model:
        if args.out == parser.get_default("out"):
            args.out = args.out.with_name(f"learning_growth_{args.same_domain_model.lower().replace('-', '_')}.json")
        same_domain(args)
        return
    if args.replot:
        report = json.loads(args.replot.read_text())
        refs = report["reference_first"]
        title = report.get("title", f"RAIL primal, hidden {report['settings']['hidden']}, {report['settings']['model']} "
                           "(seeded random weights), 8 real domains; 2 cores, shared")
        plot(report["rows"], refs[-1] if isinstance(refs, list) else refs, args.plot, title)
        return

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="edgeclip-learning-") as tmp:
        tmp_dir = Path(tmp)
        data = tmp_dir / "data"
        domains = {name: extract(name, data, args.per_class) for name in ["mnist", "fashion_mnist", "cifar10", "dtd10"]}
        for part in split_caltech(extract("caltech101", data, args.per_class), data):
            domains[part.name] = part
        root = tmp_dir / "bundle"
        wall, peak, _cpu = run_edgeclip(["init", "--bundle", str(root), "--model", args.model, "--random-weights",
                                      "--hidden", str(args.hidden), "--quiet"])
        init = {"wall_s": wall, "peak_rss_mb": peak, "disk_bytes": sizes(root)[0]}
        print(f"init {args.model}: {wall:.1f} s, peak {peak} MB, {init['disk_bytes'] / 1e6:.1f} MB", flush=True)

        last = ORDER[-1]
        empty = tmp_dir / "empty"
        shutil.copytree(root, empty)

        def learn_first(when: str) -> dict:
            """The last domain learned first, into a copy of the empty bundle."""
            first_root = tmp_dir / "reference"
            shutil.copytree(empty, first_root)
            wall, peak, cpu = run_edgeclip(["add-task", str(domains[last]), "--bundle", str(first_root), "--quiet"])
            shutil.rmtree(first_root)
            print(f"reference ({when}): {last} learned first: {wall:.1f} s wall, {cpu:.1f} s CPU, peak {peak} MB",
                  flush=True)
            return {"domain": last, "images": count_images(domains[last]), "wall_s": wall, "cpu_s": cpu,
                    "peak_rss_mb": peak, "when": when}

        references = [learn_first("before the sequence")]

        print(f"{'#':>2} {'domain':<14} {'images':>6} {'learned':>7} {'wall s':>7} {'CPU s':>6} {'ms/img':>6} {'peak MB':>7} "
              f"{'bundle MB':>9} {'added':>7} {'cache MB':>8}", flush=True)
        learned = 0
        before = init["disk_bytes"]
        added: dict[str, int] = {}
        for i, name in enumerate(ORDER, 1):
            images = count_images(domains[name])
            wall, peak, cpu = run_edgeclip(["add-task", str(domains[name]), "--bundle", str(root), "--quiet"])
            bundle_bytes, cache_bytes = sizes(root)
            history = versions(root)
            current = (root / "CURRENT").read_text().strip()
            added[current] = history[current]["added"]
            row = {"step": i, "domain": name, "images": images, "learned_before": learned, "wall_s": wall, "cpu_s": cpu,
                   "peak_rss_mb": peak, "bundle_bytes": bundle_bytes, "added_bytes": bundle_bytes - before,
                   "version_added_bytes": history[current]["added"], "cache_bytes": cache_bytes,
                   "added_unchanged": all(history[v]["added"] == size for v, size in added.items())}
            rows.append(row)
            print(f"{i:>2} {name:<14} {images:>6} {learned:>7} {wall:>7.1f} {cpu:>6.1f} {1000 * wall / images:>6.1f} {peak:>7} "
                  f"{bundle_bytes / 1e6:>9.1f} {row['version_added_bytes'] / 1e6:>7.1f} {cache_bytes / 1e6:>8.1f}",
                  flush=True)
            learned += images
            before = bundle_bytes
        final_versions = versions(root)
        references.append(learn_first("right after the sequence"))  # the same load as the last step

    same, reference = rows[-1], references[-1]
    ratio = same["wall_s"] / reference["wall_s"]
    cpu_ratio = same["cpu_s"] / reference["cpu_s"]
    print(f"{last}: learned first {reference['wall_s']:.1f} s wall / {reference['cpu_s']:.1f} s CPU, after "
          f"{same['learned_before']} images {same['wall_s']:.1f} s / {same['cpu_s']:.1f} s: x{ratio:.2f} wall, "
          f"x{cpu_ratio:.2f} CPU (goal <= 1.5); largest add-task peak "
          f"{max(r['peak_rss_mb'] for r in rows)} MB (goal <= 1024); 'added' sizes unchanged by later writes: "
          f"{all(r['added_unchanged'] for r in rows)}")
    title = (f"RAIL primal, hidden {args.hidden}, {args.model} (seeded random weights), 8 real domains; "
             f"{platform.node() and cpu_name()}, {os.cpu_count()} cores, shared")
    report = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "load_note": "2-core VM shared with other developers' jobs (see docs/BENCHMARKS.md)"},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "weights": "random (seeded); time, memory and sizes do not depend on the weights' values",
        "settings": {"model": args.model, "method": "rail-primal", "hidden": args.hidden, "per_class": args.per_class,
                     "order": ORDER},
        "init": init,
        "reference_first": references,
        "rows": rows,
        "versions_at_end": final_versions,
        "same_domain_ratio": {"wall": ratio, "cpu": cpu_ratio},
        "title": title,
    }
    write_report(args.out, report)
    if args.plot:
        plot(rows, reference, args.plot, title)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
