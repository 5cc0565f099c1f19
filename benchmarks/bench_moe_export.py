"""Cost of the MoE gated graph (onnxruntime CPU): plain encoder vs gated graph on batches routed to
zero-shot, to tasks, and mixed; the adapted encoder alone; PyTorch eager of the adapted pass.

    python benchmarks/bench_moe_export.py [--model edgeclip-small] [--threads 2] [--repeats 15]

Random backbone (seed 0); MoE-Adapters with the paper's settings (22 experts, top-2, bottleneck 64,
adapters in every block) and 2 tasks whose experts and routers are random (non-zero); linear DDAS
gates fitted on the frozen embeddings of two synthetic image clusters; a third cluster is unseen.
Timings are interleaved round-robin (the machine is shared); read the ratios, not the milliseconds.
Prints a table and writes JSON with the machine, date, command and figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _time_interleaved(fns: dict, repeats: int, seed: int = 0) -> dict[str, float]:
    """Median ms of each function, run round-robin in a shuffled order each round, so load from
    other processes and position in the round hit all alike."""
    for fn in fns.values():
        fn()
        fn()  # warm-up
    samples: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for key in order:
            start = time.perf_counter()
            fns[key]()
            samples[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1000.0 for k, v in samples.items()}


def _cluster(cluster: int, n: int, size: int, seed: int) -> np.ndarray:
    base = np.random.default_rng(1000 + cluster).standard_normal((1, 3, size, size))
    noise = np.random.default_rng(seed * 7919 + cluster).standard_normal((n, 3, size, size))
    return (base + 0.3 * noise).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="edgeclip-small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", default="benchmarks/results/bench_moe_export.json")
    args = parser.parse_args()

    import onnx
    import onnxruntime as ort
    import torch

    from edgeclip.export.compose_moe import build_moe_gated_graph, weight_sharing
    from edgeclip.export.trace import export_image_encoder
    from edgeclip.export.trace_moe import export_moe_encoder
    from edgeclip.train import ddas
    from edgeclip.train.backbone import load_backbone
    from edgeclip.train.decision import learned_tensors
    from edgeclip.train.moe import MoECLIP, MoEConfig

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-moe-export-"))
    frozen = load_backbone(args.model, random_weights=True, seed=0)
    size, dim = frozen.preprocess.image_size, frozen.embed_dim
    export_image_encoder(frozen, work)
    torch.manual_seed(1)
    config = MoEConfig()
    model = MoECLIP(load_backbone(args.model, random_weights=True, seed=0).model, config)
    for _ in range(2):
        model.add_task()
    with torch.no_grad():
        for _, layer in model.named_layers():
            layer.up_w.normal_(0.0, 0.02)
            layer.w_gate.normal_(0.0, 1.0)
    model.eval()
    export_moe_encoder(model, work)

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    # idle threads must not spin into the next timed call (interleaved runs share the cores)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")

    def session(name: str) -> ort.InferenceSession:
        return ort.InferenceSession(str(work / name), options, providers=["CPUExecutionProvider"])

    plain = session("image_encoder.onnx")
    embed = lambda p: plain.run(None, {"pixels": p})[0]  # noqa: E731
    gates = [ddas.fit_gate(embed(_cluster(c, 40, size, seed=0)), kind="linear") for c in range(2)]
    text = np.random.default_rng(0).standard_normal((1000, dim)).astype(np.float32)
    task_text = text[:20] / np.linalg.norm(text[:20], axis=1, keepdims=True)
    learned = learned_tensors(text[:20], [10, 10], "linear", [g.state() for g, _ in gates], "moe",
                              {"task_text": task_text})
    manifest = {"backbone": {"embed_dim": dim}, "method": {"name": "moe", "settings": {}},
                "gate": {"kind": "linear"}, "zero_shot": {"logit_scale": 100.0},
                "tasks": [{"classes": [f"c{i}" for i in range(10)], "threshold": 2 * t} for _, t in gates]}
    gated_path = build_moe_gated_graph(work, learned, manifest)
    gated, adapted = session("gated.onnx"), session("moe_encoder.onnx")
    sharing = weight_sharing(onnx.load(str(gated_path), load_external_data=False))

    rows = []
    for batch in (1, 8):
        batches = {"zero_shot": _cluster(2, batch, size, seed=1),
                   "routed": np.concatenate([_cluster(c, 8, size, seed=1) for c in (0, 1)])[::2][:batch]}
        if batch > 1:
            batches["mixed"] = np.concatenate([batches["routed"][: batch // 2], batches["zero_shot"][batch // 2:]])
        routes = {k: gated.run(["route"], {"pixels": p, "label_text": text})[0] for k, p in batches.items()}
        assert np.all(routes["zero_shot"] == -1) and np.all(routes["routed"] >= 0), routes
        tasks = routes["routed"]
        routed_px = batches["routed"]
        fns = {"ort_plain_ms": lambda: plain.run(None, {"pixels": routed_px}),
               "ort_adapted_ms": lambda: adapted.run(None, {"pixels": routed_px, "task_ids": tasks})}
        for kind, px in batches.items():
            fns[f"ort_gated_{kind}_ms"] = lambda px=px: gated.run(None, {"pixels": px, "label_text": text})
        row = {"batch": batch, **_time_interleaved(fns, args.repeats)}
        with torch.inference_mode():  # apart: torch's and onnxruntime's thread pools would compete
            row.update(_time_interleaved({"torch_eager_adapted_ms": lambda: model.encode_image(
                torch.from_numpy(routed_px), torch.from_numpy(tasks), normalize=True)}, max(3, args.repeats // 3)))
        base = row["ort_plain_ms"]
        row["gated_zero_shot_over_plain"] = row["ort_gated_zero_shot_ms"] / base
        row["gated_routed_over_plain_plus_adapted"] = row["ort_gated_routed_ms"] / (base + row["ort_adapted_ms"])
        row["adapted_over_plain"] = row["ort_adapted_ms"] / base
        row["eager_over_ort_adapted"] = row["torch_eager_adapted_ms"] / row["ort_adapted_ms"]
        if "ort_gated_mixed_ms" in row:
            row["routed_in_mixed"] = int(np.sum(routes["mixed"] >= 0))
            row["gated_mixed_over_plain"] = row["ort_gated_mixed_ms"] / base
        rows.append(row)

    print(f"{args.model}, {args.threads} threads, median of {args.repeats} (ms); "
          f"gated graph reads {sharing.shared_bytes / 1e6:.1f} MB from image_encoder.data, "
          f"{sharing.own_bytes / 1e6:.1f} MB from moe_encoder.data "
          f"(file: {(work / 'moe_encoder.data').stat().st_size / 1e6:.1f} MB)")
    for row in rows:
        print(f"batch {row['batch']}:")
        for key, value in row.items():
            if key != "batch":
                print(f"  {key:>38} {value:10.3f}")
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpu_count": os.cpu_count(), "threads": args.threads,
                          "load_average": os.getloadavg()},
              "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__},
              "model": args.model, "weights": "random (seed 0)", "moe": dataclasses.asdict(config), "tasks": 2,
              "labels": len(text),
              "weights_bytes": {"shared_from_image_encoder_data": sharing.shared_bytes,
                                "read_from_moe_encoder_data": sharing.own_bytes,
                                "moe_encoder_data_file": (work / "moe_encoder.data").stat().st_size,
                                "image_encoder_data_file": (work / "image_encoder.data").stat().st_size},
              "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
