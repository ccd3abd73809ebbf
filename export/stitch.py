"""Stitching layer-streamed decoder pieces into one ONNX graph with external data.

Each piece (``export/stream.py``: prologue, one per layer, head) is a small ONNX model
traced on its own. :func:`rename` prefixes its internal names so pieces never collide and
maps its inputs/outputs onto the tensors that connect them; :class:`GraphWriter` appends
its weights to the decoder's external-data file at once (page-aligned offsets, so
onnxruntime can memory-map them) and keeps only the graph structure in memory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper, numpy_helper

from export.files import new_file
from trace_rt.config import TraceConfig
from trace_rt.graphs import decoder_spec, sha256_file

ALIGN = 65536  # external-data offsets: page- and allocation-granularity aligned (mmap)
INLINE_BYTES = 1024  # smaller tensors stay in the graph file


def rename(model: onnx.ModelProto, prefix: str, io: dict[str, str]) -> onnx.GraphProto:
    """*model*'s graph with every tensor and node name prefixed, except those in *io*
    (mapped to their new names); graph inputs/outputs are dropped (the stitched graph's
    are the spec's)."""
    g = model.graph

    def f(name: str) -> str:
        return name if not name else io.get(name, prefix + name)

    for node in g.node:
        node.name = prefix + (node.name or node.op_type)
        node.input[:] = [f(n) for n in node.input]
        node.output[:] = [f(n) for n in node.output]
    for t in g.initializer:
        t.name = f(t.name)
    for v in g.value_info:
        v.name = f(v.name)
    return g


class GraphWriter:
    """One stitched decoder: nodes collected in memory, weights appended to its data file."""

    def __init__(self, stage: Path, file: str):
        self.file, self.data = file, f"{file}.data"
        self.path = stage / file
        self._fh = (stage / self.data).open("wb")
        self._sha = hashlib.sha256()
        self.offset = 0
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self.opsets: dict[str, int] = {}
        self.ir_version = 0

    def add(self, model: onnx.ModelProto, prefix: str, io: dict[str, str]) -> None:
        for o in model.opset_import:
            self.opsets[o.domain] = max(self.opsets.get(o.domain, 0), o.version)
        self.ir_version = max(self.ir_version, model.ir_version)
        g = rename(model, prefix, io)
        # Fresh copies, not references: a sub-message keeps its whole model's memory
        # (protobuf arena) alive, weights included, even after its field is cleared.
        self.inits.extend(self._externalise(t) for t in g.initializer)
        self.nodes.extend(_copy(onnx.NodeProto, n) for n in g.node)
        self.value_info.extend(_copy(onnx.ValueInfoProto, v) for v in g.value_info)

    def _externalise(self, t: TensorProto) -> TensorProto:
        """A copy of *t*; past INLINE_BYTES its bytes go to the data file instead."""
        if not t.HasField("raw_data"):
            t = numpy_helper.from_array(numpy_helper.to_array(t), t.name)
        if len(t.raw_data) < INLINE_BYTES:
            return _copy(TensorProto, t)
        self._write(b"\0" * (-self.offset % ALIGN))
        start, length = self.offset, len(t.raw_data)
        self._write(t.raw_data)
        out = TensorProto(name=t.name, dims=t.dims, data_type=t.data_type)
        out.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.data), ("offset", start), ("length", length)):
            e = out.external_data.add()
            e.key, e.value = k, str(v)
        return out

    def _write(self, b: bytes) -> None:
        self._fh.write(b)
        self._sha.update(b)
        self.offset += len(b)

    def finish(self, spec_inputs, spec_outputs, doc: str) -> dict[str, dict[str, Any]]:
        """Write the graph file; returns the manifest's {file: {role, sha256, bytes}}."""
        self._fh.close()
        graph = helper.make_graph(
            self.nodes, "trace_rt_decoder", spec_inputs, spec_outputs, self.inits
        )
        graph.value_info.extend(self.value_info)
        opsets = [helper.make_opsetid(d, v) for d, v in sorted(self.opsets.items())]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="trace-rt stream")
        model.ir_version = self.ir_version
        model.doc_string = doc
        with new_file(self.path) as tmp:
            tmp.write_bytes(model.SerializeToString())
        return {
            self.file: {
                "role": "graph",
                "sha256": sha256_file(self.path),
                "bytes": self.path.stat().st_size,
            },
            self.data: {
                "role": "external_data",
                "sha256": self._sha.hexdigest(),
                "bytes": self.offset,
            },
        }


def spec_value_infos(cfg: TraceConfig) -> tuple[list, list]:
    spec = decoder_spec(cfg, "fp32")
    types = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64}

    def vi(t):
        return helper.make_tensor_value_info(t.name, types[t.dtype], list(t.shape))

    return [vi(t) for t in spec.inputs], [vi(t) for t in spec.outputs]


def _copy(cls, msg):
    new = cls()
    new.CopyFrom(msg)
    return new
