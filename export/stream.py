"""Layer-streamed ONNX export: a checkpoint too large for memory in fp32 -> the usual artifact.

``python -m export onnx CKPT OUT --stream`` (chosen automatically when the whole model in
fp32 would not fit in the memory available) never holds the model's decoder in fp32:

1. The *shell* (everything but the decoder layers: vision tower, projector, towers, text
   embeddings, final norm, heads) is loaded from the safetensors shards in fp32 and
   exported exactly as by :func:`export.onnx_export.export_onnx` (vision encoder,
   projector, ``embeddings.npy``).
2. The decoder graph is traced in pieces from our model code (``trace_rt.model.decode``):
   a *prologue* (RoPE tables, masks; :func:`decode_setup`), one graph per layer
   (:func:`layer_step`, that layer's tensors alone loaded from the shards) and the *head*
   (final norm, every head's logits; :func:`decode_logits`).
3. Each piece is written at once into every decoder asked for -- fp32 ``decoder.onnx``
   and/or weight-only ``decoder.int4.onnx`` / ``decoder.int8.onnx`` (MatMulNBits, the
   quantiser of ``export/quantize.py``, same scheme and records) -- its weights appended
   to the graph's external-data file, so only the graph structure stays in memory.
   Stitching renames each piece's internal tensors (``layers.{i}/...``) and connects the
   pieces through ``hidden.{i}``; inputs and outputs are the decoder spec's
   (``trace_rt/graphs.py``), so every backend reads the result as a whole-model export.

With only quantised decoders asked for, the artifact has no ``decoder.onnx`` (a 7B's is
30 GB in fp32): the manifest lists the decoder's spec with no files, its default
onnxruntime decoder is the first quantised variant, and a backend asked for the fp32
decoder says so (``trace_rt/backends/onnxruntime_backend.py``).
Peak RSS and time per step are measured (VmHWM reset per step) and recorded in
``manifest["export"]["stream"]``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch
from safetensors import safe_open
from torch import Tensor

from export import quantize
from export.stitch import ALIGN, GraphWriter, spec_value_infos
from export.stream_pieces import (
    LAYER_KV,
    SHARED,
    LayerTemplate,
    trace_head,
    trace_layer,
    trace_prologue,
)
from trace_rt.bench.machine import peak_rss_mb, reset_peak_rss
from trace_rt.config import TraceConfig, resolve_vision_tower_dir
from trace_rt.errors import CheckpointError, InputError
from trace_rt.graphs import DECODER, kv_names
from trace_rt.model.checkpoint import INDEX_FILE, VISION_PREFIX, WEIGHTS_FILE, weight_files
from trace_rt.model.mistral import DecoderLayer
from trace_rt.model.trace import TraceModel

FP32 = "fp32"
DECODER_KINDS = (FP32, "int4", "int8")
LAYER_PREFIX = "model.layers."
# A whole-model fp32 export holds the model, the traced graph and its serialised copy.
WHOLE_EXPORT_FACTOR = 3.0


# ---- when to stream ----------------------------------------------------------------------
def fp32_bytes(cfg: TraceConfig) -> int:
    """Bytes of the whole model in fp32."""
    from trace_rt.model.checkpoint import expected_shapes

    return 4 * sum(s.numel() for s in expected_shapes(cfg).values())


def available_memory() -> int:
    """MemAvailable of /proc/meminfo (bytes)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


def stream_reason(cfg: TraceConfig) -> str | None:
    """Why a whole-model export would not fit in memory here, or None when it would."""
    need = WHOLE_EXPORT_FACTOR * fp32_bytes(cfg)
    have = available_memory()
    if need <= have:
        return None
    return (
        f"the whole model in fp32 is {fp32_bytes(cfg) / 2**30:.1f} GiB; a whole-model export "
        f"needs ~{need / 2**30:.0f} GiB and {have / 2**30:.1f} GiB is available: exporting "
        "layer by layer"
    )


def artifact_bytes(cfg: TraceConfig, decoders: tuple[str, ...]) -> int:
    """Estimated bytes of the artifact: fp32 shell graphs and embeddings, plus each decoder
    (its linear weights at 4, 0.625 or 1.125 bytes each with fp32 block scales, as
    MatMulNBits stores them; heads fp32)."""
    from trace_rt.plan import linear_bytes_per_weight

    total = fp32_bytes(cfg)
    layers = fp32_bytes(cfg.replace(num_hidden_layers=1)) - fp32_bytes(
        cfg.replace(num_hidden_layers=0)
    )
    body = layers // 4 * cfg.num_hidden_layers  # decoder-layer parameters
    per = {d: linear_bytes_per_weight("fp32" if d == FP32 else d) for d in decoders}
    heads = 4 * cfg.ids.size * cfg.hidden_size  # fp32 in every decoder (counted once in total)
    pad = 8 * ALIGN * cfg.num_hidden_layers  # external-data alignment
    return int(total - 4 * body - heads + sum(body * per[d] + heads + pad for d in decoders))


