"""A photo library through the embedding cache: frozen embeddings once, the decision from them (torch-free).

``classify`` and ``search`` go encoder -> embedding -> head, with or without the cache, so a cached
run and a fresh one compute the same numbers from the same float32 embedding:

1. files are taken in windows of ``window`` (in input order); each file's identity is looked up in the
   embedding cache (``edgeapp.embed_cache``);
2. only the misses are decoded (thread pool, ``images.iter_batches``) and run through the frozen image
   encoder in full batches; their embeddings are stored;
3. the head graph (``export.compose.build_head_graph``: DDAS gate, RAIL head, fusion; no encoder) turns
   embeddings into scores, routes and gate ratios;
4. MoE bundles: the images the gate routes to a task also need the adapted encoder. Their adapted
   embeddings are cached too, keyed by that task's adapted encoder (``moe_task_key``: the MoE graph's
   hash and the task index); a miss decodes the file again and runs ``moe_encoder.onnx`` on it. An
   MoE add-task writes a new MoE graph, so after it every routed image is encoded again by the adapted
   encoder (the frozen embedding, the gate and the zero-shot rows still come from the cache).

``Recompute`` counts what each run computed (decoded, frozen-encoded, adapted-encoded, from cache).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeclip.bundle import Bundle
from edgeclip.edgeapp.embed_cache import FROZEN, EmbeddingCache, FileId, backbone_key
from edgeclip.edgeapp.runtime import ORT_LOG_ENV
from edgeclip.errors import BundleError, EngineError, UsageError
from edgeclip.images import DEFAULT_MAX_PIXELS, iter_batches, warnings_are_notes
from edgeclip.layout import (
    ADAPTED,
    GATE_RATIO,
    HEAD_GRAPH,
    HEAD_SHARED_DATA,
    LABEL_TEXT,
    LEARNED,
    MOE_DATA,
    MOE_GRAPH,
    PIXELS,
    PRECISION_GRAPHS,
    ROUTE,
    SCORES,
    TASK_IDS,
    TASK_TEXT,
    EMBEDDING,
    graph_file,
)
from edgeclip.manifest import Preprocess

WINDOW_BATCHES = 4  # a window is this many batches: decode overlaps the encoder inside a window


@dataclass
class Recompute:
    """What a run computed: files decoded, frozen embeddings encoded, adapted (MoE) embeddings encoded,
    and embeddings read from the cache (frozen, adapted)."""

    decoded: int = 0
    encoded: int = 0
    adapted: int = 0
    cached: int = 0
    cached_adapted: int = 0

    def describe(self) -> str:
        """One line for the run's summary."""
        text = f"{self.cached} embeddings from the cache, {self.encoded} encoded"
        if self.adapted or self.cached_adapted:
            text += f"; MoE adapted encoder: {self.adapted} run, {self.cached_adapted} from the cache"
        return text


@dataclass
class Scored:
    """One window's results in input order: readable files with their scores, and unreadable ones."""

    order: list[Path]  # every file of the window, input order
    rows: list[int | None]  # per file of ``order``: its row below, or None when it could not be read
    errors: dict[int, str]  # index into ``order`` -> why that file could not be read
    paths: list[Path]  # the readable files, one per row
    notes: list[str | None]
    embedding: np.ndarray  # [N,D] float32
    scores: np.ndarray  # [N,L]
    route: np.ndarray  # [N] int64
    gate_ratio: np.ndarray  # [N,T]


