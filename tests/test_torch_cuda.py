"""The torch backend on CUDA (skipped without a GPU): same tokens as on CPU."""

from __future__ import annotations

import pytest

from trace_rt.generate import GenerationConfig
from trace_rt.pipeline import Pipeline

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("task", ["dvc", "mr"])
def test_cuda_fp32_tokens_equal_cpu(tiny_ckpt, clip_video, task):
    query = None if task == "dvc" else "a red circle"
    gen = GenerationConfig(max_new_tokens=32)
    cpu = Pipeline.from_dir(tiny_ckpt, device="cpu").run(clip_video, task, query=query, gen=gen)
    gpu = Pipeline.from_dir(tiny_ckpt, device="cuda", dtype="fp32").run(
        clip_video, task, query=query, gen=gen
    )
    assert gpu["token_ids"] == cpu["token_ids"]


def test_cuda_half_precision_runs(tiny_ckpt, clip_video):
    for dtype in ("fp16", "bf16"):
        res = Pipeline.from_dir(tiny_ckpt, device="cuda", dtype=dtype).run(
            clip_video, "dvc", gen=GenerationConfig(max_new_tokens=16)
        )
        assert len(res["token_ids"]) == 16
