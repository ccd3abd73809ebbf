"""onnxruntime backend: runs an artifact directory written by ``python -m export onnx``.

No torch: the serving image has numpy and onnxruntime only. The three graphs and their
I/O come from ``manifest.json`` (specs from :mod:`trace_rt.graphs`); decode-step ids are
embedded on the host from ``embeddings.npy`` (one row per step; why: trace_rt/graphs.py).

KV cache (the export's ``kv_cache: pooled-position-major`` contract, trace_rt/graphs.py):
:class:`~trace_rt.backends.ort_kv.KVPool` holds per-layer K and V buffers
[capacity, max_sequences, kv, hd]. A batched decode step binds the first P positions of
every slot as ``past_*`` by pointer (onnxruntime reads the cache in place) and scatters the
new rows; with one slot the new positions are written straight into the buffers, as before
pooling. Sequences of different lengths share a step: the graph masks each row's past by
its position.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from trace_rt.backends.base import (
    KVPrefix,
    check_decode,
    check_pool_size,
    check_prefix,
    check_slots,
    split_prompt,
)
from trace_rt.backends.ort_kv import KVPool
from trace_rt.backends.ort_session import (
    cache_dir_for,
    check_io,
    ort_version,
    providers_for,
    warn_once,
)
from trace_rt.config import TraceConfig
from trace_rt.errors import CheckpointError, InputError, PromptTooLongError
from trace_rt.graphs import (
    BF16,
    DECODER,
    GRAPH_NAMES,
    KV_CACHE,
    PROJECTOR,
    VISION_ENCODER,
    GraphSpec,
    TensorSpec,
    embed_ids,
    kv_names,
    load_embeddings,
    load_manifest,
    manifest_specs,
)
from trace_rt.tokens import VIDEO_PLACEHOLDER_ID, Head, head_base, head_size
from trace_rt.variants import TEXT_HEAD_INPUT, pick_variant

# Cache positions reserved past the prompt at prefill (grown by doubling beyond that).
PREFILL_HEADROOM = 1024
# onnxruntime before 1.32 dies with SIGFPE running the decoder over an empty past (every
# prefill) once MatmulTransposeFusion has folded its transposes into FusedMatMul: seen on
# an AVX-512 x86-64 CPU with 1.23.2 (the last release with Python 3.10 wheels, JetPack 6's
# Python), 1.24.1, 1.27.0 and 1.30.0; 1.32.0 runs it. Those versions skip that one fusion.
FIXED_EMPTY_PAST = (1, 32)


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
            A directory named here must take the cache (:class:`InputError` otherwise);
            the default one falls back to optimising in memory with a warning, once.
        verify: ``sha256`` (default) or ``size``: how thoroughly the files are checked
            against the manifest at load.
        decoder_variant: run a decoder variant instead of ``decoder.onnx``: quantised
            (``python -m export quantize``: ``int4``, ``int8``, ``int4-qdq``, ...) or
            onnxruntime-specific (``python -m export optimize``: ``fused``, ``contrib``,
            ``fused-int4``, ...), the manifest's ``variants``. A precision ``optimize``
            measured (``int4``, ``int8``) names the fastest variant of it, as recorded
            (``fused-int4`` rather than ``int4`` when it measured faster). None: the
            manifest's default for onnxruntime (``defaults``, set by ``optimize`` when
            measured faster), else ``decoder.onnx``; ``portable``: ``decoder.onnx``
            regardless. The rule: :func:`trace_rt.variants.resolve_variant`.
        video_graphs: load the vision encoder and projector too (False: decoder only,
            for a server whose encoders run as their own models).
        max_sequences: KV slots, i.e. sequences one decode step can advance together. A
            step computes every slot's row (ragged lengths are masked, not skipped), so
            size it to the expected concurrency: 1 for one request at a time.
        exact_variant: take *decoder_variant* as a variant's own name, never as a
            precision (``int4`` is then the unfused ``decoder.int4.onnx``; for timing it).
    """

    name = "onnxruntime"

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        threads: int | None = None,
        cache_dir: str | Path | bool | None = None,
        verify: str = "sha256",
        decoder_variant: str | None = None,
        video_graphs: bool = True,
        max_sequences: int = 1,
        exact_variant: bool = False,
    ):
        check_pool_size(max_sequences)
        self.max_sequences = max_sequences
        self.model_dir = Path(model_dir)
        self.manifest = load_manifest(self.model_dir, verify=verify)
        self.config = TraceConfig.from_dir(self.model_dir)
        if self.manifest["export"].get("dtype") == BF16:
            raise CheckpointError(
                f"{self.model_dir}: a bf16 export; bf16 artifacts are for TensorRT/CUDA "
                "(`python -m export trt`, `--backend tensorrt`): onnxruntime's CPU EP has no "
                "bf16 kernels for most of the graphs' ops. For onnxruntime export with "
                "`python -m export onnx CKPT OUT --dtype fp16` (or fp32)"
            )
        self.specs: dict[str, GraphSpec] = manifest_specs(self.manifest)
        missing = [g for g in GRAPH_NAMES if g not in self.specs]
        if missing:
            raise CheckpointError(f"{self.model_dir}: manifest lists no graph {missing}")
        self.decoder_variant, rec = pick_variant(
            self.manifest,
            self.model_dir,
            self.name,
            decoder_variant,
            exact=exact_variant,
            verify=verify,
        )
        if rec is not None:
            self._use_decoder_variant(rec)
        scheme = self.manifest["export"].get("kv_cache")
        if scheme != KV_CACHE:
            raise CheckpointError(
                f"{self.model_dir}: decoder KV-cache scheme {scheme!r}, this runtime needs "
                f"{KV_CACHE!r}; re-export the checkpoint with `python -m export onnx`"
            )
        self.providers, self.device_type, self.device_id = providers_for(device)
        self.threads = threads
        self._cache_dir = cache_dir_for(self.model_dir, cache_dir)
        self._cache_asked = cache_dir not in (None, True, False)  # a directory was named
        graphs = GRAPH_NAMES if video_graphs else (DECODER,)
        self.sessions = {g: self._session(self.specs[g]) for g in graphs}
        # A fused decoder skips lm_head when no row is in the text head (export/fuse.py).
        self._text_gate = TEXT_HEAD_INPUT in self.specs[DECODER].input_names
        self._text_flags = (np.array(False), np.array(True))
        # [ids, H] in unified id order; memory-mapped, so only rows used are read.
        self.embeddings = load_embeddings(self.model_dir, self.config)
        self.dtype = self.embeddings.dtype  # the graphs' float dtype
        cfg = self.config
        self.kv = KVPool(
            cfg.num_hidden_layers,
            max_sequences,
            cfg.num_key_value_heads,
            cfg.attn_head_dim,
            self.dtype,
            self.device_type,
            self.device_id,
        )
        self._logits = np.empty((max_sequences, cfg.ids.size), np.float32)  # host output
        names = [kv_names(i) for i in range(cfg.num_hidden_layers)]
        self._past_names = [n for pk, pv, _, _ in names for n in (pk, pv)]
        self._new_names = [n for _, _, nk, nv in names for n in (nk, nv)]

    # ---- Backend protocol ----------------------------------------------------------
    def encode_video(self, pixel_values: np.ndarray, time_ids: np.ndarray) -> np.ndarray:
        return self.project(self.encode_frames(pixel_values), time_ids)  # [F*(S+6), H]

    # encode_frames/project: the two halves of encode_video (StagedVideoEncoder), so the
    # benchmark can time the two graphs apart.
    def encode_frames(self, pixel_values: np.ndarray) -> ort.OrtValue:
        px = np.ascontiguousarray(pixel_values, dtype=np.float32)  # [F, 3, H, W]
        # Features stay on the device between the two graphs.
        (features,) = self._run(VISION_ENCODER, {"pixel_values": px}, host_outputs=())
        return features

    def project(self, features: ort.OrtValue, time_ids: np.ndarray) -> np.ndarray:
        tid = np.ascontiguousarray(time_ids, dtype=np.int64)  # [F, 6]
        (video,) = self._run(PROJECTOR, {"features": features, "time_ids": tid})
        return video.numpy()  # [F*(S+6), H]

    def prefill(
        self,
        prompt_ids: Sequence[int],
        video: np.ndarray | None,
        head: Head,
        *,
        slot: int = 0,
        prefix: KVPrefix | None = None,
    ) -> np.ndarray:
        check_slots([slot], self.max_sequences)
        before, after = split_prompt(prompt_ids, VIDEO_PLACEHOLDER_ID)
        if prefix is None:
            x = np.concatenate([self._embed(before), video.astype(self.dtype), self._embed(after)])
            start, past = 0, None
        else:
            check_prefix(prefix, before)
            x, start, past = self._embed(after), prefix.length, list(prefix.kv)
        self._fit(slot, start + x.shape[0])
        self._fill(slot, x, start, past, text=head == Head.TEXT)
        return self._head(self._logits, 0, head)

    def save_prefix(
        self, prompt_ids: Sequence[int], video: np.ndarray, *, slot: int = 0
    ) -> KVPrefix:
        check_slots([slot], self.max_sequences)
        before, _ = split_prompt(prompt_ids, VIDEO_PLACEHOLDER_ID)
        x = np.concatenate([self._embed(before), video.astype(self.dtype)])  # [L, H]
        self._fit(slot, x.shape[0])
        self._fill(slot, x, 0, None, text=False)  # its logits are not read
        return KVPrefix(tuple(before), int(video.shape[0]), tuple(self.kv.read(slot, len(x))))

    def decode(
        self, slots: Sequence[int], token_ids: Sequence[int], heads: Sequence[Head]
    ) -> list[np.ndarray]:
        check_decode(slots, token_ids, heads, self.max_sequences)
        rows = np.asarray(slots, np.int64)
        longest = int(self.kv.lengths[rows].max())
        limit = self.config.max_position_embeddings
        if longest >= limit:
            raise PromptTooLongError(f"generation reached the model's context of {limit}")
        if longest >= self.kv.capacity:
            self.kv.grow(min(2 * self.kv.capacity, limit))
        cols = self.kv.col_array(slots)
        text = Head.TEXT in heads
        if self.kv.width == 1:
            pos = self.kv.lengths[rows, None].copy()  # [1, 1]
            x = self._embed(token_ids)[None]
            self._run_decoder(x, pos, longest, in_place=True, text=text)
        else:
            # Every column's row runs (the pool's past is one block); unused rows sit at
            # position 0, where they attend only to themselves, and are discarded.
            x = np.zeros((self.kv.width, 1, self.config.hidden_size), self.dtype)
            x[cols, 0] = self._embed(token_ids)
            pos = np.zeros((self.kv.width, 1), np.int64)
            pos[cols, 0] = self.kv.lengths[rows]
            new = self._run_decoder(x, pos, longest, text=text)
            self.kv.scatter(rows, new)
        self.kv.lengths[rows] += 1
        return [self._head(self._logits, c, h) for c, h in zip(cols, heads, strict=True)]

    def decode_step(self, token_id: int, head: Head, *, slot: int = 0) -> np.ndarray:
        return self.decode([slot], [token_id], [head])[0]

    def release(self, slot: int) -> None:
        check_slots([slot], self.max_sequences)
        self.kv.release(slot)

    def synchronize(self) -> None:
        # Runs return once outputs are ready; logits come back to host memory.
        return None

    # ---- internals -------------------------------------------------------------------
    def _embed(self, ids: Sequence[int]) -> np.ndarray:
        return embed_ids(self.embeddings, ids)  # [n, H]

    def _head(self, logits: np.ndarray, row: int, head: Head) -> np.ndarray:
        base, size = head_base(self.config.ids, head), head_size(self.config.ids, head)
        return logits[row, base : base + size].copy()

    def _fit(self, slot: int, n: int) -> None:
        """Room for *n* positions in *slot* (and a generous answer), emptying the slot."""
        limit = self.config.max_position_embeddings
        if n > limit:
            raise PromptTooLongError(f"prompt of {n} positions exceeds the model's {limit}")
        self.kv.lengths[slot] = 0
        self.kv.fit(n, min(n + PREFILL_HEADROOM, limit))
        self.kv.assign(slot)

    def _fill(
        self, slot: int, x: np.ndarray, start: int, past: list[np.ndarray] | None, text: bool
    ) -> None:
        """Run *x* [T, H] into *slot* at positions start.. over *past* (a prefix's K/V,
        [start, 1, kv, hd] each, or none: start is 0); logits land in ``_logits[0]``
        (the text head's columns only if *text*, with a fused decoder)."""
        t = x.shape[0]
        pos = np.arange(start, start + t, dtype=np.int64)[None]  # [1, T]
        if self.kv.width == 1:
            # One column: past and new positions are contiguous in the buffers; in place.
            if past is not None:
                self.kv.write(slot, 0, past)
            self._run_decoder(x[None], pos, start, in_place=True, text=text)
        else:
            # Several columns: a slot's positions are strided, so the prompt's K/V come out
            # into host arrays and are copied into the slot (once per prompt).
            new = self._run_decoder(x[None], pos, start, past=past, text=text)
            if past is not None:
                self.kv.write(slot, 0, past)
            self.kv.write(slot, start, new)
        self.kv.lengths[slot] = start + t

    def _run_decoder(
        self,
        embeds: np.ndarray,
        pos: np.ndarray,
        past_len: int,
        *,
        past: list[np.ndarray] | None = None,
        in_place: bool = False,
        text: bool = True,
    ) -> list[np.ndarray]:
        """One decoder run: *embeds* [B, T, H] at positions *pos* [B, T].

        The past is *past* (host arrays [P, B, kv, hd]) when given, else the pool's first
        *past_len* positions. New K/V go into the pool (``in_place``, one-slot pool) or
        come back as host arrays [T, B, kv, hd] (returned); logits land in ``_logits``
        (with a fused decoder and not *text*, zeros in the text head's columns).
        """
        b, t = pos.shape
        binding = self.sessions[DECODER].io_binding()
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, self.dtype))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(pos, np.int64))
        if self._text_gate:
            binding.bind_cpu_input(TEXT_HEAD_INPUT, self._text_flags[text])
        if past is not None:
            for name, arr in zip(self._past_names, past, strict=True):
                binding.bind_cpu_input(name, arr)
        elif past_len == 0 and b == 1 and not in_place:
            empty = np.zeros((0, 1, *self.kv.row), self.dtype)
            for name in self._past_names:
                binding.bind_cpu_input(name, empty)
        else:
            self.kv.bind_pool(binding, past_len)
        new: list[np.ndarray] = []
        if in_place:
            self.kv.bind_new_in_place(binding, past_len, t)
        else:
            for name in self._new_names:
                arr = np.empty((t, b, *self.kv.row), self.dtype)
                binding.bind_output(name, "cpu", 0, self.dtype, list(arr.shape), _ptr(arr))
                new.append(arr)
        out = self._logits[:b]
        binding.bind_output("logits", "cpu", 0, np.float32, list(out.shape), _ptr(out))
        self.sessions[DECODER].run_with_iobinding(binding)
        return new

    def _run(
        self, graph: str, feeds: dict[str, Any], host_outputs: Sequence[str] | None = None
    ) -> list[ort.OrtValue]:
        """Run *graph* with IO binding; outputs stay on the device unless in host_outputs.

        host_outputs=None brings every output to host memory.
        """
        sess = self.sessions.get(graph)
        if sess is None:
            raise RuntimeError(f"the {graph} graph was not loaded (video_graphs=False)")
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
            so = self._options(ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, spec)
            so.optimized_model_filepath = str(tmp)
            try:
                first = ort.InferenceSession(str(path), so, **self._session_args(spec))
                del first  # free its weights before the real session loads
                tmp.replace(cached)
            except Exception as e:  # onnxruntime's errors derive from Exception only
                tmp.unlink(missing_ok=True)
                reason = f"cannot write the optimised {spec.name} graph to {cached} ({e})"
                if self._cache_asked:
                    raise InputError(f"cache_dir {self._cache_dir}: {reason}") from e
                # The default cache is a convenience: optimise in memory, and say so once.
                warn_once(self._cache_dir, f"{reason}; graphs are optimised at every load")
                cached = None
        # EXTENDED fusions are in the cached file; ALL adds the layout passes, which
        # depend on the CPU and therefore are redone at each load.
        src = cached if cached is not None and cached.is_file() else path
        so = self._options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL, spec)
        try:
            sess = ort.InferenceSession(str(src), so, **self._session_args(spec))
        except Exception as e:  # onnxruntime's Fail/InvalidGraph/... derive from Exception
            raise CheckpointError(f"{path}: onnxruntime cannot load it ({e})") from e
        check_io(sess, spec, path)
        return sess

    def _session_args(self, spec: GraphSpec) -> dict[str, Any]:
        """Providers, and the fusions this onnxruntime must skip for *spec*."""
        args: dict[str, Any] = {"providers": self.providers}
        if spec.name == DECODER and ort_version() < FIXED_EMPTY_PAST:
            args["disabled_optimizers"] = ["MatmulTransposeFusion"]
        return args

    def _options(self, level: ort.GraphOptimizationLevel, spec: GraphSpec) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        if spec.name != DECODER:
            # Each session has its own intra-op workers, and they spin for a while after a
            # run. The vision graph runs right before the prefill: its spinning workers took
            # the CPUs from it (int8-dynamic prefill of `small`, 2 cores: 361 ms after the
            # vision encoder vs 185 alone). One large run per request gains nothing from
            # spinning; the decoder, a chain of small ops per step, keeps it.
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # One request at a time, graph by graph: parallelism inside ops, not between them.
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.inter_op_num_threads = 1
        if self.threads:
            so.intra_op_num_threads = self.threads
        so.log_severity_level = 3  # errors only; fusion notices are noise here
        return so

    def _use_decoder_variant(self, rec: dict[str, Any]) -> None:
        """Load the decoder from a variant's file (*rec*: its checked manifest record; same
        I/O as ``decoder.onnx`` plus its ``extra_inputs``).

        The variant's files are merged into this backend's copy of the manifest, so the
        session and graph-cache code see the variant as the decoder it runs.
        """
        spec = self.specs[DECODER]
        extra = tuple(TensorSpec.from_dict(t) for t in rec.get("extra_inputs", ()))
        self.specs[DECODER] = dataclasses.replace(
            spec, file=rec["file"], inputs=spec.inputs + extra
        )
        self.manifest["graphs"][DECODER] = self.manifest["graphs"][DECODER] | {
            "file": rec["file"],
            "files": {f: r["role"] for f, r in rec["files"].items()},
        }
        for f, r in rec["files"].items():
            self.manifest["files"][f] = {"sha256": r["sha256"], "bytes": r["bytes"]}

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
        # Graphs cached before a fusion was turned off still hold it: the key names them.
        off = "".join(f"-no{o}" for o in self._session_args(spec).get("disabled_optimizers", []))
        key = f"{spec.name}-{sha}-{ep}-ort{ort.__version__}{off}-{platform.machine()}.onnx"
        return self._cache_dir / key


def _ptr(arr: np.ndarray) -> int:
    assert arr.flags.c_contiguous
    return arr.ctypes.data
