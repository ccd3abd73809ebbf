"""int8 weights x int8 activations quantised per token at run time (the ``dynamic`` form).

Each chosen ``y = x @ W`` (x ``[..., K]`` float32, W ``[K, N]`` constant) becomes::

    s   = max(|x|, over K) / 127                      # [..., 1]   one scale per row (token)
    xq  = Cast<uint8>(Round(x / s + 128))             # [..., K]   in 1..255, zero point 128
    y   = MatMulIntegerToFloat(xq, Wq, 1, sw, 128) * s           # [..., N]

with ``Wq = rint(W / sw)`` int8 in -127..127 and ``sw = max(|W|, over K) / 127`` per output
column. Why this shape:

- **Per token, not per tensor.** onnxruntime's ``quantize_dynamic`` (DynamicQuantizeLinear)
  takes one scale for the whole activation, set by its largest value anywhere in the
  prompt; trained LLMs have a few positions whose activations are orders of magnitude
  larger than the rest (the first token's, "attention sinks"), which would leave every
  other position a handful of levels. Per token, each row keeps its own range, and a
  row's result does not depend on which other rows share its run: a prefix from the
  prefix cache and a batched decode step give what a whole prefill and a solo step give
  (tests/test_w8a8.py), which a per-tensor scale would not guarantee. It costs
  time: on `small`'s 385 x 768 x 3072 MLP matmul (2 cores, quiet) 3.3 ms against 2.4 ms
  for DynamicQuantizeLinear's per-tensor path (fused into one kernel), error 1.1e-2 vs
  1.4e-2 relative on Gaussian inputs. Random weights have no such outliers, so the token
  agreement measured on `small` is the same for both.
- **The scales in the GEMM's epilogue.** ``MatMulIntegerToFloat`` (onnxruntime's contrib
  op) converts the int32 sums and applies the per-column weight scale inside the kernel
  (its activation scale is a scalar, so it gets 1 and the per-row scale is one ``Mul``
  after): two element-wise passes over ``[..., N]`` fewer than MatMulInteger + Cast + Mul,
  and two nodes fewer per matmul for the decode step, which is overhead-bound.
- **uint8 activations with zero point 128.** MLAS's fast x86 path (VNNI / AVX2
  ``vpmaddubsw``) is u8 x s8; an int8 x int8 MatMulInteger took 28 ms on that matmul. A symmetric
  grid shifted by 128 keeps the zero point exact and the same for every row, so it stays
  the scalar MatMulInteger wants, and the row scale is applied after the integer product.
- **Against MatMulNBits int8** (blocks of 32 along K, accuracy level 4): the same int8
  compute in onnxruntime 1.32, but its M > 1 kernel took 6.4 ms on that matmul where this
  form took 3.3, so the prefill of an int8 decoder is the gain; the decode step (M = 1) is
  a GEMV either way. MatMulNBits' finer blocks give smaller logit errors on `small` (3.6e-2
  vs 6.2e-2 relative) with the same or better token agreement for this form
  (benchmarks/results/int8-dynamic-small-cpu-2026-11-30.md).

- **Eight nodes per quantised activation** (``Abs``, ``ReduceMax``, ``Max``, ``Div``,
  ``Div``, ``Add``, ``Round``, ``Cast``), shared by the matmuls reading it. Tried instead:
  opset 21's blocked ``QuantizeLinear`` (one block per row, int8 output, no zero point)
  into an int8 x int8 ``MatMulIntegerToFloat``, five nodes: bit-identical at M = 1, but
  1.3 ms against 0.045-0.07 ms for one 768 x 3072 GEMV, 27 ms against 2.5 ms at M = 385
  (onnxruntime 1.32, 2-core AVX-512 CPU); the u8 grid stays.

Rows of zeros (padding) get a floor on the scale instead of a division by zero. Which
MatMuls are rewritten is the caller's choice (``export.quantize.select_weights``: every
decoder linear layer, the heads kept).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from trace_rt.errors import InputError

QMAX = 127
ZERO_POINT = 128
SCALE_FLOOR = 1e-12  # a row of zeros quantises to the zero point, not NaN
MS_DOMAIN = "com.microsoft"


def describe() -> dict:
    """The manifest's description of this scheme (``python -m export quantize``'s record)."""
    return {
        "scheme": "dynamic",
        "op": "com.microsoft::MatMulIntegerToFloat (uint8 activations, zero point 128; int8 "
        "weights)",
        "runtime": "onnxruntime",
        "also_runs_on": [],
        "granularity": "channel",
        "block_size": None,
        "axis": "N",
        "symmetric": True,
        "algorithm": "rtn (weights, per output channel); activations per token at run time",
    }


def to_w8a8(model: onnx.ModelProto, chosen: list[str]) -> onnx.ModelProto:
    """Rewrite the MatMul nodes named in *chosen* in place; returns *model*."""
    g = model.graph
    weights = {t.name: t for t in g.initializer}
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    users: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    consts = [
        numpy_helper.from_array(np.array(QMAX, np.float32), "w8a8_qmax"),
        numpy_helper.from_array(np.array(ZERO_POINT, np.float32), "w8a8_zp_f"),
        numpy_helper.from_array(np.array(ZERO_POINT, np.uint8), "w8a8_zp"),
        numpy_helper.from_array(np.array(SCALE_FLOOR, np.float32), "w8a8_floor"),
        numpy_helper.from_array(np.array(1.0, np.float32), "w8a8_one"),
    ]
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    if opset >= 18:  # ReduceMax's axes became an input
        consts.append(numpy_helper.from_array(np.array([-1], np.int64), "w8a8_axes"))
    quantised: dict[str, tuple[str, str]] = {}  # activation -> (uint8 tensor, row scale)
    nodes: list[onnx.NodeProto] = []
    new_inits: list[TensorProto] = []
    drop: set[str] = set()
    todo = set(chosen)
    for node in g.node:
        if node.name not in todo:
            nodes.append(node)
            continue
        x, w_name = node.input[0], node.input[1]
        w = numpy_helper.to_array(weights[w_name])
        if w.dtype != np.float32:
            raise InputError(f"the dynamic int8 form takes float32 weights, {w_name} is {w.dtype}")
        if x not in quantised:
            quantised[x] = _quantise_rows(nodes, x, f"{node.name}_a8", opset)
        xq, s = quantised[x]
        amax = np.abs(w).max(axis=0)  # [N]
        sw = np.where(amax > 0, amax / QMAX, 1.0).astype(np.float32)
        q = np.clip(np.rint(w / sw[None, :]), -QMAX, QMAX).astype(np.int8)  # [K, N]
        new_inits += [
            numpy_helper.from_array(q, f"{w_name}_int8"),
            numpy_helper.from_array(sw, f"{w_name}_scale"),
        ]
        p, y = node.name, node.output[0]
        nodes += [
            helper.make_node(
                "MatMulIntegerToFloat",
                [xq, f"{w_name}_int8", "w8a8_one", f"{w_name}_scale", "w8a8_zp"],
                [f"{p}_ws"],
                name=f"{p}_mmi",
                domain=MS_DOMAIN,
            ),
            helper.make_node("Mul", [f"{p}_ws", s], [y], name=f"{p}_rs"),
        ]
        users[w_name] -= 1
        if users[w_name] == 0:
            drop.add(w_name)
    kept = [t for t in g.initializer if t.name not in drop]
    g.ClearField("node")
    g.node.extend(nodes)
    g.ClearField("initializer")
    g.initializer.extend(kept + consts + new_inits)
    return model


def _quantise_rows(nodes: list[onnx.NodeProto], x: str, p: str, opset: int) -> tuple[str, str]:
    """Append the per-row quantisation of *x*; returns (uint8 tensor, scale [..., 1])."""
    reduce = (
        helper.make_node("ReduceMax", [f"{p}_abs", "w8a8_axes"], [f"{p}_max"], keepdims=1)
        if opset >= 18
        else helper.make_node("ReduceMax", [f"{p}_abs"], [f"{p}_max"], axes=[-1], keepdims=1)
    )
    reduce.name = f"{p}_max"
    nodes += [
        helper.make_node("Abs", [x], [f"{p}_abs"], name=f"{p}_abs"),
        reduce,
        helper.make_node("Max", [f"{p}_max", "w8a8_floor"], [f"{p}_maxf"], name=f"{p}_floor"),
        helper.make_node("Div", [f"{p}_maxf", "w8a8_qmax"], [f"{p}_s"], name=f"{p}_scale"),
        helper.make_node("Div", [x, f"{p}_s"], [f"{p}_xd"], name=f"{p}_div"),
        # Round(v) + 128 == Round(v + 128): 128 is even, so ties round the same way.
        helper.make_node("Add", [f"{p}_xd", "w8a8_zp_f"], [f"{p}_xz"], name=f"{p}_shift"),
        helper.make_node("Round", [f"{p}_xz"], [f"{p}_xr"], name=f"{p}_round"),
        helper.make_node("Cast", [f"{p}_xr"], [f"{p}_u8"], name=f"{p}_u8", to=TensorProto.UINT8),
    ]
    return f"{p}_u8", f"{p}_s"
