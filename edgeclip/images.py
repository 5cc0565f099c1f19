"""Decoding image files and turning them into CLIP input tensors, without torch.

One decode path serves inference (`edgeclip classify`, eval) and training (RAIL and gate
embeddings, MoE adapters): `decode_image` opens a file, reduces it, maps its pixels to
8-bit RGB and turns it upright; `preprocess` then makes the model input.

Decoding (`decode_image`)
    1. The file must be a regular, non-empty file; its declared size is checked against
       `max_pixels` (decompression-bomb guard) before any pixel is decoded.
    2. Fast path (the default): a JPEG is decoded at the smallest DCT scale (1/2, 1/4,
       1/8, Pillow's `Image.draft`) that still covers the model input, and any other large
       image is shrunk by the largest integer factor that still covers it (`Image.reduce`,
       a box filter). "Covers" follows the resize mode: the short side (`shortest`), the
       long side (`longest`) or both sides (`squash`) stay at least `image_size` pixels.
       With this reduction the bomb guard applies to the pixels actually decoded, so a
       108 MP photo is read (at 1/8 scale: 1.7 MP) within bounded memory.
       Exact path (`exact=True`): the full resolution is decoded, as open_clip does.
    3. Colours map to 8-bit RGB by their real value range (`to_rgb`): transparency is
       composited onto `BACKGROUND` (white); 16-bit samples are scaled from 0..65535;
       32-bit integer samples from the smallest of 0..255, 0..65535 that holds them (else
       their own min..max); float samples from 0..1, 0..255 or 0..65535 when they fit (else
       their own min..max, NaN read as the minimum); 1-bit, palette, CMYK, YCbCr and LAB
       convert as Pillow (LAB through ImageCms) converts them.
    4. EXIF orientation is applied last, on the reduced image (a lossless transpose).
    Pillow's warnings about the file (palette transparency, corrupt EXIF, ...) are caught
    and returned as the file's `notes`, not printed.

Preprocessing (`preprocess`) reproduces open_clip's eval transform (`open_clip.image_transform(
size, is_train=False, ...)`: torchvision `Resize` of the shorter side with Pillow's filter,
`CenterCrop`, `ToTensor`, `Normalize`) to float32 rounding. With `exact=True` decoding, the
result is bit-identical to open_clip's for RGB and grey files (the parity test) with two
deliberate exceptions: colours are mapped as above before resizing (open_clip resizes in the
file's mode and drops alpha), and where the resized intermediate would exceed
`MAX_INTERMEDIATE_PIXELS` (a thin strip: 20000x1 would need 4 GB) only the centre-crop's
region is resized (Pillow's `box`), which keeps memory bounded and differs by rounding.
The fast path differs from exact only for images it reduced; docs/IMAGES.md gives the
measured difference.
"""

from __future__ import annotations

import os
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from edgeclip.discover import display_path, register_formats
from edgeclip.errors import ImageError, UsageError
from edgeclip.manifest import Preprocess

# Pillow's default limit (about 89.5 MP). `max_pixels` is edgeclip's own guard, checked on the
# declared (exact path) or reduced (fast path) size before decoding. Pillow's own check, on the declared
# size in `Image.open`, comes first: its limit is the application's (see `pillow_pixel_limit`).
DEFAULT_MAX_PIXELS: int = 89_478_485
# Where the resized intermediate of the `shortest` transform would hold more pixels than this,
# only the centre crop's source region is resized (memory bounded for any aspect ratio).
MAX_INTERMEDIATE_PIXELS: int = 1 << 22
# Transparent pixels are composited onto this colour (white, as a viewer shows a transparent PNG).
BACKGROUND: tuple[int, int, int] = (255, 255, 255)

# Pillow's filter of each `Preprocess.interpolation` (the schema's `Interpolation`)
INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


