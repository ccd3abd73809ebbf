"""onnxruntime backend: runs an artifact directory written by ``python -m export onnx``.

No torch: the serving image has numpy and onnxruntime only. The three graphs and their
I/O come from ``manifest.json`` (specs from :mod:`trace_rt.graphs`); decode-step ids are
embedded on the host from ``embeddings.npy`` (one row per step; why: trace_rt/graphs.py).

The decoder runs through IO binding: present K/V stay as OrtValues wherever the execution
provider put them (GPU memory with the CUDA EP) and are bound as the next step's past, so
the cache never round-trips through numpy. The graph itself still concatenates past and
new K/V each step (the export's ``kv_cache: concat`` design); the preallocated-buffer
graph is the next step.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from trace_rt.backends.base import split_prompt
from trace_rt.config import TraceConfig
from trace_rt.errors import CheckpointError, PromptTooLongError
from trace_rt.graphs import (
    DECODER,
    EMBEDDINGS_FILE,
    GRAPH_NAMES,
    PROJECTOR,
    VISION_ENCODER,
    GraphSpec,
    load_manifest,
    manifest_specs,
)
from trace_rt.tokens import VIDEO_PLACEHOLDER_ID, Head, head_base, head_size

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"


class OnnxRuntimeBackend:
    """Runs the exported graphs with onnxruntime.

    Args:
        model_dir: artifact directory (``manifest.json`` + graphs).
        device: ``cpu`` (CPU EP), ``cuda[:N]`` (CUDA EP, needs ``onnxruntime-gpu``) or
            ``auto`` (CUDA EP when onnxruntime has it, else CPU).
        threads: intra-op threads per session; None lets onnxruntime use one per
            physical core.
        cache_dir: where optimised graphs are cached (default ``<model_dir>/.ort_cache``
            when writable, else ``~/.cache/trace-rt/ort``); ``False`` disables the cache.
        verify: ``sha256`` (default) or ``size``: how thoroughly the files are checked
            against the manifest at load.
    """

    name = "onnxruntime"

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        threads: int | None = None,
        cache_dir: str | Path | bool | None = None,
        verify: str = "sha256",
    ):
        self.model_dir = Path(model_dir)
        self.manifest = load_manifest(self.model_dir, verify=verify)
        self.config = TraceConfig.from_dir(self.model_dir)
        self.specs: dict[str, GraphSpec] = manifest_specs(self.manifest)
        missing = [g for g in GRAPH_NAMES if g not in self.specs]
        if missing:
            raise CheckpointError(f"{self.model_dir}: manifest lists no graph {missing}")
        self.providers, self.device_type, self.device_id = _providers(device)
        self.threads = threads
        self._cache_dir = _cache_dir(self.model_dir, cache_dir)
        self.sessions = {g: self._session(self.specs[g]) for g in GRAPH_NAMES}
        # [ids, H] in unified id order; memory-mapped, so only rows used are read.
        self.embeddings = np.load(self.model_dir / EMBEDDINGS_FILE, mmap_mode="r")
        if self.embeddings.shape != (self.config.ids.size, self.config.hidden_size):
            raise CheckpointError(
                f"{self.model_dir}: {EMBEDDINGS_FILE} has shape {self.embeddings.shape}, "
                f"expected {(self.config.ids.size, self.config.hidden_size)}"
            )
        self.dtype = self.embeddings.dtype  # the graphs' float dtype
        self._kv_names = [t.name for t in self.specs[DECODER].inputs[2:]]
        self._kv: list[ort.OrtValue] = []
        self._pos = 0

    # ---- Backend protocol ----------------------------------------------------------
    def encode_video(self, pixel_values: np.ndarray, time_ids: np.ndarray) -> np.ndarray:
        px = np.ascontiguousarray(pixel_values, dtype=np.float32)  # [F, 3, H, W]
        tid = np.ascontiguousarray(time_ids, dtype=np.int64)  # [F, 6]
        # Features stay on the device between the two graphs.
        (features,) = self._run(VISION_ENCODER, {"pixel_values": px}, host_outputs=())
        (video,) = self._run(PROJECTOR, {"features": features, "time_ids": tid})
        return video.numpy()  # [F*(S+6), H]

    def prefill(self, prompt_ids: Sequence[int], video: np.ndarray, head: Head) -> np.ndarray:
        before, after = split_prompt(prompt_ids, VIDEO_PLACEHOLDER_ID)
        x = np.concatenate([self._embed(before), video.astype(self.dtype), self._embed(after)])
        n = x.shape[0]  # x: [L, H]
        limit = self.config.max_position_embeddings
        if n > limit:
            raise PromptTooLongError(f"prompt of {n} positions exceeds the model's {limit}")
        cfg = self.config
        empty = np.zeros((1, cfg.num_key_value_heads, 0, cfg.attn_head_dim), self.dtype)
        self._kv = [self._ortvalue(empty) for _ in self._kv_names]
        self._pos = 0
        return self._decode(x[None], head)  # [1, L, H]

    def decode_step(self, token_id: int, head: Head) -> np.ndarray:
        limit = self.config.max_position_embeddings
        if self._pos >= limit:
            raise PromptTooLongError(f"generation reached the model's context of {limit}")
        return self._decode(self._embed([token_id])[None], head)  # [1, 1, H]

    def synchronize(self) -> None:
        # Runs return once outputs are ready; logits come back to host memory.
        return None

    # ---- internals -------------------------------------------------------------------
    def _embed(self, ids: Sequence[int]) -> np.ndarray:
        idx = np.asarray(ids, dtype=np.int64)
        size = self.config.ids.size
        if idx.size and (idx.min() < 0 or idx.max() >= size):
            raise ValueError(f"token ids {ids} fall outside the id space 0..{size - 1}")
        return np.asarray(self.embeddings[idx])  # [n, H]

    def _decode(self, embeds: np.ndarray, head: Head) -> np.ndarray:
        t = embeds.shape[1]
        pos = np.arange(self._pos, self._pos + t, dtype=np.int64)[None]  # [1, T]
        feeds: dict[str, Any] = {"inputs_embeds": embeds, "position_ids": pos}
        feeds.update(zip(self._kv_names, self._kv, strict=True))
        logits, *self._kv = self._run(DECODER, feeds, host_outputs=("logits",))
        self._pos += t
        base, size = head_base(self.config.ids, head), head_size(self.config.ids, head)
        return logits.numpy()[0, base : base + size].astype(np.float32)

    def _ortvalue(self, arr: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(arr, self.device_type, self.device_id)

    def _run(
        self, graph: str, feeds: dict[str, Any], host_outputs: Sequence[str] | None = None
    ) -> list[ort.OrtValue]:
        """Run *graph* with IO binding; outputs stay on the device unless in host_outputs.

        host_outputs=None brings every output to host memory.
        """
        sess = self.sessions[graph]
        binding = sess.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for spec in self.specs[graph].outputs:
            on_host = host_outputs is None or spec.name in host_outputs
            binding.bind_output(spec.name, "cpu" if on_host else self.device_type, self.device_id)
        sess.run_with_iobinding(binding)
        return binding.get_outputs()

    def _session(self, spec: GraphSpec) -> ort.InferenceSession:
        path = self.model_dir / spec.file
        cached = self._cached_graph(spec)
        if cached is not None and not cached.is_file():
            # First load: let onnxruntime write its optimised graph, then load that.
            tmp = cached.with_suffix(f".{os.getpid()}.tmp")
            so = self._options(ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
            so.optimized_model_filepath = str(tmp)
            try:
                first = ort.InferenceSession(str(path), so, providers=self.providers)
                del first  # free its weights before the real session loads
                tmp.replace(cached)
            except Exception:  # onnxruntime's errors derive from Exception only
                # Unwritable cache or a graph onnxruntime cannot save: optimise in memory.
                tmp.unlink(missing_ok=True)
                cached = None
        # EXTENDED fusions are in the cached file; ALL adds the layout passes, which
        # depend on the CPU and therefore are redone at each load.
        src = cached if cached is not None and cached.is_file() else path
        so = self._options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        try:
            sess = ort.InferenceSession(str(src), so, providers=self.providers)
        except Exception as e:  # onnxruntime's Fail/InvalidGraph/... derive from Exception
            raise CheckpointError(f"{path}: onnxruntime cannot load it ({e})") from e
        _check_io(sess, spec, path)
        return sess

    def _options(self, level: ort.GraphOptimizationLevel) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        # One request at a time, graph by graph: parallelism inside ops, not between them.
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.inter_op_num_threads = 1
        if self.threads:
            so.intra_op_num_threads = self.threads
        so.log_severity_level = 3  # errors only; fusion notices are noise here
        return so

    def _cached_graph(self, spec: GraphSpec) -> Path | None:
        """Cache path of *spec*'s optimised graph, keyed by content and runtime."""
        if self._cache_dir is None:
            return None
        files = self.manifest["graphs"][spec.name].get("files", {spec.file: "graph"})
        if len(files) > 1:
            # External data would need its own optimised-initializer file; not cached yet.
            return None
        sha = self.manifest["files"][spec.file]["sha256"][:16]
        ep = self.providers[0] if isinstance(self.providers[0], str) else self.providers[0][0]
        key = f"{spec.name}-{sha}-{ep}-ort{ort.__version__}-{platform.machine()}.onnx"
        return self._cache_dir / key


