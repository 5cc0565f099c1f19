"""benchmarks/gpu_check.py's CPU dry run: the same code as the GPU check, on edgeclip-tiny and ort-cpu,
with real images (mnist, cifar10 subsets); every stage runs and the JSON holds what the docs quote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("open_clip")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(shared_datasets: Path, tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "gpu_check.json"
    subprocess.run([sys.executable, str(SCRIPT), "prepare", "--datasets", str(shared_datasets), "--out", str(data),
                    "--train-per-class", "8", "--query-per-task", "10"], check=True, capture_output=True)
    done = subprocess.run([sys.executable, str(SCRIPT), "run", "--data", str(data), "--device", "cpu",
                           "--model", "edgeclip-tiny", "--quick", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stages = json.loads(out.read_text())["stages"]
    assert not [k for k, v in stages.items() if "error" in v or "skipped" in v], stages
    assert stages["topk_ties"]["onnx_topk"] == [0, 1]
    for name in ("rail_bench", "moe_bench"):
        rows = stages[name]["rows"]
        assert {(r["precision"], r["graph"], r["batch_size"], r["cuda_graph_requested"]) for r in rows} == {
            (p, g, b, c) for p in ("fp32", "fp16") for g in ("gated", "plain") for b in (1, 2) for c in (False, True)}
        assert not any(r["cuda_graph"] for r in rows)  # no capture on the CPU provider
    freeze = stages["moe_strict_freeze"]
    assert freeze["routed_to_task_a_in_both"] > 0 and freeze["labels_changed"] == 0
    assert all(v["warnings"] == 0 for k, v in stages["moe_graph_warnings"].items() if isinstance(v, dict))
    classify = stages["moe_classify"]
    agree = classify["fp16_vs_fp32"]
    assert agree["images"] == 20 and agree["same_label_and_route"] >= 19, agree
    assert classify["cuda_graph_vs_plain_fp32"]["same_label_and_route"] == 20
    assert stages["moe_add_task_a"]["training"]["iterations"] == 2
