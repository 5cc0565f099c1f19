"""edgeclip eval and the protocol runner (train/evaluate.py) on the tiny config with random weights."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import msgspec
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli_helpers import eval_app, tree_digest, write_split_domains

from edgeclip.edgeapp import eval_scoring, eval_summary, evaluate
from edgeclip.errors import DomainError, UsageError

pytest.importorskip("open_clip")

runner = CliRunner()


@pytest.fixture(scope="module")
def domains(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_split_domains(tmp_path_factory.mktemp("eval-images"))


@pytest.fixture(scope="module")
def source_bundle(tmp_path_factory: pytest.TempPathFactory, make_tiny_bundle) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("eval-bundle") / "bundle")


# ----------------------------------------------------------------------------- metrics


def test_metrics_on_a_hand_made_matrix() -> None:
    a = [[50.0, 10.0, 20.0],
         [40.0, 80.0, 30.0],
         [30.0, 70.0, 90.0]]
    m = eval_summary.protocol_metrics(a)
    assert m["per_domain"]["transfer"] == [None, 10.0, 25.0]  # (20 + 30) / 2
    assert m["per_domain"]["average"] == pytest.approx([40.0, 160 / 3, 140 / 3])
    assert m["per_domain"]["last"] == [30.0, 70.0, 90.0]
    assert m["transfer"] == pytest.approx(17.5)  # domains 2..n only
    assert m["average"] == pytest.approx((40 + 160 / 3 + 140 / 3) / 3)
    assert m["last"] == pytest.approx(190 / 3)


def test_metrics_of_one_domain_and_bad_shapes() -> None:
    m = eval_summary.protocol_metrics([[42.0]])
    assert (m["transfer"], m["average"], m["last"]) == (None, 42.0, 42.0)
    with pytest.raises(UsageError):
        eval_summary.protocol_metrics([[1.0, 2.0]])


# ----------------------------------------------------------------------------- domains


def test_clashing_class_names_stay_their_tasks_own(tmp_path: Path) -> None:
    """A class name an earlier domain has is learned under its own name, as add-task does (no view,
    no renaming); `shared` says which."""
    for domain, classes in (("first", ("cat", "dog")), ("second", ("Cat", "car"))):
        for split in ("train", "test"):
            for c in classes:
                (tmp_path / domain / split / c).mkdir(parents=True)
                Image.new("RGB", (8, 8)).save(tmp_path / domain / split / c / "0.png")
    prepared = evaluate.prepare_domains([tmp_path / "first", tmp_path / "second"], tmp_path / "work")
    assert prepared[0].shared == () and prepared[0].learn_dir == tmp_path / "first"
    assert prepared[1].shared == ("Cat",) and prepared[1].learn_dir == tmp_path / "second"
    assert prepared[1].classes == ["Cat", "car"] and not (tmp_path / "work" / "views").exists()


def test_train_and_test_must_name_the_same_classes(tmp_path: Path) -> None:
    for split, classes in (("train", ("a", "b")), ("test", ("a", "c"))):
        for c in classes:
            (tmp_path / "d" / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "d" / split / c / "0.png")
    with pytest.raises(DomainError, match="same class folders"):
        evaluate.prepare_domains([tmp_path / "d"], tmp_path / "work")


def test_a_bundle_with_tasks_or_an_unknown_protocol_is_refused(source_bundle: Path, domains: list[Path],
                                                               tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="protocol"):
        evaluate.run_protocols(source_bundle, domains, tmp_path / "w1", protocols=["cil"])
    run = evaluate.run_protocols(source_bundle, domains[:1], tmp_path / "w2", protocols=["mtil"], shots=4)
    with pytest.raises(UsageError, match="learned tasks already"):
        evaluate.run_protocols(run.bundle_dir, domains, tmp_path / "w3")


# ----------------------------------------------------------------------------- protocols end to end


@pytest.fixture(scope="module")
def both_protocols(source_bundle: Path, domains: list[Path], tmp_path_factory: pytest.TempPathFactory):
    before = tree_digest(source_bundle)
    run = evaluate.run_protocols(source_bundle, domains, tmp_path_factory.mktemp("eval-work") / "w",
                                 protocols=["mtil", "xtail"], gates=["ddas", "paper"], shots=6)
    return run, before


def test_the_source_bundle_is_never_changed(both_protocols, source_bundle: Path) -> None:
    run, before = both_protocols
    assert tree_digest(source_bundle) == before
    from edgeclip.bundle import Bundle

    assert [t.name for t in Bundle.open(run.bundle_dir).tasks] == ["shapes", "stripes"]
    from edgeclip.bundle import list_versions

    assert list_versions(run.bundle_dir) == ["v0001", "v0003"]  # the working copy keeps no step in between
    assert Bundle.open(source_bundle).tasks == []


def test_matrices_routing_and_timing_have_one_entry_per_step(both_protocols) -> None:
    run, _ = both_protocols
    assert set(run.results) == {("mtil", "known-task"), ("xtail", "ddas"), ("xtail", "paper"),
                                ("mtil", "zero-shot"), ("xtail", "zero-shot")}
    assert [r.kind for r in run.results.values()] == ["oracle", "zero-shot", "gated", "gated", "zero-shot"]
    for result in run.results.values():
        matrix = np.asarray(result.matrix)
        assert matrix.shape == (2, 2) and ((0 <= matrix) & (matrix <= 100)).all()
        assert result.domains == ["shapes", "stripes"]
    for gate in ("ddas", "paper"):
        routing = run.results[("xtail", gate)].routing
        assert len(routing) == 2 and routing[-1]["unseen_to_zero_shot"] is None
    assert [t.step for t in run.timing] == [1, 2] and all(t.learn_s > 0 for t in run.timing)
    assert [len(x) for x in run.suite.features] == [9, 9]  # 3 classes x 3 test images, embedded once


def test_zero_shot_rows_are_computed_by_eval(both_protocols) -> None:
    """The papers' zero-shot rows: every step equals step 0, Transfer over domains 2..n."""
    run, _ = both_protocols
    for protocol in ("mtil", "xtail"):
        zs = run.results[(protocol, "zero-shot")]
        assert zs.matrix == [zs.zero_shot, zs.zero_shot]
        assert zs.zero_shot == run.results[next(k for k in run.results if k[0] == protocol)].zero_shot
        m = zs.metrics()
        assert m["transfer"] == pytest.approx(zs.zero_shot[1])
        assert m["average"] == pytest.approx(np.mean(zs.zero_shot)) == pytest.approx(m["last"])
    x = np.concatenate(run.suite.features)
    text = np.concatenate(run.suite.texts)
    y = np.concatenate([run.suite.labels[0], run.suite.labels[1] + len(run.suite.domains[0].classes)])
    xtail = run.results[("xtail", "zero-shot")].zero_shot
    first = ((x[:9] @ text.T).argmax(axis=1) == y[:9]).mean() * 100
    assert xtail[0] == pytest.approx(first)  # over the union of both domains' class names


