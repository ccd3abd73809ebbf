"""CPU stand-ins for ``tensorrt`` and ``cuda.bindings.runtime``, as strict as the real ones.

The TensorRT backend's own work is bookkeeping: which buffer each tensor is bound to,
which shapes are set, where the new K/V rows land, what a CUDA graph replays. These fakes
keep that bookkeeping honest without a GPU: "device memory" is host memory at real
addresses, and an "engine" runs the artifact's ONNX graph with onnxruntime, reading its
inputs from and writing its outputs to the bound addresses with the shapes set on the
context.

They enforce the rules of TensorRT 10 and the CUDA runtime that a backend can get wrong
and that a lenient stand-in would hide (each cited where it is checked):

- every tensor address is 256-byte aligned (``IExecutionContext::setTensorAddress``:
  "The pointer must have at least 256-byte alignment", NvInferRuntime.h, TensorRT 10.3
  and later); a bad address or name makes the setter return False, as TensorRT does;
- ``set_input_shape`` returns False for an unknown input, a wrong rank or a shape outside
  the selected optimisation profile's [min, max] (the profile ranges are stored in the
  "engine" file, as a real engine stores them);
- ``execute_async_v3`` returns False when an input shape or an address is missing, when
  the user-managed device memory was not set, or when the CUDA error state is set (TensorRT
  checks it after its launches; a failed capture that is not cleared breaks the next run);
- ``cudaMalloc`` memory is not cleared (the fake fills it with 0xFF bytes, NaN as a float),
  so a backend that reads device memory it never wrote sees it in its results;
- streams are asynchronous: kernels, device-to-device copies (1D and 2D, whose width may
  not exceed either pitch), memsets and copies into pinned host memory run only at
  ``cudaStreamSynchronize`` (or a pageable copy, which synchronises); a pageable host
  source is read when the copy is issued (CUDA stages it), a pinned one when the copy
  runs. A backend that reads its logits before synchronising reads stale bytes. Every
  copy and every tensor must lie inside one allocation;
- stream capture: enqueues and copies are recorded into the graph with the shapes and
  addresses of that moment; TensorRT needs one normal enqueue after a shape change before
  capturing; capture starts only on an idle stream (the warm-up run must have been
  synchronised, as trtexec does); ``fail_capture`` / ``fail_instantiate`` make the next
  capture fail as CUDA would (error returned, error state set), so a test can check that
  the backend releases the graph and clears the error;
- engines are deserialised from a stream reader (``IStreamReaderV2`` or ``IStreamReader``)
  in chunks, and the fake records whether the whole file was passed as bytes instead;
- bf16 tensors report ``BF16``.

What they cannot check: TensorRT's parser, builder, kernels and precisions, and CUDA's
real timing. Those need a GPU.
"""

from __future__ import annotations

import ctypes
import json
import types
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort

VERSION = "10.99.0-fake"
GPU = {"name": "Fake GPU", "compute_capability": "9.0"}
ALIGN = 256  # TensorRT's tensor address alignment; cudaMalloc returns at least this
CHUNK = 64  # bytes the fake runtime asks a stream reader for at a time
_ORT_TYPES = {
    "tensor(float)": ("FLOAT", "float32"),
    "tensor(float16)": ("HALF", "float16"),
    "tensor(bfloat16)": ("BF16", "uint16"),  # bf16 bit patterns
    "tensor(int64)": ("INT64", "int64"),
    "tensor(int32)": ("INT32", "int32"),
    "tensor(bool)": ("BOOL", "bool"),
}
ERR_CAPTURE_INVALIDATED = 901  # cudaErrorStreamCaptureInvalidated


# ---- cuda.bindings.runtime ---------------------------------------------------------------
class _Enum:
    def __init__(self, **members: Any):
        self.__dict__.update(members)


