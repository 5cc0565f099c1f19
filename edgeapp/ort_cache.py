"""A cache of onnxruntime's optimised graphs, so that a fresh process skips graph optimisation.

Creating an onnxruntime session parses the graph and rewrites it (constant folding, fusions,
NCHWc layouts: ``ORT_ENABLE_ALL``) before it can run; for a bundle's gated graph that is about
a third of `edgeclip classify`'s start-up. onnxruntime can save the rewritten graph
(``SessionOptions.optimized_model_filepath``); loading that file with optimisations disabled
gives a session that computes exactly what a freshly optimised one computes, sooner.

Layout: ``engine_cache_dir()/ort-optimized/<key>/`` holds ``model.onnx``, its weights
``model.data`` and ``meta.json``. The key is the sha256 of what the optimised graph depends
on: the source graph's content (the bundle manifest's sha256 of the graph and its weights),
the onnxruntime version, the execution providers, this CPU (the NCHWc rewrites are specific
to its instruction set) and this cache's format. Only the CPU provider is cached: GPU
providers compile their own kernels and TensorRT keeps its own engine cache.

Trust: an entry is written to a temporary folder, then *checked*: the saved graph is loaded
with optimisations disabled and run on the first real inputs beside the freshly optimised
session; only bit-identical outputs publish it (a rename). An entry whose outputs differed
is remembered as unusable, so it is not rebuilt on every start. A hit is used only when its
``meta.json`` names the same key, its files have the size, modification time and inode
recorded at publishing, and the sha256 of both the graph and its weights file match (a flipped
bit keeps size and time, so every hit is hashed); a damaged entry or one
onnxruntime cannot load is removed and the graph is optimised and published afresh. The cache keeps
the ``KEEP`` most recently used entries. ``EDGECLIP_SESSION_CACHE=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeclip.bundle import sha256_of

log = logging.getLogger(__name__)

FORMAT = 3  # 3: the weights file's sha256 is recorded and checked too
KEEP = 2  # entries kept (each holds a copy of the graph's weights: mind an edge device's disk)
MODEL, DATA, META = "model.onnx", "model.data", "meta.json"
_STALE_TMP_S = 3600.0
ENV = "EDGECLIP_SESSION_CACHE"


def cache_root(engine_cache: Path) -> Path | None:
    """``engine_cache/ort-optimized``, or None when ``$EDGECLIP_SESSION_CACHE`` is ``0``/``off``."""
    if os.environ.get(ENV, "").strip().lower() in ("0", "off", "false", "no"):
        return None
    return engine_cache / "ort-optimized"


def cpu_fingerprint() -> str:
    """The CPU's model and feature flags (Linux /proc/cpuinfo, first processor), else the
    platform's machine and processor strings."""
    try:
        lines = []
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if not line.strip():
                    break
                if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part", "CPU implementer"):
                    lines.append(line.strip())
        if lines:
            return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
    except OSError:
        pass
    return f"{platform.machine()}-{platform.processor()}"


def _stamp(path: Path) -> list[int]:
    st = path.lstat()
    return [int(st.st_size), int(st.st_mtime_ns), int(st.st_ino)]


