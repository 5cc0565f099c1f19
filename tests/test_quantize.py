"""int8 dynamic quantisation of the image encoder (export/quantize.py): bundle versions, the int8
gated graph kept in step by add-task, agreement with fp32 on real images, CLI, refusals.

Tiny config, random weights (edgeclip-tiny, 64 px)."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import numpy as np
import pytest

from edgeclip.bundle import Bundle, list_versions
from edgeclip.edgeapp.demo_data import write_demo_images
from edgeclip.edgeapp.runtime import Backend, GatedRunner, ImageEncoderRunner
from edgeclip.errors import BundleError, UsageError
from edgeclip.export.quantize import export_int8
from edgeclip.layout import GATED_INT8_GRAPH, IMAGE_INT8_DATA, IMAGE_INT8_GRAPH, graph_file
from edgeclip.manifest import MoEMethod
from cli_helpers import invoke

pytest.importorskip("open_clip")
pytest.importorskip("onnxruntime")

INT8_FILES = [graph_file(n) for n in (IMAGE_INT8_GRAPH, IMAGE_INT8_DATA, GATED_INT8_GRAPH)]
# Measured on the tiny random-weight backbone (64 px), 60 real test images (mnist + cifar10):
# gated top-1 agreement 59/60, route 60/60 (2026-11-25); the floor leaves room for other CPUs.
AGREEMENT_FLOOR = 0.9




@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict:
    domains, query = write_demo_images(tmp_path_factory.mktemp("int8-images"), train_per_class=6, query_per_class=2)
    return {"domains": domains, "query": query}


@pytest.fixture(scope="module")
def fp32_only(tmp_path_factory: pytest.TempPathFactory, make_tiny_bundle) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("int8") / "plain")


@pytest.mark.slow
def test_export_int8_on_a_fresh_bundle_then_add_task_keeps_it_in_step(tmp_path: Path, images: dict, make_tiny_bundle) -> None:
    root = make_tiny_bundle(tmp_path / "b")
    result = invoke("export", "--bundle", root, "--int8")
    assert result.exit_code == 0, result.output
    assert "gated_int8.onnx" in result.output and list_versions(root) == ["v0001", "v0002"]
    first = Bundle.open(root)
    assert all(first.has(f) for f in INT8_FILES) and first.manifest["quantization"]["image_encoder"]["weights"] == "int8"
    assert not any(Bundle.open(root, "v0001").has(f) for f in INT8_FILES)  # versions are immutable
    invoke("export", "--bundle", root, "--int8", "--quiet")  # already there: no new version
    assert list_versions(root) == ["v0001", "v0002"]

    assert invoke("add-task", images["domains"][0], "--bundle", root, "--quiet").exit_code == 0
    learned = Bundle.open(root)
    assert learned.version == "v0003" and all(learned.has(f) for f in INT8_FILES)
    files = learned.manifest["files"]
    assert files[graph_file(GATED_INT8_GRAPH)]["sha256"] != first.manifest["files"][graph_file(GATED_INT8_GRAPH)]["sha256"]
    assert files[graph_file(IMAGE_INT8_DATA)]["sha256"] == first.manifest["files"][graph_file(IMAGE_INT8_DATA)]["sha256"]
    pixels = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    labels = learned.tensors("learned.safetensors")["zs_text"]
    out8 = GatedRunner(learned, "ort-cpu", precision="int8").run(pixels, labels)
    out32 = GatedRunner(learned, "ort-cpu").run(pixels, labels)
    assert out8["gate_ratio"].shape == (3, 1) and out8["scores"].shape == (3, 3)
    assert np.abs(out8["embedding"] - out32["embedding"]).max() < 0.05
    emb8 = ImageEncoderRunner(learned, "auto", precision="int8").embed(pixels)
    assert np.allclose(emb8, out8["embedding"], atol=1e-5)


@pytest.mark.slow
def test_export_int8_on_an_inherited_version_and_the_cli(tmp_path: Path, images: dict, make_tiny_bundle) -> None:
    """The encoder files of v0002 are hard links into v0001 (onnx refuses to read those directly)."""
    root = make_tiny_bundle(tmp_path / "b")
    assert invoke("add-task", images["domains"][0], "--bundle", root, "--quiet").exit_code == 0
    assert export_int8(Bundle.open(root)).version == "v0003"
    result = invoke("classify", images["query"], "--bundle", root, "--precision", "int8", "--format", "json", "--quiet")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows and all(r["error"] is None and r["route"] in ("shapes", "zero-shot") for r in rows)
    result = invoke("bench", "--bundle", root, "--precision", "int8", "--batch-sizes", "1,2", "--iterations", "2",
                    "--format", "json", "--quiet")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {(r["precision"], r["graph"], r["batch_size"]) for r in rows} == {
        (p, g, b) for p in ("fp32", "int8") for g in ("gated", "plain") for b in (1, 2)}
    for r in rows:
        assert {"backend", "graph", "batch_size", "p50_ms", "p90_ms", "p99_ms", "images_per_s"} <= set(r)
        assert r["backend"] == "ort-cpu" and 0 < r["p50_ms"] <= r["p99_ms"]


@pytest.mark.slow
def test_int8_agrees_with_fp32_on_real_images(extract_subset, tmp_path: Path, make_tiny_bundle) -> None:
    from edgeclip.images import load_and_preprocess

    root = make_tiny_bundle(tmp_path / "b")
    train = extract_subset("mnist", "train", ["0", "1", "2"], per_class=8)
    assert invoke("add-task", train, "--bundle", root, "--quiet").exit_code == 0
    bundle = export_int8(Bundle.open(root))
    paths = sorted((extract_subset("mnist", "test", ["0", "1", "2"], per_class=10) / "test").rglob("*.*"))
    paths += sorted((extract_subset("cifar10", "test", ["airplane", "cat", "ship"], per_class=10) / "test").rglob("*.*"))
    cfg = bundle.meta.preprocess
    pixels = np.stack([load_and_preprocess(path, cfg) for path in paths])
    labels = bundle.tensors("learned.safetensors")["zs_text"]
    out32 = GatedRunner(bundle, "ort-cpu").run(pixels, labels)
    out8 = GatedRunner(bundle, "ort-cpu", precision="int8").run(pixels, labels)
    top1 = np.mean(out32["scores"].argmax(1) == out8["scores"].argmax(1))
    route = np.mean(out32["route"] == out8["route"])
    assert len(paths) == 60 and top1 >= AGREEMENT_FLOOR and route >= AGREEMENT_FLOOR, (top1, route)
    cos = np.sum(out32["embedding"] * out8["embedding"], axis=1)
    assert cos.min() > 0.99, cos.min()


def test_refusals_are_clear(fp32_only: Path, images: dict) -> None:
    bundle = Bundle.open(fp32_only)
    with pytest.raises(BundleError, match="edgeclip export --int8"):
        GatedRunner(bundle, "ort-cpu", precision="int8")
    with pytest.raises(BundleError, match="edgeclip export --int8"):
        ImageEncoderRunner(bundle, "auto", precision="int8")
    with pytest.raises(BundleError, match="export --precision fp16"):
        GatedRunner(bundle, "ort-cpu", precision="fp16")
    with pytest.raises(UsageError, match="fp32, fp16, int8"):
        GatedRunner(bundle, "ort-cpu", precision="bf16")
    cuda = Backend("ort-cuda", ("CUDAExecutionProvider", "CPUExecutionProvider"))
    with pytest.raises(UsageError, match="CPU only"):
        GatedRunner(bundle, cuda, precision="int8")
    moe = Bundle(root=bundle.root, version=bundle.version, manifest=bundle.manifest,
                 meta=msgspec.structs.replace(bundle.meta, method=MoEMethod()))
    with pytest.raises(UsageError, match="MoE"):
        export_int8(moe)
    with pytest.raises(BundleError, match="edgeclip export --int8"):  # the CLI's main() exits 1 with it
        invoke("classify", images["query"], "--bundle", fp32_only, "--precision", "int8", "--labels", "a,b", "--quiet")
    assert invoke("classify", images["query"], "--bundle", fp32_only, "--precision", "int4").exit_code == 2
    assert list_versions(fp32_only) == ["v0001"]
