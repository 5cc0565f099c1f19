"""Start-up: classifying one image with a default bundle, start to finish, against `edgeclip --help`.

    python benchmarks/bench_startup.py [--bundle DIR --image FILE] [--model edgeclip-small]
        [--domain dtd10] [--shots 16] [--repeats 7] [--keep-work] [--out benchmarks/results/startup.json]

Without --bundle it makes one as a user would: `edgeclip init --model MODEL --random-weights` (the
defaults: RAIL primal, hidden 15000), then `edgeclip add-task` of a small real domain (the first
SHOTS training images per class of ../shared/datasets/DOMAIN.tar, extracted to a temporary folder;
the demo images where ../shared is absent). The image classified is one of those.

Measured in interleaved rounds (each round runs every contender once, the first one rotating),
medians in ms, all in fresh processes with their own optimised-graph cache folder:

- `edgeclip --help`;
- `edgeclip classify ONE_IMAGE --format json` (onnxruntime CPU; optimised graph cached, the usual case);
- the same with the cache off (`EDGECLIP_SESSION_CACHE=0`: every start optimises the graph);
- the same on a cache miss (the first classify after a new version: optimise, save, check);
- the same with two extra zero-shot labels (`--labels`: the text encoder is loaded and run);
- `edgeclip tasks` (argument parsing and bundle open, no engine);
- `edgeclip classify EMPTY_FOLDER`: parsing classify's options and opening the bundle, then exit 2
  (the CLI's share of the classify start-up, before any engine or image work);
- in one process: creating the gated graph's onnxruntime session fresh (`ORT_ENABLE_ALL`) and from
  the cache (optimisations off), and whether their outputs are bit-identical.

With `--baseline REF` (a git commit of this repository, e.g. the one before the start-up work) that
commit's code is laid out as installed in a temporary folder and its `--help` and `classify ONE_IMAGE`
join the same interleaved rounds, so that before and after are compared under the same load.

The goal (issue 11): classify within 0.5 s of `--help`. Random weights: timings do not depend on them.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_name, sample_interleaved, write_report

REPO = Path(__file__).resolve().parents[1]
GOAL_MS = 500.0


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def baseline_tree(ref: str, dest: Path) -> Path:
    """Commit `ref` of this repository laid out as installed (stages inside the `edgeclip` package,
    as .ci/lint-imports does); returns the folder to put first on PYTHONPATH."""
    src = dest / "src"
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    pkg = dest / "site" / "edgeclip"
    shutil.copytree(src / "edgeclip", pkg)
    for stage in ("edgeapp", "train", "export", "models"):
        shutil.copytree(src / stage, pkg / stage)
    return dest / "site"


def session_compare(root: Path, image: Path, repeats: int, cache: Path) -> dict[str, object]:
    """In-process: the gated graph's session made fresh vs from the optimised-graph cache."""
    import numpy as np
    import onnxruntime as ort

    from edgeclip.bundle import Bundle
    from edgeclip.edgeapp.ort_cache import same_outputs
    from edgeclip.edgeapp.runtime import GatedRunner
    from edgeclip.images import iter_batches

    bundle = Bundle.open(root)
    cfg = bundle.meta.preprocess
    pixels = next(iter(iter_batches([image], cfg, batch_size=1))).pixels
    text = bundle.tensors("learned.safetensors", keys=["zs_text"])["zs_text"]
    os.environ["EDGECLIP_ENGINE_CACHE"] = str(cache)
    outs: dict[str, dict[str, np.ndarray]] = {}
    cached_flags: list[bool] = []

    def make(env_value: str, label: str) -> None:
        os.environ["EDGECLIP_SESSION_CACHE"] = env_value
        runner = GatedRunner(bundle, "ort-cpu", preload=False)
        outs[label] = runner.run(pixels, text)
        if env_value == "1":
            cached_flags.append(runner.session.cached)

    make("1", "warm-up")  # makes sure the cache holds the graph
    samples = sample_interleaved({"session + first run, fresh (optimised now)": lambda: make("0", "fresh"),
                                  "session + first run, from the cache": lambda: make("1", "cached")}, repeats)
    os.environ.pop("EDGECLIP_SESSION_CACHE", None)
    return {"median_ms": {k: statistics.median(v) for k, v in samples.items()},
            "identical_outputs": bool(same_outputs(outs["fresh"], outs["cached"])),
            "all_cached_runs_hit": all(cached_flags), "onnxruntime": ort.__version__}


