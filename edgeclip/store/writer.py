"""Writing a bundle: ``VersionWriter`` stages one complete new version (files inherited by hard link,
graphs put into the shared graph store) and commits it atomically with a compare-and-swap on CURRENT;
``create_bundle`` starts a new bundle the same way."""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping

import msgspec
import numpy as np

from edgeclip.errors import BundleError
from edgeclip.manifest import (
    SCHEMA_VERSION,
    VERSION_RE,
    FileEntry,
    Manifest,
    Quantization,
    Retention,
    Task,
    check_file_name,
    to_builtins,
    validate_manifest,
)
from edgeclip.store.fs import (
    CURRENT,
    GRAPH_STORE,
    LAST_VERSION,
    LOCK,
    MANIFEST,
    STORE_TMP,
    STORED_RE,
    WRITE_ERRNOS,
    safetensors_os_error,
    check_finite_arrays,
    check_root,
    fsync_path,
    pid_alive,
    io_error,
    io_errors,
    link_or_copy,
    safe_lstat,
    sha256_of,
    stored_path,
    utc_now,
    write_atomic_text,
)
from edgeclip.store.graphs import external_tensors
from edgeclip.store.lock import clean_temporary, writer_lock
from edgeclip.store.lease import VersionGone, take_lease
from edgeclip.store.reader import Bundle, current_version, manifest_identity
from edgeclip.store.retention import prune_locked
from edgeclip.store.stamps import read_stamps, stamp_of, write_graph_locations, write_stamps
from edgeclip.version import __version__