def check_disk(cfg: TraceConfig, decoders: tuple[str, ...], out: Path) -> None:
    """Refuse before writing when *out*'s file system cannot hold the artifact."""
    import shutil

    need = artifact_bytes(cfg, decoders)
    free = shutil.disk_usage(out).free
    if need > free:
        raise InputError(
            f"{out}: the layer-streamed artifact ({', '.join(decoders)}) needs about "
            f"{need / 2**30:.1f} GiB and {free / 2**30:.1f} GiB is free; free space or "
            "leave out a decoder (--decoders)"
        )


# ---- reading the shards ----------------------------------------------------------------
class ShardReader:
    """Tensors of a checkpoint by name, read one at a time from its safetensors shards."""

    def __init__(self, path: Path, cfg: TraceConfig):
        index = path / INDEX_FILE
        if index.is_file():
            wm = json.loads(index.read_text())["weight_map"]
            self.where = {k: path / f for k, f in wm.items()}
        else:
            f = weight_files(path)[0]
            with safe_open(str(f), framework="pt") as sf:
                self.where = dict.fromkeys(sf.keys(), f)
        self.vision_file: Path | None = None
        if not any(k.startswith(VISION_PREFIX) for k in self.where):
            clip = resolve_vision_tower_dir(cfg.mm_vision_tower, path)
            if clip is None or not (clip / WEIGHTS_FILE).is_file():
                raise CheckpointError(f"{path}: no vision tower weights (see checkpoint.py)")
            with safe_open(str(clip / WEIGHTS_FILE), framework="pt") as sf:
                for k in sf.keys():  # noqa: SIM118
                    self.where[VISION_PREFIX + k] = clip / WEIGHTS_FILE
            self.vision_file = clip / WEIGHTS_FILE

    def read(self, names: list[str]) -> dict[str, Tensor]:
        """*names* in fp32 (each shard opened once; safetensors maps, reads these only)."""
        by_file: dict[Path, list[str]] = {}
        for n in names:
            if n not in self.where:
                raise CheckpointError(f"checkpoint has no weight {n}")
            by_file.setdefault(self.where[n], []).append(n)
        out: dict[str, Tensor] = {}
        for f, ns in by_file.items():
            strip = VISION_PREFIX if f == self.vision_file else ""
            with safe_open(str(f), framework="pt") as sf:
                for n in ns:
                    out[n] = sf.get_tensor(n[len(strip) :]).float()
        return out


def load_shell(reader: ShardReader, cfg: TraceConfig) -> TraceModel:
    """The model without its decoder layers, in fp32 (its ``config`` is the full one)."""
    with torch.device("meta"):
        shell = TraceModel(cfg.replace(num_hidden_layers=0))
    want = list(shell.state_dict())
    shell.load_state_dict(reader.read(want), strict=True, assign=True)
    shell.config = cfg  # graph specs and the manifest describe the real model
    return shell.eval()


def load_layer(reader: ShardReader, cfg: TraceConfig, i: int) -> DecoderLayer:
    with torch.device("meta"):
        layer = DecoderLayer(cfg)
    prefix = f"{LAYER_PREFIX}{i}."
    sd = reader.read([prefix + k for k in layer.state_dict()])
    layer.load_state_dict({k[len(prefix) :]: v for k, v in sd.items()}, assign=True)
    return layer.eval()


def quantized(piece: onnx.ModelProto, bits: int, opts: dict[str, Any], *, head: bool):
    """A copy of *piece* with its weighted MatMuls (a head graph's: per ``select_weights``)
    as MatMulNBits; returns (model, quantised node names, kept node names)."""
    m = onnx.ModelProto()
    m.CopyFrom(piece)
    lm_bits = quantize.head_bits(opts["lm_head"], bits)
    chosen, kept, lm = quantize.select_weights(m, lm_head=lm_bits is not None)
    if not head:  # a layer has no heads: every weighted MatMul is a decoder linear
        chosen, kept, lm = chosen + kept, [], None
    if chosen:
        level, block = opts["accuracy_level"], opts["block_size"]
        m, chosen = quantize.quantise_nodes(m, chosen, lm, "nbits", bits, lm_bits, block, level)
    return m, chosen, kept