def main() -> None:
    from bench_store import bundle_bench_parser, make_bundle

    parser = bundle_bench_parser(__doc__, "startup.json")
    parser.add_argument("--baseline", help="A git commit to compare against in the same rounds.")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    load_before = load_average()
    if args.bundle:
        if args.image is None:
            raise SystemExit("--bundle needs --image")
        root, image = args.bundle, args.image
    else:
        root, image = make_bundle(work, args.model, args.hidden, args.domain, args.shots)
    engines = work / "engines"
    cli = [sys.executable, "-m", "edgeclip.edgeapp.cli.app"]
    base_env = dict(os.environ, EDGECLIP_BUNDLE=str(root), EDGECLIP_ENGINE_CACHE=str(engines))
    base_env.pop("EDGECLIP_SESSION_CACHE", None)
    classify = ["classify", str(image), "--format", "json", "--backend", "ort-cpu"]

    def proc(args_: list[str], check: bool = True, **env: str):
        def go() -> None:
            done = subprocess.run(cli + args_, env={**base_env, **env}, capture_output=True, text=True, cwd=work,
                                  check=False)
            if check and done.returncode != 0:
                raise SystemExit(f"edgeclip {' '.join(args_)} failed ({done.returncode}):\n{done.stderr}")
        return go

    empty = work / "empty"
    empty.mkdir(exist_ok=True)

    def miss() -> None:
        shutil.rmtree(engines / "ort-optimized", ignore_errors=True)
        proc(classify)()

    contenders = {
        "edgeclip --help": proc(["--help"]),
        "edgeclip classify ONE_IMAGE": proc(classify),
        "classify, session cache off": proc(classify, EDGECLIP_SESSION_CACHE="0"),
        "classify, cache miss (first run of a version)": miss,
        "classify --labels 'a cat,a dog' (text encoder)": proc(classify + ["--labels", "a cat,a dog"]),
        "edgeclip tasks": proc(["tasks"]),
        # exits 2 ("No images found") after parsing the 15 options and opening the bundle: the CLI's share
        "classify EMPTY_FOLDER (parse + open, no engine)": proc(["classify", str(empty)], check=False),
    }
    if args.baseline:
        site = baseline_tree(args.baseline, work / "baseline")
        where = subprocess.run([sys.executable, "-c", "import edgeclip.edgeapp.runtime as m; print(m.__file__)"],
                               env={**base_env, "PYTHONPATH": str(site)}, capture_output=True, text=True, check=True,
                               cwd=work)  # not the checkout: `python -c` puts the working folder first on sys.path
        if not where.stdout.strip().startswith(str(site)):
            raise SystemExit(f"the baseline code is not the one imported: {where.stdout.strip()}")
        contenders["baseline --help"] = proc(["--help"], PYTHONPATH=str(site))
        contenders["baseline classify ONE_IMAGE"] = proc(classify, PYTHONPATH=str(site))
    start = time.perf_counter()
    samples = sample_interleaved(contenders, args.repeats)
    med = {k: statistics.median(v) for k, v in samples.items()}
    session = session_compare(root, image, args.repeats, work / "engines-inprocess")
    help_ms, cls_ms = med["edgeclip --help"], med["edgeclip classify ONE_IMAGE"]

    from edgeclip.bundle import Bundle

    bundle = Bundle.open(root)
    import onnxruntime

    result = {
        "benchmark": "bench_startup",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "load_average_before_after": [load_before, load_average()],
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "command": " ".join(["python", "benchmarks/bench_startup.py"] + sys.argv[1:]),
        "bundle": {"model": bundle.manifest["backbone"]["model"], "weights": bundle.weights_label,
                   "method": bundle.method, "hidden": bundle.manifest["method"]["settings"].get("hidden"),
                   "tasks": [t.name for t in bundle.tasks], "classes": len(bundle.learned_classes)},
        "image": image.name,
        "baseline": args.baseline,
        "repeats": args.repeats,
        "seconds": round(time.perf_counter() - start, 1),
        "median_ms": med,
        "samples_ms": samples,
        "classify_minus_help_ms": cls_ms - help_ms,
        "classify_over_help": cls_ms / help_ms,
        "goal_classify_minus_help_ms": GOAL_MS,
        "goal_met": cls_ms - help_ms <= GOAL_MS,
        "session": session,
    }
    print(f"\nbundle: {result['bundle']}; load average before/after: {result['load_average_before_after']}")
    print(f"{'fresh process (median of ' + str(args.repeats) + ')':<50} {'ms':>8} {'- help':>8} {'/ help':>7}")
    for key, value in med.items():
        print(f"{key:<50} {value:>8.0f} {value - help_ms:>+8.0f} {value / help_ms:>7.2f}")
    print(f"\n{'in one process':<50} {'ms':>8}")
    for key, value in session["median_ms"].items():
        print(f"{key:<50} {value:>8.0f}")
    print(f"fresh and cached sessions give identical outputs: {session['identical_outputs']}")
    if args.baseline:
        b_help, b_cls = med["baseline --help"], med["baseline classify ONE_IMAGE"]
        result["baseline_classify_minus_help_ms"] = b_cls - b_help
        result["baseline_classify_over_help"] = b_cls / b_help
        print(f"\nbaseline {args.baseline}: classify - help {b_cls - b_help:.0f} ms, classify / help {b_cls / b_help:.2f}")
    print(f"\nclassify - help: {cls_ms - help_ms:.0f} ms (goal <= {GOAL_MS:.0f} ms: "
          f"{'met' if result['goal_met'] else 'NOT met'}); classify / help: {cls_ms / help_ms:.2f}")
    write_report(args.out, result)
    if args.keep_work or args.bundle:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
