"""The ``trace_pipeline`` model's contract: tensor names, limits, request validation.

One definition serves the Triton repository generator (``python -m triton_repo build``
writes ``config.pbtxt`` from :func:`pipeline_inputs`), the Python model that answers
requests (:func:`parse_request`) and the gRPC client (:mod:`trace_rt.serving.client`).
No Triton import here, so all of it is tested without a server.

A request carries either the encoded video (``video``, the file's bytes: the server never
opens paths or URLs), frames the client already decoded and preprocessed (``frames`` +
``timestamps``) or the ``video_id`` an earlier response returned (the server's video cache
then supplies the encoded video and its prompt-prefix K/V), the task (or a free
``question``), the query for ``mr``/``vhd`` and optional generation parameters. The model
is decoupled: it answers with one response per completed event (``event``: that event as
JSON) and then a final response (``result``: the ``trace-rt run`` JSON object with timings,
and the ``video_id`` that names the video for later requests).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from trace_rt.config import TraceConfig
from trace_rt.errors import CheckpointError, InputError
from trace_rt.generate import GenerationConfig
from trace_rt.video import DEFAULT_LIMITS, DecodeLimits

TRACE_PIPELINE = "trace_pipeline"
SETTINGS_FILE = "serving.json"
# trace_pipeline's version directory holds the export here, next to SETTINGS_FILE.
ARTIFACTS_DIR = "artifacts"
# Triton's name for the bytes type; numpy arrays of it are dtype object.
BYTES = "BYTES"
# A video_id: the video cache's key (trace_rt.engine.cache.video_key).
VIDEO_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class ServingTensor:
    """One input or output of the ``trace_pipeline`` model (no batch dimension)."""

    name: str
    dtype: str  # numpy dtype name, or BYTES
    shape: tuple[int, ...]  # -1: any size
    optional: bool
    doc: str

    @property
    def triton_type(self) -> str:
        return TRITON_TYPES[self.dtype]


# numpy name -> Triton data type (config.pbtxt) and back, for the types used here.
TRITON_TYPES = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",  # bf16 artifacts' graph specs (export onnx --dtype bf16)
    "float32": "TYPE_FP32",
    BYTES: "TYPE_STRING",
}


def pipeline_inputs(cfg: TraceConfig) -> tuple[ServingTensor, ...]:
    """``trace_pipeline``'s inputs; *cfg* fixes the preprocessed frame size."""
    h, w = cfg.preprocess.crop_height, cfg.preprocess.crop_width
    return (
        ServingTensor("video", "uint8", (-1,), True, "the video file's bytes (mp4, mkv, webm...)"),
        ServingTensor(
            "video_id", BYTES, (1,), True, "instead of video: the video_id of an earlier response"
        ),
        ServingTensor(
            "frames", "float32", (-1, 3, h, w), True, "instead of video: preprocessed frames"
        ),
        ServingTensor("timestamps", "float32", (-1,), True, "with frames: each frame's time (s)"),
        ServingTensor("duration", "float32", (1,), True, "with frames: video length (s)"),
        ServingTensor("task", BYTES, (1,), True, "dvc, mr or vhd"),
        ServingTensor("query", BYTES, (1,), True, "the sentence to localise (mr, vhd)"),
        ServingTensor("question", BYTES, (1,), True, "a free question instead of a task"),
        ServingTensor("max_new_tokens", "int32", (1,), True, "token budget"),
        ServingTensor("temperature", "float32", (1,), True, "0 = greedy"),
        ServingTensor("top_p", "float32", (1,), True, "nucleus sampling mass"),
        ServingTensor("seed", "int64", (1,), True, "sampling seed"),
        ServingTensor("constrained", "bool", (1,), True, "well-formed numbers only"),
        ServingTensor("ignore_eos", "bool", (1,), True, "benchmarks: decode the whole budget"),
        ServingTensor(
            "timestamp_mode", BYTES, (1,), True, "free, or frames: timestamps = frame times"
        ),
    )


PIPELINE_OUTPUTS = (
    ServingTensor("event", BYTES, (1,), False, "one completed event as JSON (streamed)"),
    ServingTensor("result", BYTES, (1,), False, "last response: the trace-rt run JSON"),
)


