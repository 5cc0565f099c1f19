"""Every kind of awkward input file: each decodes to the right RGB image or fails with a
one-line ImageError naming the file; nothing else escapes, alone or in `iter_batches`."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeclip.discover import display_path
from edgeclip.errors import ImageError
from edgeclip.images import BACKGROUND, PreprocessConfig, iter_batches, load_image

CFG = PreprocessConfig(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise(mode: str = "RGB", size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(0)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` RGB pixels and holds none: a bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def palette_with_transparency() -> bytes:
    img = Image.new("P", (6, 4), 0)
    img.putpalette([10, 20, 30, 200, 100, 50] + [0, 0, 0] * 254)
    img.paste(1, (3, 0, 6, 4))
    return encoded(img, "PNG", transparency=0)


def exif_rotated_jpeg() -> bytes:
    """Stored 40 wide x 20 high, red left half, blue right half, EXIF orientation 6
    (display rotated 90 degrees clockwise: 20 wide x 40 high, red on top)."""
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(img, "JPEG", quality=95, exif=exif)


def cmyk_jpeg() -> bytes:
    return encoded(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)


# name -> (file bytes, check of the decoded RGB array, or None when an ImageError is due,
# with a word its message must contain)
Check = Callable[[np.ndarray], None]


def solid(rgb: tuple[int, int, int], tol: int = 0) -> Check:
    def check(a: np.ndarray) -> None:
        assert np.abs(a.astype(int) - rgb).max() <= tol, a[0, 0]

    return check


def check_exif(a: np.ndarray) -> None:
    assert a.shape == (40, 20, 3)  # rotated: now taller than wide
    assert np.abs(a[5, 10].astype(int) - (255, 0, 0)).max() < 30  # red on top
    assert np.abs(a[35, 10].astype(int) - (0, 0, 255)).max() < 30  # blue below


def check_16bit(a: np.ndarray) -> None:
    np.testing.assert_array_equal(a[0, :4, 0], [0, 1, 128, 255])
    assert a[1].max() < 255  # a mid grey row does not saturate to white


def check_palette(a: np.ndarray) -> None:
    assert tuple(a[0, 0]) == BACKGROUND and tuple(a[0, 5]) == (200, 100, 50)  # index 0 is transparent


def sixteen_bit_png() -> bytes:
    values = np.array([[0, 257, 32768, 65535], [30000, 30000, 30000, 30000]], dtype=np.uint16)
    return encoded(Image.fromarray(values), "PNG")


GOOD: dict[str, tuple[bytes, Check]] = {
    "png_named.jpg": (encoded(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG"), solid((1, 2, 3))),
    "grey.png": (encoded(Image.new("L", (8, 8), 77), "PNG"), solid((77, 77, 77))),
    "bilevel.png": (encoded(Image.new("1", (8, 8), 1), "PNG"), solid((255, 255, 255))),
    "sixteen.png": (sixteen_bit_png(), check_16bit),
    "cmyk.jpg": (cmyk_jpeg(), solid((255, 0, 0), tol=8)),
    "palette_transparent.png": (palette_with_transparency(), check_palette),
    "la.png": (encoded(Image.new("LA", (8, 8), (90, 0)), "PNG"), solid(BACKGROUND)),
    "la_opaque.png": (encoded(Image.new("LA", (8, 8), (90, 255)), "PNG"), solid((90, 90, 90))),
    "rgba.png": (encoded(Image.new("RGBA", (8, 8), (9, 8, 7, 128)), "PNG"), solid((132, 131, 131), tol=1)),
    "float.tiff": (encoded(Image.fromarray(np.full((8, 8), 0.5, np.float32)), "TIFF"), solid((128, 128, 128))),
    "int32.tiff": (encoded(Image.fromarray(np.full((8, 8), 40000, np.int32)), "TIFF"), solid((156, 156, 156))),
    "sixteen.tiff": (encoded(Image.fromarray(np.full((8, 8), 65535, np.uint16)), "TIFF"), solid((255, 255, 255))),
    "cmyk.tiff": (encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "TIFF"), solid((255, 0, 0))),
    "bigtiff.tif": (encoded(Image.new("RGB", (8, 8), (5, 6, 7)), "TIFF", big_tiff=True), solid((5, 6, 7))),
    "plain.tga": (encoded(Image.new("RGB", (8, 8), (5, 6, 7)), "TGA"), solid((5, 6, 7))),
    "rotated.jpg": (exif_rotated_jpeg(), check_exif),
    "anim.gif": (encoded(Image.new("P", (8, 8), 0), "GIF"), solid((0, 0, 0))),
    "plain.bmp": (encoded(Image.new("RGB", (8, 8), (5, 6, 7)), "BMP"), solid((5, 6, 7))),
    "plain.webp": (encoded(Image.new("RGB", (8, 8), (200, 0, 0)), "WEBP", lossless=True), solid((200, 0, 0))),
    "plain.tiff": (encoded(Image.new("RGB", (8, 8), (5, 6, 7)), "TIFF"), solid((5, 6, 7))),
}

BAD: dict[str, tuple[bytes, str]] = {
    "empty.jpg": (b"", "empty"),
    "truncated.jpg": (encoded(noise(), "JPEG")[:400], "truncated"),
    "truncated.png": (encoded(noise(), "PNG")[:600], "truncated"),
    "random.jpg": (np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes(), "not a recognised"),
    "text.png": (b"hello, I am not a picture\n", "not a recognised"),
    "bomb.png": (png_header_only(100_000, 100_000), "decompression bomb"),
}


def write(folder: Path, files: dict[str, tuple[bytes, object]]) -> dict[str, Path]:
    paths = {}
    for name, (data, _) in files.items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    return paths


def assert_clear_error(err: ImageError, path: Path, word: str) -> None:
    message = str(err)
    assert "\n" not in message
    assert message.startswith(f"cannot read image {display_path(path)}: "), message
    assert word in message, message
    message.encode("utf-8")  # printable whatever the file name


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_files_decode_to_rgb(name, tmp_path):
    path = write(tmp_path, {name: GOOD[name]})[name]
    img = load_image(path)
    assert img.mode == "RGB"
    GOOD[name][1](np.asarray(img))


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_files_raise_a_clear_image_error(name, tmp_path):
    path = write(tmp_path, {name: BAD[name]})[name]
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert_clear_error(info.value, path, BAD[name][1])


def test_pixel_limit_is_configurable(tmp_path):
    path = tmp_path / "small.png"
    Image.new("RGB", (20, 10)).save(path)
    assert load_image(path, max_pixels=200).size == (20, 10)
    with pytest.raises(ImageError) as info:
        load_image(path, max_pixels=199)
    assert_clear_error(info.value, path, "20x10 = 200 pixels, limit 199")


def test_missing_file_and_folder_in_place_of_a_file(tmp_path):
    with pytest.raises(ImageError) as info:
        load_image(tmp_path / "nope.jpg")
    assert_clear_error(info.value, tmp_path / "nope.jpg", "no such file")
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    with pytest.raises(ImageError) as info:
        load_image(folder)
    assert_clear_error(info.value, folder, "is a directory")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_named_pipe_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageError) as info:
        load_image(fifo)
    assert_clear_error(info.value, fifo, "not a regular file")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path):
    path = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(path)
    path.chmod(0)
    try:
        with pytest.raises(ImageError) as info:
            load_image(path)
        assert_clear_error(info.value, path, "permission denied")
    finally:
        path.chmod(0o600)


def test_non_utf8_file_names(tmp_path):
    good = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.png"))
    Image.new("RGB", (4, 4), (3, 3, 3)).save(good)
    assert load_image(good).getpixel((0, 0)) == (3, 3, 3)
    bad = Path(os.fsdecode(bytes(tmp_path) + b"/bad\xff.jpg"))
    bad.write_bytes(b"junk")
    with pytest.raises(ImageError) as info:
        load_image(bad)
    assert "bad\\xff.jpg" in str(info.value)
    assert_clear_error(info.value, bad, "not a recognised")


def test_iter_batches_keeps_good_reports_bad_in_order(tmp_path):
    files = {**GOOD, **BAD}
    order = sorted(files)  # interleaves good and bad
    paths = write(tmp_path, files)
    missing = tmp_path / "missing.png"
    inputs = [paths[n] for n in order] + [missing, tmp_path]
    batches = list(iter_batches(inputs, CFG, batch_size=3, workers=2))
    decoded = [p for b in batches for p in b.paths]
    errors = [p for b in batches for p, _ in b.errors]
    assert decoded == [paths[n] for n in order if n in GOOD]
    assert errors == [paths[n] for n in order if n in BAD] + [missing, tmp_path]
    for b in batches:
        assert b.pixels.shape == (len(b.paths), 3, 16, 16) and b.pixels.dtype == np.float32
        assert np.isfinite(b.pixels).all()
        for path, message in b.errors:
            assert message.startswith(f"cannot read image {display_path(path)}: ")


# ---------------------------------------------------------------- through the CLI


def run_cli(args: list[str]) -> "subprocess.CompletedProcess":
    import subprocess
    import sys

    code = f"import sys\nsys.argv = ['edgeclip'] + {[str(a) for a in args]!r}\nfrom edgeclip.edgeapp.cli.app import main\nmain()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    """A RAIL bundle of the tiny config with random weights and no task (zero-shot labels)."""
    pytest.importorskip("open_clip")
    root = tmp_path_factory.mktemp("bad-inputs") / "bundle"
    result = run_cli(["init", "--bundle", root, "--model", "edgeclip-tiny", "--random-weights", "--seed", "0",
                      "--method", "rail-primal", "--hidden", "256", "--labels", "a cat,a dog", "--quiet"])
    assert result.returncode == 0, result.stderr
    return root


@pytest.mark.slow
def test_every_file_in_a_folder_is_accounted_for(tiny_bundle, tmp_path):
    """Each unreadable kind inside a folder is an error row (exit 3), a HEIC photo is classified,
    non-images are counted as skipped (listed with --verbose), hidden and AppleDouble files ignored."""
    folder = tmp_path / "camera roll"
    folder.mkdir()
    write(folder, {"good.jpg": GOOD["rotated.jpg"], "empty.jpg": BAD["empty.jpg"],
                   "truncated.jpg": BAD["truncated.jpg"], "random.png": BAD["random.jpg"],
                   "text.png": BAD["text.png"], "bomb.png": BAD["bomb.png"], "plain.tga": GOOD["plain.tga"],
                   "float.tiff": GOOD["float.tiff"]})
    expected_ok = {"good.jpg", "plain.tga", "float.tiff"}
    pytest.importorskip("pillow_heif").register_heif_opener()
    Image.new("RGB", (64, 48), (10, 120, 200)).save(folder / "IMG_0001.HEIC", "HEIF")
    expected_ok.add("IMG_0001.HEIC")
    (folder / "IMG_0002.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 20)  # a broken HEIC
    expected_bad = {"empty.jpg", "truncated.jpg", "random.png", "text.png", "bomb.png", "IMG_0002.HEIC"}
    if hasattr(os, "mkfifo"):
        os.mkfifo(folder / "pipe.jpg")
        expected_bad.add("pipe.jpg")
    (folder / "notes.txt").write_text("shopping list")
    (folder / "clip.mov").write_bytes(b"\x00\x00\x00\x14ftypqt  " + b"\x00" * 30)
    (folder / "._good.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00")
    (folder / ".thumbnail.png").write_bytes(GOOD["grey.png"][0])

    result = run_cli(["classify", folder, "--bundle", tiny_bundle, "--format", "json", "--verbose"])
    assert result.returncode == 3, result.stderr
    rows = {Path(r["path"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    assert {n for n, r in rows.items() if r["error"] is None and r["label"]} == expected_ok
    assert {n for n, r in rows.items() if r["error"]} == expected_bad
    assert "empty" in rows["empty.jpg"]["error"] and "not a regular file" in rows.get("pipe.jpg", {"error": "not a regular file"})["error"]
    assert "decompression bomb" in rows["bomb.png"]["error"]
    assert f"{len(expected_ok)} classified, {len(expected_bad)} unreadable, 2 skipped (not images)" in result.stderr
    assert "skipped" in result.stderr and "notes.txt: not an image" in result.stderr and "clip.mov" in result.stderr
    assert "._good.jpg" not in result.stdout + result.stderr and ".thumbnail.png" not in result.stdout

    exact = run_cli(["classify", folder / "good.jpg", "--bundle", tiny_bundle, "--format", "json", "--quiet",
                     "--exact-preprocess", "--max-pixels", "1000000"])
    assert exact.returncode == 0, exact.stderr
    refused = run_cli(["classify", folder / "good.jpg", "--bundle", tiny_bundle, "--format", "json", "--quiet",
                       "--exact-preprocess", "--max-pixels", "100"])
    assert refused.returncode == 3 and "--max-pixels" in json.loads(refused.stdout)["error"]


def _domain(root: Path, good: dict[str, int], bad: dict[str, int]) -> Path:
    for cls, n in good.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(
                root / cls / f"{i}.png")
    for cls, n in bad.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / cls / f"broken{i}.jpg").write_bytes(b"" if i % 2 else b"\xff\xd8\xff\xe0 truncated")
    return root


@pytest.mark.slow
def test_add_task_refuses_an_all_unreadable_class_and_names_unreadable_files(tiny_bundle, tmp_path):
    from edgeclip.bundle import Bundle

    before = Bundle.open(tiny_bundle).version
    domain = _domain(tmp_path / "pets", {"cat": 4}, {"dog": 3})
    result = run_cli(["add-task", domain, "--bundle", tiny_bundle, "--quiet"])
    assert result.returncode == 2, result.stderr
    assert "'dog' (0 readable, 3 unreadable)" in result.stderr
    assert "at least 1 readable image per class and 3 in the task" in result.stderr
    assert "broken0.jpg" in result.stderr  # the warning names the files
    assert Bundle.open(tiny_bundle).version == before  # nothing learned

    domain = _domain(tmp_path / "pets2", {"cat": 4, "dog": 3}, {"dog": 2})
    result = run_cli(["add-task", domain, "--bundle", tiny_bundle])
    assert result.returncode == 0, result.stderr
    assert "broken0.jpg" in result.stderr and "broken1.jpg" in result.stderr
    assert "7 images, 2 unreadable left out" in result.stderr
    task = Bundle.open(tiny_bundle).tasks[-1]
    assert task.n_images == 7 and task.unreadable_images == 2


def test_minimum_readable_images_message():
    from edgeclip.domain import Domain, require_enough_images
    from edgeclip.errors import DomainError

    domain = Domain("pets", Path("pets"), ["cat", "dog"], [])
    require_enough_images(domain, {0: 2, 1: 1}, {})
    with pytest.raises(DomainError, match=r"'dog' \(0 readable, 3 unreadable\).*at least 1 readable image per class"):
        require_enough_images(domain, {0: 5}, {1: 3})
    with pytest.raises(DomainError, match=r"only 2 readable image\(s\).*1 unreadable.*3 in the task"):
        require_enough_images(domain, {0: 1, 1: 1}, {0: 1})
