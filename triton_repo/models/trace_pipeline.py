"""Triton Python model ``trace_pipeline``: one TRACE request in, events streamed out.

Copied by ``python -m triton_repo build`` to ``<repo>/trace_pipeline/1/model.py``, next to
``serving.json`` (the repository's settings) and ``artifacts/`` (the export). Decoupled:
each request gets one response per event, sent as soon as the decoding loop completes it,
then a final response with the ``trace-rt run`` JSON (events, ids, timings).

The model part is one :class:`~trace_rt.engine.Engine` per instance, stepped by one thread
(:class:`~trace_rt.serving.engine_thread.EngineThread`): concurrent requests share its
decode steps (continuous batching over ``max_sequences`` KV slots), each request streams
its own events and gets its own final response, and a request that fails or is
cancelled leaves the others decoding. The decoder runs in this process with its KV cache
on the backend's device, so a token costs no round trip through Triton. The vision
encoder and projector run in-process too, or as the repository's
``vision_encoder``/``projector`` models through BLS (``serving.json`` ``encoders``), where
Triton's dynamic batching lets concurrent requests share a batch. Every error a client can
cause answers that request with a message naming the problem; the model keeps serving.

Per request: ``execute`` hands it to a small thread pool (``serving.json``
``decode_workers``) and returns. A worker parses it, finds or fills the video cache's entry
(:class:`~trace_rt.engine.VideoCache`: keyed by a hash of the bytes and everything the
encoding depends on; concurrent requests for one new video decode and encode it once; a
``video_id`` request pins an entry an earlier request made), and submits a sequence to the
engine. The engine thread streams each event through the request's response sender as the
parser completes it, and sends the final response when the sequence finishes.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import mmap
import os
import site
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def _add_site_dirs() -> None:
    # The bundled tritonserver's stub runs an isolated interpreter (no PYTHONPATH):
    # `trace-rt serve` passes the package directories of the Python that started it.
    for d in os.environ.get("TRACE_RT_SITE_DIRS", "").split(os.pathsep):
        if d and d not in sys.path:
            site.addsitedir(d)


_add_site_dirs()

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from trace_rt.engine import Engine, Sequence, VideoCache  # noqa: E402
from trace_rt.errors import DecodeCancelledError, TraceError  # noqa: E402
from trace_rt.events import EventParser  # noqa: E402
from trace_rt.graphs import PROJECTOR, VISION_ENCODER  # noqa: E402
from trace_rt.pipeline import Pipeline, Prepared  # noqa: E402
from trace_rt.serving.engine_thread import EngineThread  # noqa: E402
from trace_rt.serving.jobs import Job, cache_key, job_result  # noqa: E402
from trace_rt.serving.metrics import ServingMetrics  # noqa: E402
from trace_rt.serving.protocol import (  # noqa: E402
    ARTIFACTS_DIR,
    ServingRequest,
    ServingSettings,
    as_bytes_tensor,
    event_json,
    parse_request,
    pipeline_inputs,
    threads_per_instance,
)

CANCEL_CHECK_S = 0.05  # how often decoding asks whether the client has gone


class Cancelled(Exception):
    """The client went away; stop decoding for it."""


class CancelCheck:
    """``request.is_cancelled()`` at most every :data:`CANCEL_CHECK_S` (it asks the server,
    ~0.2 ms a call); callable, for the video decoder and the decoding loop alike."""

    def __init__(self, request: Any):
        self.request, self.last, self.gone = request, time.perf_counter(), False

    def __call__(self) -> bool:
        now = time.perf_counter()
        if not self.gone and now - self.last > CANCEL_CHECK_S:
            self.last = now
            self.gone = bool(self.request.is_cancelled())
        return self.gone


# The inputs that can be large: read in place, and their shared memory freed after.
PAYLOADS = ("video", "frames")
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_REMOVE = 9  # free a shared mapping's pages and their backing store


def drop_pages(array: np.ndarray | None) -> None:
    """Give back the shared memory under an input tensor once it has been read.

    The Python backend copies each input into a shared-memory pool that grows to the
    largest request and never shrinks, so one oversized payload (refused) stayed held by
    tritonserver and this stub for good. Punching out the whole pages inside the tensor's
    own bytes frees them (they read as zeros if touched again; the pool's bookkeeping
    lies outside them). Measured: a refused 100 MB request left 95 MiB of /dev/shm held
    before, none after. A tensor that is not in shared memory is left alone (EINVAL).
    """
    if array is None or not array.flags.c_contiguous or array.nbytes < 2 * mmap.PAGESIZE:
        return
    start = array.__array_interface__["data"][0]
    lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    hi = (start + array.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if hi > lo:
        _LIBC.madvise(lo, hi - lo, MADV_REMOVE)


class BlsEncoders:
    """The video half of a backend, run by the repository's own encoder models (BLS)."""

    def __init__(self, specs: dict[str, Any], max_batch_frames: int):
        self.vision, self.projector = specs[VISION_ENCODER], specs[PROJECTOR]
        self.max_batch_frames = max_batch_frames

    def encode_video(self, pixel_values: np.ndarray, time_ids: np.ndarray) -> np.ndarray:
        (px_name,) = self.vision.input_names
        (feat_name,) = self.vision.output_names
        # One request per max_batch_frames frames: the model's dynamic batcher may merge
        # them with other requests' frames.
        chunks = [
            _bls(self.vision.name, {px_name: pixel_values[i : i + self.max_batch_frames]})[
                feat_name
            ]
            for i in range(0, len(pixel_values), self.max_batch_frames)
        ]
        features = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]  # [F, P, D]
        feeds = dict(zip(self.projector.input_names, (features, time_ids), strict=True))
        (out,) = self.projector.output_names
        return _bls(self.projector.name, feeds)[out]  # [F * (S + 6), hidden]


