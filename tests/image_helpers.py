"""Awkward image files for the bad-input tests (``test_bad_inputs``, ``test_cli``): ``GOOD`` files that
must decode to a known RGB image (with their check) and ``BAD`` ones that must fail with a one-line
ImageError containing the given word; ``write`` puts a set of them into a folder."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from edgeclip.images import BACKGROUND


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


def palette_with_transparency(per_entry: bool = False) -> bytes:
    """Index 0 transparent: one transparent index, or (`per_entry`) an alpha per palette entry, the tRNS
    bytes Pillow warns about when such an image is converted straight to RGB."""
    img = Image.new("P", (6, 4), 0)
    img.putpalette([10, 20, 30, 200, 100, 50] + [0, 0, 0] * 254)
    img.paste(1, (3, 0, 6, 4))
    return encoded(img, "PNG", transparency=bytes([0, 255, 128]) if per_entry else 0)


def exif_rotated_jpeg() -> bytes:
    """Stored 40 wide x 20 high, red left half, blue right half, EXIF orientation 6
    (display rotated 90 degrees clockwise: 20 wide x 40 high, red on top)."""
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(img, "JPEG", quality=95, exif=exif)


def corrupt_exif_jpeg() -> bytes:
    """An 8x8 JPEG whose EXIF block is cut short: Pillow warns "Truncated File Read" inside `Image.open`."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Maker"
    return encoded(Image.new("RGB", (8, 8), (9, 9, 9)), "JPEG", exif=exif.tobytes()[:-6])


def process_state() -> dict[str, object]:
    """What edgeclip must leave as it found it (issue 19): Pillow's decompression-bomb limit, the warnings
    machinery, the `warnings` attribute of Pillow's modules."""
    import sys
    import warnings

    return {"MAX_IMAGE_PIXELS": Image.MAX_IMAGE_PIXELS, "showwarning": warnings.showwarning,
            "filters": list(warnings.filters),
            "patched": sorted(n for n, m in list(sys.modules.items()) if n.startswith(("PIL", "pillow_heif"))
                              and getattr(m, "warnings", warnings) is not warnings)}


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
    "palette_alpha.png": (palette_with_transparency(per_entry=True), check_palette),
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
