"""fp16 graphs (export/fp16.py) and the onnxruntime session paths (IO binding, fixed buffers of CUDA
graphs) on onnxruntime CPU: export through the CLI, add-task keeps them in step (RAIL and MoE),
agreement with fp32 on real images (same label and route for >= 98%), classify/bench/API, and the
gated graphs load without an onnxruntime warning.

Tiny config, random weights (edgeclip-tiny, 64 px)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgeclip.bundle import Bundle, list_versions
from edgeclip.edgeapp.runtime import GatedRunner, ImageEncoderRunner, fixed_batch_sizes, select_backend
from edgeclip.errors import BundleError, UsageError
from edgeclip.export.fp16 import export_fp16
from edgeclip.layout import (
    GATED_FP16_GRAPH,
    IMAGE_FP16_DATA,
    IMAGE_FP16_GRAPH,
    MOE_FP16_DATA,
    MOE_FP16_GRAPH,
    graph_file,
)

pytest.importorskip("open_clip")
ort = pytest.importorskip("onnxruntime")

from cli_helpers import invoke  # noqa: E402

FP16_FILES = [graph_file(n) for n in (IMAGE_FP16_GRAPH, IMAGE_FP16_DATA, GATED_FP16_GRAPH)]
AGREEMENT_FLOOR = 0.98  # issue 21: fp16 against fp32, same label and same route


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 64, 64)).astype(np.float32)


def _warnings_loading(path: Path, capfd) -> list[str]:
    """onnxruntime's warning and error lines (its own log, on stderr) while loading and running `path`."""
    capfd.readouterr()
    options = ort.SessionOptions()
    options.log_severity_level = 1  # INFO and up are logged: what must be absent is W and E
    # onnxruntime 1.32's CPU NCHWc transformer crashes on the fp16 graphs (edgeclip's runtime skips it too)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=["NchwcTransformer"])
    err = capfd.readouterr().err
    return [line for line in err.splitlines() if "[W:onnxruntime" in line or "[E:onnxruntime" in line]


@pytest.mark.slow
def test_export_fp16_cli_add_task_classify_bench_api(tmp_path: Path, make_tiny_bundle, capfd) -> None:
    from edgeclip.edgeapp.demo_data import write_demo_images

    import edgeclip

    domains, query = write_demo_images(tmp_path / "img", train_per_class=6, query_per_class=2)
    root = make_tiny_bundle(tmp_path / "b")
    result = invoke("export", "--bundle", root, "--precision", "fp16")
    assert result.exit_code == 0, result.output
    assert "gated_fp16.onnx" in result.output and list_versions(root) == ["v0001", "v0002"]
    first = Bundle.open(root)
    assert all(first.has(f) for f in FP16_FILES)
    files = first.manifest["files"]
    assert files[graph_file(IMAGE_FP16_DATA)]["size"] < 0.6 * files["graphs/image_encoder.data"]["size"]
    invoke("export", "--bundle", root, "--precision", "fp16", "--quiet")  # already there: no new version
    assert list_versions(root) == ["v0001", "v0002"]

    assert invoke("add-task", domains[0], "--bundle", root, "--quiet").exit_code == 0
    learned = Bundle.open(root)
    assert all(learned.has(f) for f in FP16_FILES)
    now = learned.manifest["files"]
    assert now[graph_file(GATED_FP16_GRAPH)]["sha256"] != files[graph_file(GATED_FP16_GRAPH)]["sha256"]
    assert now[graph_file(IMAGE_FP16_DATA)]["sha256"] == files[graph_file(IMAGE_FP16_DATA)]["sha256"]  # stored once
    assert not _warnings_loading(learned.path(graph_file(GATED_FP16_GRAPH)), capfd)

    pixels, labels = _pixels(5), learned.tensors("learned.safetensors")["zs_text"]
    out16 = GatedRunner(learned, "ort-cpu", precision="fp16").run(pixels, labels)
    out32 = GatedRunner(learned, "ort-cpu").run(pixels, labels)
    assert {k: v.dtype for k, v in out16.items()} == {k: v.dtype for k, v in out32.items()}  # decision in fp32
    assert out16["gate_ratio"].shape == (5, 1) and np.abs(out16["embedding"] - out32["embedding"]).max() < 0.01
    emb16 = ImageEncoderRunner(learned, "auto", precision="fp16").embed(pixels)
    assert np.allclose(emb16, out16["embedding"], atol=1e-6)

    result = invoke("classify", query, "--bundle", root, "--precision", "fp16", "--cuda-graph", "--batch-size", "3",
                    "--format", "json", "--quiet")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    plain = [json.loads(line) for line in invoke("classify", query, "--bundle", root, "--precision", "fp16",
                                                 "--format", "json", "--quiet").stdout.splitlines()]
    assert rows and [(r["path"], r["label"], r["route"]) for r in rows] == [
        (r["path"], r["label"], r["route"]) for r in plain]
    result = invoke("bench", "--bundle", root, "--precision", "fp16", "--batch-sizes", "1,2", "--iterations", "2",
                    "--format", "json", "--quiet")
    assert result.exit_code == 0, result.output
    assert {(r["precision"], r["graph"], r["batch_size"]) for r in json.loads(result.stdout)} == {
        (p, g, b) for p in ("fp32", "fp16") for g in ("gated", "plain") for b in (1, 2)}

    api = edgeclip.load(root, backend="ort-cpu", precision="fp16", cuda_graph=True)
    preds = api.classify(query, top_k=1)
    assert [(p.label, p.route) for p in preds] == [(r["label"], r["route"]) for r in plain]


