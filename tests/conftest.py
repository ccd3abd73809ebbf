"""Shared fixtures: tiny checkpoints, short videos and the tokenizer, made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tok():
    """The default (Mistral) text tokenizer."""
    from trace_rt.tokenizer import TextTokenizer, default_tokenizer_model

    return TextTokenizer.from_file(default_tokenizer_model())


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A random-weight `tiny` checkpoint (seed 0)."""
    from training.make_checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0, progress=False)


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory) -> dict[int, Path]:
    """`tiny` checkpoints for several seeds."""
    from training.make_checkpoint import make_checkpoint

    root = tmp_path_factory.mktemp("ckpts")
    return {
        s: make_checkpoint(root / f"tiny-{s}", "tiny", seed=s, progress=False) for s in (1, 2, 3)
    }


@pytest.fixture(scope="session")
def clip_video(tmp_path_factory) -> Path:
    """A 4 s, 10 fps, 96x64 H.264 clip with moving shapes."""
    from tests.media import write_video

    path = tmp_path_factory.mktemp("videos") / "clip.mp4"
    write_video(path, width=96, height=64, fps=10, n_frames=40)
    return path
