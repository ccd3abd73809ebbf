"""Peers of the bench: ``python -m export hf-llm`` against transformers, the peers' prompt,
plugin modules, speed-ups against the best peer, and each engine against transformers on
the same converted weights (when the peers extra is installed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.peers import PLUGINS
from benchmarks.peers import files as peer_files
from trace_rt.bench import plugins, summary
from trace_rt.bench.peer import peer_prompt
from trace_rt.config import TraceConfig
from trace_rt.tokens import VIDEO_PLACEHOLDER_ID

ENGINES = ("llama_cpp", "onnxruntime_genai")
# Text ids: BOS, "[INST]", a few words, the last text id, EOS, newline.
TEXT_IDS = [1, 733, 16289, 28793, 5, 99, 1000, 31999, 2, 13]


@pytest.fixture(scope="module")
def hf_llm(tiny_ckpt, tmp_path_factory) -> Path:
    from export.hf_llm import export_hf_llm

    return export_hf_llm(tiny_ckpt, tmp_path_factory.mktemp("hf-llm") / "tiny-llm")


@pytest.fixture
def peers_cache(tmp_path_factory, monkeypatch) -> Path:
    """The peers' converted files for this test session (not the user's cache)."""
    root = tmp_path_factory.getbasetemp() / "peers-cache"
    monkeypatch.setenv(peer_files.CACHE_ENV, str(root))
    return root


# ---- python -m export hf-llm -----------------------------------------------------------------
def test_hf_llm_is_a_mistral_that_transformers_loads_with_our_text_logits(tiny_ckpt, hf_llm):
    from transformers import MistralForCausalLM

    from trace_rt.model import load_model

    cfg = json.loads((hf_llm / "config.json").read_text())
    assert cfg["model_type"] == "mistral" and cfg["architectures"] == ["MistralForCausalLM"]
    assert {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"} <= {
        p.name for p in hf_llm.iterdir()
    }
    hf = MistralForCausalLM.from_pretrained(hf_llm).eval()
    names = set(hf.state_dict())
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    assert not any("vision" in n or "tower" in n or "time_head" in n for n in names)

    ours = load_model(tiny_ckpt, dtype="fp32")
    ids = torch.tensor([TEXT_IDS])
    with torch.no_grad():
        want = ours.lm_head(ours.forward_embeds(ours.embed(ids), torch.arange(ids.shape[1])))
        got = hf(ids).logits
    assert got.shape == (1, len(TEXT_IDS), 32000)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert float(want.abs().max()) > 0.1  # not a comparison of zeros


def test_hf_llm_refuses_a_checkpoint_without_a_decoder_weight(tiny_ckpt, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from export.hf_llm import export_hf_llm
    from trace_rt.errors import CheckpointError

    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, broken)
    sd = load_file(broken / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        export_hf_llm(broken, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.safetensors"))  # nothing half-written


def test_hf_llm_cli_shards_like_a_checkpoint(tiny_ckpt, tmp_path):
    from export.hf_llm import export_hf_llm

    out = export_hf_llm(tiny_ckpt, tmp_path / "llm", max_shard_bytes=4 * 2**20)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()


# ---- the peers' prompt -----------------------------------------------------------------------
def test_peer_prompt_has_our_positions_as_text_ids(tiny_ckpt):
    cfg = TraceConfig.from_dir(tiny_ckpt)
    ids = [1, 733, 16289, VIDEO_PLACEHOLDER_ID, 28705, 13, 5, 28793, cfg.ids.text_sync]
    out = peer_prompt(ids, 28, cfg)
    # The placeholder becomes 28 positions; every id is a text id the plain LLM embeds.
    assert len(out) == len(ids) - 1 + 28
    assert all(0 <= i < cfg.vocab_size for i in out)
    assert out[:3] == [1, 733, 16289] and out[31:35] == [28705, 13, 5, 28793]
    assert 1 not in out[3:31]  # fillers are the prompt's own text, never BOS
    with pytest.raises(ValueError, match="video placeholder"):
        peer_prompt([1, 733], 28, cfg)


# ---- plugin modules --------------------------------------------------------------------------
def test_a_plugin_module_registers_every_peer(monkeypatch):
    monkeypatch.delenv(plugins.ENV_VAR, raising=False)
    got = plugins.parse_plugins([plugins.PEERS_SPEC])
    assert got == PLUGINS and set(got) == plugins.PEER_NAMES
    specs, skipped = plugins.resolve(["llama.cpp", "ort-genai-int4"], [plugins.PEERS_SPEC])
    assert [s.target for s in specs] == [PLUGINS["llama.cpp"], PLUGINS["ort-genai-int4"]]
    assert all(s.plugin for s in specs) and not skipped
    # Asked for without the plugin module: skipped, saying how to get them.
    specs, skipped = plugins.resolve(["llama.cpp"], [])
    assert not specs and plugins.PEERS_SPEC in skipped["llama.cpp"]
    with pytest.raises(ValueError, match="cannot import"):
        plugins.parse_plugins(["benchmarks.no_such_module"])
    with pytest.raises(ValueError, match="no PLUGINS dict"):
        plugins.parse_plugins(["benchmarks.reference"])
    # The registry imports no engine (the bench imports it just to read the names).
    code = f"import sys, benchmarks.peers; print(*(m in sys.modules for m in {ENGINES}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# ---- speed-ups against the best peer ---------------------------------------------------------
def test_speedup_vs_best_peer_takes_the_fastest_peer_of_the_same_precision_per_invocation():
    def entry(precision, peer=False):
        return {"precision": precision, "peer": peer}

    entries = {
        "onnxruntime": entry("fp32"),
        "onnxruntime-int4": entry("int4"),
        "onnxruntime-int8": entry("int8"),
        "a": entry("fp32", True),
        "b": entry("fp32", True),
        "q4": entry("int4", True),
    }
    by_inv = {
        "onnxruntime": [
            {"prefill": 100.0, "decode_step": 10.0},
            {"prefill": 120.0, "decode_step": 8.0},
        ],
        "onnxruntime-int4": [
            {"prefill": 50.0, "decode_step": 4.0},
            {"prefill": 50.0, "decode_step": 4.0},
        ],
        "onnxruntime-int8": [{"prefill": 50.0, "decode_step": 4.0}, {}],
        # a is the faster peer in invocation 1, b in invocation 2 (decode step).
        "a": [{"prefill": 300.0, "decode_step": 9.0}, {"prefill": 240.0, "decode_step": 12.0}],
        "b": [{"prefill": 400.0, "decode_step": 11.0}, {"prefill": 360.0, "decode_step": 10.0}],
        "q4": [{"prefill": 100.0, "decode_step": 2.0}, {}],  # missed invocation 2
    }
    summary.add_peer_speedups(entries, by_inv)
    fp32 = entries["onnxruntime"]["speedup_vs_best_peer"]
    assert fp32["prefill"]["by_invocation"] == [3.0, 2.0] and fp32["prefill"]["peer"] == "a"
    assert fp32["decode_step"]["by_invocation"] == [0.9, 1.25]
    assert fp32["decode_step"]["value"] == pytest.approx(1.075)
    assert fp32["decode_step"]["spread"] == [0.9, 1.25]
    assert sorted(fp32["decode_step"]["peers"]) == ["a", "b"]
    int4 = entries["onnxruntime-int4"]["speedup_vs_best_peer"]
    assert int4["decode_step"]["by_invocation"] == [0.5, None]
    assert int4["decode_step"]["value"] == 0.5 and int4["decode_step"]["peer"] == "q4"
    assert entries["onnxruntime-int8"]["speedup_vs_best_peer"] is None  # no int8 peer
    assert "speedup_vs_best_peer" not in entries["a"]  # peers are not compared with peers


# ---- each engine on the converted weights, against transformers -----------------------------
def _hf_greedy(hf_dir: Path, ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    from transformers import MistralForCausalLM

    model = MistralForCausalLM.from_pretrained(hf_dir).eval()
    seq, tokens, first = list(ids), [], None
    with torch.no_grad():
        for _ in range(steps + 1):
            logits = model(torch.tensor([seq])).logits[0, -1]
            first = logits.numpy() if first is None else first
            tokens.append(int(logits.argmax()))
            seq.append(tokens[-1])
    return tokens, first


def _margin(logits: np.ndarray) -> float:
    top = np.sort(logits)[-2:]
    return float(top[1] - top[0])


@pytest.mark.parametrize("name", ["ort-genai", "llama.cpp"])
def test_fp32_peers_generate_what_transformers_does_on_the_same_weights(
    name, tiny_ckpt, peers_cache
):
    """The peers' files carry our weights: their greedy tokens on a text prompt are
    transformers' on the hf-llm directory they were converted from."""
    module, _, cls = PLUGINS[name].partition(":")
    pytest.importorskip(
        {"ort-genai": "onnxruntime_genai", "llama.cpp": "llama_cpp"}[name],
        reason=f"{name}: the peers extra is not installed (pip install -e '.[peers]')",
    )
    import importlib

    peer_cls = getattr(importlib.import_module(module), cls)
    try:
        peer = peer_cls(tiny_ckpt)
    except ImportError as e:  # llama.cpp's converter not unpacked
        pytest.skip(str(e))
    ids = TEXT_IDS[:-2] * 6
    want, logits = _hf_greedy(peer_files.hf_llm_dir(tiny_ckpt), ids, 6)
    got = [peer.prefill(ids, 7)]
    for _ in range(6):
        got.append(peer.decode_step(got[-1]))
    assert _margin(logits) > 1e-3  # the first pick is not a near-tie of random weights
    assert got[0] == want[0]
    # llama.cpp keeps its KV cache in f16 (its default): later picks may flip on near-ties.
    agree = sum(a == b for a, b in zip(got, want, strict=True))
    assert agree == len(want) if name == "ort-genai" else agree >= len(want) - 2


