"""Reading a bundle: which versions exist, which is current, and ``Bundle``, one validated version
opened read-only (fast open, lazy per-file hash verification with stamps)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from edgeclip.errors import BundleError
from edgeclip.manifest import SCHEMA_VERSION, VERSION_RE, Manifest, Task, Weights, check_version_name, validate_manifest
from edgeclip.store.fs import (
    CURRENT,
    MANIFEST,
    check_dir,
    check_finite_arrays,
    check_root,
    io_error,
    safe_lstat,
    sha256_of,
    stored_path,
)
from edgeclip.store.graphs import external_tensors
from edgeclip.store.lease import Lease, VersionGone, take_lease
from edgeclip.store.stamps import read_stamps, stamp_of, write_stamps
from edgeclip.version import __version__

if TYPE_CHECKING:
    from edgeclip.store.writer import VersionWriter

_CURRENT_TRIES = 20  # re-reads of CURRENT when the version it named vanished meanwhile (writers + retention)


def list_versions(root: Path) -> list[str]:
    """Complete versions in the bundle, oldest first."""
    vdir = Path(root) / "versions"
    if not vdir.is_dir():
        return []
    names = [p.name for p in vdir.iterdir() if VERSION_RE.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(names, key=lambda n: int(n[1:]))


def current_version(root: Path) -> str:
    """The name CURRENT holds (a complete version); BundleError when there is no bundle at ``root``."""
    root = Path(root)
    check_root(root)
    marker = root / CURRENT
    try:
        st = os.lstat(marker)
    except FileNotFoundError:
        if not root.exists():
            raise BundleError(f"No bundle at {root}. Create one with 'edgeclip init --bundle {root} ...'.") from None
        raise BundleError(f"{root} is not an edgeclip bundle (no {CURRENT} file).") from None
    except OSError as exc:
        raise io_error(root, "read", exc) from exc
    if not stat.S_ISREG(st.st_mode) or st.st_size > 64:
        raise BundleError(f"Bundle {root}: {CURRENT} is not a small regular file; refusing it.")
    name = marker.read_text(encoding="utf-8", errors="replace").strip()
    if not VERSION_RE.match(name):
        raise BundleError(f"Bundle {root}: {CURRENT} does not name a version.")
    for _ in range(_CURRENT_TRIES):
        if (root / "versions" / name / MANIFEST).is_file():
            return name
        # a writer may have switched CURRENT and pruned the version just read: read CURRENT again
        again = marker.read_text(encoding="utf-8", errors="replace").strip()
        if again == name or not VERSION_RE.match(again):
            break
        name = again
    raise BundleError(f"Bundle {root}: {CURRENT} names '{name}', which is not a complete version.")


def manifest_identity(root: Path, version: str) -> str:
    """The sha256 of a version's ``manifest.json`` bytes: the identity a writer's compare-and-swap
    compares (it names the version, its parent, its time and every file's hash, so it never repeats
    even where a version name would). Raises BundleError when the manifest cannot be read."""
    path = Path(root) / "versions" / version / MANIFEST
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise BundleError(f"Bundle {root}: version {version} is gone or unreadable ({type(exc).__name__}).") from None


def weights_label(weights: Weights) -> str:
    """Short text for reports of a manifest's `backbone.weights`: every output that used random
    weights says so."""
    ref = str(weights.ref)
    if weights.kind == "random":
        return f"random weights (seed {ref})"
    if weights.kind == "tag":
        return f"pretrained '{ref}'"
    sha = weights.sha256
    return f"checkpoint {Path(ref).name} (sha256 {sha[:12] if sha else '?'})"


@dataclass
class Bundle:
    """One loaded, validated version of a bundle (read-only).

    ``manifest`` is the manifest dict exactly as written; ``meta`` its typed form
    (``edgeclip.manifest.Manifest``). ``verify_hashes``: check each file's sha256 when it is first
    used (skipped when its stamp shows it was verified before and not changed since)."""

    root: Path
    version: str
    manifest: dict[str, Any]
    meta: Manifest
    verify_hashes: bool = True
    _verified: set[str] = field(default_factory=set, repr=False)
    _stamps: dict[str, list[Any]] | None = field(default=None, repr=False)
    identity: str = ""  # sha256 of the manifest file (``manifest_identity``): what a writer's CAS compares
    _lease: Lease | None = field(default=None, repr=False, compare=False)

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
        here; ``path`` verifies each file's hash on first use. The Bundle holds a reader lease on its
        version (``edgeclip.store.lease``): no prune removes it until the Bundle is released or
        garbage-collected. Raises BundleError (also when ``version`` was removed meanwhile)."""
        root = Path(root)
        check_root(root)
        requested = check_version_name(version) if version else None
        for _ in range(_CURRENT_TRIES):
            version = requested or current_version(root)
            check_dir(root / "versions", root, "its versions folder")
            vdir = root / "versions" / version
            try:
                check_dir(vdir, root, f"version {version}")
            except BundleError:
                if requested or os.path.lexists(vdir):
                    raise
                continue  # pruned right after CURRENT moved on: read CURRENT again
            try:
                lease = take_lease(vdir)
            except VersionGone:
                if requested:
                    raise BundleError(f"Bundle {root}: version {version} was removed (pruned) meanwhile.") from None
                continue  # CURRENT moved on and its old version was pruned: read CURRENT again
            try:
                manifest, meta = read_manifest(root, version)
                bundle = cls(root=root, version=version, manifest=manifest, meta=meta, verify_hashes=verify_hashes,
                             identity=manifest_identity(root, version), _lease=lease)
                bundle.validate(verify_hashes=False)
            except BaseException:
                if lease is not None:
                    lease.release()
                raise
            return bundle
        raise BundleError(f"Bundle {root} changed too often while being opened; try again.")

    def release(self) -> None:
        """Let go of this version's reader lease (a later prune may then remove it). The Bundle must
        not read files afterwards, unless ``relock`` took the lease again."""
        if self._lease is not None:
            self._lease.release()

    def relock(self) -> bool:
        """Take this version's lease again after ``release``, if the version still exists (a writer does
        this for its parent after retention ran). Returns whether the Bundle holds a lease now."""
        if self._lease is not None and self._lease.held:
            return True
        try:
            self._lease = take_lease(self.dir)
        except VersionGone:
            self._lease = None
        return self._lease is not None

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
        matches the manifest's sha256; a graph (``.onnx``) also has its external-data locations
        checked (``check_graph_locations``). Raises BundleError."""
        base, rel = self._location(name)
        if name not in self._verified:
            st = self._check_file(name)
            if self.verify_hashes:
                self._verify_content(name, st)
            self._verified.add(name)
            if name.endswith(".onnx"):
                try:
                    self.check_graph_locations(name)
                except BaseException:
                    self._verified.discard(name)
                    raise
        return base / rel

    def has(self, name: str) -> bool:
        """Whether the manifest lists a file ``name`` (nothing is read or checked)."""
        return name in self.manifest["files"]

    def _check_file(self, name: str) -> os.stat_result:
        base, rel = self._location(name)
        if base != self.dir:
            check_dir(base, self.root, "its graph store")
        st = safe_lstat(base, rel, self.root, self.label)
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
            self._stamps = read_stamps(self.root, self.version)
        stamp = self._stamps.get(name)
        if use_stamp and isinstance(stamp, list) and stamp == [*stamp_of(st), entry["sha256"]]:
            return
        base, rel = self._location(name)
        if sha256_of(base / rel) != entry["sha256"]:
            raise BundleError(
                f"Bundle {self.root} {self.label}: file '{name}' does not match its sha256 "
                "(corrupt or modified). Restore it or roll back with 'edgeclip rollback'."
            )
        self._stamps[name] = [*stamp_of(st), entry["sha256"]]
        write_stamps(self.root, self.version, self._stamps)

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
        check_finite_arrays(arrays, f"Bundle {self.root} {self.label}, file '{name}'")
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
        locations (``check_graph_locations``). Raises BundleError at the first problem."""
        for name in self.manifest["files"]:
            st = self._check_file(name)
            self._verify_content(name, st, use_stamp=False)
            self._verified.add(name)
        for name in self.manifest["files"]:
            if name.endswith(".safetensors"):
                self.tensors(name)  # shapes against the manifest, finite values
            elif name.endswith(".onnx"):
                self.check_graph_locations(name)

    def check_graph_locations(self, name: str) -> None:
        """Every external-data location of graph ``name`` must be a plain name of a file beside it that
        this version lists (so its size and sha256 are checked like every file's), a regular file (not a
        symlink) and, in the shared graph store, a single-link file (no hard link can make it another
        file's twin). onnxruntime reads exactly these files. Raises BundleError naming the graph."""
        import onnx

        files = self.manifest["files"]
        entry = files[name]
        base, rel = self._location(name)
        folder = (base / rel).parent
        if entry.get("blob"):
            listed = {stored_path(self.root, f, e).name for f, e in files.items()
                      if e.get("blob") and f.endswith(".data")}
        else:
            here = Path(name).parent
            listed = {Path(f).name for f, e in files.items() if Path(f).parent == here and not e.get("blob")}
        try:
            graph = onnx.load(str(base / rel), load_external_data=False)
        except Exception as exc:  # onnx raises DecodeError and others for a damaged file
            raise BundleError(f"Bundle {self.root} {self.label}: graph '{name}' cannot be read: {type(exc).__name__}") from None
        for location in sorted({next((e.value for e in t.external_data if e.key == "location"), "")
                                for t in external_tensors(graph.graph)}):
            refuse = f"Bundle {self.root} {self.label}: graph '{name}' refers to external data {location[:60]!r}, "
            plain = location and "/" not in location and "\\" not in location and not location.startswith(".")
            if not plain or location not in listed:
                raise BundleError(refuse + "which is not a file of this version beside it; refusing the graph.")
            try:
                st = os.lstat(folder / location)
            except OSError:
                raise BundleError(refuse + "which is missing; refusing the graph.") from None
            if not stat.S_ISREG(st.st_mode):
                raise BundleError(refuse + "which is a symlink or not a regular file; refusing the graph.")
            if entry.get("blob") and st.st_nlink != 1:
                raise BundleError(refuse + f"which has {st.st_nlink} hard links (a store file has one); "
                                  "refusing the graph.")

    # -- facts used everywhere -----------------------------------------------------------
    @property
    def tasks(self) -> list[Task]:
        """The typed task records, in learning order (``[]`` before the first add-task)."""
        return self.meta.tasks

    @property
    def method(self) -> str:
        """The learner's name: ``rail-primal``, ``rail-dual`` or ``moe``."""
        return self.meta.method.name

    @property
    def learned_classes(self) -> list[str]:
        """The learned label space: every task's classes, in task order."""
        return [c for task in self.tasks for c in task.classes]

    @property
    def weights_label(self) -> str:
        """Short text naming the backbone weights (``bundle.weights_label``); says when they are random."""
        return weights_label(self.meta.backbone.weights)

    @property
    def random_weights(self) -> bool:
        """True when the backbone has seeded random weights (results then mean nothing about CLIP)."""
        return self.meta.backbone.weights.kind == "random"

    def new_version(self) -> "VersionWriter":
        """Start writing the next version, inheriting every file of this one. Raises BundleError
        when another writer holds the bundle or CURRENT moved away from this version."""
        from edgeclip.store.writer import VersionWriter  # the writer builds on this module

        return VersionWriter(self.root, parent=self)


