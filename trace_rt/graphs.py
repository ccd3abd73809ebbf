"""I/O specs of the exported graphs: one source of truth for export and every runtime.

Each :class:`GraphSpec` names a graph's file, its inputs and outputs (name, dtype, shape
with symbolic dimensions) and the fp32 tolerance its parity test holds it to. The ONNX
exporter (``export/``) takes input/output names and dynamic axes from here, writes the
specs into ``manifest.json``, and the onnxruntime backend reads them back from there; the
TensorRT profiles and Triton configs are meant to come from the same objects.

Torch-free on purpose: the serving image imports this module.

The three graphs (sizes for the 7B release in brackets):

- ``vision_encoder``: ``pixel_values`` f32 [frames, 3, H, W] -> ``features``
  [frames, P, D] (selected CLIP layer, CLS dropped) [frames, 576, 1024].
- ``projector``: ``features`` [frames, P, D] + ``time_ids`` i64 [frames, 6] ->
  ``video_embeds`` [frames * (S + 6), hidden] [frames * 14, 4096].
- ``decoder``: ``inputs_embeds`` [batch, T, hidden] + ``position_ids`` i64 [batch, T] +
  per layer ``past_key.{i}`` / ``past_value.{i}`` [past, batch, kv, hd] -> ``logits`` f32
  [batch, 32027] (each row's last position, every head side by side in the unified id
  order) + per layer ``key.{i}`` / ``value.{i}`` [T, batch, kv, hd]: the T new positions'
  K (after RoPE) and V.

KV cache (``KV_CACHE`` in the manifest): a preallocated, position-major pool. The backend
owns, per layer, K and V buffers [capacity, slots, kv, hd], one slot (column) per sequence.
A batch step over every slot binds ``buf[:P]`` (contiguous in this layout) as ``past_*``,
where P is the longest sequence's length; a step of one sequence alone binds its filled
prefix (contiguous too when the pool has one slot, as a single ``trace-rt run`` has).
Sequences of different lengths share a step because the past length is data: row b attends
past slot j iff j < ``position_ids[b, 0]`` (slot j holds position j), so a shorter row
ignores the tail of the shared past, and an unused slot (position 0) attends only to its
own new key. The graph never concatenates K/V: it scores the queries against past and new
keys separately and joins only the score rows for the softmax, and returns only the new
positions' K/V, which the backend writes at each row's offset. Why position-major: besides
the contiguous batch past, onnxruntime folds the [P, B, kv, hd] -> [B, kv, hd, P] views of
the past into strided MatMuls (FusedMatMul ``transBatchB``), so the past is read in place
(tested for fp32 on the CPU EP; a batch-major [B, P, kv, hd] past is transposed and copied
every step; the CPU EP has no fp16 FusedMatMul, so fp16 graphs there still transpose-copy
the past each step). With one sequence the layout is byte for byte the single-sequence
[1, P, kv, hd] of earlier exports. Prefill is the same graph with P = 0: zero-size
``past_*``, which onnxruntime runs (tested); TensorRT documents empty-tensor support
(MatMul over an empty dimension gives zeros), not yet run here; static-shape targets such
as ATC, which reject empty tensors, use a prefill variant without past inputs
(export/atc_decoder.py). The new tokens sit at positions P..P+T-1; ``position_ids`` feeds
RoPE and the past mask.

Decode-step ids: the decoder takes embeddings, not ids. The runtime looks ids up in
``embeddings.npy``, the four embedding tables (text, text ``<sync>``, time, score) stacked
in the unified id order [32027, hidden], so row *i* is exactly what ``TraceModel.embed``
gives id *i*. Why not ids in the graph: prefill has to splice the video block between
text embeddings anyway, so one embeddings input serves prefill and decode with a single
graph; the host-side lookup of one row per step is 8 KiB (fp16, 7B); and the 262 MB
table is not stored twice (it would otherwise be a graph initializer next to the video
path's inputs).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trace_rt.config import TraceConfig
from trace_rt.errors import CheckpointError

Dim = int | str  # a fixed size or a symbolic (dynamic) dimension's name

VISION_ENCODER = "vision_encoder"
PROJECTOR = "projector"
DECODER = "decoder"
GRAPH_NAMES = (VISION_ENCODER, PROJECTOR, DECODER)
EMBEDDINGS_FILE = "embeddings.npy"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "trace-rt-artifact/1"
# Protobuf caps a message at 2 GiB: an exported graph larger than this keeps its weights
# in ``<file>.data`` (role ``external_data`` in the manifest). The one value every
# exporter (onnx, quantize, atc) uses.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# The decoder's KV-cache contract (manifest ``export.kv_cache``); see the module docstring.
KV_CACHE = "pooled-position-major"
# The decoder's batch dim: sequences decoded together (one per pool slot).
BATCH_DIM = "batch"

# Element type names (numpy's, and ml_dtypes'/torch's "bfloat16"); fp16 and bf16 exports
# keep f32 at the runtime's boundaries (pixels in, logits out).
FLOAT_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# bf16 artifacts are for TensorRT (and CUDA): numpy has no bfloat16, so their
# embeddings.npy holds the bf16 bit patterns as uint16 (manifest ``embeddings.storage``),
# and onnxruntime's CPU EP lacks bf16 kernels for most of the graphs' ops (MatMul, ...),
# so the onnxruntime backend refuses them.
BF16 = "bf16"


def dtype_itemsize(name: str) -> int:
    """Bytes per element of a spec dtype (numpy's names, and bfloat16 without ml_dtypes)."""
    import numpy as np

    return 2 if name == "bfloat16" else np.dtype(name).itemsize


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output."""

    name: str
    dtype: str  # numpy name (float32, float16, int64) or bfloat16
    shape: tuple[Dim, ...]

    @property
    def dynamic_axes(self) -> dict[int, str]:
        """Axis -> symbolic name, for ``torch.onnx.export(dynamic_axes=...)``."""
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph: file, ordered inputs and outputs, parity tolerance."""

    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    rtol_fp32: float = 1e-4  # max |onnx - torch| / max |torch| at fp32

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.dynamic_axes for t in (*self.inputs, *self.outputs) if t.dynamic_axes}

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["inputs"] = [t.to_dict() for t in self.inputs]
        d["outputs"] = [t.to_dict() for t in self.outputs]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GraphSpec:
        return cls(
            name=d["name"],
            file=d["file"],
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            rtol_fp32=d.get("rtol_fp32", 1e-4),
        )


