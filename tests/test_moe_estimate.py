"""MoE add-task on a CPU says the whole training time up front (issue 23): measured time per iteration
x iterations, once, after the first few iterations."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("torch")


def test_cpu_time_estimate_is_said_once_from_measured_iterations(caplog) -> None:
    from edgeclip.edgeapp.moe_task import cpu_time_estimate, format_duration

    ticks = iter([0.0, 1.8])  # clock at the ends of iterations 1 and 4: 0.6 s per iteration
    said: list[tuple[str, int, int]] = []
    on_step = cpu_time_estimate(1000, lambda stage, done, total: said.append((stage, done, total)),
                                clock=lambda: next(ticks))
    with caplog.at_level(logging.WARNING):
        for step in range(1, 8):
            on_step(step, 1000, 0.0)
    estimates = [s for s in said if s[0].startswith("MoE training on the CPU")]
    assert len(estimates) == 1 and "about 10 min for 1000 iterations (0.60 s per iteration" in estimates[0][0]
    assert said.index(estimates[0]) == 3  # as soon as iteration 4 is done
    assert [s[1] for s in said if s[0] == "training"] == list(range(1, 8))
    assert caplog.records and "about 10 min" in caplog.records[0].getMessage()
    assert (format_duration(45), format_duration(600), format_duration(5400)) == ("45 s", "10 min", "1.5 h")
