"""edgeapp.images: parity with open_clip's eval transform, colour modes, config, batching."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
from PIL import Image

from edgeclip.errors import BundleError, ImageError, UsageError
from edgeclip.images import (
    BACKGROUND,
    DEFAULT_MAX_PIXELS,
    Batch,
    decode_image,
    iter_batches,
    load_and_preprocess,
    load_image,
    pillow_pixel_limit,
    preprocess,
    reduction_factor,
    to_rgb,
    warnings_as_notes,
)
from edgeclip.manifest import Preprocess, parse_section, validate_manifest
from image_helpers import corrupt_exif_jpeg, process_state

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def config(size: int, resize_mode: str = "shortest", interpolation: str = "bicubic", exact: bool = False) -> Preprocess:
    return Preprocess(size, OPENAI_MEAN, OPENAI_STD, interpolation=interpolation, resize_mode=resize_mode,  # type: ignore[arg-type]
                      exact=exact)


@pytest.fixture(scope="module")
def open_clip_transform():
    """open_clip's eval transform, the reference (needs the train extra)."""
    open_clip = pytest.importorskip("open_clip")

    def make(cfg: Preprocess):
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


def test_alpha_is_composited_on_the_background():
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == BACKGROUND
    half = Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    assert to_rgb(half).getpixel((0, 0)) == (127, 127, 127)
    la = Image.new("LA", (2, 2), (77, 255))
    assert to_rgb(la).getpixel((0, 0)) == (77, 77, 77)
    pa = Image.new("PA", (2, 2), (1, 0))
    assert to_rgb(pa).getpixel((0, 0)) == BACKGROUND


def test_transparent_png_pair_gives_the_same_input(tmp_path):
    """Two PNGs that look the same (a red disc on transparency) but hide different colours
    under alpha=0 decode to the same pixels."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:64, :64]
    disc = (yy - 32) ** 2 + (xx - 32) ** 2 < 400
    paths = []
    for i, hidden in enumerate([np.zeros((64, 64, 3), np.uint8), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)]):
        rgba = np.dstack([hidden, np.where(disc, 255, 0).astype(np.uint8)])
        rgba[disc, :3] = (220, 30, 30)
        paths.append(tmp_path / f"logo{i}.png")
        Image.fromarray(rgba, "RGBA").save(paths[-1])
    cfg = config(32)
    a, b = (load_and_preprocess(p, cfg) for p in paths)
    np.testing.assert_array_equal(a, b)
    corner = np.asarray(load_image(paths[1]))[0, 0]
    assert tuple(corner) == BACKGROUND


def test_palette_bilevel_cmyk():
    pal = Image.new("P", (2, 2), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0, 0, 0] * 254)
    assert to_rgb(pal).getpixel((0, 0)) == (200, 100, 50)
    bilevel = Image.new("1", (2, 2), 1)
    assert to_rgb(bilevel).getpixel((0, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # magenta + yellow ink, no cyan: red
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize(
    "values, expected",
    [
        ([0.0, 0.5, 1.0], [0, 128, 255]),  # 0..1: the usual float range
        ([0.0, 100.0, 200.0], [0, 100, 200]),  # 0..255
        ([0.0, 1000.0, 65535.0], [0, 4, 255]),  # 0..65535
        ([-5.0, 100.0, 300.0], [0, 88, 255]),  # no standard range: its own min..max
        ([float("nan"), 0.25, 1.0], [64, 64, 255]),  # NaN read as the minimum
        ([0.4, 0.4, 0.4], [102, 102, 102]),  # a flat 0..1 image stays grey, not black
    ],
)
def test_float_samples_by_value_range(values, expected):
    img = Image.fromarray(np.array([values], dtype=np.float32))
    assert img.mode == "F"
    assert [to_rgb(img).getpixel((x, 0))[0] for x in range(3)] == expected


def test_32_bit_integer_by_value_range():
    small = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32))
    assert [to_rgb(small).getpixel((x, 0))[0] for x in range(3)] == [0, 100, 255]
    wide = Image.fromarray(np.array([[0, 70000, 140000]], dtype=np.int32))
    assert [to_rgb(wide).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_float_tiff_file_is_not_black(tmp_path):
    """A float TIFF with values 0..1 (the issue's example) decodes to its real brightness."""
    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (16, 1))
    Image.fromarray(ramp, "F").save(tmp_path / "ramp.tif")
    out = np.asarray(load_image(tmp_path / "ramp.tif"))[..., 0]
    assert out[0, 0] == 0 and out[0, -1] == 255 and 120 <= out[0, 32] <= 135


