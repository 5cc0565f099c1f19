"""edgeapp.images: parity with open_clip's eval transform, colour modes, config, batching."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeclip.errors import BundleError, UsageError
from edgeclip.images import (
    Batch,
    PreprocessConfig,
    iter_batches,
    load_image,
    preprocess,
    to_rgb,
)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def config(size: int, resize_mode: str = "shortest", interpolation: str = "bicubic") -> PreprocessConfig:
    return PreprocessConfig(size, OPENAI_MEAN, OPENAI_STD, interpolation=interpolation, resize_mode=resize_mode)


@pytest.fixture(scope="module")
def open_clip_transform():
    """open_clip's eval transform, the reference (needs the train extra)."""
    open_clip = pytest.importorskip("open_clip")

    def make(cfg: PreprocessConfig):
        return open_clip.image_transform(
            cfg.image_size,
            is_train=False,
            mean=cfg.mean,
            std=cfg.std,
            interpolation=cfg.interpolation,
            resize_mode=cfg.resize_mode,
        )

    return make


def random_image(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"L": None, "RGB": 3}[mode]
    shape = (size[1], size[0]) if channels is None else (size[1], size[0], channels)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))


# ---------------------------------------------------------------- parity with open_clip

DATASETS = ["mnist", "fashion_mnist", "cifar10", "caltech101", "dtd10"]


@pytest.mark.realdata
@pytest.mark.parametrize("dataset", DATASETS)
def test_matches_open_clip_on_real_images(dataset, extract_subset, open_clip_transform):
    root = extract_subset(dataset, "train", per_class=2)
    classes = sorted(p for p in (root / "train").iterdir())[:3]
    files = sorted(f for c in classes for f in c.iterdir())
    assert len(files) == 6
    for size in (64, 224):
        cfg = config(size)
        reference = open_clip_transform(cfg)
        for f in files:
            with Image.open(f) as img:
                expected = reference(img).numpy()
            got = preprocess(load_image(f), cfg)
            assert got.dtype == np.float32 and got.shape == (3, size, size)
            assert np.abs(got - expected).max() < 1e-5, f


# Odd sizes exercise torchvision's truncation of the long side and half-even crop offsets.
ODD_SIZES = [(28, 28), (101, 37), (37, 101), (65, 64), (64, 65), (300, 224), (3, 500), (225, 224), (64, 64)]


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_matches_open_clip_on_odd_sizes(resize_mode, interpolation, open_clip_transform):
    for size in (64, 31):
        cfg = config(size, resize_mode, interpolation)
        reference = open_clip_transform(cfg)
        for i, wh in enumerate(ODD_SIZES):
            for mode in ("RGB", "L"):
                img = random_image(mode, wh, seed=i)
                got = preprocess(img, cfg)
                assert got.shape == (3, size, size)
                if resize_mode == "longest" and min(wh) * size < max(wh) / 2:
                    continue  # open_clip fails: the short side rounds to 0 pixels
                expected = reference(img).numpy()
                assert np.abs(got - expected).max() < 1e-5, (wh, mode)


# ---------------------------------------------------------------- colour modes


def test_rgb_and_grey_pass_through():
    rgb = random_image("RGB", (5, 4))
    assert to_rgb(rgb) is rgb
    grey = random_image("L", (5, 4))
    out = np.asarray(to_rgb(grey))
    assert out.shape == (4, 5, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], np.asarray(grey))


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_grey_is_scaled_not_saturated(mode):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16 if mode == "I;16" else np.int32)
    img = Image.fromarray(values)
    assert img.mode == mode
    out = np.asarray(to_rgb(img))
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_alpha_is_dropped_like_open_clip():
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (10, 20, 30)
    la = Image.new("LA", (2, 2), (77, 0))
    assert to_rgb(la).getpixel((0, 0)) == (77, 77, 77)


