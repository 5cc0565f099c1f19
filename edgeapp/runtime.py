"""Runners over a bundle's graphs: onnxruntime (CPU, CUDA, TensorRT providers) or TensorRT itself.

No torch here. Graph file names and tensor names come from `edgeclip.layout`.

Backends:
- `ort-cpu`: onnxruntime, CPUExecutionProvider.
- `ort-cuda`: onnxruntime CUDAExecutionProvider (then CPU for unsupported ops).
- `ort-trt`: onnxruntime TensorrtExecutionProvider (then CUDA, CPU), engines cached on disk.
- `tensorrt`: an engine built by `edgeclip.export.tensorrt` from the same ONNX file.

Each backend runs graphs through its own session class behind one protocol (`GraphSession`):
`OrtSession` (onnxruntime: optimised-graph cache, IO binding, CUDA graphs) and `TensorRTSession`
(native engines); `Backend.session(...)` makes the right one, so no code compares backend names.
- `auto`: `ort-cuda` when onnxruntime offers CUDA, else `ort-cpu`. TensorRT is never picked
  automatically: a first engine build takes minutes.

Asking for a backend that is not usable raises `BackendUnavailableError` saying what to install;
every choice is logged. Sessions are created on first use, or in a background thread from the
moment a runner is made (`preload`, the default of the image and gated runners); the CPU
provider's optimised graphs are cached on disk (`edgeclip.edgeapp.ort_cache`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgeclip.bundle import Bundle
from edgeclip.errors import BackendUnavailableError, BundleError, EngineError, UsageError
from edgeclip.layout import (
    EMBEDDING,
    GATE_RATIO,
    GATED_OUTPUTS,
    LABEL_TEXT,
    PIXELS,
    PRECISION_GRAPHS,
    ROUTE,
    SCORES,
    TEXT_DATA,
    TEXT_EMBEDDING,
    TEXT_GRAPH,
    TOKENS,
    VOCAB_FILE,
    graph_file,
)

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
ORT_LOG_ENV = "EDGECLIP_ORT_LOG_LEVEL"  # onnxruntime's session log severity (default 4: fatal only; errors also raise)


# -- backend selection --------------------------------------------------------------------------
BACKENDS = ("auto", "ort-cpu", "ort-cuda", "ort-trt", "tensorrt")
_CPU, _CUDA, _TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
_PROVIDERS = {"ort-cpu": [_CPU], "ort-cuda": [_CUDA, _CPU], "ort-trt": [_TRT, _CUDA, _CPU]}
_INSTALL = {
    _CUDA: "install onnxruntime-gpu (pip install 'edgeclip[gpu]') on a machine with an NVIDIA GPU and CUDA",
    _TRT: "install onnxruntime-gpu built with TensorRT (pip install 'edgeclip[gpu,trt]') and the TensorRT "
    "libraries, on a machine with an NVIDIA GPU",
}


def engine_cache_dir() -> Path:
    """Where TensorRT engines are cached: $EDGECLIP_ENGINE_CACHE or ~/.cache/edgeclip/engines."""
    return Path(os.environ.get("EDGECLIP_ENGINE_CACHE", Path.home() / ".cache" / "edgeclip" / "engines"))


@dataclass(frozen=True)
class Backend:
    """A resolved backend: its name, for onnxruntime the provider list to use, and the session class
    that runs a graph on it (`OrtSession` unless given: `TensorRTSession` for native TensorRT).
    Code that runs graphs calls `backend.session(...)` and never compares backend names."""

    name: str
    providers: tuple[str, ...] = ()
    fp16: bool = False  # TensorRT paths only: the engines' FP16 builder flag (`--fp16`)
    engine: Callable[..., GraphSession] | None = None

    def session(self, path: Path, **options: Any) -> GraphSession:
        """A session of this backend on the graph at `path` (options: the session class's fields)."""
        return (self.engine or OrtSession)(path, self, **options)

    @property
    def precisions(self) -> tuple[str, ...]:
        """The graph precisions this backend runs: fp32 and fp16 graphs on every onnxruntime provider,
        int8 (dynamic quantisation) on onnxruntime's CPU provider only; native TensorRT builds its
        engines from the fp32 graph (fp16 there is `fp16`, the builder flag)."""
        if self.engine is not None:
            return ("fp32",)
        return ("fp32", "fp16", "int8") if self.providers == (_CPU,) else ("fp32", "fp16")


def _ort_available() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def select_backend(backend: str = "auto", fp16: bool = False) -> Backend:
    """Resolve a backend name against what is installed; raise BackendUnavailableError otherwise."""
    if backend not in BACKENDS:
        raise UsageError(f"Unknown backend '{backend}'. Choose one of: {', '.join(BACKENDS)}")
    if backend == "tensorrt":
        from edgeclip.export.tensorrt import check_available

        check_available()
        log.info("backend tensorrt: native TensorRT engine (%s)", "fp16" if fp16 else "fp32")
        return Backend("tensorrt", (), fp16, engine=TensorRTSession)
    available = _ort_available()
    if backend == "auto":
        backend = "ort-cuda" if _CUDA in available else "ort-cpu"
        log.info("backend auto -> %s (onnxruntime providers available: %s)", backend, ", ".join(available))
    wanted = _PROVIDERS[backend]
    missing = [p for p in wanted[:1] if p not in available]
    if missing:
        raise BackendUnavailableError(
            f"Backend '{backend}' needs onnxruntime's {missing[0]}, which this onnxruntime lacks "
            f"(available: {', '.join(available)}). To use it: {_INSTALL[missing[0]]}. "
            "Or choose --backend ort-cpu."
        )
    providers = tuple(p for p in wanted if p in available)
    log.info("backend %s: providers %s", backend, ", ".join(providers))
    return Backend(backend, providers, fp16)


def _provider_options(backend: Backend, profile: dict[str, tuple[tuple[int, ...], ...]] | None,
                      cuda_graph: bool = False) -> list[Any]:
    """onnxruntime's (provider, options) list; TensorRT caches its engines under engine_cache_dir();
    `cuda_graph` turns on the CUDA provider's graph capture (`enable_cuda_graph`)."""
    out: list[Any] = []
    for provider in backend.providers:
        if provider == _TRT:
            cache = engine_cache_dir() / "ort-trt"
            cache.mkdir(parents=True, exist_ok=True)
            opts: dict[str, Any] = {
                "trt_fp16_enable": backend.fp16,
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache),
                "trt_timing_cache_enable": True,
            }
            if profile:
                for key, index in (("trt_profile_min_shapes", 0), ("trt_profile_opt_shapes", 1),
                                   ("trt_profile_max_shapes", 2)):
                    opts[key] = ",".join(f"{n}:{'x'.join(map(str, s[index]))}" for n, s in profile.items())
            out.append((provider, opts))
        elif provider == _CUDA and cuda_graph:
            out.append((provider, {"enable_cuda_graph": "1"}))
        else:
            out.append(provider)
    return out