def test_gate_per_batch_decides_once_per_run_of_images() -> None:
    errors = np.array([[0.1, 0.9], [0.9, 0.1], [0.2, 0.5], [5.0, 5.0], [5.0, 5.0]])
    thresholds = np.array([1.0, 1.0])
    assert eval_scoring.batch_routes(errors, thresholds, "nearest", None).tolist() == [0, 1, 0, -1, -1]
    assert eval_scoring.batch_routes(errors, thresholds, "nearest", 2).tolist() == [0, 0, -1, -1, -1]
    assert eval_scoring.batch_routes(errors, thresholds, "nearest", 5).tolist() == [-1] * 5


def test_mtil_scores_a_domain_not_yet_learned_by_zero_shot(both_protocols) -> None:
    run, _ = both_protocols
    mtil = run.results[("mtil", "known-task")]
    assert mtil.matrix[0][1] == mtil.zero_shot[1]  # 'stripes' before it is learned
    x, y, text = run.suite.features[1], run.suite.labels[1], run.suite.texts[1]
    assert mtil.zero_shot[1] == pytest.approx(100.0 * ((x @ text.T).argmax(axis=1) == y).mean())


def test_xtail_reference_decision_equals_the_exported_graph(source_bundle: Path, domains: list[Path],
                                                            both_protocols, tmp_path: Path) -> None:
    """The cached-embedding path scores exactly what graphs/gated.onnx decides on the pixels."""
    run, _ = both_protocols
    graph = evaluate.run_protocols(source_bundle, domains, tmp_path / "w", protocols=["xtail"], shots=6,
                                   decision="graph")
    ref = run.results[("xtail", "ddas")]
    got = graph.results[("xtail", "ddas")]
    assert got.matrix == ref.matrix and got.zero_shot == ref.zero_shot and got.routing == ref.routing