def test_palette_bilevel_cmyk_float():
    pal = Image.new("P", (2, 2), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0, 0, 0] * 254)
    assert to_rgb(pal).getpixel((0, 0)) == (200, 100, 50)
    bilevel = Image.new("1", (2, 2), 1)
    assert to_rgb(bilevel).getpixel((0, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # magenta + yellow ink, no cyan: red
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)
    flt = Image.fromarray(np.array([[-5.0, 100.4, 300.0]], dtype=np.float32))
    assert [to_rgb(flt).getpixel((x, 0))[0] for x in range(3)] == [0, 100, 255]


def test_preprocess_converts_any_mode():
    cfg = config(8)
    grey = random_image("L", (10, 12))
    np.testing.assert_array_equal(preprocess(grey, cfg), preprocess(grey.convert("RGB"), cfg))


def test_normalisation_values():
    cfg = PreprocessConfig(4, (0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    out = preprocess(Image.new("RGB", (4, 4), (255, 0, 51)), cfg)
    np.testing.assert_allclose(out[:, 0, 0], [1.0, -1.0, 0.1], rtol=1e-6)


# ---------------------------------------------------------------- config


def test_config_round_trips_through_json():
    cfg = config(224, "longest", "bilinear")
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d == {
        "image_size": 224,
        "mean": list(OPENAI_MEAN),
        "std": list(OPENAI_STD),
        "interpolation": "bilinear",
        "resize_mode": "longest",
    }
    assert PreprocessConfig.from_dict(d) == cfg
    assert PreprocessConfig.from_dict({"image_size": 64, "mean": [0, 0, 0], "std": [1, 1, 1]}).resize_mode == "shortest"


@pytest.mark.parametrize(
    "change",
    [
        {"image_size": 0},
        {"image_size": 2.5},
        {"image_size": True},
        {"mean": [0.5, 0.5]},
        {"mean": "abc"},
        {"std": [1, 0, 1]},
        {"std": [1, float("nan"), 1]},
        {"interpolation": "lanczos"},
        {"resize_mode": "crop"},
        {"extra": 1},
    ],
)
def test_bad_config_is_a_bundle_error(change):
    d = {**config(64).to_dict(), **change}
    with pytest.raises(BundleError):
        PreprocessConfig.from_dict(d)


def test_incomplete_config_is_a_bundle_error():
    with pytest.raises(BundleError, match="incomplete"):
        PreprocessConfig.from_dict({"image_size": 64, "mean": [0, 0, 0]})
    with pytest.raises(BundleError):
        PreprocessConfig.from_dict([64])


def test_direct_construction_raises_usage_error():
    with pytest.raises(UsageError):
        PreprocessConfig(-1, OPENAI_MEAN, OPENAI_STD)


# ---------------------------------------------------------------- batching


def write_images(folder: Path, n: int, bad: set[int] = frozenset()) -> list[Path]:
    paths = []
    for i in range(n):
        p = folder / f"img{i:03d}.png"
        if i in bad:
            p.write_bytes(b"not an image at all")
        else:
            Image.new("RGB", (20 + i, 16), (i * 7 % 256, 0, 0)).save(p)
        paths.append(p)
    return paths


def test_iter_batches_keeps_order_and_fills_batches(tmp_path):
    paths = write_images(tmp_path, 11, bad={2, 9})
    cfg = config(8)
    batches = list(iter_batches(paths, cfg, batch_size=4, workers=2))
    assert [len(b.paths) for b in batches] == [4, 4, 1]
    assert all(isinstance(b, Batch) and b.pixels.shape == (len(b.paths), 3, 8, 8) for b in batches)
    good = [p for b in batches for p in b.paths]
    assert good == [p for i, p in enumerate(paths) if i not in {2, 9}]
    assert [e[0] for e in batches[0].errors] == [paths[2]]
    assert batches[1].errors == []
    assert [e[0] for e in batches[2].errors] == [paths[9]]
    for b in batches:
        for p, px in zip(b.paths, b.pixels):
            np.testing.assert_array_equal(px, preprocess(load_image(p), cfg))


def test_iter_batches_trailing_errors_and_empty_input(tmp_path):
    paths = write_images(tmp_path, 3, bad={1, 2})
    batches = list(iter_batches(paths, config(8), batch_size=1))
    assert [b.paths for b in batches] == [[paths[0]], []]
    assert [p for p, _ in batches[1].errors] == paths[1:]
    assert batches[1].pixels.shape == (0, 3, 8, 8)
    assert list(iter_batches([], config(8), batch_size=4)) == []
    with pytest.raises(UsageError):
        next(iter_batches(paths, config(8), batch_size=0))


def test_iter_batches_runs_ahead_but_bounded(tmp_path, monkeypatch):
    """Decoding runs ahead of the consumer by at most `prefetch` files, and an early
    stop cancels the rest."""
    import edgeclip.images as images

    paths = write_images(tmp_path, 40)
    started: list[Path] = []
    lock = threading.Lock()
    real = images.load_and_preprocess

    def counting(path, cfg, max_pixels):
        with lock:
            started.append(path)
        return real(path, cfg, max_pixels)

    monkeypatch.setattr(images, "load_and_preprocess", counting)
    it = iter_batches(paths, config(8), batch_size=2, workers=2, prefetch=6)
    first = next(it)
    assert first.paths == paths[:2]
    deadline = time.monotonic() + 10
    while len(started) < 2 + 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert len(started) == 2 + 6  # ran ahead while the consumer held the first batch, no further
    it.close()
    time.sleep(0.1)
    assert len(started) == 2 + 6