def describe_backends() -> dict[str, str]:
    """What this machine can run, for `edgeclip info`: onnxruntime providers, TensorRT, GPUs."""
    import shutil
    import subprocess

    import onnxruntime as ort

    info = {"onnxruntime": ort.__version__, "onnxruntime providers": ", ".join(_ort_available())}
    try:
        import tensorrt  # noqa: F401 - optional

        info["tensorrt"] = tensorrt.__version__
    except ImportError:
        info["tensorrt"] = "not installed (pip install 'edgeclip[trt]', or JetPack's on a Jetson)"
    gpu = "none found"
    if shutil.which("nvidia-smi"):
        try:
            query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
            gpu = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout.strip() or gpu
        except (OSError, subprocess.SubprocessError):
            pass
    info["gpu"] = gpu
    return info


# -- sessions -------------------------------------------------------------------------------------
class GraphSession(Protocol):
    """One graph run by one backend: what the runners use, whichever engine runs it.

    `start()` begins creating the session where that is cheap to do early (a no-op otherwise);
    `run(feeds)` runs the graph (input name -> array; returns output name -> array), creating the
    session on first use and raising BackendUnavailableError when it cannot be created."""

    path: Path
    cached: bool

    @property
    def device(self) -> str:
        """Where the graph's tensors live: "cuda" or "cpu"."""
        ...

    def start(self) -> None: ...

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class _Loading:
    """A session being created in a background thread; `result()` waits and re-raises its error."""

    def __init__(self, open_session: Callable[[], Any]) -> None:
        self._open = open_session
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="edgeclip-session", daemon=False)
        self._thread.start()

    def _work(self) -> None:
        try:
            self._value = self._open()
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that needs the session
            self._error = exc

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


OutputShapes = Callable[[dict[str, np.ndarray]], dict[str, tuple[tuple[int, ...], Any]]]


@dataclass
class _Bound:
    """Fixed buffers of one input shape (IO binding with pre-allocated values): what a CUDA graph
    replays. `inputs`/`outputs`: name -> OrtValue on the session's device."""

    binding: Any
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    run_options: Any


