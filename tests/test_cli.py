"""The edgeclip CLI end to end on the tiny config (random weights): CliRunner and real subprocesses."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import bundle, edgeclip_main, images, invoke  # noqa: F401  (fixtures)

from edgeclip.bundle import Bundle, list_versions

pytest.importorskip("open_clip")


def test_help_of_every_command_is_complete() -> None:
    result = invoke("--help")
    assert "Exit codes" in result.output
    for command in ("init", "add-task", "classify", "tasks", "export", "bench", "rollback", "info", "demo"):
        text = invoke(command, "--help").output
        assert "Usage" in text and "--help" in text, command
    assert "--labels" in invoke("classify", "--help").output


def test_classify_json_lines(bundle: Path, images: dict) -> None:
    result = invoke("classify", images["query"], "--bundle", bundle, "--format", "json", "--top-k", "2", "--quiet")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == len(list(images["query"].iterdir()))
    for row in rows:
        assert set(row) == {"path", "label", "task", "score", "route", "topk", "error", "note"}
        assert row["error"] is None and len(row["topk"]) == 2
        assert row["route"] in ("shapes", "stripes", "zero-shot")
        assert row["label"] == row["topk"][0]["label"]


def test_classify_csv_table_and_output_file(bundle: Path, images: dict, tmp_path: Path) -> None:
    result = invoke("classify", images["query"], "--bundle", bundle, "--format", "csv", "--quiet")
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert rows and set(rows[0]) == {"path", "label", "task", "score", "route", "error", "note", "label_1", "score_1", "task_1",
                                     "label_2", "score_2", "task_2", "label_3", "score_3", "task_3", "label_4",
                                     "score_4", "task_4", "label_5", "score_5", "task_5"}
    out = tmp_path / "result.txt"
    result = invoke("classify", images["query"], "--bundle", bundle, "--output", out, "--quiet")
    written = out.read_text()
    assert result.exit_code == 0 and ("circle" in written or "square" in written)


def test_classify_with_extra_labels(bundle: Path, images: dict) -> None:
    result = invoke("classify", images["query"], "--bundle", bundle, "--labels", "a dog,a car", "--format", "json",
                    "--top-k", "20", "--quiet")
    labels = {t["label"] for line in result.stdout.splitlines() for t in json.loads(line)["topk"]}
    assert {"a dog", "a car", "circle"} <= labels


def test_unreadable_inputs_give_exit_3_and_the_rest_are_classified(bundle: Path, images: dict, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    good = next(images["query"].iterdir())
    result = invoke("classify", good, bad, "--bundle", bundle, "--format", "json", "--quiet")
    assert result.exit_code == 3
    rows = {Path(r["path"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    assert rows[good.name]["error"] is None and rows[good.name]["label"]
    assert rows["bad.jpg"]["error"]


def test_tasks_and_info(bundle: Path) -> None:
    data = json.loads(invoke("tasks", "--bundle", bundle, "--format", "json").stdout)
    assert [t["name"] for t in data["tasks"]] == ["shapes", "stripes"]
    assert data["tasks"][0]["classes"] == ["circle", "square", "triangle"]
    assert all(t["threshold"] > 0 and t["n_images"] == 30 for t in data["tasks"])
    assert data["weights"]["kind"] == "random"
    assert "random weights" in invoke("tasks", "--bundle", bundle).output
    info = invoke("info", "--bundle", bundle).output
    assert "CPUExecutionProvider" in info and "random weights" in info


def test_bench_json(bundle: Path) -> None:
    result = invoke("bench", "--bundle", bundle, "--batch-sizes", "1,2", "--iterations", "2", "--format", "json", "--quiet")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {(r["graph"], r["batch_size"]) for r in rows} == {("gated", 1), ("plain", 1), ("gated", 2), ("plain", 2)}
    for r in rows:
        assert set(r) == {"backend", "graph", "batch_size", "p50_ms", "p90_ms", "p99_ms", "images_per_s", "precision",
                          "cuda_graph"}
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["images_per_s"] > 0


def test_usage_errors_exit_2(bundle: Path, images: dict, tmp_path: Path) -> None:
    assert edgeclip_main(["classify", str(images["query"]), "--bundle", str(bundle), "--backend", "nope"]).returncode == 2
    assert edgeclip_main(["bench", "--bundle", str(bundle), "--batch-sizes", "1,x"]).returncode == 2
    result = edgeclip_main(["add-task", str(images["domains"][0]), "--bundle", str(bundle)])
    assert result.returncode == 2 and "already learned" in result.stderr
    one_class = tmp_path / "one"
    (one_class / "only").mkdir(parents=True)
    (one_class / "only" / "a.png").write_bytes((images["domains"][0] / "train" / "circle" / "000.png").read_bytes())
    result = edgeclip_main(["add-task", str(one_class), "--bundle", str(bundle)])
    assert result.returncode == 2 and "needs at least 2" in result.stderr
    result = edgeclip_main(["tasks", "--bundle", str(tmp_path / "nothing")])
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_rollback_then_add_task_without_torch(tmp_path: Path, images: dict, make_tiny_bundle) -> None:
    """RAIL add-task and classify run with torch unimportable; rollback restores the previous version."""
    root = make_tiny_bundle(tmp_path / "b", method="rail-dual", labels=("a tree",))
    result = edgeclip_main(["add-task", str(images["domains"][0]), "--bundle", str(root), "--quiet"], block_torch=True)
    assert result.returncode == 0, result.stderr
    result = edgeclip_main(["classify", str(images["query"]), "--bundle", str(root), "--format", "json", "--quiet"],
                           block_torch=True)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(row["error"] is None for row in rows)
    assert {t["label"] for t in rows[0]["topk"]} == {"a tree", "circle", "square", "triangle"}  # init's default label
    assert Bundle.open(root).version == "v0002"
    assert invoke("rollback", "--bundle", root).exit_code == 0
    assert Bundle.open(root).version == "v0001" and not Bundle.open(root).tasks


def test_interrupted_add_task_leaves_previous_version(tmp_path: Path, images: dict, make_tiny_bundle) -> None:
    root = make_tiny_bundle(tmp_path / "b", hidden=4096)
    before = Bundle.open(root)
    args = ["add-task", str(images["domains"][0]), "--bundle", str(root), "--quiet"]
    code = f"import sys\nsys.argv = ['edgeclip'] + {args!r}\nfrom edgeclip.edgeapp.cli.app import main\nmain()"
    for delay in (0.5, 1.5, 3.0):
        proc = subprocess.Popen([sys.executable, "-c", code])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        bundle = Bundle.open(root)  # always loadable
        if bundle.version != before.version:
            break  # the kill came after the switch: the new version is complete
        assert bundle.tasks == before.tasks
    assert list_versions(root)[0] == "v0001"


def test_environment_variable_selects_the_bundle(bundle: Path) -> None:
    result = edgeclip_main(["tasks", "--format", "json"], env={**os.environ, "EDGECLIP_BUNDLE": str(bundle)})
    assert result.returncode == 0 and json.loads(result.stdout)["version"] == Bundle.open(bundle).version


def test_bad_input_zoo_through_the_cli(bundle: Path, tmp_path: Path) -> None:
    """Every awkward file in a folder (and named explicitly): readable ones are classified, the rest get
    a per-file error, hidden files, non-images and symlink loops are skipped; the run never crashes."""
    from image_helpers import BAD, GOOD, write

    folder = tmp_path / "zoo"
    (folder / "sub").mkdir(parents=True)
    write(folder, GOOD)
    write(folder / "sub", BAD)
    (folder / ".hidden.png").write_bytes(GOOD["grey.png"][0])
    (folder / "ünïcödé 名前.png").write_bytes(GOOD["grey.png"][0])
    (folder / os.fsdecode(b"latin1-\xe9.png")).write_bytes(GOOD["grey.png"][0])
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub" / "loop").symlink_to(folder, target_is_directory=True)

    result = edgeclip_main(["classify", str(folder), "--bundle", str(bundle), "--format", "json", "--quiet"])
    assert result.returncode == 3, result.stderr
    rows = {Path(r["path"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    classified = {name for name, r in rows.items() if r["error"] is None}
    assert set(GOOD) | {"ünïcödé 名前.png"} <= classified
    assert any(name.startswith("latin1-") and r["error"] is None for name, r in rows.items())
    assert ".hidden.png" not in rows and "notes.txt" not in rows
    failed = {name for name, r in rows.items() if r["error"]}
    assert {"truncated.jpg", "truncated.png", "bomb.png"} <= failed  # image headers, unreadable bodies
    assert len(rows) == len(classified) + len(failed)  # each file once, despite the symlink loop

    named = [str(folder / "sub" / name) for name in BAD]
    result = edgeclip_main(["classify", *named, "--bundle", str(bundle), "--format", "json", "--quiet"])
    assert result.returncode == 3
    errors = [json.loads(line)["error"] for line in result.stdout.splitlines()]
    assert len(errors) == len(BAD) and all(errors)


def test_folder_links_and_deep_nesting(bundle: Path, images: dict, tmp_path: Path) -> None:
    """A photo folder holding links to `/` and `/proc/self` and 1,500 nested folders: the folder's own
    images are classified, the links are counted (listed with --verbose), nothing walks the file system."""
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(next(Path(images["query"]).rglob("*.png")), folder / "a.png")
    (folder / "root").symlink_to("/")
    (folder / "proc").symlink_to("/proc/self")
    nested = [folder]
    for _ in range(1500):
        nested.append(nested[-1] / "d")
        nested[-1].mkdir()
    shutil.copy(sorted(Path(images["query"]).rglob("*.png"))[-1], nested[-1] / "deep.png")
    result = edgeclip_main(["classify", str(folder), "--bundle", str(bundle), "--format", "json", "--verbose"])
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["a.png", "deep.png"] and all(r["error"] is None for r in rows)
    assert "2 folder links not followed" in result.stderr
    assert f"not followed {folder / 'proc'}" in result.stderr and f"not followed {folder / 'root'}" in result.stderr
    (folder / "proc").unlink()
    (folder / "root").unlink()
    (nested[1] / "loop").symlink_to(folder)
    result = edgeclip_main(["classify", str(folder), "--bundle", str(bundle), "--format", "json", "--follow-links"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(result.stdout.splitlines()) == 2 and "not followed" not in result.stderr
    (nested[-1] / "deep.png").unlink()
    for sub in reversed(nested[1:]):
        if (sub / "loop").is_symlink():
            (sub / "loop").unlink()
        sub.rmdir()


def test_no_onnxruntime_telemetry(bundle: Path, images: dict, tmp_path: Path) -> None:
    """classify writes no onnxruntime telemetry (deviceid, onnxruntime.db) under HOME or XDG_CACHE_HOME;
    plain onnxruntime, in the same environment, does (so this test can fail)."""
    # CI=true makes onnxruntime skip its telemetry by itself: drop it, so that the plain control writes
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "CI")}
    env.update(HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    result = edgeclip_main(["classify", str(images["query"]), "--bundle", str(bundle), "--quiet"], env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    written = [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in written if "onnxruntime" in p.lower() or "Microsoft" in p], written
    plain = subprocess.run([sys.executable, "-c", "import onnxruntime"], env=env, capture_output=True, timeout=120)
    assert plain.returncode == 0
    assert (tmp_path / "cache" / "Microsoft" / "DeveloperTools" / ".onnxruntime" / "onnxruntime.db").is_file()


def test_table_header_on_its_own_line_under_a_progress_bar(bundle: Path, images: dict, tmp_path: Path) -> None:
    """On a terminal (tmux), the table's header and rows are not printed onto the progress bar's line."""
    import shutil as sh

    if sh.which("tmux") is None:
        pytest.skip("needs tmux")
    session = f"edgeclip-test-{os.getpid()}"
    done_flag = tmp_path / "done"
    command = (f"{sys.executable} -c {entry_code_quoted(['classify', str(images['query']), '--bundle', str(bundle), '--batch-size', '1'])}"
               f"; touch {done_flag}; sleep 60")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "60", command], check=True)
    try:
        deadline = time.monotonic() + 240
        while not done_flag.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        screen = subprocess.run(["tmux", "capture-pane", "-p", "-S", "-", "-t", session], capture_output=True,
                                text=True, check=True).stdout
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    lines = [line for line in screen.splitlines() if line.strip()]
    assert lines[1].split() == ["file", "label", "score", "route", "other", "labels"], screen
    assert not any("classifying" in line for line in lines), screen  # the bar left nothing in the table
    n = len(list(images["query"].iterdir()))
    assert any(line.startswith(f"{n} classified") for line in lines) and len(lines) >= n + 3, screen


def entry_code_quoted(args: list[str]) -> str:
    import shlex

    from cli_helpers import entry_code

    return shlex.quote(entry_code(args))


def test_moe_end_to_end(tmp_path: Path, images: dict) -> None:
    """MoE: init, two add-tasks (a few iterations), classify through the exported gated graph, tasks."""
    root = tmp_path / "moe"
    result = invoke("init", "--bundle", root, "--model", "edgeclip-tiny", "--random-weights", "--method", "moe",
                    "--batch-size", "8", "--quiet")
    assert result.exit_code == 0, result.output
    for domain in images["domains"]:
        result = invoke("add-task", domain, "--bundle", root, "--iterations", "3", "--quiet")
        assert result.exit_code == 0, result.output
    bundle = Bundle.open(root)
    assert [t.name for t in bundle.tasks] == ["shapes", "stripes"]
    assert bundle.tasks[0].training.iterations == 3
    # the adapted encoder of each version stores only the adapters; the backbone is shared
    import onnx

    from edgeclip.export.compose_moe import weight_sharing

    frozen, own = bundle.path("graphs/image_encoder.data"), bundle.path("graphs/moe_encoder.data")
    sharing = weight_sharing(onnx.load(str(bundle.path("graphs/moe_encoder.onnx")), load_external_data=False),
                             frozen=frozen.name, own=own.name)  # the shared graph store names files by content
    assert sharing.shared_bytes >= frozen.stat().st_size * 0.9
    for name in ("graphs/moe_encoder.onnx", "graphs/gated.onnx"):
        onnx.checker.check_model(str(bundle.path(name)), full_check=True)  # stock onnx reads the MoE graphs too
    result = edgeclip_main(["classify", str(images["query"]), "--bundle", str(root), "--format", "json", "--quiet"],
                           block_torch=True)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows and all(r["error"] is None and r["route"] in ("shapes", "stripes", "zero-shot") for r in rows)
    result = edgeclip_main(["add-task", str(images["domains"][0]), "--bundle", str(root), "--name", "again"],
                           block_torch=True)
    assert result.returncode == 1 and "pip install 'edgeclip[train]'" in result.stderr


def test_export_checks_graphs_and_explains_missing_tensorrt(bundle: Path) -> None:
    result = invoke("export", "--bundle", bundle)
    assert result.exit_code == 0 and "gated.onnx" in result.output and "image_encoder.onnx" in result.output
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        result = edgeclip_main(["export", "--bundle", str(bundle), "--tensorrt", "--fp16"])
        assert result.returncode == 1 and "tensorrt" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_demo_runs_the_whole_flow(tmp_path: Path) -> None:
    """The demo teaches: expected label beside each prediction, an accuracy and routing summary,
    unseen images routed to zero-shot, what to look at; a re-run works; a foreign folder is refused."""
    result = edgeclip_main(["demo", "--dir", str(tmp_path / "demo")], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "random weights" in result.stderr and "accuracy on the learned domains" in result.stderr
    assert "6/6 unseen images went to zero-shot" in result.stderr and "look at:" in result.stderr
    steps = [line.split(".")[0] for line in result.stderr.splitlines() if line[:1].isdigit() and ". " in line[:4]]
    assert steps == ["1", "2", "3", "4", "5"], steps  # each step numbered once
    rows = [line.replace("\u2502", " ").split() for line in result.stdout.splitlines()]  # table borders out
    lines = {row[0]: " ".join(row) for row in rows if row and row[0].endswith(".png")}
    assert len(lines) == 24
    assert all("zero-shot" in line for name, line in lines.items() if name.startswith("unseen"))
    assert lines["circle-0.png"].split()[1] == "circle"  # the expected label, beside the prediction
    bundle = Bundle.open(tmp_path / "demo" / "bundle")
    assert [t.name for t in bundle.tasks] == ["shapes", "stripes"] and bundle.random_weights
    again = edgeclip_main(["demo", "--dir", str(tmp_path / "demo"), "--quiet"])
    assert again.returncode == 0, again.stderr  # re-running replaces what the demo wrote
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    refused = edgeclip_main(["demo", "--dir", str(foreign)])
    assert refused.returncode == 2 and (foreign / "keep.txt").read_text() == "mine"


def test_add_task_and_classify_real_images(extract_subset, tmp_path: Path, make_tiny_bundle) -> None:
    """The CLI on real images: learn two small real domains, classify their test images."""
    root = make_tiny_bundle(tmp_path / "b", hidden=1024)
    tests = []
    for name, classes in (("mnist", ["0", "1", "2"]), ("dtd10", None)):
        train = extract_subset(name, "train", classes, per_class=8)
        result = invoke("add-task", train, "--bundle", root, "--quiet")
        assert result.exit_code == 0, result.output
        tests.append(extract_subset(name, "test", classes, per_class=2) / "test")
    result = invoke("classify", *tests, "--bundle", root, "--format", "json", "--quiet")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 2 * 3 + 2 * 10 and all(r["error"] is None for r in rows)
    routes = {r["route"] for r in rows}
    assert routes <= {"mnist", "dtd10", "zero-shot"}