def test_fp16_refusals(tmp_path: Path, make_tiny_bundle) -> None:
    bundle = Bundle.open(make_tiny_bundle(tmp_path / "b"))
    with pytest.raises(BundleError, match="export --precision fp16"):
        GatedRunner(bundle, "ort-cpu", precision="fp16")
    with pytest.raises(UsageError, match="fp32, fp16, int8"):
        ImageEncoderRunner(bundle, "ort-cpu", precision="fp8")
    assert invoke("classify", tmp_path, "--bundle", tmp_path / "b", "--precision", "fp64").exit_code == 2


@pytest.mark.slow
def test_fp16_agrees_with_fp32_on_real_images(extract_subset, tmp_path: Path, make_tiny_bundle) -> None:
    from edgeclip.images import load_and_preprocess

    root = make_tiny_bundle(tmp_path / "b")
    train = extract_subset("mnist", "train", ["0", "1", "2"], per_class=8)
    assert invoke("add-task", train, "--bundle", root, "--quiet").exit_code == 0
    bundle = export_fp16(Bundle.open(root))
    paths = sorted((extract_subset("mnist", "test", ["0", "1", "2"], per_class=20) / "test").rglob("*.*"))
    paths += sorted((extract_subset("cifar10", "test", ["airplane", "cat", "ship"], per_class=20) / "test").rglob("*.*"))
    cfg = bundle.meta.preprocess
    pixels = np.stack([load_and_preprocess(path, cfg) for path in paths])
    labels = bundle.tensors("learned.safetensors")["zs_text"]
    out32 = GatedRunner(bundle, "ort-cpu").run(pixels, labels)
    out16 = GatedRunner(bundle, "ort-cpu", precision="fp16").run(pixels, labels)
    top1 = np.mean(out32["scores"].argmax(1) == out16["scores"].argmax(1))
    route = np.mean(out32["route"] == out16["route"])
    assert len(paths) == 120 and top1 >= AGREEMENT_FLOOR and route >= AGREEMENT_FLOOR, (top1, route)
    assert set(out32["route"]) == {-1, 0}  # both routes occur: the gate is really exercised
    cos = np.sum(out32["embedding"] * out16["embedding"], axis=1)
    assert cos.min() > 0.999, cos.min()