def test_preprocess_converts_any_mode():
    cfg = config(8)
    grey = random_image("L", (10, 12))
    np.testing.assert_array_equal(preprocess(grey, cfg), preprocess(grey.convert("RGB"), cfg))


def test_normalisation_values():
    cfg = Preprocess(4, (0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    out = preprocess(Image.new("RGB", (4, 4), (255, 0, 51)), cfg)
    np.testing.assert_allclose(out[:, 0, 0], [1.0, -1.0, 0.1], rtol=1e-6)


# ---------------------------------------------------------------- config


def test_config_round_trips_through_json():
    """The schema struct is the only form: the manifest's JSON decodes to it and encodes back."""
    cfg = config(224, "longest", "bilinear")
    d = json.loads(msgspec.json.encode(cfg))
    assert d == {
        "image_size": 224,
        "mean": list(OPENAI_MEAN),
        "std": list(OPENAI_STD),
        "interpolation": "bilinear",
        "resize_mode": "longest",
    }
    assert parse_section({"preprocess": d}, "preprocess") == cfg
    assert parse_section({"preprocess": {"image_size": 64, "mean": [0, 0, 0], "std": [1, 1, 1]}},
                         "preprocess").resize_mode == "shortest"


def test_no_serialisation_twin():
    """issue 19: `images.PreprocessConfig` (its own to_dict/from_dict) is gone; the runtime uses the schema's
    `Preprocess`, hashable (the normalisation table is cached by it)."""
    import edgeclip.images as images

    assert not hasattr(images, "PreprocessConfig")
    assert not hasattr(Preprocess, "to_dict") and not hasattr(Preprocess, "from_dict")
    assert hash(config(64)) == hash(config(64))


@pytest.mark.parametrize(
    "change, where",
    [
        ({"image_size": 0}, "$.preprocess.image_size"),
        ({"image_size": 2.5}, "$.preprocess.image_size"),
        ({"image_size": True}, "$.preprocess.image_size"),
        ({"mean": [0.5, 0.5]}, "$.preprocess.mean"),
        ({"mean": "abc"}, "$.preprocess.mean"),
        ({"std": [1, 0, 1]}, "$.preprocess.std[1]"),
        ({"std": [1, float("nan"), 1]}, "$.preprocess.std[1]"),
        ({"mean": [1, float("inf"), 1]}, "$.preprocess.mean[1]"),
        ({"interpolation": "lanczos"}, "$.preprocess.interpolation"),
        ({"resize_mode": "crop"}, "$.preprocess.resize_mode"),
        ({"extra": 1}, "extra"),
        ({"exact": "yes"}, "$.preprocess.exact"),
    ],
)
def test_bad_config_is_a_bundle_error(change, where):
    """A bad value in a manifest's `preprocess` is refused when the manifest is read: one line naming the field."""
    d = {**msgspec.to_builtins(config(64)), **change}
    with pytest.raises(BundleError, match=re.escape(where)) as err:
        validate_manifest({"backbone": {"model": "m", "weights": {"kind": "random", "ref": "0"}},
                           "preprocess": d, "method": {"name": "rail-primal"}}, complete=False)
    assert "\n" not in str(err.value)
    with pytest.raises(BundleError):
        parse_section({"preprocess": d}, "preprocess")


def test_incomplete_config_is_a_bundle_error():
    with pytest.raises(BundleError, match="std"):
        parse_section({"preprocess": {"image_size": 64, "mean": [0, 0, 0]}}, "preprocess")
    with pytest.raises(BundleError):
        parse_section({"preprocess": [64]}, "preprocess")


def test_non_finite_construction_raises():
    with pytest.raises(ValueError, match="finite"):
        Preprocess(64, OPENAI_MEAN, (1.0, float("nan"), 1.0))


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
    real = images.decode_and_preprocess

    def counting(path, cfg, max_pixels):
        with lock:
            started.append(path)
        return real(path, cfg, max_pixels)

    monkeypatch.setattr(images, "decode_and_preprocess", counting)
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


# ---------------------------------------------------------------- fast and exact decoding


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth photo-like RGB image (gradients plus mild noise), quick to make at any size."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    r = 255 * (0.5 + 0.5 * np.sin(6 * x + 3 * y))
    g = 255 * (0.5 + 0.5 * np.cos(5 * y - 2 * x))
    b = np.broadcast_to(255 * x * y, (height, width))
    img = np.dstack([r, np.broadcast_to(g, (height, width)), b])
    img += rng.normal(0, 4, (1, width, 1)).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def test_reduction_factor_keeps_the_input_covered():
    assert reduction_factor((4000, 3000), 224) == 13
    assert reduction_factor((4000, 3000), 224, "longest") == 17
    assert reduction_factor((100, 3000), 224) == 1
    for size in [(4000, 3000), (225, 5000), (4032, 3024), (999, 448)]:
        for mode in ("shortest", "longest", "squash"):
            k = reduction_factor(size, 224, mode)
            side = max(size) if mode == "longest" else min(size)
            assert side // k >= 224


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_fast_decode_reduces_but_still_covers(tmp_path, fmt, resize_mode):
    path = tmp_path / f"big.{fmt.lower()}"
    photo(1600, 1200).save(path, fmt)
    cfg = config(64, resize_mode)
    fast = decode_image(path, cover=64, resize_mode=resize_mode)
    assert fast.stored_size == (1600, 1200)
    w, h = fast.image.size
    covered = max(w, h) if resize_mode == "longest" else min(w, h)
    assert 64 <= covered < 2 * 64 * (1.5 if fmt == "JPEG" else 1.1)  # DCT scales are powers of two
    exact = preprocess(load_image(path), cfg)
    got = load_and_preprocess(path, cfg)
    assert got.shape == exact.shape == (3, 64, 64)
    assert np.abs(got - exact).mean() < 0.05  # same picture, slightly different filtering
    np.testing.assert_array_equal(load_and_preprocess(path, config(64, resize_mode, exact=True)), exact)


def test_small_images_are_not_reduced_so_fast_equals_exact(tmp_path):
    for i, (w, h) in enumerate([(28, 28), (100, 60), (224, 300), (447, 400)]):
        photo(w, h, seed=i).save(tmp_path / f"{i}.jpg", quality=90)
        cfg = config(224)
        np.testing.assert_array_equal(load_and_preprocess(tmp_path / f"{i}.jpg", cfg),
                                      load_and_preprocess(tmp_path / f"{i}.jpg", config(224, exact=True)))


def test_exif_orientation_is_applied_after_the_reduction(tmp_path):
    """A 1600x800 JPEG stored sideways (orientation 6) comes out upright and reduced."""
    img = Image.new("RGB", (1600, 800), (255, 0, 0))
    img.paste((0, 0, 255), (800, 0, 1600, 800))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "side.jpg", quality=95, exif=exif)
    fast = decode_image(tmp_path / "side.jpg", cover=64).image
    assert fast.size == (100, 200)  # 1/8 DCT scale, then turned: taller than wide
    a = np.asarray(fast).astype(int)
    assert np.abs(a[20, 50] - (255, 0, 0)).max() < 40 and np.abs(a[180, 50] - (0, 0, 255)).max() < 40
    assert load_image(tmp_path / "side.jpg").size == (800, 1600)


def test_config_exact_round_trips_and_is_only_stored_when_set():
    cfg = config(64)
    assert "exact" not in msgspec.to_builtins(cfg)
    exact = cfg.with_exact(True)
    assert msgspec.to_builtins(exact)["exact"] is True
    assert parse_section({"preprocess": msgspec.to_builtins(exact)}, "preprocess") == exact
    assert exact.with_exact(None) is exact and cfg.with_exact(False) is cfg
    with pytest.raises(BundleError):
        parse_section({"preprocess": {**msgspec.to_builtins(cfg), "exact": "yes"}}, "preprocess")


def _corrupt_exif_jpeg(path: Path) -> Path:
    path.write_bytes(corrupt_exif_jpeg())
    return path


def test_pillow_warnings_become_the_files_note(tmp_path, recwarn):
    """Where the program asks for it (`warnings_as_notes`, as the CLI does), a JPEG with truncated EXIF
    data makes Pillow warn and the warning is the file's note, every time (not once per process), from
    decoding threads side by side, and nothing reaches the console."""
    _corrupt_exif_jpeg(tmp_path / "exif.jpg")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "clean.jpg")
    with warnings_as_notes():
        for _ in range(2):
            batches = list(iter_batches([tmp_path / "exif.jpg", tmp_path / "clean.jpg"] * 2, config(8), batch_size=4,
                                        workers=2))
            assert batches[0].errors == []
            notes = batches[0].notes
            assert [n is None for n in notes] == [False, True, False, True]
            assert "Truncated File Read" in notes[0], notes
    assert not [w for w in recwarn if "Truncated" in str(w.message)]


