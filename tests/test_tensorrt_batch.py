"""The TensorRT backend's KV-slot pool through the strict CPU stand-in (tests/fake_tensorrt.py).

Same acceptance as tests/test_engine.py for torch and onnxruntime: N sequences decoded
together (joining and leaving mid-batch, different prompt lengths, frame counts, tasks,
heads and budgets, greedy and sampled) give exactly the ids each gives alone; a cached
prefix gives the ids of an uncached run. The stand-in runs the artifact's ONNX graph with
onnxruntime at the addresses and shapes the backend binds, and enforces TensorRT's and
CUDA's rules (256-byte aligned tensor addresses, profile ranges, asynchronous streams,
uninitialised device memory, copies inside allocations), so a wrong slot, offset, stride
or stale row shows up as other logits or ids. tiny's K/V rows are 128 bytes: every other
position is misaligned, so the staging path runs too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export import export_onnx
from tests.engine_runs import run_batched, solo_tokens
from trace_rt.backends import load_backend
from trace_rt.engine import GenerationConfig, VideoCache
from trace_rt.errors import InputError
from trace_rt.pipeline import Pipeline, Question
from trace_rt.tokens import Head

QUERIES = ["a red circle moves left", "the blue square", "something happens near the end"]
SLOTS = 3


@pytest.fixture
def fake_trt(monkeypatch):
    from tests.fake_tensorrt import install, uninstall

    yield install(monkeypatch)
    uninstall()


@pytest.fixture(scope="module")
def art(tiny_ckpts, tmp_path_factory) -> Path:
    """An artifact with stand-in engines for up to 4 sequences per decode step, and the
    fixed-shape decode step (which one-slot backends use)."""
    from tests.fake_tensorrt import fake_engines

    out = export_onnx(tiny_ckpts[2], tmp_path_factory.mktemp("trt-batch") / "a", progress=False)
    fake_engines(out, max_frames=8, max_seq=512, checkpoint=tiny_ckpts[2], max_batch=4)
    return out


@pytest.fixture(scope="module")
def requests(art, clip_video):
    """(prepared request, gen) of mixed requests (as tests/test_engine.py's)."""
    pipe = Pipeline.from_dir(art, "onnxruntime", cache_dir=False)
    specs = [
        ("dvc", None, 8, GenerationConfig(max_new_tokens=40, ignore_eos=True)),
        ("mr", QUERIES[0], 4, GenerationConfig(max_new_tokens=12, temperature=1.0, seed=5)),
        ("vhd", QUERIES[1], 6, GenerationConfig(max_new_tokens=30, temperature=0.8, seed=9)),
        ("mr", QUERIES[2], 8, GenerationConfig(max_new_tokens=7, constrained=True)),
        ("dvc", None, 3, GenerationConfig(max_new_tokens=25, temperature=1.5, ignore_eos=True)),
    ]
    return [
        (pipe.prepare(clip_video, task, query=q, frames=f, gen=gen), gen)
        for task, q, f, gen in specs
    ]


def test_batched_equalssolo_tokens(fake_trt, art, requests):
    solo = load_backend("tensorrt", art, device="cuda")  # the fixed-shape step, one graph
    want = [solo_tokens(solo, prep, gen) for prep, gen in requests]
    assert solo.step is not None and solo.step.graph is not None
    assert len({tuple(w) for w in want}) == len(want)  # the requests really differ
    ort = load_backend("onnxruntime", art, cache_dir=False)
    assert [solo_tokens(ort, prep, gen) for prep, gen in requests] == want
    # Three slots for five sequences: two wait, then join as others leave mid-batch.
    plain = load_backend("tensorrt", art, device="cuda", max_sequences=SLOTS, cuda_graphs=0)
    launches = fake_trt.launches
    got, engine = run_batched(plain, requests)
    assert got == want
    assert max(engine.stats.batch_sizes) == SLOTS and min(engine.stats.batch_sizes) < SLOTS
    assert engine.stats.prefills == len(requests) and not engine.running
    assert fake_trt.launches == launches  # cuda_graphs=0: nothing replayed
    assert plain.step is None  # built for batch 1: several slots use the dynamic decoder


def test_batched_cuda_graphs(fake_trt, art, requests):
    # Graphs per past length P with the batch profile: the scatter copies stay outside the
    # graph (they depend on each slot's length, P only on the longest), so replays are
    # right whichever slots step. Run 1 sees each P, run 2 captures, run 3 replays.
    want = run_batched(
        load_backend("tensorrt", art, device="cuda", max_sequences=SLOTS, cuda_graphs=0), requests
    )[0]
    backend = load_backend("tensorrt", art, device="cuda", max_sequences=SLOTS, cuda_graphs=512)
    for _ in range(3):
        assert run_batched(backend, requests)[0] == want
    assert backend.past_graphs.graphs and fake_trt.launches > 0


def _prompt(n_before: int, n_after: int) -> list[int]:
    return [1, *range(700, 700 + n_before - 1), -201, *range(900, 900 + n_after)]


@pytest.mark.parametrize("scatter", ["2d", "per-tensor"])
def test_batch_step_logits_match_onnxruntime(fake_trt, art, monkeypatch, scatter):
    """Step-level logits of the pooled backends, slot by slot: ragged lengths, a subset of
    slots stepping, a released slot re-filled with a shorter prompt (its stale rows must
    stay masked), prefixes at odd and even lengths (misaligned rows staged). ``per-tensor``:
    the scatter of a pool whose blocks exceed cudaMemcpy2D's pitch limit."""
    if scatter == "per-tensor":
        from trace_rt.backends import tensorrt_kv

        monkeypatch.setattr(tensorrt_kv, "MAX_PITCH", 0)
    trt_b = load_backend("tensorrt", art, device="cuda", max_sequences=SLOTS)
    ort_b = load_backend("onnxruntime", art, cache_dir=False, max_sequences=SLOTS)
    h = trt_b.config.hidden_size
    rng = np.random.default_rng(0)
    videos = [rng.standard_normal((n, h)).astype(np.float32) for n in (9, 14, 5)]
    prompts = [_prompt(3, 4), _prompt(6, 2), _prompt(2, 7)]

    def both(call, *args, **kw):
        got, want = getattr(trt_b, call)(*args, **kw), getattr(ort_b, call)(*args, **kw)
        for g, w in zip(
            got if call == "decode" else [got], want if call == "decode" else [want], strict=True
        ):
            np.testing.assert_array_equal(g, w)

    for slot, (p, v) in enumerate(zip(prompts, videos, strict=True)):
        both("prefill", p, v, Head.TEXT, slot=slot)
    heads = [Head.TIME, Head.SCORE, Head.TEXT]
    for step in range(4):
        slots = [0, 1, 2] if step % 2 == 0 else [2, 0]
        ids = [32005 + step, 1234 + step, 32016 + step][: len(slots)]
        both("decode", slots, ids, heads[: len(slots)])
    trt_b.release(1)
    ort_b.release(1)
    both("prefill", _prompt(1, 1), videos[2][:3], Head.TIME, slot=1)  # shorter than before
    for step in range(3):
        both("decode", [1, 2, 0], [32010, 32011, 500 + step], heads)
    # Prefixes: saved in one slot, loaded in another; the same K/V from both backends, and
    # the logits of an uncached prefill. Prefix lengths 3 + 9 = 12 and 3 + 14 = 17.
    loads = []
    load = trt_b.kv.load
    monkeypatch.setattr(trt_b.kv, "load", lambda kv: loads.append(1) or load(kv))
    for v in videos[:2]:
        p = _prompt(3, 5)
        prefix = trt_b.save_prefix(p, v, slot=0)
        ort_prefix = ort_b.save_prefix(p, v, slot=0)
        assert prefix.length == ort_prefix.length == 3 + len(v)
        for a, b in zip(prefix.kv, ort_prefix.kv, strict=True):
            assert a.shape == (prefix.length, 1, 2, 16)
            np.testing.assert_array_equal(a, b)
        uncached = ort_b.prefill(p, v, Head.TEXT, slot=2)
        # Right after save_prefix the one-sequence buffer still holds it: no upload.
        cached = trt_b.prefill(p, None, Head.TEXT, slot=2, prefix=prefix)
        np.testing.assert_allclose(cached, uncached, atol=1e-5)
        assert not loads
        both("prefill", _prompt(2, 2), videos[2], Head.SCORE, slot=1)  # overwrites it
        cached = trt_b.prefill(p, None, Head.TEXT, slot=2, prefix=prefix)  # uploaded
        np.testing.assert_allclose(cached, uncached, atol=1e-5)
        assert loads == [1]
        loads.clear()
        ort_b.prefill(p, None, Head.TEXT, slot=2, prefix=prefix)  # the same state in both
        both("decode", [2, 1], [32007, 40], [Head.TIME, Head.TEXT])


@pytest.mark.parametrize("slots", [1, 2])
def test_cached_prefix_equals_uncached(fake_trt, art, clip_video, slots):
    # One slot: the prefix is the pool's own first positions (kept across questions, as
    # decode steps write after them); two: the one-sequence buffer, copied into slots.
    gen = GenerationConfig(max_new_tokens=24, ignore_eos=True)
    solo = Pipeline.from_dir(art, "tensorrt", device="cuda", cuda_graphs=0)
    want = [solo.run(clip_video, "mr", query=q, frames=6, gen=gen)["token_ids"] for q in QUERIES]
    pipe = Pipeline.from_dir(
        art, "tensorrt", device="cuda", max_sequences=slots, video_cache=VideoCache()
    )
    first = pipe.run_many(clip_video, [Question("mr", q) for q in QUERIES], frames=6, gen=gen)
    assert [r["token_ids"] for r in first] == want
    assert [r["cache"]["prefix"] for r in first] == [False, True, True]
    again = pipe.run_many(clip_video, [Question("mr", QUERIES[1])], frames=6, gen=gen)
    assert again[0]["token_ids"] == want[1]
    assert again[0]["cache"] == {"video": True, "prefix": True}


def test_pool_limits(fake_trt, art, tmp_path):
    with pytest.raises(InputError, match=r"at most 4 sequences.*--max-batch"):
        load_backend("tensorrt", art, device="cuda", max_sequences=5)
    with pytest.raises(InputError, match="positive integer"):
        load_backend("tensorrt", art, device="cuda", max_sequences=True)
    b = load_backend("tensorrt", art, device="cuda", max_sequences=2)
    with pytest.raises(ValueError, match=r"distinct and in 0\.\.1"):
        b.decode([0, 2], [5, 5], [Head.TIME, Head.TIME])
    with pytest.raises(ValueError, match="one token id and one head per slot"):
        b.decode([0, 1], [5], [Head.TIME, Head.TIME])


def test_cli_questions_share_slots(fake_trt, art, clip_video, monkeypatch, tmp_path):
    # `trace-rt run --query a --query b ...` on tensorrt: the questions get as many slots as
    # the engines decode at once (max_batch 4 here), and each gets its solo ids.
    from trace_rt import cli
    from trace_rt.backends import tensorrt_manifest as tm

    made = []
    real = Pipeline.from_dir

    def spy(*args, **kw):
        made.append(kw.get("max_sequences"))
        return real(*args, **kw)

    monkeypatch.setattr(Pipeline, "from_dir", spy)
    opts = {"backend": "tensorrt", "device": "cuda", "frames": 6, "max_new_tokens": 10}
    questions = [Question("mr", q) for q in [*QUERIES, QUERIES[0], QUERIES[1]]]
    got = cli.run_many(str(clip_video), art, questions, **opts)
    want = [cli.run(str(clip_video), art, task="mr", query=q.query, **opts) for q in questions]
    assert [r["token_ids"] for r in got] == [r["token_ids"] for r in want]
    assert made[0] == 4 and tm.built_max_batch(art) == 4  # five questions, four slots
    assert tm.built_max_batch(tmp_path) == 1  # no manifest: the backend says what is missing
