"""Running prepared requests (``Pipeline.prepare`` output, generation config) alone and
batched on one engine: the comparison the engine tests make on every backend."""

from __future__ import annotations

from pathlib import Path

from trace_rt.backends import load_backend
from trace_rt.engine import Engine, Sequence, VideoCache
from trace_rt.generate import GenerationConfig, generate
from trace_rt.pipeline import Pipeline, Question


def solo_tokens(backend, prep, gen) -> list[int]:
    """The request's tokens through the single-request loop (``generate``)."""
    video = backend.encode_video(prep.pixel_values, prep.time_ids)
    return generate(
        backend, prep.prompt_ids, video, gen, duration=prep.clip.duration,
        frame_times=prep.clip.times,
    ).token_ids  # fmt: skip


def run_batched(backend, requests) -> tuple[list[list[int]], Engine]:
    """Every request queued at once on one engine over *backend*; (tokens, the engine).
    Each sequence must finish without an error."""
    engine = Engine(backend)
    seqs = [
        Sequence(
            prep.prompt_ids,
            backend.encode_video(prep.pixel_values, prep.time_ids),  # all alive at once
            gen,
            duration=prep.clip.duration,
            frame_times=prep.clip.times,
        )
        for prep, gen in requests
    ]
    engine.run(seqs)
    assert [s.error for s in seqs] == [None] * len(seqs)
    return [s.tokens for s in seqs], engine


def check_batched_equals_solo(art: Path, variant: str, video: Path, query: str) -> None:
    """Four mixed requests (tasks, frames, sampling, constrained) through *art*'s decoder
    *variant*: three at a time on one engine give each request's solo tokens."""
    pipe = Pipeline.from_dir(art, "onnxruntime", cache_dir=False, decoder_variant=variant)
    specs = [
        ("dvc", None, 8, GenerationConfig(max_new_tokens=30, ignore_eos=True)),
        ("mr", query, 4, GenerationConfig(max_new_tokens=12, temperature=1.0, seed=5)),
        ("vhd", "the blue square", 6, GenerationConfig(max_new_tokens=20, seed=9)),
        ("mr", "near the end", 8, GenerationConfig(max_new_tokens=7, constrained=True)),
    ]
    preps = [(pipe.prepare(video, t, query=q, frames=f, gen=g), g) for t, q, f, g in specs]
    solo = load_backend("onnxruntime", art, cache_dir=False, decoder_variant=variant)
    want = [solo_tokens(solo, prep, gen) for prep, gen in preps]
    backend = load_backend(
        "onnxruntime", art, cache_dir=False, decoder_variant=variant, max_sequences=3
    )
    got, engine = run_batched(backend, preps)
    assert got == want
    assert max(engine.stats.batch_sizes) == 3


def check_cached_prefix_equals_uncached(art: Path, variant: str, video: Path, query: str) -> None:
    """Two questions on one video, the second's video prefix from the prefix cache: the
    tokens of each equal a whole prefill of it alone with *art*'s decoder *variant*."""
    gen = GenerationConfig(max_new_tokens=16, ignore_eos=True)
    queries = [query, "the blue square"]
    opts = {"cache_dir": False, "decoder_variant": variant}
    solo = Pipeline.from_dir(art, "onnxruntime", **opts)
    want = [solo.run(video, "mr", query=q, frames=6, gen=gen)["token_ids"] for q in queries]
    pipe = Pipeline.from_dir(art, "onnxruntime", max_sequences=2, video_cache=VideoCache(), **opts)
    got = pipe.run_many(video, [Question("mr", q) for q in queries], frames=6, gen=gen)
    assert [r["token_ids"] for r in got] == want
    assert [r["cache"]["prefix"] for r in got] == [False, True]
