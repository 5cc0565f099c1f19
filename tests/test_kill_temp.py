"""Killed commands leave no temporary files behind (issue 20 item 10): `export --int8` and `init` do
their temporary work inside the bundle's staging area, which the next writer removes, never in the
system temp folder. Real kills: SIGKILL the moment the work files appear."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edgeclip.bundle import Bundle

pytestmark = pytest.mark.slow


def run_until(args: list[object], env: dict[str, str], seen: Callable[[], bool], timeout: float = 300) -> bool:
    """Run the CLI; SIGKILL it as soon as ``seen()`` holds. False when it finished first."""
    code = f"import sys; sys.argv = ['edgeclip'] + {[str(a) for a in args]!r}\n" \
           "from edgeclip.edgeapp.cli.app import main\nmain()"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if seen():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.002)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def files_under(*folders: Path, name: str) -> bool:
    return any(any(True for _ in folder.rglob(name)) for folder in folders if folder.exists())


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_killed_export_int8_leaves_no_encoder_copy(make_tiny_bundle, tmp_path: Path) -> None:
    root = make_tiny_bundle(tmp_path / "b", hidden=64)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "EDGECLIP_STAMPS_DIR": str(tmp_path / "stamps")}
    # the moment a working copy of the encoder's weights exists, wherever it is
    killed = run_until(["export", "--int8", "--bundle", root], env,
                       lambda: files_under(tmp, *root.glob(".staging-*"), name="*int8-*/image_encoder.data"))
    assert killed, "export --int8 finished before its working copy was seen"
    assert leftovers(tmp) == []  # nothing in the system temp folder
    assert Bundle.open(root).version == "v0001"
    code = f"import sys; sys.argv = ['edgeclip', 'export', '--int8', '--bundle', {str(root)!r}, '--quiet']\n" \
           "from edgeclip.edgeapp.cli.app import main\nmain()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list(root.glob(".staging-*")) and leftovers(tmp) == []  # the next writer cleaned the staging
    assert "graphs/gated_int8.onnx" in Bundle.open(root).manifest["files"]


def test_killed_init_leaves_nothing_in_the_temp_folder(tmp_path: Path) -> None:
    pytest.importorskip("open_clip")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    root = tmp_path / "b"
    env = {**os.environ, "TMPDIR": str(tmp), "EDGECLIP_STAMPS_DIR": str(tmp_path / "stamps")}
    killed = run_until(["init", "--bundle", root, "--model", "edgeclip-tiny", "--random-weights", "--hidden", "64",
                        "--quiet"], env, lambda: files_under(tmp, *tmp_path.glob(".b.init-*"), name="*.onnx"))
    assert killed, "init finished before an exported graph was seen"
    assert leftovers(tmp) == [] and not root.exists()
    assert [p.name.startswith(".b.init-") for p in tmp_path.iterdir() if p.name.startswith(".b")] == [True]
