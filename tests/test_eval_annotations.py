"""Official annotation files: written in their published formats, read back; bad files
and hostile video ids are reported clearly."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tests import eval_fixtures as fx
from trace_rt.evaluation import annotations as ann
from trace_rt.evaluation import benchmarks as bm
from trace_rt.evaluation.videos import InvalidVideoIdError, VideoIndex


def test_round_trips(tmp_path):
    assert ann.read_charades_txt(fx.write_charades(tmp_path / "c.txt")) == fx.CHARADES
    coco = ann.read_coco_format(fx.write_coco_mr(tmp_path / "test.caption_coco_format.json"))
    assert coco == [dataclasses.replace(q, duration=3.0) for q in fx.CHARADES]
    assert ann.read_qvhighlights(fx.write_qvhighlights(tmp_path / "hl.jsonl")) == fx.HIGHLIGHTS
    assert ann.read_youcook2(fx.write_youcook2(tmp_path / "yc.json")) == fx.YOUCOOK
    assert [v.video for v in ann.read_youcook2(tmp_path / "yc.json", "training")] == ["TRAIN1"]
    assert ann.read_activitynet([fx.write_activitynet(tmp_path / "val_1.json")]) == fx.ANET
    dense = ann.read_coco_format(fx.write_coco_dvc(tmp_path / "val.caption_coco_format.json"))
    # The original's YouCook2 rule: pure_cap split at ". ", each caption + "."; split val = 2.
    assert [v.captions for v in dense] == [("crack the eggs.", "whisk them."), ("add salt.",)]
    assert dense[0].segments == fx.YOUCOOK[0].segments and dense[0].splits == (2, 2)
    assert dense[0].video == "CCC.mp4"


def test_activitynet_sets_merge_and_mr_queries(tmp_path):
    a = fx.write_activitynet(tmp_path / "val_1.json")
    other = [dataclasses.replace(fx.ANET[0], segments=((0.5, 1.0),), captions=("Runs.",))]
    b = fx.write_activitynet(tmp_path / "val_2.json", other)
    (v,) = ann.read_activitynet([a, b])
    assert v.splits == (1, 1, 2) and v.captions[-1] == "Runs."
    task, qs = bm.load(bm.get_benchmark("activitynet-captions"), [a], "mr")
    assert task == "mr" and [q.qid for q in qs] == ["v_BBB#0", "v_BBB#1"]
    assert qs[1].span == (1.0, 3.0) and qs[1].query == "He jumps."


def test_malformed_lines_name_file_and_line(tmp_path):
    p = tmp_path / "charades_sta_test.txt"
    p.write_text("AAA 0.0 1.5##fine\nBBB 1.0##no end time\n\nCCC x 2##bad number\n")
    with pytest.raises(ann.AnnotationError) as e:
        ann.read_charades_txt(p)
    assert f"{p}:2:" in str(e.value) and f"{p}:4:" in str(e.value) and "2 problem" in str(e.value)
    q = tmp_path / "hl.jsonl"
    good = json.loads(fx.write_qvhighlights(q).read_text().splitlines()[0])
    bad_clip = good | {"relevant_clip_ids": [0, 99]}
    q.write_text(json.dumps(good) + "\n{not json\n" + json.dumps(bad_clip) + "\n[1]\n")
    with pytest.raises(ann.AnnotationError) as e:
        ann.read_qvhighlights(q)
    msg = str(e.value)
    assert f"{q}:2: not valid JSON" in msg and f"{q}:3: clip id 99" in msg and f"{q}:4:" in msg


def test_bad_json_and_wrong_schema(tmp_path):
    p = tmp_path / "val_1.json"
    p.write_text('{"v_a": {"timestamps": [[0, 1]],\n "sentences": ["x",]}}')
    with pytest.raises(ann.AnnotationError, match=r"val_1.json:2:\d+: not valid JSON"):
        ann.read_activitynet([p])
    p.write_text(json.dumps({"v_a": {"timestamps": [[0, 1], [2, 3]], "sentences": ["x"]},
                             "v_b": {"timestamps": [[0, -1]], "sentences": ["y"]}}))  # fmt: skip
    with pytest.raises(ann.AnnotationError) as e:
        ann.read_activitynet([p])
    assert "['v_a']: 2 timestamps but 1 sentences" in str(e.value) and "'v_b'" in str(e.value)
    p.write_text("[" * 100_000)
    with pytest.raises(ann.AnnotationError, match="nested too deeply"):
        ann.read_activitynet([p])
    p.write_text(json.dumps([1, 2]))
    with pytest.raises(ann.AnnotationError, match="expected"):
        ann.read_youcook2(p)
    with pytest.raises(ann.AnnotationError, match="not found"):
        ann.read_qvhighlights(tmp_path / "nope.jsonl")
    with pytest.raises(ann.AnnotationError, match="unknown benchmark"):
        bm.get_benchmark("kinetics")
    with pytest.raises(ann.AnnotationError, match="one annotation file"):
        bm.load(bm.get_benchmark("qvhighlights"), [p, p])


def test_video_ids_cannot_escape_the_videos_dir(tmp_path):
    videos = tmp_path / "videos"
    (videos / "validation" / "101").mkdir(parents=True)
    (videos / "AAA.mp4").write_bytes(b"x")
    (videos / "v_BBB.mkv").write_bytes(b"x")
    (videos / "validation" / "101" / "CCC.webm").write_bytes(b"x")
    (tmp_path / "secret.mp4").write_bytes(b"x")
    index = VideoIndex(videos)
    assert index.find("AAA") == videos / "AAA.mp4" and index.find("AAA.mp4") == videos / "AAA.mp4"
    assert index.find("BBB") == videos / "v_BBB.mkv"  # ActivityNet's v_ prefix, any extension
    assert index.find("CCC") == videos / "validation" / "101" / "CCC.webm"  # nested layout
    assert index.find("DDD") is None
    for bad in ("../secret", "../secret.mp4", "/etc/passwd", "..", ".hidden", "a\\b", "a\0b", ""):
        with pytest.raises(InvalidVideoIdError, match="plain file name"):
            index.find(bad)
    with pytest.raises(NotADirectoryError, match="does not exist"):
        VideoIndex(tmp_path / "none")
