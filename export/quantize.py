"""``python -m export quantize``: weight-only int4/int8/fp8 variants of an artifact's decoder.

Each run reads ``decoder.onnx`` of an artifact directory (written by ``python -m export
onnx``) and writes two variants next to it (one for ``--fp8``), recorded under
``manifest["variants"]["decoder"][name]``:

=============  =========================  ===============================================
name           file                       form
=============  =========================  ===============================================
``int4``       ``decoder.int4.onnx``      ``com.microsoft::MatMulNBits`` (onnxruntime CPU
``int8``       ``decoder.int8.onnx``      and CUDA EPs), blocked along K
``int4-qdq``   ``decoder.int4.qdq.onnx``  int4/int8 weight initializers ->
``int8-qdq``   ``decoder.int8.qdq.onnx``  ``DequantizeLinear`` -> ``MatMul`` (TensorRT 10's
                                          weight-only pattern; onnxruntime runs it too)
``fp8-qdq``    ``decoder.fp8.qdq.onnx``   FLOAT8E4M3FN weight initializers, per output
                                          channel -> ``DequantizeLinear`` -> ``MatMul``
                                          (``export trt --fp8``; onnxruntime's CPU EP runs
                                          it too, dequantising to the graph's float type)
=============  =========================  ===============================================

Choices, and why:

- **Which weights.** Every MatMul whose B input is a constant 2-D float weight, found
  structurally rather than by name (the decoder's I/O and node names are not a stable
  interface): the *heads* are the weighted MatMuls reached walking back from the
  ``logits`` output; everything else weighted is a decoder linear layer (q, k, v, o,
  gate, up, down). Heads stay in full precision by default: the time/score/sync heads
  are tiny (13 rows) and pick the digits of every timestamp and score, so they are never
  quantised; ``lm_head`` (the text head, ~3% of the 7B's weights) is quantised only with
  ``lm_head=True``, because errors there land directly on the token choice with no later
  layer to absorb them.
- **Symmetric, round-to-nearest.** TensorRT's DequantizeLinear rejects non-zero zero
  points and non-positive scales, so the QDQ forms are symmetric with positive scales,
  searched per group (export/rtn.py); the MatMulNBits forms take onnxruntime's symmetric
  quantiser (a signed scale per block that puts the block's extreme at -8, llama.cpp's
  Q4_0 rule). Measured on one Gaussian layer at int4 blocks of 32, the two carry the same
  error within 1% (8.65% and 8.6% of the output; export/rtn.py), so both runtimes'
  variants compare like for like. LLM weight blocks are close to zero-mean, so an
  asymmetric zero point buys little. RTN needs no calibration data (none exists for
  random test weights).
- **Accuracy level 4** (MatMulNBits computes with int8 activations, quantised per block
  of K at run time; weights are what is stored quantised): on the 2-core AVX-512 CPU an
  int4 decode step of `small` took 15 ms at level 4 vs 32 ms at level 0 (fp32 compute),
  and int8 29 ms vs 376 ms (no fast fp32 kernel for 8 bits). ``--accuracy-level 0``
  trades that speed for float activations.
- **int8 for onnxruntime** is MatMulNBits with ``bits=8`` by default. Form ``dynamic``
  (opt-in here; ``python -m export optimize --int8-dynamic`` makes its fused forms and
  times them against MatMulNBits for the int8 default) is int8 weights per output channel
  x activations quantised per token at run time, through MatMulIntegerToFloat
  (export/w8a8.py).
  On the 2-core AVX-512 CPU its M > 1 kernel is much faster than MatMulNBits', so it
  prefills faster; it is a CPU-oriented path (MatMulNBits is the same op on the CPU and
  CUDA EPs). It replaced ``quantize_dynamic``'s per-tensor activation scale (one scale
  for the whole prompt, set by its largest activation; export/w8a8.py says why that
  matters for trained weights and what per-token costs). Numbers:
  benchmarks/results/int8-dynamic-small-cpu-2026-11-30.md.
- **QDQ granularity.** int4 is blocked along K (``axis=0, block_size``: ONNX opset 21,
  which is also where the INT4 tensor type appears, so that variant is converted to
  opset 21); int8 is per output channel (``axis=1``), the granularity TensorRT's int8
  weight-only path takes; an fp32 graph keeps its export opset for it (per-axis
  DequantizeLinear is opset 13), an fp16 one goes to 21 too (fp16 scales need 19).
- **fp8** (``--fp8``, QDQ form only): E4M3FN weights (max 448, 3 mantissa bits), one scale
  per output channel (``axis=1``, amax / 448, symmetric, round-to-nearest-even); float8
  DequantizeLinear needs opset 19, to which the variant is converted. Heads are kept as
  for int8. Only weights are fp8: activations stay in the graph's float type, so TensorRT
  (strongly typed) dequantises into fp32/fp16 MatMuls, i.e. this saves weight memory
  and bandwidth, not fp8 tensor-core math (that would need activation Q/DQ with
  calibrated scales). Not built with TensorRT here (no GPU).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper, version_converter

from export import rtn, w8a8
from export.files import save_onnx, write_json
from trace_rt.errors import InputError
from trace_rt.graphs import (
    DECODER,
    EXTERNAL_DATA_THRESHOLD,
    MANIFEST_FILE,
    load_manifest,
    sha256_file,
)
from trace_rt.variants import BLOCK_SIZES, DEFAULT_BLOCK_SIZE, has_portable_decoder

DEFAULT_ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations x int4/int8 weights (see above)
QDQ_INT4_OPSET = 21  # DequantizeLinear's block_size attribute and the INT4 type
FP8_OPSET = 19  # DequantizeLinear with float8 inputs
FP8 = "fp8"
FP8_MAX = 448.0  # largest finite E4M3FN value
FORMS = ("nbits", "qdq", "dynamic")
DEFAULT_FORMS = ("nbits", "qdq")
LOGITS = "logits"


Bits = int | str  # 4, 8 or "fp8"


def _tag(bits: Bits) -> str:
    return FP8 if bits == FP8 else f"int{bits}"


def variant_name(bits: Bits, form: str) -> str:
    return _tag(bits) if form == "nbits" else f"{_tag(bits)}-{form}"


def variant_file(bits: Bits, form: str) -> str:
    tag = _tag(bits)
    return f"{DECODER}.{tag}.onnx" if form == "nbits" else f"{DECODER}.{tag}.{form}.onnx"


def quantize_artifact(
    artifact: str | Path,
    bits: Bits,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
    lm_head: bool | int = False,
    forms: Iterable[str] | None = None,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> dict[str, dict[str, Any]]:
    """Write *artifact*'s weight-only *bits*-bit decoder variants; returns {name: record}.

    Args:
        artifact: artifact directory written by ``python -m export onnx``.
        bits: 4, 8 or ``"fp8"`` (QDQ form only: E4M3FN weights per output channel).
        block_size: weights per quantisation block along K (int4 and MatMulNBits int8).
        accuracy_level: MatMulNBits compute precision (0 = unset, 1 fp32, 2 fp16, 3 bf16,
            4 int8 activations).
        lm_head: quantise the text head too: ``True`` at *bits*, ``8``/``4`` as
            MatMulNBits at that width (default ``False``: every head in full precision).
        forms: ``nbits`` (MatMulNBits, onnxruntime), ``qdq`` (TensorRT) and, int8 only,
            ``dynamic`` (int8 x int8, activations quantised per token: export/w8a8.py);
            default ``nbits`` and ``qdq`` (``qdq`` for fp8).
    """
    if bits not in (4, 8, FP8):
        raise InputError(f"bits must be 4, 8 or {FP8!r}, got {bits!r}")
    if block_size not in BLOCK_SIZES:
        raise InputError(f"block size must be one of {BLOCK_SIZES}, got {block_size}")
    forms = tuple(forms) if forms is not None else (("qdq",) if bits == FP8 else DEFAULT_FORMS)
    if bits == FP8 and forms != ("qdq",):
        raise InputError(f"fp8 has the qdq form only (TensorRT), not {list(forms)}")
    if unknown := set(forms) - set(FORMS):
        raise InputError(f"unknown forms {sorted(unknown)}; use {FORMS}")
    if bits == 4 and "dynamic" in forms:
        raise InputError("the dynamic (per-token int8 activation) form is int8 only")
    root = Path(artifact)
    manifest = load_manifest(root)
    src_file = manifest["graphs"][DECODER]["file"]
    if not has_portable_decoder(manifest):
        raise InputError(
            f"{root}: no fp32 {src_file} to quantise (a layer-streamed export without it); "
            "streamed exports quantise as they go: `python -m export onnx CKPT OUT --stream "
            "--decoders int4,int8`"
        )
    source = {"file": src_file, "sha256": manifest["files"][src_file]["sha256"]}
    records: dict[str, dict[str, Any]] = {}
    lm_bits = {form: head_bits(lm_head, bits, form) for form in forms}
    for form in forms:
        model = onnx.load(str(root / src_file))  # each form rewrites its own copy in place
        chosen, kept, lm = select_weights(model, lm_head=lm_bits[form] is not None)
        model, done = quantise_nodes(
            model, chosen, lm, form, bits, lm_bits[form], block_size, accuracy_level
        )
        kept = sorted({*kept, *(set(chosen) - set(done))})
        level = (accuracy_level or None) if form == "nbits" else None
        name, file = variant_name(bits, form), variant_file(bits, form)
        files = _save(model, root, file, external_data_threshold)
        records[name] = {
            "file": file,
            "files": files,
            "source": source,
            "form": form,
            **_describe(form, bits, block_size),
            "bits": 8 if bits == FP8 else bits,
            "weight_type": "float8e4m3fn" if bits == FP8 else f"int{bits}",
            "accuracy_level": level,
            "opset": _opset(model),
            "weights": weights_record(done, kept, lm_bits[form] if lm else None),
            "tools": {"onnxruntime": ort.__version__, "onnx": onnx.__version__},
        }
    _update_manifest(root, records)
    if "qdq" in forms and "decode_step" in load_manifest(root, verify="size"):
        from export.trt_step import quantize_step  # the step TensorRT builds, quantised alike

        quantize_step(root, variant_name(bits, "qdq"))
    return records


def _describe(form: str, bits: Bits, block_size: int) -> dict[str, Any]:
    """The manifest's description of one form's scheme."""
    if form == "nbits":
        return {
            "scheme": "MatMulNBits",
            "op": "com.microsoft::MatMulNBits",
            "runtime": "onnxruntime",
            "also_runs_on": [],
            "granularity": "block",
            "block_size": block_size,
            "axis": "K",
            "symmetric": True,
            "algorithm": "rtn",
        }
    if form == "dynamic":
        return w8a8.describe()
    return {
        "scheme": "QDQ",
        "op": "DequantizeLinear+MatMul",
        "runtime": "tensorrt",
        "also_runs_on": ["onnxruntime"],
        "granularity": "block" if bits == 4 else "channel",  # int8, fp8: per channel
        "block_size": block_size if bits == 4 else None,
        "axis": "K" if bits == 4 else "N",
        "symmetric": True,
        "algorithm": "rtn-even (cast to float8e4m3fn)" if bits == FP8 else "rtn",
    }


# ---- which weights -------------------------------------------------------------------
def head_bits(lm_head: bool | int | None, bits: Bits, form: str = "nbits") -> Bits | None:
    """How a *bits* variant of *form* quantises ``lm_head``: None keeps it in float.

    ``lm_head``: False/None (keep), True (the variant's own width and form), 8 or 4
    (MatMulNBits at that width; QDQ for the TensorRT form, which has no MatMulNBits).
    """
    if lm_head is None or lm_head is False:
        return None
    if lm_head is True:
        if form == "dynamic":
            return 8  # one MatMulNBits node: the fused forms gate the head as one node
        return bits
    if lm_head not in (4, 8):
        raise InputError(f"lm_head: False (kept), True (quantised alike), 8 or 4; not {lm_head!r}")
    if bits == FP8:
        raise InputError("an fp8 variant quantises lm_head to fp8 or not at all (lm_head=True)")
    return lm_head


def quantise_nodes(
    model: onnx.ModelProto,
    chosen: list[str],
    lm: str | None,
    form: str,
    bits: Bits,
    lm_bits: Bits | None,
    block_size: int,
    level: int,
) -> tuple[onnx.ModelProto, list[str]]:
    """Quantise *chosen* in *form*, the text head *lm* (one of them, or None) at
    *lm_bits*; returns (model, the nodes quantised)."""
    body = [n for n in chosen if n != lm]
    if form == "nbits":
        model, done = _to_matmulnbits(model, body, bits, block_size, level), body
    elif form == "dynamic":
        model, done = w8a8.to_w8a8(model, body), body
    else:
        model, done = _to_qdq(model, body, bits, block_size)
    if lm is not None and lm_bits is not None:
        if form == "qdq":  # TensorRT has no MatMulNBits
            model, head = _to_qdq(model, [lm], lm_bits, block_size)
        else:  # the dynamic form's head too: one node, which the text-head gate can hold
            model, head = _to_matmulnbits(model, [lm], lm_bits, block_size, level or 4), [lm]
        done = [*done, *head]
    return model, done


def weights_record(done: list[str], kept: list[str], lm_bits: Bits | None) -> dict[str, Any]:
    """The manifest's ``weights`` entry of a quantised variant."""
    return {
        "rule": "MatMuls with a constant 2-D weight, except the heads feeding logits"
        + (" other than lm_head" if lm_bits is not None else ""),
        "lm_head": lm_bits is not None,
        "lm_head_bits": lm_bits,
        "quantized": sorted(done),
        "kept": sorted(kept),
    }


def select_weights(
    model: onnx.ModelProto, *, lm_head: bool
) -> tuple[list[str], list[str], str | None]:
    """(MatMul nodes to quantise, weighted MatMuls kept, lm_head's node if quantised).

    Unnamed MatMuls get a name (the quantiser addresses nodes by name).
    """
    g = model.graph
    weights = {t.name: t for t in g.initializer}
    weighted: dict[str, onnx.NodeProto] = {}
    for i, node in enumerate(g.node):
        if node.op_type != "MatMul":
            continue
        w = weights.get(node.input[1])
        if w is None or len(w.dims) != 2 or w.data_type not in _FLOATS:
            continue  # activations x activations (attention) or nothing to quantise
        if not node.name or node.name in weighted:
            node.name = f"{node.name or 'MatMul'}__{i}"
        weighted[node.name] = node
    heads = _heads(g, weighted)
    lm = None
    if heads:
        # The text head is the widest one (32001 outputs vs 13 for time/score).
        lm = max(heads, key=lambda n: weights[weighted[n].input[1]].dims[1])
    chosen = [n for n in weighted if n not in heads or (lm_head and n == lm)]
    kept = [n for n in weighted if n not in chosen]
    return chosen, kept, (lm if lm_head and lm else None)


def _heads(g: onnx.GraphProto, weighted: dict[str, onnx.NodeProto]) -> set[str]:
    """Weighted MatMuls on the path back from the logits output (stopping at each)."""
    outputs = [o.name for o in g.output]
    target = LOGITS if LOGITS in outputs else outputs[0]  # the spec puts logits first
    producer = {out: n for n in g.node for out in n.output}
    heads: set[str] = set()
    seen: set[str] = set()
    stack = [target]
    while stack:
        t = stack.pop()
        node = producer.get(t)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.name in weighted and weighted[node.name] is node:
            heads.add(node.name)
            continue  # what feeds a head is the decoder body, not another head
        stack.extend(node.input)
    return heads


_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)


