"""The runtime imports and works with torch made unimportable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

RUNTIME_MODULES = [
    "edgeclip.bundle",
    "edgeclip.images",
    "edgeclip.discover",
    "edgeclip.domain",
    "edgeclip.tokenizer",
    "edgeclip.edgeapp.runtime",
    "edgeclip.edgeapp.classify",
    "edgeclip.edgeapp.bench",
    "edgeclip.edgeapp.cli.app",
    "edgeclip.train.rail",
    "edgeclip.train.fusion",
    "edgeclip.train.ddas",
    "edgeclip.edgeapp.tasks",
    "edgeclip.export.compose",
]


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    preamble = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import torch_blocker\n"
    return subprocess.run([sys.executable, "-c", preamble + code], capture_output=True, text=True, timeout=120)


def test_blocker_really_blocks_torch() -> None:
    result = run_without_torch("import torch")
    assert result.returncode != 0 and "blocked" in result.stderr


def test_runtime_imports_without_torch() -> None:
    code = "\n".join(f"import {m}" for m in RUNTIME_MODULES) + "\nprint('ok')"
    result = run_without_torch(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_cli_help_without_torch() -> None:
    result = run_without_torch("import sys; sys.argv=['edgeclip', '--help']\nfrom edgeclip.edgeapp.cli.app import main\nmain()")
    assert result.returncode == 0, result.stderr
    assert "classify" in result.stdout and "add-task" in result.stdout
