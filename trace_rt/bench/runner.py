"""Runs one backend through warmup and measured requests, timing every stage.

All per-stage timing lives here. A request is the pipeline's own work, driven stage by
stage so each stage gets its own clock:

- ``video``: :meth:`Pipeline.prepare` (prompt ids, PyAV decode + uniform sampling, CLIP
  preprocessing in numpy, time ids): the same code ``trace-rt run`` runs;
- ``vision`` / ``projector``: the backend's ``encode_frames`` / ``project`` halves when it
  has them (:class:`~trace_rt.backends.base.StagedVideoEncoder`), each followed by
  ``synchronize``; otherwise ``encode_video`` is timed as ``vision`` and ``projector``
  has no samples;
- ``prefill``: ``backend.prefill`` (as timed by :func:`trace_rt.generate.generate`);
- ``ttft``: request start to the first token chosen (video + vision + projector + prefill
  + picking the token);
- ``decode_step``: time between consecutive tokens: ``backend.decode_step`` plus the
  loop's own work (sampling, head switching); one sample per step, ``--decode-steps`` of
  them per request, EOS ignored (``GenerationConfig.ignore_eos``);
- ``decode_step_text``: the same number of steps, each in the text head (so ``lm_head``
  runs: a fused decoder skips it in time and score steps, and random weights often
  decode time digits only), after an untimed prefill of the same prompt; token to token,
  the greedy pick included. A peer computes every logit each step, so this is the step
  to hold against a peer's ``decode_step`` (``--no-text-steps`` skips it);
- ``end_to_end``: request start to the parsed events.

Decode steps return host logits, which implies a device sync, so the clocks are honest
for asynchronous devices too.

A *peer* (another engine running the LLM alone, :mod:`trace_rt.bench.peer`) answers the
same request's prompt length and decode steps: ``prefill`` and ``decode_step`` only.
"""

from __future__ import annotations

import gc
import inspect
import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trace_rt.backends.base import StagedVideoEncoder
from trace_rt.bench import machine
from trace_rt.bench.peer import is_peer, one_peer_request, peer_prompt
from trace_rt.bench.plugins import BackendSpec
from trace_rt.events import parse_events
from trace_rt.generate import GenerationConfig, generate
from trace_rt.pipeline import Pipeline
from trace_rt.prompts import PromptSet
from trace_rt.tokenizer import TextTokenizer
from trace_rt.tokens import Head, head_base
from trace_rt.variants import variant_precision

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass(frozen=True)
class Request:
    """The one request every backend answers (same video, prompt and step count)."""

    video: str
    task: str = "dvc"
    query: str | None = None
    frames: int | None = None
    decode_steps: int = 64
    text_steps: bool = True  # also time decode_step_text (module docstring)

    @property
    def gen(self) -> GenerationConfig:
        # The first token comes from prefill; each further one is a decode step.
        return GenerationConfig(max_new_tokens=self.decode_steps + 1, ignore_eos=True)


@dataclass
class BackendRun:
    """Every sample of one backend, plus what it cost to hold it."""

    name: str
    model_dir: str
    load_s: float
    samples: dict[str, list[float]] = field(default_factory=dict)  # stage -> ms
    steps_by_run: list[list[float]] = field(default_factory=list)  # decode ms, per run
    token_ids: list[int] = field(default_factory=list)  # last measured run's tokens
    prompt_positions: int = 0
    frames: int = 0
    staged: bool = False
    peak_rss_mb: float | None = None
    peak_rss_method: str = "VmHWM"
    peak_gpu_mb: float | None = None
    weight_bytes: float | None = None  # decoder file bytes, artifact backends
    itemsize: int = 4
    options: dict[str, Any] = field(default_factory=dict)
    precision: str | None = None  # fp32 / fp16 / bf16 / int8 / int4: peers are compared by it
    decoder_variant: str | None = None  # the artifact's decoder variant that ran, if any
    peer: bool = False  # an engine running the LLM alone (trace_rt.bench.peer)


def build_options(cls: type, spec: BackendSpec, device: str, dtype: str | None) -> dict[str, Any]:
    """Constructor options: the spec's, plus device/dtype where the class takes them."""
    params = inspect.signature(cls.__init__).parameters
    opts = dict(spec.options)
    if "device" in params:
        opts.setdefault("device", device)
    if dtype is not None and "dtype" in params:
        opts.setdefault("dtype", dtype)
    return opts