def _bls(model: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    request = pb_utils.InferenceRequest(
        model_name=model,
        inputs=[pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in feeds.items()],
        requested_output_names=[],
        # tensorrt_plan models answer in GPU memory; the host loop wants numpy.
        preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
    )
    response = request.exec()
    if response.has_error():
        raise RuntimeError(f"{model}: {response.error().message()}")
    return {t.name(): t.as_numpy() for t in response.output_tensors()}


class SplitBackend:
    """A backend whose ``encode_video`` is done elsewhere (BLS); everything else (the KV
    slot pool: prefill, save_prefix, decode, release) is the in-process decoder's."""

    def __init__(self, decoder: Any, encoders: BlsEncoders):
        self.decoder, self.encoders = decoder, encoders

    def encode_video(self, pixel_values: np.ndarray, time_ids: np.ndarray) -> np.ndarray:
        return self.encoders.encode_video(pixel_values, time_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.decoder, name)


def _task_of(value: np.ndarray | None) -> str | None:
    """The task a request names, for metric labels only (validation comes after)."""
    if value is None or value.size != 1:
        return None
    item = value.reshape(-1)[0]
    return item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.settings = s = ServingSettings.from_dir(version_dir)
        artifacts = version_dir / ARTIFACTS_DIR
        bls = s.encoders == "bls"
        config = json.loads(args["model_config"])
        options: dict[str, Any] = {"video_graphs": not bls, "max_sequences": s.max_sequences}
        if s.backend == "onnxruntime":
            cpu = args.get("model_instance_kind") == "CPU"
            options["device"] = "cpu" if cpu else "auto"
            options["threads"] = s.threads or (threads_per_instance(config) if cpu else None)
        else:
            options["device"] = f"cuda:{args.get('model_instance_device_id', '0')}"
        self.cache = VideoCache(s.video_cache_mb << 20)
        self.pipe = Pipeline.from_dir(artifacts, s.backend, video_cache=self.cache, **options)
        if bls:
            specs = self.pipe.backend.specs  # the graphs' I/O, from the manifest it loaded
            max_batch = int(config["parameters"]["max_batch_frames"]["string_value"])
            self.pipe.backend = SplitBackend(self.pipe.backend, BlsEncoders(specs, max_batch))
        self.input_names = [t.name for t in pipeline_inputs(self.pipe.config)]
        self.metrics = ServingMetrics(pb_utils.MetricFamily, args["model_name"], s.max_sequences)
        self.limits = s.decode_limits()
        # A TensorRT backend's encoders and decoder share one CUDA stream and its buffers:
        # encodes then take turns with decode steps. onnxruntime sessions run side by side.
        self.device_lock = threading.Lock() if s.backend == "tensorrt" and not bls else None
        # Workers decode (and encode) videos side by side; one engine thread decodes
        # every request of this instance, batching their steps.
        self.pool = ThreadPoolExecutor(s.decode_workers, thread_name_prefix="trace-request")
        self.engine = EngineThread(
            Engine(self.pipe.backend), lock=self.device_lock, on_step=self.metrics.on_step
        )
        self.metrics.watch(self.engine, self.cache)

    def execute(self, requests: list[Any]) -> None:
        # Decoupled: return at once; the engine thread answers through each request's sender.
        for request in requests:
            self.pool.submit(self._admit, request, time.perf_counter())
        return None

    def _admit(self, request: Any, t0: float) -> None:
        """Worker thread: parse, find or fill the cached video, submit to the engine."""
        job = Job(request.get_response_sender(), CancelCheck(request), t0)
        try:
            inputs = self._inputs(request)
            job.task = _task_of(inputs.get("task"))
            try:
                req = parse_request(inputs, self.settings)
                if req.frames is not None:  # keep a copy: the view's pages go next
                    req = dataclasses.replace(req, frames=np.array(req.frames))
            finally:
                for name in PAYLOADS:
                    drop_pages(inputs.get(name))
            job.req = req
            self._pin(job)
            meta = job.entry.meta
            job.prompt_ids = self.pipe._prompt(
                req.task, req.query, req.question, len(meta["times"]), req.gen
            )
            job.parser = EventParser(self.pipe.tokenizer, self.pipe.config.ids)
            seq = Sequence(
                job.prompt_ids,
                job.entry.video,
                req.gen,
                duration=meta["duration"],
                frame_times=meta["times"],
                on_token=lambda token: self._on_token(job, token),
                cancelled=job.cancelled,
                prefixes=job.entry.prefixes,
            )
            if job.cancelled():
                raise Cancelled
            self.engine.submit(seq, lambda done: self._done(job, done))
        except BaseException as e:
            job.release()
            self._answer_error(job, e)

    def _pin(self, job: Job) -> None:
        """Pin the request's video cache entry: by ``video_id``, or by its content (filling
        it when new; concurrent requests for one video wait for one fill)."""
        req = job.req
        if req.video_id is not None:
            job.pin = self.cache.pinned(req.video_id)
            job.entry = job.pin.__enter__()  # UnknownVideoError: send the bytes again
            return
        n = self.pipe.config.num_frames if req.video is not None else len(req.frames)
        # Checked before any decoding: a prompt too long for the context fails at once.
        self.pipe._prompt(req.task, req.query, req.question, n, req.gen)
        key = cache_key(req, n, self.pipe.config.preprocess, self.pipe.fingerprint)
        while True:
            pin = self.cache.entry(key, lambda entry: self._fill(job, entry))
            try:
                job.entry = pin.__enter__()
            except DecodeCancelledError:
                # Another request's client left while it filled the entry we waited for:
                # try again (the failed entry is gone: we may fill it), unless ours left.
                if job.owner or job.cancelled():
                    raise
                continue
            job.pin = pin
            return

    def _fill(self, job: Job, entry: Any) -> None:
        """A cache miss: decode, preprocess and encode the request's video into *entry*."""
        job.owner = True
        t0 = time.perf_counter()
        prepared = self.prepare(job.req, job.cancelled)
        t1 = time.perf_counter()
        backend = self.pipe.backend
        with self.device_lock or contextlib.nullcontext():
            entry.video = backend.encode_video(prepared.pixel_values, prepared.time_ids)
            backend.synchronize()
        job.video_ms, job.vision_ms = (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3
        entry.video_bytes = int(getattr(entry.video, "nbytes", 0) or 0)
        entry.meta = {"duration": prepared.clip.duration, "times": prepared.clip.times}

    def _on_token(self, job: Job, token: int) -> None:
        """Engine thread: feed the request's parser, send each completed event."""
        if job.steps0 is None:
            snap = self.engine.snapshot()
            job.steps0 = (snap.steps, snap.batch_sum)
        for event in job.parser.feed(token):
            self._send_event(job, event)

    def _send_event(self, job: Job, event: Any) -> None:
        if not job.events:
            self.metrics.ttfe.observe(time.perf_counter() - job.t0)
        payload = event_json(event.to_dict(), len(job.events))
        job.events.append(event)
        tensor = pb_utils.Tensor("event", as_bytes_tensor(payload))
        job.sender.send(pb_utils.InferenceResponse(output_tensors=[tensor]))

    def _done(self, job: Job, seq: Sequence) -> None:
        """Engine thread: the sequence has finished; answer its request."""
        try:
            # A send that failed because the client left is a cancellation, not our bug.
            if seq.stop_reason == "cancelled" or (seq.error is not None and job.cancelled()):
                raise Cancelled
            if seq.error is not None:
                raise seq.error
            for event in job.parser.finish():
                self._send_event(job, event)
            snap = self.engine.snapshot()
            steps0 = job.steps0 or (snap.steps, snap.batch_sum)
            steps = snap.steps - steps0[0]
            engine = {
                "steps": steps,
                "mean_batch": (snap.batch_sum - steps0[1]) / steps if steps else 1.0,
                "max_sequences": snap.slots,
                "slots_in_use": snap.slots_in_use,
                "waiting": snap.waiting,
                "video_cache": self.cache.stats(),
            }
            result = job_result(job, seq, engine)
            result["timing_ms"]["total"] = (time.perf_counter() - job.t0) * 1e3
            timing = result["timing_ms"]
            self.metrics.finished(len(seq.tokens), timing["queue"] / 1e3, timing["decode"] / 1e3)
            final = pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("result", as_bytes_tensor(json.dumps(result)))]
            )
            job.release()  # before the reply: clients may read the cache's metrics next
            self.metrics.count_request(job.task, "ok")
            job.sender.send(final, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except BaseException as e:
            job.release()
            self._answer_error(job, e)

    def _answer_error(self, job: Job, error: BaseException) -> None:
        """The request ends without a result: cancelled, the client's mistake, or our bug
        (logged). Never raises: the other requests go on."""
        try:
            if isinstance(error, (Cancelled, DecodeCancelledError)):
                job.sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                self.metrics.count_request(job.task, "cancelled")
            elif isinstance(error, TraceError):  # the client's mistake: say which
                self.metrics.count_request(job.task, "invalid")
                self._fail(job.sender, f"{type(error).__name__}: {error}")
            else:
                trace = "".join(traceback.format_exception(error))
                pb_utils.Logger.log_error(f"trace_pipeline: {trace}")
                self.metrics.count_request(job.task, "error")
                self._fail(job.sender, f"internal error: {type(error).__name__}: {error}")
        except Exception:
            pb_utils.Logger.log_error(f"trace_pipeline: answering: {traceback.format_exc()}")

    @staticmethod
    def _fail(sender: Any, message: str) -> None:
        response = pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _inputs(self, request: Any) -> dict[str, np.ndarray | None]:
        out: dict[str, np.ndarray | None] = {}
        for name in self.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                out[name] = None
            elif name in PAYLOADS and tensor.is_cpu():
                # A view of the backend's shared memory (as_numpy would copy it), so
                # that drop_pages can free those pages once the request is parsed.
                out[name] = np.from_dlpack(tensor)
            else:
                out[name] = tensor.as_numpy()
        return out

    def prepare(self, req: ServingRequest, cancelled: CancelCheck) -> Prepared:
        """Host work on a worker thread: decode and preprocess the video under the
        repository's limits (time budget, frame size), or check the sent frames."""
        common = {"query": req.query, "question": req.question, "gen": req.gen}
        if req.video is not None:
            return self.pipe.prepare(
                req.video, req.task, limits=self.limits, cancelled=cancelled, **common
            )
        return self.pipe.prepare_frames(
            req.frames, req.timestamps, req.task, duration=req.duration, **common
        )

    def finalize(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.engine.close()
        self.pipe = None