# ---- onnxruntime MatMulNBits ---------------------------------------------------------
def _to_matmulnbits(
    model: onnx.ModelProto, chosen: list[str], bits: int, block_size: int, level: int
) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # Its per-node INFO lines would flood the console for a 7B graph.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    keep = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in chosen]
    q = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=block_size,
        is_symmetric=True,
        accuracy_level=level or None,
        nodes_to_exclude=keep,
        op_types_to_quantize=("MatMul",),
    )
    q.process()
    return q.model.model


# ---- QDQ (TensorRT) ------------------------------------------------------------------
def _to_qdq(
    model: onnx.ModelProto, chosen: list[str], bits: Bits, block_size: int
) -> tuple[onnx.ModelProto, list[str]]:
    """Replace each chosen MatMul's weight by int (or fp8) weights + DequantizeLinear.

    The opset is raised first (the converter would otherwise type the new nodes by the
    old opset's rules): to 21 for int4, and for fp16/bf16 weights, whose scales
    DequantizeLinear takes from opset 19 on; to 19 for fp8 (float8 inputs).
    """
    floats = {t.data_type for t in model.graph.initializer if t.name in _weights_of(model, chosen)}
    if bits == FP8:
        if _opset(model) < FP8_OPSET:
            model = _convert_opset(model, FP8_OPSET)
    elif bits == 4 or floats - {TensorProto.FLOAT}:
        model = _convert_opset(model, QDQ_INT4_OPSET)
    g = model.graph
    weights = {t.name: t for t in g.initializer}
    users: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    nodes: list[onnx.NodeProto] = []
    new_inits: list[TensorProto] = []
    drop: set[str] = set()
    done: list[str] = []
    todo = set(chosen)
    for node in g.node:
        if node.name in todo:
            w_name = node.input[1]
            w = numpy_helper.to_array(weights[w_name])
            if bits != 4 or w.shape[0] % block_size == 0:
                q_t, s_t, attrs = _qdq_tensors(w, w_name, bits, block_size)
                dq_out = f"{w_name}_DQ"
                nodes.append(
                    helper.make_node(
                        "DequantizeLinear",
                        [q_t.name, s_t.name],
                        [dq_out],
                        name=f"{node.name}_DQ_{_tag(bits)}",
                        **attrs,
                    )
                )
                new_inits += [q_t, s_t]
                node.input[1] = dq_out
                users[w_name] -= 1
                if users[w_name] == 0:
                    drop.add(w_name)
                done.append(node.name)
            # else: K is not a multiple of the block (TensorRT wants whole blocks): kept.
        nodes.append(node)
    kept_inits = [t for t in g.initializer if t.name not in drop]
    g.ClearField("node")
    g.node.extend(nodes)
    g.ClearField("initializer")
    g.initializer.extend(kept_inits + new_inits)
    return model, done


