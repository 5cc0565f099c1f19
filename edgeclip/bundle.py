"""The model bundle: a versioned directory every stage reads and writes.

Layout::

    BUNDLE/
      CURRENT                 name of the active version ("v0003"), replaced atomically
      versions/v0001/         one complete version: manifest.json, *.safetensors, small files
      graphs/<sha256>.onnx    the shared graph store: immutable, content-named ONNX graphs and their
      graphs/<sha256>.data    external weights, each stored once per bundle (docs/EXPORT.md, "Graph store")
      .staging-*/             a version being written; never read, removed when stale

A version's manifest names its graphs by role (``graphs/gated.onnx``, ``graphs/image_encoder.data``);
an entry with ``"blob": true`` lies in the store as ``graphs/<sha256><suffix>``. A stored graph's
external-data locations are plain names of ``.data`` files beside it in the store, every one of
which the version lists too, so stock ``onnx.load`` reads any graph of any version: no hard link,
no symlink, no ``..``.

A change never edits a version: it writes a complete new one in a staging folder, renames
it into ``versions/`` and only then replaces ``CURRENT``. A writer killed at any point
leaves the previous version loadable. Tensors are safetensors, metadata JSON; no pickle.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from edgeclip.errors import BundleError
from edgeclip.version import __version__

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
GRAPH_STORE = "graphs"  # BUNDLE/graphs/: the shared, content-named graph store
_VERSION_RE = re.compile(r"^v(\d{4,})$")
_STORED_RE = re.compile(r"^[0-9a-f]{64}\.(onnx|data)$")  # a file of the graph store
_STORE_TMP = ".tmp-"  # prefix of a store file being written (removed by the next writer)


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def sha256_of(path: Path) -> str:
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
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


@contextlib.contextmanager
def _writer_lock(root: Path) -> Iterator[None]:
    """One writer at a time per bundle (advisory lock; released when the process dies)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as handle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory lock
            yield
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise BundleError(f"Another edgeclip process is writing the bundle {root}; try again when it ends.") from exc
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def list_versions(root: Path) -> list[str]:
    """Complete versions in the bundle, oldest first."""
    vdir = Path(root) / "versions"
    if not vdir.is_dir():
        return []
    names = [p.name for p in vdir.iterdir() if _VERSION_RE.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(names, key=lambda n: int(n[1:]))


def current_version(root: Path) -> str:
    root = Path(root)
    marker = root / CURRENT
    if not marker.is_file():
        if not root.exists():
            raise BundleError(f"No bundle at {root}. Create one with 'edgeclip init --bundle {root} ...'.")
        raise BundleError(f"{root} is not an edgeclip bundle (no {CURRENT} file).")
    name = marker.read_text(encoding="utf-8").strip()
    if not _VERSION_RE.match(name) or not (root / "versions" / name / MANIFEST).is_file():
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


@dataclass
class Bundle:
    """One loaded, validated version of a bundle (read-only)."""

    root: Path
    version: str
    manifest: dict[str, Any]

    @property
    def dir(self) -> Path:
        return self.root / "versions" / self.version

    @classmethod
    def open(cls, root: Path | str, version: str | None = None, verify_hashes: bool = True) -> "Bundle":
        root = Path(root)
        version = version or current_version(root)
        manifest = _read_manifest(root / "versions" / version)
        bundle = cls(root=root, version=version, manifest=manifest)
        bundle.validate(verify_hashes=verify_hashes)
        return bundle

    # -- files -------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        """Where a file of this version lies (graphs resolve into the shared graph store)."""
        entry = self.manifest["files"].get(name)
        if entry is None:
            raise BundleError(f"Bundle version {self.version} has no file '{name}'.")
        if entry.get("blob"):
            return stored_path(self.root, name, entry)
        return self.dir / name

    def has(self, name: str) -> bool:
        return name in self.manifest["files"]

    def tensors(self, name: str) -> dict[str, np.ndarray]:
        """Load a safetensors file of this version, checking the shapes the manifest records."""
        from safetensors.numpy import load_file

        try:
            arrays = load_file(str(self.path(name)))
        except BundleError:
            raise
        except Exception as exc:
            raise BundleError(f"Bundle {self.root}: cannot read tensors '{name}': {exc}") from exc
        expected = self.manifest.get("tensors", {}).get(name, {})
        for key, shape in expected.items():
            if key not in arrays:
                raise BundleError(f"Bundle {self.root}: tensor '{key}' missing from '{name}'.")
            if list(arrays[key].shape) != list(shape):
                raise BundleError(
                    f"Bundle {self.root}: tensor '{key}' in '{name}' has shape {list(arrays[key].shape)}, "
                    f"the manifest says {list(shape)}."
                )
        return arrays

    def validate(self, verify_hashes: bool = True) -> None:
        """Every file present with the recorded size (and hash); raise BundleError otherwise."""
        for name, entry in self.manifest["files"].items():
            path = self.path(name)
            if not path.is_file():
                raise BundleError(f"Bundle {self.root} version {self.version}: file '{name}' is missing ({path}).")
            size = path.stat().st_size
            if size != entry["size"]:
                raise BundleError(
                    f"Bundle {self.root} version {self.version}: file '{name}' has {size} bytes, "
                    f"expected {entry['size']} (truncated or replaced)."
                )
            if verify_hashes and sha256_of(path) != entry["sha256"]:
                raise BundleError(
                    f"Bundle {self.root} version {self.version}: file '{name}' does not match its sha256 "
                    "(corrupt or modified). Restore it or roll back with 'edgeclip rollback'."
                )

    # -- facts used everywhere -----------------------------------------------------------
    @property
    def tasks(self) -> list[dict[str, Any]]:
        return self.manifest.get("tasks", [])

    @property
    def method(self) -> str:
        return self.manifest["method"]["name"]

    @property
    def learned_classes(self) -> list[str]:
        """The learned label space: every task's classes, in task order."""
        return [c for task in self.tasks for c in task["classes"]]

    @property
    def weights_label(self) -> str:
        return weights_label(self.manifest["backbone"]["weights"])

    @property
    def random_weights(self) -> bool:
        return self.manifest["backbone"]["weights"]["kind"] == "random"

    def new_version(self) -> "VersionWriter":
        """Start writing the next version, inheriting every file of this one."""
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


def _read_manifest(vdir: Path) -> dict[str, Any]:
    path = vdir / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BundleError(f"{vdir} has no {MANIFEST}.") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); the version is corrupt.") from exc
    schema = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if schema != SCHEMA_VERSION:
        raise BundleError(
            f"{path} has schema version {schema!r}; this edgeclip ({__version__}) reads schema {SCHEMA_VERSION}. "
            "Upgrade edgeclip or re-create the bundle."
        )
    for key in ("backbone", "preprocess", "method", "tasks", "files"):
        if key not in manifest:
            raise BundleError(f"{path} lacks the '{key}' section.")
    return manifest


