"""MoE-Adapters on two real domains learned one after the other: accuracy after each step, with the
task known (MTIL: no gate) and task-agnostic through the DDAS gate (X-TAIL), and the no-forgetting check.

    python benchmarks/bench_moe_two_domains.py [--model edgeclip-small] [--domains mnist dtd10]
        [--shots 16] [--iterations 200] [--batch-size 32] [--test-per-class 20] [--out benchmarks/results]

Backbone: seeded random weights (nothing can be downloaded here), so zero-shot is at chance and
what the adapters learn is all the accuracy there is. Uses `edgeapp/evaluate.py` (as `edgeclip eval`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from edgeclip.edgeapp import eval_summary, evaluate
from edgeclip.edgeapp.create import init_bundle
from edgeclip.train.presets import get_preset

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="edgeclip-small")
    parser.add_argument("--domains", nargs="+", default=["mnist", "dtd10"])
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--preset", default=None, help="moe-paper: the paper's settings (explicit --iterations wins)")
    args = parser.parse_args()
    preset = get_preset(args.preset)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        dirs = []
        for name in args.domains:
            with tarfile.open(DATASETS / f"{name}.tar") as tar:
                tar.extractall(data, filter="data")
            dirs.append(data / name)
        seed = 0
        if preset is None:
            settings = {"moe_train": {"batch_size": args.batch_size, "lr": args.lr}}
        else:  # what `edgeclip init --preset moe-paper` sets
            seed = preset.seed
            settings = {"moe": {"n_experts": preset.experts},
                        "moe_train": {"batch_size": preset.batch_size, "freeze_rule": preset.freeze_rule,
                                      "warmup": preset.warmup, "warmup_rule": preset.warmup_rule, "preset": preset.name}}
        init_bundle(Path(tmp) / "bundle", args.model, random_weights=True, seed=seed, method="moe", **settings)
        run = evaluate.run_protocols(Path(tmp) / "bundle", dirs, Path(tmp) / "work", protocols=["mtil", "xtail"],
                                     shots=args.shots, test_per_class=args.test_per_class,
                                     iterations=args.iterations, preset=args.preset)
        summary = eval_summary.run_summary(run, Path(tmp) / "bundle")
    mtil_gated = run.results.get(("mtil", "ddas"))
    mtil = np.asarray(run.results[("mtil", evaluate.KNOWN_TASK)].matrix)
    xtail_result = run.results[("xtail", "ddas")]
    xtail = np.asarray(xtail_result.matrix)
    report = {
        "benchmark": "moe_two_domains",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "model": f"{args.model} (random weights, seed 0)",
        "settings": vars(args) | {"out": str(args.out)},
        "domains": args.domains,
        "preset": args.preset,
        "zero_shot_mtil": run.results[("mtil", evaluate.KNOWN_TASK)].zero_shot,
        "mtil_matrix": mtil.tolist(),
        "mtil_gated_matrix": mtil_gated.matrix if mtil_gated else None,
        "mtil_gated_routing": mtil_gated.routing if mtil_gated else None,
        "mtil_metrics": {k: r.metrics() for k, r in
                         (("gated", mtil_gated), ("oracle", run.results[("mtil", evaluate.KNOWN_TASK)]),
                          ("zero-shot", run.results[("mtil", evaluate.ZERO_SHOT)])) if r is not None},
        "xtail_zero_shot": xtail_result.zero_shot,
        "xtail_ddas_matrix": xtail.tolist(),
        "xtail_routing": xtail_result.routing,
        "task1_unchanged_after_task2": bool(mtil[1, 0] == mtil[0, 0]),
        "seconds_per_step": [dataclasses.asdict(t) for t in run.timing],
        "total_seconds": round(time.perf_counter() - start, 1),
        "summary": summary,
    }
    if mtil_gated:
        print(f"MTIL through the DDAS gate (the paper's protocol):\n{np.asarray(mtil_gated.matrix)}\n"
              f"routing: {mtil_gated.routing}")
    print(f"MTIL (task known, oracle), rows = after step i, columns = {args.domains}:\n{mtil}")
    print(f"X-TAIL through the DDAS gate:\n{xtail}\nrouting: {xtail_result.routing}")
    print(f"task 1 accuracy unchanged after task 2 (strict freeze): {report['task1_unchanged_after_task2']}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("moe_two_domains.json" if preset is None else f"moe_two_domains_{preset.name}.json")
    path.write_text(json.dumps(report, indent=2, default=float))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
