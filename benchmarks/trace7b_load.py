"""Helpers of ``benchmarks/trace7b.py`` that run in their own process.

- ``python -m benchmarks.trace7b_load ART VARIANT default|no-prepack``: load one quantised
  decoder into an onnxruntime session (the options the onnxruntime backend uses, plus
  ``session.disable_prepacking`` for ``no-prepack``) and print one JSON line: load time,
  peak RSS (VmHWM) during the load, RSS once loaded, the weights' bytes on disk, and the
  time of a decode step (one position, past 0) after one warm-up.
- ``python -m benchmarks.trace7b_load quantize SRC.gguf OUT.gguf Q4_0|Q8_0``:
  ``llama_model_quantize`` with llama-quantize's defaults.
- ``GgufQ4_0`` / ``GgufQ8_0``: the bench's llama.cpp peers reading ready-made GGUF files
  (``model-Q4_0.gguf`` in the model directory) instead of converting an F32 GGUF (30 GB at
  7B, more than this disk holds next to the rest) through the peers' cache.
"""

from __future__ import annotations

import ctypes
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.peers.llamacpp import LlamaCppQ4_0, LlamaCppQ8_0, _llama_cpp, cpu_threads
from trace_rt.bench.machine import peak_rss_mb, reset_peak_rss, status_mb


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (``VmRSS``; ``RssAnon``: allocated, e.g. prepacked
    weights; ``RssFile``: pages of mapped files, e.g. memory-mapped external data)."""
    mb = status_mb(field)
    return float("nan") if mb is None else round(mb, 1)


def load_check(art: Path, variant: str, mode: str) -> dict:
    import onnxruntime as ort

    from trace_rt.config import TraceConfig
    from trace_rt.graphs import MANIFEST_FILE

    manifest = json.loads((art / MANIFEST_FILE).read_text())
    rec = manifest["variants"]["decoder"][variant]
    cfg = TraceConfig.from_dir(art)
    so = ort.SessionOptions()  # as trace_rt/backends/onnxruntime_backend.py sets them
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if mode == "no-prepack":
        so.add_session_config_entry("session.disable_prepacking", "1")
    base = rss_mb()
    reset_peak_rss()
    t = time.perf_counter()
    sess = ort.InferenceSession(str(art / rec["file"]), so, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t
    peak, settled = peak_rss_mb(), rss_mb()
    anon, mapped = rss_mb("RssAnon"), rss_mb("RssFile")
    kv, hd = cfg.num_key_value_heads, cfg.attn_head_dim
    feeds = {
        "inputs_embeds": np.zeros((1, 1, cfg.hidden_size), np.float32),
        "position_ids": np.zeros((1, 1), np.int64),
    }
    for i in range(cfg.num_hidden_layers):
        for n in (f"past_key.{i}", f"past_value.{i}"):
            feeds[n] = np.zeros((0, 1, kv, hd), np.float32)
    times = []
    for _ in range(2 if mode == "no-prepack" else 4):  # no-prepack steps are slow
        t = time.perf_counter()
        sess.run(["logits"], feeds)
        times.append((time.perf_counter() - t) * 1e3)
    return {
        "variant": variant,
        "mode": mode,
        "load_s": round(load_s, 2),
        "weights_mb": round(sum(f["bytes"] for f in rec["files"].values()) / 2**20, 1),
        "rss_before_mb": base,
        "peak_rss_load_mb": peak,
        "rss_loaded_mb": settled,
        "rss_anon_loaded_mb": anon,
        "rss_file_loaded_mb": mapped,
        "peak_rss_mb": peak_rss_mb(),
        "step_ms_p50": round(statistics.median(times[1:]), 1),
        "steps_timed": len(times) - 1,
    }


def quantize_gguf(src: Path, out: Path, kind: str) -> None:
    lc = _llama_cpp()
    params = lc.llama_model_quantize_default_params()
    params.ftype = {"Q8_0": lc.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": lc.LLAMA_FTYPE_MOSTLY_Q4_0}[kind]
    params.nthread = cpu_threads()
    tmp = out.with_name(f".{out.name}.partial")
    rc = lc.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        raise RuntimeError(f"llama_model_quantize({src.name} -> {out.name}) returned {rc}")
    tmp.replace(out)


class _ReadyGguf:
    """Mixin: the GGUF lies in the model directory (made by benchmarks/trace7b.py)."""

    gguf_type = "Q4_0"

    @classmethod
    def prepare(cls, model_dir: str | Path) -> Path:
        path = Path(model_dir) / f"model-{cls.gguf_type}.gguf"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run benchmarks/trace7b.py --stages peers")
        return path


class GgufQ4_0(_ReadyGguf, LlamaCppQ4_0):
    gguf_type = "Q4_0"


class GgufQ8_0(_ReadyGguf, LlamaCppQ8_0):
    gguf_type = "Q8_0"


def main(argv: list[str]) -> int:
    if argv[0] == "quantize":
        quantize_gguf(Path(argv[1]), Path(argv[2]), argv[3])
        return 0
    print(json.dumps(load_check(Path(argv[0]), argv[1], argv[2])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