# ---------------------------------------------------------------- Pillow's warnings and limit
#
# Neither is edgeclip's to change in a process it does not own (issue 19). Decoding runs in threads, and on
# Python 3.11 nothing scoped catches a warning raised in one thread (`warnings.catch_warnings` swaps
# process-wide state; Pillow itself parses a JPEG's EXIF inside `Image.open`, to read its DPI, so a corrupt
# EXIF block warns before edgeclip sees the image). So the library changes neither: Pillow's warnings reach
# the application's own warning filters, and Pillow's `MAX_IMAGE_PIXELS` stays the application's (a file
# over it is refused with edgeclip's one-line error). A program that owns its process, the `edgeclip` CLI
# (and a Ray decoding task, alone in its worker), opts in for its own run: `warnings_as_notes` makes
# a warning raised while a thread decodes a file that file's note, `pillow_pixel_limit` lets edgeclip's
# `max_pixels` guard be the one that refuses. Both undo what they did when they end.

_local = threading.local()  # .notes: the notes of the file this thread is decoding; None between files
_PILLOW_MODULES = r"(PIL|pillow_heif)(\.|$)"
_notes_hooks = 0  # how many `warnings_as_notes` are in force


def warnings_are_notes() -> bool:
    """True while `warnings_as_notes` is in force: a file's notes then hold Pillow's warnings about it
    (the embedding cache keeps such notes apart from the library's own)."""
    return _notes_hooks > 0


def _note(message: Any) -> bool:
    """Add a warning to the notes of the file this thread is decoding; False when it decodes none."""
    notes = getattr(_local, "notes", None)
    if notes is None:
        return False
    text = " ".join(str(message).split())
    if text not in notes:
        notes.append(text)
    return True


@contextmanager
def warnings_as_notes() -> Iterator[None]:
    """For a program that owns its process (the `edgeclip` CLI), never library code: while it lasts, a
    warning raised by a thread while it decodes a file (`decode_image`: Pillow's "Truncated File Read" of a
    corrupt EXIF block, "Possibly corrupt EXIF data", a malformed MPO, ...) becomes one of that file's notes,
    every time (Pillow's and pillow-heif's warnings are shown "always", not once per place in the code), and
    is not printed; every other warning goes to the `warnings.showwarning` that was there. Installs that
    hook and one `warnings` filter, and removes both on exit. Enter it once, from the main thread."""
    import warnings

    global _notes_hooks
    previous = warnings.showwarning

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if not _note(message):
            previous(message, category, filename, lineno, file, line)

    before = list(warnings.filters)
    warnings.showwarning = show
    warnings.filterwarnings("always", module=_PILLOW_MODULES)
    added = warnings.filters[0]
    _notes_hooks += 1
    try:
        yield
    finally:
        _notes_hooks -= 1
        warnings.showwarning = previous
        if added in warnings.filters and added not in before:  # an equal filter the program had stays
            warnings.filters.remove(added)