@pytest.mark.parametrize("protocol", ["xtail", "mtil"])
def test_eval_command_writes_results_json_and_heatmap(protocol: str, source_bundle: Path, domains: list[Path],
                                                      tmp_path: Path) -> None:
    before = tree_digest(source_bundle)
    out = tmp_path / "out"
    result = runner.invoke(eval_app(), ["eval", *map(str, domains), "--bundle", str(source_bundle),
                                        "--protocol", protocol, "--shots", "6", "--out", str(out)],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Transfer" in result.output and "shapes" in result.output
    data = json.loads((out / "results.json").read_text())
    assert data["domains"] == ["shapes", "stripes"] and data["protocol"] == protocol
    assert len(data["matrix"]) == 2 and all(len(row) == 2 for row in data["matrix"])
    assert data["average"] == pytest.approx(np.mean(data["matrix"]))
    assert data["last"] == pytest.approx(np.mean(data["matrix"][-1]))
    assert data["transfer"] == pytest.approx(data["matrix"][0][1])
    assert data["random_weights"] is True and len(data["timing"]["steps"]) == 2
    assert (len(data["routing"]) == 2) == (protocol == "xtail")
    assert [m["kind"] for m in data["matrices"]] == ["oracle" if protocol == "mtil" else "gated", "zero-shot"]
    zs = data["results"][-1]
    assert zs["gate"] == "zero-shot" and zs["average"] == pytest.approx(np.mean(zs["zero_shot"]))
    with Image.open(out / "matrix.png") as png:
        assert png.format == "PNG" and png.size[0] > 200
    assert tree_digest(source_bundle) == before


def test_eval_on_real_image_subsets(extract_subset, source_bundle: Path, tmp_path: Path) -> None:
    """Two shared datasets (a few classes, a few images each) through X-TAIL."""
    dirs = []
    for name, classes in (("cifar10", ["airplane", "cat", "ship"]), ("mnist", ["0", "1", "7"])):
        dom = tmp_path / name
        dom.mkdir()
        (dom / "train").symlink_to(extract_subset(name, "train", classes, per_class=6) / "train")
        (dom / "test").symlink_to(extract_subset(name, "test", classes, per_class=3) / "test")
        dirs.append(dom)
    run = evaluate.run_protocols(source_bundle, dirs, tmp_path / "w", protocols=["xtail"], shots=5)
    result = run.results[("xtail", "ddas")]
    assert result.domains == ["cifar10", "mnist"] and np.asarray(result.matrix).shape == (2, 2)
    assert [len(x) for x in run.suite.features] == [9, 9]


@pytest.mark.slow
def test_moe_bundles_are_scored_through_their_gate(domains: list[Path], tmp_path: Path) -> None:
    """X-TAIL on a MoE bundle runs graphs/gated.onnx on the streamed pixels; MTIL routes every image
    through the DDAS gate (headline) and, as an extra, forces each learned task's router (oracle).
    Under the strict freeze rule the oracle keeps task 1's accuracy after task 2."""
    pytest.importorskip("edgeclip.edgeapp.moe_task")
    from edgeclip.edgeapp.create import init_bundle
    from edgeclip.train import fusion

    init_bundle(tmp_path / "moe", "edgeclip-tiny", random_weights=True, method="moe")
    run = evaluate.run_protocols(tmp_path / "moe", domains, tmp_path / "w", protocols=["mtil", "xtail"], shots=4,
                                 iterations=5)
    assert list(run.results) == [("mtil", "ddas"), ("mtil", evaluate.KNOWN_TASK), ("mtil", "zero-shot"),
                                 ("xtail", "ddas"), ("xtail", "zero-shot")]
    result = run.results[("xtail", "ddas")]
    assert np.asarray(result.matrix).shape == (2, 2) and len(result.routing) == 2
    summary = eval_summary.run_summary(run, tmp_path / "moe")
    assert "gated.onnx" in summary["decision"] and summary["kind"] == "gated" and summary["gate"] == "ddas"
    gated = run.results[("mtil", "ddas")]
    assert gated.kind == "gated" and len(gated.routing) == 2
    assert gated.routing[0]["seen_to_task"] is not None and gated.routing[0]["unseen_to_zero_shot"] is not None
    mtil = np.asarray(run.results[("mtil", evaluate.KNOWN_TASK)].matrix)
    assert mtil.shape == (2, 2) and run.results[("mtil", evaluate.KNOWN_TASK)].kind == "oracle"
    assert mtil[1, 0] == mtil[0, 0]  # strict activate-freeze: learning task 2 does not change task 1
    zero_shot = fusion.zero_shot_probs(run.suite.features[1], run.suite.texts[1]).argmax(axis=1)
    assert mtil[0, 1] == pytest.approx(100.0 * (zero_shot == run.suite.labels[1]).mean())  # not yet learned
    # a gate that sends everything to zero-shot makes the gated matrix plain zero-shot
    bundle = evaluate.Bundle.open(run.bundle_dir)
    scorer = eval_scoring.Scorer(run.suite)
    tensors = dict(bundle.tensors("learned.safetensors"))
    never = msgspec.structs.replace(bundle.meta, tasks=[msgspec.structs.replace(t, threshold=1e-30)
                                                        for t in bundle.tasks])
    step = scorer.score(dataclasses.replace(bundle, meta=never), [0, 1], ["mtil"], [])
    assert step.accuracy[("mtil", "ddas")] == run.results[("mtil", "zero-shot")].zero_shot
    assert step.routing[("mtil", "ddas")]["seen_to_task"] == 0.0
    assert step.accuracy[("mtil", evaluate.KNOWN_TASK)] == [float(v) for v in mtil[1]]


MEMORY_SCRIPT = r"""
import resource, sys
from pathlib import Path
import numpy as np
from PIL import Image
from edgeclip.edgeapp import evaluate

root, per_class, bundle = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
rng = np.random.default_rng(0)
dirs = []
for d in range(2):
    for split, n in (("train", 4), ("test", per_class)):
        for c in range(2):
            folder = root / f"dom{d}" / split / f"class{d}{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    dirs.append(root / f"dom{d}")
run = evaluate.run_protocols(bundle, dirs, root / "w", protocols=["xtail"], decision="graph")
assert [len(x) for x in run.suite.features] == [2 * per_class] * 2
# VmHWM is this process's own peak since its exec; ru_maxrss can carry the parent's (pytest's) peak over
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(hwm // 1024)
"""


@pytest.mark.slow
def test_eval_memory_does_not_grow_with_the_test_set(tmp_path: Path, make_tiny_bundle) -> None:
    """Peak RSS of an eval over 2 x 3000 test images (what keeping their pixels would cost: 6000 x
    3 x 64 x 64 x 4 bytes = 295 MB) stays within 100 MB of one over 2 x 60, and under 1.5 GB. The bundle
    is made beforehand, so that torch's tracing at init is not what is measured."""
    import subprocess
    import sys

    bundle = make_tiny_bundle(tmp_path / "bundle", hidden=64)
    peaks = []
    for n in (30, 1500):
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / str(n)), str(n), str(bundle)],
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-2000:]
        peaks.append(int(out.stdout.split()[-1]))
    small, large = peaks
    assert large - small < 100, peaks
    assert large < 1536, peaks