def run_backend(
    spec: BackendSpec,
    cls: type,
    model_dir: Path,
    request: Request,
    *,
    warmup: int,
    runs: int,
    device: str,
    dtype: str | None,
    progress: Progress | None = None,
) -> BackendRun:
    """Load *spec* from *model_dir*, answer *request* ``warmup + runs`` times, free it."""
    note = progress or (lambda phase, done, total: None)
    rss_reset = machine.reset_peak_rss()
    gpu = machine.GpuMemory(device)
    gpu.reset()
    opts = build_options(cls, spec, device, dtype)
    if getattr(cls, "llm_only", False) and callable(getattr(cls, "prepare", None)):
        note("prepare", 0, warmup + runs)  # one-time, cached conversion: not the load
        cls.prepare(model_dir)
    note("load", 0, warmup + runs)
    t = time.perf_counter()
    backend = cls(model_dir, **opts)
    load_s = time.perf_counter() - t
    pipe = Pipeline(backend, TextTokenizer.from_dir(model_dir), PromptSet.for_model(model_dir))
    out = BackendRun(spec.name, str(model_dir), round(load_s, 3), options=_jsonable(opts))
    out.staged = isinstance(backend, StagedVideoEncoder)
    out.weight_bytes, out.itemsize = _decoder_bytes(backend)
    out.precision = precision_of(backend, spec)
    variant = getattr(backend, "decoder_variant", None)
    out.decoder_variant = variant if isinstance(variant, str) else None
    out.peer = is_peer(backend)
    try:
        request_once = _peer_request(pipe, request) if out.peer else None
        for i in range(warmup + runs):
            if request_once is not None:
                sample = request_once()
            else:
                sample = one_request(pipe, request, out.staged)
            gpu.sample()
            if i >= warmup:
                for stage, value in sample.items():
                    if stage == "decode_steps":
                        out.steps_by_run.append(value)
                        out.samples.setdefault("decode_step", []).extend(value)
                    elif stage == "decode_steps_text":
                        out.samples.setdefault("decode_step_text", []).extend(value)
                    elif stage == "token_ids":
                        out.token_ids = value
                    elif stage in ("prompt_positions", "frames"):
                        setattr(out, stage, value)
                    else:
                        out.samples.setdefault(stage, []).append(value)
            note("warmup" if i < warmup else "run", i + 1, warmup + runs)
        out.peak_rss_mb = machine.peak_rss_mb()
        out.peak_rss_method = "VmHWM" if rss_reset else "ru_maxrss (lifetime)"
        out.peak_gpu_mb = gpu.peak_mb()
    finally:
        del pipe, backend
        _free_memory()
    return out


def one_request(pipe: Pipeline, req: Request, staged: bool) -> dict[str, Any]:
    """One timed request; returns stage -> ms (``decode_steps``: a list)."""
    backend, gen, clock = pipe.backend, req.gen, time.perf_counter
    t0 = clock()
    prep = pipe.prepare(req.video, req.task, query=req.query, frames=req.frames, gen=gen)
    t1 = clock()
    if staged:
        features = backend.encode_frames(prep.pixel_values)
        backend.synchronize()
        t2 = clock()
        video = backend.project(features, prep.time_ids)
        backend.synchronize()
        t3 = clock()
    else:
        video = backend.encode_video(prep.pixel_values, prep.time_ids)
        backend.synchronize()
        t2 = t3 = clock()
    marks: list[float] = []
    result = generate(
        backend,
        prep.prompt_ids,
        video,
        gen,
        duration=prep.clip.duration,
        frame_times=prep.clip.times,
        on_token=lambda _tok: marks.append(clock()),
    )
    parse_events(result.token_ids, pipe.tokenizer, pipe.config.ids)
    t4 = clock()
    ms = 1e3
    sample: dict[str, Any] = {
        "video": (t1 - t0) * ms,
        "vision": (t2 - t1) * ms,
        "prefill": result.timing_ms["prefill"],
        "ttft": (marks[0] - t0) * ms,
        "decode_steps": [(b - a) * ms for a, b in itertools.pairwise(marks)],
        "end_to_end": (t4 - t0) * ms,
        "token_ids": result.token_ids,
        "prompt_positions": len(prep.prompt_ids) - 1 + int(video_rows(video)),
        "frames": len(prep.clip.times),
    }
    if staged:
        sample["projector"] = (t3 - t2) * ms
    if req.text_steps:
        sample["decode_steps_text"] = text_head_steps(
            backend, pipe.config.ids, prep.prompt_ids, video, req.decode_steps
        )
    return sample


