"""trace-rt eval mvbench / videomme: the published formats (fixtures written here), the
original's prompt, frame sampling and answer matching, and an end-to-end run on `tiny`."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tests.media import write_video
from trace_rt.cli import main as cli_main
from trace_rt.evaluation import runner
from trace_rt.evaluation import videoqa as vqa
from trace_rt.evaluation.annotations import AnnotationError

FAST = ["--frames", "4", "--max-new-tokens", "8", "--no-progress"]


# ---- answer matching: hand-made cases ----------------------------------------------------
@pytest.mark.parametrize(
    ("pred", "gt", "want"),
    [
        ("(B)", "(B) the red ball", True),  # option letter
        ("B. because", "(B) the red ball", True),
        ("Best option: (B)", "(B) the red ball", True),
        ("(B) the red ball.", "(B) the red ball", True),  # both
        ("(C) the blue ball", "(B) the red ball", False),  # another option, both parts
        ("the red ball", "(B) the red ball", False),  # text alone: no letter -> "(a)"
        ("the red ball", "(A) the red ball", True),  # ... which is right when A is
        ("I do not know", "(B) the red ball", False),  # neither
        ("It is red.", "(B) the red ball", False),  # "d." reads as option (d)
        ("(D) It is red.", "(D) yes", True),
    ],
)
def test_mvbench_check_ans(pred, gt, want):
    assert vqa.mvbench_correct(pred, gt) is want


@pytest.mark.parametrize(
    ("pred", "letter", "want"),
    [
        ("B", "B", False),  # a bare letter has no ")" or "." after it
        ("B.", "B", True),
        ("(B) the red ball", "B", True),  # both
        ("the red ball", "B", False),  # text alone: no letter, wrong
        ("(C)", "B", False),
        ("", "A", False),  # neither
    ],
)
def test_videomme_first_letter(pred, letter, want):
    assert vqa.videomme_correct(pred, letter) is want


def test_segment_indices_are_the_originals():
    # 40 frames at 10 fps, 4 segments of 9.75 frames: midpoints 4.875 + round(9.75 k).
    assert vqa.segment_indices(40, 10.0, 4).tolist() == [4, 14, 24, 33]
    # bound 1-2 s: frames 10..20, segments of 2.5 (numpy rounds halves to even).
    assert vqa.segment_indices(40, 10.0, 4, (1.0, 2.0)).tolist() == [11, 13, 16, 19]


# ---- fixtures in the published formats ---------------------------------------------------
def write_mvbench(root):
    """json/<task>.json as MVBench publishes them; the videos in the tasks' directories."""
    (root / "json").mkdir(parents=True)
    (root / "json" / "action_antonym.json").write_text(json.dumps([
        {"video": "a1.mp4", "question": "What is the person doing?",
         "candidates": ["opening a box", "closing a box", "not sure"], "answer": "closing a box"},
        {"video": "gone.mp4", "question": "What happens?",
         "candidates": ["x", "y"], "answer": "x"},
    ]))  # fmt: skip
    (root / "json" / "action_sequence.json").write_text(json.dumps([
        {"video": "S1.mp4", "question": 'What did the person do "first" {0}?',
         "candidates": ["Took the cup.", "Sat down."], "answer": "Sat down.",
         "start": 1.0, "end": 3.5},
    ]))  # fmt: skip
    vids = root / "video"
    (vids / "ssv2_video").mkdir(parents=True)
    (vids / "star" / "Charades_v1_480").mkdir(parents=True)
    write_video(vids / "ssv2_video" / "a1.mp4", width=64, height=48, fps=8, n_frames=24)
    write_video(vids / "star" / "Charades_v1_480" / "S1.mp4", width=64, height=48, fps=10,
                n_frames=40)  # fmt: skip
    return root / "json", vids