@pytest.mark.slow
def test_moe_fp16_kept_in_step_and_graphs_load_without_warnings(tmp_path: Path, capfd, monkeypatch) -> None:
    """MoE: export fp16 before any task, then an add-task converts the adapted encoder too."""
    import edgeclip
    from edgeclip.edgeapp.demo_data import write_demo_images

    domains, query = write_demo_images(tmp_path / "img", train_per_class=6, query_per_class=2)
    clf = edgeclip.create(tmp_path / "b", "edgeclip-tiny", method="moe", random_weights=True, seed=0)
    assert export_fp16(clf.bundle).version == "v0002"
    clf = clf.reload().add_task(None, domains[0], iterations=2, device="cpu")
    bundle = clf.bundle
    assert bundle.has(graph_file(MOE_FP16_GRAPH)) and bundle.has(graph_file(MOE_FP16_DATA))
    gated = onnx.load(str(bundle.path(graph_file(GATED_FP16_GRAPH))), load_external_data=False)
    stored = {bundle.path(graph_file(n)).name: n for n in (IMAGE_FP16_DATA, MOE_FP16_DATA)}
    read = {e.value for t in gated.graph.initializer for e in t.external_data if e.key == "location"}
    assert {stored[r] for r in read if r in stored} == {IMAGE_FP16_DATA, MOE_FP16_DATA}  # backbone read once
    for name in ("graphs/gated.onnx", graph_file(GATED_FP16_GRAPH)):
        assert not _warnings_loading(bundle.path(name), capfd), name
    monkeypatch.setenv("EDGECLIP_ENGINE_CACHE", str(tmp_path / "engines"))
    capfd.readouterr()
    for _ in range(2):  # classify's path: the second start reads the optimised-graph cache (or its marker)
        GatedRunner(bundle, "ort-cpu").run(_pixels(2), bundle.tensors("learned.safetensors")["zs_text"])
    err = capfd.readouterr().err
    assert "[W:onnxruntime" not in err and "[E:onnxruntime" not in err, err
    fp32 = edgeclip.load(bundle.root, backend="ort-cpu").classify(query, top_k=1)
    fp16 = edgeclip.load(bundle.root, backend="ort-cpu", precision="fp16").classify(query, top_k=1)
    same = np.mean([(a.label, a.route) == (b.label, b.route) for a, b in zip(fp32, fp16)])
    assert len(fp32) == len(fp16) > 0 and same >= 0.9, same  # a handful of images: one may differ


def test_fixed_batches_and_io_binding_match_a_plain_run(tmp_path: Path, make_tiny_bundle) -> None:
    """The CUDA-graph path's fixed buffers and padding, and IO binding, run on the CPU provider too."""
    assert fixed_batch_sizes(16) == (1, 2, 4, 8, 16) and fixed_batch_sizes(12) == (1, 2, 4, 8, 12)
    bundle = Bundle.open(make_tiny_bundle(tmp_path / "b", labels=("cat", "dog", "ship")))
    labels = bundle.tensors("learned.safetensors")["zs_text"]
    text = np.random.default_rng(1).standard_normal((3, labels.shape[1])).astype(np.float32)
    pixels = _pixels(7)
    want = GatedRunner(bundle, "ort-cpu", preload=False).run(pixels, text)
    fixed = GatedRunner(bundle, "ort-cpu", max_batch=4, cuda_graph=True, preload=False)
    plain = GatedRunner(bundle, "ort-cpu", preload=False)
    for batch in (pixels, pixels[:1], pixels[:3], pixels):  # 4 + 3->4, 1, 3->4, again: buffers reused
        got, ref = fixed.run(batch, text), plain.run(batch, text)
        np.testing.assert_array_equal(got["route"], ref["route"])
        # the same rows; onnxruntime's kernels differ slightly with the batch size (scores: 100 x cosine)
        np.testing.assert_allclose(got["embedding"], ref["embedding"], atol=1e-5)
        np.testing.assert_allclose(got["scores"], ref["scores"], atol=2e-3)
    shapes = sorted(k[1][1][0] for k in fixed.session._bound)
    assert shapes == [1, 4] and not fixed.session.cuda_graph_active  # no capture off the CUDA provider
    embed = ImageEncoderRunner(bundle, "ort-cpu", max_batch=2, cuda_graph=True, preload=False).embed(pixels)
    np.testing.assert_allclose(embed, want["embedding"], atol=1e-5)
    bound = select_backend("ort-cpu").session(fixed.session.path, io_binding=True)
    got = bound.run({"pixels": pixels, "label_text": text})
    np.testing.assert_array_equal(got["scores"], want["scores"])
    np.testing.assert_array_equal(got["route"], want["route"])