class VersionWriter:
    """Writes one new version in a staging folder; ``commit`` makes it current atomically.

    Use as a context manager: leaving the block without an exception commits, an exception
    discards the staging folder and the current version stays as it was. Holds the writer lock
    from construction to commit or abort; refuses (BundleError) when CURRENT is no longer the
    parent's version, at construction and at commit.
    """

    def __init__(self, root: Path | str, parent: Bundle | None = None, manifest: Manifest | None = None,
                 final_root: Path | None = None):
        """Take the writer lock and stage a version inheriting ``parent``'s files (hard links),
        or starting from ``manifest`` (``create_bundle``). Raises BundleError when another writer
        holds the lock, CURRENT no longer names ``parent``, or the bundle cannot be written."""
        self.root = Path(root)
        self.final_root = final_root  # init: the staged bundle folder is renamed there at commit
        self.parent = parent
        start = parent.meta if parent is not None else manifest
        if start is None:
            raise BundleError("a new version needs a parent version or a manifest to start from")
        self.meta: Manifest = copy.deepcopy(start)  # the typed manifest of the new version (edit it below)
        self.bundle: Bundle | None = None  # what ``commit`` made (the new version, as written)
        self._files: dict[str, dict[str, Any]] = {n: msgspec.to_builtins(e) for n, e in self.meta.files.items()}
        self._tensor_shapes: dict[str, dict[str, list[int]]] = copy.deepcopy(self.meta.tensors)
        self._inherited: dict[str, int] = {}  # name -> inode of the hard link to the parent's file
        self._lock = writer_lock(self.root)
        self._lock.__enter__()
        self._locked = True
        try:
            self._check_parent_is_current()
            with io_errors(self.root, "write"):
                clean_temporary(self.root)
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
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            raise io_error(self.final_root or self.root, "write", exc) from exc

    def _release(self) -> None:
        if self._locked:
            self._locked = False
            self._lock.__exit__(None, None, None)

    def _check_parent_is_current(self) -> None:
        """Compare and swap: CURRENT must still be the very version this writer started from, compared
        by the parent manifest's sha256 (an identity that never repeats), not by its name."""
        if self.parent is None:
            return
        now = current_version(self.root)
        same = now == self.parent.version
        if same and self.parent.identity:
            try:
                same = manifest_identity(self.root, now) == self.parent.identity
            except BundleError:
                same = False
        if not same:
            raise BundleError(
                f"The bundle {self.root} changed while this command ran: it started from {self.parent.version}, "
                f"and another command has since made {now} current. Nothing was written; run the command again."
            )

    def _inherit(self, parent: Bundle, name: str) -> None:
        src = parent.path(name)  # checked regular, inside the bundle, content verified (or stamped)
        dst = self.staging / name
        with io_errors(self.root, "write"):
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

    def has(self, name: str) -> bool:
        """Whether the new version has file ``name`` now (inherited or written)."""
        return name in self._files

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

    def write_tensors(self, name: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Write a safetensors file; refuses (BundleError, nothing written) a float tensor holding
        NaN or Inf."""
        from safetensors.numpy import save_file

        clean = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        check_finite_arrays(clean, f"Refusing to write '{name}' into the bundle {self.final_root or self.root}")
        try:
            save_file(clean, str(self._target(name)))
        except Exception as exc:  # safetensors' SafetensorError wraps the OS error (a full disk) in its text
            os_error = safetensors_os_error(exc)
            if os_error is exc:
                raise
            raise os_error from exc
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
        for tensor in external_tensors(model.graph):
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
        write_graph_locations(digest, stored.values())  # readers check them without importing onnx
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
                    try:
                        model = onnx.load(str(source), load_external_data=False)
                    except Exception as exc:  # onnx raises DecodeError and others for a damaged file
                        raise BundleError(f"Bundle {self.root}: graph '{name}' cannot be read: "
                                          f"{type(exc).__name__}; run 'edgeclip verify'") from None
                    for tensor in external_tensors(model.graph):
                        for entry in tensor.external_data:
                            if entry.key == "location" and STORED_RE.match(entry.value):
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
        if real.parent == store.resolve() and STORED_RE.match(real.name) and real.suffix == ".data":
            digest, size = real.stem, real.stat().st_size  # already in the store (immutable)
        else:
            digest, size = sha256_of(path), path.stat().st_size
            dst = store / f"{digest}.data"
            if not dst.exists():
                tmp = store / f"{STORE_TMP}{uuid.uuid4().hex}"
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
        if not STORED_RE.match(location):
            self._set_stored(f"{GRAPH_STORE}/{location}", digest, size)
        elif not any(e.get("blob") and e.get("sha256") == digest for e in self._files.values()):
            self._set_stored(f"{GRAPH_STORE}/{location}", digest, size)
        return f"{digest}.data"

    def _store_bytes(self, stored: str, payload: bytes) -> None:
        dst = self._store_dir() / stored
        if dst.exists():
            return
        tmp = dst.with_name(f"{STORE_TMP}{uuid.uuid4().hex}")
        tmp.write_bytes(payload)
        self._seal(tmp, dst)

    @staticmethod
    def _seal(tmp: Path, dst: Path) -> None:
        """fsync a finished store file, make it world-readable and rename it to its content name."""
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        tmp.chmod(0o644)  # onnx creates data files private; the other bundle files are world-readable
        os.replace(tmp, dst)
        fsync_path(dst.parent)

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
        to the parent's verified file keeps the parent's hash (not re-read); others are hashed. A shared
        graph keeps the parent's stamp when it is still the very file the parent verified."""
        table, stamps = {}, {}
        parent_stamps = read_stamps(self.root, self.parent.version) if self.parent is not None else {}
        for name, entry in sorted(self._files.items()):
            if entry.get("blob"):
                table[name] = entry
                known = parent_stamps.get(name)
                if isinstance(known, list) and len(known) == 4 and known[3] == entry.get("sha256"):
                    with contextlib.suppress(OSError, BundleError):
                        if known[:3] == stamp_of(os.lstat(stored_path(self.root, name, entry))):
                            stamps[name] = known
                continue
            path = self.staging / name
            try:
                st = safe_lstat(self.staging, name, self.root, "new version")
            except BundleError:
                raise BundleError(f"The new version lost its file '{name}' while being written.") from None
            inherited = self._inherited.get(name)
            if inherited is not None and inherited == st.st_ino and self.parent is not None:
                parent_entry = self.parent.meta.files[name]
                table[name] = {"blob": False, "sha256": parent_entry.sha256, "size": parent_entry.size}
            else:
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
                table[name] = {"blob": False, "sha256": sha256_of(path), "size": st.st_size}
            stamps[name] = [*stamp_of(st), table[name]["sha256"]]
        return table, stamps

    def commit(self) -> Bundle:
        """Make the staged version current; BundleError (nothing changed) when the manifest is
        invalid, the disk refuses, or another writer moved CURRENT."""
        try:
            self._check_parent_is_current()
            name = next_version_name(self.root)
            files, stamps = self._finalise_files()
            created_at = utc_now()
            self.meta = msgspec.structs.replace(
                self.meta,
                schema_version=SCHEMA_VERSION,
                edgeclip_version=__version__,
                version=name,
                parent=self.parent.version if self.parent else None,
                created_at=created_at,
                bundle_created_at=self.meta.bundle_created_at or created_at,
                files={k: FileEntry(**v) for k, v in files.items()},
                tensors={k: v for k, v in self._tensor_shapes.items() if k in self._files},
            )
            manifest = to_builtins(self.meta)
            meta = validate_manifest(manifest)
            text = json.dumps(manifest, indent=2, ensure_ascii=False, allow_nan=False)
            with io_errors(self.final_root or self.root, "write"):
                manifest_path = self.staging / MANIFEST
                manifest_path.write_text(text, encoding="utf-8")
                fsync_path(manifest_path)
                (self.root / "versions").mkdir(exist_ok=True)
                write_atomic_text(self.root / LAST_VERSION, name + "\n")  # issued: never again, even if pruned
                final = self.root / "versions" / name
                os.replace(self.staging, final)
                fsync_path(final.parent)
                write_atomic_text(self.root / CURRENT, name + "\n")
            write_stamps(self.root, name, stamps)
            keep = meta.retention.keep
            if keep and self.final_root is None:
                if self.parent is not None:
                    self.parent.release()  # the writer lets go of its parent: retention may remove it
                with contextlib.suppress(OSError, BundleError):
                    prune_locked(self.root, keep)
                if self.parent is not None:
                    self.parent.relock()  # kept by the retention: the parent object stays usable
            root = self.root
            if self.final_root is not None:
                root = self._move_into_place()
            try:
                lease = take_lease(root / "versions" / name)  # CURRENT: no prune may remove it now
            except VersionGone:  # pragma: no cover - only a foreign hand removes a current version
                lease = None
        except BaseException:
            self.abort()
            raise
        self._release()
        self.bundle = Bundle(root=root, version=name, manifest=manifest, meta=meta,
                             identity=hashlib.sha256(text.encode("utf-8")).hexdigest(), _lease=lease)
        return self.bundle

    # -- typed edits of the new version's manifest ----------------------------------------
    def add_task(self, task: Task) -> None:
        """Append a learned task's record (``tasks[-1]``); BundleError when a task has its name."""
        if any(t.name == task.name for t in self.meta.tasks):
            raise BundleError(f"the bundle already has a task named '{task.name}'")
        self.meta.tasks.append(task)

    def set_learner_record(self, record: dict[str, Any]) -> None:
        """Record the learner's own state description (``method.settings.learner``, RAIL's
        ``settings()``), read back by ``from_state``."""
        settings = msgspec.structs.replace(self.meta.method.settings, learner=dict(record))
        self.meta.method = msgspec.structs.replace(self.meta.method, settings=settings)

    def set_retention(self, keep: int) -> None:
        """How many versions every later write keeps (``retention.keep``; 0: all)."""
        self.meta.retention = Retention(keep=int(keep))

    def set_quantization(self, quantization: Quantization | None) -> None:
        """Record how the version's int8 graphs were made (None: the version has none)."""
        self.meta.quantization = quantization

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
            raise io_error(final, "create", exc) from exc
        with contextlib.suppress(OSError):
            fsync_path(final.parent)
        return final

    def abort(self) -> None:
        """Discard the new version (its staging folder; a new bundle's folder too) and release the lock."""
        if hasattr(self, "staging"):
            shutil.rmtree(self.staging, ignore_errors=True)
        if self.final_root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
        self._release()


def next_version_name(root: Path) -> str:
    """One past the highest version name ever issued in the bundle (``LAST_VERSION``, and every
    version folder, for bundles written before it existed): names are never reused, even after the
    newest versions were pruned. Called under the writer lock."""
    numbers = []
    with contextlib.suppress(OSError):
        text = (root / LAST_VERSION).read_text(encoding="utf-8", errors="replace").strip()
        if VERSION_RE.match(text):
            numbers.append(int(text[1:]))
    if (root / "versions").is_dir():
        numbers += [int(p.name[1:]) for p in (root / "versions").iterdir() if VERSION_RE.match(p.name)]
    return f"v{(max(numbers) + 1 if numbers else 1):04d}"


_OWN_LEFTOVERS = (LOCK, ".stamps")  # what an older, interrupted init may leave in a bundle folder


def create_bundle(root: Path | str, manifest: Manifest | Mapping[str, Any]) -> VersionWriter:
    """Start the first version of a new bundle at ``root`` (absent or an empty folder).

    Atomic: the bundle is written in a hidden sibling folder (``.<name>.init-<pid>-*``) and renamed
    onto ``root`` at commit, so an interrupted init leaves no bundle folder (its leftovers are removed
    by the next init). ``manifest``: typed, or its JSON form (validated). Raises BundleError for an invalid manifest, a ``root`` that is a file, holds
    a bundle or is not empty, or a parent folder that cannot be written."""
    root = Path(root)
    check_root(root)
    if (root / CURRENT).exists():
        raise BundleError(f"{root} already holds a bundle; choose another folder or delete it first.")
    manifest = validate_manifest(to_builtins(manifest) if isinstance(manifest, Manifest) else manifest, complete=False)
    if root.exists():
        entries = list(root.iterdir())
        if any(p.name not in _OWN_LEFTOVERS and not p.name.startswith(".staging-") for p in entries):
            raise BundleError(f"{root} exists and is not empty; give an empty or new folder for the bundle.")
        with io_errors(root, "create"):
            for p in entries:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    parent = root.absolute().parent
    with io_errors(root, "create"):
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(f".{root.name}.init-*"):
            pid = stale.name.split("-")[-2] if stale.name.count("-") >= 2 else ""
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        temp = parent / f".{root.name}.init-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        temp.mkdir()
    try:
        return VersionWriter(temp, parent=None, manifest=manifest, final_root=root)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise

