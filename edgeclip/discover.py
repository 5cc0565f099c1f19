"""Finding the image files among the paths a user names: files as given, folders walked.

Inside folders a file is an image when its first bytes say so (the same 16-byte test Pillow
uses to pick a decoder, for every format this Pillow build and pillow-heif decode) or when
its name ends with an extension of such a format. So `scan.JPG`, `photo` and `x.png.bak` are
judged by content, and a broken `holiday.jpg` (empty, text, truncated, even a FIFO) is an
input whose decoding error is reported, never a file that silently vanishes. Everything
else in a folder is skipped and counted, with the reason; hidden entries (`.name`, which
includes macOS AppleDouble `._name` files) are ignored. Files named explicitly are always
inputs, image or not.

HEIC/HEIF (iPhone photos) are read through `pillow-heif`, a core dependency (it also reads
AVIF where Pillow lacks it); without it installed, such files are reported as unreadable.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageFile

HEADER_BYTES = 16  # what Image.open reads to choose a decoder
HEIF_EXTENSIONS = (".heic", ".heif", ".heics", ".heifs", ".hif", ".avif", ".avifs")
# Formats Pillow identifies but cannot decode here (no pixel decoder, or a stub handler).
_NOT_DECODABLE = {"MPEG", "BUFR", "GRIB", "HDF5", "WMF"}

_registered = False


def register_formats() -> None:
    """Register pillow-heif's HEIF opener (and its AVIF opener when Pillow lacks AVIF) with
    Pillow, once; a no-op when pillow-heif is not installed."""
    global _registered
    if _registered:
        return
    _registered = True
    try:
        import pillow_heif
    except ImportError:
        return
    pillow_heif.register_heif_opener()
    from PIL import features

    if not features.check("avif") and hasattr(pillow_heif, "register_avif_opener"):
        pillow_heif.register_avif_opener()


def display_path(path: Path | str | bytes) -> str:
    """`path` as printable text: bytes that are not UTF-8 are shown as `\\xNN` escapes."""
    text = os.fsdecode(path) if isinstance(path, bytes) else str(path)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _decodable_formats() -> set[str]:
    register_formats()
    Image.init()
    formats = {f for f, (factory, _) in Image.OPEN.items() if f not in _NOT_DECODABLE}
    formats = {f for f in formats if not (isinstance(Image.OPEN[f][0], type)
                                         and issubclass(Image.OPEN[f][0], ImageFile.StubImageFile))}
    if "EPS" in formats:
        from PIL import EpsImagePlugin

        if not EpsImagePlugin.has_ghostscript():
            formats.discard("EPS")
    return formats


_FORMATS: set[str] | None = None
_EXTENSIONS: set[str] | None = None


def _tables() -> tuple[set[str], set[str]]:
    global _FORMATS, _EXTENSIONS
    if _FORMATS is None or _EXTENSIONS is None:
        formats = _decodable_formats()
        extensions = {ext for ext, fmt in Image.registered_extensions().items() if fmt in formats}
        try:
            import pillow_heif  # noqa: F401 - HEIF names are images even where the module is missing

            extensions |= set(HEIF_EXTENSIONS)
        except ImportError:
            extensions |= set(HEIF_EXTENSIONS)
        _FORMATS, _EXTENSIONS = formats, extensions
    return _FORMATS, _EXTENSIONS


def has_image_extension(name: str | Path) -> bool:
    """True when `name` ends with the extension of a decodable image format (any case)."""
    return Path(name).suffix.lower() in _tables()[1]


_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1",
                b"avif", b"avis")


def looks_like_image(header: bytes) -> bool:
    """True when `header` (a file's first 16 bytes) starts like an image of a format that can be
    decoded here: Pillow's own `_accept` tests, plus HEIF/AVIF brands."""
    formats, _ = _tables()
    if len(header) >= 12 and header[4:8] == b"ftyp" and header[8:12] in _HEIF_BRANDS:
        return True
    for fmt in formats:
        accept = Image.OPEN[fmt][1]
        if accept is None:
            continue  # formats without a signature (TGA, ...) are recognised by extension
        try:
            if accept(header[:HEADER_BYTES]):
                return True
        except Exception:  # noqa: BLE001 - a plugin's test on a short header
            continue
    return False


def _reason(err: OSError) -> str:
    return (err.strerror or str(err)).lower()


@dataclass
class DiscoveryResult:
    """`images`: the inputs to decode, in order; `skipped`: files inside folders that are not
    images, with why; `missing`: named paths that do not exist, and entries found in folders
    that cannot be read (an unlistable folder, a broken link, a file that cannot be opened),
    with why. Each becomes an error row. `links`: symbolic links to folders found inside
    folders and not followed (``follow_links`` False)."""

    images: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    missing: list[tuple[Path, str]] = field(default_factory=list)
    links: list[Path] = field(default_factory=list)


def discover_images(paths: Iterable[Path | str | bytes], recursive: bool = True,
                    follow_links: bool = False) -> DiscoveryResult:
    """Expand `paths` into image files: each named file as is, each folder walked in sorted
    order (recursively unless `recursive` is False), hidden entries (`.name`) ignored.

    Every other entry under a folder lands in exactly one of `images` (recognised by content
    or extension), `skipped` (not an image), `missing` (cannot be read) or `links` (a symbolic
    link to a folder, not followed). A named path that is a link is followed. With
    `follow_links`, links to folders inside folders are followed too, each folder walked once
    (identified by device and inode, so link loops and bind-mount loops end). The walk is
    iterative: any depth of nesting is fine. A path that appears twice is returned once.
    """
    result = DiscoveryResult()
    seen: set[Path] = set()
    for raw in paths:
        path = Path(os.fsdecode(raw)) if isinstance(raw, bytes) else Path(raw)
        try:
            st = path.stat()
        except OSError as err:
            kind = "broken symbolic link" if path.is_symlink() else _reason(err)
            result.missing.append((path, kind))
            continue
        if stat.S_ISDIR(st.st_mode):
            found = _walk(path, (st.st_dev, st.st_ino), recursive, follow_links, result)
        else:
            found = iter([path])
        for image in found:
            if image not in seen:
                seen.add(image)
                result.images.append(image)
    return result


def _list(folder: Path, result: DiscoveryResult) -> list[os.DirEntry[str]] | None:
    """The entries of `folder` in name order; None (and a `missing` entry) when it cannot be listed."""
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as err:
        result.missing.append((folder, f"cannot list folder: {_reason(err)}"))
        return None


def _walk(top: Path, top_id: tuple[int, int], recursive: bool, follow_links: bool,
          result: DiscoveryResult) -> Iterator[Path]:
    """Depth-first, in name order, with an explicit stack (no recursion); a folder is entered
    at its place among its siblings, and only once per (device, inode)."""
    visited = {top_id}
    listing = _list(top, result)
    if listing is None:
        return
    stack: list[tuple[Path, Iterator[os.DirEntry[str]]]] = [(top, iter(listing))]
    while stack:
        folder, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        if entry.name.startswith("."):
            continue
        path = folder / entry.name
        try:
            is_link = entry.is_symlink()
            is_dir = entry.is_dir()  # follows symbolic links
            is_file = entry.is_file()
        except OSError as err:
            result.missing.append((path, _reason(err)))
            continue
        if is_dir:
            if not recursive:
                continue
            if is_link and not follow_links:
                result.links.append(path)
                continue
            try:
                st = entry.stat()  # follows a link
            except OSError as err:
                result.missing.append((path, _reason(err)))
                continue
            if (st.st_dev, st.st_ino) in visited:  # a link loop, or a second way into a folder
                continue
            visited.add((st.st_dev, st.st_ino))
            inner = _list(path, result)
            if inner is not None:
                stack.append((path, iter(inner)))
        elif is_link and not is_file:
            reason = "a link to something that is not a regular file" if os.path.exists(path) else "broken symbolic link"
            result.missing.append((path, reason))
        elif has_image_extension(entry.name):
            yield path  # named like an image: decoded, or reported as unreadable
        elif is_file:
            reason = _sniff(path)
            if reason is None:
                yield path
            elif reason.startswith("cannot read"):
                result.missing.append((path, reason))
            else:
                result.skipped.append((path, reason))
        else:
            result.skipped.append((path, "not a regular file"))


def _sniff(path: Path) -> str | None:
    """None when `path` starts like an image, else why it is skipped."""
    try:
        with open(path, "rb") as f:
            header = f.read(HEADER_BYTES)
    except OSError as err:
        return f"cannot read: {_reason(err)}"
    return None if looks_like_image(header) else "not an image"