def write_videomme(root):
    rows = [
        {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "x",
         "url": "https://www.youtube.com/watch?v=vidA", "videoID": "vidA", "question_id": "001-1",
         "task_type": "Counting Problem", "question": "How many cups?",
         "options": ["A. One.", "B. Two.", "C. Three.", "D. Four."], "answer": "B"},
        {"video_id": "002", "duration": "long", "domain": "Sports", "sub_category": "y",
         "url": "https://www.youtube.com/watch?v=vidB", "question_id": "002-1",
         "task_type": "Action Reasoning", "question": "Why?",
         "options": ["A. Rain.", "B. Sun."], "answer": "A"},
    ]  # fmt: skip
    (root / "data").mkdir(parents=True)
    write_video(root / "data" / "vidA.mp4", width=64, height=48, fps=8, n_frames=24)
    write_video(root / "data" / "vidB.mp4", width=64, height=48, fps=8, n_frames=16)
    path = root / "videomme.json"
    path.write_text(json.dumps(rows))
    return path, rows


def test_readers_and_the_originals_prompt(tmp_path):
    jdir, _ = write_mvbench(tmp_path / "mvb")
    items = vqa.read_mvbench(sorted(jdir.glob("*.json")))
    assert [q.qid for q in items] == ["action_antonym/0", "action_antonym/1", "action_sequence/0"]
    seq = items[2]
    assert seq.answer == "B" and seq.bound == (1.0, 3.5) and seq.category == "Action Sequence"
    assert seq.answer_text == "(B) Sat down."
    assert vqa.prompt_question("mvbench", seq) == (
        "Watch the video carefully, noticing the cause and sequence of events, and then choose "
        "the best option for the given question.\n"
        'Question: What did the person do "first" {0}?\nOptions:\n(A) Took the cup.\n'
        "(B) Sat down.\nPlease think step by step and only give the best option that matches "
        "the question best."
    )
    path, _ = write_videomme(tmp_path / "mme")
    mme = vqa.read_videomme(path)
    assert [(q.qid, q.video, q.answer, q.options[1]) for q in mme] == [
        ("001-1", "vidA", "B", "Two."),
        ("002-1", "vidB", "A", "Sun."),  # the id from the url when videoID is absent
    ]
    assert mme[0].facets == {"duration": "short", "domain": "Knowledge"}
    assert vqa.prompt_question("videomme", mme[1]).endswith(
        "Question: Why?\nOptions:\n(A) Rain.\n(B) Sun.\nOnly give the best option."
    )


def test_bad_annotations_are_named(tmp_path):
    bad = tmp_path / "action_count.json"
    bad.write_text(json.dumps([{"video": "v.mp4", "question": "q", "candidates": ["a"],
                                "answer": "b"}]))  # fmt: skip
    with pytest.raises(AnnotationError, match=r"action_count.json\[0\].*not one of"):
        vqa.read_mvbench([bad])
    with pytest.raises(AnnotationError, match="not an MVBench task file"):
        vqa.read_mvbench([tmp_path / "whatever.json"])
    pq = tmp_path / "test.parquet"
    pq.write_bytes(b"PAR1")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(AnnotationError, match="needs pyarrow"):
            vqa.read_videomme(pq)


def test_score_counts_per_task_and_facet(tmp_path):
    path, _ = write_videomme(tmp_path)
    items = vqa.read_videomme(path)
    recs = {
        "001-1": {"release": {"captions": ["(B) Two."]}},  # right
        "002-1": {"release": {"captions": ["(B) Sun."]}},  # wrong
    }
    m = vqa.score_qa("videomme", items, recs)
    assert m["accuracy"] == 50.0 and m["predictions"] == 2
    assert m["per_task"]["Counting Problem"] == {"accuracy": 100.0, "correct": 1, "total": 1}
    assert m["by_duration"]["long"]["accuracy"] == 0.0
    assert m["accuracy · Action Reasoning"] == 0.0 and m["accuracy · domain=Knowledge"] == 100.0
    orig = vqa.original_results("videomme", items, recs)
    assert orig["acc_dict"] == {"Counting Problem": [1, 1], "Action Reasoning": [0, 1]}


