"""Shared fixtures: the real image sets in ../shared/datasets, extracted in small subsets."""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASETS_DIR = REPO_ROOT.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """The folder of dataset tars; the test is skipped where it is absent."""
    if not DATASETS_DIR.is_dir():
        pytest.skip(f"real image sets not found at {DATASETS_DIR}")
    return DATASETS_DIR


ExtractSubset = Callable[..., Path]


@pytest.fixture(scope="session")
def extract_subset(shared_datasets: Path, tmp_path_factory: pytest.TempPathFactory) -> ExtractSubset:
    """A function `extract_subset(name, split, classes=None, per_class=5) -> Path`.

    It extracts `per_class` images (the first by file name) of each chosen class (all
    classes when `classes` is None) of `split` from `<name>.tar`, plus `meta.json`, and
    returns the dataset root `<dir>/<name>` laid out as `meta.json`, `<split>/<class>/<file>`.
    Results are cached for the session per arguments; treat the folders as read-only.
    """
    cache: dict[tuple, Path] = {}
    members_cache: dict[str, list[tarfile.TarInfo]] = {}

    def members(name: str) -> list[tarfile.TarInfo]:
        if name not in members_cache:
            tar_path = shared_datasets / f"{name}.tar"
            if not tar_path.is_file():
                pytest.skip(f"dataset {tar_path} not found")
            with tarfile.open(tar_path) as tar:
                members_cache[name] = tar.getmembers()
        return members_cache[name]

    def extract(name: str, split: str, classes: list[str] | None = None, per_class: int = 5) -> Path:
        key = (name, split, tuple(classes) if classes is not None else None, per_class)
        if key in cache:
            return cache[key]
        by_class: dict[str, list[tarfile.TarInfo]] = {}
        meta = None
        for m in members(name):
            parts = m.name.split("/")
            if parts == [name, "meta.json"]:
                meta = m
            elif len(parts) == 4 and parts[0] == name and parts[1] == split and m.isfile():
                by_class.setdefault(parts[2], []).append(m)
        wanted = sorted(by_class) if classes is None else list(classes)
        unknown = [c for c in wanted if c not in by_class]
        if unknown:
            raise ValueError(f"{name}/{split} has no classes {unknown}; it has {sorted(by_class)}")
        chosen = [meta] if meta is not None else []
        for c in wanted:
            chosen += sorted(by_class[c], key=lambda m: m.name)[:per_class]
        dest = tmp_path_factory.mktemp(f"{name}-{split}")
        with tarfile.open(shared_datasets / f"{name}.tar") as tar:
            tar.extractall(dest, members=chosen, filter="data")
        cache[key] = dest / name
        return cache[key]

    return extract


@pytest.fixture(scope="session")
def dataset_meta(shared_datasets: Path) -> Callable[[str], dict]:
    """A function `dataset_meta(name) -> dict` reading `<name>/meta.json` straight from the tar."""

    def read(name: str) -> dict:
        tar_path = shared_datasets / f"{name}.tar"
        if not tar_path.is_file():
            pytest.skip(f"dataset {tar_path} not found")
        with tarfile.open(tar_path) as tar:
            f = tar.extractfile(f"{name}/meta.json")
            assert f is not None
            return json.loads(f.read().decode("utf-8"))

    return read


# -- markers -------------------------------------------------------------------------------------
# `pytest -m "not slow"` is the fast subset (under a minute on 2 cores): tests that train, export
# graphs or read the real image sets are marked here from what they use, so a new test that uses
# such a fixture or lives in such a module is marked without remembering to.
REALDATA_FIXTURES = {"shared_datasets", "extract_subset", "dataset_meta"}
RAY_FIXTURES = {"ray_cluster"}  # the session's local Ray: marked `ray` and `slow`
# module-scoped fixtures that export a bundle or graphs
EXPORTING_FIXTURES = {"bundle", "source_bundle", "fp32_only", "both_protocols", "make_tiny_bundle"}
# modules whose every test exports graphs or trains
EXPORTING_MODULES = {"test_compose", "test_export_moe", "test_export_parity", "test_moe_ddp", "test_moe_trainer",
                     "test_quantize", "test_runtime", "test_trace"}
# single tests that export or train inline
EXPORTING_TESTS = {"test_rollback_then_add_task_without_torch", "test_interrupted_add_task_leaves_previous_version",
                   "test_moe_end_to_end", "test_demo_runs_the_whole_flow", "test_moe_bundles_are_scored_through_their_gated_graph"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & REALDATA_FIXTURES:
            item.add_marker(pytest.mark.realdata)
            item.add_marker(pytest.mark.slow)
        if fixtures & RAY_FIXTURES:
            item.add_marker(pytest.mark.ray)
            item.add_marker(pytest.mark.slow)
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if fixtures & EXPORTING_FIXTURES or module in EXPORTING_MODULES or item.originalname in EXPORTING_TESTS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def private_embedding_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The embedding cache of this test session (never the user's): $EDGECLIP_CACHE_DIR, inherited by
    the CLI processes tests start."""
    folder = tmp_path_factory.mktemp("embedding-cache")
    before = os.environ.get("EDGECLIP_CACHE_DIR")
    os.environ["EDGECLIP_CACHE_DIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("EDGECLIP_CACHE_DIR", None)
    else:
        os.environ["EDGECLIP_CACHE_DIR"] = before


# -- bundles -------------------------------------------------------------------------------------
MakeBundle = Callable[..., Path]


@pytest.fixture(scope="session")
def make_tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> MakeBundle:
    """A function `make_tiny_bundle(dest, method="rail-primal", hidden=256, labels=(), seed=0) -> dest`.

    The first call for a setting creates an edgeclip-tiny bundle with random weights (exporting its
    encoders, a few seconds); later calls copy it, so each test gets its own bundle cheaply.
    """
    import shutil

    import edgeclip

    templates: dict[tuple, Path] = {}

    def make(dest: Path, method: str = "rail-primal", hidden: int = 256, labels: tuple[str, ...] = (),
             seed: int = 0) -> Path:
        key = (method, hidden, tuple(labels), seed)
        if key not in templates:
            root = tmp_path_factory.mktemp("tiny-bundle") / "bundle"
            edgeclip.create(root, "edgeclip-tiny", method=method, random_weights=True, seed=seed,
                            zero_shot_labels=list(labels), hidden=hidden)
            templates[key] = root
        shutil.copytree(templates[key], dest)
        return Path(dest)

    return make


@pytest.fixture(scope="session")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight backbone's exported encoders (``export_helpers.tiny_graphs``, made once)."""
    import export_helpers

    return export_helpers.tiny_graphs(tmp_path_factory.getbasetemp())


# -- Ray -----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ray_cluster():
    """The session's local Ray cluster, ``ray.init(num_cpus=2)``, shared by every Ray test (starting one
    costs seconds); skipped without the [ray] extra. Yields the ``ray`` module."""
    ray = pytest.importorskip("ray")
    import logging

    from edgeclip.edgeapp.distributed import RaySession

    session = RaySession.start(None, 2)  # quiet like the CLI's; the CLI's --ray local then reuses it
    assert session.started, "a Ray was already running in the test process"
    logging.getLogger("ray").setLevel(logging.ERROR)
    yield ray
    session.close()
