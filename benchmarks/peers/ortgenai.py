"""onnxruntime-genai as a peer: its model builder's graphs on the CPU execution provider.

``python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p fp32|int4 -e cpu`` on the
checkpoint's ``hf-llm`` directory, with the builder's defaults (what a user of that engine
gets: GroupQueryAttention, fused QKV, MatMulNBits for int4, ``lm_head`` quantised too);
greedy search through its ``Generator``. ``append_tokens`` runs the prompt; the first
``generate_next_token`` only picks from those logits, each later one runs a step and picks.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.peers import files
from benchmarks.peers.base import Peer

INSTALL = "pip install -e '.[peers]' (onnxruntime-genai)"


def _og():
    try:
        import onnxruntime_genai
    except ImportError as e:
        raise ImportError(f"onnxruntime-genai is not installed: {INSTALL} ({e})") from e
    return onnxruntime_genai


class OrtGenai(Peer):
    """onnxruntime-genai, fp32 graphs from its model builder."""

    name = "ort-genai"
    precision = "fp32"
    builder_precision = "fp32"

    def __init__(self, model_dir: str | Path, device: str = "cpu"):
        og = _og()
        super().__init__(model_dir, device)
        self.path = self.prepare(self.model_dir)
        self.model = og.Model(str(self.path))
        self.weight_bytes = float(weight_bytes(self.path / "model.onnx"))
        self._og = og
        self._gen = None

    @classmethod
    def prepare(cls, model_dir: str | Path) -> Path:
        og = _og()
        ckpt = Path(model_dir)
        hf = files.hf_llm_dir(ckpt)
        out = files.checkpoint_cache(ckpt) / f"ort-genai-{og.__version__}-{cls.builder_precision}"

        def build(tmp: Path) -> None:
            cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf)]
            cmd += ["-o", str(tmp), "-p", cls.builder_precision, "-e", "cpu"]
            cmd += ["-c", str(tmp.parent / "builder-cache")]
            files.run_tool(cmd, f"onnxruntime-genai's model builder ({cls.builder_precision})")

        return files.built(out, build)

    def prefill(self, ids: Sequence[int], max_new_tokens: int) -> int:
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
        self._gen = self._og.Generator(self.model, params)  # a fresh cache per request
        self._gen.append_tokens(np.asarray(ids, dtype=np.int32))
        self._gen.generate_next_token()  # picks from the prompt's logits
        return int(self._gen.get_next_tokens()[0])

    def decode_step(self, token_id: int) -> int:
        if self._gen is None:
            raise RuntimeError("decode_step before prefill")
        self._gen.generate_next_token()  # feeds the token it picked last, then picks
        return int(self._gen.get_next_tokens()[0])


def weight_bytes(graph: Path) -> int:
    """Bytes of the graph's initializers a decode step reads: all but the token-embedding
    table, of which a step gathers one row (the bench's floor counts weights the same way)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        if "embed_tokens" in init.name:
            continue
        ext = {e.key: e.value for e in init.external_data}
        if "length" in ext:
            total += int(ext["length"])
        else:
            n = int(np.prod(init.dims)) if init.dims else 1
            total += (
                len(init.raw_data)
                or n * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
            )
    return total


class OrtGenaiInt4(OrtGenai):
    """onnxruntime-genai, int4 graphs from its model builder (its defaults)."""

    name = "ort-genai-int4"
    precision = "int4"
    builder_precision = "int4"