def kv_names(layer: int) -> tuple[str, str, str, str]:
    """(past_key, past_value, key, value) names of decoder *layer*: inputs, then outputs."""
    return (f"past_key.{layer}", f"past_value.{layer}", f"key.{layer}", f"value.{layer}")


def vision_encoder_spec(cfg: TraceConfig, dtype: str = "fp32") -> GraphSpec:
    v = cfg.vision
    return GraphSpec(
        VISION_ENCODER,
        f"{VISION_ENCODER}.onnx",
        inputs=(
            # The runtime's preprocessing always yields f32; the graph casts.
            TensorSpec("pixel_values", "float32", ("frames", v.num_channels, *_hw(cfg))),
        ),
        outputs=(
            TensorSpec("features", FLOAT_DTYPES[dtype], ("frames", v.num_patches, v.hidden_size)),
        ),
    )


def projector_spec(cfg: TraceConfig, dtype: str = "fp32") -> GraphSpec:
    fd = FLOAT_DTYPES[dtype]
    return GraphSpec(
        PROJECTOR,
        f"{PROJECTOR}.onnx",
        inputs=(
            TensorSpec("features", fd, ("frames", cfg.vision.num_patches, cfg.mm_hidden_size)),
            TensorSpec("time_ids", "int64", ("frames", cfg.time_tokens_per_frame)),
        ),
        outputs=(TensorSpec("video_embeds", fd, ("video_len", cfg.hidden_size)),),
    )


def decoder_spec(cfg: TraceConfig, dtype: str = "fp32") -> GraphSpec:
    fd = FLOAT_DTYPES[dtype]
    kv, hd = cfg.num_key_value_heads, cfg.attn_head_dim
    inputs = [
        TensorSpec("inputs_embeds", fd, (BATCH_DIM, "seq", cfg.hidden_size)),
        TensorSpec("position_ids", "int64", (BATCH_DIM, "seq")),
    ]
    outputs = [TensorSpec("logits", "float32", (BATCH_DIM, cfg.ids.size))]
    for i in range(cfg.num_hidden_layers):
        pk, pv, nk, nv = kv_names(i)
        inputs += [TensorSpec(n, fd, ("past", BATCH_DIM, kv, hd)) for n in (pk, pv)]
        outputs += [TensorSpec(n, fd, ("seq", BATCH_DIM, kv, hd)) for n in (nk, nv)]
    return GraphSpec(DECODER, f"{DECODER}.onnx", tuple(inputs), tuple(outputs))


