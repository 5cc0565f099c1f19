"""edgeapp.discover: which files a folder walk returns, in what order, and what it reports."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image, features

import edgeclip.discover as discover_module
from edgeclip.discover import HEADER_BYTES, discover_images, display_path, looks_like_image


def save(path: Path, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (1, 2, 3)).save(path, fmt)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A folder with images (by content, whatever the name), non-images and hidden things."""
    root = tmp_path / "photos"
    save(root / "sub" / "deeper" / "d.bmp", "BMP")
    save(root / "sub" / "c.gif", "GIF")
    save(root / "noext", "PNG")
    save(root / "b.PNG", "PNG")
    save(root / "a.jpg", "JPEG")
    save(root / ".hidden.png")
    save(root / ".cache" / "x.png")
    (root / "fake.jpg").write_text("not an image")
    (root / "notes.txt").write_text("hello")
    (root / "empty.png").write_bytes(b"")
    return root


def rel(paths, root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in paths]


def test_walks_by_content_sorted_skipping_hidden(tree):
    result = discover_images([tree])
    assert rel(result.images, tree) == ["a.jpg", "b.PNG", "noext", "sub/c.gif", "sub/deeper/d.bmp"]
    assert {p.name: why for p, why in result.skipped} == {
        "empty.png": "not an image",
        "fake.jpg": "not an image",
        "notes.txt": "not an image",
    }
    assert result.missing == []


def test_not_recursive(tree):
    assert rel(discover_images([tree], recursive=False).images, tree) == ["a.jpg", "b.PNG", "noext"]


def test_named_files_are_always_inputs_in_argument_order(tree):
    named = [tree / "notes.txt", tree / ".hidden.png", str(tree / "a.jpg")]
    result = discover_images(named)
    assert result.images == [tree / "notes.txt", tree / ".hidden.png", tree / "a.jpg"]
    assert result.skipped == [] and result.missing == []


def test_missing_paths_and_duplicates(tree):
    result = discover_images([tree / "a.jpg", tree / "gone.jpg", tree, tree / "a.jpg"])
    assert result.images[0] == tree / "a.jpg"
    assert len(result.images) == len(set(result.images)) == 5
    assert result.missing == [(tree / "gone.jpg", "no such file or directory")]


def test_symlink_loops_are_survived(tree):
    (tree / "sub" / "loop").symlink_to(tree)  # a cycle back to the top
    (tree / "sub" / "self").symlink_to(".")
    (tree / "again").symlink_to(tree / "sub")  # a second way into sub
    (tree / "dangling.png").symlink_to(tree / "nowhere.png")
    result = discover_images([tree])
    images = rel(result.images, tree)
    assert images == ["a.jpg", "again/c.gif", "again/deeper/d.bmp", "b.PNG", "noext"]
    assert (tree / "dangling.png", "broken symbolic link") in result.skipped
    missing = discover_images([tree / "dangling.png"]).missing
    assert missing == [(tree / "dangling.png", "broken symbolic link")]


def test_unreadable_folder_is_reported(tree, monkeypatch):
    real_scandir = os.scandir
    locked = tree / "sub"

    def scandir(path):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(discover_module.os, "scandir", scandir)
    result = discover_images([tree])
    assert rel(result.images, tree) == ["a.jpg", "b.PNG", "noext"]
    assert (locked, "cannot list folder: permission denied") in result.skipped


def test_unicode_and_non_utf8_names(tmp_path):
    raw_dir = bytes(tmp_path) + b"/d\xe9j\xe0"
    os.mkdir(raw_dir)
    with open(raw_dir + b"/\xff\xfe.png", "wb") as f:
        f.write(_encoded("PNG"))
    save(tmp_path / "Ünïcødé 图片" / "猫.jpg", "JPEG")
    result = discover_images([tmp_path])
    assert [os.fsencode(p) for p in result.images] == [
        raw_dir + b"/\xff\xfe.png",  # "d" sorts before "Ü"
        os.fsencode(tmp_path / "Ünïcødé 图片" / "猫.jpg"),
    ]
    assert discover_images([raw_dir]).images == [result.images[0]]  # bytes input works too
    shown = display_path(result.images[0])
    assert shown.endswith("d\\xe9j\\xe0/\\xff\\xfe.png")
    shown.encode("utf-8")


def test_order_is_deterministic(tmp_path):
    for name in ["z.png", "b.png", "M.png", "a.png", "é.png", "10.png", "9.png"]:
        save(tmp_path / name)
    first = discover_images([tmp_path]).images
    assert [p.name for p in first] == ["10.png", "9.png", "M.png", "a.png", "b.png", "z.png", "é.png"]
    assert discover_images([tmp_path]).images == first


def _encoded(fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, fmt, **kwargs)
    return buf.getvalue()


FORMATS = ["JPEG", "PNG", "GIF", "BMP", "TIFF", "PPM", "ICO", "QOI"]
FORMATS += [f for f, feature in [("WEBP", "webp"), ("JPEG2000", "jpg_2000"), ("AVIF", "avif")] if features.check(feature)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_decodable_format_is_recognised(fmt):
    data = _encoded(fmt)
    assert looks_like_image(data[:HEADER_BYTES])
    with Image.open(io.BytesIO(data)) as img:  # and Pillow does decode it
        img.load()


@pytest.mark.parametrize(
    "header",
    [b"", b"hello world", b"%PDF-1.7\n", b"PK\x03\x04", b"\x7fELF\x02\x01", b"RIFF\x00\x00\x00\x00WAVEfmt ", b"P7x", b"{}"],
)
def test_non_images_are_not_recognised(header):
    assert not looks_like_image(header)
