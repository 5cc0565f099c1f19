"""One GPU check: what ../shared/gpu/README.md's table measures, plus the fp16 and CUDA-graph rows, in
one run (about 5 minutes for ViT-B-16 on one H200); writes JSON.

    python benchmarks/gpu_check.py prepare --datasets ../shared/datasets --out /tmp/gpu-data
    python benchmarks/gpu_check.py run --data /tmp/gpu-data --device cuda --model ViT-B-16 \
        --out benchmarks/results/gpu_check_h200.json
    python benchmarks/gpu_check.py run --data DIR --device cpu --model edgeclip-tiny --quick   # a test runs this

`prepare` writes the real images it needs (never committed): `task_a/<class>/*` (mnist, 5 classes),
`task_b/<class>/*` (cifar10, 5 classes), 32 train images per class (160 per task), and `query/*`
(test images of both tasks' classes, 100 each). `run` (random weights throughout, seed 0; the
backend is ort-cuda with --device cuda, ort-cpu with cpu):

1. torch: top-k on equal gate logits (torch CPU, torch on the device, ONNX TopK), and, on CUDA, the
   eager plain image encoder in fp16 (`.half()`) at batch 1 and 128 for reference;
2. RAIL-primal bundle: create, add-task task_a, `export --precision fp16`, then `bench` gated/plain at
   the batch sizes (1, 8, 32, 128) in fp32 and fp16, without and with CUDA graphs;
3. MoE bundle: create, add-task task_a (wall and each stage's start, from the progress callback;
   the training record's images/s), classify task_a's query images, add-task task_b, classify them
   again (strict freeze: labels changed and the largest score change of images routed to task_a in
   both), `export --precision fp16`, onnxruntime's warnings while loading the gated graphs,
   `bench` fp32/fp16/CUDA graphs, classify all query images end to end (images/s, fp16 against
   fp32: same label and route), and ort-cpu against the device backend on a subset.

Stages run in that order; once `--budget-s` is spent the rest are skipped and recorded as such.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TASKS = {"task_a": ("mnist", ["0", "1", "2", "3", "4"]), "task_b": ("cifar10", ["airplane", "automobile", "bird", "cat", "deer"])}


# -- data -------------------------------------------------------------------------------------------
def prepare(datasets: Path, out: Path, train_per_class: int = 32, query_per_task: int = 100) -> Path:
    """Extract the check's real images from the shared tar files into `out` (layout: module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    for task, (name, classes) in TASKS.items():
        with tarfile.open(datasets / f"{name}.tar") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            for split, per in (("train", train_per_class), ("test", -(-query_per_task // len(classes)))):
                for cls in classes:
                    files = sorted((m for m in members if m.name.startswith(f"{name}/{split}/{cls}/")),
                                   key=lambda m: m.name)[:per]
                    dest = out / task / cls if split == "train" else out / "query"
                    dest.mkdir(parents=True, exist_ok=True)
                    for m in files:
                        data = tar.extractfile(m).read()
                        target = dest / (Path(m.name).name if split == "train" else f"{task}-{cls}-{Path(m.name).name}")
                        target.write_bytes(data)
    return out


def query_images(data: Path, task: str | None = None) -> list[Path]:
    """The query images (of one task's classes, or all), sorted."""
    return sorted(p for p in (data / "query").iterdir() if task is None or p.name.startswith(f"{task}-"))


# -- helpers ----------------------------------------------------------------------------------------
class Budget:
    """Wall-clock budget of the run: `left()` seconds; stages check it before they start."""

    def __init__(self, seconds: float) -> None:
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


class Report:
    """The JSON being built; `stage(name)` times a stage, records its error instead of raising, and
    skips it once the budget is spent (each recorded under `stages`)."""

    def __init__(self, budget: Budget, out: Path | None) -> None:
        self.budget, self.out = budget, out
        self.data: dict[str, Any] = {"stages": {}}

    @contextlib.contextmanager
    def stage(self, name: str, needs_s: float = 0.0) -> Iterator[dict[str, Any] | None]:
        record: dict[str, Any] = {}
        if self.budget.left() < needs_s:
            self.data["stages"][name] = {"skipped": f"time budget: {self.budget.left():.0f} s left, needs ~{needs_s:.0f} s"}
            print(f"[gpu_check] {name}: skipped (budget)", flush=True)
            yield None
            return
        print(f"[gpu_check] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            yield record
        except Exception as exc:  # noqa: BLE001 - a failed stage is recorded, the rest still run
            record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            record["traceback"] = traceback.format_exc()[-3000:]
            print(f"[gpu_check] {name}: FAILED {record['error'][:300]}", flush=True)
        record["wall_s"] = round(time.perf_counter() - start, 3)
        self.data["stages"][name] = record
        print(f"[gpu_check] {name}: {record['wall_s']:.1f} s", flush=True)
        self.save()

    def save(self) -> None:
        if self.out:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.out.with_name(self.out.name + ".tmp")
            tmp.write_text(json.dumps(self.data, indent=1, default=str))
            tmp.replace(self.out)


@contextlib.contextmanager
def stderr_lines(into: list[str]) -> Iterator[None]:
    """Collect what is written to file descriptor 2 (onnxruntime's own log) meanwhile into `into`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            into.extend(tmp.read().decode(errors="replace").splitlines())


def gpu_name() -> str:
    try:
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        return subprocess.run(query, capture_output=True, text=True, timeout=10).stdout.strip() or "none"
    except (OSError, subprocess.SubprocessError):
        return "none"


def timed_progress(marks: list[tuple[str, float]], start: float) -> Callable[[str, int, int], None]:
    """A progress callback recording when each new stage name first appears (seconds from `start`)."""
    def on(name: str, done: int, total: int) -> None:
        key = name.split("(")[0].strip()
        if not marks or marks[-1][0] != key:
            marks.append((key, round(time.perf_counter() - start, 2)))
    return on


def scores_by_path(preds: list[Any], labels: list[str]) -> dict[str, tuple[str | None, str | None, np.ndarray]]:
    """path -> (label, route, scores of `labels` from the full top-k list)."""
    out = {}
    for p in preds:
        table = {(t["label"], t.get("task")): float(t["score"]) for t in p.topk}
        by_label = {}
        for (label, _task), score in table.items():
            by_label.setdefault(label, score)
        out[p.path] = (p.label, p.route, np.array([by_label.get(lbl, np.nan) for lbl in labels]))
    return out


def agreement(a: list[Any], b: list[Any]) -> dict[str, Any]:
    """Same label and same route between two classify runs over the same images (by path)."""
    bb = {p.path: p for p in b}
    pairs = [(p, bb[p.path]) for p in a if p.path in bb and p.error is None and bb[p.path].error is None]
    scores = [abs(x.score - y.score) for x, y in pairs if x.label == y.label]
    return {"images": len(pairs), "same_label": sum(x.label == y.label for x, y in pairs),
            "same_route": sum(x.route == y.route for x, y in pairs),
            "same_label_and_route": sum(x.label == y.label and x.route == y.route for x, y in pairs),
            "max_score_diff_same_label": float(max(scores)) if scores else None}


# -- stages -----------------------------------------------------------------------------------------
def topk_ties(device: str) -> dict[str, Any]:
    """Indices chosen by top-2 on 22 equal gate logits: torch CPU, torch on `device`, ONNX TopK (onnxruntime)."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    x = torch.zeros(1, 22)
    out = {"torch_cpu": torch.topk(x, 2, dim=-1).indices.tolist()[0]}
    if device != "cpu":
        out[f"torch_{device}"] = torch.topk(x.to(device), 2, dim=-1).indices.cpu().tolist()[0]
    graph = helper.make_graph([helper.make_node("TopK", ["x", "k"], ["v", "i"])], "topk",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 22])],
                              [helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 2]),
                               helper.make_tensor_value_info("i", TensorProto.INT64, [1, 2])],
                              [helper.make_tensor("k", TensorProto.INT64, [1], [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out["onnx_topk"] = session.run(None, {"x": np.zeros((1, 22), np.float32)})[1].tolist()[0]
    return out


def torch_eager(model: str, device: str, batches: list[int], iterations: int) -> dict[str, Any]:
    """The plain image encoder in torch eager, fp16 (`.half()`), ms per batch (median) and images/s."""
    import torch

    from edgeclip.train.backbone import load_backbone

    bb = load_backbone(model, random_weights=True, seed=0)
    visual = bb.model.visual.to(device).half().eval()
    size = int(bb.model.visual.image_size[0]) if hasattr(bb.model.visual, "image_size") else 224
    out = {}
    with torch.no_grad():
        for b in batches:
            x = torch.randn(b, 3, size, size, device=device, dtype=torch.float16)
            for _ in range(3):
                visual(x)
            torch.cuda.synchronize()
            times = []
            for _ in range(iterations):
                start = time.perf_counter()
                visual(x)
                torch.cuda.synchronize()
                times.append((time.perf_counter() - start) * 1000)
            ms = float(np.median(times))
            out[f"b{b}"] = {"p50_ms": round(ms, 3), "images_per_s": round(b * 1000 / ms, 1)}
    del visual, bb
    torch.cuda.empty_cache()
    return out


def bench_rows(bundle: Any, backend: str, batches: list[int], iterations: int) -> list[dict[str, Any]]:
    """`edgeclip bench` rows: fp32 and fp16 (interleaved), then the same with CUDA graphs."""
    from edgeclip.edgeapp.bench import bench_bundle

    rows = []
    for cuda_graph in (False, True):
        for r in bench_bundle(bundle, backend, batches, iterations, precision="fp16", cuda_graph=cuda_graph):
            rows.append({**r.to_dict(), "cuda_graph_requested": cuda_graph})
    return rows


def ratio_table(rows: list[dict[str, Any]]) -> list[str]:
    """Printable lines: gated / plain p50 per precision, CUDA graphs and batch."""
    by = {(r["precision"], r["cuda_graph_requested"], r["graph"], r["batch_size"]): r for r in rows}
    lines = []
    for (precision, cg, graph, batch), r in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][3], kv[0][2])):
        if graph != "gated":
            continue
        plain = by.get((precision, cg, "plain", batch))
        ratio = f"{r['p50_ms'] / plain['p50_ms']:.2f}x" if plain else "-"
        state = "captured" if r["cuda_graph"] else "asked, not captured" if cg else "off"
        lines.append(f"  {precision} cuda_graph {state:<19} b{batch:<4} gated {r['p50_ms']:8.2f} ms"
                     f"  plain {plain['p50_ms'] if plain else float('nan'):8.2f} ms  gated/plain {ratio}"
                     f"  {r['images_per_s']:8.1f} img/s")
    return lines


