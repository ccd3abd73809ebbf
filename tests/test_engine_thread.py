"""EngineThread: one engine stepped by one thread, fed from many (the server's seam).

On the real onnxruntime backend of a `tiny` export; the oracle for tokens is each request
alone on a one-slot backend (`trace_rt.generate`, the `trace-rt run` path).
"""

from __future__ import annotations

import threading
import time

import pytest

from export import export_onnx
from trace_rt.backends import load_backend
from trace_rt.engine import Engine, GenerationConfig, Sequence
from trace_rt.generate import generate
from trace_rt.pipeline import Pipeline
from trace_rt.serving.engine_thread import EngineThread

QUERIES = ["a red circle moves left", "the blue square", "something happens near the end"]


@pytest.fixture(scope="module")
def artifact(tiny_ckpts, tmp_path_factory):
    return export_onnx(tiny_ckpts[3], tmp_path_factory.mktemp("et") / "a", progress=False)


@pytest.fixture(scope="module")
def prepared(artifact, clip_video):
    pipe = Pipeline.from_dir(artifact, "onnxruntime", cache_dir=False)
    specs = [
        ("dvc", None, GenerationConfig(max_new_tokens=30, ignore_eos=True)),
        ("mr", QUERIES[0], GenerationConfig(max_new_tokens=12, temperature=1.0, seed=5)),
        ("vhd", QUERIES[1], GenerationConfig(max_new_tokens=25, temperature=0.8, seed=9)),
        ("mr", QUERIES[2], GenerationConfig(max_new_tokens=7, constrained=True)),
        ("dvc", None, GenerationConfig(max_new_tokens=20, temperature=1.5, ignore_eos=True)),
        ("mr", QUERIES[1], GenerationConfig(max_new_tokens=18, ignore_eos=True)),
    ]
    out = []
    for task, query, gen in specs:
        prep = pipe.prepare(clip_video, task, query=query, gen=gen)
        video = pipe.backend.encode_video(prep.pixel_values, prep.time_ids)
        solo = generate(
            pipe.backend, prep.prompt_ids, video, gen, duration=prep.clip.duration,
            frame_times=prep.clip.times,
        ).token_ids  # fmt: skip
        out.append((prep, video, gen, solo))
    return out


def _seq(prep, video, gen, **kw) -> Sequence:
    return Sequence(
        prep.prompt_ids, video, gen, duration=prep.clip.duration, frame_times=prep.clip.times, **kw
    )


def _engine(artifact, slots: int = 3) -> Engine:
    return Engine(load_backend("onnxruntime", artifact, cache_dir=False, max_sequences=slots))


def test_submissions_from_many_threads_equal_solo(artifact, prepared):
    # Six requests from six threads into three slots: the engine thread admits them as
    # they come and as slots free up; each gets exactly its solo ids, its callback once,
    # on the engine thread.
    steps = []
    et = EngineThread(_engine(artifact), on_step=steps.append)
    done: dict[int, tuple[list[int], str]] = {}
    all_done = threading.Event()
    start = threading.Barrier(len(prepared))

    def submit(i: int) -> None:
        prep, video, gen, _ = prepared[i]
        start.wait()

        def finished(seq: Sequence) -> None:
            done[i] = (seq.tokens, threading.current_thread().name)
            if len(done) == len(prepared):
                all_done.set()

        et.submit(_seq(prep, video, gen), finished)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(prepared))]
    for t in threads:
        t.start()
    assert all_done.wait(120)
    for i, (*_, solo) in enumerate(prepared):
        assert done[i] == (solo, "trace-engine"), i
    assert max(s.slots_in_use for s in steps) == 3  # they shared the pool
    assert sum(et.batch_counts().values()) == steps[-1].steps
    assert sum(k * v for k, v in et.batch_counts().items()) == steps[-1].batch_sum
    assert steps[-1].slots_in_use == 0 and steps[-1].waiting == 0
    et.close()


def test_cancelled_and_failing_callbacks_leave_the_rest(artifact, prepared):
    et = EngineThread(_engine(artifact, slots=2))
    leave = threading.Event()
    results: dict[str, Sequence] = {}
    finished = threading.Semaphore(0)

    def keep(name: str, boom: bool = False):
        def done(seq: Sequence) -> None:
            results[name] = seq
            finished.release()
            if boom:
                raise RuntimeError("a callback bug")  # logged; the loop goes on

        return done

    prep, video, _, _ = prepared[0]
    endless = GenerationConfig(max_new_tokens=3000, ignore_eos=True)
    et.submit(_seq(prep, video, endless, cancelled=leave.is_set), keep("leaving", boom=True))
    p1, v1, g1, solo1 = prepared[1]
    et.submit(_seq(p1, v1, g1), keep("good"))
    p2, v2, g2, solo2 = prepared[5]
    et.submit(_seq(p2, v2, g2), keep("waiting"))  # admitted when a slot frees
    assert finished.acquire(timeout=60)  # "good" (12 tokens) first
    leave.set()
    assert finished.acquire(timeout=60) and finished.acquire(timeout=60)
    assert results["good"].tokens == solo1 and results["waiting"].tokens == solo2
    assert results["leaving"].stop_reason == "cancelled"
    assert len(results["leaving"].tokens) < 3000
    deadline = time.monotonic() + 10
    while et.snapshot().slots_in_use and time.monotonic() < deadline:
        time.sleep(0.01)
    assert et.snapshot().slots_in_use == 0  # the cancelled sequence's slot is free again
    et.close()


def test_a_failing_step_fails_its_batch_only_and_close_cancels(artifact, prepared):
    engine = _engine(artifact, slots=2)
    et = EngineThread(engine)
    # The Engine turns a failing decode into per-sequence errors; a step that raises
    # itself (an engine bug) must fail what the engine held and leave the thread serving.
    engine.step = lambda: (_ for _ in ()).throw(RuntimeError("engine bug"))
    got: list[Sequence] = []
    gate = threading.Semaphore(0)

    def done(seq: Sequence) -> None:
        got.append(seq)
        gate.release()

    prep, video, gen, solo = prepared[3]
    et.submit(_seq(prep, video, gen), done)
    assert gate.acquire(timeout=30)
    assert got[0].stop_reason == "error" and "engine bug" in str(got[0].error)
    assert et.engine is not engine  # a fresh engine on the same backend
    et.submit(_seq(prep, video, gen), done)
    assert gate.acquire(timeout=60)
    assert got[1].tokens == solo
    # close(): what is still queued or running finishes as cancelled, callbacks called.
    endless = GenerationConfig(max_new_tokens=3000, ignore_eos=True)
    for _ in range(3):
        et.submit(_seq(prep, video, endless), done)
    time.sleep(0.2)
    et.close()
    assert all(gate.acquire(timeout=10) for _ in range(3))
    assert [s.stop_reason for s in got[2:]] == ["cancelled"] * 3
    with pytest.raises(RuntimeError, match="stopped"):
        et.submit(_seq(prep, video, gen), done)
