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
    MoEAdapters,
    MoERecipe,
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


def test_moe_settings_are_typed_and_written_as_every_release_wrote_them() -> None:
    """issue 19: `method.settings.moe` and `.train` are structs (no dict), read from the release's MoE
    bundles and written back key for key; what older code wrote opens too: the recipe before its
    warm-up rule existed (November 2026) and the preset's keys (`init --preset moe-paper`)."""
    for path in sorted(RELEASE.glob("moe-*.json")):
        written = json.loads(path.read_text())
        settings = validate_manifest(written).method.settings
        assert isinstance(settings.moe, MoEAdapters) and isinstance(settings.train, MoERecipe)
        assert settings.moe.n_experts == 2 and settings.moe.encoders == ("image", "text")
        assert settings.train.lr == written["method"]["settings"]["train"]["lr"]
        assert to_builtins(validate_manifest(written).method) == written["method"]  # the same JSON
    written = json.loads((RELEASE / "moe-v0001.json").read_text())
    train = written["method"]["settings"]["train"]
    del train["warmup_rule"]
    assert validate_manifest(written).method.settings.train.warmup_rule == "capped"
    train.update(warmup_rule="fixed", freeze_rule="paper", preset="moe-paper",
                 lr_by_dataset={"full": {"eurosat": 1e-4}, "few": {"eurosat": 2e-4}})
    recipe = validate_manifest(written).method.settings.train
    assert (recipe.preset, recipe.lr_by_dataset["few"]["eurosat"]) == ("moe-paper", 2e-4)
    assert to_builtins(recipe) == train
    assert "preset" not in to_builtins(MoERecipe()) and "lr_by_dataset" not in to_builtins(MoERecipe())
    train["learning_rate"] = 1.0  # a typo is refused, not ignored
    with pytest.raises(BundleError, match="learning_rate"):
        validate_manifest(written)


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


def test_learners_and_the_cli_take_their_defaults_from_the_schema() -> None:
    """issue 19: MoE's and RAIL's defaults are defined in edgeclip.manifest only; the models, the trainer's
    recipe, a new bundle's settings and the CLI's help read them there."""
    pytest.importorskip("torch")
    import inspect
    import typing

    from edgeclip import manifest as m
    from edgeclip.edgeapp.cli.commands_manage import init
    from edgeclip.train.moe import MoEConfig
    from edgeclip.train.moe_trainer import TrainSettings
    from edgeclip.train.rail import RailDual, RailPrimal
    from edgeclip.train.registry import get_learner

    config = MoEConfig()
    assert (config.n_experts, config.top_k, config.bottleneck, config.scale, config.dropout, config.noise_eps,
            config.encoders) == (m.DEFAULT_MOE_EXPERTS, m.DEFAULT_MOE_TOP_K, m.DEFAULT_MOE_BOTTLENECK,
                                 m.DEFAULT_MOE_SCALE, m.DEFAULT_MOE_DROPOUT, m.DEFAULT_MOE_NOISE_EPS,
                                 m.DEFAULT_MOE_ENCODERS)
    recipe = TrainSettings()
    assert (recipe.iterations, recipe.batch_size, recipe.lr, recipe.warmup, recipe.freeze_rule) == (
        m.DEFAULT_MOE_ITERATIONS, m.DEFAULT_MOE_BATCH_SIZE, m.DEFAULT_MOE_LR, m.DEFAULT_MOE_WARMUP,
        m.DEFAULT_MOE_FREEZE_RULE)
    settings = get_learner("moe").init_settings({}, 8)
    assert settings.moe == m.MoEAdapters() and settings.moe.n_experts == m.DEFAULT_MOE_EXPERTS
    assert MoEConfig.of(settings.moe) == config
    assert to_builtins(settings.train) == {
        "iterations": m.DEFAULT_MOE_ITERATIONS, "batch_size": m.DEFAULT_MOE_BATCH_SIZE, "lr": m.DEFAULT_MOE_LR,
        "warmup": m.DEFAULT_MOE_WARMUP, "warmup_rule": m.DEFAULT_MOE_WARMUP_RULE,
        "freeze_rule": m.DEFAULT_MOE_FREEZE_RULE}
    from edgeclip.errors import UsageError

    for options, message in (({"moe_train": {"learning_rate": 1.0}}, "learning_rate"),
                             ({"moe_train": {"freeze_rule": "loose"}}, "freeze_rule must be one of"),
                             ({"moe": {"n_experts": 2, "top_k": 3}}, "top_k")):
        with pytest.raises(UsageError, match=message):  # refused at init, not at the first add-task
            get_learner("moe").init_settings(options, 8)
    primal, dual = inspect.signature(RailPrimal).parameters, inspect.signature(RailDual).parameters
    assert (primal["hidden"].default, primal["gamma"].default) == (m.DEFAULT_HIDDEN, m.DEFAULT_GAMMA)
    assert (dual["gamma_kernel"].default, dual["lam"].default) == (m.DEFAULT_KERNEL_GAMMA, m.DEFAULT_LAMBDA)
    options = inspect.signature(init).parameters
    assert options["encoders"].default == ",".join(m.DEFAULT_MOE_ENCODERS)
    hints = typing.get_type_hints(init, include_extras=True)
    helps = {name: typing.get_args(hint)[1].help for name, hint in hints.items() if typing.get_args(hint)[1:]}
    assert f"paper's {m.DEFAULT_MOE_EXPERTS})" in helps["experts"]
    assert f"paper's {m.DEFAULT_MOE_BATCH_SIZE})" in helps["batch_size"] and f"default {m.DEFAULT_MOE_LR:g};" in helps["lr"]


def test_the_decision_reads_the_learner_s_typed_settings() -> None:
    """issue 19: DecisionSpec carries the typed settings (RAIL dual's kernel width is `settings.gamma_kernel`),
    no getattr fallback on the settings' shape."""
    import numpy as np

    from edgeclip.train.decision import DecisionSpec

    written = json.loads((RELEASE / "rail-dual-v0002.json").read_text())
    meta = validate_manifest(written)
    sizes = np.array([len(t.classes) for t in meta.tasks], np.int64)
    spec = DecisionSpec.from_bundle({"task.size": sizes, "task.offset": np.cumsum(sizes) - sizes}, meta)
    assert spec.settings is meta.method.settings and spec.settings.gamma_kernel == written["method"]["settings"].get(
        "gamma_kernel", 0.1)
    assert not hasattr(spec, "kernel_gamma")
