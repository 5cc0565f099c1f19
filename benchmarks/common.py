"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so importable as `common`)."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Callable


def cpu_name() -> str:
    """The processor's model name, for the machine line of a report."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms of each function over `repeats` rounds, each round running all of them in turn,
    so that load from other processes hits every contender alike (compare their ratios)."""
    for fn in fns.values():
        fn()
        fn()  # warm-up
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1000.0 for k, v in samples.items()}
