"""HTML timeline reports (`trace-rt run --report`): rendered, then opened in a real
headless Chromium (Debian's `chromium` package) where the DOM, clicks, the player and
every network request are checked."""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.browser import Browser, find_chromium
from tests.media import write_video
from trace_rt.timeline import MAX_EMBED_BYTES, player_source, write_report
from trace_rt.timeline.render import Page, render, salience, spans, tick_step

CHROMIUM = find_chromium()
needs_browser = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium: `apt-get install chromium` (setup.sh does it as root on Debian)",
)
HOSTILE = "</script><script>window.pwned=1</script> \"quoted\" 'single' & ünïcødé ✓ <b>bold</b>"


def result(task: str, events: list[dict], duration: float = 4.0, frames: int = 8) -> dict:
    return {
        "video": "clip.webm",
        "task": task,
        "duration": duration,
        "frames": frames,
        "events": events,
        "frame_times": [round(i * duration / frames, 3) for i in range(frames)],
        "stop_reason": "eos",
        "timing_ms": {"video": 5.0, "vision": 9.0, "prefill": 7.0, "decode": 30.0, "total": 51.0},
    }


DVC = [
    {"timestamps": [0.2, 1.6], "scores": [3.0], "caption": "a red square appears"},
    {"timestamps": [1.0, 3.1], "scores": [4.0], "caption": HOSTILE},
    {"timestamps": [3.2, 3.9], "scores": [], "caption": "it leaves"},
]
MR = [{"timestamps": [1.1, 2.6], "scores": [], "caption": ""}]
VHD = [
    {"timestamps": [0.5, 1.0, 1.5], "scores": [1.0, 3.5, 2.0], "caption": ""},
    {"timestamps": [3.0], "scores": [4.5], "caption": ""},
]


@pytest.fixture(scope="module")
def webm(tmp_path_factory) -> Path:
    """A VP9 WebM clip (a codec every Chromium build plays) in the reports' folder."""
    out = tmp_path_factory.mktemp("reports")
    return Path(write_video(out / "clip.webm", 160, 120, 10, 40, codec="libvpx-vp9"))


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium")
    with Browser(CHROMIUM) as b:
        yield b


# --- rendering, no browser -------------------------------------------------------------


def test_spans_are_packed_into_rows_without_overlap():
    got = spans([*DVC, {"timestamps": [5.0], "scores": [], "caption": "point"}])
    assert [(s.start, s.end, s.row) for s in got] == [
        (0.2, 1.6, 0),
        (1.0, 3.1, 1),
        (3.2, 3.9, 0),
        (5.0, 5.0, 0),
    ]


def test_salience_pairs_each_timestamp_with_its_score():
    assert salience(VHD) == [(0.5, 1.0), (1.0, 3.5), (1.5, 2.0), (3.0, 4.5)]
    # Fewer scores than timestamps: the event's last score carries on.
    assert salience([{"timestamps": [2.0, 1.0], "scores": [4.0]}]) == [(1.0, 4.0), (2.0, 4.0)]


def test_ticks():
    assert tick_step(4.0) == 0.5
    assert tick_step(600.0) == 60
    assert tick_step(7200.0) == 900


def test_user_and_model_text_is_escaped():
    page = render(Page(result("dvc", DVC), {"task": "dvc", "query": HOSTILE}))
    assert "window.pwned" in page  # present, as text ...
    assert "<script>window.pwned" not in page  # ... never as markup
    assert "<b>bold" not in page
    assert html.escape(HOSTILE, quote=True) in page
    # The embedded JSON cannot close its <script> element.
    data = re.search(r'<script type="application/json" id="trace-data">(.*?)</script>', page, re.S)
    assert data and "<" not in data.group(1)
    assert len(re.findall(r"<script", page)) == 2  # the data block and the page's own code