class VersionWriter:
    """Writes one new version in a staging folder; ``commit`` makes it current atomically.

    Use as a context manager: leaving the block without an exception commits, an exception
    discards the staging folder and the current version stays as it was.
    """

    def __init__(self, root: Path | str, parent: Bundle | None = None, manifest: dict[str, Any] | None = None):
        self.root = Path(root)
        self.parent = parent
        self.manifest: dict[str, Any] = copy.deepcopy(parent.manifest if parent else (manifest or {}))
        self._files: dict[str, dict[str, Any]] = dict(self.manifest.get("files", {}))
        self._tensor_shapes: dict[str, dict[str, list[int]]] = dict(self.manifest.get("tensors", {}))
        self._lock = _writer_lock(self.root)
        self._lock.__enter__()
        self.staging = self.root / f".staging-{uuid.uuid4().hex[:12]}"
        self._clean_stale_staging()
        self.staging.mkdir(parents=True)
        if parent is not None:
            for name, entry in self._files.items():
                if not entry.get("blob"):
                    self._inherit(parent.dir / name, self.staging / name)

    def __enter__(self) -> "VersionWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def _clean_stale_staging(self) -> None:
        # Safe: we hold the writer lock, so no other writer is using a staging folder or store temp file.
        for stale in self.root.glob(".staging-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in (self.root / GRAPH_STORE).glob(f"{_STORE_TMP}*"):
            stale.unlink(missing_ok=True)

    @staticmethod
    def _inherit(src: Path, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(src, dst)

    def _target(self, name: str) -> Path:
        if Path(name).is_absolute() or ".." in Path(name).parts or name == MANIFEST:
            raise BundleError(f"Invalid bundle file name '{name}'.")
        target = self.staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target.unlink()  # never write through a hard link into the parent version
        return target

    def writable_path(self, name: str) -> Path:
        """A path in the new version for a file another tool writes itself (e.g. onnx.save)."""
        target = self._target(name)
        self._files[name] = {"blob": False}
        return target

    def write_bytes(self, name: str, data: bytes) -> None:
        target = self._target(name)
        target.write_bytes(data)
        self._files[name] = {"blob": False}

    def write_file(self, name: str, src: Path | str) -> None:
        shutil.copyfile(src, self._target(name))
        self._files[name] = {"blob": False}

    def write_json(self, name: str, data: Any) -> None:
        self.write_bytes(name, json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8"))

    def write_tensors(self, name: str, arrays: Mapping[str, np.ndarray]) -> None:
        from safetensors.numpy import save_file

        clean = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
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
        self._files.pop(name, None)
        self._tensor_shapes.pop(name, None)
        path = self.staging / name
        if path.exists():
            path.unlink()

    def staged_path(self, name: str) -> Path:
        """Where a file of the new version lies now (for reading back what was written)."""
        entry = self._files.get(name)
        if entry is None:
            raise BundleError(f"The new version has no file '{name}'.")
        if entry.get("blob"):
            return stored_path(self.root, name, entry)
        return self.staging / name

    def _finalise_files(self) -> dict[str, dict[str, Any]]:
        table = {}
        for name, entry in sorted(self._files.items()):
            if entry.get("blob"):
                table[name] = entry
                continue
            path = self.staging / name
            if not path.is_file():
                raise BundleError(f"The new version lost its file '{name}' while being written.")
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
            table[name] = {"blob": False, "sha256": sha256_of(path), "size": path.stat().st_size}
        return table

    def commit(self) -> Bundle:
        try:
            versions = list_versions(self.root)
            all_dirs = [p.name for p in (self.root / "versions").glob("v*")] if (self.root / "versions").is_dir() else []
            numbers = [int(n[1:]) for n in all_dirs if _VERSION_RE.match(n)] + [int(v[1:]) for v in versions]
            name = f"v{(max(numbers) + 1 if numbers else 1):04d}"
            self.manifest.update(
                schema_version=SCHEMA_VERSION,
                edgeclip_version=__version__,
                version=name,
                parent=self.parent.version if self.parent else None,
                created_at=utc_now(),
                files=self._finalise_files(),
                tensors={k: v for k, v in self._tensor_shapes.items() if k in self._files},
            )
            self.manifest.setdefault("bundle_created_at", self.manifest["created_at"])
            manifest_path = self.staging / MANIFEST
            manifest_path.write_text(json.dumps(self.manifest, indent=2, ensure_ascii=False), encoding="utf-8")
            _fsync_path(manifest_path)
            (self.root / "versions").mkdir(exist_ok=True)
            final = self.root / "versions" / name
            os.replace(self.staging, final)
            _fsync_path(final.parent)
            _write_atomic_text(self.root / CURRENT, name + "\n")
        except BaseException:
            self.abort()
            raise
        self._lock.__exit__(None, None, None)
        return Bundle(root=self.root, version=name, manifest=self.manifest)

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        self._lock.__exit__(None, None, None)


def create_bundle(root: Path | str, manifest: dict[str, Any]) -> VersionWriter:
    """Start the first version of a new bundle (refuses a folder that already holds one)."""
    root = Path(root)
    if (root / CURRENT).exists():
        raise BundleError(f"{root} already holds a bundle; choose another folder or delete it first.")
    if root.exists() and any(p for p in root.iterdir() if not p.name.startswith(".")):
        raise BundleError(f"{root} exists and is not empty; give an empty or new folder for the bundle.")
    manifest = dict(manifest)
    manifest.setdefault("tasks", [])
    manifest.setdefault("files", {})
    return VersionWriter(root, parent=None, manifest=manifest)


def rollback(root: Path | str, to: str | None = None) -> str:
    """Make an earlier version current (the parent of the current one unless ``to`` is given)."""
    root = Path(root)
    with _writer_lock(root):
        now = current_version(root)
        if to is None:
            parent = _read_manifest(root / "versions" / now).get("parent")
            if not parent:
                raise BundleError(f"Version {now} of {root} is the first one; there is nothing to roll back to.")
            to = parent
        if to not in list_versions(root):
            raise BundleError(f"Bundle {root} has no complete version '{to}'. Versions: {', '.join(list_versions(root))}")
        Bundle.open(root, to)  # refuse to switch to a damaged version
        _write_atomic_text(root / CURRENT, to + "\n")
    return to