def same_outputs(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    """True when both hold the same names with bit-identical arrays (NaN equal to NaN)."""
    if set(a) != set(b):
        return False
    for name, x in a.items():
        y = b[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if x.dtype.kind in "fc":
            if not np.array_equal(x, y, equal_nan=True):
                return False
        elif not np.array_equal(x, y):
            return False
    return True


@dataclass
class OptimizedGraphCache:
    """The cache entry of one graph for one provider list (see the module docstring)."""

    root: Path
    key: dict[str, Any]

    @classmethod
    def for_graph(cls, engine_cache: Path, graph_id: str, providers: tuple[str, ...]) -> OptimizedGraphCache | None:
        """The entry for `graph_id` (content hash of the graph and its weights), or None when the
        cache is turned off or the providers are not CPU only."""
        root = cache_root(engine_cache)
        if root is None or tuple(providers) != ("CPUExecutionProvider",):
            return None
        import onnxruntime as ort

        key = {"format": FORMAT, "graph": graph_id, "onnxruntime": ort.__version__, "providers": list(providers),
               "level": "ORT_ENABLE_ALL", "cpu": cpu_fingerprint()}
        return cls(root, key)

    @property
    def name(self) -> str:
        """The entry's folder name: 32 hex digits of the key's sha256."""
        return hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:32]

    @property
    def folder(self) -> Path:
        """``root/<name>``."""
        return self.root / self.name

    def lookup(self) -> Path | None | bool:
        """The cached graph to load (validated), False when this graph is known not to reproduce
        its outputs from a saved file (do not try again), None when there is no usable entry."""
        folder = self.folder
        try:
            meta = json.loads((folder / META).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            if folder.exists():
                self.discard("unreadable meta.json")
            return None
        if not isinstance(meta, dict) or meta.get("key") != self.key:
            self.discard("it was made for another graph or onnxruntime")
            return None
        if meta.get("usable") is False:
            return False
        try:
            files = meta["files"]
            for name in (MODEL, DATA):
                if _stamp(folder / name) != files[name]["stamp"]:
                    raise ValueError(f"{name} changed since it was written")
            for name in (MODEL, DATA):
                if sha256_of(folder / name) != files[name]["sha256"]:
                    raise ValueError(f"{name} does not match its sha256 (damaged)")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.discard(str(exc))
            return None
        with contextlib.suppress(OSError):
            os.utime(folder / META)  # most recently used: kept by pruning
        return folder / MODEL

    def discard(self, why: str) -> None:
        """Remove this graph's entry (best effort)."""
        log.info("optimised-graph cache %s: removed (%s)", self.folder, why)
        _remove_tree(self.folder)

    def begin(self) -> PendingEntry | None:
        """A temporary folder to save the optimised graph into, or None when the cache is not writable."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".tmp-{self.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
        except OSError as exc:
            log.info("optimised-graph cache %s not writable (%s): not cached", self.root, exc.strerror)
            return None
        return PendingEntry(self, tmp)


@dataclass
class PendingEntry:
    """An optimised graph saved by a fresh session, waiting for its check against that session."""

    cache: OptimizedGraphCache
    tmp: Path

    @property
    def model_path(self) -> Path:
        """Where onnxruntime writes the optimised graph."""
        return self.tmp / MODEL

    def configure(self, options: Any) -> None:
        """Make `options` (an ``ort.SessionOptions``) save the optimised graph here, weights apart."""
        options.optimized_model_filepath = str(self.model_path)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        # Not saved: the GEMM weights pre-packed for this CPU (about 30 ms less per start here, but the
        # entry's weights file about doubles: an edge device's small disk matters more).
        # onnxruntime warns that an ORT_ENABLE_ALL graph is specific to this machine: the key says so
        options.log_severity_level = max(options.log_severity_level, 3)

    def publish(self, run_saved: Callable[[Path], Mapping[str, np.ndarray]], want: Mapping[str, np.ndarray]) -> bool:
        """Check the saved graph: `run_saved(path)` must give `want` bit for bit. Publish it (or an
        'unusable' marker when it differs); never raises. Returns True when published as usable."""
        try:
            if not self.model_path.is_file():
                raise OSError("onnxruntime saved no optimised graph")
            if not (self.tmp / DATA).exists():
                (self.tmp / DATA).write_bytes(b"")  # every initializer was small enough to stay inline
            usable = same_outputs(run_saved(self.model_path), want)
            meta: dict[str, Any] = {"key": self.cache.key, "usable": usable, "created": time.time()}
            if usable:
                meta["files"] = {name: {"stamp": _stamp(self.tmp / name)} for name in (MODEL, DATA)}
                for name in (MODEL, DATA):
                    meta["files"][name]["sha256"] = sha256_of(self.tmp / name)
            else:
                log.warning("optimised-graph cache: the saved graph's outputs differ from the fresh session's; "
                            "not used for this graph")
                for name in (MODEL, DATA):
                    (self.tmp / name).unlink(missing_ok=True)
            (self.tmp / META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
            try:
                os.rename(self.tmp, self.cache.folder)
            except OSError:  # another process published it first (or a damaged entry is in the way)
                _remove_tree(self.tmp)
                return False
            _prune(self.cache.root, keep=KEEP)
            return usable
        except Exception as exc:  # noqa: BLE001 - the cache must never break a run
            log.info("optimised-graph cache: not saved (%s: %s)", type(exc).__name__, exc)
            _remove_tree(self.tmp)
            return False

    def abandon(self) -> None:
        """Drop the temporary folder (the fresh session failed or is not used)."""
        _remove_tree(self.tmp)


def _remove_tree(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _prune(root: Path, keep: int) -> None:
    """Keep the `keep` most recently used entries; remove temporary folders older than an hour."""
    now = time.time()
    entries = []
    with contextlib.suppress(OSError):
        for child in root.iterdir():
            try:
                if child.name.startswith(".tmp-"):
                    if now - child.lstat().st_mtime > _STALE_TMP_S:
                        _remove_tree(child)
                elif child.is_dir() and not child.is_symlink():
                    entries.append(((child / META).stat().st_mtime if (child / META).exists() else 0.0, child))
            except OSError:
                continue
    for _, child in sorted(entries, reverse=True)[keep:]:
        _remove_tree(child)
