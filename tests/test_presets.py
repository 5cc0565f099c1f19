"""The paper presets (train/presets.py) against a table of the papers' values, and their use by
init, add-task and eval."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import msgspec
import pytest

from edgeclip.errors import UsageError
from edgeclip.manifest import MoERecipe
from edgeclip.train import presets

# The values as the official repositories run them (sources in train/presets.py), written out
# here independently of the module so that a changed preset fails.
MTIL = ["aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers", "food", "mnist", "oxford_pet",
        "stanford_cars", "sun397"]
PAPER = {
    "moe-paper": {
        "method": "moe", "protocol": "mtil", "seed": 42, "experts": 22, "top_k": 2, "freeze_rule": "paper",
        "batch_size": 64, "warmup": 100, "warmup_rule": "fixed", "label_smoothing": 0.2,
        "iterations_full": 1000, "iterations_few": 1000, "route_batch": 128, "templates": None,
        "lr_full": [5e-3, 1e-3, 5e-3, 1e-3, 1e-4, 1e-3, 1e-3, 1e-4, 1e-3, 1e-3, 1e-3],
        "lr_few": [5e-3, 1e-4, 5e-3, 1e-3, 1e-4, 1e-3, 1e-3, 1e-4, 1e-3, 1e-3, 1e-3],
        "official_threshold": {"full": 0.0655, "few": 0.060},
    },
    "rail-paper": {
        "method": "rail-primal", "protocol": "xtail", "seed": 42, "hidden": 15000, "gamma": 0.1, "beta": 0.9,
        "fusion": "paper", "shots": 16, "templates": ("a photo of a {}.",),
        "route_batch": None,
    },
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_each_preset_holds_the_papers_values(name: str) -> None:
    preset = presets.get_preset(name)
    got = preset.to_dict()
    for key, want in PAPER[name].items():
        if key.startswith("lr_"):
            assert [got[key][d] for d in MTIL] == want, key
            assert list(got[key]) == MTIL
        else:
            assert got[key] == want, key
    assert preset.source  # where the values come from


def test_learning_rates_are_looked_up_by_dataset_name() -> None:
    moe = presets.MOE_PAPER
    assert moe.lr_for("FGVC-Aircraft", None) == 5e-3
    assert moe.lr_for("caltech101", None) == 1e-3 and moe.lr_for("Caltech-101", 5) == 1e-4
    assert moe.lr_for("oxford_pets", None) == 1e-3 and moe.lr_for("EuroSAT", None) == 1e-4
    assert presets.dataset_key("Food101") == "food" and presets.dataset_key("shapes") is None
    with pytest.raises(UsageError, match="no learning rate for domain 'shapes'"):
        moe.lr_for("shapes", None)
    with pytest.raises(UsageError, match="Unknown preset"):
        presets.get_preset("zscl")
    assert set(presets.XTAIL_ORDER) == set(MTIL) - {"cifar100"}


def test_task_recipe_and_warmup_rules() -> None:
    from edgeclip.edgeapp.moe_task import task_recipe, warmup_steps

    train = MoERecipe(iterations=1000, batch_size=64, lr=1e-3, warmup=100, warmup_rule="fixed", freeze_rule="paper",
                      lr_by_dataset={"full": {"eurosat": 1e-4}, "few": {"eurosat": 2e-4}})
    assert task_recipe(train, "eurosat").lr == 1e-4
    assert task_recipe(train, "EuroSAT", {"shots": 5}).lr == 2e-4
    assert task_recipe(train, "eurosat", {"lr": 3e-3, "shots": None}).lr == 3e-3  # add-task --lr wins
    assert task_recipe(train, "shapes").lr == 1e-3 and task_recipe(train, "x").lr_by_dataset is msgspec.UNSET
    assert task_recipe(train, "x", {"iterations": 7, "warmup": None}).iterations == 7
    assert warmup_steps(MoERecipe(warmup=100, iterations=500, warmup_rule="fixed")) == 100
    assert warmup_steps(MoERecipe(warmup=100, iterations=500)) == 50  # edgeclip: capped at a tenth
    with pytest.raises(UsageError, match="learning rate must be positive"):
        task_recipe(train, "x", {"lr": 0.0})
    with pytest.raises(UsageError, match="warmup_rule"):
        task_recipe(msgspec.structs.replace(train, warmup_rule="linear"), "x")
    with pytest.raises(UsageError, match="Unknown MoE training option"):
        task_recipe(train, "x", {"learning_rate": 1.0})


def _named(root: Path, domains: list[Path], names: list[str]) -> list[Path]:
    out = []
    for domain, name in zip(domains, names):
        dest = root / name
        shutil.copytree(domain, dest, symlinks=True)
        (dest / "meta.json").write_text(json.dumps({"name": name, "templates": ["a {} thing.", "the {}."]}))
        out.append(dest)
    return out


@pytest.fixture(scope="module")
def domains(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    pytest.importorskip("open_clip")
    from cli_helpers import write_split_domains

    root = tmp_path_factory.mktemp("preset-images")
    return _named(root / "named", write_split_domains(root / "src"), ["dtd", "eurosat"])


def test_rail_paper_preset_per_eval_run(domains: list[Path], tmp_path: Path) -> None:
    """On a bundle not made with the preset: the paper's fusion, weight, template and shots apply,
    and the init settings that differ are reported."""
    from edgeclip.bundle import Bundle
    from edgeclip.edgeapp import eval_summary, evaluate
    from edgeclip.edgeapp.create import init_bundle

    init_bundle(tmp_path / "b", "edgeclip-tiny", random_weights=True, hidden=128)
    run = evaluate.run_protocols(tmp_path / "b", domains, tmp_path / "w", preset="rail-paper", shots=4)
    assert list(run.results) == [("xtail", "paper"), ("xtail", "zero-shot")]
    assert run.preset["bundle_differs"] == {"seed": {"bundle": 0, "preset": 42},
                                            "hidden": {"bundle": 128, "preset": 15000}}
    tasks = Bundle.open(run.bundle_dir).tasks
    assert [t.templates for t in tasks] == [["a photo of a {}."]] * 2  # not the domains' own two
    assert run.shots == 4
    summary = eval_summary.run_summary(run, tmp_path / "b")
    assert summary["preset"]["name"] == "rail-paper" and summary["gate"] == "paper"
    with pytest.raises(UsageError, match="for moe bundles"):
        evaluate.run_protocols(tmp_path / "b", domains, tmp_path / "w2", preset="moe-paper")


def test_duplicate_names_keep_their_prompt_under_rail_paper(tmp_path: Path) -> None:
    """A class name two domains share stays as it is in the prompts and the class list, with or
    without the preset's templates (the view only replaces meta.json)."""
    from PIL import Image

    from edgeclip.edgeapp import evaluate

    dirs = []
    for name, classes in (("one", ["cat", "dog"]), ("two", ["Cat", "owl"])):
        for split in ("train", "test"):
            for c in classes:
                (tmp_path / name / split / c).mkdir(parents=True)
                Image.new("RGB", (8, 8)).save(tmp_path / name / split / c / "a.png")
        dirs.append(tmp_path / name)
    kept = evaluate.prepare_domains(dirs, tmp_path / "w1", templates=["a photo of a {}."])
    assert kept[1].classes == ["Cat", "owl"] and kept[1].prompts == ["Cat", "owl"] and kept[1].shared == ("Cat",)
    assert kept[1].test.templates == ["a photo of a {}."] and kept[0].prompts == ["cat", "dog"]
    plain = evaluate.prepare_domains(dirs, tmp_path / "w2")
    assert plain[1].prompts == ["Cat", "owl"] and plain[1].learn_dir == dirs[1]


