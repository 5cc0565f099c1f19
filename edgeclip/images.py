"""Decoding image files and turning them into CLIP input tensors, without torch.

`preprocess` reproduces open_clip's eval transform (`open_clip.image_transform(size,
is_train=False, ...)`: torchvision `Resize` of the shorter side with Pillow's filter,
`CenterCrop`, `ToTensor`, `Normalize`) to float32 rounding: the same size rounding, the
same crop offsets, the same float32 operations.

One deliberate difference: open_clip resizes the image in its file's mode and converts
to RGB afterwards; here `load_image` converts first. For RGB and grey ('L') files, all
the real data sets, the result is the same. For the rest it is better: a palette image is
resized with the bicubic filter rather than Pillow's forced nearest neighbour, and a
16-bit image is scaled to 8 bits instead of saturating to white.
"""

from __future__ import annotations

import os
import stat
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edgeclip.discover import display_path
from edgeclip.errors import BundleError, ImageError, UsageError

# Pillow's own limit: it warns above it and refuses anything above twice it, so a larger
# `max_pixels` cannot take effect without changing Pillow's global setting.
DEFAULT_MAX_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485

INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
RESIZE_MODES = ("shortest", "longest", "squash")


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes a `[3, image_size, image_size]` input; the manifest's `preprocess`."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1:
            raise UsageError(f"image_size must be a positive integer, not {self.image_size!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            try:
                floats = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise UsageError(f"{name} must be 3 numbers, not {value!r}") from None
            if len(floats) != 3 or not all(np.isfinite(floats)):
                raise UsageError(f"{name} must be 3 finite numbers, not {value!r}")
            object.__setattr__(self, name, floats)
        if min(self.std) <= 0:
            raise UsageError(f"std must be positive, not {self.std!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise UsageError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, not {self.interpolation!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise UsageError(f"resize_mode must be one of {list(RESIZE_MODES)}, not {self.resize_mode!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        """Read the manifest form; anything malformed is a BundleError."""
        if not isinstance(d, dict):
            raise BundleError(f"preprocess config must be a JSON object, not {type(d).__name__}")
        unknown = set(d) - {"image_size", "mean", "std", "interpolation", "resize_mode"}
        if unknown:
            raise BundleError(f"preprocess config has unknown keys {sorted(unknown)}")
        try:
            return cls(**d)
        except TypeError as err:  # a required key is missing
            raise BundleError(f"preprocess config is incomplete: {err}") from None
        except UsageError as err:
            raise BundleError(f"invalid preprocess config: {err}") from None


# ---------------------------------------------------------------- decoding


def _to_8bit(values: np.ndarray) -> np.ndarray:
    """16-bit samples (0..65535) to 8 bits, rounded."""
    wide = np.clip(values.astype(np.int64), 0, 65535)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` in RGB. Alpha is dropped as open_clip's `convert('RGB')` drops it; 16-bit
    and 32-bit integer grey ('I;16*', 'I') is read as 0..65535 and scaled, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode == "I" or img.mode.startswith("I;16"):
        return Image.fromarray(_to_8bit(np.asarray(img))).convert("RGB")
    if img.mode == "F":
        return img.convert("L").convert("RGB")
    return img.convert("RGB")


def _cause(err: BaseException) -> str:
    """A one-line reason for a decoding failure."""
    if isinstance(err, Image.DecompressionBombError):
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


def load_image(path: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `path` fully into an RGB image, EXIF orientation applied.

    Raises ImageError, naming the file and the cause, for a missing, empty, unreadable,
    unrecognised, truncated or corrupt file and for one of more than `max_pixels` pixels.
    """
    path = Path(path)

    def fail(cause: str) -> ImageError:
        return ImageError(f"cannot read image {display_path(path)}: {' '.join(cause.split())}")

    try:
        st = path.stat()
        if stat.S_ISDIR(st.st_mode):
            raise fail("is a directory")
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
            raise fail("not a regular file")
        if st.st_size == 0:
            raise fail("file is empty")
        with Image.open(path) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise fail(
                    f"image too large ({width}x{height} = {width * height} pixels, limit {max_pixels}), "
                    "refused as a possible decompression bomb"
                )
            img.load()
            return to_rgb(_oriented(img))
    except ImageError:
        raise
    except Exception as err:  # noqa: BLE001 - a decoder on untrusted input may raise anything
        raise fail(_cause(err)) from err


def _oriented(img: Image.Image) -> Image.Image:
    """`img` turned upright by its EXIF orientation; a copy, so it outlives the open file.
    Broken EXIF data does not make a decodable picture unusable: it is left as stored."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - malformed metadata in an otherwise good file
        return img.copy()


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


def _resized(img: Image.Image, cfg: PreprocessConfig) -> Image.Image:
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
    img = _resize(img, (size, new_long) if width <= height else (new_long, size), resample)
    return _center_crop_or_pad(img, size)


@lru_cache(maxsize=16)
def _lookup_table(cfg: PreprocessConfig) -> np.ndarray:
    """`[3, 256]` float32: each 8-bit value after ToTensor's `/255` and Normalize, computed
    with the same float32 operations torch does, so the result is bit-identical."""
    unit = np.arange(256, dtype=np.float32) / np.float32(255)
    mean = np.asarray(cfg.mean, dtype=np.float32)[:, None]
    std = np.asarray(cfg.std, dtype=np.float32)[:, None]
    return (unit[None, :] - mean) / std


def preprocess(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """`img` as the model input: float32 `[3, S, S]`, equal to open_clip's eval transform."""
    table = _lookup_table(cfg)
    pixels = np.asarray(_resized(to_rgb(img), cfg))  # [S, S, 3] uint8
    return np.stack([table[c][pixels[:, :, c]] for c in range(3)])


def load_and_preprocess(path: Path, cfg: PreprocessConfig, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    return preprocess(load_image(path, max_pixels), cfg)


# ---------------------------------------------------------------- batching


@dataclass
class Batch:
    """`pixels[i]` is the input for `paths[i]`; `errors` are the files of this stretch of
    the input that could not be decoded, with the message."""

    pixels: np.ndarray
    paths: list[Path]
    errors: list[tuple[Path, str]]


def iter_batches(
    paths: Iterable[Path | str],
    cfg: PreprocessConfig,
    batch_size: int,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    prefetch: int | None = None,
) -> Iterator[Batch]:
    """Decode and preprocess `paths` in a thread pool, running up to `prefetch` files
    (default two batches) ahead of the consumer, and yield them in input order.

    Every batch but the last holds exactly `batch_size` decoded images, so an engine sees
    full batches; files that fail are reported in the batch whose stretch they fall in.
    The last batch may hold fewer images, or none and only errors.
    """
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, not {batch_size}")
    workers = workers or min(4, os.cpu_count() or 1)
    ahead = max(prefetch or 2 * batch_size, workers)
    source = iter(paths)
    pending: deque[tuple[Path, Future[np.ndarray]]] = deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edgeclip-decode")

    def top_up() -> None:
        while len(pending) < ahead:
            try:
                path = Path(next(source))
            except StopIteration:
                return
            pending.append((path, pool.submit(load_and_preprocess, path, cfg, max_pixels)))

    def empty() -> Batch:
        return Batch(np.empty((0, 3, cfg.image_size, cfg.image_size), np.float32), [], [])

    try:
        top_up()
        batch, arrays = empty(), []
        while pending:
            path, future = pending.popleft()
            top_up()
            try:
                arrays.append(future.result())
                batch.paths.append(path)
            except ImageError as err:
                batch.errors.append((path, str(err)))
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
