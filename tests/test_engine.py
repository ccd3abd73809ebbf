"""Continuous batching and the video/prefix cache on real backends (torch, onnxruntime).

The oracle here is each backend alone: N sequences decoded together (joining and leaving
mid-batch, different prompt lengths, frame counts, tasks, heads and budgets) must give
exactly the ids each gives as the only sequence of a one-slot backend, which is the path
test_run.py holds equal to the HF-transformers reference.
"""

from __future__ import annotations

import numpy as np
import pytest

from export import export_onnx
from tests.engine_runs import run_batched, solo_tokens
from trace_rt.backends import load_backend
from trace_rt.backends.base import KVPrefix
from trace_rt.engine import Engine, GenerationConfig, Sequence, VideoCache
from trace_rt.engine.cache import content_hash, model_fingerprint, video_key
from trace_rt.errors import InputError
from trace_rt.pipeline import Pipeline, Question
from trace_rt.tokens import Head

QUERIES = ["a red circle moves left", "the blue square", "something happens near the end"]


@pytest.fixture(scope="module")
def artifact(tiny_ckpts, tmp_path_factory):
    return export_onnx(tiny_ckpts[2], tmp_path_factory.mktemp("engine") / "a", progress=False)


@pytest.fixture(scope="module")
def model_dirs(tiny_ckpts, artifact):
    return {"torch": tiny_ckpts[2], "onnxruntime": artifact}


@pytest.fixture(scope="module")
def requests(model_dirs, clip_video):
    """(prompt ids, pixel values, time ids, frame times, duration, gen) of mixed requests."""
    pipe = Pipeline.from_dir(model_dirs["torch"])
    out = []
    specs = [
        ("dvc", None, 8, GenerationConfig(max_new_tokens=40, ignore_eos=True)),
        ("mr", QUERIES[0], 4, GenerationConfig(max_new_tokens=12, temperature=1.0, seed=5)),
        ("vhd", QUERIES[1], 6, GenerationConfig(max_new_tokens=30, temperature=0.8, seed=9)),
        ("mr", QUERIES[2], 8, GenerationConfig(max_new_tokens=7, constrained=True)),
        ("dvc", None, 3, GenerationConfig(max_new_tokens=25, temperature=1.5, ignore_eos=True)),
    ]
    for task, query, frames, gen in specs:
        prep = pipe.prepare(clip_video, task, query=query, frames=frames, gen=gen)
        out.append((prep, gen))
    return out


@pytest.mark.parametrize(("name", "slots"), [("torch", 3), ("onnxruntime", 3), ("onnxruntime", 8)])
def test_batched_equalssolo_tokens(name, slots, model_dirs, requests):
    solo_backend = load_backend(name, model_dirs[name])
    want = [solo_tokens(solo_backend, prep, gen) for prep, gen in requests]
    assert len({tuple(w) for w in want}) == len(want)  # the requests really differ
    # Three slots for five sequences: two wait, then join as others leave mid-batch.
    # Eight: the onnxruntime pool widens 1 -> 2 -> 4 -> 8 columns as they are admitted and
    # narrows as they finish, moving sequences between columns mid-decode.
    backend = load_backend(name, model_dirs[name], max_sequences=slots)
    got, engine = run_batched(backend, requests)
    assert got == want
    assert max(engine.stats.batch_sizes) == min(slots, 5) and min(engine.stats.batch_sizes) < 3
    assert engine.stats.prefills == len(requests) and not engine.running
    if name == "onnxruntime":
        assert backend.kv.width == 1 and not backend.kv.cols  # narrowed back when idle


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
def test_cached_prefix_equals_uncached(name, model_dirs, clip_video):
    gen = GenerationConfig(max_new_tokens=24, ignore_eos=True)
    solo = Pipeline.from_dir(model_dirs[name])
    want = [solo.run(clip_video, "mr", query=q, frames=6, gen=gen)["token_ids"] for q in QUERIES]
    pipe = Pipeline.from_dir(model_dirs[name], max_sequences=2, video_cache=VideoCache())
    first = pipe.run_many(clip_video, [Question("mr", q) for q in QUERIES], frames=6, gen=gen)
    assert [r["token_ids"] for r in first] == want
    assert [r["cache"]["prefix"] for r in first] == [False, True, True]
    # A later call finds the encoded video and its prefix: nothing is recomputed.
    again = pipe.run_many(clip_video, [Question("mr", QUERIES[1])], frames=6, gen=gen)
    assert again[0]["token_ids"] == want[1]
    assert again[0]["cache"] == {"video": True, "prefix": True}
    assert again[0]["video_id"] == first[0]["video_id"]


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
def test_cached_prefix_survives_other_videos(name, model_dirs, clip_video, tmp_path):
    # A prefix kept in the cache must be a copy: the slot it came from is refilled by the
    # next video's prompt (a view of the pool once served that video's K/V as this one's).
    from tests.media import write_video

    other = write_video(tmp_path / "other.mp4", width=80, height=80, fps=12, n_frames=30)
    gen = GenerationConfig(max_new_tokens=24, ignore_eos=True)
    want = Pipeline.from_dir(model_dirs[name]).run(clip_video, "mr", query=QUERIES[1], gen=gen)
    cache = VideoCache()
    pipe = Pipeline.from_dir(model_dirs[name], video_cache=cache)
    (first,) = pipe.run_many(clip_video, [Question("mr", QUERIES[0])], gen=gen)
    (prefix,) = cache._entries[first["video_id"]].prefixes.values()
    kept = [a.copy() for a in prefix.kv]
    pipe.run_many(other, [Question("dvc")], gen=gen)
    assert all(np.array_equal(a, b) for a, b in zip(prefix.kv, kept, strict=True))
    (got,) = pipe.run_many(clip_video, [Question("mr", QUERIES[1])], gen=gen)
    assert got["cache"] == {"video": True, "prefix": True}
    assert got["token_ids"] == want["token_ids"]