def test_player_source_beside_the_page_or_embedded(tmp_path):
    video = Path(write_video(tmp_path / "my clip #1.mp4", 32, 24, 5, 5))
    assert player_source(video, tmp_path / "r.html") == "my%20clip%20%231.mp4"
    assert player_source(video, tmp_path / "sub" / "r.html") is None  # not beside the page
    src = player_source(video, tmp_path / "sub" / "r.html", embed=True)
    assert src.startswith("data:video/mp4;base64,")
    big = tmp_path / "big.mp4"
    with open(big, "wb") as f:
        f.truncate(MAX_EMBED_BYTES + 1)
    with pytest.raises(Exception, match="over the 16 MiB"):
        player_source(big, tmp_path / "r.html", embed=True)


def test_ten_minute_128_frame_answer_is_under_2_mb(tmp_path):
    # Noise is the worst case for JPEG: every thumbnail as large as it gets.
    rng = np.random.default_rng(0)
    video = tmp_path / "long.mp4"
    frames = [rng.integers(0, 256, (180, 320, 3), dtype=np.uint8) for _ in range(150)]
    _write_frames(video, frames, fps=0.25)  # 150 frames over 600 s
    events = [
        {"timestamps": [i * 14.0, i * 14.0 + 10.0], "scores": [3.0], "caption": "word " * 30}
        for i in range(40)
    ]
    res = result("dvc", events, duration=600.0, frames=128)
    out = write_report(tmp_path / "long.html", res, video=video, request={"task": "dvc"})
    text = out.read_text()
    assert text.count('class="thumb"') == 128
    assert out.stat().st_size < 2_000_000, out.stat().st_size


def _write_frames(path: Path, frames: list[np.ndarray], fps: float) -> None:
    from fractions import Fraction

    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=Fraction(fps).limit_denominator(100))
        s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode(None))


# --- in a real browser -------------------------------------------------------------------


def _open(browser: Browser, path: Path) -> None:
    browser.events.clear()
    browser.open(path)


def _dom_events(browser: Browser) -> list[dict]:
    return browser.eval(
        "[...document.querySelectorAll('.track .event')].map(e => ({index: +e.dataset.index,"
        " start: e.dataset.start, end: e.dataset.end,"
        " caption: e.querySelector('.caption').textContent}))"
    )


def _assert_offline(browser: Browser) -> None:
    urls = browser.requests()
    assert urls, "the page itself was not seen loading"
    assert all(u.startswith(("file:", "data:")) for u in urls), [u[:80] for u in urls]
    assert browser.log_errors() == []


