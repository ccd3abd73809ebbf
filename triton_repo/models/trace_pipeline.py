"""Triton Python model ``trace_pipeline``: one TRACE request in, events streamed out.

Copied by ``python -m triton_repo build`` to ``<repo>/trace_pipeline/1/model.py``, next to
``serving.json`` (the repository's settings) and ``artifacts/`` (the export). Decoupled:
each request gets one response per event, sent as soon as the decoding loop completes it,
then a final response with the ``trace-rt run`` JSON (events, ids, timings).

The decoding loop is :func:`trace_rt.generate.generate`, the same as ``trace-rt run``; the
decoder runs in this process with its KV cache on the backend's device, so a token costs
no round trip through Triton. The vision encoder and projector run in-process too, or as
the repository's ``vision_encoder``/``projector`` models through BLS (``serving.json``
``encoders``), where Triton's dynamic batching lets concurrent requests share a batch.
Every error a client can cause answers that request with a message naming the problem;
the model keeps serving.
"""

from __future__ import annotations

import json
import os
import site
import sys
import time
import traceback
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

from trace_rt.errors import TraceError  # noqa: E402
from trace_rt.events import Event  # noqa: E402
from trace_rt.graphs import PROJECTOR, VISION_ENCODER, manifest_specs  # noqa: E402
from trace_rt.pipeline import Pipeline  # noqa: E402
from trace_rt.prompts import TASKS  # noqa: E402
from trace_rt.serving.protocol import (  # noqa: E402
    ServingRequest,
    ServingSettings,
    as_bytes_tensor,
    event_json,
    parse_request,
    pipeline_inputs,
    threads_per_instance,
)
from trace_rt.tokens import Head  # noqa: E402

ARTIFACTS = "artifacts"
CANCEL_CHECK_S = 0.05  # how often decoding asks whether the client has gone
# Time-to-first-event buckets (s) and decode-speed buckets (tokens/s).
TTFE_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
TPS_BUCKETS = [1, 5, 10, 25, 50, 100, 200, 400, 800]


class Cancelled(Exception):
    """The client went away; stop decoding for it."""


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
    )
    response = request.exec()
    if response.has_error():
        raise RuntimeError(f"{model}: {response.error().message()}")
    return {t.name(): t.as_numpy() for t in response.output_tensors()}


