"""Our PyTorch model against the HF-transformers oracle (fp32, tiny).

The oracle (benchmarks/reference) parses the checkpoint with transformers' own config
classes, so a field our ``config.py`` reads wrongly shows up here as a mismatch: the
``odd`` checkpoint sets the fields a parser could silently default (rope_theta,
rms_norm_eps, mm_vision_select_layer, num_key_value_heads, the preprocessor's resize) to
values other than their defaults, and the perturbation tests check that each one is caught.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from benchmarks.reference import ReferenceTrace
from trace_rt.config import TraceConfig
from trace_rt.errors import CheckpointError
from trace_rt.model import load_model
from trace_rt.preprocess import preprocess_frames
from trace_rt.prompts import prompt_ids
from trace_rt.tokenizer import TextTokenizer
from trace_rt.tokens import encode_timestamp

SEEDS = (1, 2, 3)
# Off-default values; a parser that ignored the field would fall back to the default.
ODD = {"rope_theta": 5000.0, "rms_norm_eps": 0.05, "mm_vision_select_layer": -1}
QK_SCALE = 12.0
ODD_SHORTEST_EDGE = 70  # resize then crop, instead of tiny's resize-to-crop
# What config.py would produce had it ignored the field (its defaults).
IGNORED = {
    "rope_theta": 1e6,
    "rms_norm_eps": 1e-5,
    "mm_vision_select_layer": -2,
    "num_key_value_heads": "num_attention_heads",
}


@pytest.fixture(scope="module")
def odd_ckpt(tiny_ckpts, tmp_path_factory):
    """tiny seed 1 with off-default config fields and sharp attention.

    tiny's random q/k weights (std 0.02) make attention nearly uniform, so positions, and
    with them RoPE, hardly matter; scaled up, a wrong rope_theta moves the logits.
    """
    path = tmp_path_factory.mktemp("odd") / "tiny-odd"
    shutil.copytree(tiny_ckpts[1], path)
    weights = load_file(path / "model.safetensors")
    for name in weights:
        if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            weights[name] = weights[name] * QK_SCALE
    save_file(weights, path / "model.safetensors")
    cfg = json.loads((path / "config.json").read_text()) | ODD
    assert cfg["num_key_value_heads"] != cfg["num_attention_heads"]
    assert all(cfg[k] != v for k, v in IGNORED.items() if not isinstance(v, str))
    (path / "config.json").write_text(json.dumps(cfg))
    prep_file = path / cfg["mm_vision_tower"] / "preprocessor_config.json"
    prep = json.loads(prep_file.read_text())
    prep["size"] = {"shortest_edge": ODD_SHORTEST_EDGE}
    prep_file.write_text(json.dumps(prep))
    return path


def _inputs(cfg, frames: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    size = cfg.vision.image_size
    pixels = torch.randn(frames, 3, size, size, generator=g)  # [F, 3, H, W]
    times = [round(0.37 * i * (seed + 1), 3) for i in range(frames)]
    time_ids = torch.tensor([encode_timestamp(t) for t in times])  # [F, 6]
    return pixels, times, time_ids


def check_parity(ckpt, seed: int) -> None:
    """Stage by stage, ours against the oracle; raises AssertionError on a mismatch."""
    ours, ref = load_model(ckpt), ReferenceTrace.from_pretrained(ckpt)
    cfg = ours.config
    pixels, times, time_ids = _inputs(cfg, frames=3 + seed, seed=seed)
    tok = TextTokenizer.from_dir(ckpt)
    ids = prompt_ids("mr", query="a dog jumps", tok=tok, ids=cfg.ids)
    with torch.inference_mode():
        # The video block, then every head's logits over a sequence that also holds
        # generated time, score, sync and text ids.
        video = ours.project(ours.encode_frames(pixels), time_ids)  # [F*14, H]
        video_ref = ref.encode_video(pixels, times)
        torch.testing.assert_close(video, video_ref, rtol=1e-4, atol=1e-5)

        answer = [32003, 32004, 32013, 32005, 32002, 32001, 32019, 32014, 1014, 32000, 32012]
        full = ids + answer
        i = full.index(-201)
        text = ours.embed(torch.tensor([full[:i] + full[i + 1 :]]))
        x = torch.cat([text[:, :i], video[None], text[:, i:]], dim=1)  # [1, L, H]
        # Each id through its own table: bit-equal given the same video block.
        torch.testing.assert_close(x, ref.embed_prompt(full, video), rtol=0, atol=0)
        x_ref = ref.embed_prompt(full, video_ref)

        ours.setup_caches(x.shape[1])
        hidden = ours.forward_embeds(x, torch.arange(x.shape[1]))  # [1, L, H]
        logits = ours.all_logits(hidden)  # [1, L, 32027]
        logits_ref = ref.all_logits(x_ref)
    assert logits.shape == logits_ref.shape == (1, x.shape[1], ref.id_space)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-4)


def check_preprocess_parity(ckpt) -> None:
    """Our numpy preprocessing against the oracle's CLIPImageProcessor path."""
    rng = np.random.default_rng(7)
    frames = rng.integers(0, 256, (2, 45, 80, 3), dtype=np.uint8)  # non-square: padded
    got = preprocess_frames(frames, TraceConfig.from_dir(ckpt).preprocess)
    want = ReferenceTrace.from_pretrained(ckpt).preprocess(frames).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_logits_match_oracle(tiny_ckpts, seed):
    check_parity(tiny_ckpts[seed], seed)


def test_odd_config_matches_oracle(odd_ckpt):
    check_parity(odd_ckpt, 1)
    check_preprocess_parity(odd_ckpt)


@pytest.mark.parametrize("field", sorted(IGNORED))
def test_ignored_config_field_is_caught(odd_ckpt, monkeypatch, field):
    """Were config.py to ignore *field* (use its default), parity must fail."""
    real = TraceConfig.from_dir.__func__

    def perturbed(cls, path):
        cfg = real(cls, path)
        value = IGNORED[field]
        value = getattr(cfg, value) if isinstance(value, str) else value
        return cfg.replace(**{field: value})

    monkeypatch.setattr(TraceConfig, "from_dir", classmethod(perturbed))
    # A decoder of the wrong grouping also no longer fits the weights' shapes.
    with pytest.raises((AssertionError, CheckpointError)):
        check_parity(odd_ckpt, 1)


def test_ignored_preprocessor_field_is_caught(odd_ckpt, monkeypatch):
    real = TraceConfig.from_dir.__func__

    def perturbed(cls, path):
        cfg = real(cls, path)
        prep = dataclasses.replace(cfg.preprocess, shortest_edge=cfg.preprocess.crop_height)
        return cfg.replace(preprocess=prep)

    monkeypatch.setattr(TraceConfig, "from_dir", classmethod(perturbed))
    with pytest.raises(AssertionError):
        check_preprocess_parity(odd_ckpt)


def test_kv_cache_decode_matches_full_forward(tiny_ckpt):
    m = load_model(tiny_ckpt)
    torch.manual_seed(0)
    x = torch.randn(1, 20, m.config.hidden_size)
    new = torch.tensor([[32005]])
    with torch.inference_mode():
        m.setup_caches(64)
        m.prefill(x)
        step = m.decode_step(new, torch.tensor([20]))
        m.setup_caches(64)
        full = m.forward_embeds(torch.cat([x, m.embed(new)], 1), torch.arange(21))[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