class FakeCudart(types.ModuleType):
    def __init__(self) -> None:
        super().__init__("cuda.bindings.runtime")
        self._mem: dict[int, tuple[Any, int, bool]] = {}  # ptr -> (buffer, nbytes, pinned)
        self.pending: list = []  # work enqueued on the (one) stream, not yet run
        self.capturing: list | None = None
        self.last_error = 0
        self.fail_capture = False  # the next capture is invalidated
        self.fail_instantiate = False  # the next instantiation fails
        self.live_graphs: set[int] = set()
        self.cudaStreamNonBlocking = 1
        self.cudaMemcpyKind = _Enum(
            cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3
        )
        self.cudaStreamCaptureMode = _Enum(cudaStreamCaptureModeThreadLocal=1)
        self.launches = 0

    # -- memory --
    def _alloc(self, nbytes: int, pinned: bool) -> tuple[int, int]:
        buf = ctypes.create_string_buffer(int(nbytes) + ALIGN)
        ptr = -ctypes.addressof(buf) % ALIGN + ctypes.addressof(buf)
        self._mem[ptr] = (buf, int(nbytes), pinned)
        return 0, ptr

    def cudaMalloc(self, nbytes):
        # cudaMalloc does not clear memory: fill with 0xFF (NaN as float) so that reading
        # memory never written shows in the results.
        err, ptr = self._alloc(nbytes, pinned=False)
        ctypes.memset(ptr, 0xFF, int(nbytes))
        return err, ptr

    def cudaMallocHost(self, nbytes):
        return self._alloc(nbytes, pinned=True)

    def cudaFree(self, ptr):
        self._mem.pop(int(ptr), None)
        return (0,)

    cudaFreeHost = cudaFree

    def owner(self, ptr: int, nbytes: int) -> tuple[int, bool] | None:
        """(base, pinned) of the allocation holding [ptr, ptr + nbytes), else None."""
        for base, (_, size, pinned) in self._mem.items():
            if base <= ptr and ptr + nbytes <= base + max(size, ALIGN):
                return base, pinned
        return None

    def check_range(self, ptr: int, nbytes: int, what: str) -> None:
        assert self.owner(int(ptr), int(nbytes)) is not None, (
            f"{what}: [{ptr:#x}, +{nbytes}) is outside every allocation"
        )

    # -- streams --
    def _enqueue(self, op) -> None:
        (self.capturing if self.capturing is not None else self.pending).append(op)

    def _drain(self) -> None:
        ops, self.pending = self.pending, []
        for op in ops:
            op()

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        dst, src, n = int(dst), int(src), int(nbytes)
        k = self.cudaMemcpyKind
        if kind in (k.cudaMemcpyDeviceToHost, k.cudaMemcpyDeviceToDevice):
            self.check_range(src, n, "copy source")
        if kind in (k.cudaMemcpyHostToDevice, k.cudaMemcpyDeviceToDevice):
            self.check_range(dst, n, "copy destination")
        if kind == k.cudaMemcpyHostToDevice and not (self.owner(src, n) or (0, False))[1]:
            data = ctypes.string_at(src, n)  # pageable source: staged now
            self._enqueue(lambda: ctypes.memmove(dst, data, n))
            return (0,)
        pinned_dst = (self.owner(dst, n) or (0, False))[1]
        self._enqueue(lambda: ctypes.memmove(dst, src, n))
        if kind == k.cudaMemcpyDeviceToHost and not pinned_dst and self.capturing is None:
            self._drain()  # a copy into pageable memory returns when it is done
        return (0,)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        dst, dp, src, sp, w, h = (int(x) for x in (dst, dpitch, src, spitch, width, height))
        assert kind == self.cudaMemcpyKind.cudaMemcpyDeviceToDevice, "the fake does 2D d2d only"
        if w > dp or w > sp:  # cudaErrorInvalidPitchValue
            return (12,)
        for r in range(h):  # every row inside one allocation (as the 1D copy)
            self.check_range(src + r * sp, w, "2D copy source row")
            self.check_range(dst + r * dp, w, "2D copy destination row")

        def run() -> None:
            for r in range(h):
                ctypes.memmove(dst + r * dp, src + r * sp, w)

        self._enqueue(run)
        return (0,)

    def cudaMemsetAsync(self, ptr, value, nbytes, stream):
        ptr, n = int(ptr), int(nbytes)
        self.check_range(ptr, n, "memset")
        self._enqueue(lambda: ctypes.memset(ptr, int(value), n))
        return (0,)

    def cudaStreamSynchronize(self, stream):
        self._drain()
        return (0,)

    def cudaGetLastError(self):
        err, self.last_error = self.last_error, 0
        return (err,)

    def cudaGetErrorString(self, err):
        return 0, b"fake error"

    def cudaSetDevice(self, device):
        return (0,)

    def cudaGetDeviceProperties(self, device):
        name = GPU["name"].encode()
        return 0, types.SimpleNamespace(name=name, major=9, minor=0, totalGlobalMem=1 << 34)

    def cudaStreamCreateWithFlags(self, flags):
        return 0, 1234

    def cudaStreamDestroy(self, stream):
        return (0,)

    # -- graphs --
    def cudaStreamBeginCapture(self, stream, mode):
        if self.pending:  # the warm-up enqueue was not synchronised
            return (ERR_CAPTURE_INVALIDATED,)
        self.capturing = []
        return (0,)

    def cudaStreamEndCapture(self, stream):
        ops, self.capturing = self.capturing, None
        if self.fail_capture or ops is None:
            self.fail_capture = False
            self.last_error = ERR_CAPTURE_INVALIDATED
            return ERR_CAPTURE_INVALIDATED, None
        graph = id(ops)
        self.live_graphs.add(graph)
        self._captured = {graph: ops}
        return 0, graph

    def cudaGraphInstantiate(self, graph, flags):
        if self.fail_instantiate:
            self.fail_instantiate = False
            self.last_error = ERR_CAPTURE_INVALIDATED
            return ERR_CAPTURE_INVALIDATED, None
        return 0, list(self._captured[graph])

    def cudaGraphLaunch(self, graph_exec, stream):
        self.launches += 1
        for op in graph_exec:
            self._enqueue(op)
        return (0,)

    def cudaGraphExecDestroy(self, graph_exec):
        return (0,)

    def cudaGraphDestroy(self, graph):
        self.live_graphs.discard(graph)
        return (0,)


