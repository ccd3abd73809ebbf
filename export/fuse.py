"""``python -m export optimize``: onnxruntime-specific decoder variants (packed, head-gated).

``decoder.onnx`` stays the portable standard-op graph (TensorRT and ATC take it;
export/trt_ops.txt). This module rewrites a copy for onnxruntime and records it as a
decoder variant (``manifest["variants"]["decoder"]``) with the same I/O, so the backend's
KV-pool binding is unchanged:

=================  ===========================  ==========================================
name               file                         form
=================  ===========================  ==========================================
``fused``          ``decoder.fused.onnx``       fp32/fp16 as exported, rewritten
``fused-int4``     ``decoder.fused.int4.onnx``  the same, then MatMulNBits (int4)
``fused-int8``     ``decoder.fused.int8.onnx``  the same, then MatMulNBits (int8)
``contrib[-intN]`` ``decoder.contrib[.intN]``   ``fused`` + onnxruntime's RotaryEmbedding
                   ``.onnx``                    (``--contrib``; export/contrib.py)
=================  ===========================  ==========================================

Rewrites, and why:

- **Packed projections.** MatMuls that read the same activation with a constant 2-D
  weight (q/k/v after ``input_layernorm``, gate/up after ``post_attention_layernorm``)
  become one MatMul over the concatenated weight plus a ``Split`` back to the original
  tensors: a decode step is a chain of small GEMVs, and each op is a thread-pool dispatch
  and a pass over the activation, so 7 weighted MatMuls per layer become 4. Found
  structurally (shared input, weight constant), not by name; the heads are left alone.
- **The active head only.** ``lm_head`` (32000 rows: 25% of `small`'s weights, 2% of the
  7B's) runs inside an ``If`` on one extra input, ``text_head`` (bool scalar, last): a
  step whose rows all decode time/score digits passes false and gets zeros in the text
  columns instead (those rows never read them). The tiny time, score and sync heads
  always run. The input is required, recorded in the variant's ``extra_inputs``: an
  optional input (one with a default initializer) cannot be fed through onnxruntime's
  IO binding, which the backend's KV pool needs. Every other input and output is the
  portable graph's.
- **Static shapes.** The exporter computes every ``view``'s target shape at run time
  (``Shape`` -> ``Gather`` -> ``Unsqueeze`` -> ``Concat`` per Reshape, and the RoPE
  halves' Slice bounds). onnxruntime's symbolic shape inference gives each shape tensor
  as an expression of the graph's dims; the ones that are plain numbers become
  initializers, and a Reshape whose output dims are numbers, or equal to its input's dim
  at the same place (Reshape's ``0``), with at most one left (``-1``), gets a constant
  target shape; the dead shape arithmetic then goes. What stays symbolic (the batch, the
  past length: ``Shape(past_key.i)``, the attention mask) is computed once instead of
  once per layer (:func:`export.static_shapes.share_shapes`). On `small` (12 layers),
  after onnxruntime's own optimisation of each graph: 938 nodes portable, 723 fused
  before that sharing; ``contrib-int4`` 587 -> 455 (a simpler graph; its step time
  moved within noise, benchmarks/results/peers-small-cpu-2026-11-30-text-steps.md).
- **RMSNorm.** Left to onnxruntime: at ``ORT_ENABLE_EXTENDED`` (the backend's cached
  level) it fuses every exported norm into ``SimplifiedLayerNormalization`` (tested in
  tests/test_fuse.py), so writing that op here would only freeze the graph to one
  onnxruntime version. It does *not* fold the residual add into
  ``SkipSimplifiedLayerNormalization`` on these graphs (onnxruntime 1.32, with or without
  inferred shapes): one ``Add`` per norm stays, 24 of `small`'s ~455 step nodes, ~3% of a
  step by the per-node profile; not rewritten here.

Quantised forms pack first, then quantise (one MatMulNBits per packed weight; blocks run
along K, which packing does not change; or, ``int8_dynamic``, int8 per output channel x
activations per token: export/w8a8.py), then gate the head (kept in float, or quantised
per ``lm_head``: always one MatMulNBits node, so the gate holds it in the dynamic form
too). Then :func:`export.decode_timing.record_default` times, in one run, each
precision's candidates (the portable graph or plain ``int4``/``int8`` variant against
its fused and contrib forms) and records the fastest request: the float one as
``defaults.onnxruntime.decoder`` (what the backend runs when nothing is asked), the
quantised ones under ``defaults.onnxruntime.decoder_by_precision`` (what ``--quant
int4`` and the ``onnxruntime-int4`` backend run: :func:`trace_rt.variants.resolve_variant`).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from export.quantize import (
    _FLOATS,
    DEFAULT_ACCURACY_LEVEL,
    DEFAULT_BLOCK_SIZE,
    LOGITS,
    _describe,
    _heads,
    _opset,
    _save,
    _update_manifest,
    head_bits,
    quantise_nodes,
    select_weights,
    weights_record,
)
from export.static_shapes import _drop_dead, fold_shapes, remove_initializers
from trace_rt.config import TraceConfig
from trace_rt.errors import InputError
from trace_rt.graphs import DECODER, EXTERNAL_DATA_THRESHOLD, load_manifest
from trace_rt.variants import TEXT_HEAD_INPUT, has_portable_decoder

FUSED = "fused"
CONTRIB = "contrib"  # fused + onnxruntime's RotaryEmbedding (export/contrib.py)
FORMS = (FUSED, CONTRIB)
REWRITES = ("packed-matmul", "static-shapes", "text-head-if")
NBITS = "MatMulNBits"
# export.quantize's form name (and the variants' tag) for int8 x int8 with activations
# quantised per token (export/w8a8.py); the other kernel is its "nbits" (MatMulNBits).
DYNAMIC = "dynamic"
# lm_head of the quantised forms made here (their defaults are picked by speed): int8,
# measured to cost nothing the layers' quantisation does not already cost (text-head
# forced top-1 0.142 vs 0.146 with it in fp32 for int4, 0.896 vs 0.899 for dynamic int8;
# text logit error +0.3-0.7%) while a text-head step reads 4x fewer head bytes
# (benchmarks/results/quant-agreement-lm-head-int8-small-cpu-2026-11-30.md).
DEFAULT_LM_HEAD = 8


def fused_name(bits: int | None, tag: str = "", form: str = FUSED) -> str:
    return form if bits is None else f"{form}-int{bits}{tag}"


def fused_file(bits: int | None, tag: str = "", form: str = FUSED) -> str:
    return f"{DECODER}.{form}.onnx" if bits is None else f"{DECODER}.{form}.int{bits}{tag}.onnx"


def optimize_artifact(
    artifact: str | Path,
    bits: tuple[int | None, ...] = (None,),
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
    lm_head: bool | int | None = None,
    tag: str = "",
    forms: tuple[str, ...] = (FUSED,),
    int8_dynamic: bool = False,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> dict[str, dict[str, Any]]:
    """Write *artifact*'s fused decoder variants (None: float, 4/8: MatMulNBits).

    Args:
        artifact: artifact directory written by ``python -m export onnx``.
        bits: which variants: None (the graph's float type), 4 and/or 8.
        block_size, accuracy_level, lm_head: as ``python -m export quantize``, except that
            ``lm_head`` defaults to :data:`DEFAULT_LM_HEAD` (int8) here, and on an artifact
            with no float decoder to the quantised source's choice.
        tag: appended to quantised variants' names and files (e.g. ``-b64`` when
            comparing block sizes).
        forms: ``fused`` and/or ``contrib`` (the same, with onnxruntime's
            ``RotaryEmbedding``: export/contrib.py).
        int8_dynamic: also each form's ``-int8-dynamic`` variant: int8 weights per
            output channel, activations quantised per token (MatMulIntegerToFloat,
            export/w8a8.py), which prefills faster than MatMulNBits on x86.

    Returns:
        {variant name: manifest record}.
    """
    if unknown := [b for b in bits if b not in (None, 4, 8)]:
        raise InputError(f"fused variants are float (None), 4 or 8 bits, not {unknown}")
    if bad := [f for f in forms if f not in FORMS]:
        raise InputError(f"unknown decoder form(s) {bad}; known: {', '.join(FORMS)}")
    root = Path(artifact)
    manifest = load_manifest(root)
    if not has_portable_decoder(manifest):  # layer-streamed: quantised decoders only
        if int8_dynamic:
            raise InputError(
                f"{root}: the dynamic int8 form is made from the fp32 decoder, which a "
                "layer-streamed export does not keep"
            )
        from export.fuse_nbits import optimize_quantised

        return optimize_quantised(root, manifest, bits, forms, tag, external_data_threshold,
                                  block_size, accuracy_level, lm_head)  # fmt: skip
    if lm_head is None:
        lm_head = DEFAULT_LM_HEAD
    src_file = manifest["graphs"][DECODER]["file"]
    source = {"file": src_file, "sha256": manifest["files"][src_file]["sha256"]}
    records: dict[str, dict[str, Any]] = {}
    kinds = [(b, "nbits") for b in bits] + ([(8, DYNAMIC)] if int8_dynamic else [])
    for form in forms:
        for b, kernel in kinds:
            rec = _rewrite(root, src_file, form, b, block_size, accuracy_level, lm_head, kernel)
            t = f"-{DYNAMIC}{tag}" if kernel == DYNAMIC else tag
            name, file = fused_name(b, t, form), fused_file(b, t, form)
            records[name] = rec | {
                "file": file,
                "files": _save(rec.pop("model"), root, file, external_data_threshold),
                "source": source,
            }
    _update_manifest(root, records)
    return records


def _rewrite(
    root: Path,
    src_file: str,
    form: str,
    bits: int | None,
    block_size: int,
    accuracy_level: int,
    lm_head: bool | int,
    kernel: str = "nbits",
) -> dict[str, Any]:
    """One variant's graph (under ``"model"``) and the rest of its manifest record;
    *kernel* is export.quantize's form for the quantised layers (``nbits`` or ``dynamic``)."""
    model = onnx.load(str(root / src_file))
    packed = pack_matmuls(model)
    fold_shapes(model)
    rewrites = list(REWRITES)
    if form == CONTRIB:
        from export.contrib import use_rotary_embedding

        use_rotary_embedding(model, TraceConfig.from_dir(root).max_position_embeddings)
        _drop_dead(model.graph)  # the exported per-step cos/sin computation
        rewrites.append("rotary-embedding")
    head_out = text_head_output(model)
    rec: dict[str, Any] = {"form": form, "runtime": "onnxruntime", "also_runs_on": []}
    if bits is not None:
        lm_bits = head_bits(lm_head, bits, kernel)
        chosen, kept, lm = select_weights(model, lm_head=lm_bits is not None)
        model, done = quantise_nodes(
            model, chosen, lm, kernel, bits, lm_bits, block_size, accuracy_level
        )
        rec |= _describe(kernel, bits, block_size) | {
            "bits": bits,
            "weight_type": f"int{bits}",
            "accuracy_level": (accuracy_level or None) if kernel == "nbits" else None,
            "weights": weights_record(done, kept, lm_bits if lm else None),
        }
    gate_text_head(model, head_out)
    return rec | {
        "model": model,
        "scheme": rec.get("scheme", form),
        "rewrites": rewrites,
        "packed": packed,
        "extra_inputs": [{"name": TEXT_HEAD_INPUT, "dtype": "bool", "shape": []}],
        "opset": _opset(model),
        "tools": {"onnxruntime": ort.__version__, "onnx": onnx.__version__},
    }


