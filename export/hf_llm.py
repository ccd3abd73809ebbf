"""``python -m export hf-llm``: a TRACE checkpoint's LLM as a plain HF Mistral directory.

What other engines take (onnxruntime-genai's model builder, llama.cpp's
``convert_hf_to_gguf.py``, transformers' ``MistralForCausalLM``): ``config.json`` of
``model_type: mistral``, safetensors with ``model.embed_tokens``, ``model.layers.*``,
``model.norm`` and ``lm_head``, and the tokenizer files. The TRACE parts (vision tower,
projector, time/score/sync towers and heads) are left out: such a directory generates
text only, from text ids, which is what the bench's peers run.

Weights are streamed one tensor at a time from the checkpoint's shards into shards of at
most ``max_shard_bytes``, so a 7B checkpoint never sits in memory whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from trace_rt.config import TraceConfig
from trace_rt.errors import CheckpointError
from trace_rt.model.checkpoint import (
    INDEX_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    iter_tensors,
    torch_dtype,
    weight_files,
)

_LLM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
_META = {"format": "pt"}


def llm_config(cfg: TraceConfig, dtype: torch.dtype) -> dict:
    """The ``config.json`` of ``MistralForCausalLM`` for *cfg*'s decoder."""
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.attn_head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "sliding_window": cfg.sliding_window,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": {torch.float32: "float32", torch.float16: "float16"}.get(dtype, "bfloat16"),
    }


def _tokenizer_files(cfg: TraceConfig) -> dict[str, dict]:
    """The slow Llama tokenizer over ``tokenizer.model`` (what Mistral v0.2 ships)."""
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "model_max_length": cfg.max_position_embeddings,
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    generation = {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "do_sample": False,
    }
    return {
        "tokenizer_config.json": config,
        "special_tokens_map.json": special,
        "generation_config.json": generation,
    }


def _llm_tensors(ckpt: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for name, t in iter_tensors(weight_files(ckpt)):
        if name.startswith(_LLM_PREFIXES) and not name.endswith("rotary_emb.inv_freq"):
            yield name, t.to(dtype).contiguous()


def export_hf_llm(
    checkpoint: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    on_tensor: Callable[[str], None] | None = None,
) -> Path:
    """Write *checkpoint*'s LLM (text embeddings, layers, norm, ``lm_head``) and tokenizer
    to *out* as a ``MistralForCausalLM`` directory; returns *out*.

    Args:
        checkpoint: HF-format TRACE checkpoint.
        out: directory to write (created; its files are replaced, others left alone).
        dtype: fp32 / fp16 / bf16; default: the checkpoint's ``torch_dtype``.
        max_shard_bytes: largest safetensors shard.
        on_tensor: called with each weight's name as it is written (progress).

    Raises:
        CheckpointError: the checkpoint lacks a decoder weight or its tokenizer.
    """
    ckpt, out = Path(checkpoint), Path(out)
    cfg = TraceConfig.from_dir(ckpt)
    dt = torch_dtype(dtype or cfg.torch_dtype)
    if not (ckpt / TOKENIZER_FILE).is_file():
        raise CheckpointError(f"{ckpt}: no {TOKENIZER_FILE} to give the LLM directory")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".hf-llm-", dir=out) as tmp:
        names = _write_shards(Path(tmp), _llm_tensors(ckpt, dt), max_shard_bytes, on_tensor)
        _check_complete(cfg, names)
        for old in [*out.glob("model*.safetensors"), out / INDEX_FILE]:
            old.unlink(missing_ok=True)
        for f in Path(tmp).iterdir():
            f.replace(out / f.name)
    (out / "config.json").write_text(json.dumps(llm_config(cfg, dt), indent=2) + "\n")
    for name, doc in _tokenizer_files(cfg).items():
        (out / name).write_text(json.dumps(doc, indent=2) + "\n")
    shutil.copyfile(ckpt / TOKENIZER_FILE, out / TOKENIZER_FILE)
    return out


def _write_shards(
    tmp: Path,
    tensors: Iterator[tuple[str, torch.Tensor]],
    max_shard_bytes: int,
    on_tensor: Callable[[str], None] | None,
) -> dict[str, str]:
    """Shards into *tmp* under their final names (+ the index when several); returns
    {weight name: shard file}."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    files: list[Path] = []

    def flush() -> None:
        files.append(tmp / f"part-{len(files)}.safetensors")
        save_file(shards[-1], str(files[-1]), metadata=_META)

    shard_of: dict[str, int] = {}
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            flush()
            shards.append({})
            size = 0
        shards[-1][name] = t
        shard_of[name] = len(files)
        size += nbytes
        if on_tensor:
            on_tensor(name)
    flush()
    n = len(files)
    finals = (
        [WEIGHTS_FILE]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    mask = os.umask(0)
    os.umask(mask)
    for f, final in zip(files, finals, strict=True):
        f.chmod(0o666 & ~mask)  # safetensors writes 0600; published files get the usual mode
        f.replace(tmp / final)
    weight_map = {k: finals[i] for k, i in sorted(shard_of.items())}
    if n > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def _check_complete(cfg: TraceConfig, names: dict[str, str]) -> None:
    """Every decoder weight the config implies is there (a truncated checkpoint fails
    here, not in the engine that loads the directory)."""
    want = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    per_layer = (
        *(f"self_attn.{p}_proj.weight" for p in "qkvo"),
        *(f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
    )
    for i in range(cfg.num_hidden_layers):
        want.update(f"model.layers.{i}.{w}" for w in per_layer)
    missing = sorted(want - set(names))
    if missing:
        shown = ", ".join(missing[:6]) + (
            f" ... ({len(missing)} in all)" if len(missing) > 6 else ""
        )
        raise CheckpointError(f"checkpoint lacks decoder weights: {shown}")