# ---- tensorrt ------------------------------------------------------------------------------
class FakeEngine:
    """An "engine" file holds {"onnx": path, "profiles": [...]}; running it runs that graph
    in onnxruntime."""

    def __init__(self, blob: dict, cudart: FakeCudart):
        from trace_rt.backends.onnxruntime_backend import FIXED_EMPTY_PAST, ort_version

        so = ort.SessionOptions()
        so.log_severity_level = 3
        # The onnxruntime fusion that dies over an empty past before 1.32 (see there).
        off = ["MatmulTransposeFusion"] if ort_version() < FIXED_EMPTY_PAST else []
        self.session = ort.InferenceSession(
            blob["onnx"], so, providers=["CPUExecutionProvider"], disabled_optimizers=off
        )
        self.profiles = blob["profiles"]  # [{"name", "shapes": {input: {min, opt, max}}}]
        self.cudart = cudart
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = {o.name: o for o in self.session.get_outputs()}
        self.names = [*self.inputs, *self.outputs]
        self.num_io_tensors = len(self.names)
        self.num_optimization_profiles = len(self.profiles)
        self.device_memory_size_v2 = 1024

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_dtype(self, name: str) -> Any:
        node = self.inputs.get(name) or self.outputs[name]
        trt_name, np_name = _ORT_TYPES[node.type]
        return types.SimpleNamespace(name=trt_name, np=np.dtype(np_name))

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        s = self.profiles[profile]["shapes"][name]
        return [tuple(s["min"]), tuple(s["opt"]), tuple(s["max"])]

    def create_execution_context(self, strategy: Any = None) -> FakeContext:
        return FakeContext(self, user_managed=strategy == 2)