def _weights_of(model: onnx.ModelProto, nodes: list[str]) -> set[str]:
    names = set(nodes)
    return {n.input[1] for n in model.graph.node if n.name in names}


def _qdq_tensors(
    w: np.ndarray, name: str, bits: Bits, block_size: int
) -> tuple[TensorProto, TensorProto, dict[str, int]]:
    """Symmetric RTN: int weights [K, N] + scales (blocked along K for int4, per column
    for int8 and fp8; searched for int: export/rtn.py) and the DequantizeLinear attributes
    that go with them."""
    k, n = w.shape
    if bits == FP8:
        import ml_dtypes  # an onnx dependency: numpy's float8 types

        wf = w.astype(np.float32)
        amax = np.abs(wf).max(axis=0)  # [N]
        scale = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(w.dtype)
        # Clip: the scale's rounding may push |w / s| a hair past 448, which would cast
        # to NaN (E4M3FN has no infinity).
        scaled = np.clip(wf / scale.astype(np.float32)[None, :], -FP8_MAX, FP8_MAX)
        q_t = numpy_helper.from_array(scaled.astype(ml_dtypes.float8_e4m3fn), f"{name}_fp8")
        return q_t, numpy_helper.from_array(scale, f"{name}_scale"), {"axis": 1}
    q, scale = rtn.symmetric_rtn(w, bits, block_size if bits == 4 else None, w.dtype)
    if bits == 4:
        q_t = helper.make_tensor(f"{name}_int4", TensorProto.INT4, [k, n], _pack_int4(q), True)
        attrs = {"axis": 0, "block_size": block_size}
    else:
        q_t = numpy_helper.from_array(q, f"{name}_int8")
        attrs = {"axis": 1}
    return q_t, numpy_helper.from_array(scale, f"{name}_scale"), attrs


