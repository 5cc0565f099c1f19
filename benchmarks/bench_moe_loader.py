"""MoE training step: how much of it waits for data, per DataLoader worker count, against the model alone.

    python benchmarks/bench_moe_loader.py [--model edgeclip-small] [--domain dtd10] [--shots 16]
        [--batch 16] [--iterations 6] [--workers 0,1,2] [--device auto] [--out benchmarks/results/moe_loader.json]

Per worker count: `train_task` (the add-task training loop: images decoded by `edgeclip.images` and
randomly cropped in the DataLoader, adapters trained) on real images, its seconds per step over the loop
(`TaskResult.images_per_s`). Model only: the same step (forward of both encoders, float32 loss, backward,
gradient masks, AdamW) on a batch already on the device, repeated. The issue-21 goal on a GPU: the
loop's step at most 1.15x the model-only step at batch 64. Random backbone weights (seed 0); the cost
does not depend on their values. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from bench_add_task import extract_train_split
from common import cpu_name, write_report

REPO = Path(__file__).resolve().parents[1]


def model_only_step_s(model, tokens, batch: int, size: int, steps: int, device) -> float:
    """Seconds per training step of the model alone (no data loading), after one warm-up step."""
    import torch

    from edgeclip.train.moe import mask_frozen_grads, set_trainable

    task = model.add_task()
    model.to(device)
    set_trainable(model, task)
    optimizer = torch.optim.AdamW([p for p in model.adapter_parameters() if p.requires_grad], lr=1e-3,
                                  weight_decay=0.0)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.2)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, len(tokens), (batch,), device=device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else None
    model.train()

    def step() -> torch.Tensor:
        if autocast is None:
            image_feats, text_feats = model(images, task, tokens, task)
        else:
            with autocast():
                image_feats, text_feats = model(images, task, tokens, task)
        loss = criterion(100.0 * image_feats.float() @ text_feats.float().t(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        mask_frozen_grads(model, task)
        optimizer.step()
        return loss

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        last = step()
    float(last)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="edgeclip-small")
    parser.add_argument("--domain", default="dtd10")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "moe_loader.json")
    args = parser.parse_args()

    import torch

    from edgeclip.domain import read_domain
    from edgeclip.train.backbone import load_backbone
    from edgeclip.train.moe import MoECLIP, MoEConfig
    from edgeclip.train.moe_trainer import TrainSettings, loader_workers, train_task

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-moe-loader-") as tmp:
        domain = read_domain(extract_train_split(args.domain, args.shots, Path(tmp)), split="train")
        samples = [(str(p), label) for p, label in domain.samples]
        backbone = load_backbone(args.model, random_weights=True, seed=0)
        size = backbone.preprocess.image_size
        tokens = backbone.tokenize([domain.templates[0].format(c) for c in domain.classes]).to(device)
        model_only = model_only_step_s(MoECLIP(load_backbone(args.model, random_weights=True, seed=0).model,
                                               MoEConfig()), tokens, args.batch, size, args.iterations, device)
        rows.append({"what": "model only", "workers": None, "step_s": round(model_only, 4), "vs_model_only": 1.0})
        print(f"model only: {model_only:.3f} s per step", flush=True)
        for workers in [int(w) for w in args.workers.split(",")]:
            model = MoECLIP(load_backbone(args.model, random_weights=True, seed=0).model, MoEConfig())
            settings = TrainSettings(iterations=args.iterations, batch_size=args.batch, warmup=1, workers=workers,
                                     device=str(device))
            result = train_task(model, samples, domain.classes, domain.templates[0], settings,
                                tokenize=backbone.tokenize)
            step = args.batch / result.images_per_s
            rows.append({"what": "train_task loop", "workers": workers, "step_s": round(step, 4),
                         "vs_model_only": round(step / model_only, 3)})
            print(f"workers {workers}: {step:.3f} s per step ({step / model_only:.2f}x model only)", flush=True)

    print(f"\n{'what':18} {'workers':>7} {'s/step':>8} {'x model only':>12}")
    for row in rows:
        workers = "-" if row["workers"] is None else str(row["workers"])
        print(f"{row['what']:18} {workers:>7} {row['step_s']:8.3f} {row['vs_model_only']:12.2f}")
    report = {
        "benchmark": "bench_moe_loader",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "device": str(device), "default_workers": loader_workers(device),
                    "note": "shared machine under load from other developers; compare within one run"},
        "settings": {"model": args.model, "weights": "random (seed 0)", "domain": args.domain, "shots": args.shots,
                     "batch": args.batch, "iterations": args.iterations},
        "rows": rows,
    }
    write_report(args.out, report)


if __name__ == "__main__":
    main()