class HeadRunner:
    """The decision from embeddings (``build_head_graph``), on onnxruntime's CPU provider.

    ``run(embedding [B,D], label_text [L,D])`` -> {"scores" [B,L], "route" [B], "gate_ratio" [B,T]}."""

    def __init__(self, bundle: Bundle, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        level = os.environ.get(ORT_LOG_ENV, "4").strip()  # onnxruntime's own log, as the gated runner's
        options.log_severity_level = int(level) if level in ("0", "1", "2", "3", "4") else 4
        if threads:
            options.intra_op_num_threads = int(threads)
        if bundle.has(graph_file(HEAD_GRAPH)):  # written with the gated graph (edgeapp.tasks.write_gated_graph)
            path = bundle.path(graph_file(HEAD_GRAPH))  # sha256-checked on first use
            if bundle.has(graph_file(HEAD_SHARED_DATA)):
                bundle.path(graph_file(HEAD_SHARED_DATA))
            model: Any = str(path)
        else:  # a version written before head.onnx existed: built now (reads the onnx package)
            from edgeclip.export.compose import build_head_graph

            model = build_head_graph(bundle.tensors(LEARNED), bundle.meta).SerializeToString()
        try:
            self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"Bundle {bundle.root} version {bundle.version}: onnxruntime cannot load the head "
                              f"graph: {exc}") from exc
        self.n_tasks = len(bundle.tasks)
        self.version = bundle.version

    def run(self, embedding: np.ndarray, label_text: np.ndarray) -> dict[str, np.ndarray]:
        embedding = np.ascontiguousarray(embedding, dtype=np.float32)
        if len(embedding) == 0:
            return {SCORES: np.zeros((0, len(label_text)), np.float32), ROUTE: np.zeros(0, np.int64),
                    GATE_RATIO: np.zeros((0, self.n_tasks), np.float32)}
        try:
            out = self.session.run([SCORES, ROUTE, GATE_RATIO],
                                   {EMBEDDING: embedding, LABEL_TEXT: np.ascontiguousarray(label_text, np.float32)})
        except Exception as exc:  # onnxruntime raises its own exception types: one line, as the gated runner
            if not type(exc).__module__.startswith("onnxruntime"):
                raise
            cause = " ".join(str(exc).split())[:300]
            raise EngineError(f"onnxruntime failed running {HEAD_GRAPH}: {cause}") from exc
        batch, route = len(embedding), np.asarray(out[1])
        want = [(batch, len(label_text)), (batch,), (batch, self.n_tasks)]
        bad_route = route.size and (route.dtype.kind not in "iu" or route.min() < -1 or route.max() >= self.n_tasks)
        if [tuple(np.shape(o)) for o in out] != want or bad_route:  # a graph from another version, or tampered
            raise BundleError(
                f"The head graph's outputs do not fit version {self.version} ({self.n_tasks} tasks, "
                f"{len(label_text)} labels). The graph does not belong to this version; run 'edgeclip verify'.")
        return dict(zip((SCORES, ROUTE, GATE_RATIO), out))


def frozen_backbone_key(bundle: Bundle, cfg: Preprocess, precision: str = "fp32") -> str:
    """The cache key of the bundle's frozen image encoder (fp32, fp16 or int8) with preprocessing ``cfg``.

    Where Pillow's warnings about a file are not its notes (library code; ``images.warnings_are_notes``),
    the key says so: the notes cached there lack them, and the CLI must not read those."""
    _, graph, data = PRECISION_GRAPHS[precision]
    files = bundle.meta.files
    key = backbone_key([files[graph_file(graph)].sha256, files[graph_file(data)].sha256], cfg)
    return key if warnings_are_notes() else f"{key}:own-notes"


def moe_task_key(bundle: Bundle, task: int) -> str:
    """The cache kind of task ``task``'s adapted embeddings: the MoE graph's and weights' hashes and the task."""
    files = bundle.meta.files
    digest = hashlib.sha256("+".join(str(files[graph_file(n)].sha256) for n in (MOE_GRAPH, MOE_DATA)).encode())
    return f"moe:{digest.hexdigest()[:32]}:{task}"


