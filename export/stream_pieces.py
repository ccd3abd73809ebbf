"""The pieces of a layer-streamed decoder (``export/stream.py``), traced from our model code.

- :func:`trace_prologue`: ``decode_setup`` (RoPE tables, causal and past masks);
- :func:`trace_layer`: ``layer_step`` of one layer;
- :func:`trace_head`: ``decode_logits`` (final norm, every head).

Tracing a 7B layer (TorchScript exporter, constant folding) costs far more than reading
and quantising its weights, and every layer's graph is the same but for its weights, so
:class:`LayerTemplate` traces one layer once -- with distinct random values in every
parameter, so each initializer is found again by value (the weight or its transpose;
the exporter folds ``Linear``'s transpose and merges equal initializers, which distinct
values rule out) -- and builds each real layer from it by substituting that layer's
weights. Where an initializer cannot be traced back to one parameter the template is
refused and each layer is traced on its own (:func:`LayerTemplate.try_make`).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import Tensor, nn

from trace_rt.config import TraceConfig
from trace_rt.model.decode import decode_logits, decode_setup, layer_step
from trace_rt.model.mistral import DecoderLayer
from trace_rt.model.trace import TraceModel

_EX = {"seq": 3, "batch": 2, "past": 5}  # tracing sizes: distinct, > 1 (export/wrappers.py)
LAYER_KV = ("past_k", "past_v", "k_out", "v_out")


class Prologue(nn.Module):
    def __init__(self, cfg: TraceConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, inputs_embeds: Tensor, position_ids: Tensor, past_k0: Tensor):
        return decode_setup(self.cfg, inputs_embeds, position_ids, past_k0)


class LayerPiece(nn.Module):
    def __init__(self, layer: DecoderLayer):
        super().__init__()
        self.layer = layer

    def forward(self, x, cos, sin, causal, past_bias, past_k, past_v):
        return layer_step(self.layer, x, cos, sin, causal, past_k, past_v, past_bias)


class Head(nn.Module):
    def __init__(self, shell: TraceModel):
        super().__init__()
        self.shell = shell

    def forward(self, x: Tensor) -> Tensor:
        return decode_logits(self.shell, x)


SHARED = ["rope_cos", "rope_sin", "causal_mask", "past_mask"]


def _trace(module: nn.Module, args: tuple, names_in, names_out, axes, opset) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer notes on shape ints, as in onnx_export
        torch.onnx.export(
            module,
            args,
            buf,
            input_names=names_in,
            output_names=names_out,
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return onnx.load_from_string(buf.getvalue())


def _examples(cfg: TraceConfig) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    t, b, p = _EX["seq"], _EX["batch"], _EX["past"]
    kv, hd, h = cfg.num_key_value_heads, cfg.attn_head_dim, cfg.hidden_size
    emb = torch.randn(b, t, h, generator=g)
    pos = torch.arange(b)[:, None].clamp(max=p) + p - b + 1 + torch.arange(t)[None]
    past = torch.randn(p, b, kv, hd, generator=g)
    return {"emb": emb, "pos": pos, "past": past}


def trace_prologue(cfg: TraceConfig, opset: int) -> onnx.ModelProto:
    ex = _examples(cfg)
    axes = {
        "inputs_embeds": {0: "batch", 1: "seq"},
        "position_ids": {0: "batch", 1: "seq"},
        "past_key.0": {0: "past", 1: "batch"},
    }
    return _trace(
        Prologue(cfg),
        (ex["emb"], ex["pos"], ex["past"]),
        ["inputs_embeds", "position_ids", "past_key.0"],
        ["hidden.0", *SHARED],
        axes,
        opset,
    )


def trace_layer(layer: DecoderLayer, cfg: TraceConfig, opset: int) -> onnx.ModelProto:
    """One layer's graph; its K/V inputs and outputs are named ``LAYER_KV`` (stitching
    maps them onto the layer's spec names)."""
    ex = _examples(cfg)
    x, cos, sin, causal, past_bias = decode_setup(cfg, ex["emb"], ex["pos"], ex["past"])
    pk, pv, nk, nv = LAYER_KV
    past_axes = {0: "past", 1: "batch"}
    axes = {
        "x": {0: "seq", 1: "batch"},
        "rope_cos": {0: "seq", 1: "batch"},
        "rope_sin": {0: "seq", 1: "batch"},
        "causal_mask": {0: "seq", 1: "seq"},
        "past_mask": {0: "batch", 1: "past"},
        pk: past_axes,
        pv: past_axes,
        "x_out": {0: "seq", 1: "batch"},
        nk: {0: "seq", 1: "batch"},
        nv: {0: "seq", 1: "batch"},
    }
    args = (x, cos, sin, causal, past_bias, ex["past"], ex["past"].flip(0))
    return _trace(LayerPiece(layer), args, ["x", *SHARED, pk, pv], ["x_out", nk, nv], axes, opset)


def trace_head(shell: TraceModel, opset: int) -> onnx.ModelProto:
    h = torch.randn(_EX["seq"], _EX["batch"], shell.config.hidden_size)
    axes = {"x": {0: "seq", 1: "batch"}, "logits": {0: "batch"}}
    return _trace(Head(shell), (h,), ["x"], ["logits"], axes, opset)


class LayerTemplate:
    """One traced layer graph, weights stripped, and where each weight comes from."""

    def __init__(self, graph: onnx.ModelProto, sources: dict[str, tuple[str, bool]]):
        self.graph = graph  # no weight initializers
        self.sources = sources  # initializer -> (parameter name, transposed)

    @classmethod
    def try_make(cls, cfg: TraceConfig, opset: int) -> tuple[LayerTemplate | None, str]:
        """(template, "") or (None, why not)."""
        with torch.device("meta"):
            layer = DecoderLayer(cfg)
        layer = layer.to_empty(device="cpu").eval()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.rand(p.shape, generator=g) + 1.0)
        piece = trace_layer(layer, cfg, opset)
        params = {n: p.detach().numpy() for n, p in layer.named_parameters()}
        sources: dict[str, tuple[str, bool]] = {}
        kept = []
        for t in piece.graph.initializer:
            a = numpy_helper.to_array(t)
            src = _source(a, params)
            if src is not None:
                sources[t.name] = src
            elif a.size > 64:
                return None, f"initializer {t.name} {list(a.shape)} is no layer weight"
            else:
                kept.append(t)  # a folded shape constant
        if missing := set(params) - {n for n, _ in sources.values()}:
            return None, f"weights {sorted(missing)} not found in the traced layer"
        piece.graph.ClearField("initializer")
        piece.graph.initializer.extend(kept)
        return cls(piece, sources), ""

    def build(self, layer: DecoderLayer) -> onnx.ModelProto:
        """The template with *layer*'s weights."""
        m = onnx.ModelProto()
        m.CopyFrom(self.graph)
        params = dict(layer.named_parameters())
        for name, (pname, transposed) in self.sources.items():
            w = params[pname].detach().numpy()
            m.graph.initializer.append(
                numpy_helper.from_array(np.ascontiguousarray(w.T if transposed else w), name)
            )
        return m


def _source(a: np.ndarray, params: dict[str, np.ndarray]) -> tuple[str, bool] | None:
    for n, w in params.items():
        if a.shape == w.shape and np.array_equal(a, w):
            return n, False
        if a.ndim == 2 and a.shape == w.shape[::-1] and np.array_equal(a, w.T):
            return n, True
    return None
