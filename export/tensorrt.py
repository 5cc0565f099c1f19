"""TensorRT engines built from the bundle's ONNX graphs, cached by what makes them valid, and a runner.

An engine is only valid for one GPU architecture, one TensorRT version, one precision and one
optimisation profile (min/opt/max input shapes), and for the graph it was built from. The cache
key covers all of them; a mismatch builds a new engine. The cache holds raw engine bytes
(`<key>.engine`) and JSON metadata (`<key>.json`) written after the engine: never pickle.

Needs `tensorrt` (10.x) and `cuda-python` (`cuda.bindings.runtime`) and an NVIDIA GPU; without
them `check_available` raises BackendUnavailableError with what to install. No torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeclip.bundle import sha256_of
from edgeclip.errors import BackendUnavailableError, EdgeclipError, UsageError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
Shape = tuple[int, ...]
_INSTALL = ("pip install 'edgeclip[trt]' (tensorrt>=10) and cuda-python, with an NVIDIA driver and GPU; "
            "or choose --backend ort-cpu")


class EngineBuildError(EdgeclipError):
    """TensorRT could not parse the graph or build an engine from it."""


def _import_trt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(f"The tensorrt backend needs the 'tensorrt' package: {_INSTALL}") from exc
    if int(trt.__version__.split(".")[0]) < 10:
        raise BackendUnavailableError(f"TensorRT {trt.__version__} is too old; edgeclip needs TensorRT 10: {_INSTALL}")
    return trt


def _import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError as exc:
            raise BackendUnavailableError(f"The tensorrt backend needs 'cuda-python': {_INSTALL}") from exc
    return cudart


def _cuda(result: Any) -> Any:
    """Unpack a cuda-python call's (error, value...) tuple; raise on error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    cudart = _import_cudart()
    if err != cudart.cudaError_t.cudaSuccess:
        raise BackendUnavailableError(f"CUDA call failed: {cudart.cudaGetErrorString(err)[1].decode()}")
    return values[0] if len(values) == 1 else tuple(values)


def gpu_identity(device: int = 0) -> dict[str, str]:
    """The GPU an engine is built for: {"gpu": name, "compute_capability": "major.minor"} of CUDA
    device ``device``. Raises BackendUnavailableError without cuda-python or a GPU, or when a CUDA call fails."""
    cudart = _import_cudart()
    count = _cuda(cudart.cudaGetDeviceCount())
    if count < 1:
        raise BackendUnavailableError(f"No CUDA GPU found: {_INSTALL}")
    props = _cuda(cudart.cudaGetDeviceProperties(device))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"gpu": name.strip("\x00 "), "compute_capability": f"{props.major}.{props.minor}"}


def check_available() -> None:
    """Raise BackendUnavailableError unless TensorRT, cuda-python and a GPU are all present."""
    _import_trt()
    gpu_identity()


@dataclass(frozen=True)
class EngineSpec:
    """How to build: precision and one optimisation profile {input: (min, opt, max) shape}.

    precision: "fp32" or "fp16"; workspace_bytes: TensorRT's workspace memory pool limit in bytes
    (4 GiB by default). Raises UsageError on an unknown precision, or a profile that is not three
    shapes of one rank with min <= opt <= max in every dimension.
    """

    precision: str = "fp32"
    profile: dict[str, tuple[Shape, Shape, Shape]] = field(default_factory=dict)
    workspace_bytes: int = 4 << 30

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        for name, shapes in self.profile.items():
            if len(shapes) != 3 or any(len(s) != len(shapes[0]) for s in shapes):
                raise UsageError(f"profile of {name!r} must be three shapes of one rank, got {shapes}")
            if any(not (a <= b <= c) for a, b, c in zip(*shapes)):
                raise UsageError(f"profile of {name!r} needs min <= opt <= max per dimension, got {shapes}")

    def to_json(self) -> dict[str, Any]:
        """JSON-ready fields (shapes as lists, profile sorted by input), part of the engine cache key."""
        data = asdict(self)
        data["profile"] = {k: [list(s) for s in v] for k, v in sorted(self.profile.items())}
        return data


def graph_digest(onnx_path: Path) -> str:
    """The graph's identity: its file and every external-data file beside it that it names.

    Their sha256 hex digests joined with "+". Raises OSError when a file cannot be read.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    names = sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})
    return "+".join([sha256_of(onnx_path)] + [sha256_of(onnx_path.parent / n) for n in names])


def engine_metadata(graph_id: str, spec: EngineSpec) -> dict[str, Any]:
    """Everything an engine's validity depends on: graph identity, TensorRT version, GPU and ``spec``.

    Raises BackendUnavailableError without TensorRT 10, cuda-python or a GPU.
    """
    trt = _import_trt()
    return {"graph": graph_id, "tensorrt": trt.__version__, **gpu_identity(), **spec.to_json()}


def engine_key(meta: dict[str, Any]) -> str:
    """The cache key of ``engine_metadata`` output: 32 hex characters of the sha256 of its sorted JSON."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:32]


