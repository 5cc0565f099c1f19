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
    # named like an image (empty.png, fake.jpg): inputs, so that decoding reports them
    assert rel(result.images, tree) == ["a.jpg", "b.PNG", "empty.png", "fake.jpg", "noext", "sub/c.gif",
                                        "sub/deeper/d.bmp"]
    assert {p.name: why for p, why in result.skipped} == {"notes.txt": "not an image"}
    assert result.missing == []


def test_not_recursive(tree):
    assert rel(discover_images([tree], recursive=False).images, tree) == ["a.jpg", "b.PNG", "empty.png", "fake.jpg",
                                                                           "noext"]


def test_named_files_are_always_inputs_in_argument_order(tree):
    named = [tree / "notes.txt", tree / ".hidden.png", str(tree / "a.jpg")]
    result = discover_images(named)
    assert result.images == [tree / "notes.txt", tree / ".hidden.png", tree / "a.jpg"]
    assert result.skipped == [] and result.missing == []


def test_missing_paths_and_duplicates(tree):
    result = discover_images([tree / "a.jpg", tree / "gone.jpg", tree, tree / "a.jpg"])
    assert result.images[0] == tree / "a.jpg"
    assert len(result.images) == len(set(result.images)) == 7
    assert result.missing == [(tree / "gone.jpg", "no such file or directory")]


def test_folder_links_are_not_followed_by_default(tree):
    """Links to folders inside a folder are listed in `links`, not walked (a link to `/` would
    walk the whole file system); links to files are still inputs."""
    (tree / "sub" / "loop").symlink_to(tree)  # a cycle back to the top
    (tree / "sub" / "self").symlink_to(".")
    (tree / "again").symlink_to(tree / "sub")
    (tree / "root").symlink_to("/")
    (tree / "proc").symlink_to("/proc/self")
    (tree / "link.png").symlink_to(tree / "a.jpg")
    (tree / "dangling.png").symlink_to(tree / "nowhere.png")
    result = discover_images([tree])
    assert rel(result.images, tree) == ["a.jpg", "b.PNG", "empty.png", "fake.jpg", "link.png", "noext", "sub/c.gif",
                                        "sub/deeper/d.bmp"]
    assert rel(result.links, tree) == ["again", "proc", "root", "sub/loop", "sub/self"]
    assert result.missing == [(tree / "dangling.png", "broken symbolic link")]
    assert discover_images([tree / "again"]).images == [tree / "again" / "c.gif", tree / "again" / "deeper" / "d.bmp"]
    assert discover_images([tree / "dangling.png"]).missing == [(tree / "dangling.png", "broken symbolic link")]


def test_follow_links_walks_each_folder_once(tree):
    """--follow-links: loops end (device and inode), a second way into a folder is not walked twice."""
    (tree / "sub" / "loop").symlink_to(tree)
    (tree / "sub" / "self").symlink_to(".")
    (tree / "again").symlink_to(tree / "sub")
    result = discover_images([tree], follow_links=True)
    assert rel(result.images, tree) == ["a.jpg", "again/c.gif", "again/deeper/d.bmp", "b.PNG", "empty.png",
                                        "fake.jpg", "noext"]
    assert result.links == [] and result.missing == []


def test_deep_nesting_is_walked_iteratively(tmp_path):
    """1,500 nested folders (deeper than Python's recursion limit) with an image at the bottom."""
    folders = [tmp_path]
    for _ in range(1500):  # one at a time: Path.mkdir(parents=True) and rmtree recurse
        folders.append(folders[-1] / "d")
        folders[-1].mkdir()
    deep = folders[-1]
    save(deep / "bottom.png")
    save(tmp_path / "top.png")
    try:
        for follow in (False, True):
            result = discover_images([tmp_path], follow_links=follow)
            assert result.images == [deep / "bottom.png", tmp_path / "top.png"]
            assert result.missing == []
    finally:
        (deep / "bottom.png").unlink()
        for folder in reversed(folders[1:]):
            folder.rmdir()


def test_unreadable_folder_is_reported(tree, monkeypatch):
    real_scandir = os.scandir
    locked = tree / "sub"

    def scandir(path):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(discover_module.os, "scandir", scandir)
    result = discover_images([tree])
    assert rel(result.images, tree) == ["a.jpg", "b.PNG", "empty.png", "fake.jpg", "noext"]
    assert (locked, "cannot list folder: permission denied") in result.missing


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


FORMATS = ["JPEG", "PNG", "GIF", "BMP", "TIFF", "PPM", "ICO", "QOI", "PCX", "SGI", "DDS", "ICNS"]
FORMATS += [f for f, feature in [("WEBP", "webp"), ("JPEG2000", "jpg_2000"), ("AVIF", "avif")] if features.check(feature)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_decodable_format_is_recognised(fmt):
    data = _encoded(fmt)
    assert looks_like_image(data[:HEADER_BYTES])
    with Image.open(io.BytesIO(data)) as img:  # and Pillow does decode it
        img.load()


@pytest.mark.parametrize(
    "header",
    [b"", b"hello world", b"%PDF-1.7\n", b"PK\x03\x04", b"\x7fELF\x02\x01", b"RIFF\x00\x00\x00\x00WAVEfmt ", b"P7x", b"{}",
     b"\x00\x00\x00\x18ftypmp42", b"\x00\x00\x00\x14ftypqt  ", b"<?xml version=", b"\x00\x00\x01\xb3\x14\x00"],
)
def test_non_images_are_not_recognised(header):
    assert not looks_like_image(header)


def test_bigtiff_and_formats_without_a_signature(tmp_path):
    """BigTIFF is recognised by content; TGA, which has no signature, by its extension."""
    img = Image.new("RGB", (8, 8), (1, 2, 3))
    img.save(tmp_path / "big", "TIFF", big_tiff=True)
    img.save(tmp_path / "a.tga", "TGA")
    result = discover_images([tmp_path])
    assert [p.name for p in result.images] == ["a.tga", "big"]
    for path in result.images:
        with Image.open(path) as opened:
            opened.load()


def test_heic_is_recognised(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "IMG_0001", "HEIF")
    assert discover_images([tmp_path]).images == [tmp_path / "IMG_0001"]


def test_every_entry_is_accounted_for_once(tmp_path):
    """Each entry under a folder is an input, a skipped file or an unreadable entry; hidden
    files and AppleDouble files are ignored."""
    save(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 10)
    (tmp_path / "zero.JPG").write_bytes(b"")
    (tmp_path / "random.png").write_bytes(os.urandom(300))
    (tmp_path / "readme.txt").write_text("words")
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 40)
    (tmp_path / "._good.png").write_bytes(b"\x00\x05\x16\x07")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.jpg")
        os.mkfifo(tmp_path / "pipe")
    result = discover_images([tmp_path])
    names = [p.name for p in result.images]
    assert names == ["broken.jpg", "good.png"] + (["pipe.jpg"] if hasattr(os, "mkfifo") else []) + ["random.png",
                                                                                                 "zero.JPG"]
    skipped = {p.name: why for p, why in result.skipped}
    assert skipped == {"clip.mp4": "not an image", "readme.txt": "not an image",
                       **({"pipe": "not a regular file"} if hasattr(os, "mkfifo") else {})}
    assert result.missing == [(tmp_path / "dangling", "broken symbolic link")]