@dataclass
class OrtSession:
    """A graph run by onnxruntime (CPU, CUDA or TensorRT execution provider), created on first `run`
    (or in the background from `start`).

    `profile` (input -> (min, opt, max) shapes) feeds onnxruntime's TensorRT provider. With the CPU
    provider and a `graph_id`, the optimised graph is cached on disk (`edgeclip.edgeapp.ort_cache`):
    a later process loads it with optimisations off, which starts sooner and computes the same outputs.

    `io_binding` binds host inputs and device outputs (`bind_cpu_input`, `copy_outputs_to_cpu`) instead
    of `session.run`; off by default: on the H200 it timed the same as `run` (docs/BENCHMARKS.md). The
    fixed device buffers of `cuda_graph` are what pays.
    `cuda_graph`: CUDA graphs (CUDA provider, `enable_cuda_graph`): each distinct set of input shapes
    gets pre-allocated input and output buffers on the device and its own captured graph (memory:
    the graph's activations stay allocated per shape, so callers use few shapes; the runners pad
    batches to fixed sizes). `output_shapes(feeds)` gives each output's shape and dtype, needed to
    pre-allocate. Such a session is not started in the background (`start` is a no-op): another
    session loading meanwhile would break its capture. Off the CUDA provider the same fixed-buffer
    path runs without graph capture; where
    onnxruntime refuses capture (a graph with nodes off the GPU or control flow such as an MoE
    graph's `If`), the session is made again without it (logged; `cuda_graph_active` says which).
    """

    path: Path
    backend: Backend
    threads: int | None = None
    profile: dict[str, tuple[tuple[int, ...], ...]] | None = None
    graph_id: str | None = None  # identifies the graph's content for the engine cache
    optimized_cache: bool = True  # use the optimised-graph cache (off for throwaway graphs, e.g. eval's)
    io_binding: bool | None = None
    cuda_graph: bool = False
    output_shapes: OutputShapes | None = field(default=None, repr=False)
    disabled_optimizers: tuple[str, ...] = ()  # onnxruntime graph transformers to skip (by name)
    _session: Any = field(default=None, repr=False)
    _loading: _Loading | None = field(default=None, repr=False)
    _pending: Any = field(default=None, repr=False)  # ort_cache.PendingEntry to check after the first run
    _lock: Any = field(default_factory=threading.Lock, repr=False, compare=False)
    _bound: dict[Any, _Bound] = field(default_factory=dict, repr=False)
    cached: bool = field(default=False, repr=False)  # True when loaded from the optimised-graph cache
    cuda_graph_active: bool = field(default=False, repr=False)  # captured CUDA graphs in use

    def __post_init__(self) -> None:
        if self.io_binding is None:  # measured on the H200: binding host arrays gains nothing over run()
            self.io_binding = False
        if self.cuda_graph and self.output_shapes is None:
            raise ValueError("cuda_graph needs output_shapes (the outputs are pre-allocated)")

    @property
    def device(self) -> str:
        """onnxruntime's device name of the first provider's memory: "cuda" or "cpu"."""
        return "cuda" if self.backend.providers and self.backend.providers[0] in (_CUDA, _TRT) else "cpu"

    def start(self) -> None:
        """Begin creating the onnxruntime session in a background thread, so that the caller can
        decode images meanwhile (onnxruntime releases the GIL while it loads a graph); `run` waits
        for it and raises its error, if any. A no-op when the session exists or is loading."""
        with self._lock:
            # not with CUDA graphs: a session loading on another thread (its weights copied to the GPU)
            # while this one captures invalidates the capture (CUDA error 901, seen on the H200)
            if self._session is None and self._loading is None and not self.cuda_graph:
                self._loading = _Loading(self._open)

    def _options(self, ort: Any) -> Any:
        options = ort.SessionOptions()
        # Image decoding threads share the cores with the engine (classify, add-task): worker threads
        # spinning after each run took a quarter of the inference CPU time from them.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # onnxruntime's own log at FATAL unless asked (0 verbose .. 4 fatal): its warnings are about its
        # placement choices (an MoE graph's If condition copied to the host on CUDA), printed with ANSI
        # colours on every start; the fallback that matters (a provider not started) raises here anyway,
        # and so does every error it logs while running (reported in one line: EngineError).
        level = os.environ.get(ORT_LOG_ENV, "4").strip()
        options.log_severity_level = int(level) if level in ("0", "1", "2", "3", "4") else 4
        if self.threads:
            options.intra_op_num_threads = int(self.threads)
            options.inter_op_num_threads = 1
        return options

    def _saved_graph_options(self, ort: Any) -> Any:
        """Options for an optimised graph that onnxruntime saved itself (`ort_cache`): optimisations
        off, and its log at ERROR: onnxruntime writes such graphs with the constants it folded into an
        MoE graph's `If` branches also in the outer graph, and warns about those duplicates on every
        load, for a file the user never made (the bundle's own graphs load without warnings)."""
        options = self._options(ort)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = max(options.log_severity_level, 3)
        return options

    def _create(self, ort: Any, path: Path, options: Any, cuda_graph: bool = False) -> Any:
        try:
            return ort.InferenceSession(str(path), options,
                                        providers=_provider_options(self.backend, self.profile, cuda_graph),
                                        disabled_optimizers=list(self.disabled_optimizers) or None)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendUnavailableError(
                f"onnxruntime cannot load {self.path.name} with {', '.join(self.backend.providers)}: {exc}"
            ) from exc

    def _create_fresh(self, ort: Any, pending: Any) -> Any:
        """A session on the graph itself (not a cached one); CUDA graphs when asked and possible."""
        capture = self.cuda_graph and _CUDA in self.backend.providers[:1]
        if self.cuda_graph and not capture:
            log.info("%s: CUDA graphs need the CUDA provider; fixed buffers without capture on %s",
                     self.path.name, ", ".join(self.backend.providers))
        if capture:
            try:
                session = self._create(ort, self.path, self._options(ort), cuda_graph=True)
                self.cuda_graph_active = True
                return session
            except BackendUnavailableError as exc:
                log.warning("%s: onnxruntime refuses CUDA graphs for this graph (%s); running without them",
                            self.path.name, str(exc).splitlines()[0][:300])
        options = self._options(ort)
        if pending is not None:
            pending.configure(options)
        return self._create(ort, self.path, options)

    def _open(self) -> Any:
        import onnxruntime as ort

        from edgeclip.edgeapp.ort_cache import OptimizedGraphCache

        cache = (OptimizedGraphCache.for_graph(engine_cache_dir(), self.graph_id, self.backend.providers)
                 if self.graph_id and self.optimized_cache and not self.cuda_graph else None)
        session, pending = None, None
        if cache is not None:
            hit = cache.lookup()
            if hit:
                options = self._saved_graph_options(ort)
                try:
                    session = self._create(ort, hit, options)
                    self.cached = True
                except BackendUnavailableError as exc:
                    cache.discard(f"onnxruntime cannot load it: {exc}")
            if session is None and hit is not False:
                pending = cache.begin()
        if session is None:
            try:
                session = self._create_fresh(ort, pending)
            except BaseException:
                if pending is not None:
                    pending.abandon()
                raise
        active = session.get_providers()
        if self.backend.providers and self.backend.providers[0] not in active:
            if pending is not None:
                pending.abandon()
            # onnxruntime falls back to CPU quietly (no GPU, missing CUDA libraries): say so.
            raise BackendUnavailableError(
                f"Backend '{self.backend.name}': onnxruntime could not start {self.backend.providers[0]} "
                f"(running would fall back to {', '.join(active)}). Check the GPU driver and CUDA/TensorRT "
                "libraries, or choose --backend ort-cpu."
            )
        self._pending = pending
        log.info("%s: session on %s%s%s", self.path.name, ", ".join(active),
                 " (optimised graph from the cache)" if self.cached else "",
                 " with CUDA graphs" if self.cuda_graph_active else "")
        return session

    def _session_now(self) -> Any:
        with self._lock:
            if self._session is None:
                if self._loading is not None:
                    loading, self._loading = self._loading, None
                    self._session = loading.result()
                else:
                    self._session = self._open()
            return self._session

    def _run_plain(self, session: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feeds)))

    def _run_binding(self, session: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """IO binding: host inputs copied once to the device, outputs left where onnxruntime puts them
        and copied back once."""
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        names = [o.name for o in session.get_outputs()]
        for name in names:
            binding.bind_output(name, self.device)
        session.run_with_iobinding(binding)
        return dict(zip(names, binding.copy_outputs_to_cpu()))

    def _run_fixed(self, session: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Fixed device buffers per input shape, the inputs updated in place: the same addresses on
        every run of that shape, as a captured CUDA graph needs (its `gpu_graph_id` is the shape's)."""
        import onnxruntime as ort

        key = tuple((name, value.shape, value.dtype.str) for name, value in sorted(feeds.items()))
        bound = self._bound.get(key)
        if bound is None:
            assert self.output_shapes is not None
            binding = session.io_binding()
            # allocated by onnxruntime (on the CPU device, ortvalue_from_numpy would wrap the caller's array)
            inputs = {n: ort.OrtValue.ortvalue_from_shape_and_type(list(v.shape), v.dtype, self.device, 0)
                      for n, v in feeds.items()}
            outputs = {n: ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.device, 0)
                       for n, (shape, dtype) in self.output_shapes(feeds).items()}
            for name, value in inputs.items():
                binding.bind_ortvalue_input(name, value)
            for name, value in outputs.items():
                binding.bind_ortvalue_output(name, value)
            run_options = ort.RunOptions()
            if self.cuda_graph_active:
                run_options.add_run_config_entry("gpu_graph_id", str(len(self._bound) + 1))
            bound = self._bound[key] = _Bound(binding, inputs, outputs, run_options)
        for name, value in feeds.items():
            bound.inputs[name].update_inplace(value)
        session.run_with_iobinding(bound.binding, bound.run_options)
        # copies: on the CPU device numpy() is a view of the buffer that the next run overwrites
        return {name: np.array(value.numpy(), copy=True) for name, value in bound.outputs.items()}

    def _check_saved(self, feeds: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
        """After the first run of a fresh session: publish its saved optimised graph if that graph,
        loaded with optimisations off, gives the same outputs on the same inputs."""
        pending, self._pending = self._pending, None
        if pending is None:  # another thread's run is checking it
            return
        import onnxruntime as ort

        def run_saved(path: Path) -> dict[str, np.ndarray]:
            try:
                session = self._create(ort, path, self._saved_graph_options(ort))
            except BackendUnavailableError as exc:  # e.g. a saved graph with an If that breaks SSA form
                log.info("optimised-graph cache: onnxruntime cannot load its own saved graph (%s)", exc)
                return {}  # no outputs: marked unusable for this graph, not tried again on every start
            return self._run_plain(session, feeds)

        pending.publish(run_saved, want)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph: input name -> array, returns output name -> array. Creates (or waits for)
        the session; raises BackendUnavailableError when it cannot be created, EngineError when
        onnxruntime fails while running it (one line: its message, flattened). A fresh session's
        first run also checks and publishes its optimised graph for the cache (module docstring)."""
        session = self._session_now()
        try:
            if self.cuda_graph:
                with self._lock:  # the fixed buffers are shared state
                    return self._run_fixed(session, feeds)
            out = (self._run_binding if self.io_binding else self._run_plain)(session, feeds)
        except Exception as exc:
            if not type(exc).__module__.startswith("onnxruntime"):
                raise
            cause = " ".join(str(exc).split())[:300]
            raise EngineError(f"onnxruntime failed running {self.path.name}: {cause}") from exc
        if self._pending is not None:
            self._check_saved(feeds, out)
        return out


@dataclass
class TensorRTSession:
    """A graph run by a native TensorRT engine built from it (`edgeclip.export.tensorrt`), built or
    loaded from the engine cache on first `run`; never started early (a first build takes minutes).
    fp16 when the backend says so (`--fp16`: TensorRT's FP16 builder flag on the fp32 graph);
    batches larger than the profile's max are split by the engine runner."""

    path: Path
    backend: Backend
    threads: int | None = None  # unused: TensorRT runs on the GPU
    profile: dict[str, tuple[tuple[int, ...], ...]] | None = None
    graph_id: str | None = None
    optimized_cache: bool = True  # unused: engines have their own cache
    io_binding: bool | None = None  # unused: the engine runner binds device buffers itself
    cuda_graph: bool = False  # unused
    output_shapes: OutputShapes | None = field(default=None, repr=False)
    disabled_optimizers: tuple[str, ...] = ()  # unused
    _engine: Any = field(default=None, repr=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False, compare=False)
    cached: bool = field(default=False, repr=False)
    cuda_graph_active: bool = field(default=False, repr=False)

    @property
    def device(self) -> str:
        """Always "cuda": TensorRT runs on the GPU."""
        return "cuda"

    def start(self) -> None:
        """Nothing to do early: an engine build can take minutes, it waits for the first `run`."""

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the engine; builds it (or loads it from the cache) on first use."""
        with self._lock:
            if self._engine is None:
                from edgeclip.export.tensorrt import EngineSpec, TrtRunner, build_engine

                spec = EngineSpec(precision="fp16" if self.backend.fp16 else "fp32", profile=self.profile or {})
                self._engine = TrtRunner(build_engine(self.path, spec, engine_cache_dir(), graph_id=self.graph_id))
        return self._engine.run(feeds)


def _graph_path(bundle: Bundle, graph: str, data: str) -> Path:
    """A bundle graph whose external-data file lies beside it (ONNX resolves it by plain name): both in
    the shared graph store (``BUNDLE/graphs/``, docs/EXPORT.md), or both version files (bundles
    written before the store)."""
    path = bundle.path(graph_file(graph))
    data_path = bundle.path(graph_file(data))
    if data_path.parent != path.parent:
        raise BundleError(
            f"Bundle {bundle.root} version {bundle.version}: {graph} and its weights {data} must lie in the same "
            "folder (both in the graph store, written with VersionWriter.write_graph)."
        )
    return path


def _graph_id(bundle: Bundle, *names: str) -> str:
    return "+".join(str(bundle.meta.files[graph_file(n)].sha256) for n in names)


def _pixels(bundle: Bundle, pixels: np.ndarray) -> np.ndarray:
    size = bundle.meta.preprocess.image_size
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    if pixels.ndim != 4 or pixels.shape[1:] != (3, size, size):
        raise UsageError(f"pixels must have shape [B, 3, {size}, {size}], got {list(pixels.shape)}")
    return pixels


def resolve_precision(bundle: Bundle, backend: str | Backend, precision: str) -> Backend:
    """The backend to run `precision` on, checked against what the bundle holds.

    fp16 runs on every onnxruntime backend (`edgeclip export --precision fp16` writes its graphs);
    int8 (dynamic quantisation) is an onnxruntime CPU speed-up: `auto` gives ort-cpu, any other
    backend is refused. Native TensorRT runs the fp32 graph (its `--fp16` builds fp16 engines).
    Raises UsageError on an unknown or unsupported precision, BundleError when the graphs are missing."""
    if precision not in PRECISIONS:
        raise UsageError(f"Unknown precision '{precision}'. Choose one of: {', '.join(PRECISIONS)}")
    if precision == "int8" and backend == "auto":
        log.info("precision int8: backend auto -> ort-cpu (int8 dynamic quantisation is a CPU speed-up)")
        backend = "ort-cpu"
    resolved = backend if isinstance(backend, Backend) else select_backend(backend)
    if precision not in resolved.precisions:
        hint = ("--precision int8 runs on onnxruntime's CPU only (--backend ort-cpu or auto); on a GPU use "
                "--precision fp16, or --backend tensorrt with --fp16" if precision == "int8" else
                f"--backend {resolved.name} builds its engines from the fp32 graph: use --fp16 for fp16 engines")
        raise UsageError(f"--precision {precision} is not offered on '{resolved.name}': {hint}.")
    if precision == "fp32":
        return resolved
    gated, encoder, _ = PRECISION_GRAPHS[precision]
    if not bundle.has(graph_file(encoder)) or not bundle.has(graph_file(gated)):
        made_by = "--int8" if precision == "int8" else f"--precision {precision}"
        raise BundleError(f"Bundle {bundle.root} version {bundle.version} has no {precision} graphs; "
                          f"run `edgeclip export {made_by} --bundle {bundle.root}` first.")
    return resolved


# onnxruntime 1.32's CPU NCHWc layout transformer crashes the process (SIGSEGV) on a float16 graph's
# Conv behind its inserted Casts; the other optimisation levels run it correctly.
_SKIP_OPTIMIZERS = {"fp16": ("NchwcTransformer",)}


def fixed_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a runner with fixed shapes (CUDA graphs) pads to: 1 and powers of two up to
    `max_batch`, and `max_batch` itself. A batch of n runs as the smallest of these >= n."""
    sizes = {1, int(max_batch)}
    size = 2
    while size < max_batch:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


def _padded_runs(pixels: np.ndarray, sizes: tuple[int, ...]) -> list[tuple[np.ndarray, int]]:
    """`pixels` as chunks of the fixed batch sizes: (chunk padded by repeating its last image, real
    rows). Repeating a real image keeps the padding on that image's route (no extra adapted pass)."""
    out, start, largest = [], 0, sizes[-1]
    while start < len(pixels):
        chunk = pixels[start:start + largest]
        size = next(s for s in sizes if s >= len(chunk))
        if size > len(chunk):
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), axis=0)])
        out.append((np.ascontiguousarray(chunk), min(largest, len(pixels) - start)))
        start += largest
    return out