def build_engine(onnx_path: Path | str, spec: EngineSpec, cache_dir: Path | str, graph_id: str | None = None) -> Path:
    """The engine file for (graph, spec, this GPU, this TensorRT), built when the cache lacks it.

    `graph_id`: the graph's content identity when the caller knows it (a bundle manifest's sha256s);
    else the files are hashed. Returns ``<cache_dir>/<key>.engine``; files are written atomically,
    metadata last. Raises BackendUnavailableError (no TensorRT 10, cuda-python or GPU) and
    EngineBuildError (graph not parsed, a dynamic input without a profile, or the build failed).
    """
    onnx_path, cache_dir = Path(onnx_path), Path(cache_dir)
    meta = engine_metadata(graph_id or graph_digest(onnx_path), spec)
    key = engine_key(meta)
    engine_path, meta_path = cache_dir / f"{key}.engine", cache_dir / f"{key}.json"
    if engine_path.is_file() and meta_path.is_file():
        try:
            if json.loads(meta_path.read_text(encoding="utf-8")) == meta:
                log.info("TensorRT engine from cache: %s", engine_path)
                return engine_path
        except (OSError, json.JSONDecodeError):
            pass  # unreadable metadata: rebuild
    log.info("building a TensorRT %s engine for %s (this takes minutes)", spec.precision, onnx_path.name)
    data = _build(onnx_path, spec)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for path, payload in ((engine_path, data), (meta_path, json.dumps(meta, indent=2).encode())):
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(payload)
        os.replace(tmp, path)  # metadata last: an engine without it is never used
    return engine_path


def _build(onnx_path: Path, spec: EngineSpec) -> bytes:
    trt = _import_trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_bytes)
    if spec.precision == "fp16":
        if not builder.platform_has_fast_fp16:
            log.warning("this GPU has no fast fp16; building fp16 anyway")
        config.set_flag(trt.BuilderFlag.FP16)
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    dynamic = [t.name for t in inputs if any(d < 0 for d in t.shape)]
    missing = [n for n in dynamic if n not in spec.profile]
    if missing:
        raise EngineBuildError(f"{onnx_path.name}: inputs {missing} have dynamic shapes and need a profile")
    if dynamic:
        profile = builder.create_optimization_profile()
        for name in dynamic:
            profile.set_shape(name, *(tuple(s) for s in spec.profile[name]))
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)")
    return bytes(serialized)


class TrtRunner:
    """Runs an engine: `run({input: array}) -> {output: array}` on GPU 0, one CUDA stream.

    Batches larger than the profile's max batch are split (every edgeclip graph is row-wise
    in its first dimension). Device buffers are kept and grown as needed; ``close`` frees them.
    Raises BackendUnavailableError without TensorRT or cuda-python, EngineBuildError when the engine
    file cannot be deserialised (another GPU or TensorRT version: delete it to rebuild).
    """

    def __init__(self, engine_path: Path | str) -> None:
        trt = _import_trt()
        self._trt = trt
        self._cudart = _import_cudart()
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise EngineBuildError(f"TensorRT cannot load the engine {engine_path}; delete it to rebuild")
        self.context = self.engine.create_execution_context()
        self.stream = _cuda(self._cudart.cudaStreamCreate())
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self.max_batch = min(
            (self.engine.get_tensor_profile_shape(n, 0)[2][0] for n in self.inputs
             if -1 in tuple(self.engine.get_tensor_shape(n))), default=None)

    def _device(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < max(nbytes, 1):
            if ptr:
                _cuda(self._cudart.cudaFree(ptr))
            ptr = _cuda(self._cudart.cudaMalloc(max(nbytes, 1)))
            self._buffers[name] = (ptr, max(nbytes, 1))
        return ptr

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the engine: input name -> host array (cast to the engine's dtype), output name -> new
        host array. Inputs batched beyond the profile's max batch are split along dimension 0.
        Raises EdgeclipError for a shape outside the profile or a failed execution,
        BackendUnavailableError when a CUDA call fails, KeyError when an input is missing."""
        first = feeds[self.inputs[0]]
        if self.max_batch and len(first) > self.max_batch:  # split along the batch dimension
            batched = {n for n in self.inputs if len(feeds[n]) == len(first)}
            parts = [self.run({n: (a[i:i + self.max_batch] if n in batched else a) for n, a in feeds.items()})
                     for i in range(0, len(first), self.max_batch)]
            return {n: np.concatenate([p[n] for p in parts]) for n in self.outputs}
        return self._run_once(feeds)

    def _run_once(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        trt, cudart = self._trt, self._cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        hosts = {}
        for name in self.inputs:
            array = np.ascontiguousarray(feeds[name], dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
            hosts[name] = array
            if not self.context.set_input_shape(name, array.shape):
                raise EdgeclipError(f"input {name} of shape {array.shape} is outside the engine's profile")
            ptr = self._device(name, array.nbytes)
            _cuda(cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, h2d, self.stream))
            self.context.set_tensor_address(name, ptr)
        results = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EdgeclipError(f"output {name} has a data-dependent shape {shape}, not supported")
            results[name] = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
            self.context.set_tensor_address(name, self._device(name, results[name].nbytes))
        if not self.context.execute_async_v3(self.stream):
            raise EdgeclipError("TensorRT execution failed")
        for name, array in results.items():
            if array.nbytes:
                _cuda(cudart.cudaMemcpyAsync(array.ctypes.data, self._buffers[name][0], array.nbytes, d2h,
                                             self.stream))
        _cuda(cudart.cudaStreamSynchronize(self.stream))
        return results

    def close(self) -> None:
        """Free the device buffers and the CUDA stream (idempotent; also called on garbage collection)."""
        for ptr, _ in self._buffers.values():
            self._cudart.cudaFree(ptr)
        self._buffers.clear()
        if self.stream is not None:
            self._cudart.cudaStreamDestroy(self.stream)
            self.stream = None

    def __del__(self) -> None:  # pragma: no cover - GPU only
        try:
            self.close()
        except Exception:
            pass
