"""edgeapp/runtime.py: backend selection, and the runners over a real bundle (ORT CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import export_helpers as eh
import numpy as np
import onnxruntime as ort
import pytest

from edgeclip.edgeapp.runtime import (
    GatedRunner,
    ImageEncoderRunner,
    TextEncoderRunner,
    select_backend,
)
from edgeclip.errors import BackendUnavailableError, BundleError, UsageError
from edgeclip.export.compose import build_gated_graph
from edgeclip.train.decision import gated_reference


def test_backend_selection_cpu():
    assert select_backend("auto").name in {"ort-cpu", "ort-cuda"}
    assert select_backend("ort-cpu").providers == ("CPUExecutionProvider",)
    with pytest.raises(UsageError, match="Unknown backend"):
        select_backend("cuda")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA present")
@pytest.mark.parametrize("name,hint", [("ort-cuda", "onnxruntime-gpu"), ("ort-trt", "TensorRT")])
def test_unavailable_ort_backend_says_what_to_install(name, hint):
    with pytest.raises(BackendUnavailableError, match=hint):
        select_backend(name)


def test_tensorrt_backend_without_tensorrt():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailableError, match="tensorrt"):
            select_backend("tensorrt")
    else:
        pytest.skip("tensorrt is installed here")


def test_runtime_imports_no_torch():
    code = ("import sys, edgeclip.edgeapp.runtime, edgeclip.export.compose; "
            "bad = [m for m in ('torch', 'open_clip') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.getbasetemp()
    graphs = eh.tiny_graphs(base)
    encoder = ort.InferenceSession(str(graphs / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    xs, ys = eh.task_data(lambda p: encoder.run(None, {"pixels": p})[0])
    learned, manifest = eh.fit_rail_bundle(xs, ys, eh.label_text()[:5], "rail-primal")
    folder = eh.encoder_folder(graphs, tmp_path_factory.mktemp("runtime-graphs"))
    for name in ("text_encoder.onnx", "text_encoder.data"):
        (folder / name).hardlink_to(graphs / name)
    build_gated_graph(folder, learned, manifest)
    return eh.make_bundle(base / "runtime-bundle", folder, learned, manifest)


@pytest.mark.slow
def test_gated_runner_matches_reference(bundle):
    runner = GatedRunner(bundle, "ort-cpu", threads=1, preload=False)
    assert runner.session._session is None and runner.session._loading is None  # created lazily
    pixels, text = eh.mixed_batch(), eh.label_text()
    out = runner.run(pixels, text)
    assert set(out) == {"scores", "route", "gate_ratio", "embedding"}
    want = gated_reference(out["embedding"], text, bundle.tensors("learned.safetensors"), bundle.meta)
    np.testing.assert_array_equal(out["route"], want["route"])
    assert np.abs(out["scores"] - want["scores"]).max() < 1e-4
    empty = runner.run(pixels[:0], text)
    assert empty["scores"].shape == (0, len(text)) and empty["gate_ratio"].shape == (0, 2)


@pytest.mark.slow
def test_gated_runner_checks_inputs(bundle):
    runner = GatedRunner(bundle, "ort-cpu")
    with pytest.raises(UsageError, match="L >= 5"):
        runner.run(eh.mixed_batch(1), eh.label_text()[:3])  # fewer rows than learned classes
    with pytest.raises(UsageError, match="pixels"):
        runner.run(np.zeros((1, 3, 32, 32), np.float32), eh.label_text())


@pytest.mark.slow
def test_image_and_text_runners_match_torch(bundle):
    bb = eh.tiny_backbone()
    pixels = eh.mixed_batch(2)
    assert np.abs(ImageEncoderRunner(bundle, "ort-cpu").embed(pixels) - bb.encode_images(pixels)).max() < 1e-4
    text_runner = TextEncoderRunner(bundle, "ort-cpu", batch_size=2)
    texts = ["a photo of a cat.", "A Photo of Ceiling Fans!", "émigré café", "x"]
    assert np.abs(text_runner.embed(texts) - bb.encode_texts(texts)).max() < 1e-4
    classes, templates = ["ant", "bee"], ["a photo of a {}.", "a drawing of a {}."]
    got = text_runner.class_embeddings(classes, templates)
    assert np.abs(got - bb.class_text_embeddings(classes, templates)).max() < 1e-4


def test_engine_spec_and_cache_key():
    from edgeclip.export.tensorrt import EngineSpec, engine_key

    profile = {"pixels": ((1, 3, 64, 64), (8, 3, 64, 64), (32, 3, 64, 64))}
    base = {"graph": "abc", "tensorrt": "10.3", "gpu": "X", "compute_capability": "8.9"}
    fp32, fp16 = EngineSpec("fp32", profile), EngineSpec("fp16", profile)
    keys = {engine_key({**base, **fp32.to_json()}), engine_key({**base, **fp16.to_json()}),
            engine_key({**base, "tensorrt": "10.4", **fp32.to_json()}),
            engine_key({**base, "compute_capability": "9.0", **fp32.to_json()})}
    assert len(keys) == 4
    with pytest.raises(UsageError, match="min <= opt <= max"):
        EngineSpec("fp32", {"pixels": ((8, 3, 64, 64), (1, 3, 64, 64), (32, 3, 64, 64))})
    with pytest.raises(UsageError, match="precision"):
        EngineSpec("int4")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engine_matches_onnxruntime(bundle, tmp_path, monkeypatch, precision):
    """GPU only: the native engine against onnxruntime CPU (fp16: same top-1 and route)."""
    from edgeclip.export.tensorrt import check_available

    try:
        check_available()
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    monkeypatch.setenv("EDGECLIP_ENGINE_CACHE", str(tmp_path))
    pixels, text = eh.mixed_batch(), eh.label_text()
    want = GatedRunner(bundle, "ort-cpu").run(pixels, text)
    got = GatedRunner(bundle, select_backend("tensorrt", fp16=precision == "fp16"), max_batch=4).run(pixels, text)
    np.testing.assert_array_equal(got["route"], want["route"])
    np.testing.assert_array_equal(got["scores"].argmax(1), want["scores"].argmax(1))
    if precision == "fp32":
        assert np.abs(got["scores"] - want["scores"]).max() < 1e-3


# -- start-up: background session, optimised-graph cache, lazy text encoder ------------------------
def _cache_entries(root) -> list:
    folder = root / "ort-optimized"
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


@pytest.fixture()
def engine_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECLIP_ENGINE_CACHE", str(tmp_path / "engines"))
    monkeypatch.delenv("EDGECLIP_SESSION_CACHE", raising=False)
    return tmp_path / "engines"


@pytest.mark.slow
def test_optimised_graph_cache_gives_the_fresh_sessions_outputs(bundle, engine_cache, monkeypatch):
    pixels, text = eh.mixed_batch(), eh.label_text()
    monkeypatch.setenv("EDGECLIP_SESSION_CACHE", "0")
    plain = GatedRunner(bundle, "ort-cpu", preload=False)
    want = plain.run(pixels, text)
    assert not plain.session.cached and not _cache_entries(engine_cache)  # off: nothing written
    monkeypatch.delenv("EDGECLIP_SESSION_CACHE")
    first = GatedRunner(bundle, "ort-cpu", preload=False)
    got_first = first.run(pixels, text)
    assert not first.session.cached  # miss: optimised now, saved, checked, published
    (entry,) = _cache_entries(engine_cache)
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["usable"] is True and meta["key"]["graph"] == first.session.graph_id
    hit = GatedRunner(bundle, "ort-cpu")  # preloaded in the background, from the cache
    got_hit = hit.run(pixels, text)
    assert hit.session.cached
    for out in (got_first, got_hit):
        for name in want:
            np.testing.assert_array_equal(out[name], want[name])
    # other inputs than the ones the entry was checked with: still bit-identical
    other = hit.run(pixels[::-1][:3], text[:6])
    again = plain.run(pixels[::-1][:3], text[:6])
    for name in again:
        np.testing.assert_array_equal(other[name], again[name])


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["data-bytes", "data-bit-same-stamp", "graph-bytes-same-stamp", "truncated",
                                    "stale-key", "meta-garbage"])
def test_optimised_graph_cache_rebuilt_when_stale_or_corrupt(bundle, engine_cache, damage):
    pixels, text = eh.mixed_batch(1), eh.label_text()
    want = GatedRunner(bundle, "ort-cpu", preload=False).run(pixels, text)
    (entry,) = _cache_entries(engine_cache)
    model, data, meta_path = entry / "model.onnx", entry / "model.data", entry / "meta.json"
    if damage == "data-bytes":
        blob = bytearray(data.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        data.write_bytes(bytes(blob))
    elif damage in ("graph-bytes-same-stamp", "data-bit-same-stamp"):  # same size, inode, time: bit rot
        target = model if damage.startswith("graph") else data
        st = target.stat()
        with open(target, "r+b") as handle:
            handle.seek(st.st_size // 2)
            byte = handle.read(1)
            handle.seek(st.st_size // 2)
            handle.write(bytes([byte[0] ^ (0xFF if damage.startswith("graph") else 0x01)]))
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif damage == "truncated":
        data.write_bytes(data.read_bytes()[:1000])
    elif damage == "stale-key":  # e.g. made by another onnxruntime version
        meta = json.loads(meta_path.read_text())
        meta["key"]["onnxruntime"] = "0.0.1"
        meta_path.write_text(json.dumps(meta))
    else:
        meta_path.write_text("{not json")
    rebuilt = GatedRunner(bundle, "ort-cpu", preload=False)
    out = rebuilt.run(pixels, text)
    assert not rebuilt.session.cached  # the damaged entry was not used
    for name in want:
        np.testing.assert_array_equal(out[name], want[name])
    (entry,) = _cache_entries(engine_cache)
    assert json.loads((entry / "meta.json").read_text())["usable"] is True
    hit = GatedRunner(bundle, "ort-cpu", preload=False)
    out = hit.run(pixels, text)
    assert hit.session.cached
    for name in want:
        np.testing.assert_array_equal(out[name], want[name])


@pytest.mark.slow
def test_optimised_graph_cache_never_publishes_different_outputs(bundle, engine_cache, monkeypatch):
    from edgeclip.edgeapp import ort_cache

    pixels, text = eh.mixed_batch(1), eh.label_text()
    monkeypatch.setattr(ort_cache, "same_outputs", lambda a, b: False)  # as if the saved graph computed otherwise
    GatedRunner(bundle, "ort-cpu", preload=False).run(pixels, text)
    (entry,) = _cache_entries(engine_cache)
    assert json.loads((entry / "meta.json").read_text())["usable"] is False
    assert not (entry / "model.onnx").exists()
    again = GatedRunner(bundle, "ort-cpu", preload=False)
    again.run(pixels, text)
    assert not again.session.cached and again.session._pending is None  # not re-saved on every start


@pytest.mark.slow
def test_unwritable_cache_and_background_errors(bundle, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("EDGECLIP_ENGINE_CACHE", str(blocker))  # a file: the cache cannot be made
    pixels, text = eh.mixed_batch(1), eh.label_text()
    out = GatedRunner(bundle, "ort-cpu").run(pixels, text)
    assert out["scores"].shape == (len(pixels), len(text))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a graph")
    session = select_backend("ort-cpu").session(bad, graph_id="x")
    session.start()  # fails in the background; the error surfaces at run
    with pytest.raises(BackendUnavailableError, match="bad.onnx"):
        session.run({"pixels": pixels})


@pytest.mark.slow
def test_classify_path_never_touches_the_text_encoder(bundle, monkeypatch):
    from edgeclip.bundle import Bundle
    from edgeclip.edgeapp.classify import build_label_space

    used: list[str] = []
    real_path = Bundle.path
    monkeypatch.setattr(Bundle, "path", lambda self, name: used.append(name) or real_path(self, name))
    runner = GatedRunner(bundle, "ort-cpu", preload=False)
    text = TextEncoderRunner(bundle, "ort-cpu")
    labels = build_label_space(bundle, [], text.class_embeddings)
    runner.run(eh.mixed_batch(1), labels.text)
    assert used and not [n for n in used if "text_encoder" in n or "tokenizer" in n], used
    assert labels.text.shape == (5, bundle.manifest["backbone"]["embed_dim"])
    with pytest.raises(BundleError, match="missing"):
        bundle.tensors("learned.safetensors", keys=["no-such-tensor"])
    extra = build_label_space(bundle, ["traffic cone"], text.class_embeddings)  # new labels: the text encoder now
    assert [n for n in used if "text_encoder" in n] and extra.names[-1] == "traffic cone"