# ---- packed projections ---------------------------------------------------------------
def pack_matmuls(model: onnx.ModelProto) -> list[list[str]]:
    """Merge weighted MatMuls that share their activation input; returns the groups
    (original weight names, in packed order)."""
    g = model.graph
    weights = {t.name: t for t in g.initializer}
    select_weights(model, lm_head=False)  # names every weighted MatMul
    weighted = {
        n.name: n
        for n in g.node
        if n.op_type == "MatMul"
        and n.input[1] in weights
        and len(weights[n.input[1]].dims) == 2
        and weights[n.input[1]].data_type in _FLOATS
    }
    heads = _heads(g, weighted)
    users: dict[str, int] = defaultdict(int)
    for n in g.node:
        for i in n.input:
            users[i] += 1
    groups: dict[tuple[str, int], list[onnx.NodeProto]] = defaultdict(list)
    for n in weighted.values():
        w = weights[n.input[1]]
        # A weight used elsewhere too (tied) would be stored twice; leave those alone.
        if n.name not in heads and users[n.input[1]] == 1:
            groups[(n.input[0], w.dims[0])].append(n)
    replace: dict[int, list[onnx.NodeProto]] = {}
    drop: set[str] = set()
    consumed: set[str] = set()
    new_inits: list[TensorProto] = []
    done: list[list[str]] = []
    for (x, _), nodes in groups.items():
        if len(nodes) < 2:
            continue
        arrays = [numpy_helper.to_array(weights[n.input[1]]) for n in nodes]
        base = nodes[0].name
        packed_w = numpy_helper.from_array(np.concatenate(arrays, axis=1), f"{base}.packed_w")
        sizes = numpy_helper.from_array(
            np.array([a.shape[1] for a in arrays], np.int64), f"{base}.packed_split"
        )
        y = f"{base}.packed_out"
        mm = helper.make_node("MatMul", [x, packed_w.name], [y], name=f"{base}.packed")
        split = helper.make_node(
            "Split",
            [y, sizes.name],
            [n.output[0] for n in nodes],
            name=f"{base}.packed_split",
            axis=-1,
        )
        # Placed where the first member was: every member reads the same input, so the
        # input is ready there, and later members' consumers come after.
        first = min(id_pos(g, n) for n in nodes)
        replace[first] = [mm, split]
        drop.update(n.name for n in nodes)
        consumed.update(n.input[1] for n in nodes)
        new_inits += [packed_w, sizes]
        done.append([n.input[1] for n in nodes])
    splice_nodes(g, replace, drop)
    remove_initializers(g, consumed)
    g.initializer.extend(new_inits)
    return done


