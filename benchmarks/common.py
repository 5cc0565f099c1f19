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


def report_header(weights: str) -> dict:
    """The first keys of a benchmark's JSON: machine, date (UTC), the command as run, and what the
    weights were (``weights``: e.g. "random (seeded); ...")."""
    import datetime as dt
    import os
    import sys

    return {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version()},
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "weights": weights}


def write_report(path: Path, report: dict) -> None:
    """Write a benchmark's JSON report (indented, newline-terminated) to ``path``, making its folder, and
    say where."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms of each function over `repeats` rounds, each round running all of them in turn,
    so that load from other processes hits every contender alike (compare their ratios)."""
    return {k: statistics.median(v) for k, v in sample_interleaved(fns, repeats).items()}


def percentile_ms(samples: list[float], q: float) -> float:
    """The q-th percentile (0-100) of samples in ms, linear interpolation."""
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def sample_interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Every timed call (ms) of each function, in interleaved rounds after two warm-up calls each."""
    for fn in fns.values():
        fn()
        fn()  # warm-up
    samples: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(repeats):
        # rotate who goes first: whatever a predecessor leaves behind (spinning threads, caches)
        # then hits every contender equally often
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            fn = fns[key]
            start = time.perf_counter()
            fn()
            samples[key].append((time.perf_counter() - start) * 1000.0)
    return samples
