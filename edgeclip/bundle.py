"""The model bundle: a versioned directory every stage reads and writes.

Layout::

    BUNDLE/
      CURRENT                 name of the active version ("v0003"), replaced atomically
      versions/v0001/         one complete version: manifest.json, *.safetensors, small files
      graphs/<sha256>.onnx    the shared graph store: immutable, content-named ONNX graphs and their
      graphs/<sha256>.data    external weights, each stored once per bundle (docs/EXPORT.md, "Graph store")
      .staging-*/             a version being written; never read, removed when stale
      .lock                   the writers' advisory lock (readers never take it)

A version's manifest names its graphs by role (``graphs/gated.onnx``, ``graphs/image_encoder.data``);
an entry with ``"blob": true`` lies in the store as ``graphs/<sha256><suffix>``. A stored graph's
external-data locations are plain names of ``.data`` files beside it in the store, every one of
which the version lists too, so stock ``onnx.load`` reads any graph of any version: no hard link,
no symlink, no ``..``.

A change never edits a version: it writes a complete new one in a staging folder, renames
it into ``versions/`` and only then replaces ``CURRENT``. A writer killed at any point
leaves the previous version loadable. Tensors are safetensors, metadata JSON; no pickle.

Concurrency: a writer takes the lock when it starts writing (``Bundle.new_version``) and keeps
it until CURRENT is switched. Its parent was read before, without the lock, so the writer checks
that CURRENT still names its parent, when it takes the lock and again at commit (compare and
swap): a writer that lost a race raises ``BundleError`` and changes nothing. Readers never block.

Containment: every file name in a manifest is a plain relative name (``edgeclip.manifest``); every
file is opened only after ``lstat`` showed a regular file reached through real folders (no symlink,
no device, no fifo). Error messages name bundle files by their manifest name only.

Fast open: ``Bundle.open`` reads the manifest and ``lstat``s the files (sizes). A file's content
is verified by sha256 the first time a command uses it (``Bundle.path``); a verified file gets a
stamp (size, mtime_ns, inode) in a cache outside the bundle (``stamps_dir``), and a later use
whose stamp matches skips the hash.
``Bundle.verify`` (``edgeclip verify``) hashes everything regardless of stamps.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from edgeclip.errors import BundleError
from edgeclip.layout import GRAPHS_DIR
from edgeclip.manifest import (
    SCHEMA_VERSION,
    VERSION_RE,
    Manifest,
    check_file_name,
    check_version_name,
    validate_manifest,
)
from edgeclip.version import __version__

MANIFEST = "manifest.json"
CURRENT = "CURRENT"
LOCK = ".lock"
_VERSION_RE = VERSION_RE
LOCK_WAIT_S = float(os.environ.get("EDGECLIP_LOCK_WAIT", "30"))  # how long a writer waits for the lock
_STALE_TMP_S = 120.0  # temporary files older than this are removed by the next writer
_FINITE_CHUNK = 1 << 24  # elements checked at a time by the finiteness check
GRAPH_STORE = GRAPHS_DIR  # BUNDLE/graphs/: the shared, content-named graph store
_STORED_RE = re.compile(r"^[0-9a-f]{64}\.(onnx|data)$")  # a file of the graph store
_STORE_TMP = ".tmp-"  # prefix of a store file being written (removed by the next writer)


def utc_now() -> str:
    """The current UTC time as ISO 8601 text, to the second (manifest timestamps)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def link_or_copy(src: Path | str, dst: Path | str) -> None:
    """A hard link where the file system allows, a copy otherwise. Safe for bundle files: versions
    are immutable and every writer unlinks a file before writing it."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


# --------------------------------------------------------------------------- errors and containment

_WRITE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
                 errno.EROFS: "it lies on a read-only file system", errno.EACCES: "permission denied",
                 errno.EPERM: "permission denied", errno.ENOTDIR: "a part of its path is a file, not a folder",
                 errno.EEXIST: "a file is in the way"}


def _io_error(root: Path, action: str, exc: OSError) -> BundleError:
    """One line for an OS error while using the bundle, without the path of the file involved."""
    reason = _WRITE_ERRNOS.get(exc.errno or 0, exc.strerror or type(exc).__name__)
    return BundleError(f"Cannot {action} the bundle {root}: {reason}.")


@contextlib.contextmanager
def _io_errors(root: Path, action: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise _io_error(root, action, exc) from exc


def _check_root(root: Path) -> None:
    """Refuse a bundle path that exists and is not a folder."""
    try:
        st = os.stat(root)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _io_error(root, "read", exc) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise BundleError(f"{root} is a file, not a bundle folder.")


def _safe_lstat(base: Path, rel: str, root: Path, label: str) -> os.stat_result:
    """lstat of ``base/rel`` after checking that ``base`` and every folder on the way are real
    folders (not symlinks) and the file a regular file. Raises BundleError naming only ``label``."""
    missing = f"Bundle {root} {label}: file '{rel}' is missing."
    path = base
    for part in Path(rel).parts[:-1]:
        path = path / part
        st = _lstat(path, root, missing)
        if not stat.S_ISDIR(st.st_mode):
            raise BundleError(f"Bundle {root} {label}: '{rel}' lies in '{part}', which is not a plain folder "
                              "(a symlink or a file); refusing it.")
    st = _lstat(base / rel, root, missing)
    if not stat.S_ISREG(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise BundleError(f"Bundle {root} {label}: file '{rel}' is {kind}; refusing it.")
    return st


def _lstat(path: Path, root: Path, missing: str) -> os.stat_result:
    """os.lstat, with BundleError(``missing``) for an absent path and a one-line error for any other OS error."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        raise BundleError(missing) from None
    except OSError as exc:
        raise _io_error(root, "read", exc) from exc