def splice_nodes(g: onnx.GraphProto, replace: dict[int, list[onnx.NodeProto]], drop: set[str]):
    """Insert ``replace[i]`` before the node at position *i*; leave out the nodes named in
    *drop* (the order stays topological: a packed node takes its first member's place)."""
    nodes_out: list[onnx.NodeProto] = []
    for i, n in enumerate(g.node):
        nodes_out += replace.get(i, [])
        if n.name not in drop:
            nodes_out.append(n)
    g.ClearField("node")
    g.node.extend(nodes_out)


def id_pos(g: onnx.GraphProto, node: onnx.NodeProto) -> int:
    return next(i for i, n in enumerate(g.node) if n is node)


# ---- the text head behind an If -------------------------------------------------------
def weighted_nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """MatMuls with a constant 2-D weight and MatMulNBits nodes, by name (an unnamed or
    repeated name becomes ``<name or op>__<position>``, as :func:`select_weights` names)."""
    g = model.graph
    weights = {t.name: t for t in g.initializer}
    out: dict[str, onnx.NodeProto] = {}
    for i, n in enumerate(g.node):
        if n.op_type == NBITS or (
            n.op_type == "MatMul" and n.input[1] in weights and len(weights[n.input[1]].dims) == 2
        ):
            if not n.name or n.name in out:
                n.name = f"{n.name or n.op_type}__{i}"
            out[n.name] = n
    return out


