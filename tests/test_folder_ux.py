"""Folders as users have them: a domain one level too high gets a hint, eval takes val/ or valid/ when there is
no test/ (with a note), rollback to a version that does not exist is a usage error naming the versions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from edgeclip.domain import eval_split, read_domain
from edgeclip.errors import DomainError

CLI = Path(sys.executable).with_name("edgeclip")


def _classes(folder: Path, names=("cat", "dog"), per_class: int = 2) -> None:
    for name in names:
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / name / f"{i}.png")


def test_a_domain_one_level_too_high_points_at_the_class_layout(tmp_path: Path) -> None:
    _classes(tmp_path / "dataset" / "images" / "train")
    with pytest.raises(DomainError) as err:
        read_domain(tmp_path / "dataset")
    message = str(err.value)
    assert "1 class folder(s)" in message and f"{tmp_path / 'dataset' / 'images'} looks like a domain folder" in message
    assert read_domain(tmp_path / "dataset" / "images").classes == ["cat", "dog"]  # the suggestion works
    (tmp_path / "flat" / "only").mkdir(parents=True)
    with pytest.raises(DomainError) as err:
        read_domain(tmp_path / "flat")
    assert "did you mean" not in str(err.value)


@pytest.mark.parametrize("split", ["val", "valid"])
def test_eval_takes_val_or_valid_when_there_is_no_test_folder(tmp_path: Path, split: str) -> None:
    from edgeclip.edgeapp.evaluate import prepare_domains

    _classes(tmp_path / "pets" / "train")
    _classes(tmp_path / "pets" / split, per_class=1)
    assert eval_split(tmp_path / "pets")[0] == split
    (domain,) = prepare_domains([tmp_path / "pets"], tmp_path / "work")
    assert len(domain.test.samples) == 2 and all(f"/{split}/" in str(p) for p, _ in domain.test.samples)
    assert domain.split_note and f"{split}/ folder is used as the test split" in domain.split_note
    _classes(tmp_path / "pets" / "test", per_class=3)  # test/ wins, no note
    (domain,) = prepare_domains([tmp_path / "pets"], tmp_path / "work2")
    assert len(domain.test.samples) == 6 and domain.split_note is None


@pytest.mark.slow
def test_rollback_to_a_missing_version_is_a_usage_error(make_tiny_bundle, tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "bundle")
    result = subprocess.run([str(CLI), "rollback", "--to", "v9", "--bundle", str(bundle)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "no version 'v9'" in result.stderr and "v0001" in result.stderr, result.stderr
