"""Static shapes for onnxruntime's decoder variants, and the graph edits they share.

The exporter computes every ``view``'s target shape at run time (``Shape`` -> ``Gather`` ->
``Unsqueeze`` -> ``Concat`` per Reshape); :func:`fold_shapes` turns what symbolic shape
inference proves constant into initializers and constant Reshape targets (export/fuse.py
says why). :func:`_drop_dead` and :func:`remove_initializers` are the clean-ups after any
rewrite; they work on graphs whose weights are gigabytes (the 7B), without copies.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.quantize import _FLOATS


def fold_shapes(model: onnx.ModelProto) -> int:
    """Constant shape arithmetic -> initializers, Reshape targets -> constants (0 / -1
    where a dim is symbolic), then the shape arithmetic left (what depends on the batch
    or the past length) computed once instead of once per layer (:func:`share_shapes`);
    returns how many tensors were replaced."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    g = model.graph
    # Inference needs no weights: the big float initializers go in as typed inputs, so a
    # 7B graph is not copied (the shape constants it evaluates are small int tensors).
    light = _without_weights(model)
    # The inference's internals (onnxruntime 1.32's tools/symbolic_shape_infer.py):
    # infer_shapes() returns only the typed model, while the values of shape tensors,
    # which this pass needs, live in sympy_data_.
    ssi = SymbolicShapeInference(2**31 - 1, True, False, 0)
    ssi._preprocess(light)
    while ssi.run_:
        ssi._infer_impl()
    info = [*ssi.out_mp_.graph.value_info, *ssi.out_mp_.graph.output, *ssi.out_mp_.graph.input]
    types = {vi.name: vi.type.tensor_type.elem_type for vi in info}
    shapes = {vi.name: _dims(vi) for vi in info}
    produced = {o for n in g.node for o in n.output}
    outputs = {o.name for o in g.output}
    new: dict[str, TensorProto] = {}
    for name, val in ssi.sympy_data_.items():
        if name not in produced or name in outputs:
            continue
        vals = val if isinstance(val, list) else [val]
        if not vals or not all(_is_number(v) for v in vals):
            continue
        dtype = helper.tensor_dtype_to_np_dtype(types.get(name, TensorProto.INT64))
        arr = np.array([int(v) for v in vals] if isinstance(val, list) else int(val), dtype)
        new[name] = numpy_helper.from_array(arr, name)
    for n in g.node:
        if n.op_type == "Reshape" and n.input[1] not in new:
            target = _reshape_target(shapes.get(n.input[0]), shapes.get(n.output[0]))
            if target is not None:
                t = numpy_helper.from_array(np.array(target, np.int64), f"{n.output[0]}.shape")
                new[t.name] = t
                n.input[1] = t.name
    kept = [n for n in g.node if not all(o in new for o in n.output)]
    g.ClearField("node")
    g.node.extend(kept)
    g.initializer.extend(new.values())
    share_shapes(g, shapes)  # which ends with the dead-node sweep for both passes
    return len(new)


def share_shapes(g: onnx.GraphProto, shapes: dict[str, list[int | str | None]]) -> int:
    """Compute each distinct piece of shape arithmetic once; returns the nodes removed.

    What fold_shapes cannot make constant depends on a symbolic dim (the batch, the past
    length), and the exporter recomputes it in every layer from that layer's tensors:
    ``Shape(past_key.i)``, the attention mask from ``position_ids`` and the past length,
    each Reshape's batch dim. A decode step is dominated by per-node overhead (export/
    fuse.py), and this is ~10 nodes per layer. Two ``Shape`` nodes whose inputs have the
    same symbolic shape (by *shapes*: every dim known) give the same tensor, so all read
    the first; then equal nodes over equal inputs (equal small constants included) are
    merged, front to back, which folds each layer's copy of the chain into one.
    """
    before = len(g.node)
    alias: dict[str, str] = {}
    const_key: dict[tuple, str] = {}
    overridable = {i.name for i in g.input}  # an initializer fed as an input is not constant
    for t in g.initializer:  # small constants: equal values become one name
        if t.name not in overridable and int(np.prod(t.dims)) <= _SHARED_CONSTANT_MAX:
            key = (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes())
            alias[t.name] = const_key.setdefault(key, t.name)
    outputs = {o.name for o in g.output}
    seen: dict[tuple, onnx.NodeProto] = {}
    kept: list[onnx.NodeProto] = []
    for n in g.node:
        for j, i in enumerate(n.input):
            n.input[j] = alias.get(i, i)
        key = _node_key(n, shapes)
        first = seen.get(key) if key is not None else None
        if first is not None and not outputs.intersection(n.output):
            alias.update(zip(n.output, first.output, strict=True))
            continue
        if key is not None:
            seen[key] = n
        kept.append(n)
    for n in kept:  # subgraphs (the text-head If) read outer names too
        _rename_in_subgraphs(n, alias)
    g.ClearField("node")
    g.node.extend(kept)
    _drop_dead(g)
    return before - len(g.node)


