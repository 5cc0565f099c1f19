"""Shared by the CLI tests: the console entry point in a real subprocess, and a small bundle
with the two demo domains learned (built once per session)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from edgeclip.edgeapp.cli.app import app
from edgeclip.edgeapp.demo_data import write_demo_images

TESTS = Path(__file__).resolve().parent
runner = CliRunner()


def invoke(*args: object) -> "object":
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def entry_code(args: list[str], block_torch: bool = False) -> str:
    preamble = f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
    if block_torch:
        preamble += "import torch_blocker\n"
    return preamble + f"sys.argv = ['edgeclip'] + {args!r}\nfrom edgeclip.edgeapp.cli.app import main\nmain()"


def edgeclip_main(args: list[str], block_torch: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """Run the console entry point in a fresh interpreter (optionally with torch unimportable)."""
    kwargs.setdefault("text", True)
    return subprocess.run([sys.executable, "-c", entry_code(args, block_torch)], capture_output=True, timeout=300,
                          **kwargs)


def run_without_torch(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run Python ``code`` in a fresh interpreter where torch, torchvision and open_clip cannot be imported."""
    preamble = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import torch_blocker\n"
    return subprocess.run([sys.executable, "-c", preamble + code], capture_output=True, text=True, timeout=300, check=False,
                          env=env)


def eval_app() -> typer.Typer:
    """The real app when it registers `eval`, else a group holding only `eval`."""
    from edgeclip.edgeapp.cli import commands_eval
    from edgeclip.edgeapp.cli.app import app

    if any(c.name == "eval" for c in app.registered_commands):
        return app
    local = typer.Typer()
    local.callback()(lambda: None)
    commands_eval.register(local)
    return local


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def write_split_domains(root: Path) -> list[Path]:
    """The demo's two generated domains, with train/ and test/ (test images drawn with another seed)."""
    domains, _ = write_demo_images(root / "a", train_per_class=8, query_per_class=0, seed=0)
    tests, _ = write_demo_images(root / "b", train_per_class=3, query_per_class=0, seed=1)
    for domain, test in zip(domains, tests):
        shutil.move(str(test / "train"), str(domain / "test"))
    return domains


def env_with(**extra: str) -> dict[str, str]:
    return {**os.environ, **extra}


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("demo-images")
    domains, query = write_demo_images(root, train_per_class=10, query_per_class=2)
    return {"domains": domains, "query": query, "root": root}


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory, images: dict, make_tiny_bundle) -> Path:
    """A rail-primal bundle with the two demo domains learned (do not add tasks to it)."""
    pytest.importorskip("open_clip")
    root = make_tiny_bundle(tmp_path_factory.mktemp("cli") / "bundle", hidden=512)
    for domain in images["domains"]:
        result = invoke("add-task", domain, "--bundle", root, "--quiet")
        assert result.exit_code == 0, result.output
    return root
