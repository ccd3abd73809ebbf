"""trace-rt batch: manifests, per-item JSON lines, resume after a kill, failures, Ray."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.media import write_video
from trace_rt.batch import (
    Progress,
    ResultStore,
    comparable,
    read_manifest,
    run_batch,
)
from trace_rt.errors import InputError
from trace_rt.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
TOKENS = 16
QUERIES = ["a red box slides right", "a circle appears"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("batch")
    write_video(d / "a.mp4", width=96, height=64, fps=10, n_frames=40)
    write_video(d / "b.mp4", width=80, height=48, fps=8, n_frames=24)
    (d / "bad.mp4").write_bytes(b"not a video at all" * 64)
    lines = [
        {"video": "a.mp4", "id": "a", "task": "mr", "queries": QUERIES},
        {"video": "b.mp4"},
        {"video": "bad.mp4", "id": "bad"},
        {"video": "missing.mp4", "questions": [{"task": "vhd", "query": "x"}, {"question": "?"}]},
        {"video": "a.mp4", "id": "a", "questions": [{"task": "dvc"}]},
    ]
    (d / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


def lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def test_manifest_forms_and_errors(tmp_path):
    m = tmp_path / "m.txt"
    m.write_text("# videos\nx.mp4\n\n/abs/y.mp4\nx.mp4\n")
    items = read_manifest(m, "dvc")
    assert [(i.video, i.task) for i in items] == [
        (str(tmp_path / "x.mp4"), "dvc"),
        ("/abs/y.mp4", "dvc"),
    ]
    bad = {
        '{"video": "a.mp4", "task": "mr"}': "line 1: task mr needs a query",
        '{"video": "a.mp4", "task": "dcv"}': "unknown task 'dcv'",
        '{"vid": "a.mp4"}': 'line 1: each line needs "video"',
        '{"video": "a.mp4", "querys": ["q"]}': "unknown field(s) ['querys']",
        "{not json": "line 1: not valid JSON",
        '{"video": "a.mp4", "task": "mr", "query": 5}': '"query" must be a string, not int',
        '{"video": "a.mp4", "task": ["dvc"]}': '"task" must be a string, not list',
        '{"video": "a.mp4", "questions": [{"question": {"x": 1}}]}': '"question" must be a str',
        '{"video": "a\\u0000.mp4"}': "the video path holds a NUL byte",
        '{"video": "a.mp4", "queries": "q"}': '"queries" must be a non-empty list',
        '{"video": 7}': 'line 1: each line needs "video"',
    }
    for text, msg in bad.items():
        m.write_text(text + "\n")
        with pytest.raises(InputError, match=re.escape(msg)):
            read_manifest(m)
    m.write_bytes(b"ok.mp4\n\xff\xfe.mp4\n")  # a binary file passed by mistake
    with pytest.raises(InputError, match=re.escape("line 2: not UTF-8 text")):
        read_manifest(m)
    m.write_text("\n# nothing\n")
    with pytest.raises(InputError, match="lists no videos"):
        read_manifest(m)


def test_local_run_answers_like_trace_rt_run_and_records_failures(videos, tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    counts = run_batch(videos / "manifest.jsonl", out, tiny_ckpt, max_new_tokens=TOKENS)
    assert counts == {"items": 7, "skipped": 0, "ok": 4, "failed": 3}
    recs = lines(out)
    assert len(recs) == 7 and len({r["key"] for r in recs}) == 7
    by = {(r["id"], r["task"], r.get("query")): r for r in recs}
    # Failures: one line per item, with the reason; the job went on past them.
    assert by[("bad", "dvc", None)]["error"].startswith("NotAVideoError: ")
    missing = [r for r in recs if r["id"] == "missing.mp4"]
    assert [r["task"] for r in missing] == ["vhd", "custom"]
    assert all(r["error"].startswith("VideoNotFoundError: ") for r in missing)
    # Answers: each item as `trace-rt run` answers it alone (a one-slot pipeline).
    pipe = Pipeline.from_dir(tiny_ckpt)
    from trace_rt.generate import GenerationConfig

    gen = GenerationConfig(max_new_tokens=TOKENS)
    for (vid, task, query), video in [
        (("a", "mr", QUERIES[0]), "a.mp4"),
        (("a", "mr", QUERIES[1]), "a.mp4"),
        (("a", "dvc", None), "a.mp4"),
        (("b.mp4", "dvc", None), "b.mp4"),
    ]:
        alone = pipe.run(str(videos / video), task, query=query, gen=gen)
        got = by[(vid, task, query)]
        assert got["status"] == "ok"
        assert got["result"]["token_ids"] == alone["token_ids"]
        assert got["result"]["events"] == alone["events"]


def test_rerun_skips_done_items_and_repairs_a_torn_line(videos, tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    run_batch(videos / "manifest.jsonl", out, tiny_ckpt, max_new_tokens=TOKENS)
    first = lines(out)
    ok = [r for r in first if r["status"] == "ok"]
    # As a run killed mid-write leaves it: two whole lines and half of the third.
    text = "".join(json.dumps(r) + "\n" for r in ok[:2]) + json.dumps(ok[2])[:40]
    (out / "results.jsonl").write_text(text)
    counts = run_batch(
        videos / "manifest.jsonl", out, tiny_ckpt, max_new_tokens=TOKENS, retry_failed=False
    )
    assert counts == {"items": 7, "skipped": 2, "ok": 2, "failed": 3}
    again = lines(out)  # every line parses: the torn one was cut off
    assert [r["key"] for r in again[:2]] == [r["key"] for r in ok[:2]]
    assert sorted(r["key"] for r in again) == sorted(r["key"] for r in first)
    assert sorted(map(json.dumps, map(comparable, again))) == sorted(
        map(json.dumps, map(comparable, first))
    )
    # Everything done: nothing runs. Failed items are tried again unless told not to.
    n = len(again)
    assert run_batch(videos / "manifest.jsonl", out, tiny_ckpt, retry_failed=False)["skipped"] == 7
    assert len(lines(out)) == n
    counts = run_batch(videos / "manifest.jsonl", out, tiny_ckpt, max_new_tokens=TOKENS)
    assert counts == {"items": 7, "skipped": 4, "ok": 0, "failed": 3}


def test_one_run_per_output_directory(tmp_path):
    with ResultStore(tmp_path), pytest.raises(InputError, match="in use by another"):
        ResultStore(tmp_path)
    ResultStore(tmp_path).close()  # released


def test_progress_reports_rate_and_eta(tmp_path):
    log = (tmp_path / "log").open("w+")
    bar = Progress(4, 1, log, every=0)
    for status in ("ok", "error", "ok", "ok"):
        bar.update({"status": status})
    log.seek(0)
    shown = log.read().splitlines()
    assert len(shown) == 4
    assert shown[1].startswith("trace-rt batch: 2/4 items (50%), 1 failed, ")
    assert "ETA 0:00:0" in shown[1] and shown[-1].endswith("ETA 0:00:00")


@pytest.mark.slow
def test_killed_run_loses_nothing_and_resumes(tiny_ckpt, tmp_path):
    vids = []
    for i in range(6):
        vids.append(
            write_video(tmp_path / f"v{i}.mp4", width=64, height=48, fps=8, n_frames=16 + i)
        )
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"video": Path(v).name}) + "\n" for v in vids))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "trace_rt", "batch", str(manifest), "--out", str(out)]
    cmd += ["--model", str(tiny_ckpt), "--max-new-tokens", "64"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if results.exists() and results.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = results.read_text().splitlines()
    assert 2 <= len(written) < 6, "the run should be killed midway"
    done = {json.loads(x)["key"] for x in written}
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    final = lines(out)
    assert [r["key"] for r in final[: len(written)]] == [json.loads(x)["key"] for x in written]
    assert len(final) == 6 and len({r["key"] for r in final}) == 6  # none twice
    assert all(r["status"] == "ok" for r in final)
    assert done < {r["key"] for r in final}


def test_cli_exit_status_and_summary(videos, tiny_ckpt, tmp_path):
    cmd = [sys.executable, "-m", "trace_rt", "batch", str(videos / "manifest.jsonl")]
    cmd += ["--out", str(tmp_path / "o"), "--model", str(tiny_ckpt), "--max-new-tokens", "4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr  # some items failed
    assert '"ok": 4, "failed": 3' in done.stderr
    assert "7/7 items (100%), 3 failed" in done.stderr
    done = subprocess.run([*cmd, "--address", "x"], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "--address is for --engine ray" in done.stderr


@pytest.mark.slow
def test_ray_engine_matches_local(videos, tiny_ckpt, tmp_path):
    ray = pytest.importorskip("ray", reason="ray (the `ray` extra) is not installed")
    local = tmp_path / "local"
    run_batch(videos / "manifest.jsonl", local, tiny_ckpt, max_new_tokens=TOKENS)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        counts = run_batch(
            videos / "manifest.jsonl",
            tmp_path / "ray",
            tiny_ckpt,
            engine="ray",
            max_new_tokens=TOKENS,
            ray_options={"actors": 2, "cpus_per_actor": 0.5, "decode_cpus": 0.5},
        )
    finally:
        ray.shutdown()
    assert counts == {"items": 7, "skipped": 0, "ok": 4, "failed": 3}
    want = {r["key"]: comparable(r) for r in lines(local)}
    got = {r["key"]: comparable(r) for r in lines(tmp_path / "ray")}
    assert got == want
