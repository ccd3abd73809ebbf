"""Our PyTorch model against the independent HF-transformers oracle (fp32, tiny)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.reference import ReferenceTrace
from trace_rt.model import load_model
from trace_rt.prompts import prompt_ids
from trace_rt.tokenizer import TextTokenizer
from trace_rt.tokens import encode_timestamp

SEEDS = (1, 2, 3)


def _inputs(cfg, frames: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    size = cfg.vision.image_size
    pixels = torch.randn(frames, 3, size, size, generator=g)  # [F, 3, H, W]
    times = [round(0.37 * i * (seed + 1), 3) for i in range(frames)]
    time_ids = torch.tensor([encode_timestamp(t) for t in times])  # [F, 6]
    return pixels, times, time_ids


@pytest.mark.parametrize("seed", SEEDS)
def test_logits_match_oracle(tiny_ckpts, seed):
    ckpt = tiny_ckpts[seed]
    ours, ref = load_model(ckpt), ReferenceTrace.from_pretrained(ckpt)
    cfg = ours.config
    pixels, times, time_ids = _inputs(cfg, frames=3 + seed, seed=seed)
    tok = TextTokenizer.from_dir(ckpt)
    ids = prompt_ids("mr", query="a dog jumps", tok=tok, ids=cfg.ids)
    with torch.inference_mode():
        # Stage by stage: the video block, then every head's logits over a sequence that
        # also holds generated time, score, sync and text ids.
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
    assert logits.shape == logits_ref.shape == (1, x.shape[1], cfg.ids.size)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-4)


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
