"""Verification stamps: ``[size, mtime_ns, inode, sha256]`` per file of a version, kept outside the
bundle (``stamps_dir``) so readers never write into a bundle. A file whose stamp matches was hashed
before and has not changed since; a missing or unwritable cache only costs a re-hash."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping


def stamp_of(st: os.stat_result) -> list[int]:
    return [int(st.st_size), int(st.st_mtime_ns), int(st.st_ino)]


def stamps_dir() -> Path:
    """Where verification stamps live: ``$EDGECLIP_STAMPS_DIR``, else ``$XDG_CACHE_HOME/edgeclip/stamps``,
    else ``~/.cache/edgeclip/stamps``. Outside the bundle, so readers never write into a bundle and a
    read-only bundle keeps its stamps."""
    env = os.environ.get("EDGECLIP_STAMPS_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "edgeclip" / "stamps"


def stamps_path(root: Path | str, version: str) -> Path | None:
    """The stamp file of one version, keyed by the version folder's (device, inode): a copied or
    re-created bundle gets its own. None when the version folder cannot be read."""
    try:
        st = os.lstat(Path(root) / "versions" / version)
    except OSError:
        return None
    return stamps_dir() / f"{st.st_dev}-{st.st_ino}-{version}.json"


def read_stamps(root: Path, version: str) -> dict[str, list[Any]]:
    data = _read_json(stamps_path(root, version))
    return data if isinstance(data, dict) else {}


def write_stamps(root: Path, version: str, stamps: Mapping[str, list[Any]]) -> None:
    """Best effort: without a writable cache, files are simply hashed again on their next use."""
    _write_json(stamps_path(root, version), dict(stamps))


def _read_json(path: Path | None) -> Any:
    """The JSON value of a regular file in the stamps cache, or None (absent, not a regular file, damaged)."""
    try:
        if path is None or not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None


def _write_json(path: Path | None, value: Any) -> None:
    """Best effort: write ``value`` to ``path`` atomically (temp file, rename); OS errors are ignored."""
    if path is None:
        return
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(value, handle)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()


def _locations_path(sha256: str) -> Path | None:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        return None
    return stamps_dir() / "graphs" / f"{sha256}.json"


def read_graph_locations(sha256: str) -> list[str] | None:
    """The external-data locations of the graph whose content has this sha256, as recorded by
    ``write_graph_locations`` (a graph's locations are a function of its bytes), or None when not
    recorded. Lets a reader check a verified graph's locations without importing ``onnx``."""
    data = _read_json(_locations_path(sha256))
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        return None
    return data


def write_graph_locations(sha256: str, locations: Iterable[str]) -> None:
    """Best effort: record the external-data locations of the graph with content ``sha256``."""
    _write_json(_locations_path(sha256), sorted(set(locations)))
