"""Latency measurement of a bundle's graphs (torch-free): the gated graph against the plain encoder."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np


@dataclass
class LatencyResult:
    """One timed (backend, graph, batch size, precision): latency percentiles in milliseconds per call
    (one call = one batch) and throughput in images per second (batch size / median latency)."""

    backend: str
    graph: str  # "gated" or "plain"
    batch_size: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    images_per_s: float
    precision: str = "fp32"  # "fp32", "fp16" or "int8"
    cuda_graph: bool = False  # captured CUDA graphs were in use (ort-cuda with --cuda-graph)

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict (for benchmarks/results/*.json)."""
        return asdict(self)


def time_calls(call: Callable[[], object], iterations: int, warmup: int = 2) -> np.ndarray:
    """Wall-clock milliseconds of ``iterations`` calls after ``warmup`` untimed ones: [iterations] float64
    (``time.perf_counter``)."""
    for _ in range(warmup):
        call()
    times = np.empty(iterations)
    for i in range(iterations):
        start = time.perf_counter()
        call()
        times[i] = (time.perf_counter() - start) * 1000.0
    return times


def summarise(backend: str, graph: str, batch_size: int, times_ms: np.ndarray,
              precision: str = "fp32", cuda_graph: bool = False) -> LatencyResult:
    """Percentiles (p50, p90, p99 of ``times_ms``, milliseconds per batch) and images per second
    (batch_size * 1000 / median) of one timed configuration."""
    p50, p90, p99 = np.percentile(times_ms, [50, 90, 99])
    return LatencyResult(backend, graph, batch_size, float(p50), float(p90), float(p99),
                         float(batch_size * 1000.0 / np.median(times_ms)), precision, cuda_graph)


def warm_up_engines(bundle, backend: str, fp16: bool = False) -> None:
    """Run the gated and plain graphs once on a backend, which builds (or loads cached) engines.

    bundle: an open ``edgeclip.bundle.Bundle``; backend: a runtime backend name. Raises UsageError on
    an unknown backend, BackendUnavailableError when it is not usable here.
    """
    from edgeclip.edgeapp.classify import build_label_space
    from edgeclip.edgeapp.runtime import GatedRunner, ImageEncoderRunner, TextEncoderRunner, select_backend

    resolved = select_backend(backend, fp16=fp16)
    size = bundle.meta.preprocess.image_size
    pixels = np.zeros((1, 3, size, size), np.float32)
    labels = build_label_space(bundle, [] if bundle.learned_classes else ["object"],
                               TextEncoderRunner(bundle, resolved).class_embeddings)
    GatedRunner(bundle, resolved).run(pixels, labels.text)
    ImageEncoderRunner(bundle, resolved).embed(pixels)


def bench_bundle(bundle, backend: str, batch_sizes: list[int], iterations: int, seed: int = 0,
                 on_step: Callable[[], None] | None = None, precision: str = "fp32",
                 cuda_graph: bool = False) -> list[LatencyResult]:
    """Time the gated and the plain graph on the same random pixels, interleaved per batch size
    so that both see the same machine state (the ratio is what is comparable).

    precision "fp16" (or "int8") times the fp32 and the fp16 (int8) graphs, interleaved too (int8 on
    onnxruntime CPU only). cuda_graph: CUDA graphs on ort-cuda (`OrtSession`), each batch size being
    one of the runners' fixed sizes; the results say whether capture was in use.

    bundle: an open ``edgeclip.bundle.Bundle``; pixels are standard-normal [B,3,S,S] float32 drawn
    with ``seed``; ``on_step`` is called after each batch size. Returns two results (gated, plain) per
    batch size and precision. Raises UsageError on an unknown backend or precision (int8 off
    onnxruntime CPU), BackendUnavailableError, BundleError when an int8 graph is missing.
    """
    from edgeclip.edgeapp.classify import build_label_space
    from edgeclip.edgeapp.runtime import GatedRunner, ImageEncoderRunner, TextEncoderRunner, resolve_precision

    resolved = resolve_precision(bundle, backend, precision)
    precisions = ("fp32",) if precision == "fp32" else ("fp32", precision)

    largest = max(batch_sizes)
    runners = [(p, GatedRunner(bundle, resolved, precision=p, cuda_graph=cuda_graph, max_batch=largest),
                ImageEncoderRunner(bundle, resolved, precision=p, cuda_graph=cuda_graph, max_batch=largest))
               for p in precisions]
    extra = [] if bundle.learned_classes else ["object"]
    labels = build_label_space(bundle, extra, TextEncoderRunner(bundle, backend).class_embeddings)
    size = bundle.meta.preprocess.image_size
    rng = np.random.default_rng(seed)
    results = []
    for batch in batch_sizes:
        pixels = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
        for p, gated, plain in runners:
            results.append(summarise(gated.backend_name, "gated", batch, time_calls(
                lambda g=gated, x=pixels: g.run(x, labels.text), iterations), p, gated.session.cuda_graph_active))
            results.append(summarise(plain.backend_name, "plain", batch, time_calls(
                lambda e=plain, x=pixels: e.embed(x), iterations), p, plain.session.cuda_graph_active))
        if on_step:
            on_step()
    return results