def _check_dir(path: Path, root: Path, what: str) -> None:
    st = _lstat(path, root, f"Bundle {root}: {what} is missing.")
    if not stat.S_ISDIR(st.st_mode):
        raise BundleError(f"Bundle {root}: {what} is not a plain folder (a symlink or a file); refusing it.")


def _check_finite_arrays(arrays: Mapping[str, np.ndarray], where: str) -> None:
    """BundleError naming the first tensor holding NaN or Inf (checked in chunks: no full-size copy)."""
    for key, value in arrays.items():
        arr = np.asarray(value)
        if arr.dtype.kind not in "fc":
            continue
        flat = arr.reshape(-1)
        for start in range(0, flat.size, _FINITE_CHUNK):
            if not np.isfinite(flat[start:start + _FINITE_CHUNK]).all():
                raise BundleError(f"{where}: tensor '{key}' holds non-finite values (NaN or Inf).")


# --------------------------------------------------------------------------- the writers' lock


@contextlib.contextmanager
def _writer_lock(root: Path, wait: float | None = None) -> Iterator[None]:
    """One writer at a time per bundle (advisory flock on ``.lock``; released when the process dies).

    The lock file is opened with O_NOFOLLOW and must be a regular file, so a planted symlink never
    makes edgeclip create or touch a file elsewhere. Waits up to ``wait`` seconds (default
    ``LOCK_WAIT_S``, env ``EDGECLIP_LOCK_WAIT``) for another writer, then raises BundleError."""
    import fcntl

    wait = LOCK_WAIT_S if wait is None else wait
    with _io_errors(root, "write"):
        root.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise BundleError(f"Bundle {root}: its {LOCK} is a symlink; refusing to use it.") from None
            raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BundleError(f"Bundle {root}: its {LOCK} is not a regular file; refusing to use it.")
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BundleError(f"Another edgeclip process is writing the bundle {root}; "
                                      "try again when it ends.") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _clean_temporary(root: Path) -> None:
    """Remove what killed writers left (staging folders, half-written CURRENT and stamp files,
    versions being pruned). Only called under the writer lock."""
    now = time.time()
    for stale in list(root.glob(".staging-*")) + list(root.glob(".trash-*")):
        shutil.rmtree(stale, ignore_errors=True)
    for tmp in root.glob(f".{CURRENT}.*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()
    for tmp in (root / GRAPH_STORE).glob(f"{_STORE_TMP}*"):  # graph-store files being written
        with contextlib.suppress(OSError):
            tmp.unlink()
    for tmp in stamps_dir().glob(".*.tmp"):  # killed stamp writers (any bundle's; old ones only)
        with contextlib.suppress(OSError):
            if now - tmp.lstat().st_mtime > _STALE_TMP_S:
                tmp.unlink()


# --------------------------------------------------------------------------- reading


def list_versions(root: Path) -> list[str]:
    """Complete versions in the bundle, oldest first."""
    vdir = Path(root) / "versions"
    if not vdir.is_dir():
        return []
    names = [p.name for p in vdir.iterdir() if _VERSION_RE.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(names, key=lambda n: int(n[1:]))


def current_version(root: Path) -> str:
    """The name CURRENT holds (a complete version); BundleError when there is no bundle at ``root``."""
    root = Path(root)
    _check_root(root)
    marker = root / CURRENT
    try:
        st = os.lstat(marker)
    except FileNotFoundError:
        if not root.exists():
            raise BundleError(f"No bundle at {root}. Create one with 'edgeclip init --bundle {root} ...'.") from None
        raise BundleError(f"{root} is not an edgeclip bundle (no {CURRENT} file).") from None
    except OSError as exc:
        raise _io_error(root, "read", exc) from exc
    if not stat.S_ISREG(st.st_mode) or st.st_size > 64:
        raise BundleError(f"Bundle {root}: {CURRENT} is not a small regular file; refusing it.")
    name = marker.read_text(encoding="utf-8", errors="replace").strip()
    if not _VERSION_RE.match(name):
        raise BundleError(f"Bundle {root}: {CURRENT} does not name a version.")
    if not (root / "versions" / name / MANIFEST).is_file():
        raise BundleError(f"Bundle {root}: {CURRENT} names '{name}', which is not a complete version.")
    return name


def weights_label(weights: Mapping[str, Any]) -> str:
    """Short text for reports of a manifest's `backbone.weights`: every output that used random
    weights says so."""
    ref = str(weights["ref"])
    if weights["kind"] == "random":
        return f"random weights (seed {ref})"
    if weights["kind"] == "tag":
        return f"pretrained '{ref}'"
    sha = weights.get("sha256")
    return f"checkpoint {Path(ref).name} (sha256 {sha[:12] if sha else '?'})"


def _stamp_of(st: os.stat_result) -> list[int]:
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


def _read_stamps(root: Path, version: str) -> dict[str, list[Any]]:
    path = stamps_path(root, version)
    try:
        if path is None or not stat.S_ISREG(os.lstat(path).st_mode):
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_stamps(root: Path, version: str, stamps: Mapping[str, list[Any]]) -> None:
    """Best effort: without a writable cache, files are simply hashed again on their next use."""
    path = stamps_path(root, version)
    if path is None:
        return
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(dict(stamps), handle)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()


@dataclass
class Bundle:
    """One loaded, validated version of a bundle (read-only).

    ``manifest`` is the manifest dict exactly as written; ``meta`` its typed form
    (``edgeclip.manifest.Manifest``). ``verify_hashes``: check each file's sha256 when it is first
    used (skipped when its stamp shows it was verified before and not changed since)."""

    root: Path
    version: str
    manifest: dict[str, Any]
    meta: Manifest | None = None
    verify_hashes: bool = True
    _verified: set[str] = field(default_factory=set, repr=False)
    _stamps: dict[str, list[Any]] | None = field(default=None, repr=False)

    @property
    def dir(self) -> Path:
        """This version's folder, ``ROOT/versions/<version>``."""
        return self.root / "versions" / self.version

    @property
    def label(self) -> str:
        """``"version vNNNN"``, for messages."""
        return f"version {self.version}"

    @classmethod
    def open(cls, root: Path | str, version: str | None = None, verify_hashes: bool = True) -> "Bundle":
        """Open ``version`` (default: CURRENT) of the bundle at ``root``: read and validate the
        manifest, check every file is a regular file of the recorded size. No content is read
        here; ``path`` verifies each file's hash on first use. Raises BundleError."""
        root = Path(root)
        _check_root(root)
        version = check_version_name(version) if version else current_version(root)
        _check_dir(root / "versions", root, "its versions folder")
        _check_dir(root / "versions" / version, root, f"version {version}")
        manifest, meta = _read_manifest(root, version)
        bundle = cls(root=root, version=version, manifest=manifest, meta=meta, verify_hashes=verify_hashes)
        bundle.validate(verify_hashes=False)
        return bundle

    # -- files -------------------------------------------------------------------------
    def _location(self, name: str) -> tuple[Path, str]:
        """(base folder, relative name) of a file of this version."""
        entry = self.manifest["files"].get(name)
        if entry is None:
            raise BundleError(f"Bundle version {self.version} has no file '{name}'.")
        if entry.get("blob"):
            stored = stored_path(self.root, name, entry)
            return stored.parent, stored.name
        return self.dir, name

    def path(self, name: str) -> Path:
        """Where a file of this version lies (graphs resolve into the shared graph store), after
        checking it is a regular file inside the bundle and, on first use, that its content
        matches the manifest's sha256. Raises BundleError."""
        base, rel = self._location(name)
        if name not in self._verified:
            st = self._check_file(name)
            if self.verify_hashes:
                self._verify_content(name, st)
            self._verified.add(name)
        return base / rel

    def has(self, name: str) -> bool:
        """Whether the manifest lists a file ``name`` (nothing is read or checked)."""
        return name in self.manifest["files"]

    def _check_file(self, name: str) -> os.stat_result:
        base, rel = self._location(name)
        if base != self.dir:
            _check_dir(base, self.root, "its graph store")
        st = _safe_lstat(base, rel, self.root, self.label)
        size = self.manifest["files"][name]["size"]
        if st.st_size != size:
            raise BundleError(
                f"Bundle {self.root} {self.label}: file '{name}' has {st.st_size} bytes, "
                f"expected {size} (truncated or replaced)."
            )
        return st

    def _verify_content(self, name: str, st: os.stat_result, use_stamp: bool = True) -> None:
        entry = self.manifest["files"][name]
        if self._stamps is None:
            self._stamps = _read_stamps(self.root, self.version)
        stamp = self._stamps.get(name)
        if use_stamp and isinstance(stamp, list) and stamp == [*_stamp_of(st), entry["sha256"]]:
            return
        base, rel = self._location(name)
        if sha256_of(base / rel) != entry["sha256"]:
            raise BundleError(
                f"Bundle {self.root} {self.label}: file '{name}' does not match its sha256 "
                "(corrupt or modified). Restore it or roll back with 'edgeclip rollback'."
            )
        self._stamps[name] = [*_stamp_of(st), entry["sha256"]]
        _write_stamps(self.root, self.version, self._stamps)

    def tensors(self, name: str, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Load a safetensors file of this version (only `keys`, when given: the rest is not read):
        shapes checked against the manifest, float tensors checked finite. Raises BundleError
        naming the file and tensor."""
        from safetensors import safe_open

        path = self.path(name)
        expected = self.manifest.get("tensors", {}).get(name, {})
        wanted = None if keys is None else list(dict.fromkeys(keys))
        try:
            with safe_open(str(path), framework="np") as handle:
                stored = set(handle.keys())
                names = sorted(stored) if wanted is None else [k for k in wanted if k in stored]
                arrays = {k: handle.get_tensor(k) for k in names}
        except Exception as exc:  # safetensors raises its own error types; it never unpickles
            raise BundleError(f"Bundle {self.root} {self.label}: cannot read tensors '{name}' "
                              f"({type(exc).__name__}: not a valid safetensors file).") from None
        if wanted is not None:
            expected = {k: v for k, v in expected.items() if k in wanted}
            for key in wanted:
                if key not in arrays:
                    raise BundleError(f"Bundle {self.root}: tensor '{key}' missing from '{name}'.")
        for key, shape in expected.items():
            if key not in arrays:
                raise BundleError(f"Bundle {self.root}: tensor '{key}' missing from '{name}'.")
            if list(arrays[key].shape) != list(shape):
                raise BundleError(
                    f"Bundle {self.root}: tensor '{key}' in '{name}' has shape {list(arrays[key].shape)}, "
                    f"the manifest says {list(shape)}."
                )
        _check_finite_arrays(arrays, f"Bundle {self.root} {self.label}, file '{name}'")
        return arrays

    def validate(self, verify_hashes: bool = True) -> None:
        """Every file a regular file inside the bundle with the recorded size; with
        ``verify_hashes`` also its sha256 (stamps honoured). Raises BundleError otherwise."""
        for name in self.manifest["files"]:
            st = self._check_file(name)
            if verify_hashes:
                self._verify_content(name, st)

    def verify(self) -> None:
        """Check everything in this version, ignoring stamps (``edgeclip verify``): every file's sha256
        (refreshing the stamps of what matched), every tensor file's shapes and finiteness (a file that
        is not safetensors, e.g. a pickle, is refused unread), and every graph's external-data
        locations (plain names of files beside it). Raises BundleError at the first problem."""
        for name in self.manifest["files"]:
            st = self._check_file(name)
            self._verify_content(name, st, use_stamp=False)
            self._verified.add(name)
        for name in self.manifest["files"]:
            if name.endswith(".safetensors"):
                self.tensors(name)  # shapes against the manifest, finite values
            elif name.endswith(".onnx"):
                self._check_graph_locations(name)

    def _check_graph_locations(self, name: str) -> None:
        import onnx

        path = self.path(name)
        try:
            graph = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # onnx raises DecodeError and others for a damaged file
            raise BundleError(f"Bundle {self.root} {self.label}: graph '{name}' cannot be read: {type(exc).__name__}") from None
        for tensor in _external_tensors(graph.graph):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if not location or "/" in location or "\\" in location or location.startswith(".") \
                    or not (path.parent / location).is_file():
                raise BundleError(f"Bundle {self.root} {self.label}: graph '{name}' refers to external data "
                                  f"{location[:60]!r}, which is not a file beside it; refusing the graph.")

    # -- facts used everywhere -----------------------------------------------------------
    @property
    def tasks(self) -> list[dict[str, Any]]:
        """The manifest's task records, in learning order (``[]`` before the first add-task)."""
        return self.manifest.get("tasks", [])

    @property
    def method(self) -> str:
        """The learner's name: ``rail-primal``, ``rail-dual`` or ``moe``."""
        return self.manifest["method"]["name"]

    @property
    def learned_classes(self) -> list[str]:
        """The learned label space: every task's classes, in task order."""
        return [c for task in self.tasks for c in task["classes"]]

    @property
    def weights_label(self) -> str:
        """Short text naming the backbone weights (``bundle.weights_label``); says when they are random."""
        return weights_label(self.manifest["backbone"]["weights"])

    @property
    def random_weights(self) -> bool:
        """True when the backbone has seeded random weights (results then mean nothing about CLIP)."""
        return self.manifest["backbone"]["weights"]["kind"] == "random"

    def new_version(self) -> "VersionWriter":
        """Start writing the next version, inheriting every file of this one. Raises BundleError
        when another writer holds the bundle or CURRENT moved away from this version."""
        return VersionWriter(self.root, parent=self)


def stored_path(root: Path, name: str, entry: Mapping[str, Any]) -> Path:
    """The graph-store file of a manifest entry with ``"blob": true``: ``root/graphs/<sha256><suffix>``.
    Raises BundleError for an entry that is not a store file (bad hash or suffix)."""
    stored = f"{entry.get('sha256')}{Path(name).suffix}"
    if not _STORED_RE.match(stored):
        raise BundleError(f"Bundle {root}: file '{name}' is marked as a shared graph but '{stored}' is not a "
                          "graph-store name (<sha256>.onnx or <sha256>.data).")
    return Path(root) / GRAPH_STORE / stored


def _external_tensors(graph: Any) -> Iterator[Any]:
    """Every tensor of an onnx GraphProto (initialisers and attribute tensors, subgraphs included)
    whose data is external."""
    from onnx import AttributeProto, TensorProto

    def walk(g: Any) -> Iterator[Any]:
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.type == AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == AttributeProto.TENSORS:
                    yield from attr.tensors
                elif attr.type == AttributeProto.GRAPH:
                    yield from walk(attr.g)
                elif attr.type == AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        yield from walk(sub)

    for tensor in walk(graph):
        if tensor.data_location == TensorProto.EXTERNAL:
            yield tensor


def _read_manifest(root: Path, version: str) -> tuple[dict[str, Any], Manifest]:
    vdir = root / "versions" / version
    label = f"version {version}"
    _check_dir(root / "versions", root, "its versions folder")
    _check_dir(vdir, root, label)
    try:
        st = os.lstat(vdir / MANIFEST)
    except FileNotFoundError:
        raise BundleError(f"Bundle {root} {label} has no {MANIFEST}.") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"Bundle {root} {label}: {MANIFEST} is not a regular file; refusing it.")

    def refuse_constant(token: str) -> Any:
        raise ValueError(f"non-finite number {token}")

    try:
        manifest = json.loads((vdir / MANIFEST).read_text(encoding="utf-8"), parse_constant=refuse_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"Bundle {root} {label}: {MANIFEST} is not valid JSON ({exc}); the version is corrupt.") from None
    schema = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if schema != SCHEMA_VERSION:
        raise BundleError(
            f"Bundle {root} {label}: {MANIFEST} has schema version {schema!r}; this edgeclip ({__version__}) reads "
            f"schema {SCHEMA_VERSION}. Upgrade edgeclip or re-create the bundle."
        )
    try:
        meta = validate_manifest(manifest)
    except BundleError as exc:
        raise BundleError(f"Bundle {root} {label}: {exc}") from None
    return manifest, meta


# --------------------------------------------------------------------------- writing


class VersionWriter:
    """Writes one new version in a staging folder; ``commit`` makes it current atomically.

    Use as a context manager: leaving the block without an exception commits, an exception
    discards the staging folder and the current version stays as it was. Holds the writer lock
    from construction to commit or abort; refuses (BundleError) when CURRENT is no longer the
    parent's version, at construction and at commit.
    """

    def __init__(self, root: Path | str, parent: Bundle | None = None, manifest: dict[str, Any] | None = None,
                 final_root: Path | None = None):
        """Take the writer lock and stage a version inheriting ``parent``'s files (hard links),
        or starting from ``manifest`` (``create_bundle``). Raises BundleError when another writer
        holds the lock, CURRENT no longer names ``parent``, or the bundle cannot be written."""
        self.root = Path(root)
        self.final_root = final_root  # init: the staged bundle folder is renamed there at commit
        self.parent = parent
        self.manifest: dict[str, Any] = copy.deepcopy(parent.manifest if parent else (manifest or {}))
        self._files: dict[str, dict[str, Any]] = dict(self.manifest.get("files", {}))
        self._tensor_shapes: dict[str, dict[str, list[int]]] = dict(self.manifest.get("tensors", {}))
        self._inherited: dict[str, int] = {}  # name -> inode of the hard link to the parent's file
        self._lock = _writer_lock(self.root)
        self._lock.__enter__()
        self._locked = True
        try:
            self._check_parent_is_current()
            with _io_errors(self.root, "write"):
                _clean_temporary(self.root)
                self.staging = self.root / f".staging-{uuid.uuid4().hex[:12]}"
                self.staging.mkdir(parents=True)
            if parent is not None:
                for name, entry in self._files.items():
                    if not entry.get("blob"):
                        self._inherit(parent, name)
        except BaseException:
            if hasattr(self, "staging"):
                shutil.rmtree(self.staging, ignore_errors=True)
            self._release()
            raise

    def __enter__(self) -> "VersionWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
            return
        self.abort()
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
            raise _io_error(self.final_root or self.root, "write", exc) from exc

    def _release(self) -> None:
        if self._locked:
            self._locked = False
            self._lock.__exit__(None, None, None)

    def _check_parent_is_current(self) -> None:
        if self.parent is None:
            return
        now = current_version(self.root)
        if now != self.parent.version:
            raise BundleError(
                f"The bundle {self.root} changed while this command ran: it started from {self.parent.version}, "
                f"and another command has since made {now} current. Nothing was written; run the command again."
            )

    def _inherit(self, parent: Bundle, name: str) -> None:
        src = parent.path(name)  # checked regular, inside the bundle, content verified (or stamped)
        dst = self.staging / name
        with _io_errors(self.root, "write"):
            dst.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(src, dst)
            st = os.lstat(dst)
        if st.st_ino == os.lstat(src).st_ino:
            self._inherited[name] = st.st_ino

    def _target(self, name: str) -> Path:
        check_file_name(name)
        target = self.staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            target.unlink()  # never write through a hard link into the parent version
        self._inherited.pop(name, None)
        return target

    def writable_path(self, name: str) -> Path:
        """A path in the new version for a file another tool writes itself (e.g. onnx.save).
        Raises BundleError on a bad file name."""
        target = self._target(name)
        self._files[name] = {"blob": False}
        return target

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``data`` as file ``name`` of the new version. Raises BundleError on a bad file name."""
        target = self._target(name)
        target.write_bytes(data)
        self._files[name] = {"blob": False}

    def write_file(self, name: str, src: Path | str) -> None:
        """Copy the file ``src`` in as ``name`` of the new version. Raises BundleError on a bad file name."""
        shutil.copyfile(src, self._target(name))
        self._files[name] = {"blob": False}

    def write_json(self, name: str, data: Any) -> None:
        """Write ``data`` as UTF-8 JSON file ``name`` (indented; NaN/Inf raise ValueError)."""
        self.write_bytes(name, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False).encode("utf-8"))

    def write_tensors(self, name: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Write a safetensors file; refuses (BundleError, nothing written) a float tensor holding
        NaN or Inf."""
        from safetensors.numpy import save_file

        clean = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        _check_finite_arrays(clean, f"Refusing to write '{name}' into the bundle {self.final_root or self.root}")
        save_file(clean, str(self._target(name)))
        self._files[name] = {"blob": False}
        self._tensor_shapes[name] = {k: list(v.shape) for k, v in clean.items()}

    # -- the shared graph store -----------------------------------------------------------
    def write_graph(self, name: str, src: Path | str, move: bool = False) -> None:
        """Put an ONNX graph and its external-data files into the shared graph store as this version's
        file ``name`` (e.g. ``graphs/gated.onnx``).

        ``src``'s external-data locations must be plain file names beside it (no folder, no ``..``).
        Each data file is stored once as ``graphs/<sha256>.data`` and listed as ``graphs/<location>``;
        a location that already is a store file (a symlink into the store, as in ``graph_folder``) is
        reused without copying. The graph, its locations rewritten to those names, is stored as
        ``graphs/<sha256>.onnx``. ``move``: data files are moved into the store (a symlink to the store
        file is left behind) and ``src`` is removed. Store files are written to a temporary name,
        fsynced and renamed: never edited, never hard-linked. Raises BundleError for a bad location
        or a missing data file.
        """
        import onnx

        src = Path(src)
        self._check_graph_name(name)
        try:
            model = onnx.load(str(src), load_external_data=False)
        except Exception as exc:
            raise BundleError(f"cannot read the graph {src.name} to store it as '{name}': {exc}") from exc
        stored: dict[str, str] = {}
        for tensor in _external_tensors(model.graph):
            info = {e.key: e.value for e in tensor.external_data}
            location = info.get("location", "")
            if location not in stored:
                stored[location] = self._store_data(name, src.parent, location, move)
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = stored[location]
        payload = model.SerializeToString()
        digest = hashlib.sha256(payload).hexdigest()
        self._store_bytes(f"{digest}.onnx", payload)
        if move:
            src.unlink(missing_ok=True)
        self._set_stored(name, digest, len(payload))

    @contextlib.contextmanager
    def graph_folder(self) -> Iterator[Path]:
        """A scratch folder holding this version's graphs under their own names, for exporters that
        read and write graphs by name in one folder (``edgeclip.export``): each ``.onnx`` is a copy
        whose external-data locations name the version's data files (``image_encoder.data``), each
        data file a symlink into the store. Replace a file (unlink or rename over it), never write
        through it. On leaving the block without an exception, every ``.onnx`` file that is new or
        changed is stored with ``write_graph`` (new data moved into the store), then the folder is
        removed. Graphs that an older edgeclip kept as version files are moved into the store too.

        Read external data through the symlinks with plain file reads only: onnx and onnxruntime
        refuse symlinked external data (copy the files, as ``quantize`` does).
        """
        import onnx

        work = Path(tempfile.mkdtemp(prefix=".graphs-", dir=self.staging))
        try:
            mine = {n: e for n, e in self._files.items() if n.startswith(f"{GRAPH_STORE}/") and n.count("/") == 1}
            logical = {e["sha256"]: Path(n).name for n, e in sorted(mine.items()) if e.get("blob") and n.endswith(".data")}
            untouched: dict[str, tuple[int, int]] = {}
            for name in mine:
                source, view = self.staged_path(name), work / Path(name).name
                if name.endswith(".onnx"):
                    model = onnx.load(str(source), load_external_data=False)
                    for tensor in _external_tensors(model.graph):
                        for entry in tensor.external_data:
                            if entry.key == "location" and _STORED_RE.match(entry.value):
                                entry.value = logical.get(entry.value[:-len(".data")], entry.value)
                    view.write_bytes(model.SerializeToString())
                    if mine[name].get("blob"):  # a version file of an older layout is moved to the store
                        stat = view.stat()
                        untouched[view.name] = (stat.st_ino, stat.st_mtime_ns)
                    continue
                try:
                    os.symlink(source.resolve(), view)
                except OSError:  # pragma: no cover - no symlinks (Windows without privilege)
                    shutil.copyfile(source, view)
            yield work
            for path in sorted(work.glob("*.onnx")):
                stat = path.stat()
                if path.is_symlink() or untouched.get(path.name) == (stat.st_ino, stat.st_mtime_ns):
                    continue
                self.write_graph(f"{GRAPH_STORE}/{path.name}", path, move=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _check_graph_name(self, name: str) -> None:
        parts = Path(name).parts
        if len(parts) != 2 or parts[0] != GRAPH_STORE or Path(name).suffix not in (".onnx", ".data"):
            raise BundleError(f"A shared graph must be named '{GRAPH_STORE}/<file>.onnx|.data', not '{name}'.")

    def _store_dir(self) -> Path:
        store = self.root / GRAPH_STORE
        store.mkdir(parents=True, exist_ok=True)
        return store

    def _set_stored(self, name: str, digest: str, size: int) -> None:
        self._files[name] = {"blob": True, "sha256": digest, "size": int(size)}
        self._tensor_shapes.pop(name, None)
        staged = self.staging / name
        if staged.is_file() or staged.is_symlink():
            staged.unlink()  # a version file of an older layout, now in the store
            with contextlib.suppress(OSError):
                staged.parent.rmdir()  # when it was the last one

    def _store_data(self, graph: str, folder: Path, location: str, move: bool) -> str:
        """Store one external-data file of a graph; returns its store name ``<sha256>.data``."""
        if not location or location != Path(location).name or location in (".", "..") or "\\" in location:
            raise BundleError(f"Graph '{graph}': external-data location {location!r} is not a plain file name "
                              "beside the graph.")
        path = folder / location
        if not path.is_file():
            raise BundleError(f"Graph '{graph}': its external data '{location}' is missing.")
        store = self._store_dir()
        real = path.resolve()
        if real.parent == store.resolve() and _STORED_RE.match(real.name) and real.suffix == ".data":
            digest, size = real.stem, real.stat().st_size  # already in the store (immutable)
        else:
            digest, size = sha256_of(path), path.stat().st_size
            dst = store / f"{digest}.data"
            if not dst.exists():
                tmp = store / f"{_STORE_TMP}{uuid.uuid4().hex}"
                if move and not path.is_symlink() and path.stat().st_nlink == 1:
                    try:
                        os.replace(path, tmp)
                    except OSError:  # another file system
                        shutil.copyfile(path, tmp)
                else:
                    shutil.copyfile(path, tmp)
                self._seal(tmp, dst)
            if move:
                path.unlink(missing_ok=True)
                try:
                    os.symlink(dst.resolve(), path)  # later graphs of the folder reuse the stored file
                except OSError:  # pragma: no cover
                    shutil.copyfile(dst, path)
        if not _STORED_RE.match(location):
            self._set_stored(f"{GRAPH_STORE}/{location}", digest, size)
        elif not any(e.get("blob") and e.get("sha256") == digest for e in self._files.values()):
            self._set_stored(f"{GRAPH_STORE}/{location}", digest, size)
        return f"{digest}.data"

    def _store_bytes(self, stored: str, payload: bytes) -> None:
        dst = self._store_dir() / stored
        if dst.exists():
            return
        tmp = dst.with_name(f"{_STORE_TMP}{uuid.uuid4().hex}")
        tmp.write_bytes(payload)
        self._seal(tmp, dst)

    @staticmethod
    def _seal(tmp: Path, dst: Path) -> None:
        """fsync a finished store file, make it world-readable and rename it to its content name."""
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        tmp.chmod(0o644)  # onnx creates data files private; the other bundle files are world-readable
        os.replace(tmp, dst)
        _fsync_path(dst.parent)

    def remove(self, name: str) -> None:
        """Drop file ``name`` (and its tensor shapes) from the new version; no error when it is absent."""
        self._files.pop(name, None)
        self._tensor_shapes.pop(name, None)
        self._inherited.pop(name, None)
        path = self.staging / name
        if path.exists():
            path.unlink()

    def staged_path(self, name: str) -> Path:
        """Where a file of the new version lies now (for reading back what was written).
        Raises BundleError when the new version has no such file."""
        entry = self._files.get(name)
        if entry is None:
            raise BundleError(f"The new version has no file '{name}'.")
        if entry.get("blob"):
            return stored_path(self.root, name, entry)
        return self.staging / name

    def _finalise_files(self) -> tuple[dict[str, dict[str, Any]], dict[str, list[Any]]]:
        """The file table of the new version and the stamps of its files. A file still hard-linked
        to the parent's verified file keeps the parent's hash (not re-read); others are hashed."""
        table, stamps = {}, {}
        for name, entry in sorted(self._files.items()):
            if entry.get("blob"):
                table[name] = entry
                continue
            path = self.staging / name
            try:
                st = _safe_lstat(self.staging, name, self.root, "new version")
            except BundleError:
                raise BundleError(f"The new version lost its file '{name}' while being written.") from None
            inherited = self._inherited.get(name)
            if inherited is not None and inherited == st.st_ino and self.parent is not None:
                parent_entry = self.parent.manifest["files"][name]
                table[name] = {"blob": False, "sha256": parent_entry["sha256"], "size": parent_entry["size"]}
            else:
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
                table[name] = {"blob": False, "sha256": sha256_of(path), "size": st.st_size}
            stamps[name] = [*_stamp_of(st), table[name]["sha256"]]
        return table, stamps

    def commit(self) -> Bundle:
        """Make the staged version current; BundleError (nothing changed) when the manifest is
        invalid, the disk refuses, or another writer moved CURRENT."""
        try:
            self._check_parent_is_current()
            versions = list_versions(self.root)
            all_dirs = [p.name for p in (self.root / "versions").glob("v*")] if (self.root / "versions").is_dir() else []
            numbers = [int(n[1:]) for n in all_dirs if _VERSION_RE.match(n)] + [int(v[1:]) for v in versions]
            name = f"v{(max(numbers) + 1 if numbers else 1):04d}"
            files, stamps = self._finalise_files()
            self.manifest.update(
                schema_version=SCHEMA_VERSION,
                edgeclip_version=__version__,
                version=name,
                parent=self.parent.version if self.parent else None,
                created_at=utc_now(),
                files=files,
                tensors={k: v for k, v in self._tensor_shapes.items() if k in self._files},
            )
            self.manifest.setdefault("bundle_created_at", self.manifest["created_at"])
            meta = validate_manifest(self.manifest)
            text = json.dumps(self.manifest, indent=2, ensure_ascii=False, allow_nan=False)
            with _io_errors(self.final_root or self.root, "write"):
                manifest_path = self.staging / MANIFEST
                manifest_path.write_text(text, encoding="utf-8")
                _fsync_path(manifest_path)
                (self.root / "versions").mkdir(exist_ok=True)
                final = self.root / "versions" / name
                os.replace(self.staging, final)
                _fsync_path(final.parent)
                _write_atomic_text(self.root / CURRENT, name + "\n")
            _write_stamps(self.root, name, stamps)
            keep = int((self.manifest.get("retention") or {}).get("keep", 0) or 0)
            if keep and self.final_root is None:
                with contextlib.suppress(OSError, BundleError):
                    _prune_locked(self.root, keep)
            root = self.root
            if self.final_root is not None:
                root = self._move_into_place()
        except BaseException:
            self.abort()
            raise
        self._release()
        return Bundle(root=root, version=name, manifest=self.manifest, meta=meta)

    def _move_into_place(self) -> Path:
        """init: rename the complete staged bundle onto its final (absent or empty) folder."""
        final = self.final_root
        assert final is not None
        try:
            os.rename(self.root, final)
        except OSError as exc:
            shutil.rmtree(self.root, ignore_errors=True)
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise BundleError(f"{final} was filled by another process while the bundle was being made; "
                                  "nothing was written.") from None
            raise _io_error(final, "create", exc) from exc
        with contextlib.suppress(OSError):
            _fsync_path(final.parent)
        return final

    def abort(self) -> None:
        """Discard the new version (its staging folder; a new bundle's folder too) and release the lock."""
        if hasattr(self, "staging"):
            shutil.rmtree(self.staging, ignore_errors=True)
        if self.final_root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
        self._release()


_OWN_LEFTOVERS = (LOCK, ".stamps")  # what an older, interrupted init may leave in a bundle folder


def create_bundle(root: Path | str, manifest: dict[str, Any]) -> VersionWriter:
    """Start the first version of a new bundle at ``root`` (absent or an empty folder).

    Atomic: the bundle is written in a hidden sibling folder (``.<name>.init-<pid>-*``) and renamed
    onto ``root`` at commit, so an interrupted init leaves no bundle folder (its leftovers are removed
    by the next init). Raises BundleError for an invalid manifest, a ``root`` that is a file, holds
    a bundle or is not empty, or a parent folder that cannot be written."""
    root = Path(root)
    _check_root(root)
    if (root / CURRENT).exists():
        raise BundleError(f"{root} already holds a bundle; choose another folder or delete it first.")
    manifest = dict(manifest)
    manifest.setdefault("tasks", [])
    manifest.setdefault("files", {})
    validate_manifest(manifest, complete=False)
    if root.exists():
        entries = list(root.iterdir())
        if any(p.name not in _OWN_LEFTOVERS and not p.name.startswith(".staging-") for p in entries):
            raise BundleError(f"{root} exists and is not empty; give an empty or new folder for the bundle.")
        with _io_errors(root, "create"):
            for p in entries:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    parent = root.absolute().parent
    with _io_errors(root, "create"):
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(f".{root.name}.init-*"):
            pid = stale.name.split("-")[-2] if stale.name.count("-") >= 2 else ""
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        temp = parent / f".{root.name}.init-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        temp.mkdir()
    try:
        return VersionWriter(temp, parent=None, manifest=manifest, final_root=root)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def rollback(root: Path | str, to: str | None = None) -> str:
    """Make an earlier version current (the parent of the current one unless ``to`` is given).
    Holds the writer lock; a writer that started from the version replaced here will refuse at its
    commit. Raises BundleError."""
    root = Path(root)
    now = current_version(root)
    with _writer_lock(root):
        now = current_version(root)
        if to is None:
            parent = _read_manifest(root, now)[0].get("parent")
            if not parent:
                raise BundleError(f"Version {now} of {root} is the first one; there is nothing to roll back to.")
            to = parent
        check_version_name(to)
        if to not in list_versions(root):
            raise BundleError(f"Bundle {root} has no complete version '{to}'. Versions: {', '.join(list_versions(root))}")
        Bundle.open(root, to).validate()  # refuse to switch to a damaged version
        with _io_errors(root, "write"):
            _write_atomic_text(root / CURRENT, to + "\n")
    return to


# --------------------------------------------------------------------------- history, retention, size


def _lineage(root: Path, start: str, limit: int) -> list[str]:
    """``start`` and its ancestors, newest first, at most ``limit``."""
    chain, name = [], start
    while name and len(chain) < limit and name not in chain:
        chain.append(name)
        try:
            name = _read_manifest(root, name)[0].get("parent")
        except BundleError:
            break
    return chain


def _prune_locked(root: Path, keep: int) -> list[str]:
    kept = set(_lineage(root, current_version(root), max(1, keep)))
    removed = []
    for name in list_versions(root):
        if name in kept:
            continue
        stamps = stamps_path(root, name)
        trash = root / f".trash-{uuid.uuid4().hex[:12]}"
        os.rename(root / "versions" / name, trash)  # atomic: readers see the version whole or not at all
        shutil.rmtree(trash, ignore_errors=True)
        if stamps is not None:
            with contextlib.suppress(OSError):
                stamps.unlink()
        removed.append(name)
    if removed:
        _collect_graph_store(root)
    return removed


def _collect_graph_store(root: Path) -> list[str]:
    """Remove graph-store files no remaining version refers to (under the writer lock: no writer is
    adding files, and every kept version's files stay). Returns the removed file names."""
    referenced = set()
    for name in list_versions(root):
        manifest = _read_manifest(root, name)[0]
        referenced |= {stored_path(root, f, e).name for f, e in manifest["files"].items() if e.get("blob")}
    store = root / GRAPH_STORE
    removed = []
    if store.is_dir() and not store.is_symlink():
        for path in store.iterdir():
            if _STORED_RE.match(path.name) and path.name not in referenced:
                path.unlink()
                removed.append(path.name)
    return removed


def prune(root: Path | str, keep: int | None = None) -> list[str]:
    """Remove every version except the current one and its ``keep - 1`` nearest ancestors (``keep``
    default: the manifest's ``retention.keep``, else 1). Versions off the current line (left behind
    by a rollback) are removed too. Returns the removed names, oldest first. Raises BundleError."""
    root = Path(root)
    if keep is None:
        keep = int(Bundle.open(root, verify_hashes=False).manifest.get("retention", {}).get("keep", 0) or 0) or 1
    if keep < 1:
        raise BundleError("--keep must be at least 1 (the current version is always kept).")
    current_version(root)  # a bundle is there (never create a folder by locking it)
    with _writer_lock(root), _io_errors(root, "prune"):
        return _prune_locked(root, keep)


def disk_usage(root: Path | str) -> int:
    """Bytes the bundle folder takes on disk (allocated blocks, each hard-linked file counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(folder, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def version_history(root: Path | str) -> list[dict[str, Any]]:
    """One record per complete version, oldest first: ``version``, ``parent``, ``created_at``,
    ``tasks`` (names), ``current`` (bool), ``size`` (bytes of its files) and ``own`` (bytes of the
    files no other version shares with it: what removing it frees). Damaged versions get ``error``."""
    root = Path(root)
    now = current_version(root)
    records, owners = [], {}
    for name in list_versions(root):
        record: dict[str, Any] = {"version": name, "current": name == now}
        try:
            manifest = _read_manifest(root, name)[0]
        except BundleError as exc:
            record["error"] = str(exc)
            records.append(record)
            continue
        inodes = set()
        for fname, entry in manifest["files"].items():
            with contextlib.suppress(OSError, BundleError):
                path = stored_path(root, fname, entry) if entry.get("blob") else root / "versions" / name / fname
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode):
                    inodes.add((st.st_ino, st.st_size))
        for key in inodes:
            owners.setdefault(key, set()).add(name)
        record.update(parent=manifest.get("parent"), created_at=manifest.get("created_at"),
                      tasks=[t["name"] for t in manifest.get("tasks", [])],
                      size=sum(e.get("size", 0) for e in manifest["files"].values()), _inodes=inodes)
        records.append(record)
    for record in records:
        inodes = record.pop("_inodes", set())
        record["own"] = sum(size for key in inodes for size in [key[1]] if owners[key] == {record["version"]})
    return records


def verify_bundle(root: Path | str, versions: list[str] | None = None) -> list[tuple[str, str]]:
    """Hash every file of every (or the given) version. Returns (version, problem) pairs; empty
    when all is intact."""
    root = Path(root)
    problems = []
    try:
        current_version(root)  # CURRENT must name a complete version
    except BundleError as exc:
        problems.append(("CURRENT", str(exc)))
    for name in versions or list_versions(root):
        try:
            Bundle.open(root, name).verify()
        except BundleError as exc:
            problems.append((name, str(exc)))
    return problems


def set_retention(root: Path | str, keep: int) -> Bundle:
    """Record ``keep`` (0: keep all) as the bundle's retention setting, in a new version with the
    same files (hard links, hashes reused), then prune to it. Returns the new current version."""
    if keep < 0:
        raise BundleError("--keep must be 0 (keep all) or more.")
    bundle = Bundle.open(root)
    with bundle.new_version() as writer:
        writer.manifest["retention"] = {"keep": int(keep)}
    return Bundle.open(root)


def format_size(n_bytes: int) -> str:
    """Bytes as text for reports: ``12.3 MB`` (decimal units)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"
