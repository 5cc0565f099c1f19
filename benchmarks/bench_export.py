"""Latency of the gated graph against the plain image encoder (onnxruntime CPU) and PyTorch eager.

    python benchmarks/bench_export.py [--model edgeclip-small] [--threads 2] [--repeats 20] [--json out.json]

Random weights (seed 0); RAIL-primal (hidden 15000, the paper's size) and RAIL-dual (1,000 stored
embeddings) heads over 2 tasks of 10 classes with linear gates, 1,000 labels. Prints a table and
writes JSON with the machine, date, command and figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import percentile_ms, sample_interleaved


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="edgeclip-small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=15000)
    parser.add_argument("--json", default="benchmarks/results/bench_export.json")
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    from edgeclip.export.compose import build_gated_graph
    from edgeclip.export.trace import export_image_encoder
    from edgeclip.train import ddas
    from edgeclip.train.backbone import load_backbone
    from edgeclip.train.decision import learned_tensors
    from edgeclip.train.rail import RailDual

    torch.set_num_threads(args.threads)
    bb = load_backbone(args.model, random_weights=True, seed=0)
    size, dim = bb.preprocess.image_size, bb.embed_dim
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    export_image_encoder(bb, work / "plain")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    # several sessions take turns here: spinning worker threads of one would steal the cores of the next
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")

    # two synthetic "tasks": clusters of unit vectors; heads of the paper's sizes
    xs = [rng.standard_normal((500, dim)).astype(np.float32) * 0.1 + rng.standard_normal(dim) for _ in range(2)]
    xs = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in xs]
    ys = [np.arange(500) % 10, 10 + np.arange(500) % 10]
    gates = [ddas.fit_gate(x, kind="linear") for x in xs]
    text = rng.standard_normal((1000, dim)).astype(np.float32)
    heads = {
        "rail-primal": {"w_r": rng.uniform(-1, 1, (dim, args.hidden)).astype(np.float32) / np.sqrt(dim),
                        "w": rng.standard_normal((args.hidden, 20)).astype(np.float32) * 0.01},
    }
    dual = RailDual()
    for x, y, n in zip(xs, ys, (10, 20)):
        dual.add_domain(x, y, n)
    heads["rail-dual"] = dual.state()
    sessions = {"plain": ort.InferenceSession(str(work / "plain" / "image_encoder.onnx"), options,
                                              providers=["CPUExecutionProvider"])}
    for method, state in heads.items():
        folder = work / method
        folder.mkdir()
        for name in ("image_encoder.onnx", "image_encoder.data"):
            os.link(work / "plain" / name, folder / name)
        learned = learned_tensors(text[:20], [10, 10], "linear", [g.state() for g, _ in gates], method, state)
        manifest = {"backbone": {"embed_dim": dim}, "method": {"name": method, "settings": {"fusion": "ddas"}},
                    "gate": {"kind": "linear"}, "zero_shot": {"logit_scale": 100.0},
                    "tasks": [{"classes": [f"c{i}" for i in range(10)], "threshold": t} for _, t in gates]}
        sessions[method] = ort.InferenceSession(str(build_gated_graph(folder, learned, manifest)), options,
                                                providers=["CPUExecutionProvider"])

    rows = []
    for batch in (1, 8):
        pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
        fns = {"torch_eager_ms": lambda: bb.model.encode_image(torch.from_numpy(pixels), normalize=True),
               "ort_plain_ms": lambda: sessions["plain"].run(None, {"pixels": pixels})}
        for method in heads:
            fns[f"ort_gated_{method}_ms"] = (
                lambda m=method: sessions[m].run(None, {"pixels": pixels, "label_text": text}))
        with torch.inference_mode():
            samples = sample_interleaved(fns, args.repeats)
            row = {"batch": batch, **{k: percentile_ms(v, 50) for k, v in samples.items()}}
            for key, values in samples.items():
                name = key[: -len("_ms")]
                row[f"{name}_p90_ms"] = percentile_ms(values, 90)
                row[f"{name}_images_per_s"] = batch * 1000.0 / percentile_ms(values, 50)
        plain, eager = row["ort_plain_ms"], row["torch_eager_ms"]
        for method in heads:
            row[f"gated_{method}_over_plain"] = row[f"ort_gated_{method}_ms"] / plain
        row["eager_over_ort_plain"] = eager / plain
        rows.append(row)

    print(f"{args.model} (random weights), {args.threads} threads, {args.repeats} interleaved rounds; "
          "ms unless named otherwise; one column per batch size")
    for key in rows[0]:
        print(f"{key:42}" + "".join(f"{row[key]:>12.2f}" if isinstance(row[key], float) else f"{row[key]:>12}"
                                     for row in rows))
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpu_count": os.cpu_count(), "threads": args.threads},
              "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__},
              "model": args.model, "weights": "random (seed 0)", "rail_hidden": args.hidden,
              "dual_memory": int(dual.memory.shape[0]), "labels": len(text), "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
