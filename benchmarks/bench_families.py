"""ONNX size and CPU latency of the smallest config of each supported open_clip model family.

    python benchmarks/bench_families.py [--models M1,M2,...] [--threads 2] [--repeats 10]
                                        [--json benchmarks/results/families.json]

RANDOM WEIGHTS (seed 0): sizes and latencies do not depend on the weights' values, accuracy is not
measured. Each model is loaded as `edgeclip init` loads it (SigLIP-style models with a tokenizer of
the same structure built offline, tests/hf_tokenizers.py), both towers are exported to ONNX (fp32,
dynamo exporter, parity-checked against torch) and timed with onnxruntime on the CPU: the image
encoder at batch 1 and the text encoder on one prompt, median of `repeats` interleaved runs.
Prints a table (Markdown, for docs/MODELS.md) and writes JSON after each model (a long run that is
stopped keeps what it measured; rows of models not asked for this time are kept from the earlier JSON).
onnxruntime thread spinning is off (the machine is shared).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import cpu_name, time_interleaved

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

# family -> (smallest config that builds offline, test tokenizer builder for hub tokenizers)
FAMILIES = {
    "CLIP ViT": ("ViT-B-32", None),
    "CLIP ViT (small)": ("ViT-S-32", None),
    "CLIP ResNet": ("RN50", None),
    "MobileCLIP": ("MobileCLIP-S1", None),
    "MobileCLIP2": ("MobileCLIP2-S0", None),
    "SigLIP": ("ViT-B-16-SigLIP", "t5"),
    "SigLIP2": ("ViT-B-32-SigLIP2-256", "gemma"),
    "PE-Core": ("PE-Core-T-16-384", None),
    "ViTamin": ("ViTamin-S", None),
    "ConvNeXt": ("convnext_tiny", None),
    "CoCa": ("coca_ViT-B-32", None),
    "EVA02": ("EVA02-B-16", None),
}


def _size_mb(folder: Path, stem: str) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.stem == stem) / 2**20


def measure(family: str, model: str, tokenizer_kind: str | None, threads: int, repeats: int) -> dict:
    import onnxruntime as ort

    import hf_tokenizers
    from edgeclip.export.trace import export_image_encoder, export_text_encoder
    from edgeclip.train.backbone import load_backbone, moe_refusal

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        tokenizer = str(hf_tokenizers.BUILDERS[tokenizer_kind](out / "tok")) if tokenizer_kind else None
        bb = load_backbone(model, random_weights=True, seed=0, tokenizer=tokenizer)
        params = sum(p.numel() for p in bb.model.parameters()) / 1e6
        start = time.perf_counter()
        image = export_image_encoder(bb, out)
        text = export_text_encoder(bb, out)
        export_s = time.perf_counter() - start
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # shared machine: no busy-wait
        img = ort.InferenceSession(str(image), opts, providers=["CPUExecutionProvider"])
        txt = ort.InferenceSession(str(text), opts, providers=["CPUExecutionProvider"])
        size = bb.preprocess.image_size
        pixels = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
        tokens = bb.text.tokenizer(["a photo of a dog."])
        times = time_interleaved({"image": lambda: img.run(None, {img.get_inputs()[0].name: pixels}),
                                  "text": lambda: txt.run(None, {txt.get_inputs()[0].name: tokens})}, repeats)
        spec = bb.text.spec
        return {
            "family": family, "model": model, "params_m": round(params, 1), "image_size": size,
            "embed_dim": bb.embed_dim, "image_tower": bb.manifest_entry()["image_tower"],
            "tokenizer": spec.tokenizer, "clean": spec.clean, "context_length": spec.context_length,
            "scoring": spec.scoring, "moe": moe_refusal(bb) is None,
            "image_onnx_mb": round(_size_mb(out, image.stem), 1), "text_onnx_mb": round(_size_mb(out, text.stem), 1),
            "image_ms": round(times["image"], 2), "text_ms": round(times["text"], 2), "export_s": round(export_s, 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(m for m, _ in FAMILIES.values()))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default="benchmarks/results/families.json")
    parser.add_argument("--table-only", action="store_true", help="print the table of the JSON, measure nothing")
    args = parser.parse_args()
    if args.table_only:
        print_table(json.loads(Path(args.json).read_text())["rows"])
        return
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    by_model = {m: (fam, tok) for fam, (m, tok) in FAMILIES.items()}
    report = {
        "benchmark": "bench_families", "weights": "random (seed 0)",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
        "command": "python " + " ".join(sys.argv), "threads": args.threads, "repeats": args.repeats, "rows": [],
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    earlier = json.loads(path.read_text())["rows"] if path.is_file() else []
    kept = [r for r in earlier if r["model"] not in wanted]  # rows of other models stay, with their own date
    for row in kept:
        row.setdefault("date", "earlier run")
    report["rows"] = kept
    for model in wanted:
        family, tok = by_model.get(model, (model, None))
        try:
            row = measure(family, model, tok, args.threads, args.repeats)
        except Exception as exc:  # record the failure and go on with the next family
            row = {"family": family, "model": model, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        row["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        report["rows"].append(row)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(row), flush=True)
    print_table(report["rows"])
    print(f"\nwrote {path} (random weights)")


def print_table(rows: list[dict]) -> None:
    """The Markdown table of docs/MODELS.md."""
    print("\n| family | model | params (M) | image tower | tokenizer | scoring | MoE | image ONNX MB | text ONNX MB "
          "| image ms (b=1) | text ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['family']} | {r['model']} | error: {r['error'][:80]} |")
            continue
        print(f"| {r['family']} | {r['model']} | {r['params_m']} | {r['image_tower']} | {r['tokenizer']} "
              f"({r['clean']}, {r['context_length']}) | {r['scoring']} | {'yes' if r['moe'] else 'no'} | "
              f"{r['image_onnx_mb']} | {r['text_onnx_mb']} | {r['image_ms']} | {r['text_ms']} |")


if __name__ == "__main__":
    main()
