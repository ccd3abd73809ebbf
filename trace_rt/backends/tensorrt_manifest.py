"""The ``tensorrt`` section of ``manifest.json``: what was built, for which GPU, and checks.

Torch-free and TensorRT-free on purpose: ``python -m export trt`` writes this section,
the TensorRT backend reads it, and both the round trip and the compatibility rules are
unit-tested on machines without a GPU.

Layout (one build per artifact directory; rebuilding replaces it)::

    "tensorrt": {
      "format": 1, "version": "10.x", "gpu": {"name": ..., "compute_capability": "9.0"},
      "precision": "fp16", "limits": {"max_frames": 128, "max_seq": 4096, "max_batch": 8},
      "timing_cache": "tensorrt/timing-....cache", "built_at": ..., "build_s": ...,
      "engines": {"decoder": {"file": "tensorrt/decoder.fp16.engine", "sha256": ...,
                  "bytes": ..., "onnx": "decoder.onnx", "strongly_typed": true,
                  "flags": [], "variant": null, "build_s": ...,
                  "profiles": [{"name": "prefill", "shapes": {input: {"min","opt","max"}}},
                               {"name": "decode", ...},
                               {"name": "decode_batch", ...}]}, ...}}

``limits.max_batch`` (absent in builds before batching: 1) bounds the backend's
``max_sequences``; ``decode_batch`` exists only when it is above 1.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

from trace_rt.errors import CheckpointError
from trace_rt.graphs import GRAPH_NAMES, MANIFEST_FILE, sha256_file

SECTION = "tensorrt"
# The oldest TensorRT the backend runs on: JetPack 6.1/6.2's (L4T r36.4). The backend relies
# on 10.x APIs (execute_async_v3, user-managed device memory, IStreamReader) and any
# importable release from here on is accepted: the system python3-libnvinfer on a Jetson,
# the tensorrt-cu12 wheels elsewhere.
MIN_TENSORRT = (10, 3)
FORMAT = 1
ENGINE_DIR = "tensorrt"
# The fixed-shape decode step (export/trt_step.py): the decoder's I/O, past fixed to
# max_seq - 1 slots, past length as data; absent in builds without `export step`.
STEP = "decoder_step"


def write_section(out: str | Path, section: dict[str, Any]) -> dict[str, Any]:
    """Put *section* under ``manifest["tensorrt"]`` of *out*'s manifest; returns the manifest.

    Engines are deliberately not added to ``manifest["files"]``: that list is what every
    backend hashes at load, and the onnxruntime backend must not read GBs of engines.
    """
    path = Path(out) / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest[SECTION] = section
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)  # atomic: a crash mid-write leaves the old manifest
    return manifest


def read_section(manifest: dict[str, Any], root: str | Path) -> dict[str, Any]:
    """The ``tensorrt`` section, checked for shape; clear error when there is none."""
    section = manifest.get(SECTION)
    if not section:
        raise CheckpointError(
            f"{root}: {MANIFEST_FILE} lists no TensorRT engines; build them on this GPU with "
            f"`python -m export trt {root}`"
        )
    if section.get("format") != FORMAT:
        raise CheckpointError(
            f"{root}: TensorRT section format {section.get('format')!r}, this runtime reads "
            f"{FORMAT}; rebuild the engines with `python -m export trt {root}`"
        )
    missing = [g for g in GRAPH_NAMES if g not in section.get("engines", {})]
    if missing:
        raise CheckpointError(f"{root}: {MANIFEST_FILE} has no TensorRT engine for {missing}")
    return section


def built_max_batch(root: str | Path) -> int:
    """The most sequences *root*'s engines decode at once (``limits.max_batch``; 1 when
    the manifest has no TensorRT section or predates batching: the backend's error then
    names what is missing)."""
    try:
        manifest = json.loads((Path(root) / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return 1
    return int(((manifest.get(SECTION) or {}).get("limits") or {}).get("max_batch", 1))


def version_tuple(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a TensorRT version string such as ``10.3.0.30``."""
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def check_tensorrt_version(version: str) -> None:
    """The installed TensorRT is one the backend supports (>= :data:`MIN_TENSORRT`)."""
    if version_tuple(version)[:2] < MIN_TENSORRT:
        want = ".".join(map(str, MIN_TENSORRT))
        raise CheckpointError(
            f"TensorRT {version} is too old: the tensorrt backend needs TensorRT >= {want} "
            "(JetPack 6.1+ ships 10.3; elsewhere pip install 'trace-rt[tensorrt]')"
        )


def check_compatible(section: dict[str, Any], trt_version: str, gpu: dict[str, Any]) -> None:
    """Engines run only on the TensorRT version and GPU architecture that built them.

    A different TensorRT version or compute capability is an error (deserialisation would
    fail or, worse, crash); the same architecture under another product name (H100 PCIe vs
    SXM) runs correctly but was tuned for the other card, so it only warns.
    """
    built = section["version"]
    if built != trt_version:
        raise CheckpointError(
            f"the engines were built with TensorRT {built}, this is TensorRT {trt_version}; "
            "engines are tied to the exact version: rebuild with `python -m export trt`"
        )
    want, have = section["gpu"], gpu
    if want["compute_capability"] != have["compute_capability"]:
        raise CheckpointError(
            f"the engines were built for {want['name']} (compute capability "
            f"{want['compute_capability']}), this GPU is {have['name']} (compute capability "
            f"{have['compute_capability']}): rebuild with `python -m export trt` on this GPU"
        )
    if want["name"] != have["name"]:
        warnings.warn(
            f"TensorRT engines were tuned on {want['name']}, running on {have['name']} "
            "(same architecture, may be slower); rebuild on this GPU for best speed",
            stacklevel=2,
        )


def verify_engines(section: dict[str, Any], root: str | Path, verify: str = "sha256") -> None:
    """Every engine file exists with its recorded size (and sha256 unless verify='size')."""
    root = Path(root)
    for graph, rec in section["engines"].items():
        f = root / rec["file"]
        if not f.is_file():
            raise CheckpointError(
                f"{root}: TensorRT engine {rec['file']} ({graph}) is missing; rebuild with "
                f"`python -m export trt {root}`"
            )
        if f.stat().st_size != rec["bytes"]:
            raise CheckpointError(
                f"{root}: {rec['file']} has {f.stat().st_size} bytes, {MANIFEST_FILE} says "
                f"{rec['bytes']}; rebuild with `python -m export trt {root}`"
            )
        if verify == "sha256" and sha256_file(f) != rec["sha256"]:
            raise CheckpointError(f"{root}: {rec['file']} does not match its sha256")


def profile_index(engine_rec: dict[str, Any], name: str) -> int:
    """Index of the optimisation profile called *name* (as built, in build order)."""
    names = [p["name"] for p in engine_rec["profiles"]]
    if name not in names:
        raise CheckpointError(f"engine {engine_rec['file']} has no profile {name!r} ({names})")
    return names.index(name)


def profile_max(engine_rec: dict[str, Any], profile: int, tensor: str) -> list[int]:
    """The largest shape *profile* admits for input *tensor*."""
    return list(engine_rec["profiles"][profile]["shapes"][tensor]["max"])