class LibraryScorer:
    """Embeddings of files (cached or encoded) and the decision from them; see the module docstring.

    ``encoder``: an ``ImageEncoderRunner`` (its precision decides the cache key); ``cache``: an
    ``EmbeddingCache`` or None (``--no-cache``: the same computation, nothing read or stored).
    """

    def __init__(self, bundle: Bundle, encoder: Any, head: HeadRunner | None, cfg: Preprocess,
                 cache: EmbeddingCache | None, batch_size: int = 16, workers: int | None = None,
                 max_pixels: int | None = None, moe_encoder: Callable[[], Any] | None = None) -> None:
        if batch_size < 1:
            raise UsageError(f"batch_size must be at least 1, not {batch_size}")
        self.bundle, self.encoder, self.head, self.cfg, self.cache = bundle, encoder, head, cfg, cache
        self.batch_size, self.workers = batch_size, workers
        self.max_pixels = max_pixels or DEFAULT_MAX_PIXELS
        self.window = batch_size * WINDOW_BATCHES
        self.counts = Recompute()
        self._moe_factory = moe_encoder
        self._moe: Any = None
        self._moe_learned: dict[str, np.ndarray] | None = None

    # -- frozen embeddings ------------------------------------------------------------------------
    def embed_window(self, paths: Sequence[Path]) -> tuple[dict[int, np.ndarray], dict[int, str | None],
                                                           dict[int, str]]:
        """Embeddings (index -> [D]), notes and errors (index -> message) of one window of files."""
        ids = [FileId.of(p) for p in paths] if self.cache is not None else [None] * len(paths)
        hits = self.cache.lookup(ids) if self.cache is not None else {}
        vectors = {i: e.vector for i, e in hits.items()}
        notes: dict[int, str | None] = {i: e.note for i, e in hits.items()}
        errors: dict[int, str] = {}
        self.counts.cached += len(hits)
        missing = [i for i in range(len(paths)) if i not in hits]
        for batch in iter_batches([paths[i] for i in missing], self.cfg, self.batch_size, workers=self.workers,
                                  max_pixels=self.max_pixels):
            for k, (_, message) in zip(batch.error_indices, batch.errors):
                errors[missing[k]] = message
            if not len(batch.paths):
                continue
            self.counts.decoded += len(batch.paths)
            emb = np.asarray(self.encoder.embed(batch.pixels), np.float32)
            self.counts.encoded += len(emb)
            stored = []
            for k, note, row in zip(batch.indices, batch.notes, emb):
                i = missing[k]
                vectors[i], notes[i] = row, note
                if ids[i] is not None:
                    stored.append((ids[i], row, note))
            if self.cache is not None:
                self.cache.store(stored)
        return vectors, notes, errors

    # -- the decision -----------------------------------------------------------------------------
    def iter_scored(self, files: Iterable[Path], label_text: np.ndarray) -> Iterator[Scored]:
        """One ``Scored`` per window of ``files`` (windows of ``window`` files, input order)."""
        if self.head is None:
            raise UsageError("this scorer has no head (embeddings only)")
        window: list[Path] = []
        for path in files:
            window.append(Path(path))
            if len(window) == self.window:
                yield self.score_window(window, label_text)
                window = []
        if window:
            yield self.score_window(window, label_text)

    def score_window(self, paths: list[Path], label_text: np.ndarray) -> Scored:
        """The decision for one window of files (``iter_scored`` yields these)."""
        vectors, notes, errors = self.embed_window(paths)
        good = [i for i in range(len(paths)) if i in vectors]
        dim = self.bundle.meta.embed_dim
        emb = np.stack([vectors[i] for i in good]) if good else np.zeros((0, dim), np.float32)
        head = self.head
        assert head is not None
        parts = [head.run(emb[s:s + self.batch_size], label_text) for s in range(0, len(emb), self.batch_size)]
        parts = parts or [head.run(emb, label_text)]
        out = {k: np.concatenate([p[k] for p in parts]) for k in (SCORES, ROUTE, GATE_RATIO)}
        scores = out[SCORES]
        if self._moe_factory is not None and len(self.bundle.tasks) and len(good):
            scores = self._moe_scores([paths[i] for i in good], scores, out[ROUTE], label_text)
        row_of = {i: r for r, i in enumerate(good)}
        return Scored(list(paths), [row_of.get(i) for i in range(len(paths))], errors, [paths[i] for i in good],
                      [notes.get(i) for i in good], emb, scores, out[ROUTE], out[GATE_RATIO])

    # -- MoE: adapted embeddings of the routed images ----------------------------------------------
    def _moe_scores(self, paths: list[Path], p_zs: np.ndarray, route: np.ndarray, label_text: np.ndarray) -> np.ndarray:
        from edgeclip.train.decision import DecisionSpec, moe_scores
        from edgeclip.train.fusion import fuse_gated

        if self._moe_learned is None:
            self._moe_learned = self.bundle.tensors(LEARNED)
        spec = DecisionSpec.from_bundle(self._moe_learned, self.bundle.meta)
        dim = self.bundle.meta.embed_dim
        adapted = np.zeros((len(paths), dim), np.float32)
        for task in sorted({int(t) for t in route if t >= 0}):
            rows = [i for i in range(len(paths)) if int(route[i]) == task]
            kind = moe_task_key(self.bundle, task)
            ids = [FileId.of(paths[i]) for i in rows] if self.cache is not None else [None] * len(rows)
            hits = self.cache.lookup(ids, kind) if self.cache is not None else {}
            self.counts.cached_adapted += len(hits)
            for j, entry in hits.items():
                adapted[rows[j]] = entry.vector
            todo = [j for j in range(len(rows)) if j not in hits]
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start:start + self.batch_size]
                pixels = self._decode([paths[rows[j]] for j in chunk])
                if self._moe is None:
                    self._moe = self._moe_factory()  # type: ignore[misc]
                vec = self._moe.run({PIXELS: pixels, TASK_IDS: np.full(len(chunk), task, np.int64)})[ADAPTED]
                self.counts.adapted += len(chunk)
                for j, row in zip(chunk, vec):
                    adapted[rows[j]] = row
                if self.cache is not None:
                    self.cache.store([(ids[j], row, None) for j, row in zip(chunk, vec) if ids[j] is not None], kind)
        s_moe = moe_scores(adapted, route, self._moe_learned[TASK_TEXT], spec)
        return fuse_gated(p_zs, s_moe, route, spec.offsets, spec.sizes, beta=1.0).astype(np.float32)

    def _decode(self, paths: list[Path]) -> np.ndarray:
        """Pixels of files that decoded before (a file that fails now is a changed file: an error)."""
        arrays = []
        for batch in iter_batches(paths, self.cfg, len(paths), workers=self.workers, max_pixels=self.max_pixels):
            if batch.errors:
                path, message = batch.errors[0]
                raise UsageError(f"{message} (the file changed during the run)")
            arrays.append(batch.pixels)
        self.counts.decoded += len(paths)
        return np.concatenate(arrays)


