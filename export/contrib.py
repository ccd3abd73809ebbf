"""onnxruntime contrib ops in the fused decoder (``contrib`` variants of ``export optimize``).

The ``contrib`` decoder is the ``fused`` one (export/fuse.py) with each layer's rotary
embedding of q and k as one ``com.microsoft.RotaryEmbedding`` node over a constant
cos/sin table, instead of the exported ``x * cos + rotate_half(x) * sin`` (two Slices, a
Neg, a Concat, two Muls and an Add per tensor, plus the per-step table computation).
Same I/O and KV layout as the portable graph: the op works on ``[batch, seq, hidden]``
element by element at ``position_ids[batch, seq]``, so the position-major ``[T, B,
heads * hd]`` projection goes in as it is with the transposed ``position_ids`` [T, B].

What was not done, and why: onnxruntime's fused attention ops (``GroupQueryAttention``,
``MultiHeadAttention``) take the past K/V only batch-major per head (BNSH, ``[B, kv, P,
hd]``), while the graphs' contract (trace_rt/graphs.py) and the backend's pool are
position-major ``[P, B, kv, hd]``; feeding them would mean a transposed copy of the whole
past per layer per step (what position-major exists to avoid) or a second pool layout in
the backend. ``SimplifiedLayerNormalization`` is already made by onnxruntime's own
optimiser from the exported RMSNorm (tests/test_fuse.py; the residual add stays outside
it: export/fuse.py).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from trace_rt.errors import InputError

MS_DOMAIN = "com.microsoft"
ROPE_POSITIONS = "rope.position_ids"  # position_ids transposed: [T, B]
ROPE_COS, ROPE_SIN = "rope.cos_cache", "rope.sin_cache"


def use_rotary_embedding(model: onnx.ModelProto, max_positions: int) -> int:
    """Replace every exported rotary embedding in *model* by ``RotaryEmbedding``; returns
    how many (2 per layer: q and k).

    Args:
        max_positions: rows of the cos/sin table (the model's context length).

    Raises:
        InputError: no rotary embedding found (not an exported TRACE decoder).
    """
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    consts = _constants(g)
    matches = [m for n in g.node if n.op_type == "Add" and (m := _match(n, producer))]
    if not matches:
        raise InputError("no rotary embedding (x*cos + rotate_half(x)*sin) in the decoder graph")
    inv_freq = _inv_freq(g, producer, consts)
    half = inv_freq.size
    shapes = _value_shapes(model)
    np_dtype = helper.tensor_dtype_to_np_dtype(_float_type(g))
    # The exported graph multiplies the fp32 position by inv_freq in fp32 and takes cos and
    # sin of that (then casts for fp16 graphs): the same products here, once, in a table.
    angles = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]
    g.initializer.extend(
        [
            numpy_helper.from_array(np.cos(angles).astype(np_dtype), ROPE_COS),
            numpy_helper.from_array(np.sin(angles).astype(np_dtype), ROPE_SIN),
        ]
    )
    new_nodes: dict[str, list[onnx.NodeProto]] = {}
    for x, add in matches:
        reshape = producer[x]  # x = Reshape(flat [T, B, heads*hd], [T, B, ..., hd])
        flat = reshape.input[0]
        dims = shapes.get(flat)
        if reshape.op_type != "Reshape" or not dims or len(dims) != 3 or dims[2] is None:
            raise InputError(f"rotary embedding of {x!r}: not a Reshape of a [T, B, D] tensor")
        heads = int(dims[2]) // (2 * half)
        rot = f"{add.output[0]}.rotary"
        new_nodes[add.name] = [
            helper.make_node(
                "RotaryEmbedding",
                [flat, ROPE_POSITIONS, ROPE_COS, ROPE_SIN],
                [rot],
                name=f"{add.name}.rotary",
                domain=MS_DOMAIN,
                num_heads=heads,
                interleaved=0,
            ),
            helper.make_node(
                "Reshape", [rot, reshape.input[1]], [add.output[0]], name=f"{add.name}.shape"
            ),
        ]
    out: list[onnx.NodeProto] = [
        helper.make_node("Transpose", ["position_ids"], [ROPE_POSITIONS], perm=[1, 0])
    ]
    for n in g.node:
        out += new_nodes.get(n.name, [n])
    g.ClearField("node")
    g.node.extend(out)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(matches)


def _match(add: onnx.NodeProto, producer: dict[str, onnx.NodeProto]) -> tuple[str, onnx.NodeProto]:
    """(x, add) if *add* is ``x * cos + concat(-x2, x1) * sin`` with x1, x2 Slices of x."""
    muls = [producer.get(i) for i in add.input]
    if len(muls) != 2 or any(m is None or m.op_type != "Mul" for m in muls):
        return None  # type: ignore[return-value]
    for plain, rotated in (muls, muls[::-1]):
        for r in rotated.input:
            cat = producer.get(r)
            if cat is None or cat.op_type != "Concat" or len(cat.input) != 2:
                continue
            neg, second = producer.get(cat.input[0]), producer.get(cat.input[1])
            if neg is None or neg.op_type != "Neg" or second is None or second.op_type != "Slice":
                continue
            first = producer.get(neg.input[0])
            if first is None or first.op_type != "Slice" or first.input[0] != second.input[0]:
                continue
            x = first.input[0]
            if x in plain.input:
                return x, add
    return None  # type: ignore[return-value]


def _constants(g: onnx.GraphProto) -> dict[str, np.ndarray]:
    out = {t.name: numpy_helper.to_array(t) for t in g.initializer if len(t.dims) <= 1}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def _inv_freq(
    g: onnx.GraphProto, producer: dict[str, onnx.NodeProto], consts: dict[str, np.ndarray]
) -> np.ndarray:
    """The exported table's frequencies: the constant operand of the product under Cos."""
    cos = next((n for n in g.node if n.op_type == "Cos"), None)
    seen, todo = set(), [cos.input[0]] if cos is not None else []
    while todo:
        name = todo.pop()
        node = producer.get(name)
        if node is None or name in seen:
            continue
        seen.add(name)
        if node.op_type in ("Einsum", "Mul", "MatMul"):
            for i in node.input:
                c = consts.get(i)
                if c is not None and c.ndim == 1 and c.size > 1:
                    return c.astype(np.float32)
        todo += list(node.input)
    raise InputError("the decoder graph's rotary table has no constant frequencies")


def _value_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    inferred = onnx.shape_inference.infer_shapes(_skeleton(model))
    g = inferred.graph
    return {
        vi.name: [
            d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim
        ]
        for vi in [*g.value_info, *g.input, *g.output]
    }


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """*model* with its weights' data left out (shape inference needs dims only)."""
    out = onnx.ModelProto()
    inits = list(model.graph.initializer)
    model.graph.ClearField("initializer")
    try:
        out.CopyFrom(model)
    finally:
        model.graph.initializer.extend(inits)
    for t in inits:
        if len(t.dims) >= 2:
            out.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
        else:
            out.graph.initializer.append(t)
    return out


def _float_type(g: onnx.GraphProto) -> int:
    """The graph's float type (its embeddings input's): the table's and the op's."""
    return next(i for i in g.input if i.name == "inputs_embeds").type.tensor_type.elem_type
