"""Fused forms of an already-quantised decoder, for artifacts with no float decoder.

A layer-streamed export (``python -m export onnx --stream --decoders int4,int8``: the 7B's
fp32 decoder would be 28 GB) has MatMulNBits variants but no ``decoder.onnx`` for
:mod:`export.fuse` to rewrite. ``python -m export optimize ART --int4`` then rewrites the
``int4`` variant itself, with the same rewrites and the same I/O:

- **Packed projections.** MatMulNBits nodes that read the same activation with the same
  ``K``, bits, block size and accuracy level (q/k/v, gate/up) become one over their
  weights concatenated along ``N``, plus a ``Split``. ``B`` is ``[N, blocks, blob]`` and
  the scales ``[N, blocks]``: each output row has its own blocks and scales, so stacking
  rows is exact (the packed node computes bit for bit what the separate ones did).
- **Static shapes** (:func:`export.static_shapes.fold_shapes`, weights left out of the inference).
- **The active head only** (:func:`export.fuse.gate_text_head`): ``lm_head``, fp32 or
  MatMulNBits, runs inside an ``If`` on the ``text_head`` input.

The quantisation settings (block size, accuracy level, whether ``lm_head`` is quantised)
are the source variant's; asking for others is refused, since they would need the float
weights this artifact does not have.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from export.fuse import (
    FUSED,
    NBITS,
    REWRITES,
    fused_file,
    fused_name,
    gate_text_head,
    splice_nodes,
    text_head_output,
    weighted_nodes,
)
from export.quantize import (
    _heads,
    _opset,
    _save,
    _update_manifest,
    head_bits,
)
from export.static_shapes import fold_shapes, remove_initializers
from trace_rt.errors import InputError
from trace_rt.graphs import DECODER
from trace_rt.variants import TEXT_HEAD_INPUT, recorded_head_bits

# The source variant's record carries over (quantisation scheme, weights) but for these.
NOT_INHERITED = {"file", "files", "source", "form", "runtime", "also_runs_on", "opset", "tools"}


def _attrs(node: onnx.NodeProto) -> dict[str, int]:
    return {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}


def pack_matmulnbits(model: onnx.ModelProto) -> list[list[str]]:
    """Merge MatMulNBits nodes that share their activation and settings (module
    docstring); returns the groups (original weight names, in packed order)."""
    g = model.graph
    weights = {t.name: t for t in g.initializer}
    weighted = weighted_nodes(model)
    heads = _heads(g, weighted)
    users: dict[str, int] = defaultdict(int)
    for n in g.node:
        for i in n.input:
            users[i] += 1
    groups: dict[tuple, list[onnx.NodeProto]] = defaultdict(list)
    for n in weighted.values():
        if n.op_type != NBITS or n.name in heads or len(n.input) != 3:
            continue  # zero points, group indices or a bias: not packed (never exported)
        if any(i not in weights or users[i] != 1 for i in n.input[1:]):
            continue
        a = _attrs(n)
        key = (n.input[0], a["K"], a["bits"], a["block_size"], a.get("accuracy_level", 0))
        groups[key].append(n)
    replace: dict[int, list[onnx.NodeProto]] = {}
    drop: set[str] = set()
    done: list[list[str]] = []
    position = {id(n): i for i, n in enumerate(g.node)}
    for (x, k, bits, block, level), nodes in groups.items():
        if len(nodes) < 2:
            continue
        base = nodes[0].name
        b = np.concatenate([numpy_helper.to_array(weights[n.input[1]]) for n in nodes], axis=0)
        s = np.concatenate([numpy_helper.to_array(weights[n.input[2]]) for n in nodes], axis=0)
        widths = [_attrs(n)["N"] for n in nodes]
        # Added in place: extending the field with new tensors would copy them.
        b_t = _add(g, numpy_helper.from_array(b, f"{base}.packed_B"))  # [sum N, blocks, blob]
        s_t = _add(g, numpy_helper.from_array(s, f"{base}.packed_scales"))  # [sum N, blocks]
        del b, s
        sizes = _add(g, numpy_helper.from_array(np.array(widths, np.int64), f"{base}.packed_split"))
        y = f"{base}.packed_out"
        mm = helper.make_node(
            NBITS,
            [x, b_t.name, s_t.name],
            [y],
            name=f"{base}.packed",
            domain="com.microsoft",
            K=k,
            N=sum(widths),
            bits=bits,
            block_size=block,
            accuracy_level=level,
        )
        split = helper.make_node(
            "Split", [y, sizes.name], [n.output[0] for n in nodes], name=f"{base}.split", axis=-1
        )
        replace[min(position[id(n)] for n in nodes)] = [mm, split]
        drop.update(n.name for n in nodes)
        consumed = {w for n in nodes for w in n.input[1:]}
        for w in consumed:
            del weights[w]  # no reference left, so the removed tensors' memory goes now
        remove_initializers(g, consumed)
        done.append([n.input[1] for n in nodes])
    splice_nodes(g, replace, drop)
    return done


def _add(g: onnx.GraphProto, t: onnx.TensorProto) -> onnx.TensorProto:
    """Move *t* into *g*'s initializers (its bytes copied once, then freed in *t*; appending
    the message would copy it and keep both); returns the stored one."""
    stored = g.initializer.add()
    stored.name, stored.data_type = t.name, t.data_type
    stored.dims.extend(t.dims)
    stored.raw_data = t.raw_data
    t.ClearField("raw_data")
    return stored


def check_settings(
    source: dict[str, Any], block_size: int, accuracy_level: int, lm_head: bool | int | None
):
    """Refuse settings the quantised source does not have (no float weights to redo it);
    *lm_head* None: whatever the source did."""
    name = source.get("file", "the quantised decoder")
    bits = source.get("bits")
    have = {
        "--block-size": (source.get("block_size"), block_size),
        "--accuracy-level": (source.get("accuracy_level") or 0, accuracy_level),
    }
    if lm_head is not None:
        src_head = recorded_head_bits(source.get("weights", {}), bits)
        have["--lm-head"] = (_head(src_head), _head(head_bits(lm_head, bits)))
    for flag, (src, asked) in have.items():
        if src != asked:
            raise InputError(
                f"{name} was quantised with {flag.lstrip('-')} {src}, not {asked}; this "
                "artifact has no float decoder to quantise again, so its fused forms keep "
                f"the source's settings (leave {flag} out, or re-export with it)"
            )


def _head(bits: int | None) -> str:
    return "fp32" if bits is None else f"int{bits}"


def optimize_quantised(
    root: Path,
    manifest: dict[str, Any],
    bits: tuple[int | None, ...],
    forms: tuple[str, ...],
    tag: str,
    external_data_threshold: int,
    block_size: int,
    accuracy_level: int,
    lm_head: bool | int | None,
) -> dict[str, dict[str, Any]]:
    """The fused forms of an artifact with no float decoder, from its MatMulNBits
    variants (export/fuse_nbits.py)."""
    if None in bits or forms != (FUSED,):
        raise InputError(
            f"{root} has no float decoder (a layer-streamed export): only the fused forms "
            "of its int4/int8 variants can be made (--int4/--int8, without --contrib)"
        )
    variants = manifest.get("variants", {}).get(DECODER, {})
    records: dict[str, dict[str, Any]] = {}
    for b in bits:
        src = variants.get(f"int{b}")
        if src is None or src.get("form") != "nbits":
            raise InputError(
                f"{root} has no int{b} MatMulNBits decoder to fuse; export it with "
                f"`python -m export onnx CKPT {root} --stream --decoders int{b}`"
            )
        check_settings(src, block_size, accuracy_level, lm_head)
        model = onnx.load(str(root / src["file"]))
        head_out = text_head_output(model)
        packed = pack_matmulnbits(model)
        fold_shapes(model)
        gate_text_head(model, head_out)
        name, file = fused_name(b, tag), fused_file(b, tag)
        records[name] = {k: v for k, v in src.items() if k not in NOT_INHERITED} | {
            "form": FUSED,
            "runtime": "onnxruntime",
            "also_runs_on": [],
            "rewrites": list(REWRITES),
            "packed": packed,
            "extra_inputs": [{"name": TEXT_HEAD_INPUT, "dtype": "bool", "shape": []}],
            "opset": _opset(model),
            "file": file,
            "files": _save(model, root, file, external_data_threshold),
            "source": {"file": src["file"], "sha256": src["files"][src["file"]]["sha256"]},
            "tools": {"onnxruntime": ort.__version__, "onnx": onnx.__version__},
        }
        del model
    _update_manifest(root, records)
    return records