def _run_fixed(session: GraphSession, pixels: np.ndarray, sizes: tuple[int, ...] | None,
               feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
    """Run `session` on `pixels` (+ `feeds`); with fixed `sizes`, as padded chunks joined again."""
    if sizes is None:
        out = session.run({PIXELS: pixels, **feeds})
        return {name: out[name] for name in outputs}
    parts = [(session.run({PIXELS: chunk, **feeds}), n) for chunk, n in _padded_runs(pixels, sizes)]
    return {name: np.concatenate([out[name][:n] for out, n in parts]) for name in outputs}


def _image_profile(bundle: Bundle, max_batch: int) -> dict[str, tuple[tuple[int, ...], ...]]:
    s = bundle.meta.preprocess.image_size
    return {PIXELS: ((1, 3, s, s), (min(8, max_batch), 3, s, s), (max_batch, 3, s, s))}


CPU_ENCODER_BATCH = 8  # images per encoder run on a CPU: as fast as 32, and ~1.2 GB less for ViT-B-16


class ImageEncoderRunner:
    """The plain frozen image encoder: `embed(pixels [B,3,S,S]) -> [B,D]` (L2-normalised, float32).

    `batch_size`: how many images a caller should give at once: `CPU_ENCODER_BATCH` on a CPU, where
    onnxruntime's arena keeps the largest run's activations (ViT-B-16: 2.0 GB resident at 32 images
    against 0.8 GB at 8, at the same images per second: docs/BENCHMARKS.md), else ``max_batch``.

    precision: "fp32", "fp16" (float16 compute, float32 in and out) or "int8" (`resolve_precision`).
    `preload`: start creating the onnxruntime session now, in the background (`GraphSession.start`).
    `cuda_graph`: CUDA graphs on ort-cuda (`OrtSession`); batches run padded to `fixed_batch_sizes(max_batch)`."""

    def __init__(self, bundle: Bundle, backend: str | Backend = "auto", threads: int | None = None,
                 max_batch: int = 32, precision: str = "fp32", preload: bool = True,
                 optimized_cache: bool = True, cuda_graph: bool = False) -> None:
        self.bundle = bundle
        resolved = resolve_precision(bundle, backend, precision)
        self.backend_name, self.precision = resolved.name, precision
        self.dim = bundle.meta.embed_dim
        _, graph, data = PRECISION_GRAPHS[precision]
        self.fixed = fixed_batch_sizes(max_batch) if cuda_graph else None

        def shapes(feeds: dict[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], Any]]:
            return {EMBEDDING: ((len(feeds[PIXELS]), self.dim), np.float32)}

        self.session = resolved.session(_graph_path(bundle, graph, data), threads=threads,
                                        profile=_image_profile(bundle, max_batch),
                                        graph_id=_graph_id(bundle, graph, data), optimized_cache=optimized_cache,
                                        cuda_graph=cuda_graph, output_shapes=shapes,
                                        disabled_optimizers=_SKIP_OPTIMIZERS.get(precision, ()))
        self.batch_size = min(CPU_ENCODER_BATCH, max_batch) if self.session.device == "cpu" else max_batch
        if preload:
            self.session.start()

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        pixels = _pixels(self.bundle, pixels)
        if len(pixels) == 0:
            return np.zeros((0, self.dim), np.float32)
        return _run_fixed(self.session, pixels, self.fixed, {}, (EMBEDDING,))[EMBEDDING]