def make_scorer(bundle: Bundle, backend: str = "auto", precision: str = "fp32", threads: int | None = None,
                batch_size: int = 16, cache: bool = True, exact: bool | None = None, max_pixels: int | None = None,
                cuda_graph: bool = False, workers: int | None = None, head: bool = True) -> LibraryScorer:
    """A ``LibraryScorer`` over the bundle's frozen image encoder (``precision``) and its head, with the
    user's embedding cache unless ``cache`` is False or ``max_pixels`` is not the default (the decompression-bomb
    guard applies when a file is decoded: with another limit every file is decoded and checked). ``exact``: decode at full resolution (None: the
    bundle's setting). Raises UsageError, BackendUnavailableError, BundleError as the runners do."""
    from edgeclip.edgeapp.runtime import ImageEncoderRunner

    cfg = bundle.meta.preprocess.with_exact(exact)
    encoder = ImageEncoderRunner(bundle, backend, threads=threads, max_batch=batch_size, precision=precision,
                                 cuda_graph=cuda_graph)
    store = None
    if cache and (max_pixels is None or max_pixels == DEFAULT_MAX_PIXELS):  # another bomb guard: decode every file
        store = EmbeddingCache(frozen_backbone_key(bundle, cfg, precision), bundle.meta.embed_dim)
    return LibraryScorer(bundle, encoder, HeadRunner(bundle, threads) if head else None, cfg, store,
                         batch_size=batch_size, workers=workers, max_pixels=max_pixels,
                         moe_encoder=moe_encoder_factory(bundle, backend, threads))


