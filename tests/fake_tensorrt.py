"""CPU stand-ins for ``tensorrt`` and ``cuda.bindings.runtime``, to test the backend's logic.

The TensorRT backend's own work is bookkeeping: which buffer each tensor is bound to,
which shapes are set, where the new K/V rows land, what a CUDA graph replays. These fakes
keep that bookkeeping honest without a GPU: "device memory" is host memory at real
addresses, copies are ``memmove``, and an "engine" runs the artifact's ONNX graph with
onnxruntime, reading its inputs from and writing its outputs to the bound addresses with
the shapes set on the context. A stream capture records the enqueues (with the shapes
and addresses of that moment, as a real graph bakes them in) and a launch replays them.

What they cannot check: TensorRT's parser, builder, kernels and precisions, and real
CUDA semantics (asynchrony, pinned memory, graph validity rules). Those need a GPU.
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
_DTYPES = {"float32": "FLOAT", "float16": "HALF", "int64": "INT64"}


# ---- cuda.bindings.runtime ---------------------------------------------------------------
class _Enum:
    def __init__(self, **members: int):
        self.__dict__.update(members)


class FakeCudart(types.ModuleType):
    def __init__(self) -> None:
        super().__init__("cuda.bindings.runtime")
        self._mem: dict[int, Any] = {}
        self.capturing: list | None = None
        self.cudaStreamNonBlocking = 1
        self.cudaMemcpyKind = _Enum(
            cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3
        )
        self.cudaStreamCaptureMode = _Enum(cudaStreamCaptureModeThreadLocal=1)
        self.launches = 0

    def cudaGetErrorString(self, err):
        return 0, b"fake error"

    def cudaSetDevice(self, device):
        return (0,)

    def cudaGetDeviceProperties(self, device):
        name = GPU["name"].encode()
        return 0, types.SimpleNamespace(name=name, major=9, minor=0, totalGlobalMem=1 << 34)

    def cudaStreamCreateWithFlags(self, flags):
        return 0, 1234

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaStreamDestroy(self, stream):
        return (0,)

    def cudaMalloc(self, nbytes):
        buf = ctypes.create_string_buffer(nbytes)
        ptr = ctypes.addressof(buf)
        self._mem[ptr] = buf
        return 0, ptr

    cudaMallocHost = cudaMalloc

    def cudaFree(self, ptr):
        self._mem.pop(int(ptr), None)
        return (0,)

    cudaFreeHost = cudaFree

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        assert self.capturing is None, "copies are kept out of captured graphs"
        ctypes.memmove(int(dst), int(src), int(nbytes))
        return (0,)

    def cudaStreamBeginCapture(self, stream, mode):
        self.capturing = []
        return (0,)

    def cudaStreamEndCapture(self, stream):
        graph, self.capturing = self.capturing, None
        return 0, graph

    def cudaGraphInstantiate(self, graph, flags):
        return 0, list(graph)

    def cudaGraphLaunch(self, graph_exec, stream):
        self.launches += 1
        for run in graph_exec:
            run()
        return (0,)

    def cudaGraphExecDestroy(self, graph_exec):
        return (0,)

    cudaGraphDestroy = cudaGraphExecDestroy


# ---- tensorrt ------------------------------------------------------------------------------
class FakeEngine:
    """An "engine" file holds {"onnx": path}; running it runs that graph in onnxruntime."""

    def __init__(self, onnx_path: str, cudart: FakeCudart):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.session = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
        self.cudart = cudart
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = {o.name: o for o in self.session.get_outputs()}
        self.names = [*self.inputs, *self.outputs]
        self.num_io_tensors = len(self.names)
        self.device_memory_size_v2 = 1024

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_dtype(self, name: str) -> Any:
        node = self.inputs.get(name) or self.outputs[name]
        np_name = {"tensor(float)": "float32", "tensor(float16)": "float16"}.get(node.type, "int64")
        return types.SimpleNamespace(name=_DTYPES[np_name], np=np.dtype(np_name))

    def create_execution_context(self, strategy: Any = None) -> FakeContext:
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self._out_shapes: dict[str, tuple[int, ...]] = {}
        self.profile = 0

    def set_device_memory(self, ptr: int, size: int) -> None:
        assert ptr and size

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.profile = index
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        assert name in self.engine.inputs, name
        self.shapes[name] = tuple(int(d) for d in shape)
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        assert name in self.engine.names and ptr, name
        self.addresses[name] = int(ptr)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.engine.inputs:
            return self.shapes[name]
        feeds = {n: np.zeros(s, self.engine.get_tensor_dtype(n).np) for n, s in self.shapes.items()}
        outs = self.engine.session.run(None, feeds)
        return dict(zip(self.engine.outputs, (o.shape for o in outs), strict=True))[name]

    def execute_async_v3(self, stream: int) -> bool:
        shapes, addresses = dict(self.shapes), dict(self.addresses)  # what a graph bakes in
        run = lambda: self._run(shapes, addresses)  # noqa: E731
        if self.engine.cudart.capturing is not None:
            self.engine.cudart.capturing.append(run)
        else:
            run()
        return True

    def _run(self, shapes: dict, addresses: dict) -> None:
        feeds = {}
        for name, shape in shapes.items():
            dt = self.engine.get_tensor_dtype(name).np
            n = int(np.prod(shape)) * dt.itemsize
            raw = (ctypes.c_uint8 * max(n, 1)).from_address(addresses[name])
            feeds[name] = np.frombuffer(raw, np.uint8, n).view(dt).reshape(shape).copy()
        outs = self.engine.session.run(None, feeds)
        for name, arr in zip(self.engine.outputs, outs, strict=True):
            arr = np.ascontiguousarray(arr)
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
        return json.dumps({"onnx": network.path}).encode()


def make_modules() -> dict[str, types.ModuleType]:
    """sys.modules entries that make ``tensorrt`` and ``cuda.bindings.runtime`` the fakes."""
    cudart = FakeCudart()
    trt = types.ModuleType("tensorrt")
    trt.__version__ = VERSION
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=None: None})

    class Runtime:
        def __init__(self, logger: Any):
            pass

        def deserialize_cuda_engine(self, blob: bytes) -> FakeEngine:
            return FakeEngine(json.loads(blob)["onnx"], cudart)

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


def fake_engines(art: Path, max_frames: int, max_seq: int) -> None:
    """Write "engines" (pointers to the ONNX graphs) and the manifest section for *art*."""
    from export.trt import Limits, profiles_from_spec
    from trace_rt.backends import tensorrt_manifest as tm
    from trace_rt.config import TraceConfig
    from trace_rt.graphs import load_manifest, manifest_specs

    manifest = load_manifest(art, verify="size")
    specs = manifest_specs(manifest)
    limits = Limits(max_frames, max_seq, TraceConfig.from_dir(art).tokens_per_frame)
    (art / tm.ENGINE_DIR).mkdir(exist_ok=True)
    engines = {}
    for name, spec in specs.items():
        rel = f"{tm.ENGINE_DIR}/{name}.fake.engine"
        (art / rel).write_text(json.dumps({"onnx": str(art / spec.file)}))
        engines[name] = {
            "file": rel,
            "bytes": (art / rel).stat().st_size,
            "sha256": tm.sha256_file(art / rel),
            "onnx": spec.file,
            "strongly_typed": True,
            "flags": [],
            "variant": None,
            "profiles": [p.to_dict() for p in profiles_from_spec(spec, limits)],
            "build_s": 0.0,
        }
    tm.write_section(
        art,
        {
            "format": tm.FORMAT,
            "version": VERSION,
            "gpu": GPU,
            "precision": manifest["export"]["dtype"],
            "limits": {"max_frames": max_frames, "max_seq": max_seq},
            "engines": engines,
        },
    )