class TextEncoderRunner:
    """The frozen text encoder with the torch-free tokenizer: `embed(texts) -> [N,D]` (L2-normalised).

    The tokenizer is the one the manifest's ``backbone.text`` describes (CLIP BPE or a Hugging Face
    tokenizer.json stored in the bundle, with the model's cleaning, context length and pad rules);
    bundles made before that section existed use the CLIP BPE defaults."""

    def __init__(self, bundle: Bundle, backend: str | Backend = "auto", threads: int | None = None,
                 batch_size: int = 64) -> None:
        self.bundle = bundle
        self.batch_size = int(batch_size)
        self.backend = backend if isinstance(backend, Backend) else select_backend(backend)
        self.threads = threads
        self._session: GraphSession | None = None
        self._tokenizer: Any = None

    @property
    def session(self) -> GraphSession:
        """The text encoder's session, made on first use: classify without new labels never reads
        (nor verifies) the text encoder's files."""
        if self._session is None:
            ctx = self.context_length
            profile = {TOKENS: ((1, ctx), (self.batch_size, ctx), (self.batch_size, ctx))}
            self._session = self.backend.session(_graph_path(self.bundle, TEXT_GRAPH, TEXT_DATA),
                                                 threads=self.threads, profile=profile,
                                                 graph_id=_graph_id(self.bundle, TEXT_GRAPH, TEXT_DATA))
        return self._session

    @property
    def context_length(self) -> int:
        """The text encoder's token count: the manifest's ``backbone.text`` (CLIP's 77 for older bundles)."""
        backbone = self.bundle.meta.backbone
        return backbone.text.context_length if backbone.text is not None else (backbone.context_length or 77)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from edgeclip.tokenizer import ClipTokenizer, tokenizer_from_spec

            text = self.bundle.meta.backbone.text
            if text is None:  # a bundle from before init recorded the text side: CLIP BPE, open_clip's cleaning
                self._tokenizer = ClipTokenizer(self.bundle.path(VOCAB_FILE), context_length=self.context_length)
            else:
                self._tokenizer = tokenizer_from_spec(text, self.bundle.path(text.file))
        return self._tokenizer

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        out = [self.session.run({TOKENS: self.tokenizer(texts[i:i + self.batch_size])})[TEXT_EMBEDDING]
               for i in range(0, len(texts), self.batch_size)]
        dim = self.bundle.meta.embed_dim
        return np.concatenate(out) if out else np.zeros((0, dim), np.float32)

    def class_embeddings(self, classes: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        """Zero-shot classifier [C,D]: each class's prompts embedded, averaged, re-normalised."""
        if not templates:
            raise UsageError("at least one prompt template is needed")
        prompts = [t.replace("{}", c) for c in classes for t in templates]
        feats = self.embed(prompts).reshape(len(classes), len(templates), -1).mean(axis=1)
        return (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32)


class GatedRunner:
    """The bundle's whole decision (graphs/gated.onnx; precision "fp16": gated_fp16.onnx, "int8":
    gated_int8.onnx; the decision itself is float32 in all three).

    `run(pixels [B,3,S,S], label_text [L,D])` -> {"scores" [B,L], "route" [B] int64 (-1 = zero-shot),
    "gate_ratio" [B,T], "embedding" [B,D]}. Rows 0..C-1 of label_text must be the learned classes.
    `preload`: start creating the onnxruntime session now, in the background (`GraphSession.start`),
    so that it loads while the caller decodes images and builds the label space.
    `cuda_graph`: CUDA graphs on ort-cuda (`OrtSession`): batches run padded to
    `fixed_batch_sizes(max_batch)`, one captured graph (and its memory) per size and label count.
    """

    def __init__(self, bundle: Bundle, backend: str | Backend = "auto", threads: int | None = None,
                 max_batch: int = 32, max_labels: int = 4096, precision: str = "fp32", preload: bool = True,
                 optimized_cache: bool = True, cuda_graph: bool = False) -> None:
        self.bundle = bundle
        resolved = resolve_precision(bundle, backend, precision)
        self.dim = dim = bundle.meta.embed_dim
        n_learned = max(len(bundle.learned_classes), 1)
        profile = {**_image_profile(bundle, max_batch),
                   LABEL_TEXT: ((1, dim), (max(n_learned, min(1000, max_labels)), dim), (max_labels, dim))}
        self.backend_name, self.precision = resolved.name, precision
        graph, _, data = PRECISION_GRAPHS[precision]
        self.fixed = fixed_batch_sizes(max_batch) if cuda_graph else None
        n_tasks = len(bundle.tasks)

        def shapes(feeds: dict[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], Any]]:
            b, labels = len(feeds[PIXELS]), len(feeds[LABEL_TEXT])
            return {SCORES: ((b, labels), np.float32), ROUTE: ((b,), np.int64),
                    GATE_RATIO: ((b, n_tasks), np.float32), EMBEDDING: ((b, dim), np.float32)}

        self.session = resolved.session(_graph_path(bundle, graph, data), threads=threads, profile=profile,
                                        graph_id=_graph_id(bundle, graph, data), optimized_cache=optimized_cache,
                                        cuda_graph=cuda_graph, output_shapes=shapes,
                                        disabled_optimizers=_SKIP_OPTIMIZERS.get(precision, ()))
        if preload:
            self.session.start()

    def run(self, pixels: np.ndarray, label_text: np.ndarray) -> dict[str, np.ndarray]:
        pixels = _pixels(self.bundle, pixels)
        label_text = np.ascontiguousarray(label_text, dtype=np.float32)
        dim = self.dim
        n_learned = len(self.bundle.learned_classes)
        if label_text.ndim != 2 or label_text.shape[1] != dim or label_text.shape[0] < max(n_learned, 1):
            raise UsageError(
                f"label_text must have shape [L, {dim}] with L >= {max(n_learned, 1)} (the learned classes "
                f"first), got {list(label_text.shape)}"
            )
        if len(pixels) == 0:
            return {SCORES: np.zeros((0, len(label_text)), np.float32), ROUTE: np.zeros(0, np.int64),
                    GATE_RATIO: np.zeros((0, len(self.bundle.tasks)), np.float32),
                    EMBEDDING: np.zeros((0, dim), np.float32)}
        out = _run_fixed(self.session, pixels, self.fixed, {LABEL_TEXT: label_text}, GATED_OUTPUTS)
        self._check_outputs(out, len(pixels), len(label_text))
        return out

    def _check_outputs(self, out: dict[str, np.ndarray], batch: int, labels: int) -> None:
        """Refuse (BundleError) outputs that do not fit this version: a graph from another version, or
        tampered with, whose routes name tasks the manifest lacks or whose shapes differ."""
        n_tasks = len(self.bundle.tasks)
        want = {SCORES: (batch, labels), ROUTE: (batch,), GATE_RATIO: (batch, n_tasks), EMBEDDING: (batch, self.dim)}
        got = {name: tuple(np.shape(out[name])) if name in out else None for name in want}
        route = np.asarray(out.get(ROUTE, np.zeros(0, np.int64)))
        bad_route = route.size and (route.dtype.kind not in "iu" or route.min() < -1 or route.max() >= n_tasks)
        if got != want or bad_route:
            raise BundleError(
                f"The gated graph's outputs do not fit version {self.bundle.version} ({n_tasks} tasks, {labels} "
                f"labels): shapes {got}, routes {sorted(set(route.tolist()))[:5] if route.size else []}. The graph "
                "does not belong to this version; run 'edgeclip verify'.")
