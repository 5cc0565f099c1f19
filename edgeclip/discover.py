"""Finding the image files among the paths a user names: files as given, folders walked.

Inside folders an image is recognised by its first bytes (the signatures of the formats
Pillow can decode here), never by its extension, so `scan.JPG`, `photo` and `x.png.bak`
are judged alike. Files named explicitly are always returned, image or not, so that the
decoder reports a clear error for each instead of the file vanishing silently.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import features

HEADER_BYTES = 16


def display_path(path: Path | str | bytes) -> str:
    """`path` as printable text: bytes that are not UTF-8 are shown as `\\xNN` escapes."""
    text = os.fsdecode(path) if isinstance(path, bytes) else str(path)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _is_ppm(h: bytes) -> bool:
    return len(h) >= 3 and h[0:1] == b"P" and h[1:2] in b"123456" and h[2:3].isspace()


def _signatures() -> list:
    """Tests on a file's first bytes, one per format this Pillow build decodes."""
    tests = [
        lambda h: h.startswith(b"\xff\xd8\xff"),  # JPEG, MPO
        lambda h: h.startswith(b"\x89PNG\r\n\x1a\n"),
        lambda h: h[:6] in (b"GIF87a", b"GIF89a"),
        lambda h: h.startswith(b"BM"),
        lambda h: h[:4] in (b"II*\x00", b"MM\x00*"),  # TIFF
        lambda h: h.startswith(b"\x00\x00\x01\x00"),  # ICO
        lambda h: h.startswith(b"qoif"),
        _is_ppm,
    ]
    if features.check("webp"):
        tests.append(lambda h: h[:4] == b"RIFF" and h[8:12] == b"WEBP")
    if features.check("jpg_2000"):
        tests.append(lambda h: h.startswith((b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  \r\n\x87\n")))
    if features.check("avif"):
        tests.append(lambda h: h[4:12] in (b"ftypavif", b"ftypavis"))
    return tests


_SIGNATURES = _signatures()


def looks_like_image(header: bytes) -> bool:
    """True when `header` (a file's first bytes) starts like an image Pillow can decode."""
    return any(test(header) for test in _SIGNATURES)


def _reason(err: OSError) -> str:
    return (err.strerror or str(err)).lower()


@dataclass
class DiscoveryResult:
    """`images`: the inputs to classify, in order; `skipped`: things inside folders left out,
    with why; `missing`: named paths that do not exist or cannot be listed, with why."""

    images: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    missing: list[tuple[Path, str]] = field(default_factory=list)


def discover_images(paths: Iterable[Path | str | bytes], recursive: bool = True) -> DiscoveryResult:
    """Expand `paths` into image files: each named file as is, each folder walked in sorted
    order (recursively unless `recursive` is False), hidden entries (`.name`) ignored.

    Symbolic links to folders are followed once each (a link loop is walked only once). A
    path that appears twice is returned once.
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
            found = _walk(path, recursive, result, visited=set())
        else:
            found = iter([path])
        for image in found:
            if image not in seen:
                seen.add(image)
                result.images.append(image)
    return result


def _walk(folder: Path, recursive: bool, result: DiscoveryResult, visited: set[str]) -> Iterator[Path]:
    real = os.path.realpath(folder)
    if real in visited:  # a symbolic link loop or a second link to the same folder
        return
    visited.add(real)
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as err:
        result.skipped.append((folder, f"cannot list folder: {_reason(err)}"))
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = folder / entry.name
        try:
            is_dir = entry.is_dir()  # follows symbolic links
            is_file = entry.is_file()
        except OSError as err:
            result.skipped.append((path, _reason(err)))
            continue
        if is_dir:
            if recursive:
                yield from _walk(path, recursive, result, visited)
        elif is_file:
            reason = _sniff(path)
            if reason is None:
                yield path
            else:
                result.skipped.append((path, reason))
        elif entry.is_symlink():
            result.skipped.append((path, "broken symbolic link"))
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
