"""Running prepared requests (``Pipeline.prepare`` output, generation config) alone and
batched on one engine: the comparison the engine tests make on every backend."""

from __future__ import annotations

from trace_rt.engine import Engine, Sequence
from trace_rt.generate import generate


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