def steps(cfg: TraceConfig) -> Iterator[str]:
    yield "prologue"
    yield from (f"layer {i}" for i in range(cfg.num_hidden_layers))
    yield "head"


class Meter:
    """Wall time and peak RSS (VmHWM, reset per step) of named steps."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self._name: str | None = None
        self._t0 = 0.0

    def start(self, name: str) -> None:
        self.stop()
        self._reset = reset_peak_rss()
        self._name, self._t0 = name, time.perf_counter()

    def stop(self) -> None:
        if self._name is not None:
            dt = round(time.perf_counter() - self._t0, 2)
            self.steps.append({"step": self._name, "seconds": dt, "peak_rss_mb": peak_rss_mb()})
        self._name = None

    def summary(self) -> dict[str, Any]:
        self.stop()
        method = "VmHWM reset per step" if self.steps and self._reset else "ru_maxrss"
        return {
            "peak_rss_mb": max((s["peak_rss_mb"] for s in self.steps), default=None),
            "seconds": round(sum(s["seconds"] for s in self.steps), 1),
            "rss_method": method,
            "steps": self.steps,
        }


def tool_versions() -> dict[str, str]:
    return {"onnxruntime": ort.__version__, "onnx": onnx.__version__}


# ---- the export ------------------------------------------------------------------------
def export_streamed(
    checkpoint: str | Path,
    out: str | Path,
    *,
    decoders: tuple[str, ...] = (FP32,),
    opset: int = 17,
    block_size: int = quantize.DEFAULT_BLOCK_SIZE,
    accuracy_level: int = quantize.DEFAULT_ACCURACY_LEVEL,
    lm_head: bool | int = False,
    progress: bool = True,
    reason: str | None = None,
) -> Path:
    """Export *checkpoint* to the artifact directory *out* layer by layer (module docstring).

    Args:
        decoders: which decoders to write: ``fp32`` (``decoder.onnx``), ``int4``, ``int8``
            (MatMulNBits variants, recorded as ``python -m export quantize`` records them).
        block_size, accuracy_level, lm_head: the quantiser's settings (export/quantize.py).
        reason: why streaming was chosen (recorded in the manifest).
    """
    import numpy as np

    from export.files import publish_tree, write_json
    from export.onnx_export import (
        _export_graph,
        _hash_tree,
        _manifest,
        _remove_derived,
        _remove_stale,
        _staging,
        _steps,
        _write_support_files,
        embeddings_array,
    )
    from trace_rt.graphs import EMBEDDINGS_FILE, EXTERNAL_DATA_THRESHOLD, MANIFEST_FILE, graph_specs

    if not decoders or set(decoders) - set(DECODER_KINDS):
        raise ValueError(f"decoders must be some of {DECODER_KINDS}, got {decoders}")
    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {checkpoint}")
    out.mkdir(parents=True, exist_ok=True)
    cfg = TraceConfig.from_dir(checkpoint)
    check_disk(cfg, decoders, out)
    specs = graph_specs(cfg, FP32)
    opts = {"block_size": block_size, "accuracy_level": accuracy_level, "lm_head": lm_head}
    meter = Meter()
    names = ["start hashing", "load shell", *(g for g in specs if g != DECODER)]
    names += ["embeddings", *steps(cfg), "manifest"]
    title = f"export onnx --stream {checkpoint.name} ({', '.join(decoders)})"
    with _steps(title, names, progress) as step, _staging(out) as stage:
        step()
        meter.start("start hashing")
        # sha256 of 15 GB of shards: in a thread (hashlib releases the GIL) alongside the rest
        hasher = ThreadPoolExecutor(1)
        hashed = hasher.submit(_timed, _hash_tree, checkpoint)
        step()
        meter.start("load shell")
        reader = ShardReader(checkpoint, cfg)
        shell = load_shell(reader, cfg)
        graphs: dict[str, dict[str, Any]] = {}
        for name, spec in specs.items():
            if name == DECODER:
                continue
            step()
            meter.start(name)
            files = _export_graph(shell, spec, stage, opset, EXTERNAL_DATA_THRESHOLD)
            graphs[name] = spec.to_dict() | {"files": files}
        step()
        meter.start("embeddings")
        np.save(stage / EMBEDDINGS_FILE, embeddings_array(shell), allow_pickle=False)
        emb = np.load(stage / EMBEDDINGS_FILE, mmap_mode="r")
        _write_support_files(shell, checkpoint, stage, FP32)
        files_of = {k: quantize.variant_file(int(k[3:]), "nbits") for k in decoders if k != FP32}
        files_of |= {FP32: specs[DECODER].file} if FP32 in decoders else {}
        writers = {k: GraphWriter(stage, files_of[k]) for k in decoders}
        done: dict[str, list[str]] = {k: [] for k in writers}
        kept: dict[str, list[str]] = {k: [] for k in writers}

        def add(piece: onnx.ModelProto, prefix: str, io: dict[str, str], head: bool) -> None:
            for k, w in writers.items():  # quantised copies first, fp32 (renamed in place) last
                if k == FP32:
                    continue
                m, q, kp = quantized(piece, int(k[3:]), opts, head=head)
                done[k] += [prefix + n for n in q]
                kept[k] += [prefix + n for n in kp]
                w.add(m, prefix, io)
            if FP32 in writers:
                writers[FP32].add(piece, prefix, io)

        n = cfg.num_hidden_layers
        step()
        meter.start("prologue, layer template")
        template, why = LayerTemplate.try_make(cfg, opset)
        layer_graphs = "one traced template, each layer's weights substituted"
        if template is None:
            layer_graphs = f"each layer traced ({why})"
        io = dict.fromkeys(["inputs_embeds", "position_ids", "past_key.0", "hidden.0", *SHARED])
        add(trace_prologue(cfg, opset), "prologue/", {k: k for k in io}, False)
        for i in range(n):
            step()
            meter.start(f"layer {i}")
            layer = load_layer(reader, cfg, i)
            piece = template.build(layer) if template else trace_layer(layer, cfg, opset)
            del layer
            io = {k: k for k in SHARED} | dict(zip(LAYER_KV, kv_names(i), strict=True))
            add(piece, f"layers.{i}/", io | {"x": f"hidden.{i}", "x_out": f"hidden.{i + 1}"}, False)
            del piece
        step()
        meter.start("head")
        add(trace_head(shell, opset), "head/", {"x": f"hidden.{n}", "logits": "logits"}, True)
        meter.start("write graphs")
        ins, outs = spec_value_infos(cfg)
        recs = {
            k: w.finish(ins, outs, f"trace-rt {DECODER} ({k}, layer-streamed)")
            for k, w in writers.items()
        }
        step()
        meter.start("publish")
        source, hash_s = hashed.result()
        hasher.shutdown()
        _remove_derived(out)
        _remove_stale(out, stage)
        publish_tree(stage, out)
        variant_files = {f for k, r in recs.items() if k != FP32 for f in r}
        manifest = _manifest(
            shell, checkpoint.name, source, graphs, emb, FP32, opset, out, variant_files
        )
        fp32_files = recs.get(FP32, {})
        manifest["graphs"][DECODER] = specs[DECODER].to_dict() | {
            "files": {f: r["role"] for f, r in fp32_files.items()}
        }
        src = {
            "file": specs[DECODER].file,
            "sha256": fp32_files.get(specs[DECODER].file, {}).get("sha256"),
            "checkpoint": checkpoint.name,
        }
        variants = manifest.setdefault("variants", {}).setdefault(DECODER, {})
        for k, files in recs.items():
            if k != FP32:
                variants[k] = _variant_record(
                    k, files, src, opts | {"opset": opset}, done[k], kept[k]
                )
        if FP32 not in writers:
            first = next(k for k in DECODER_KINDS if k in writers)
            manifest.setdefault("defaults", {}).setdefault("onnxruntime", {})[DECODER] = first
        manifest["export"]["stream"] = {
            "reason": reason,
            "decoders": list(decoders),
            "layer_graphs": layer_graphs,
            "hash_checkpoint_s": hash_s,
        }
        manifest["export"]["stream"] |= meter.summary()
        write_json(out / MANIFEST_FILE, manifest)
        step()
    return out


def _timed(fn, *args):
    t = time.perf_counter()
    return fn(*args), round(time.perf_counter() - t, 1)


def _variant_record(
    kind: str,
    files: dict[str, dict[str, Any]],
    source: dict[str, Any],
    opts: dict[str, Any],
    done: list[str],
    kept: list[str],
) -> dict[str, Any]:
    """A variant's manifest record, as ``export/quantize.py`` writes it."""
    bits = int(kind[3:])
    level = opts["accuracy_level"]
    return {
        "file": next(f for f, r in files.items() if r["role"] == "graph"),
        "files": files,
        "source": source,
        "form": "nbits",
        **quantize._describe("nbits", bits, opts["block_size"]),
        "bits": bits,
        "weight_type": f"int{bits}",
        "accuracy_level": level or None,
        "opset": opts["opset"],
        "weights": quantize.weights_record(done, kept, quantize.head_bits(opts["lm_head"], bits)),
        "tools": tool_versions(),
        "layer_streamed": True,
    }