@contextmanager
def pillow_pixel_limit(max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[None]:
    """For a program that owns its process (the `edgeclip` CLI), never library code: while it lasts,
    Pillow's process-wide decompression-bomb limit `PIL.Image.MAX_IMAGE_PIXELS` is raised (never lowered)
    to 64 x `max_pixels`, the declared size of a JPEG that a 1/8 DCT scale brings within `max_pixels`, so
    that edgeclip's own guard, which counts the pixels actually decoded and is checked before any pixel
    is, is the one that refuses. The previous value is put back on exit."""
    previous = Image.MAX_IMAGE_PIXELS
    wanted = 64 * max_pixels
    raised = previous is not None and previous < wanted
    if raised:
        Image.MAX_IMAGE_PIXELS = wanted
    try:
        yield
    finally:
        if raised and Image.MAX_IMAGE_PIXELS == wanted:
            Image.MAX_IMAGE_PIXELS = previous


_READY = False  # every Pillow plugin and pillow-heif loaded
_COMMON = ("JPEG", "PNG", "GIF", "BMP", "PPM")  # what Image.preinit registers, in its order


def _is_common(header: bytes) -> bool:
    """True when a file starting with `header` is opened by one of Pillow's preinit plugins."""
    for fmt in _COMMON:
        entry = Image.OPEN.get(fmt)
        if entry is not None and entry[1] is not None:
            try:
                if entry[1](header):
                    return True
            except Exception:  # noqa: BLE001, S112 - a plugin's test on a short header
                continue
    return False


def _ready(header: bytes | None = None) -> None:
    """Load the Pillow plugins a file needs. A file of one of Pillow's common formats (JPEG, PNG, GIF,
    BMP, PPM: `header` says) needs only `Image.preinit()`, which Pillow tries first in any case; anything
    else loads every plugin and pillow-heif (start-up: most of the cost of a first decode is importing
    some 40 plugins)."""
    global _READY
    if _READY:
        return
    if header is not None:
        Image.preinit()
        if _is_common(header):
            return
    register_formats()
    Image.init()
    _READY = True


def _header(path: Path) -> bytes | None:
    """The first bytes Pillow identifies a format by, or None when they cannot be read."""
    try:
        with open(path, "rb") as handle:
            return handle.read(16)
    except OSError:
        return None


# ---------------------------------------------------------------- colours


def _to_8bit(values: np.ndarray) -> np.ndarray:
    """16-bit samples (0..65535) to 8 bits, rounded."""
    wide = np.clip(values.astype(np.int64), 0, 65535)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _by_range(values: np.ndarray, ranges: tuple[float, ...]) -> np.ndarray:
    """Samples to uint8 by the first of `ranges` (0..r) that holds them all, else by their own
    min..max; NaN is read as the minimum, infinities as the finite extremes."""
    data = values.astype(np.float64)
    finite = np.isfinite(data)
    if not finite.any():
        return np.zeros(data.shape, np.uint8)
    lo, hi = float(data[finite].min()), float(data[finite].max())
    data = np.where(np.isnan(data), lo, np.clip(data, lo, hi))
    for top in ranges:
        if lo >= 0 and hi <= top:
            return np.rint(data * (255.0 / top)).astype(np.uint8)
    if hi == lo:
        return np.zeros(data.shape, np.uint8)
    return np.rint((data - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _composite(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    out = Image.new("RGB", rgba.size, BACKGROUND)
    out.paste(rgba, (0, 0), rgba)
    return out


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode in ("P", "L", "RGB") and img.info.get("transparency") is not None
    )


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as 8-bit RGB, by the rules in the module docstring: transparency composited on
    `BACKGROUND`, 16-bit, 32-bit integer and float samples mapped by their value range."""
    mode = img.mode
    if mode == "RGB" and img.info.get("transparency") is None:
        return img
    if _has_alpha(img):
        return _composite(img)
    if mode.startswith("I;16"):
        return Image.fromarray(_to_8bit(np.asarray(img))).convert("RGB")
    if mode == "I":
        return Image.fromarray(_by_range(np.asarray(img), (255.0, 65535.0))).convert("RGB")
    if mode == "F":
        return Image.fromarray(_by_range(np.asarray(img), (1.0, 255.0, 65535.0))).convert("RGB")
    if mode == "LAB":
        from PIL import ImageCms

        transform = ImageCms.buildTransformFromOpenProfiles(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
        )
        return ImageCms.applyTransform(img, transform)
    return img.convert("RGB")


# ---------------------------------------------------------------- decoding

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass
class Decoded:
    """`image`: RGB, upright, possibly reduced; `stored_size`: (width, height) as stored in the
    file; `notes`: Pillow's warnings and edgeclip's remarks about the file, one line each."""

    image: Image.Image
    stored_size: tuple[int, int]
    notes: list[str] = field(default_factory=list)

    @property
    def note(self) -> str | None:
        """The notes as one line, or None."""
        return "; ".join(self.notes) or None


def reduction_factor(size: tuple[int, int], cover: int, resize_mode: str = "shortest") -> int:
    """The largest integer factor k such that `size` / k still covers `cover` pixels on the
    side(s) that `resize_mode` scales to `cover` (1 when no reduction is possible)."""
    width, height = size
    side = {"shortest": min(width, height), "longest": max(width, height), "squash": min(width, height)}[resize_mode]
    return max(1, side // max(1, cover))


def _cause(err: BaseException) -> str:
    """A one-line reason for a decoding failure."""
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        # Pillow's limit (PIL.Image.MAX_IMAGE_PIXELS, the application's), under edgeclip's max_pixels
        return f"image too large, refused as a possible decompression bomb ({err})"
    if isinstance(err, UnidentifiedImageError):
        return "not a recognised image format"
    if isinstance(err, PermissionError):
        return "permission denied"
    if isinstance(err, FileNotFoundError):
        return "no such file"
    text = str(err) or type(err).__name__
    if isinstance(err, OSError) and "truncated" in text.lower():
        return f"truncated image data ({text})"
    if isinstance(err, MemoryError):
        return "out of memory while decoding"
    if isinstance(err, ValueError) and "conversion" in text:
        return f"unsupported colour mode ({text})"
    return f"corrupt image data ({type(err).__name__}: {text})"


def decode_image(
    path: Path | str,
    cover: int | None = None,
    resize_mode: str = "shortest",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Decoded:
    """Decode `path` into upright 8-bit RGB (module docstring: steps 1-4).

    `cover`: None decodes the full resolution (the exact path); a pixel count lets a JPEG be
    decoded at a DCT scale and any image be reduced by an integer factor, as long as the result
    still covers `cover` pixels on the side(s) `resize_mode` scales (the fast path).
    `max_pixels`: refuse images with more pixels than this to decode (after the DCT scale).

    Raises ImageError, naming the file and the cause, for a missing, empty, non-regular,
    unreadable, unrecognised, truncated or corrupt file and for one over `max_pixels`.
    """
    path = Path(path)

    def fail(cause: str) -> ImageError:
        return ImageError(f"cannot read image {display_path(path)}: {' '.join(cause.split())}")

    notes: list[str] = []
    _local.notes = notes
    try:
        st = path.stat()
        if stat.S_ISDIR(st.st_mode):
            raise fail("is a directory")
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
            raise fail("not a regular file")
        if st.st_size == 0:
            raise fail("file is empty")
        _ready(_header(path))
        with Image.open(path) as img:  # Pillow's own bomb check first (DecompressionBombError: see _cause)
            stored = img.size
            width, height = stored
            if cover and img.format in ("JPEG", "MPO"):
                scale = reduction_factor(stored, cover, resize_mode)
                scale = next(s for s in (8, 4, 2, 1) if s <= scale)
                if scale > 1:
                    img.draft(None, (width // scale, height // scale))
            if img.size[0] * img.size[1] > max_pixels:
                raise fail(
                    f"image too large ({width}x{height} = {width * height} pixels, limit {max_pixels}), "
                    "refused as a possible decompression bomb; --max-pixels raises the limit"
                )
            orientation = _orientation(img, notes)
            img.load()
            out = img
            if cover:
                factor = reduction_factor(out.size, cover, resize_mode)
                if factor > 1:
                    if out.mode in ("1", "P") or out.mode.startswith("I;16"):
                        out = to_rgb(out)
                    out = out.reduce(factor)
            out = to_rgb(out)
            if orientation in _TRANSPOSE:
                out = out.transpose(_TRANSPOSE[orientation])
            elif out is img:
                out = img.copy()  # outlives the open file
            return Decoded(out, stored, notes)
    except ImageError:
        raise
    except Exception as err:  # noqa: BLE001 - a decoder on untrusted input may raise anything
        raise fail(_cause(err)) from err
    finally:
        _local.notes = None


def _orientation(img: Image.Image, notes: list[str]) -> int:
    """The EXIF orientation tag (1 when absent); broken EXIF data leaves the image as stored."""
    try:
        value = img.getexif().get(0x0112, 1)
        return int(value) if value in _TRANSPOSE or value == 1 else 1
    except Exception:  # noqa: BLE001 - malformed metadata in an otherwise good file
        notes.append("EXIF data unreadable: orientation not applied")
        return 1


def load_image(path: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS, cover: int | None = None,
               resize_mode: str = "shortest") -> Image.Image:
    """`decode_image(...).image`: RGB, upright; full resolution unless `cover` is given. Raises ImageError."""
    return decode_image(path, cover, resize_mode, max_pixels).image


def decode_for(path: Path | str, cfg: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS,
               cover: int | None = None) -> Decoded:
    """Decode `path` as `cfg` asks: the full image when `cfg.exact`, else reduced while it still
    covers `cover` pixels (default `cfg.image_size`; training asks more, for its random crops).
    Raises ImageError as `decode_image`."""
    return decode_image(path, None if cfg.exact else (cover or cfg.image_size), cfg.resize_mode, max_pixels)


# ---------------------------------------------------------------- preprocessing


def _resize(img: Image.Image, size_wh: tuple[int, int], resample: int) -> Image.Image:
    return img if img.size == size_wh else img.resize(size_wh, resample)


def _center_crop_or_pad(img: Image.Image, size: int) -> Image.Image:
    """torchvision's `center_crop` (zero padding where the image is smaller, offsets by
    Python's round-half-even), which open_clip's `CenterCropOrPad` copies."""
    width, height = img.size
    if width < size or height < size:
        canvas = Image.new(img.mode, (max(width, size), max(height, size)), 0)
        canvas.paste(img, ((size - width) // 2 if size > width else 0, (size - height) // 2 if size > height else 0))
        img = canvas
        width, height = img.size
        if (width, height) == (size, size):
            return img
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def _resized(img: Image.Image, cfg: Preprocess) -> Image.Image:
    size = cfg.image_size
    resample = INTERPOLATIONS[cfg.interpolation]
    width, height = img.size
    if cfg.resize_mode == "squash":
        return _resize(img, (size, size), resample)
    if cfg.resize_mode == "longest":
        # open_clip's ResizeKeepRatio(longest=1): scale by the larger ratio, round half-even
        # (kept at least 1 pixel, where open_clip fails on a sliver that rounds to 0).
        ratio = max(height / size, width / size)
        img = _resize(img, (max(1, round(width / ratio)), max(1, round(height / ratio))), resample)
        return _center_crop_or_pad(img, size)
    # torchvision Resize(int): the short side becomes `size`, the long side is truncated.
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_wh = (size, new_long) if width <= height else (new_long, size)
    if size * new_long > MAX_INTERMEDIATE_PIXELS:
        # Resize only the source region that the centre crop keeps: memory bounded by the output.
        left = int(round((new_wh[0] - size) / 2.0))
        top = int(round((new_wh[1] - size) / 2.0))
        sx, sy = width / new_wh[0], height / new_wh[1]
        return img.resize((size, size), resample, box=(left * sx, top * sy, (left + size) * sx, (top + size) * sy))
    img = _resize(img, new_wh, resample)
    return _center_crop_or_pad(img, size)


@lru_cache(maxsize=16)
def _lookup_table(cfg: Preprocess) -> np.ndarray:
    """`[3, 256]` float32: each 8-bit value after ToTensor's `/255` and Normalize, computed
    with the same float32 operations torch does, so the result is bit-identical."""
    unit = np.arange(256, dtype=np.float32) / np.float32(255)
    mean = np.asarray(cfg.mean, dtype=np.float32)[:, None]
    std = np.asarray(cfg.std, dtype=np.float32)[:, None]
    return (unit[None, :] - mean) / std


def normalize(pixels: np.ndarray, cfg: Preprocess) -> np.ndarray:
    """uint8 `[S, S, 3]` RGB to the float32 `[3, S, S]` model input (ToTensor + Normalize)."""
    table = _lookup_table(cfg)
    return np.stack([table[c][pixels[:, :, c]] for c in range(3)])


def preprocess(img: Image.Image, cfg: Preprocess) -> np.ndarray:
    """`img` (any mode, mapped by `to_rgb`) as the model input: float32 `[3, S, S]`, S =
    `cfg.image_size`, equal to open_clip's eval transform (module docstring)."""
    return normalize(np.asarray(_resized(to_rgb(img), cfg)), cfg)


def decode_and_preprocess(path: Path | str, cfg: Preprocess,
                          max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str | None]:
    """(float32 `[3, S, S]` model input, the file's note or None); ImageError when unreadable."""
    decoded = decode_for(path, cfg, max_pixels)
    return preprocess(decoded.image, cfg), decoded.note


def decode_resized(path: Path | str, cfg: Preprocess,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str | None]:
    """(uint8 `[S, S, 3]` RGB after the resize and crop, the file's note or None): `preprocess` before its
    last step, so `normalize(pixels, cfg)` equals `decode_and_preprocess`'s array. A quarter of its bytes,
    for shipping decoded images between processes (the Ray path). Raises ImageError when unreadable."""
    decoded = decode_for(path, cfg, max_pixels)
    return np.asarray(_resized(to_rgb(decoded.image), cfg)), decoded.note


def load_and_preprocess(path: Path | str, cfg: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The model input of one file, float32 `[3, S, S]` (fast or exact per `cfg.exact`). Raises ImageError."""
    return decode_and_preprocess(path, cfg, max_pixels)[0]


# ---------------------------------------------------------------- batching


def default_workers() -> int:
    """Decoding threads: one per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class Batch:
    """`pixels[i]` is the input for `paths[i]` and `notes[i]` its note (or None); `errors` are
    the files of this stretch of the input that could not be decoded, with the message."""

    pixels: np.ndarray
    paths: list[Path]
    errors: list[tuple[Path, str]]
    notes: list[str | None] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)  # input position (0-based) of each of `paths`
    error_indices: list[int] = field(default_factory=list)  # input position of each of `errors`

    def in_input_order(self) -> list[tuple[int, int | None, str | None]]:
        """This stretch of the input in order: ``(input position, image row or None, error or None)``."""
        rows: list[tuple[int, int | None, str | None]] = [(pos, row, None) for row, pos in enumerate(self.indices)]
        rows += [(pos, None, message) for pos, (_, message) in zip(self.error_indices, self.errors)]
        return sorted(rows, key=lambda r: r[0])


def iter_batches(
    paths: Iterable[Path | str],
    cfg: Preprocess,
    batch_size: int,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    prefetch: int | None = None,
    decode: Callable[[Any], tuple[np.ndarray, str | None]] | None = None,
) -> Iterator[Batch]:
    """Decode and preprocess `paths` in a thread pool (`workers`, default one per core), running
    up to `prefetch` files (default two batches) ahead of the consumer, so that decoding
    overlaps the consumer's inference, and yield them in input order. `paths` is read lazily:
    memory is bounded by `prefetch` and one batch, not by the input's length.

    `decode`: how an item becomes (float32 `[3, S, S]`, note); it may raise ImageError (the item is
    then an error of its batch). Default: each item is a file, `decode_and_preprocess(Path(item))`.
    With `decode` the items are kept as given (`Batch.paths` holds them) and may be anything.

    Every batch but the last holds exactly `batch_size` decoded images, so an engine sees
    full batches; files that fail are reported in the batch whose stretch they fall in (never
    raised). The last batch may hold fewer images, or none and only errors. Raises UsageError
    when `batch_size` < 1.
    """
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, not {batch_size}")
    workers = workers or default_workers()
    ahead = max(prefetch or 2 * batch_size, workers)
    source = iter(paths)
    pending: deque[tuple[int, Any, Future[tuple[np.ndarray, str | None]]]] = deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edgeclip-decode")

    position = 0

    def top_up() -> None:
        nonlocal position
        while len(pending) < ahead:
            try:
                item = next(source)
            except StopIteration:
                return
            if decode is None:
                item = Path(item)
                future = pool.submit(decode_and_preprocess, item, cfg, max_pixels)
            else:
                future = pool.submit(decode, item)
            pending.append((position, item, future))
            position += 1

    def empty() -> Batch:
        return Batch(np.empty((0, 3, cfg.image_size, cfg.image_size), np.float32), [], [])

    try:
        top_up()
        batch, arrays = empty(), []
        while pending:
            index, path, future = pending.popleft()
            top_up()
            try:
                array, note = future.result()
                arrays.append(array)
                batch.paths.append(path)
                batch.notes.append(note)
                batch.indices.append(index)
            except ImageError as err:
                batch.errors.append((path, str(err)))
                batch.error_indices.append(index)
            if len(arrays) == batch_size:
                batch.pixels = np.stack(arrays)
                yield batch
                batch, arrays = empty(), []
        if arrays or batch.errors:
            if arrays:
                batch.pixels = np.stack(arrays)
            yield batch
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
