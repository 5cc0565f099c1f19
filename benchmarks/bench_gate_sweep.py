"""DDAS gate settings on real images: kind (linear k / MLP hidden), quantile and routing rule.

    python benchmarks/bench_gate_sweep.py [--seeds 3] [--out benchmarks/results/gate_sweep.json]

Two tasks, mnist and dtd10 (all 10 classes each, 40 train and 40 test images per class), gates fitted
on 100 or all 400 training images per task (random subsets, one per seed); their test images should
be routed to their own task, 400 cifar10 test images to zero-shot. Backbone: edgeclip-small with
seeded random weights (nothing can be downloaded here), the project's preprocessing. Also measures
why the "ratio" rule fails: the spread of each domain's embeddings, and an mnist image's error ratio
under its own gate and under dtd10's (linear, k = 8). Prints tables, writes JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from common import cpu_name, write_report

from edgeclip.images import iter_batches
from edgeclip.train import ddas
from edgeclip.train.backbone import load_backbone

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
GATES = [("linear", {"k": 2}), ("linear", {"k": 4}), ("linear", {"k": 8}), ("linear", {"k": 32}),
         ("mlp", {"hidden": 32}), ("mlp", {"hidden": 128})]
QUANTILES = (0.90, 0.95, 0.99)


def extract(name: str, split: str, per_class: int, dest: Path) -> list[Path]:
    """The first `per_class` files (by name) of every class of one split."""
    with tarfile.open(DATASETS / f"{name}.tar") as tar:
        by_class: dict[str, list[tarfile.TarInfo]] = {}
        for m in tar.getmembers():
            parts = m.name.split("/")
            if len(parts) == 4 and parts[1] == split and m.isfile():
                by_class.setdefault(parts[2], []).append(m)
        chosen = [m for c in sorted(by_class) for m in sorted(by_class[c], key=lambda m: m.name)[:per_class]]
        tar.extractall(dest, members=chosen, filter="data")
    return [dest / m.name for m in chosen]


def embed(backbone, paths: list[Path]) -> np.ndarray:
    cfg = backbone.preprocess
    return np.concatenate([backbone.encode_images(b.pixels) for b in iter_batches(paths, cfg, batch_size=64)])


def route_scores(gates: list, thresholds: list[float], tests: dict[str, np.ndarray], rule: str) -> dict[str, float]:
    errors = {name: np.stack([g.errors(x) for g in gates], axis=1) for name, x in tests.items()}
    route = {name: ddas.route(e, np.asarray(thresholds), rule)[0] for name, e in errors.items()}
    return {"mnist": float((route["mnist"] == 0).mean()), "dtd10": float((route["dtd10"] == 1).mean()),
            "cifar10": float((route["cifar10"] == -1).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gate_sweep.json")
    args = parser.parse_args()

    backbone = load_backbone("edgeclip-small", random_weights=True, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        train = {n: embed(backbone, extract(n, "train", 40, Path(tmp))) for n in ("mnist", "dtd10")}
        tests = {n: embed(backbone, extract(n, "test", 40, Path(tmp))) for n in ("mnist", "dtd10", "cifar10")}

    spread = {n: float(np.linalg.norm(x - x.mean(axis=0), axis=1).mean()) for n, x in train.items()}
    own, thr_own = ddas.fit_gate(train["mnist"], kind="linear", k=8)
    other, thr_other = ddas.fit_gate(train["dtd10"], kind="linear", k=8)
    ratios = {"own_gate": float(np.median(own.errors(tests["mnist"]) / thr_own)),
              "dtd10_gate": float(np.median(other.errors(tests["mnist"]) / thr_other))}

    rows = []
    for n_train in (100, 400):
        for kind, options in GATES:
            for q in QUANTILES:
                cells = {"nearest": [], "ratio": []}
                for seed in range(args.seeds):
                    rng = np.random.default_rng(seed)
                    fitted = [ddas.fit_gate(x[rng.permutation(len(x))[:n_train]], kind=kind, quantile=q, seed=seed,
                                            **options) for x in (train["mnist"], train["dtd10"])]
                    gates, thresholds = [g for g, _ in fitted], [t for _, t in fitted]
                    for rule in cells:
                        cells[rule].append(route_scores(gates, thresholds, tests, rule))
                mean = {rule: {k: float(np.mean([c[k] for c in v])) for k in v[0]} for rule, v in cells.items()}
                rows.append({"train_images": n_train, "gate": kind, **options, "quantile": q, **mean})
                r = mean["nearest"]
                print(f"{n_train:4d} {kind:6} {json.dumps(options):14} q={q:.2f}  mnist {r['mnist']:.2f}  "
                      f"dtd10 {r['dtd10']:.2f}  cifar10->zs {r['cifar10']:.2f}  (ratio rule mnist "
                      f"{mean['ratio']['mnist']:.2f})", flush=True)
    print(f"spread around the mean: {spread}; mnist median err/thr: {ratios}")
    report = {"benchmark": "gate_sweep", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "platform": platform.platform()},
              "command": "python benchmarks/bench_gate_sweep.py" + (f" --seeds {args.seeds}" if args.seeds != 3 else ""),
              "model": "edgeclip-small (random weights, seed 0)", "seeds": args.seeds,
              "spread": spread, "mnist_median_ratio_linear_k8": ratios, "rows": rows}
    write_report(args.out, report)


if __name__ == "__main__":
    main()