class FakeContext:
    def __init__(self, engine: FakeEngine, user_managed: bool):
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.profile = 0  # a new context starts on profile 0
        self.memory_set = not user_managed
        self.dirty = True  # shapes changed since the last normal enqueue

    def set_device_memory(self, ptr: int, size: int) -> None:
        assert ptr % ALIGN == 0 and size >= self.engine.device_memory_size_v2
        self.memory_set = True

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        if not 0 <= index < self.engine.num_optimization_profiles:
            return False
        self.profile, self.shapes, self.dirty = index, {}, True
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        if name not in self.engine.inputs or self.profile is None:
            return False
        shape = tuple(int(d) for d in shape)
        lo, _, hi = self.engine.get_tensor_profile_shape(name, self.profile)
        if len(shape) != len(lo) or not all(
            a <= d <= b for a, d, b in zip(lo, shape, hi, strict=True)
        ):
            return False  # TensorRT logs the profile's range and refuses
        if self.shapes.get(name) != shape:
            self.dirty = True
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        if name not in self.engine.names or not ptr or int(ptr) % ALIGN:
            return False  # "The pointer must have at least 256-byte alignment."
        self.addresses[name] = int(ptr)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.engine.inputs:
            return self.shapes[name]
        feeds = {n: np.zeros(s, self.engine.get_tensor_dtype(n).np) for n, s in self.shapes.items()}
        outs = self.engine.session.run(None, feeds)
        return dict(zip(self.engine.outputs, (o.shape for o in outs), strict=True))[name]

    def execute_async_v3(self, stream: int) -> bool:
        cudart = self.engine.cudart
        if (
            cudart.last_error
            or not self.memory_set
            or set(self.shapes) != set(self.engine.inputs)
            or set(self.addresses) != set(self.engine.names)
        ):
            return False
        if cudart.capturing is not None and self.dirty:
            return False  # TensorRT: enqueue once after a shape change before capturing
        if cudart.capturing is None:
            self.dirty = False
        shapes, addresses = dict(self.shapes), dict(self.addresses)  # what a graph bakes in
        cudart._enqueue(lambda: self._run(shapes, addresses))
        return True

    def _run(self, shapes: dict, addresses: dict) -> None:
        cudart = self.engine.cudart
        feeds = {}
        for name, shape in shapes.items():
            dt = self.engine.get_tensor_dtype(name).np
            n = int(np.prod(shape)) * dt.itemsize
            cudart.check_range(addresses[name], n, f"input {name}")
            raw = (ctypes.c_uint8 * max(n, 1)).from_address(addresses[name])
            feeds[name] = np.frombuffer(raw, np.uint8, n).view(dt).reshape(shape).copy()
        outs = self.engine.session.run(None, feeds)
        for name, arr in zip(self.engine.outputs, outs, strict=True):
            arr = np.ascontiguousarray(arr)
            cudart.check_range(addresses[name], arr.nbytes, f"output {name}")
            ctypes.memmove(addresses[name], arr.ctypes.data, arr.nbytes)


# ---- builder: checks what build_engines asks for, "serialises" a pointer to the graph ----
class _Network:
    def __init__(self, flags: int):
        self.flags, self.names, self.path = flags, [], ""
        self.shapes: dict[str, list] = {}

    @property
    def num_inputs(self) -> int:
        return len(self.names)

    def get_input(self, i: int) -> Any:
        return types.SimpleNamespace(name=self.names[i])


class _Parser:
    def __init__(self, network: _Network, logger: Any):
        self.network, self.num_errors = network, 0

    def parse_from_file(self, path: str) -> bool:
        import onnx

        graph = onnx.load(path, load_external_data=False).graph
        init = {t.name for t in graph.initializer}
        for i in graph.input:
            if i.name not in init:
                self.network.names.append(i.name)
                dims = i.type.tensor_type.shape.dim
                self.network.shapes[i.name] = [d.dim_value if d.dim_value else None for d in dims]
        self.network.path = path
        return True

    def get_error(self, i: int) -> str:
        return ""


class _Cache:
    def __init__(self, blob: bytes):
        self.blob = blob

    def serialize(self) -> bytes:
        return self.blob