MAX_MANIFEST_BYTES = 64 << 20  # far above any real manifest (thousands of tasks and classes: a few MB)


def read_manifest(root: Path, version: str) -> tuple[dict[str, Any], Manifest]:
    vdir = root / "versions" / version
    label = f"version {version}"
    check_dir(root / "versions", root, "its versions folder")
    check_dir(vdir, root, label)
    try:
        st = os.lstat(vdir / MANIFEST)
    except FileNotFoundError:
        raise BundleError(f"Bundle {root} {label} has no {MANIFEST}.") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"Bundle {root} {label}: {MANIFEST} is not a regular file; refusing it.")

    def refuse_constant(token: str) -> Any:
        raise ValueError(f"non-finite number {token}")

    if st.st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"Bundle {root} {label}: {MANIFEST} is {st.st_size} bytes, more than a manifest can be "
                          f"({MAX_MANIFEST_BYTES}); the version is corrupt.")
    try:
        manifest = json.loads((vdir / MANIFEST).read_text(encoding="utf-8"), parse_constant=refuse_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"Bundle {root} {label}: {MANIFEST} is not valid JSON ({exc}); the version is corrupt.") from None
    except RecursionError:
        raise BundleError(f"Bundle {root} {label}: {MANIFEST} is nested too deeply to be a manifest; "
                          "the version is corrupt.") from None
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