# ---- end to end on tiny --------------------------------------------------------------------
@pytest.fixture(scope="module")
def art(tiny_ckpt, tmp_path_factory):
    from export.onnx_export import export_onnx

    return export_onnx(tiny_ckpt, tmp_path_factory.mktemp("qa-art") / "tiny", progress=False)


def test_mvbench_end_to_end_and_resume(art, tmp_path, capsys, monkeypatch):
    jdir, vids = write_mvbench(tmp_path / "mvb")
    out = tmp_path / "out"
    args = ["eval", "mvbench", "--annotations", str(jdir), "--videos", str(vids),
            "--model", str(art), "--out", str(out), *FAST]  # fmt: skip
    assert cli_main(args) == 0
    recs = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["key"] for r in recs] == ["action_antonym/0", "action_sequence/0"]
    assert all(len(r["token_ids"]) <= 8 for r in recs)
    assert recs[1]["question"].startswith("Watch the video carefully")
    assert '"first" {0}?' in recs[1]["question"]
    # The bounded question saw 4 segment midpoints of 1.0-3.5 s (frames 10..35 at 10 fps).
    assert recs[1]["frame_times"] == pytest.approx(
        vqa.segment_indices(40, 10.0, 4, (1.0, 3.5)) / 10.0
    )
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["task"] == "qa" and doc["published"]["accuracy"] == 53.8
    m = doc["metrics"]
    assert m["predictions"] == 2 and m["queries"] == 3 and m["missing_videos"] == 1
    assert set(m["per_task"]) == {"Action Antonym", "Action Sequence"}
    md = (out / "metrics.md").read_text()
    assert "| accuracy |" in md and "53.8" in md
    assert re.search(r"\| accuracy · Action Sequence \| [\d.]+ \| 68\.1 \|", md), md
    assert "Action Antonym" in (out / "report.html").read_text()
    refmt = json.loads((out / "refmt_qa.json").read_text())
    assert sum(v[1] for v in refmt["acc_dict"].values()) == 2
    assert "gone.mp4" in (out / "missing_videos.txt").read_text()
    # Resume: nothing is asked again.
    monkeypatch.setattr(runner._Engine, "answer", lambda *a: pytest.fail("asked again"))
    capsys.readouterr()
    assert cli_main(args) == 0
    assert "resuming: 2 predictions" in capsys.readouterr().err
    # Scoring the predictions alone gives the same figures.
    score = ["eval", "score", "mvbench", "--annotations", str(jdir),
             "--predictions", str(out / "predictions.jsonl")]  # fmt: skip
    assert cli_main(score) == 0
    brief = json.loads(capsys.readouterr().out.splitlines()[-1])["metrics"]
    assert brief["accuracy"] == m["accuracy"] and brief["predictions"] == 2


def test_videomme_end_to_end(art, tmp_path):
    path, _ = write_videomme(tmp_path / "mme")
    out = tmp_path / "out"
    args = ["eval", "videomme", "--annotations", str(path), "--videos", str(tmp_path / "mme"),
            "--model", str(art), "--out", str(out), *FAST]  # fmt: skip
    assert cli_main(args) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["published"]["accuracy"] == 49.6 and doc["metrics"]["predictions"] == 2
    assert doc["published"]["accuracy · duration=long"] == 42.3
    assert set(doc["metrics"]["by_duration"]) == {"short", "long"}
    recs = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    # Whole-video segment midpoints: 24 frames at 8 fps, 4 segments.
    assert recs[0]["frame_times"] == pytest.approx(vqa.segment_indices(24, 8.0, 4) / 8.0)
    # The score equals the rule applied to what the records say.
    items = vqa.read_videomme(path)
    want = np.mean([vqa.videomme_correct(vqa.prediction_text(r), q.answer)
                    for r, q in zip(recs, items, strict=True)]) * 100  # fmt: skip
    assert doc["metrics"]["accuracy"] == pytest.approx(want)


def test_default_budget_is_the_originals(tmp_path):
    s = runner.EvalSettings("mvbench", [], "", "")
    assert runner.token_budget(s) == 128
    assert runner.token_budget(runner.EvalSettings("charades-sta", [], "", "")) == 512
