"""int8 dynamic quantisation of the image encoder (`edgeclip export --int8`): accuracy change on real
images and CPU latency, against the fp32 graphs and PyTorch eager.

    python benchmarks/bench_int8.py [--model edgeclip-small] [--per-dataset 100] [--repeats 20]

A RAIL-primal bundle (random weights, seed 0, hidden 2048) learns cifar10 (16 train images per class),
then the int8 graphs are exported. On `--per-dataset` test images of each of cifar10 (learned),
mnist and dtd10 (unseen), with all 30 class names as labels: agreement of int8 with fp32 on the
gated decision's top-1 and route and on the zero-shot top-1 (embedding against the class text),
and the largest embedding difference. Latency: the plain encoder and the gated graph, fp32 and int8
(onnxruntime CPU, 2 intra-op threads, spinning off) at batch 1 and 8, in interleaved rounds;
torch eager (2 threads) timed apart, first. Writes benchmarks/results/int8.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from common import time_interleaved

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
LEARNED, UNSEEN = "cifar10", ("mnist", "dtd10")


def extract(name: str, split: str, per_class: int | None, dest: Path) -> Path:
    """`per_class` images (None = all) of each class of `<name>.tar`'s split, plus meta.json."""
    with tarfile.open(DATASETS / f"{name}.tar") as tar:
        members = tar.getmembers()
        by_class: dict[str, list[tarfile.TarInfo]] = {}
        for m in members:
            parts = m.name.split("/")
            if len(parts) == 4 and parts[1] == split and m.isfile():
                by_class.setdefault(parts[2], []).append(m)
        chosen = [m for m in members if m.name == f"{name}/meta.json"]
        for files in by_class.values():
            chosen += sorted(files, key=lambda m: m.name)[:per_class]
        tar.extractall(dest, members=chosen, filter="data")
    return dest / name