@pytest.mark.slow
def test_moe_paper_preset_at_init_and_add_task(domains: list[Path], tmp_path: Path) -> None:
    """`init --preset moe-paper` records the recipe; add-task then trains each dataset with its
    learning rate and the fixed warm-up; `--lr` overrides it for one task."""
    pytest.importorskip("torch")
    from typer.testing import CliRunner

    from edgeclip.bundle import Bundle
    from edgeclip.edgeapp.cli.app import app

    runner = CliRunner()
    root = tmp_path / "moe"
    result = runner.invoke(app, ["init", "--bundle", str(root), "--model", "edgeclip-tiny", "--random-weights",
                                 "--preset", "moe-paper", "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    settings = Bundle.open(root).meta.method.settings
    assert settings.seed == 42 and settings.moe.n_experts == 22
    assert settings.train.freeze_rule == "paper" and settings.train.warmup_rule == "fixed"
    assert settings.train.lr_by_dataset["full"]["eurosat"] == 1e-4 and settings.train.preset == "moe-paper"
    for domain, extra in zip(domains, ([], ["--lr", "0.02"])):
        result = runner.invoke(app, ["add-task", str(domain), "--bundle", str(root), "--iterations", "3",
                                     "--shots", "4", "--quiet", *extra], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    tasks = Bundle.open(root).tasks
    assert [t.training.lr for t in tasks] == [1e-3, 0.02]  # dtd's 5-shot rate, then --lr
    assert [t.training.warmup for t in tasks] == [3, 3]  # fixed rule: min(100, iterations)
    rail = tmp_path / "rail"
    assert runner.invoke(app, ["init", "--bundle", str(rail), "--model", "edgeclip-tiny", "--random-weights",
                               "--hidden", "64", "--quiet"]).exit_code == 0
    bad = runner.invoke(app, ["add-task", str(domains[0]), "--bundle", str(rail), "--lr", "0.1"])
    assert bad.exit_code != 0 and "MoE bundles only" in bad.output


def test_eval_command_takes_a_preset(domains: list[Path], tmp_path: Path) -> None:
    from cli_helpers import eval_app
    from typer.testing import CliRunner

    from edgeclip.edgeapp.create import init_bundle

    init_bundle(tmp_path / "b", "edgeclip-tiny", random_weights=True, hidden=64)
    out = tmp_path / "out"
    result = CliRunner().invoke(eval_app(), ["eval", *map(str, domains), "--bundle", str(tmp_path / "b"),
                                             "--preset", "rail-paper", "--shots", "3", "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["protocol"] == "xtail" and data["gate"] == "paper" and data["preset"]["name"] == "rail-paper"
    assert [m["kind"] for m in data["matrices"]] == ["gated", "zero-shot"]
    assert "not made with --preset rail-paper" in result.output and "hidden 64 (preset 15000)" in result.output
    bad = CliRunner().invoke(eval_app(), ["eval", *map(str, domains), "--bundle", str(tmp_path / "b"),
                                          "--preset", "nope", "--out", str(out)])
    assert bad.exit_code != 0 and "Unknown preset 'nope'" in bad.output + str(bad.exception)