@needs_browser
@pytest.mark.parametrize("task,events", [("dvc", DVC), ("mr", MR), ("vhd", VHD)])
def test_page_in_chromium(browser, webm, task, events):
    out = webm.parent / f"{task}.html"
    res = result(task, events)
    write_report(out, res, video=webm, request={"task": task, "query": "a red square"})
    _open(browser, out)
    dom = _dom_events(browser)
    assert len(dom) == len(events)
    for d, ev in zip(dom, events, strict=True):
        ts = ev["timestamps"]
        assert float(d["start"]) == pytest.approx(ts[0])
        assert float(d["end"]) == pytest.approx(ts[-1] if len(ts) > 1 else ts[0])
        if ev["caption"]:
            assert d["caption"] == ev["caption"]  # hostile text arrives verbatim, as text
    assert browser.eval("window.pwned === undefined")
    assert browser.eval("document.querySelectorAll('.thumb').length") == 8
    if task == "vhd":
        assert browser.eval("document.querySelectorAll('svg.salience .point').length") == 4
    # A real mouse click on the last event seeks the player to its start.
    last = len(events) - 1
    browser.click(f'.track .event[data-index="{last}"]')
    start = events[last]["timestamps"][0]
    state = browser.eval(
        "({seek: window.traceTimeline.lastSeek, t: document.getElementById('player').currentTime,"
        " ready: document.getElementById('player').readyState})"
    )
    assert state["seek"] == pytest.approx(start)
    assert state["ready"] >= 1 and state["t"] == pytest.approx(start, abs=0.05)
    shot = browser.screenshot(webm.parent / f"{task}.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    _assert_offline(browser)


@needs_browser
def test_ground_truth_track(browser, webm):
    out = webm.parent / "gt.html"
    write_report(out, result("mr", MR), video=webm, ground_truth=[(1.5, 3.0, "")], gt_iou=0.58)
    _open(browser, out)
    gt = browser.eval(
        "(() => { const g = document.querySelector('.gt-track .gt');"
        " return [g.dataset.start, g.dataset.end, g.parentElement.dataset.iou,"
        " g.textContent]; })()"
    )
    assert gt == ["1.500", "3.000", "0.580", "ground truth · IoU 0.58"]


@needs_browser
def test_the_network_check_sees_requests_and_the_policy_blocks_them(browser, tmp_path):
    # The instrument: a page without our policy that loads a loopback URL is caught.
    probe = tmp_path / "probe.html"
    probe.write_text('<img src="http://127.0.0.1:9/x.png">')
    _open(browser, probe)
    assert any(u.startswith("http://127.0.0.1:9/") for u in browser.requests())
    # Our page's Content-Security-Policy refuses the same load, even if text slipped in.
    page = render(Page(result("dvc", DVC), {"task": "dvc"}))
    evil = tmp_path / "evil.html"
    evil.write_text(page.replace("<main>", '<main><img src="http://127.0.0.1:9/y.png">'))
    _open(browser, evil)
    assert not any(u.startswith("http") for u in browser.requests())
    assert browser.requests(blocked=True) == ["http://127.0.0.1:9/y.png"]
    assert any("Content Security Policy" in e for e in browser.log_errors())


@needs_browser
def test_trace_rt_run_report_end_to_end(browser, tiny_ckpt, tmp_path):
    """`trace-rt run --report` on the tiny checkpoint, every task: the page shows exactly
    the events of the printed JSON, and with --embed-video plays the clip from inside."""
    video = Path(write_video(tmp_path / "clip.webm", 96, 64, 10, 40, codec="libvpx-vp9"))
    for task in ("dvc", "mr", "vhd"):
        out = tmp_path / "elsewhere" / f"{task}.html"
        cmd = [sys.executable, "-m", "trace_rt", "run", str(video), "--model", str(tiny_ckpt)]
        cmd += ["--task", task, "--constrained", "--max-new-tokens", "48", "--report", str(out)]
        cmd += ["--embed-video"] + (["--query", "a red square"] if task != "dvc" else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        res = json.loads(proc.stdout)
        _open(browser, out)
        dom = _dom_events(browser)
        assert len(dom) == len(res["events"])
        for d, ev in zip(dom, res["events"], strict=True):
            if ev["timestamps"]:
                assert float(d["start"]) == pytest.approx(ev["timestamps"][0], abs=1e-3)
        n = browser.eval("document.querySelectorAll('.thumb').length")
        assert n == len(res["frame_times"]) == 8
        assert browser.eval("document.getElementById('player').src.startsWith('data:video/')")
        _assert_offline(browser)


# --- trace-rt eval's report.html -----------------------------------------------------


def _mr_record(key: str, video: Path, span: list[float] | None, caption: str = "it") -> dict:
    release = {
        "timestamps": [span] if span else [],
        "scores": [[3.0]] if span else [],
        "captions": [caption],
        "kept": True,
        "malformed": 0,
    }
    return {
        "key": key,
        "video_id": video.stem,
        "video": str(video),
        "task": "mr",
        "duration": 4.0,
        "frames": 4,
        "release": release,
        "events": [{"timestamps": span or [], "scores": [3.0], "caption": caption}],
    }


@pytest.fixture(scope="module")
def eval_report(webm):
    from trace_rt.evaluation.annotations import MomentQuery
    from trace_rt.timeline.evalpage import write_eval_report

    out = webm.parent / "eval"
    items = [
        MomentQuery("q1", "clip", "exact", (1.0, 2.0), 4.0),
        MomentQuery("q2", "clip", "half", (1.0, 3.0), 4.0),
        MomentQuery("q3", "clip", "reversed <b>span</b>", (1.0, 2.0), 4.0),
        MomentQuery("q4", "clip", "no span", (0.0, 1.0), 4.0),
        MomentQuery("q5", "clip", "not answered", (0.0, 1.0), 4.0),
    ]
    records = {
        "q1": _mr_record("q1", webm, [1.0, 2.0]),
        "q2": _mr_record("q2", webm, [2.0, 3.0]),
        "q3": _mr_record("q3", webm, [2.0, 1.0]),  # the original scores a reversed span 0
        "q4": _mr_record("q4", webm, None),
    }
    metrics = {"R@0.5": 66.7, "mIoU": 50.0, "queries": 5, "predictions": 4, "rules": "original"}
    settings = {"model": "ckpt", "rules": "original"}
    bench_md = out / "bench.md"
    out.mkdir(parents=True, exist_ok=True)
    bench_md.write_text("# bench\n")
    page = write_eval_report(
        out, "charades-sta", "mr", items, records, metrics, settings, n=2, links=[bench_md]
    )
    return page


def test_eval_report_scores_items_by_the_benchmark_rules(eval_report):
    from trace_rt.evaluation.annotations import MomentQuery
    from trace_rt.timeline.evalpage import score_items

    items = [MomentQuery("a", "v", "q", (1.0, 2.0)), MomentQuery("b", "v", "q", (1.0, 2.0))]
    recs = {"a": _mr_record("a", Path("v.mp4"), [2.0, 1.0])}
    original = {s.key: s.score for s in score_items("mr", items, recs, "original")}
    lenient = {s.key: s.score for s in score_items("mr", items, recs, "lenient")}
    assert original == {"a": 0.0, "b": 0.0}  # reversed: 0 by the original's rule
    assert lenient == {"a": 1.0, "b": 0.0}  # sorted first by the lenient rule
    text = eval_report.read_text()
    assert "reversed &lt;b&gt;span&lt;/b&gt;" in text and "<b>span" not in text


@needs_browser
def test_eval_report_in_chromium(browser, eval_report):
    _open(browser, eval_report)
    metrics = browser.eval(
        "[...document.querySelectorAll('tr.metric')].map(r => [r.dataset.name,"
        " r.children[1].textContent, r.children[2].textContent])"
    )
    assert ["R@0.5", "66.7", "40.3"] in metrics and ["mIoU", "50.0", "38.7"] in metrics
    bars = browser.eval("[...document.querySelectorAll('.hist .bar')].map(b => +b.dataset.count)")
    assert bars == [3, 0, 0, 0, 0, 1, 0, 0, 0, 1]  # IoU 0, 0, 0, 0.5, 1
    rows = browser.eval(
        "[...document.querySelectorAll('tr.item')].map(r => [r.dataset.key, +r.dataset.score])"
    )
    assert rows[:2] == [["q1", 1.0], ["q2", 0.5]]  # best 2
    assert [k for k, _ in rows[2:]] == ["q3", "q4"]  # worst 2 (ties by key)
    links = browser.eval("[...document.querySelectorAll('a')].map(a => a.getAttribute('href'))")
    assert "bench.md" in links
    item_links = [h for h in links if h.startswith("items/")]
    assert len(item_links) == 4  # q1 q2 q3 q4 have a page; q5 had no prediction
    _assert_offline(browser)
    # The best item's own page: its frames, the reference span and the same IoU.
    _open(browser, eval_report.parent / item_links[0])
    gt = browser.eval("document.querySelector('.gt-track').dataset.iou")
    assert gt == "1.000"
    assert browser.eval("document.querySelectorAll('.thumb').length") == 4
    assert browser.eval("document.getElementById('player') !== null")
    _assert_offline(browser)


def test_thumbnails_keep_the_first_frames_size():
    from trace_rt.timeline.thumbs import shrinker

    shrink = shrinker(72)
    a = shrink(np.zeros((1080, 1920, 3), np.uint8))
    b = shrink(np.zeros((480, 640, 3), np.uint8))  # the stream changed resolution midway
    assert a.shape == b.shape == (72, 128, 3)