def _pack_int4(q: np.ndarray) -> bytes:
    """Two int4 values per byte, first element in the low nibble (ONNX's INT4 layout)."""
    flat = (q.reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


def _convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Upgrade the default-domain opset, leaving the weights out of the converter's copy
    (it serialises the model, which fails past protobuf's 2 GiB)."""
    inits = list(model.graph.initializer)
    model.graph.ClearField("initializer")
    # The converter wants every input typed; initializers double as typed graph inputs.
    stubs = [
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in inits
        if t.name not in {i.name for i in model.graph.input}
    ]
    model.graph.input.extend(stubs)
    out = version_converter.convert_version(model, opset)
    stub_names = {s.name for s in stubs}
    kept = [i for i in out.graph.input if i.name not in stub_names]
    out.graph.ClearField("input")
    out.graph.input.extend(kept)
    out.graph.initializer.extend(inits)
    return out


# ---- files and manifest --------------------------------------------------------------
def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _save(model: onnx.ModelProto, root: Path, file: str, threshold: int) -> dict[str, Any]:
    """Write *file* (and ``<file>.data`` past *threshold*) as new files; returns {file: record}."""
    roles = save_onnx(model, root / file, threshold)
    return {
        f: {"role": r, "sha256": sha256_file(root / f), "bytes": (root / f).stat().st_size}
        for f, r in roles.items()
    }


def _update_manifest(root: Path, records: dict[str, dict[str, Any]]) -> None:
    path = root / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    variants = manifest.setdefault("variants", {}).setdefault(DECODER, {})
    variants.update(records)
    # Variant files are verified when a variant is picked, not at every load (a 7B's
    # variants are GBs to hash); a re-export may have swept them into "files".
    for rec in records.values():
        for f in rec["files"]:
            manifest["files"].pop(f, None)
    write_json(path, manifest)