def test_images(name: str, n: int, dest: Path) -> tuple[list[Path], list[str]]:
    """n test images spread evenly over the classes; returns (paths, class names in folder order)."""
    root = extract(name, "test", None, dest) / "test"
    classes = sorted(p.name for p in root.iterdir())
    per = -(-n // len(classes))
    paths = [p for c in classes for p in sorted((root / c).iterdir())[:per]][:n]
    return paths, classes


def time_eager(model: str, repeats: int) -> dict[int, float]:
    """Median ms of the torch eager image encoder at batch 1 and 8, in a fresh process state.

    Timed apart: interleaved with the onnxruntime sessions of this script, eager ran 40-70x slower
    (several hundred ms per image) on this machine, an interaction not seen in a fresh process."""
    import torch

    from edgeclip.train.backbone import load_backbone

    bb = load_backbone(model, random_weights=True, seed=0)
    bb.model.eval()
    size = bb.preprocess.image_size
    out = {}
    with torch.inference_mode():
        for batch in (1, 8):
            x = torch.from_numpy(np.random.default_rng(batch).standard_normal((batch, 3, size, size)).astype(np.float32))
            out[batch] = time_interleaved({"eager": lambda x=x: bb.model.encode_image(x, normalize=True)}, repeats)["eager"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="edgeclip-small")
    parser.add_argument("--per-dataset", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "int8.json"))
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    from edgeclip.bundle import Bundle
    from edgeclip.edgeapp.create import init_bundle
    from edgeclip.edgeapp.runtime import TextEncoderRunner
    from edgeclip.edgeapp.tasks import add_task
    from edgeclip.export.quantize import export_int8
    from edgeclip.images import load_and_preprocess
    from edgeclip.layout import (
        GATED_GRAPH,
        GATED_INT8_GRAPH,
        IMAGE_GRAPH,
        IMAGE_INT8_GRAPH,
        graph_file,
    )

    torch.set_num_threads(args.threads)
    eager = time_eager(args.model, args.repeats)  # first and apart: see time_eager
    work = Path(tempfile.mkdtemp(prefix="bench-int8-"))
    root = work / "bundle"
    init_bundle(root, args.model, random_weights=True,
                method="rail-primal", hidden=2048, seed=0)
    add_task(root, extract(LEARNED, "train", 16, work / "train"), backend="ort-cpu")
    start = time.perf_counter()
    bundle = export_int8(Bundle.open(root))
    export_s = time.perf_counter() - start

    cfg = bundle.meta.preprocess
    sets = {name: test_images(name, args.per_dataset, work / "test") for name in (LEARNED, *UNSEEN)}
    learned_classes = bundle.learned_classes
    extra = [c for name in UNSEEN for c in sets[name][1]]
    text = TextEncoderRunner(bundle, "ort-cpu").class_embeddings(learned_classes + extra, ["a photo of a {}."])

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # sessions take turns here

    def session(name: str) -> ort.InferenceSession:
        return ort.InferenceSession(str(bundle.path(graph_file(name))), options, providers=["CPUExecutionProvider"])

    gated = {"fp32": session(GATED_GRAPH), "int8": session(GATED_INT8_GRAPH)}
    plain = {"fp32": session(IMAGE_GRAPH), "int8": session(IMAGE_INT8_GRAPH)}

    accuracy = {}
    for name, (paths, classes) in sets.items():
        pixels = np.stack([load_and_preprocess(p, cfg) for p in paths])
        out = {p: dict(zip(("scores", "route", "gate_ratio", "embedding"),
                           s.run(["scores", "route", "gate_ratio", "embedding"],
                                 {"pixels": pixels, "label_text": text}))) for p, s in gated.items()}
        cols = [learned_classes.index(c) if name == LEARNED else len(learned_classes) + extra.index(c) for c in classes]
        zs = {p: (o["embedding"] @ text[cols].T).argmax(1) for p, o in out.items()}
        truth = np.array([classes.index(p.parent.name) for p in paths])
        emb32, emb8 = out["fp32"]["embedding"], out["int8"]["embedding"]
        accuracy[name] = {
            "images": len(paths),
            "gated_top1_agreement": float(np.mean(out["fp32"]["scores"].argmax(1) == out["int8"]["scores"].argmax(1))),
            "route_agreement": float(np.mean(out["fp32"]["route"] == out["int8"]["route"])),
            "zero_shot_top1_agreement": float(np.mean(zs["fp32"] == zs["int8"])),
            "zero_shot_accuracy_fp32": float(np.mean(zs["fp32"] == truth)),
            "zero_shot_accuracy_int8": float(np.mean(zs["int8"] == truth)),
            "max_abs_embedding_diff": float(np.abs(emb32 - emb8).max()),
            "min_cosine": float(np.sum(emb32 * emb8, axis=1).min()),
        }

    size = int(bundle.manifest["preprocess"]["image_size"])
    latency = {}
    for batch in (1, 8):
        pixels = np.random.default_rng(batch).standard_normal((batch, 3, size, size)).astype(np.float32)
        feeds = {"pixels": pixels, "label_text": text}
        fns = {f"ort_{kind}_{p}_ms": (lambda s=s, f=(feeds if kind == "gated" else {"pixels": pixels}): s.run(None, f))
               for kind, sessions in (("plain", plain), ("gated", gated)) for p, s in sessions.items()}
        row = {**time_interleaved(fns, args.repeats), "torch_eager_plain_ms": eager[batch]}
        row["int8_over_fp32_plain"] = row["ort_plain_int8_ms"] / row["ort_plain_fp32_ms"]
        row["int8_over_fp32_gated"] = row["ort_gated_int8_ms"] / row["ort_gated_fp32_ms"]
        row["eager_over_int8_plain"] = row["torch_eager_plain_ms"] / row["ort_plain_int8_ms"]
        latency[str(batch)] = row

    sizes = {name: sum(f["size"] for k, f in bundle.manifest["files"].items() if k.startswith(f"graphs/{name}."))
             for name in ("image_encoder", "image_encoder_int8")}
    result = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "load_average": os.getloadavg()},
        "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__},
        "command": "python benchmarks/bench_int8.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "json"),
        "model": args.model, "weights": "random (seed 0)", "threads": args.threads, "repeats": args.repeats,
        "labels": len(text), "export_int8_s": export_s, "encoder_bytes": sizes,
        "accuracy": accuracy, "latency_ms": latency,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")

    print(f"{args.model}, random weights; int8 export {export_s:.1f} s; encoder {sizes['image_encoder'] / 1e6:.1f} MB "
          f"-> {sizes['image_encoder_int8'] / 1e6:.1f} MB")
    print("dataset   images  gated top-1  route  zero-shot top-1  max |emb diff|  min cos")
    for name, a in accuracy.items():
        print(f"{name:9} {a['images']:6d}  {a['gated_top1_agreement']:11.1%}  {a['route_agreement']:5.1%}  "
              f"{a['zero_shot_top1_agreement']:15.1%}  {a['max_abs_embedding_diff']:14.4f}  {a['min_cosine']:.4f}")
    print("batch  plain fp32  plain int8  gated fp32  gated int8  eager  int8/fp32 plain  gated  eager/int8")
    for batch, r in latency.items():
        print(f"{batch:>5}  {r['ort_plain_fp32_ms']:10.1f}  {r['ort_plain_int8_ms']:10.1f}  {r['ort_gated_fp32_ms']:10.1f}  "
              f"{r['ort_gated_int8_ms']:10.1f}  {r['torch_eager_plain_ms']:5.1f}  {r['int8_over_fp32_plain']:15.2f}  "
              f"{r['int8_over_fp32_gated']:5.2f}  {r['eager_over_int8_plain']:10.2f}")


if __name__ == "__main__":
    main()