class _Config:
    def __init__(self) -> None:
        self.flags: set[str] = {"TF32"}
        self.profiles: list[dict] = []
        self.cache: _Cache | None = None

    def set_memory_pool_limit(self, pool: Any, size: int) -> None:
        assert size > 0

    def set_flag(self, flag: str) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag: str) -> None:
        self.flags.discard(flag)

    def add_optimization_profile(self, profile: dict) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, blob: bytes) -> _Cache:
        return _Cache(bytes(blob))

    def set_timing_cache(self, cache: _Cache, ignore_mismatch: bool) -> bool:
        self.cache = cache
        return True

    def get_timing_cache(self) -> _Cache:
        return self.cache


class _ProfileBuilder(dict):
    def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
        self[name] = (lo, opt, hi)


class Builder:
    built: ClassVar[list[dict]] = []  # what each build asked for, for the tests

    def __init__(self, logger: Any):
        pass

    def create_network(self, flags: int) -> _Network:
        return _Network(flags)

    def create_builder_config(self) -> _Config:
        return _Config()

    def create_optimization_profile(self) -> _ProfileBuilder:
        return _ProfileBuilder()

    def build_serialized_network(self, network: _Network, config: _Config) -> bytes:
        for prof in config.profiles:  # what TensorRT would reject
            assert set(prof) == set(network.names), (sorted(prof), network.names)
            for name, (lo, opt, hi) in prof.items():
                static = network.shapes[name]
                assert len(lo) == len(opt) == len(hi) == len(static), name
                for a, b, c, d in zip(lo, opt, hi, static, strict=True):
                    assert 0 <= a <= b <= c and (d is None or a == c == d), (name, lo, hi)
        Builder.built.append({"flags": sorted(config.flags), "network_flags": network.flags})
        config.cache = _Cache(config.cache.blob + b"+")  # grows with every build
        profiles = [
            {
                "name": str(i),
                "shapes": {
                    k: {"min": list(a), "opt": list(b), "max": list(c)}
                    for k, (a, b, c) in p.items()
                },
            }
            for i, p in enumerate(config.profiles)
        ]
        return json.dumps({"onnx": network.path, "profiles": profiles}).encode()


def _read_stream(reader: Any) -> bytes:
    """Pull an engine out of an ``IStreamReaderV2`` (seek + read(n, stream)) or an
    ``IStreamReader`` (read(n)) in CHUNK-byte requests, as TensorRT pulls a large one."""
    v2 = hasattr(reader, "seek")
    if v2:
        assert reader.seek(0, SeekPosition.SET)
    parts = []
    while True:
        part = reader.read(CHUNK, 1234) if v2 else reader.read(CHUNK)
        assert len(part) <= CHUNK, "a stream reader returned more than was asked for"
        if not part:
            return b"".join(parts)
        parts.append(bytes(part))


SeekPosition = _Enum(SET=0, CUR=1, END=2)


def make_modules(version: str = VERSION) -> dict[str, types.ModuleType]:
    """sys.modules entries that make ``tensorrt`` and ``cuda.bindings.runtime`` the fakes."""
    cudart = FakeCudart()
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=None: None})

    class IStreamReader:
        def __init__(self) -> None:
            pass

    class IStreamReaderV2(IStreamReader):
        pass

    class Runtime:
        loaded: ClassVar[list[str]] = []  # how each engine arrived: "bytes" or "stream"

        def __init__(self, logger: Any):
            pass

        def deserialize_cuda_engine(self, source: Any) -> FakeEngine | None:
            if isinstance(source, IStreamReader):
                Runtime.loaded.append("stream")
                blob = _read_stream(source)
            else:
                Runtime.loaded.append("bytes")
                blob = bytes(source)
            try:
                return FakeEngine(json.loads(blob), cudart)
            except (ValueError, KeyError):
                return None  # what TensorRT returns for a file that is not an engine

    trt.IStreamReader = IStreamReader
    trt.IStreamReaderV2 = IStreamReaderV2
    trt.SeekPosition = SeekPosition
    trt.Runtime = Runtime
    trt.Builder = Builder
    trt.OnnxParser = _Parser
    trt.BuilderFlag = _Enum(FP16="FP16", BF16="BF16", TF32="TF32")
    trt.NetworkDefinitionCreationFlag = _Enum(STRONGLY_TYPED=5)
    trt.MemoryPoolType = _Enum(WORKSPACE=0)
    Builder.built = []
    trt.ExecutionContextAllocationStrategy = _Enum(STATIC=0, USER_MANAGED=2)
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart
    cuda.bindings = bindings
    return {
        "tensorrt": trt,
        "cuda": cuda,
        "cuda.bindings": bindings,
        "cuda.bindings.runtime": cudart,
    }