def test_decoding_changes_no_process_wide_state(tmp_path, recwarn):
    """Issue 19: the library neither patches Pillow's modules nor touches the warnings machinery or Pillow's
    `MAX_IMAGE_PIXELS` (the old code raised it to 64 x max_pixels and left it there): Pillow's warning reaches
    the application's filters (here pytest's), a large JPEG is still read reduced, and `warnings_as_notes` /
    `pillow_pixel_limit`, the CLI's opt-in, undo what they did."""
    large = tmp_path / "large.jpg"
    photo(4000, 3000).save(large, quality=80)
    files = [_corrupt_exif_jpeg(tmp_path / "exif.jpg"), large, tmp_path / "exif.jpg"]
    before = process_state()
    batch = next(iter_batches(files, config(224), batch_size=3, workers=2))
    assert batch.errors == [] and batch.pixels.shape == (3, 3, 224, 224)
    assert process_state() == before
    assert [w for w in recwarn if "Truncated File Read" in str(w.message)]  # the application's to show or filter
    with warnings_as_notes(), pillow_pixel_limit(DEFAULT_MAX_PIXELS):
        assert Image.MAX_IMAGE_PIXELS == 64 * DEFAULT_MAX_PIXELS
        assert "Truncated File Read" in decode_image(files[0], cover=8).note
    assert process_state() == before
    with pillow_pixel_limit(10):  # never lowered
        assert Image.MAX_IMAGE_PIXELS == before["MAX_IMAGE_PIXELS"]