@dataclass(frozen=True)
class ServingSettings:
    """How a generated repository serves its artifacts; saved as ``serving.json``.

    Attributes:
        backend: the decoder's backend in ``trace_pipeline`` (``onnxruntime`` or
            ``tensorrt``).
        encoders: ``in-process`` (``trace_pipeline`` runs the vision encoder and
            projector itself) or ``bls`` (it calls the ``vision_encoder`` and
            ``projector`` models, whose dynamic batching shares batches between requests).
        max_video_bytes: the largest ``video`` payload accepted.
        max_new_tokens: the largest token budget a request may ask for.
        default_max_new_tokens: the budget of a request that names none.
        max_frames: the most preprocessed ``frames`` a request may send.
        threads: onnxruntime intra-op threads per session (0: onnxruntime's default).
        decode_workers: requests per model instance whose videos are decoded (and
            encoded) at once; decoding itself is shared by the instance's engine.
        max_sequences: KV slots per instance: requests whose decode steps run together
            (the rest wait for a slot). KV memory: bytes per position x positions x slots.
        video_cache_mb: the video cache per instance (encoded videos and their prompt
            prefix K/V, LRU; entries in use are never evicted); 0 keeps a video only while
            requests use it.
        video_time_budget_s: wall-clock seconds one request's video decode and
            preprocessing may take (``VideoTimeoutError`` beyond).
        max_frame_pixels: largest frame (width x height) decoded (``VideoTooLargeError``
            beyond: a decompression bomb).
    """

    backend: str = "onnxruntime"
    encoders: str = "in-process"
    max_video_bytes: int = 256 * 1024 * 1024
    max_new_tokens: int = 1024
    default_max_new_tokens: int = 512
    max_frames: int = 256
    threads: int = 0
    decode_workers: int = 2
    video_time_budget_s: float = float(DEFAULT_LIMITS.time_budget_s or 120.0)
    max_frame_pixels: int = DEFAULT_LIMITS.max_pixels
    max_sequences: int = 4
    video_cache_mb: int = 1024

    def __post_init__(self) -> None:
        if self.backend not in ("onnxruntime", "tensorrt"):
            raise InputError(f"backend must be onnxruntime or tensorrt, got {self.backend!r}")
        if self.encoders not in ("in-process", "bls"):
            raise InputError(f"encoders must be in-process or bls, got {self.encoders!r}")
        positive = (
            "max_video_bytes",
            "max_new_tokens",
            "default_max_new_tokens",
            "max_frames",
            "decode_workers",
            "max_frame_pixels",
            "max_sequences",
        )
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if int(self.video_cache_mb) < 0:
            raise InputError(f"video_cache_mb must be >= 0, got {self.video_cache_mb}")
        if not self.video_time_budget_s > 0:
            raise InputError(
                f"video_time_budget_s must be positive, got {self.video_time_budget_s}"
            )
        if self.default_max_new_tokens > self.max_new_tokens:
            raise InputError(
                f"default_max_new_tokens ({self.default_max_new_tokens}) exceeds "
                f"max_new_tokens ({self.max_new_tokens})"
            )

    def decode_limits(self) -> DecodeLimits:
        """What decoding one request's video may cost, for :func:`trace_rt.video.load_video`."""
        return DecodeLimits(
            max_pixels=self.max_frame_pixels,
            time_budget_s=self.video_time_budget_s,
            allow_formats=DEFAULT_LIMITS.allow_formats,
        )

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / SETTINGS_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def from_dir(cls, directory: str | Path) -> ServingSettings:
        path = Path(directory) / SETTINGS_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"{path}: unknown settings {unknown}")
        return cls(**data)


@dataclass(frozen=True)
class ServingRequest:
    """A validated request, ready for :class:`trace_rt.pipeline.Pipeline`."""

    task: str | None
    query: str | None
    question: str | None
    gen: GenerationConfig
    video: bytes | None = None
    video_id: str | None = None  # a cached video, by the id an earlier response returned
    frames: np.ndarray | None = None  # float32 [F, 3, H, W]
    timestamps: np.ndarray | None = None  # [F]
    duration: float | None = None