_SHARED_CONSTANT_MAX = 64
# Ops whose output is a function of their inputs and attributes alone (and cheap to key).
_PURE = {
    "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Range", "Less", "Greater",
    "LessOrEqual", "GreaterOrEqual", "Equal", "Not", "And", "Or", "Where", "Cast", "Add", "Sub",
    "Mul", "Div", "Neg", "Expand", "ConstantOfShape", "Reshape", "Transpose", "Min", "Max",
    "Identity",
}  # fmt: skip


def _node_key(n: onnx.NodeProto, shapes: dict[str, list[int | str | None]]) -> tuple | None:
    if n.domain not in ("", "ai.onnx") or n.op_type not in _PURE:
        return None
    attrs = tuple(sorted(a.SerializeToString() for a in n.attribute))
    if n.op_type == "Shape":
        dims = shapes.get(n.input[0])
        if not dims or any(d is None for d in dims):
            return None
        return ("Shape", tuple(dims), attrs)
    return (n.op_type, tuple(n.input), attrs)


def _rename_in_subgraphs(n: onnx.NodeProto, alias: dict[str, str]) -> None:
    for a in n.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            for sub in a.g.node:
                for j, i in enumerate(sub.input):
                    sub.input[j] = alias.get(i, i)
                _rename_in_subgraphs(sub, alias)


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of *model* whose weights (2-D float initializers, and any of more than
    :data:`_SHAPE_CONSTANT_MAX` elements: a quantised graph's packed ``B``) are typed
    graph inputs instead; shape arithmetic only ever evaluates small int tensors."""
    # Field by field, never touching model.graph.initializer: clearing and refilling it
    # would copy every weight (protobuf's extend copies).
    out = onnx.ModelProto(ir_version=model.ir_version)
    out.opset_import.extend(model.opset_import)
    g = model.graph
    out.graph.name = g.name
    for name in ("node", "input", "output", "value_info"):
        getattr(out.graph, name).extend(getattr(g, name))
    for t in g.initializer:
        big = int(np.prod(t.dims, dtype=np.int64)) > _SHAPE_CONSTANT_MAX
        if big or (t.data_type in _FLOATS and len(t.dims) == 2):
            out.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
        else:
            out.graph.initializer.add().CopyFrom(t)
    return out


_SHAPE_CONSTANT_MAX = 4096


def _dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
        for d in vi.type.tensor_type.shape.dim
    ]


def _is_number(v: Any) -> bool:
    if isinstance(v, (int, np.integer)):
        return True
    return bool(getattr(v, "is_number", False)) and bool(getattr(v, "is_integer", False))


def _reshape_target(src: list | None, dst: list | None) -> list[int] | None:
    """A constant Reshape target giving *dst* from *src* (symbolic dims), or None."""
    if not src or not dst or any(d is None for d in (*src, *dst)):
        return None
    target: list[int] = []
    for j, d in enumerate(dst):
        if isinstance(d, int):
            if d == 0:
                return None  # 0 would mean "copy the input's dim" (allowzero unset)
            target.append(d)
        elif j < len(src) and src[j] == d:
            target.append(0)  # same symbolic dim at the same place
        else:
            target.append(-1)
    return target if target.count(-1) <= 1 else None


def _drop_dead(g: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nothing reads (shape arithmetic made constant)."""
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in g.node for i in _reads(n)}
        live = [n for n in g.node if any(o in used or o in outputs for o in n.output)]
        if len(live) == len(g.node):
            break
        g.ClearField("node")
        g.node.extend(live)
    used = {i for n in g.node for i in _reads(n)}
    remove_initializers(g, {t.name for t in g.initializer if t.name not in used})


def remove_initializers(g: onnx.GraphProto, names: set[str]) -> None:
    """Delete initializers in place: rebuilding the field would copy every tensor kept (a
    7B's weights held twice)."""
    for i in reversed(range(len(g.initializer))):
        if g.initializer[i].name in names:
            del g.initializer[i]


def _reads(n: onnx.NodeProto) -> list[str]:
    """A node's inputs and those its subgraphs read from the outer scope."""
    names = list(n.input)
    for a in n.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            names += [i for sub in a.g.node for i in _reads(sub)]
    return names