def test_over_pillows_limit_is_edgeclips_one_line_error(tmp_path, monkeypatch):
    """Pillow's limit is the application's: a file over it is refused with edgeclip's one-line error, also
    where the application made Pillow's warning an error; `pillow_pixel_limit` lets edgeclip's guard decide."""
    import warnings

    path = tmp_path / "large.jpg"
    photo(400, 300).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # the application's choice
    with pytest.raises(ImageError, match=r"large.jpg: image too large, refused as a possible decompression bomb \("):
        decode_image(path, cover=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # 120 000 pixels: Pillow only warns
        with pytest.raises(ImageError, match="image too large, refused as a possible decompression bomb"):
            decode_image(path, cover=64)
    with pillow_pixel_limit(100_000):  # edgeclip's guard decides: the pixels decoded
        assert decode_image(path, cover=64, max_pixels=100_000).image.size == (100, 75)  # 1/4 DCT scale
        with pytest.raises(ImageError, match=r"\(400x300 = 120000 pixels, limit 100000\).*--max-pixels"):
            decode_image(path, max_pixels=100_000)
    assert Image.MAX_IMAGE_PIXELS == 100_000


def test_large_jpeg_is_read_when_reduced_and_max_pixels_raises_the_limit(tmp_path):
    """A JPEG over the pixel limit: refused at full resolution, read at 1/8 DCT scale, and read
    at full resolution once `max_pixels` allows it."""
    path = tmp_path / "large.jpg"
    photo(4000, 3000).save(path, quality=80)  # 12 MP
    limit = 10_000_000
    with pytest.raises(ImageError, match="decompression bomb.*--max-pixels"):
        decode_image(path, max_pixels=limit)
    assert decode_image(path, cover=224, max_pixels=limit).image.size == (500, 375)
    assert decode_image(path, max_pixels=13_000_000).image.size == (4000, 3000)


def test_heic_file_decodes(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    photo(640, 480).save(tmp_path / "IMG_0001.HEIC", "HEIF", quality=90)
    decoded = decode_image(tmp_path / "IMG_0001.HEIC", cover=64)
    assert decoded.image.mode == "RGB" and min(decoded.image.size) >= 64
    reference = np.asarray(photo(640, 480)).astype(int)
    full = np.asarray(load_image(tmp_path / "IMG_0001.HEIC")).astype(int)
    assert np.abs(full - reference).mean() < 8


def _peak_rss_mb(code: str) -> tuple[float, str]:
    """Growth of the peak resident memory (MB) of a fresh Python running `code` after importing
    edgeclip.images (VmHWM: ru_maxrss would carry the forking test process's peak over)."""
    import subprocess
    import sys

    prog = (
        "import re\n"
        "import edgeclip.images as images\n"
        "from edgeclip.manifest import Preprocess\n"
        "def peak(): return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "before = peak()\n"
        f"{code}\n"
        "print(peak() - before, result)\n"
    )
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120, check=True).stdout
    kb, _, rest = out.strip().partition(" ")
    return int(kb) / 1024, rest


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_thin_strip_memory_is_bounded(tmp_path, exact):
    """A 20000x1 strip (a 143-byte PNG) took 4.2 GB to resize to 224; now a few MB."""
    path = tmp_path / "strip.png"
    Image.new("RGB", (20000, 1), (10, 200, 30)).save(path)
    assert path.stat().st_size < 200
    cfg = "Preprocess(224, (0.5,) * 3, (0.5,) * 3, exact=%s)" % exact
    grown, result = _peak_rss_mb(f"x = images.load_and_preprocess({str(path)!r}, {cfg}); result = x.shape")
    assert result == "(3, 224, 224)"
    assert grown < 100, f"{grown:.0f} MB"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_large_jpeg_decode_time_and_memory(tmp_path):
    """A 48 MP JPEG: the fast path decodes at 1/8 scale (a 144 MB full decode avoided), in a
    fraction of the full decode's time."""
    path = tmp_path / "48mp.jpg"
    photo(8000, 6000).save(path, quality=85)
    cfg = "Preprocess(224, (0.5,) * 3, (0.5,) * 3)"
    fast_mb, _ = _peak_rss_mb(f"x = images.load_and_preprocess({str(path)!r}, {cfg}); result = 0")
    full_mb, _ = _peak_rss_mb(f"x = images.load_image({str(path)!r}); result = 0")
    assert fast_mb < 40 and full_mb > 130, (fast_mb, full_mb)
    timing = (
        "import time\n"
        "cfg = " + cfg + "\n"
        "t = time.perf_counter(); images.load_and_preprocess(%r, cfg); fast = time.perf_counter() - t\n"
        "t = time.perf_counter(); images.load_image(%r); full = time.perf_counter() - t\n"
        "result = fast / full"
    ) % (str(path), str(path))
    _, ratio = _peak_rss_mb(timing)
    assert float(ratio) < 0.4, ratio


def test_heic_orientation_is_applied_once(tmp_path):
    """pillow-heif turns the picture upright itself (and resets the tag): no second rotation."""
    pytest.importorskip("pillow_heif").register_heif_opener()
    img = Image.new("RGB", (64, 32), (255, 0, 0))
    img.paste((0, 0, 255), (32, 0, 64, 32))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "turned.heic", "HEIF", exif=exif.tobytes(), quality=95)
    out = load_image(tmp_path / "turned.heic")
    assert out.size == (32, 64)
    assert out.getpixel((10, 5))[0] > 200 and out.getpixel((10, 60))[2] > 200  # red on top, blue below