def converter_rows(bundle: Any, device: str, batches: list[int], iterations: int, work: Path) -> dict[str, Any]:
    """The plain image encoder in fp16 by two converters, timed with onnxruntime directly (IO binding
    on the device): edgeclip's (`export.fp16`, onnxruntime's convert_float_to_float16) and
    onnxruntime's transformer optimizer (`optimize_model(model_type="vit")`: attention/LayerNorm/Gelu
    fusion into com.microsoft ops, then float16). Reports fused op counts, ms per batch and the
    smallest cosine to the fp32 encoder."""
    import onnxruntime as ort
    from onnxruntime.transformers.optimizer import optimize_model

    from edgeclip.layout import IMAGE_FP16_GRAPH, IMAGE_GRAPH, graph_file

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    where = "cuda" if device == "cuda" else "cpu"
    folder = work / "converters"
    folder.mkdir(exist_ok=True)
    fp32 = bundle.path(graph_file(IMAGE_GRAPH))
    heads = {"ViT-B-16": 12, "ViT-B-32": 12, "ViT-L-14": 16}.get(bundle.manifest["backbone"]["model"], 0)
    model = optimize_model(str(fp32), model_type="vit", num_heads=heads, hidden_size=0, opt_level=0,
                           use_gpu=device == "cuda")
    fused = {op: n for op, n in model.get_operator_statistics().items() if op in
             ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "LayerNormalization", "FastGelu",
              "Gelu", "BiasGelu", "SkipSimplifiedLayerNormalization")}
    model.convert_float_to_float16(keep_io_types=True)
    optimized = folder / "optimized_fp16.onnx"
    model.save_model_to_file(str(optimized), use_external_data_format=True)
    size = int(bundle.manifest["preprocess"]["image_size"])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = {"fp32": ort.InferenceSession(str(fp32), options, providers=providers),
                "fp16_edgeclip": ort.InferenceSession(str(bundle.path(graph_file(IMAGE_FP16_GRAPH))), options,
                                                      providers=providers, disabled_optimizers=["NchwcTransformer"]),
                "fp16_ort_optimizer": ort.InferenceSession(str(optimized), options, providers=providers,
                                                           disabled_optimizers=["NchwcTransformer"])}
    out: dict[str, Any] = {"optimizer_fused_ops": fused, "rows": {}}
    rng = np.random.default_rng(0)
    for b in batches:
        x = rng.standard_normal((b, 3, size, size), dtype=np.float32)
        ref = None
        for name, session in sessions.items():
            binding = session.io_binding()
            binding.bind_ortvalue_input("pixels", ort.OrtValue.ortvalue_from_numpy(x, where, 0))
            binding.bind_output("embedding", where)
            for _ in range(3):
                session.run_with_iobinding(binding)
            times = []
            for _ in range(iterations):
                start = time.perf_counter()
                session.run_with_iobinding(binding)
                binding.synchronize_outputs()
                times.append((time.perf_counter() - start) * 1000)
            emb = binding.copy_outputs_to_cpu()[0]
            emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
            ref = emb if ref is None else ref
            ms = float(np.median(times))
            out["rows"][f"{name}_b{b}"] = {"p50_ms": round(ms, 3), "images_per_s": round(b * 1000 / ms, 1),
                                           "min_cosine_to_fp32": round(float(np.min(np.sum(emb * ref, axis=1))), 6)}
    return out