def test_converter_is_unpacked_from_the_sdist_alone(tmp_path):
    """Only llama.cpp's converter, its conversion package and gguf-py leave the sdist."""
    import io
    import tarfile

    from benchmarks.peers.__main__ import unpack_converter

    def sdist(path: Path, names: list[str]) -> Path:
        with tarfile.open(path, "w:gz") as tar:
            for name in names:
                data = f"# {name}\n".encode()
                info = tarfile.TarInfo(f"llama_cpp_python-9.9/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path

    root = "vendor/llama.cpp/"
    good = sdist(
        tmp_path / "good.tar.gz",
        [
            f"{root}convert_hf_to_gguf.py",
            f"{root}conversion/llama.py",
            f"{root}gguf-py/gguf/__init__.py",
            f"{root}ggml/src/ggml.c",
            "llama_cpp/llama.py",
        ],
    )
    dest = tmp_path / "share" / "llama.cpp-9.9"
    dest.parent.mkdir()
    script = unpack_converter(good, dest)
    assert script == dest / "convert_hf_to_gguf.py" and script.read_text().startswith("# vendor")
    got = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert got == ["conversion/llama.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    bad = sdist(tmp_path / "bad.tar.gz", ["llama_cpp/llama.py"])
    with pytest.raises(ValueError, match=r"no vendor/llama\.cpp/convert_hf_to_gguf\.py"):
        unpack_converter(bad, tmp_path / "share" / "other")
    assert not (tmp_path / "share" / "other").exists()
