"""The typed manifest: bundles written by an earlier release read unchanged, the learner settings
are a tagged union, and defaults live in the schema only."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from edgeclip.errors import BundleError
from edgeclip.manifest import (
    DEFAULT_BETA,
    DEFAULT_HIDDEN,
    METHODS,
    MoESettings,
    RailDualSettings,
    RailPrimalSettings,
    full_dict,
    method_of,
    to_builtins,
    validate_manifest,
)
from edgeclip.train.registry import METHOD_NAMES

# manifest.json of each version of tiny bundles made by release a146dfb (edgeclip init, add-task,
# export --int8; random weights), one per learner
RELEASE = Path(__file__).parent / "fixtures" / "release_a146dfb"
SETTINGS = {"rail-primal": RailPrimalSettings, "rail-dual": RailDualSettings, "moe": MoESettings}


def _leaves(value: object, at: str = "$") -> dict[str, object]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _leaves(item, f"{at}.{key}").items()}
    if isinstance(value, list) and value:
        return {k: v for i, item in enumerate(value) for k, v in _leaves(item, f"{at}[{i}]").items()}
    return {at: value}


@pytest.mark.parametrize("path", sorted(RELEASE.glob("*.json")), ids=lambda p: p.stem)
def test_manifests_of_the_previous_release_read_unchanged(path: Path) -> None:
    written = json.loads(path.read_text())
    meta = validate_manifest(written)
    assert meta.method.name == written["method"]["name"]
    assert isinstance(meta.method.settings, SETTINGS[meta.method.name])
    assert [t.name for t in meta.tasks] == [t["name"] for t in written["tasks"]]
    # written again, every value is the one read; what is left out is a schema default
    again = to_builtins(meta)
    assert validate_manifest(again) == meta
    before, after = _leaves(written), _leaves(again)
    assert all(before[k] == v if k in before else v is None for k, v in after.items())
    assert msgspec.convert(full_dict(meta), type(meta)) == meta


def test_the_schema_knows_the_registry_s_learners_and_their_defaults() -> None:
    assert set(METHODS) == set(METHOD_NAMES)
    primal = method_of("rail-primal")
    assert primal.settings.hidden == DEFAULT_HIDDEN and primal.settings.beta == DEFAULT_BETA
    dual = to_builtins(method_of("rail-dual", lam=0.5))  # learner settings are written in full
    assert dual == {"name": "rail-dual", "settings": {"beta": DEFAULT_BETA, "fusion": "ddas", "seed": 0,
                                                      "gamma_kernel": 0.1, "lam": 0.5, "dim": None, "learner": None}}
    with pytest.raises(BundleError, match="lam"):  # a setting of another learner
        method_of("rail-primal", lam=0.5)
    with pytest.raises(BundleError, match="unknown method 'svm'"):
        method_of("svm")
