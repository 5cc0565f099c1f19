"""`edgeclip classify --resume -o FILE` (single process; the Ray path in test_ray.py): a rerun skips the files
FILE holds and adds the rest, a torn last line (a killed run) is cut off and done again; Parquet results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import invoke
from PIL import Image

from edgeclip.errors import UsageError


@pytest.fixture(scope="module")
def setup(make_tiny_bundle, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume")
    bundle = make_tiny_bundle(root / "bundle", labels=("cat", "dog", "car"))
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(30):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(photos / f"{i:03d}.png")
    (photos / "000_broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return bundle, photos


def run(bundle: Path, photos: Path, *args: object) -> object:
    return invoke("classify", photos, "--bundle", bundle, "--batch-size", "4", "-q", *args)


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_resume_after_a_kill_gives_the_full_file(fmt: str, setup: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, photos = setup
    full, part = tmp_path / f"full.{fmt}", tmp_path / f"part.{fmt}"
    assert run(bundle, photos, "--format", fmt, "-o", full).exit_code == 3  # the broken file: exit 3
    data = full.read_bytes()
    part.write_bytes(data[: len(data) // 2])  # a run killed while writing a line
    assert not part.read_bytes().endswith(b"\n")
    result = run(bundle, photos, "--format", fmt, "-o", part, "--resume")
    assert result.exit_code == 0, result.output  # the broken file's row was written before the kill
    assert part.read_bytes() == data
    again = run(bundle, photos, "--format", fmt, "-o", part, "--resume")  # nothing left: nothing added
    assert again.exit_code == 0 and part.read_bytes() == data


def test_resume_refuses_what_it_cannot_continue(setup: tuple[Path, Path], tmp_path: Path) -> None:
    """Usage errors (exit 2 with one line, through the entry point; raised in-process here)."""
    bundle, photos = setup
    out = tmp_path / "out.csv"
    run(bundle, photos, "--format", "csv", "-o", out, "--top-k", "2")
    with pytest.raises(UsageError, match="columns differ"):
        run(bundle, photos, "--format", "csv", "-o", out, "--top-k", "3", "--resume")
    notes = tmp_path / "notes.jsonl"
    notes.write_text("my notes\n")
    with pytest.raises(UsageError, match="line 1 is not a result row"):
        run(bundle, photos, "--format", "json", "-o", notes, "--resume")
    assert notes.read_text() == "my notes\n"  # left as it was
    with pytest.raises(UsageError, match="--resume needs -o"):
        run(bundle, photos, "--resume")
    with pytest.raises(UsageError, match="parquet needs -o"):
        run(bundle, photos, "--format", "parquet")
    for bad in ("local:0", "local:x", ""):
        with pytest.raises(UsageError, match="--ray"):
            run(bundle, photos, "--ray", bad)


def test_parquet_results_and_resume(setup: tuple[Path, Path], tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    bundle, photos = setup
    jsonl, out = tmp_path / "rows.jsonl", tmp_path / "rows.parquet"
    run(bundle, photos, "--format", "json", "-o", jsonl)
    assert run(bundle, photos, "-o", out).exit_code == 3  # -o NAME.parquet: Parquet
    expected = [json.loads(line) for line in jsonl.read_text().splitlines()]
    table = pq.read_table(out)
    assert table.to_pylist() == expected  # the JSON Lines fields, the same values
    pq.write_table(table.slice(0, 7), out)  # a stopped run's file
    assert run(bundle, photos, "-o", out, "--resume").exit_code == 0
    assert pq.read_table(out).to_pylist() == expected
    assert not list(tmp_path.glob(".*partial"))  # no temporary file left


def test_ray_without_the_extra_names_it(setup: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeclip.errors import MissingExtraError

    bundle, photos = setup
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'edgeclip\[ray\]'"):
        run(bundle, photos, "--ray", "local")