def _providers(device: str) -> tuple[list[Any], str, int]:
    """(providers, OrtValue device type, device id) for a ``--device`` string."""
    available = ort.get_available_providers()
    kind, _, index = device.partition(":")
    if kind == "auto":
        kind = "cuda" if CUDA_EP in available else "cpu"
    if kind == "cpu":
        return [CPU_EP], "cpu", 0
    if kind == "cuda":
        if CUDA_EP not in available:
            raise RuntimeError(
                f"--device {device} needs onnxruntime's CUDA execution provider "
                f"(pip install onnxruntime-gpu); this onnxruntime has {available}"
            )
        dev = int(index or 0)
        return [(CUDA_EP, {"device_id": dev}), CPU_EP], "cuda", dev
    raise ValueError(f"unknown device {device!r}; use cpu, cuda[:N] or auto")


def _cache_dir(model_dir: Path, option: str | Path | bool | None) -> Path | None:
    if option is False:
        return None
    candidates = (
        [Path(option)]
        if option not in (None, True)
        else [model_dir / ".ort_cache", Path.home() / ".cache" / "trace-rt" / "ort"]
    )
    for d in candidates:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(d, os.W_OK):
            return d
    return None  # nowhere writable: optimise at every load


def _check_io(sess: ort.InferenceSession, spec: GraphSpec, path: Path) -> None:
    """The graph's inputs/outputs must be the spec's (catches a graph from another export)."""
    got_in = [i.name for i in sess.get_inputs()]
    got_out = [o.name for o in sess.get_outputs()]
    if got_in != spec.input_names or got_out != spec.output_names:
        raise CheckpointError(
            f"{path}: inputs {got_in} / outputs {got_out} differ from the manifest's "
            f"{spec.input_names} / {spec.output_names}"
        )