def install(monkeypatch: Any, version: str = VERSION) -> FakeCudart:
    """Make ``tensorrt`` and ``cuda-python`` the fakes for one test (pytest's monkeypatch
    restores the real entries after it); returns the fake CUDA runtime.

    Both the sys.modules entries and the package attributes of the modules bound to them
    are dropped, or ``from trace_rt.backends import cuda_rt`` would pick up a module bound
    to another test's fakes; call :func:`uninstall` when the test ends.
    """
    import sys

    import trace_rt.backends as pkg

    for m in _BOUND:
        monkeypatch.delitem(sys.modules, f"{pkg.__name__}.{m}", raising=False)
        monkeypatch.delattr(pkg, m, raising=False)
    mods = make_modules(version)
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return mods["cuda.bindings.runtime"]


def uninstall() -> None:
    """Drop the fake-bound backend modules (monkeypatch restores earlier ones)."""
    import sys

    import trace_rt.backends as pkg

    for m in _BOUND:
        sys.modules.pop(f"{pkg.__name__}.{m}", None)
        if hasattr(pkg, m):
            delattr(pkg, m)


# The backend modules that import tensorrt or cuda-python when they load.
_BOUND = (
    "tensorrt_backend",
    "tensorrt_reader",
    "tensorrt_exec",
    "tensorrt_kv",
    "tensorrt_video",
    "cuda_rt",
)


def fake_engines(
    art: Path, max_frames: int, max_seq: int, checkpoint: Path | None = None, max_batch: int = 1
) -> None:
    """Write "engines" (pointers to the ONNX graphs) and the manifest section for *art*;
    with *checkpoint*, also the fixed-shape decode step, as ``export trt --checkpoint``."""
    from export.trt import Limits, profiles_from_spec
    from trace_rt.backends import tensorrt_manifest as tm
    from trace_rt.config import TraceConfig
    from trace_rt.graphs import load_manifest, manifest_specs

    manifest = load_manifest(art, verify="size")
    specs = manifest_specs(manifest)
    limits = Limits(max_frames, max_seq, TraceConfig.from_dir(art).tokens_per_frame, max_batch)
    (art / tm.ENGINE_DIR).mkdir(exist_ok=True)
    engines = {}
    todo = [
        (name, spec, spec.file, profiles_from_spec(spec, limits)) for name, spec in specs.items()
    ]
    if checkpoint is not None:
        from export.trt_step import step_profile, write_step_onnx

        opset = int(manifest["export"]["opset"])
        onnx_file = write_step_onnx(checkpoint, art, max_seq, opset)
        todo.append(
            (tm.STEP, specs["decoder"], onnx_file, [step_profile(specs["decoder"], max_seq)])
        )
    for name, _, onnx_file, profs in todo:
        rel = f"{tm.ENGINE_DIR}/{name}.fake.engine"
        profiles = [p.to_dict() for p in profs]
        (art / rel).write_text(json.dumps({"onnx": str(art / onnx_file), "profiles": profiles}))
        engines[name] = {
            "file": rel,
            "bytes": (art / rel).stat().st_size,
            "sha256": tm.sha256_file(art / rel),
            "onnx": onnx_file,
            "strongly_typed": True,
            "flags": [],
            "variant": None,
            "profiles": profiles,
            "build_s": 0.0,
        }
        if name == tm.STEP:
            engines[name]["fixed"] = {"seq": 1, "past": max_seq - 1}
    tm.write_section(
        art,
        {
            "format": tm.FORMAT,
            "version": VERSION,
            "gpu": GPU,
            "precision": manifest["export"]["dtype"],
            "limits": limits.record(),
            "engines": engines,
        },
    )