def text_head_output(model: onnx.ModelProto) -> str:
    """The tensor ``lm_head`` writes: the widest head feeding the logits, float or
    MatMulNBits (quantisers keep output names, so it is found before or after)."""
    weighted = weighted_nodes(model)
    heads = _heads(model.graph, weighted)
    if not heads:
        raise InputError(f"the decoder graph has no weighted head feeding {LOGITS!r}")
    lm = max(heads, key=lambda n: _head_width(model, weighted[n]))
    return weighted[lm].output[0]


def gate_text_head(model: onnx.ModelProto, head_out: str) -> None:
    """Move the node producing *head_out* into the then-branch of an ``If`` on a new
    last input ``text_head``; the else-branch gives zeros of the same shape."""
    g = model.graph
    pos, node = next((i, n) for i, n in enumerate(g.node) if head_out in n.output)
    x = node.input[0]  # hidden [B, H]
    n_out = _head_width(model, node)
    inner = f"{head_out}.text"
    then_node = onnx.NodeProto()
    then_node.CopyFrom(node)
    then_node.output[0] = inner
    f32 = _elem_type(model, head_out)
    then_g = helper.make_graph(
        [then_node], "text_head_then", [], [helper.make_tensor_value_info(inner, f32, None)]
    )
    zeros = f"{head_out}.zeros"
    width = numpy_helper.from_array(np.array([n_out], np.int64), f"{head_out}.width")
    else_g = helper.make_graph(
        [
            helper.make_node("Shape", [x], [f"{zeros}.b"], start=0, end=1),
            helper.make_node("Concat", [f"{zeros}.b", width.name], [f"{zeros}.shape"], axis=0),
            helper.make_node(
                "ConstantOfShape",
                [f"{zeros}.shape"],
                [zeros],
                value=helper.make_tensor("zero", f32, [1], [0]),
            ),
        ],
        "text_head_else",
        [],
        [helper.make_tensor_value_info(zeros, f32, None)],
        initializer=[width],
    )
    gate = helper.make_node(
        "If",
        [TEXT_HEAD_INPUT],
        [head_out],
        name="text_head_if",
        then_branch=then_g,
        else_branch=else_g,
    )
    g.node.remove(node)
    g.node.insert(pos, gate)
    g.input.append(helper.make_tensor_value_info(TEXT_HEAD_INPUT, TensorProto.BOOL, []))


def _head_width(model: onnx.ModelProto, node: onnx.NodeProto) -> int:
    weights = {t.name: t for t in model.graph.initializer}
    if node.op_type == "MatMul":
        return int(weights[node.input[1]].dims[1])
    return next(a.i for a in node.attribute if a.name == "N")  # MatMulNBits


def _elem_type(model: onnx.ModelProto, name: str) -> int:
    for vi in [*model.graph.value_info, *model.graph.output]:
        if vi.name == name:
            return vi.type.tensor_type.elem_type
    # The exported graph types every intermediate when shapes were inferred; otherwise
    # the head computes in the weights' float type.
    inits = {t.name: t for t in model.graph.initializer}
    node = next(n for n in model.graph.node if name in n.output)
    if node.op_type == "MatMul":
        return inits[node.input[1]].data_type
    return inits[node.input[2]].data_type  # MatMulNBits: scales carry the float type