class SplitBackend:
    """A backend whose ``encode_video`` is done elsewhere (BLS) and the rest in-process."""

    def __init__(self, decoder: Any, encoders: BlsEncoders):
        self.decoder, self.encoders = decoder, encoders
        self.name, self.config = decoder.name, decoder.config

    def encode_video(self, pixel_values: np.ndarray, time_ids: np.ndarray) -> np.ndarray:
        return self.encoders.encode_video(pixel_values, time_ids)

    def prefill(self, prompt_ids: list[int], video: np.ndarray, head: Head) -> np.ndarray:
        return self.decoder.prefill(prompt_ids, video, head)

    def decode_step(self, token_id: int, head: Head) -> np.ndarray:
        return self.decoder.decode_step(token_id, head)

    def synchronize(self) -> None:
        self.decoder.synchronize()


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
        artifacts = version_dir / ARTIFACTS
        bls = s.encoders == "bls"
        config = json.loads(args["model_config"])
        if s.backend == "onnxruntime":
            cpu = args.get("model_instance_kind") == "CPU"
            options: dict[str, Any] = {
                "device": "cpu" if cpu else "auto",
                "threads": s.threads or (threads_per_instance(config) if cpu else None),
                "video_graphs": not bls,
            }
        else:
            options = {"device": f"cuda:{args.get('model_instance_device_id', '0')}"}
        self.pipe = Pipeline.from_dir(artifacts, s.backend, **options)
        if bls:
            specs = manifest_specs(json.loads((artifacts / "manifest.json").read_text()))
            max_batch = int(config["parameters"]["max_batch_frames"]["string_value"])
            self.pipe.backend = SplitBackend(self.pipe.backend, BlsEncoders(specs, max_batch))
        self.input_names = [t.name for t in pipeline_inputs(self.pipe.config)]
        self._metrics(args["model_name"])

    def _metrics(self, model: str) -> None:
        labels = {"model": model}
        fam = pb_utils.MetricFamily
        # Families must outlive their metrics: keep every object on the model.
        self.families = {
            "requests": fam(
                name="trace_requests_total",
                description="TRACE requests answered, by task and outcome",
                kind=fam.COUNTER,
            ),
            "tokens": fam(
                name="trace_generated_tokens_total",
                description="tokens generated by the decoding loop",
                kind=fam.COUNTER,
            ),
            "ttfe": fam(
                name="trace_time_to_first_event_seconds",
                description="from request arrival to the first streamed event",
                kind=fam.HISTOGRAM,
            ),
            "tps": fam(
                name="trace_decode_tokens_per_second",
                description="decode speed of each request (tokens after the first / decode time)",
                kind=fam.HISTOGRAM,
            ),
        }
        self.tokens = self.families["tokens"].Metric(labels=labels)
        self.ttfe = self.families["ttfe"].Metric(labels=labels, buckets=TTFE_BUCKETS)
        self.tps = self.families["tps"].Metric(labels=labels, buckets=TPS_BUCKETS)
        self._labels = labels
        self._request_metrics: dict[tuple[str, str], Any] = {}

    def _count_request(self, task: str | None, outcome: str) -> None:
        # Only known names become labels: a client must not grow the metric set.
        key = (task if task in TASKS else "question" if task is None else "other", outcome)
        if key not in self._request_metrics:
            labels = {**self._labels, "task": key[0], "outcome": outcome}
            self._request_metrics[key] = self.families["requests"].Metric(labels=labels)
        self._request_metrics[key].increment(1)

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            self._answer(request)
        return None

    def _answer(self, request: Any) -> None:
        t0 = time.perf_counter()
        sender = request.get_response_sender()
        task: str | None = None
        try:
            inputs = self._inputs(request)
            task = _task_of(inputs.get("task"))
            req = parse_request(inputs, self.settings)
            result = self._run(req, request, sender, t0)
            final = pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("result", as_bytes_tensor(json.dumps(result)))]
            )
            self._count_request(task, "ok")  # before the reply: clients may read metrics next
            sender.send(final, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Cancelled:
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            self._count_request(task, "cancelled")
        except TraceError as e:  # the client's mistake: say which
            self._count_request(task, "invalid")
            self._fail(sender, f"{type(e).__name__}: {e}")
        except Exception as e:  # our bug: answer this request and keep serving the rest
            pb_utils.Logger.log_error(f"trace_pipeline: {traceback.format_exc()}")
            self._count_request(task, "error")
            self._fail(sender, f"internal error: {type(e).__name__}: {e}")

    @staticmethod
    def _fail(sender: Any, message: str) -> None:
        response = pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _inputs(self, request: Any) -> dict[str, np.ndarray | None]:
        out: dict[str, np.ndarray | None] = {}
        for name in self.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            out[name] = None if tensor is None else tensor.as_numpy()
        return out

    def _run(self, req: ServingRequest, request: Any, sender: Any, t0: float) -> dict[str, Any]:
        pipe = self.pipe
        common = {"query": req.query, "question": req.question, "gen": req.gen}
        if req.video is not None:
            prepared = pipe.prepare(req.video, req.task, **common)
        else:
            prepared = pipe.prepare_frames(
                req.frames, req.timestamps, req.task, duration=req.duration, **common
            )
        t_video = time.perf_counter()
        sent = 0

        last_check = t0

        def on_token(_token: int) -> None:
            # is_cancelled() asks the server (a round trip, ~0.2 ms): every 50 ms is enough.
            nonlocal last_check
            now = time.perf_counter()
            if now - last_check > CANCEL_CHECK_S:
                last_check = now
                if request.is_cancelled():
                    raise Cancelled

        def on_event(event: Event) -> None:
            nonlocal sent
            if sent == 0:
                self.ttfe.observe(time.perf_counter() - t0)
            tensor = pb_utils.Tensor("event", as_bytes_tensor(event_json(event.to_dict(), sent)))
            sender.send(pb_utils.InferenceResponse(output_tensors=[tensor]))
            sent += 1

        out = pipe.run_prepared(prepared, req.gen, on_token=on_token, on_event=on_event)
        n = len(out["token_ids"])
        self.tokens.increment(n)
        decode_s = out["timing_ms"]["decode"] / 1e3
        if n > 1 and decode_s > 0:
            self.tps.observe((n - 1) / decode_s)
        out["timing_ms"]["video"] = (t_video - t0) * 1e3
        out["timing_ms"]["total"] = (time.perf_counter() - t0) * 1e3
        source = f"<{len(req.video)} bytes>" if req.video is not None else "<frames>"
        return {"video": source, "task": req.task, **out}

    def finalize(self) -> None:
        self.pipe = None