def parse_request(
    inputs: Mapping[str, np.ndarray | None], settings: ServingSettings
) -> ServingRequest:
    """Check a request's tensors; raises :class:`InputError` naming the problem.

    Args:
        inputs: tensor name -> array, ``None`` (or absent) for inputs not sent.
        settings: the repository's limits.
    """
    get = inputs.get
    task = _text(get("task"), "task")
    query = _text(get("query"), "query")
    question = _text(get("question"), "question")
    if task is None and question is None:
        raise InputError("missing 'task' (one of dvc, mr, vhd) or a free 'question'")
    max_new = _scalar(get("max_new_tokens"), "max_new_tokens", int)
    if max_new is None:
        max_new = settings.default_max_new_tokens
    if not 1 <= max_new <= settings.max_new_tokens:
        raise InputError(
            f"max_new_tokens must be in [1, {settings.max_new_tokens}] (this server's "
            f"limit), got {max_new}"
        )
    temperature = _scalar(get("temperature"), "temperature", float)
    top_p = _scalar(get("top_p"), "top_p", float)
    seed = _scalar(get("seed"), "seed", int)
    if seed is not None and not 0 <= seed < 2**63:
        raise InputError(f"seed must be in [0, 2^63), got {seed}")
    constrained = _scalar(get("constrained"), "constrained", bool)
    ignore_eos = _scalar(get("ignore_eos"), "ignore_eos", bool)
    timestamp_mode = _text(get("timestamp_mode"), "timestamp_mode")
    gen = GenerationConfig(
        max_new_tokens=max_new,
        temperature=0.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        seed=0 if seed is None else seed,
        constrained=bool(constrained),
        ignore_eos=bool(ignore_eos),
        timestamps=timestamp_mode or "free",
    )  # checks temperature, top_p and timestamp_mode
    video, frames = get("video"), get("frames")
    video_id = _text(get("video_id"), "video_id")
    given = (("video", video), ("frames", frames), ("video_id", video_id))
    sent = [repr(name) for name, value in given if value is not None]
    if len(sent) > 1:
        raise InputError(
            "send one of 'video' (the file's bytes), 'frames' or 'video_id', not "
            + ("both " if len(sent) == 2 else "all of ")
            + " and ".join(sent)
        )
    common = {"task": task, "query": query, "question": question, "gen": gen}
    if video_id is not None:
        if not VIDEO_ID.fullmatch(video_id):
            raise InputError(
                f"'video_id' must be the 32 hex digits an earlier response returned, got "
                f"{video_id[:40]!r}"
            )
        return ServingRequest(video_id=video_id, **common)
    if video is None and frames is None:
        raise InputError(
            "missing 'video': send the video file's bytes (or 'frames', or the 'video_id' "
            "of an earlier response)"
        )
    if video is not None:
        if video.dtype != np.uint8:
            raise InputError(f"'video' must be uint8 bytes, got {video.dtype}")
        n = int(video.size)
        if n == 0:
            raise InputError("'video' is empty (0 bytes)")
        if n > settings.max_video_bytes:
            raise InputError(
                f"'video' is {n} bytes, over this server's limit of "
                f"{settings.max_video_bytes} bytes (max_video_bytes)"
            )
        return ServingRequest(video=video.tobytes(), **common)
    timestamps = get("timestamps")
    if timestamps is None:
        raise InputError("'frames' needs 'timestamps' (each frame's time in seconds)")
    if frames.ndim != 4 or not 1 <= frames.shape[0] <= settings.max_frames:
        raise InputError(
            f"'frames' must hold 1 to {settings.max_frames} frames [F, 3, H, W], "
            f"got shape {list(frames.shape)}"
        )
    duration = _scalar(get("duration"), "duration", float)
    return ServingRequest(frames=frames, timestamps=timestamps, duration=duration, **common)


def _text(value: np.ndarray | None, name: str) -> str | None:
    if value is None:
        return None
    if value.size != 1:
        raise InputError(f"'{name}' must hold one string, got {value.size} elements")
    item = value.reshape(-1)[0]
    if isinstance(item, bytes):
        try:
            item = item.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"'{name}' is not valid UTF-8") from None
    if not isinstance(item, str):
        raise InputError(f"'{name}' must be a string, got {type(item).__name__}")
    return item


def _scalar(value: np.ndarray | None, name: str, kind: type) -> Any:
    if value is None:
        return None
    if value.size != 1:
        raise InputError(f"'{name}' must hold one value, got {value.size}")
    item = value.reshape(-1)[0].item()
    if kind is float:
        item = float(item)
        if not np.isfinite(item):
            raise InputError(f"'{name}' must be finite, got {item}")
    return kind(item)


def threads_per_instance(model_config: Mapping[str, Any]) -> int | None:
    """onnxruntime intra-op threads for one instance of a Triton CPU model: the cores split
    between the model's instances (None, onnxruntime's one-per-core default, for one)."""
    count = sum(int(g.get("count", 1)) for g in model_config.get("instance_group", []))
    return max(1, (os.cpu_count() or 1) // count) if count > 1 else None


def event_json(event: Mapping[str, Any], index: int) -> str:
    """The ``event`` output of one streamed response: the event and its position."""
    return json.dumps({"index": index, **event})


def as_bytes_tensor(text: str) -> np.ndarray:
    """One string as Triton's BYTES tensor of shape [1]."""
    return np.array([text.encode("utf-8")], dtype=np.object_)