def moe_encoder_factory(bundle: Bundle, backend: Any = "auto", threads: int | None = None) -> Callable[[], Any] | None:
    """For an MoE bundle with tasks: a function opening a session on ``moe_encoder.onnx`` (inputs pixels,
    task_ids; output the adapted embedding); None for other bundles."""
    if not (bundle.has(graph_file(MOE_GRAPH)) and bundle.tasks):
        return None
    from edgeclip.edgeapp.runtime import _graph_path, select_backend

    def open_session() -> Any:  # opened when the first routed image needs it
        resolved = select_backend(backend) if isinstance(backend, str) else backend
        return resolved.session(_graph_path(bundle, MOE_GRAPH, MOE_DATA), threads=threads)

    return open_session


@dataclass(frozen=True)
class SearchHit:
    """One ranked photo: ``rank`` (1 = best), the file's ``path`` (``os.fspath``) and its ``score``."""

    rank: int
    path: str
    score: float


@dataclass
class SearchResult:
    """``hits`` best first; ``errors`` the files that could not be read (path, message); ``scored`` how many
    photos were ranked; ``how`` what the score is (a learned class's decision score, or CLIP similarity)."""

    hits: list[SearchHit]
    errors: list[tuple[str, str]]
    scored: int
    how: str


def search_files(scorer: LibraryScorer, files: Iterable[Path], top: int, *, text: np.ndarray | None = None,
                 label_text: np.ndarray | None = None, column: int | None = None, how: str = "") -> SearchResult:
    """The ``top`` files best matching a query, over ``files`` (embeddings through ``scorer``'s cache).

    Either ``text`` [D] (a unit text embedding: score = cosine similarity of the frozen image embedding,
    as rclip ranks) or ``label_text`` [L,D] with ``column`` (a learned class: score = the bundle's decision
    score of that class, what classify reports). Ties keep input order. Raises UsageError when top < 1."""
    import heapq

    if top < 1:
        raise UsageError(f"top must be at least 1, not {top}")
    heap: list[tuple[float, int, str]] = []  # (score, -index, path): the smallest is dropped first
    errors: list[tuple[str, str]] = []
    index = scored = 0
    window: list[Path] = []

    def flush() -> None:
        nonlocal index, scored
        if text is not None:
            vectors, _, failed = scorer.embed_window(window)
            good = [i for i in range(len(window)) if i in vectors]
            values = (np.stack([vectors[i] for i in good]) @ np.asarray(text, np.float32)) if good else np.zeros(0)
            paths = [window[i] for i in good]
            errors.extend((os.fspath(window[i]), failed[i]) for i in sorted(failed))
        else:
            result = scorer.score_window(window, label_text)
            values, paths = result.scores[:, column], result.paths
            errors.extend((os.fspath(result.order[i]), msg) for i, msg in sorted(result.errors.items()))
        for path, value in zip(paths, values):
            item = (float(value), -index, os.fspath(path))
            index += 1
            if len(heap) < top:
                heapq.heappush(heap, item)
            else:
                heapq.heappushpop(heap, item)
        scored += len(paths)
        window.clear()

    for path in files:
        window.append(Path(path))
        if len(window) == scorer.window:
            flush()
    if window:
        flush()
    best = sorted(heap, key=lambda item: (-item[0], -item[1]))
    return SearchResult([SearchHit(rank, path, score) for rank, (score, _, path) in enumerate(best, 1)], errors,
                        scored, how)
