"""The runtime imports and works with torch made unimportable."""

from __future__ import annotations

from pathlib import Path

from cli_helpers import run_without_torch

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


def test_classify_one_image_imports_only_what_it_needs(tmp_path: Path, make_tiny_bundle) -> None:
    """`edgeclip classify` of one image (a learned task, no new labels): no torch, no `onnx` package,
    no scipy; the second run loads the image encoder from the optimised-graph cache (add-task, which runs the
    same encoder, may have put it there already) and its embedding from the embedding cache, same output."""
    import json
    import os

    from edgeclip.edgeapp.demo_data import write_demo_images

    bundle = make_tiny_bundle(tmp_path / "bundle", hidden=64)
    domains, query = write_demo_images(tmp_path / "images", train_per_class=4, query_per_class=1)
    env = dict(os.environ, EDGECLIP_ENGINE_CACHE=str(tmp_path / "engines"), EDGECLIP_BUNDLE=str(bundle))
    env.pop("EDGECLIP_SESSION_CACHE", None)
    learn = run_without_torch(
        f"import sys; sys.argv = ['edgeclip', 'add-task', {str(domains[0])!r}, '--quiet']\n"
        "from edgeclip.edgeapp.cli.app import main\nmain()", env=env)
    assert learn.returncode == 0, learn.stderr
    image = str(min(query.iterdir()))
    code = (
        "import atexit, logging, sys\n"
        "logging.basicConfig(level=logging.INFO, format='LOG %(message)s')\n"
        "atexit.register(lambda: print('MODULES', ' '.join(sorted({m.split('.')[0] for m in sys.modules})),"
        " file=sys.stderr))\n"
        f"sys.argv = ['edgeclip', 'classify', {image!r}, '--format', 'json', '--quiet', '--backend', 'ort-cpu']\n"
        "from edgeclip.edgeapp.cli.app import main\nmain()")
    first, second = run_without_torch(code, env=env), run_without_torch(code, env=env)
    for result in (first, second):
        assert result.returncode == 0, result.stderr
        modules = set(next(ln for ln in result.stderr.splitlines() if ln.startswith("MODULES")).split()[1:])
        assert not modules & {"torch", "open_clip", "onnx", "scipy", "torchvision"}, modules & {"onnx", "scipy"}
    assert "optimised graph from the cache" in second.stderr
    assert json.loads(first.stdout) == json.loads(second.stdout)