def text_head_steps(backend, ids, prompt_ids: list[int], video: Any, n: int) -> list[float]:
    """*n* decode steps in the text head after an untimed prefill of *prompt_ids*: ms from
    token to token, each greedy pick included (as ``decode_step``'s loop picks)."""
    clock, base = time.perf_counter, head_base(ids, Head.TEXT)
    logits = backend.prefill(prompt_ids, video, Head.TEXT)
    out: list[float] = []
    t = clock()
    for _ in range(n):
        logits = backend.decode_step(base + int(np.argmax(logits)), Head.TEXT)
        t, t0 = clock(), t
        out.append((t - t0) * 1e3)
    return out


def _peer_request(pipe: Pipeline, req: Request) -> Callable[[], dict[str, Any]]:
    """One peer request as a closure: the prompt (our request's text and video-block
    positions as text ids) is built once, untimed; the peer has no video stage to time."""
    prep = pipe.prepare(req.video, req.task, query=req.query, frames=req.frames, gen=req.gen)
    frames = len(prep.clip.times)
    ids = peer_prompt(prep.prompt_ids, frames * pipe.config.tokens_per_frame, pipe.config)

    def request() -> dict[str, Any]:
        sample = one_peer_request(pipe.backend, ids, req.decode_steps)
        return {**sample, "prompt_positions": len(ids), "frames": frames}

    return request


def precision_of(backend: Any, spec: BackendSpec) -> str:
    """What the backend's decoder computes in: a peer's own ``precision``, a quantised
    variant's weight type (int4/int8, from its manifest record: ``fused-int4`` is int4,
    ``fused`` its graph's float type), else its float dtype (fp32/fp16/bf16)."""
    declared = getattr(backend, "precision", None)
    if isinstance(declared, str):
        return declared
    variant = getattr(backend, "decoder_variant", None)
    manifest = getattr(backend, "manifest", None)
    if isinstance(variant, str) and isinstance(manifest, dict):
        quantised = variant_precision(manifest, variant)
        if quantised is not None:
            return quantised
    elif isinstance(asked := spec.options.get("decoder_variant"), str):
        return asked.split(".")[0]  # a backend without a manifest: the name it was given
    dtype = str(getattr(backend, "dtype", "float32"))
    for key, name in (("bfloat16", "bf16"), ("float16", "fp16"), ("float32", "fp32")):
        if key in dtype:
            return name
    return dtype


def video_rows(video: Any) -> int:
    """Rows of the video block behind a backend's handle (array, tensor or device handle)."""
    if hasattr(video, "rows"):
        return int(video.rows)
    return int(video.shape[0])


def _decoder_bytes(backend: Any) -> tuple[float | None, int]:
    """(bytes of the decoder graph's weights on disk, compute itemsize) for artifact
    backends: a quantised variant's real size beats a params x dtype estimate. None for
    checkpoint backends (the floor then uses params x itemsize)."""
    itemsize = 4
    dtype = getattr(backend, "dtype", None)
    if dtype is not None:
        itemsize = getattr(dtype, "itemsize", None) or 4
    if isinstance(getattr(backend, "weight_bytes", None), (int, float)):
        return float(backend.weight_bytes), int(itemsize)  # a peer's model file(s)
    manifest = getattr(backend, "manifest", None)
    if not isinstance(manifest, dict):
        return None, int(itemsize)
    try:
        graph = manifest["graphs"]["decoder"]
        files = graph.get("files") or {graph["file"]: "graph"}
        total = sum(manifest["files"][f]["bytes"] for f in files)
    except (KeyError, TypeError):
        return None, int(itemsize)
    return float(total), int(itemsize)


def _free_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _jsonable(opts: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
        for k, v in opts.items()
    }