def graph_specs(cfg: TraceConfig, dtype: str = "fp32") -> dict[str, GraphSpec]:
    """All three graphs' specs for *cfg* at export dtype *dtype* (fp32, fp16 or bf16)."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"unsupported export dtype {dtype!r}; use one of {list(FLOAT_DTYPES)}")
    return {
        VISION_ENCODER: vision_encoder_spec(cfg, dtype),
        PROJECTOR: projector_spec(cfg, dtype),
        DECODER: decoder_spec(cfg, dtype),
    }


def _hw(cfg: TraceConfig) -> tuple[int, int]:
    # The CLIP position table is fixed-size, so H and W are static (the tower's input size).
    return cfg.vision.image_size, cfg.vision.image_size


# ---- artifact directory ---------------------------------------------------------------
def load_manifest(
    model_dir: str | Path, verify: str = "sha256", *, graphs: bool = True
) -> dict[str, Any]:
    """Read and check ``manifest.json`` of an artifact directory.

    Every file the manifest lists must exist with its recorded size and, with
    ``verify="sha256"`` (the default), its recorded sha256; ``verify="size"`` skips the
    hashing (seconds per GB) for trusted, read-only deployments. ``graphs=False`` leaves
    out the ONNX graphs and their external data: TensorRT engines replace them, and a
    deployment may drop them.

    Raises:
        CheckpointError: naming the missing, mis-sized or mismatched file.
    """
    if verify not in ("sha256", "size"):
        raise ValueError(f"verify must be 'sha256' or 'size', got {verify!r}")
    root = Path(model_dir)
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{root}: no {MANIFEST_FILE}; is this an artifact directory written by "
            "`python -m export onnx`?"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(
            f"{path}: format {manifest.get('format')!r}, this runtime reads {MANIFEST_FORMAT!r}"
        )
    graph_files = {g["file"] for g in manifest.get("graphs", {}).values()}
    for rel, rec in manifest["files"].items():
        if not graphs and (
            rel in graph_files or rel.endswith((".onnx", ".onnx.data", ".onnx_data"))
        ):
            continue
        f = root / rel
        if not f.is_file():
            raise CheckpointError(f"{root}: {rel} is missing (listed in {MANIFEST_FILE})")
        if f.stat().st_size != rec["bytes"]:
            raise CheckpointError(
                f"{root}: {rel} has {f.stat().st_size} bytes, {MANIFEST_FILE} says "
                f"{rec['bytes']}; the artifact directory is inconsistent (re-export it)"
            )
        if verify == "sha256" and sha256_file(f) != rec["sha256"]:
            raise CheckpointError(
                f"{root}: {rel} does not match its sha256 in {MANIFEST_FILE}; the artifact "
                "directory is inconsistent (re-export it)"
            )
    return manifest


def manifest_specs(manifest: dict[str, Any]) -> dict[str, GraphSpec]:
    return {name: GraphSpec.from_dict(d) for name, d in manifest["graphs"].items()}


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_embeddings(model_dir: str | Path, cfg: TraceConfig) -> np.ndarray:
    """The artifact's unified embedding table ``[ids, H]``, memory-mapped (only the rows
    used are read), its shape checked against the config."""
    table = np.load(Path(model_dir) / EMBEDDINGS_FILE, mmap_mode="r")
    want = (cfg.ids.size, cfg.hidden_size)
    if table.shape != want:
        raise CheckpointError(
            f"{model_dir}: {EMBEDDINGS_FILE} has shape {table.shape}, expected {want}"
        )
    return table


def embed_ids(table: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """Rows of *table* for unified *ids*, as a contiguous ``[n, H]`` array."""
    idx = np.asarray(ids, dtype=np.int64)
    size = table.shape[0]
    if idx.size and (idx.min() < 0 or idx.max() >= size):
        raise ValueError(f"token ids {ids} fall outside the id space 0..{size - 1}")
    return np.ascontiguousarray(table[idx])  # [n, H]