def test_cache_keys_and_eviction(model_dirs, clip_video, tmp_path):
    gen = GenerationConfig(max_new_tokens=4)
    cache = VideoCache()
    pipe = Pipeline.from_dir(model_dirs["torch"], video_cache=cache)
    q = [Question("mr", QUERIES[0])]
    a = pipe.run_many(clip_video, q, frames=4, gen=gen)[0]
    b = pipe.run_many(clip_video, q, frames=5, gen=gen)[0]  # same bytes, other frame count
    assert a["video_id"] != b["video_id"] and not b["cache"]["video"]
    assert cache.misses == 2 and len(cache) == 2
    # Another checkpoint (or the same one changed) has another fingerprint: a miss.
    other = Pipeline.from_dir(model_dirs["onnxruntime"], video_cache=cache)
    c = other.run_many(clip_video, q, frames=4, gen=gen)[0]
    assert c["video_id"] != a["video_id"] and not c["cache"]["video"]
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text("{}")
    before = model_fingerprint(ck)
    (ck / "config.json").write_text('{"x": 1}')
    assert model_fingerprint(ck) != before
    # A budget that holds one entry: the least recently used goes, the pinned never.
    sizes = [cache._entries[r["video_id"]].nbytes for r in (a, b)]
    small = VideoCache(max_bytes=max(sizes) + 1)  # either entry, not both
    pipe.video_cache = small
    ids = [pipe.run_many(clip_video, q, frames=f, gen=gen)[0]["video_id"] for f in (4, 5)]
    assert ids[0] not in small and ids[1] in small and small.evictions == 1


def test_video_cache_pins_and_errors():
    cache = VideoCache(max_bytes=10)
    calls = []

    def fill(e):
        calls.append(e.key)
        e.video_bytes = 100  # over the budget on its own

    with cache.entry("k", fill) as e:
        with cache.entry("k", fill) as e2:  # a second user waits for, then shares, the fill
            assert e2 is e
        cache.trim()
        assert "k" in cache  # pinned: never evicted
    assert "k" not in cache and calls == ["k"]  # unpinned and over budget: gone
    with pytest.raises(InputError, match="not in this server's video cache"), cache.pinned("x"):
        pass

    def broken(e):
        raise ValueError("corrupt video")

    with pytest.raises(ValueError, match="corrupt"), cache.entry("bad", broken):
        pass
    assert "bad" not in cache


def test_keys_hash_content_and_settings(clip_video):
    data = clip_video.read_bytes()
    h = content_hash(clip_video)
    assert h == content_hash(data) and h != content_hash(data + b"\0")
    assert content_hash("-") is None
    k = video_key(h, 8, "uniform", {"crop": 224}, "m1")
    assert k != video_key(h, 8, "uniform", {"crop": 336}, "m1")
    assert k != video_key(h, 8, "uniform", {"crop": 224}, "m2")
    assert k == video_key(h, 8, "uniform", {"crop": 224}, "m1")


def test_a_failing_sequence_leaves_the_batch_intact(model_dirs, requests):
    backend = load_backend("onnxruntime", model_dirs["onnxruntime"], max_sequences=3)
    want = [
        solo_tokens(load_backend("onnxruntime", model_dirs["onnxruntime"]), p, g)
        for p, g in requests[:2]
    ]

    def explode(token):
        raise BrokenPipeError("the client went away")

    stopped = {"now": False}
    seqs = []
    for prep, gen in requests[:2]:
        video = backend.encode_video(prep.pixel_values, prep.time_ids)
        seqs.append(Sequence(prep.prompt_ids, video, gen, duration=prep.clip.duration,
                             frame_times=prep.clip.times))  # fmt: skip
    prep, gen = requests[2]
    bad_video = np.zeros((3, backend.config.hidden_size), np.float32)  # wrong length: fine
    seqs.insert(1, Sequence(prep.prompt_ids, bad_video, gen, on_token=explode))
    seqs.append(Sequence([1, 2, 3], None, gen))  # no video placeholder: prefill fails
    seqs.append(Sequence(prep.prompt_ids, bad_video, gen, cancelled=lambda: stopped["now"]))
    engine = Engine(backend)
    for s in seqs:
        engine.add(s)
    engine.step()
    stopped["now"] = True
    while engine.busy:
        engine.step()
    assert isinstance(seqs[1].error, BrokenPipeError)
    assert seqs[3].error is not None and "placeholder" in str(seqs[3].error)
    assert seqs[4].stop_reason == "cancelled"
    assert [seqs[0].tokens, seqs[2].tokens] == want
    assert engine.stats.failed == 2 and not engine.running and len(engine.free_slots) == 3


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
def test_prefix_is_checked(name, model_dirs):
    backend = load_backend(name, model_dirs[name], max_sequences=2)
    prefix = KVPrefix((1, 2), 0, ())
    with pytest.raises(ValueError, match="other prompt ids"):
        backend.prefill([1, 3, -201, 5], None, Head.TIME, prefix=prefix)
    with pytest.raises(ValueError, match=r"distinct and in 0\.\.1"):
        backend.decode([0, 2], [5, 5], [Head.TIME, Head.TIME])
