"""The peers' model files, made once per checkpoint and kept in a cache.

Every peer starts from the same plain HF Mistral directory (``python -m export hf-llm``)
and converts it with its engine's own tool. The results are kept under
``$TRACE_RT_PEERS_CACHE`` (default ``~/.cache/trace-rt/peers``) in a directory per
checkpoint, keyed by its config, tokenizer and weight files (name, size, mtime), so a
changed checkpoint gets new files and a repeated bench converts nothing. Each file or
directory is built under a temporary name and renamed in when complete: an interrupted
conversion leaves nothing that looks finished.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

CACHE_ENV = "TRACE_RT_PEERS_CACHE"
HF_LLM = "hf-llm"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "trace-rt" / "peers")


def checkpoint_key(ckpt: Path) -> str:
    """A short digest of what the peers' files are made from."""
    h = hashlib.sha256()
    for name in ("config.json", "tokenizer.model"):
        f = ckpt / name
        h.update(name.encode() + (f.read_bytes() if f.is_file() else b"-"))
    for f in sorted(ckpt.glob("model*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def checkpoint_cache(ckpt: Path) -> Path:
    d = cache_root() / f"{ckpt.resolve().name}-{checkpoint_key(ckpt)}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def built(target: Path, build: Callable[[Path], None]) -> Path:
    """*target*, made by ``build(tmp)`` under a temporary name first when it is missing."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as tmp:
        staged = Path(tmp) / target.name
        build(staged)
        if not target.exists():  # another process may have finished first: keep its copy
            os.replace(staged, target)
    return target


def hf_llm_dir(ckpt: Path) -> Path:
    """The checkpoint's LLM as a plain HF Mistral directory (made once)."""
    from export.hf_llm import export_hf_llm  # torch: only when converting

    return built(checkpoint_cache(ckpt) / HF_LLM, lambda out: export_hf_llm(ckpt, out))


def run_tool(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    """Run a conversion tool; a failure raises RuntimeError with the end of its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-6:]
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): " + " | ".join(tail))