def test_a_fresh_process_loads_only_the_plugins_a_file_needs(tmp_path):
    """Start-up: a JPEG or PNG loads Pillow's common plugins only (not the 40 others nor pillow-heif),
    its warnings are still its notes where the program asks (EXIF through the TIFF plugin, loaded lazily by
    Pillow; the program's own "error" filter does not reach them); a TIFF then loads everything."""
    import subprocess
    import sys

    _corrupt_exif_jpeg(tmp_path / "exif.jpg")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "a.tif")
    code = (
        "import sys, warnings\n"
        "warnings.simplefilter('error')\n"
        "from edgeclip.images import decode_image, warnings_as_notes\n"
        "with warnings_as_notes():\n"
        f"    jpeg = decode_image({str(tmp_path / 'exif.jpg')!r}, cover=8)\n"
        f"png = decode_image({str(tmp_path / 'a.png')!r}, cover=8)\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('PIL.Psd', 'PIL.Tga', 'PIL.Pdf', 'pillow_heif')))\n"
        "print('AFTER-COMMON', loaded, jpeg.note, png.note)\n"
        f"tiff = decode_image({str(tmp_path / 'a.tif')!r}, cover=8)\n"
        "print('AFTER-TIFF', 'PIL.PsdImagePlugin' in sys.modules, tiff.image.size)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    common = next(ln for ln in done.stdout.splitlines() if ln.startswith("AFTER-COMMON"))
    assert common.startswith("AFTER-COMMON [] ") and "Truncated File Read" in common and common.endswith("None")
    assert "AFTER-TIFF True (8, 8)" in done.stdout