def test_xtail_scores_a_label_by_its_name_across_domains(source_bundle: Path, domains: list[Path],
                                                         tmp_path: Path) -> None:
    """Two domains with the same class names (here the same images under another domain name): in
    X-TAIL's union label space a prediction is right by its name, so before anything is learned both
    score the same zero-shot (the first of two equal text vectors used to win every tie: 0% for the
    second)."""
    import json
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(domains[0], twin)
    meta = json.loads((twin / "meta.json").read_text()) if (twin / "meta.json").is_file() else {}
    (twin / "meta.json").write_text(json.dumps({**meta, "name": "twin"}))
    run = evaluate.run_protocols(source_bundle, [domains[0], twin], tmp_path / "w", protocols=["xtail"],
                                 gates=["ddas"], shots=6)
    result = run.results[("xtail", "ddas")]
    assert result.zero_shot[0] == result.zero_shot[1] > 0
    assert run.suite.domains[1].shared == tuple(run.suite.domains[0].classes)
    renamed = tmp_path / "Twin"
    shutil.copytree(twin, renamed)
    (renamed / "meta.json").write_text(json.dumps({**meta, "name": "TWIN"}))
    with pytest.raises(UsageError, match="ignoring case"):
        evaluate.prepare_domains([twin, renamed], tmp_path / "w2")
