"""llama.cpp as a peer, through llama-cpp-python (compiled from source, all CPU cores).

The GGUF files come from the checkpoint's ``hf-llm`` directory the way llama.cpp's users
make them: F32 with llama.cpp's own ``convert_hf_to_gguf.py`` (the copy that
llama-cpp-python's source distribution carries, so converter and library are the same
llama.cpp; unpacked by ``python -m benchmarks.peers converter``), Q8_0 and Q4_0 from the
F32 file with ``llama_model_quantize`` (llama-quantize's defaults, e.g. ``output.weight``
in Q6_K for Q4_0 where the row length allows).

The model and context are llama-cpp-python's ``Llama`` with its defaults (n_batch 512, f16
KV cache, flash attention off) and ``n_threads`` = ``n_threads_batch`` = the CPUs this
process may use; requests are driven through llama.cpp's own C API (``llama_decode`` on
``llama_batch_get_one``, then the argmax of the last position's logits read in place), so
no Python work is added per step beyond those calls.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.peers import files
from benchmarks.peers.base import Peer

INSTALL = (
    "pip install -e '.[peers]' with CMAKE_ARGS=-DGGML_NATIVE=ON (compiles llama-cpp-python), "
    "then python -m benchmarks.peers converter"
)
CONVERTER_ENV = "LLAMA_CPP_CONVERTER"  # a convert_hf_to_gguf.py to use instead
MAX_CTX = 8192
# Bytes per weight of token_embd.weight in each file type (llama-quantize keeps the
# file's type for it: Q8_0 and Q4_0 blocks of 32 weights with one fp16 scale).
EMBD_BYTES = {"F32": 4.0, "Q8_0": 34 / 32, "Q4_0": 18 / 32}


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError(f"llama-cpp-python is not installed: {INSTALL} ({e})") from e
    return llama_cpp


def converter_dir(version: str) -> Path:
    """Where ``python -m benchmarks.peers converter`` unpacks llama.cpp's converter for
    llama-cpp-python *version* (inside the environment: it belongs to that install)."""
    return Path(sys.prefix) / "share" / "trace-rt-peers" / f"llama.cpp-{version}"


def converter(version: str) -> Path:
    """``convert_hf_to_gguf.py`` matching llama-cpp-python *version*.

    Raises:
        ImportError: it was never unpacked (the bench reports the peer as skipped, with
            the command that fixes it).
    """
    if os.environ.get(CONVERTER_ENV):
        return Path(os.environ[CONVERTER_ENV])
    script = converter_dir(version) / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise ImportError(
            f"llama.cpp's convert_hf_to_gguf.py for llama-cpp-python {version} is not "
            f"unpacked: run python -m benchmarks.peers converter (or set {CONVERTER_ENV})"
        )
    return script


def cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class LlamaCpp(Peer):
    """llama.cpp on an F32 GGUF (no quantisation)."""

    name = "llama.cpp"
    precision = "fp32"
    gguf_type = "F32"

    def __init__(self, model_dir: str | Path, device: str = "cpu"):
        lc = _llama_cpp()
        super().__init__(model_dir, device)
        self.path = self.prepare(self.model_dir)
        threads = cpu_threads()
        self.llm = lc.Llama(
            model_path=str(self.path),
            n_ctx=min(self.config.max_position_embeddings, MAX_CTX),
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self.n_batch = self.llm.n_batch
        # The weights a decode step reads: all tensors but the token-embedding table (one
        # row of it is gathered), as the bench's floor counts them.
        embd = self.config.vocab_size * self.config.hidden_size * EMBD_BYTES[self.gguf_type]
        self.weight_bytes = float(lc.llama_model_size(self.llm.model) - embd)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.llm.model))
        self._lc = lc

    @classmethod
    def prepare(cls, model_dir: str | Path) -> Path:
        lc = _llama_cpp()
        ckpt = Path(model_dir)
        base = files.checkpoint_cache(ckpt) / f"llama.cpp-{lc.__version__}"
        f32 = files.built(base / "model-F32.gguf", lambda out: _convert(ckpt, out, lc))
        if cls.gguf_type == "F32":
            return f32
        ftype = {"Q8_0": lc.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": lc.LLAMA_FTYPE_MOSTLY_Q4_0}
        return files.built(
            base / f"model-{cls.gguf_type}.gguf",
            lambda out: _quantize(f32, out, ftype[cls.gguf_type], lc),
        )

    # ---- the peer protocol (trace_rt.bench.peer.LlmPeer) --------------------------------
    def prefill(self, ids: Sequence[int], max_new_tokens: int) -> int:
        lc, ctx = self._lc, self.llm.ctx
        if len(ids) + max_new_tokens > self.llm.n_ctx():
            raise RuntimeError(f"{len(ids)} + {max_new_tokens} positions exceed n_ctx")
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)  # a fresh cache per request
        for i in range(0, len(ids), self.n_batch):
            self._decode(ids[i : i + self.n_batch])
        return self._greedy()

    def decode_step(self, token_id: int) -> int:
        self._decode([token_id])
        return self._greedy()

    def _decode(self, ids: Sequence[int]) -> None:
        tokens = (self._lc.llama_token * len(ids))(*ids)
        rc = self._lc.llama_decode(self.llm.ctx, self._lc.llama_batch_get_one(tokens, len(ids)))
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _greedy(self) -> int:
        # The last position's logits, read in place: the same argmax our loop takes.
        logits = self._lc.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())


class LlamaCppQ8_0(LlamaCpp):
    """llama.cpp on a Q8_0 GGUF (8-bit blocks of 32)."""

    name = "llama.cpp-q8_0"
    precision = "int8"
    gguf_type = "Q8_0"


class LlamaCppQ4_0(LlamaCpp):
    """llama.cpp on a Q4_0 GGUF (4-bit blocks of 32)."""

    name = "llama.cpp-q4_0"
    precision = "int4"
    gguf_type = "Q4_0"


def _convert(ckpt: Path, out: Path, lc) -> None:
    script = converter(lc.__version__)
    cmd = [sys.executable, str(script), str(files.hf_llm_dir(ckpt))]
    cmd += ["--outfile", str(out), "--outtype", "f32"]
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # its own gguf-py
    files.run_tool(cmd, "llama.cpp's convert_hf_to_gguf.py", env=env)


def _quantize(src: Path, out: Path, ftype: int, lc) -> None:
    params = lc.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = cpu_threads()
    rc = lc.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0 or not out.is_file():
        raise RuntimeError(f"llama_model_quantize({src.name} -> {out.name}) returned {rc}")