def io_binding_rows(bundle: Any, backend: str, batches: list[int], iterations: int) -> dict[str, Any]:
    """The gated graph with and without IO binding (`OrtSession.io_binding`), fp32 and fp16, same pixels,
    interleaved per batch size: p50 ms per batch."""
    from edgeclip.edgeapp.bench import time_calls
    from edgeclip.edgeapp.runtime import GatedRunner

    text = bundle.tensors("learned.safetensors")["zs_text"]
    size = int(bundle.manifest["preprocess"]["image_size"])
    rows: dict[str, Any] = {}
    runners = {}
    for precision in ("fp32", "fp16"):
        for binding in (False, True):
            runner = GatedRunner(bundle, backend, precision=precision, max_batch=max(batches))
            runner.session.io_binding = binding
            runners[f"{precision}_{'iobinding' if binding else 'run'}"] = runner
    rng = np.random.default_rng(0)
    for b in batches:
        x = rng.standard_normal((b, 3, size, size), dtype=np.float32)
        for name, runner in runners.items():
            ms = float(np.median(time_calls(lambda r=runner: r.run(x, text), iterations, warmup=3)))
            rows[f"{name}_b{b}"] = round(ms, 3)
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime as ort

    import edgeclip
    from edgeclip.export.fp16 import export_fp16
    from edgeclip.version import __version__

    device = args.device
    backend = "ort-cuda" if device == "cuda" else "ort-cpu"
    batches = [int(b) for b in args.batch_sizes.split(",")]
    report = Report(Budget(args.budget_s), args.out)
    report.data.update({
        "what": "benchmarks/gpu_check.py: random weights (seed 0), real images (mnist, cifar10 subsets)",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"gpu": gpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "onnxruntime": ort.__version__,
                    "providers": ort.get_available_providers(), "edgeclip": __version__},
        "model": args.model, "device": device, "backend": backend, "batch_sizes": batches,
        "iterations": args.iterations, "moe_iterations": args.moe_iterations,
    })
    with contextlib.suppress(ImportError):
        import torch

        report.data["machine"]["torch"] = torch.__version__
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    data = args.data
    try:
        with report.stage("topk_ties") as rec:
            if rec is not None:
                rec.update(topk_ties(device))
        if device == "cuda":
            with report.stage("torch_eager_fp16", needs_s=30) as rec:
                if rec is not None:
                    rec.update(torch_eager(args.model, device, [1, max(batches)], args.iterations))

        # -- RAIL ---------------------------------------------------------------------------------
        rail = None
        with report.stage("rail_create", needs_s=60) as rec:
            if rec is not None:
                rail = edgeclip.create(work / "rail", args.model, method="rail-primal", random_weights=True, seed=0)
        if rail is not None:
            with report.stage("rail_add_task", needs_s=20) as rec:
                if rec is not None:
                    rail = edgeclip.load(rail.root, backend=backend).add_task("task_a", data / "task_a")
                    rec["version"] = rail.version
            with report.stage("rail_export_fp16", needs_s=30) as rec:
                if rec is not None:
                    bundle = export_fp16(rail.reload().bundle)
                    rec["version"] = bundle.version
                    rec["bytes"] = {k: v["size"] for k, v in bundle.manifest["files"].items() if k.startswith("graphs/")}
            with report.stage("rail_io_binding", needs_s=30) as rec:
                if rec is not None:
                    rec["p50_ms"] = io_binding_rows(edgeclip.load(rail.root, backend=backend).bundle, backend,
                                                    [b for b in batches if b <= 32] or batches[:1], args.iterations)
            with report.stage("rail_bench", needs_s=40) as rec:
                if rec is not None:
                    rec["rows"] = bench_rows(edgeclip.load(rail.root, backend=backend).bundle, backend, batches,
                                             args.iterations)
                    print("\n".join(["RAIL bench (p50):"] + ratio_table(rec["rows"])), flush=True)

        # -- MoE ----------------------------------------------------------------------------------
        moe = None
        with report.stage("moe_create", needs_s=60) as rec:
            if rec is not None:
                moe = edgeclip.create(work / "moe", args.model, method="moe", random_weights=True, seed=0)
        if moe is None:
            return report.data
        labels_a = [c for c in TASKS["task_a"][1]]
        query_a = query_images(data, "task_a")
        before = None
        for task in ("task_a", "task_b"):
            with report.stage(f"moe_add_{task}", needs_s=90) as rec:
                if rec is None:
                    break
                marks: list[tuple[str, float]] = []
                start = time.perf_counter()
                moe = moe.reload().add_task(task, data / task, iterations=args.moe_iterations, device=device,
                                            progress=timed_progress(marks, start))
                rec["stage_starts_s"] = marks
                rec["version"] = moe.version
                rec["training"] = moe.bundle.manifest["tasks"][-1].get("training")
            if task == "task_a":
                with report.stage("moe_classify_task_a_before", needs_s=20) as rec:
                    if rec is not None:
                        before = edgeclip.load(moe.root, backend=backend).classify(query_a, top_k=len(labels_a))
        with report.stage("moe_strict_freeze", needs_s=20) as rec:
            if rec is not None and before is not None and len(moe.bundle.tasks) == 2:
                after = edgeclip.load(moe.root, backend=backend).classify(query_a, top_k=len(labels_a) + 5)
                old, new = scores_by_path(before, labels_a), scores_by_path(after, labels_a)
                both = [p for p in old if old[p][1] == "task_a" and new.get(p, (None, None))[1] == "task_a"]
                diffs = [float(np.nanmax(np.abs(old[p][2] - new[p][2]))) for p in both]
                rec.update({"images": len(query_a), "routed_to_task_a_in_both": len(both),
                            "labels_changed": sum(old[p][0] != new[p][0] for p in both),
                            "max_score_change": max(diffs) if diffs else None,
                            "bit_identical": bool(diffs) and max(diffs) == 0.0})
        with report.stage("moe_export_fp16", needs_s=40) as rec:
            if rec is not None:
                bundle = export_fp16(moe.reload().bundle)
                rec["version"] = bundle.version
                rec["bytes"] = {k: v["size"] for k, v in bundle.manifest["files"].items() if k.startswith("graphs/")}
        with report.stage("moe_graph_warnings", needs_s=20) as rec:
            if rec is not None:
                from edgeclip.edgeapp.runtime import select_backend

                bundle = edgeclip.load(moe.root, backend=backend).bundle
                # the graphs loaded by plain onnxruntime at WARNING (classify's sessions log at ERROR)
                for name in ("graphs/gated.onnx", "graphs/gated_fp16.onnx"):
                    if not bundle.has(name):
                        continue
                    lines: list[str] = []
                    with stderr_lines(lines):
                        options = ort.SessionOptions()
                        options.log_severity_level = 2
                        providers = list(select_backend(backend).providers)
                        ort.InferenceSession(str(bundle.path(name)), options, providers=providers,
                                             disabled_optimizers=["NchwcTransformer"])
                    warn = [ln for ln in lines if "[W:onnxruntime" in ln or "[E:onnxruntime" in ln]
                    rec[name] = {"warnings": len(warn), "first": warn[:5]}
                # classify's own path on ort-cpu, twice: the second start reads the optimised-graph cache
                from edgeclip.edgeapp.runtime import GatedRunner

                size = int(bundle.manifest["preprocess"]["image_size"])
                pixels = np.zeros((1, 3, size, size), np.float32)
                text = bundle.tensors("learned.safetensors")["zs_text"]
                for runner_backend in dict.fromkeys(("ort-cpu", backend)):
                    for start in ("first", "second"):
                        lines = []
                        with stderr_lines(lines):
                            GatedRunner(bundle, runner_backend).run(pixels, text)
                        warn = [ln for ln in lines if "[W:onnxruntime" in ln or "[E:onnxruntime" in ln]
                        rec[f"{runner_backend} classify start ({start})"] = {"warnings": len(warn), "first": warn[:5]}
        with report.stage("moe_bench", needs_s=60) as rec:
            if rec is not None:
                rec["rows"] = bench_rows(edgeclip.load(moe.root, backend=backend).bundle, backend, batches,
                                         args.iterations)
                print("\n".join(["MoE bench (p50):"] + ratio_table(rec["rows"])), flush=True)
        queries = query_images(data)
        with report.stage("moe_classify", needs_s=40) as rec:
            if rec is not None:
                results = {}
                for precision in ("fp32", "fp16"):
                    for cuda_graph in (False, True):
                        clf = edgeclip.load(moe.root, backend=backend, precision=precision, cuda_graph=cuda_graph)
                        clf.classify(queries[:4])  # session and label space ready: the end-to-end rate below
                        start = time.perf_counter()
                        preds = clf.classify(queries, top_k=1)
                        wall = time.perf_counter() - start
                        key = f"{precision}{'_cuda_graph' if cuda_graph else ''}"
                        results[key] = preds
                        rec[key] = {"images": len(preds), "wall_s": round(wall, 3),
                                    "images_per_s": round(len(preds) / wall, 1),
                                    "errors": sum(p.error is not None for p in preds),
                                    "routes": {r: sum(p.route == r for p in preds) for r in {p.route for p in preds}}}
                rec["fp16_vs_fp32"] = agreement(results["fp32"], results["fp16"])
                rec["cuda_graph_vs_plain_fp32"] = agreement(results["fp32"], results["fp32_cuda_graph"])
        if device != "cpu":
            with report.stage("moe_cpu_vs_device", needs_s=40) as rec:
                if rec is not None:
                    subset = queries[::max(1, len(queries) // args.cpu_images)][:args.cpu_images]
                    dev = edgeclip.load(moe.root, backend=backend).classify(subset, top_k=1)
                    start = time.perf_counter()
                    cpu = edgeclip.load(moe.root, backend="ort-cpu").classify(subset, top_k=1)
                    rec["cpu_images_per_s"] = round(len(subset) / (time.perf_counter() - start), 2)
                    rec["agreement"] = agreement(dev, cpu)
        if rail is not None:  # last: onnxruntime's optimizer is the stage most likely to crash the process
            with report.stage("fp16_converters", needs_s=45) as rec:
                if rec is not None:
                    rec.update(converter_rows(edgeclip.load(rail.root, backend=backend).bundle, device,
                                              [1, max(batches)], args.iterations, work))
        return report.data
    finally:
        report.save()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="extract the check's real images")
    p.add_argument("--datasets", type=Path, default=REPO.parent / "shared" / "datasets")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train-per-class", type=int, default=32)
    p.add_argument("--query-per-task", type=int, default=100)
    r = sub.add_parser("run", help="measure")
    r.add_argument("--data", type=Path, required=True, help="a folder made by `prepare`")
    r.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    r.add_argument("--model", default="ViT-B-16")
    r.add_argument("--batch-sizes", default="1,8,32,128")
    r.add_argument("--iterations", type=int, default=20, help="timed runs per bench row")
    r.add_argument("--moe-iterations", type=int, default=20, help="training iterations of each MoE add-task")
    r.add_argument("--cpu-images", type=int, default=48, help="images classified on ort-cpu for CPU vs device")
    r.add_argument("--budget-s", type=float, default=290.0, help="skip the remaining stages after this long")
    r.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_check.json")
    r.add_argument("--quick", action="store_true", help="small settings for a CPU dry run (tests)")
    args = parser.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.datasets, args.out, args.train_per_class, args.query_per_task)
        print(args.out)
        return 0
    if args.quick:
        args.batch_sizes, args.iterations, args.moe_iterations = "1,2", 2, 2
    result = run(args)
    failed = [k for k, v in result["stages"].items() if "error" in v]
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk not in ("rows", "traceback")}
                      for k, v in result["stages"].items()}, indent=1, default=str))
    print(f"[gpu_check] wrote {args.out}; failed stages: {failed or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
