"""trace-rt eval end to end: each benchmark's format, a tiny model exported to onnxruntime,
predictions written as they come, resume after an interruption, metrics.json; scoring the
original's prediction files; python -m training eval/convert on the same code."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from tests import eval_fixtures as fx
from tests.media import write_video
from trace_rt.cli import main as cli_main
from trace_rt.errors import InputError
from trace_rt.evaluation import runner
from trace_rt.evaluation.annotations import MomentQuery

FAST = ["--frames", "2", "--max-new-tokens", "8", "--no-java", "--no-progress"]


@pytest.fixture(scope="module")
def art(tiny_ckpt, tmp_path_factory):
    from export.onnx_export import export_onnx

    return export_onnx(tiny_ckpt, tmp_path_factory.mktemp("eval-art") / "tiny", progress=False)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval-videos")
    (d / "validation" / "101").mkdir(parents=True)
    for path in (d / "AAA.mp4", d / "v_BBB.mp4", d / "validation" / "101" / "CCC.mp4"):
        write_video(path, width=64, height=48, fps=8, n_frames=24)  # 3 s
    return d


CASES = {
    "charades-sta": (fx.write_charades, "c.txt", [], 2, 1),
    "coco-format": (fx.write_coco_mr, "test.caption_coco_format.json", [], 2, 1),
    "qvhighlights": (fx.write_qvhighlights, "hl.jsonl", [], 2, 0),
    "youcook2": (fx.write_youcook2, "yc.json", [], 2, 0),
    "activitynet-captions": (fx.write_activitynet, "val_1.json", [], 1, 0),
    "activitynet-mr": (fx.write_activitynet, "val_1.json", ["--task", "mr"], 2, 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_benchmark_end_to_end(case, art, videos, tmp_path, capsys):
    write, name, extra, n_pred, n_missing = CASES[case]
    bench = case.replace("activitynet-mr", "activitynet-captions")
    ann_file = write(tmp_path / name)
    out = tmp_path / "out"
    args = ["eval", bench, "--annotations", str(ann_file), "--videos", str(videos),
            "--model", str(art), "--out", str(out), *FAST, *extra]  # fmt: skip
    assert cli_main(args) == 0
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == n_pred
    rec = json.loads(lines[0])
    assert rec["token_ids"] and {"release", "events", "stop_reason"} <= set(rec)
    # The original's prompts: dvc-anet.txt for ActivityNet captions, queries stripped.
    assert rec["task"] == {"activitynet-captions": "dvc_activitynet"}.get(case, rec["task"])
    assert rec["query"] is None or rec["query"] == rec["query"].strip()
    doc = json.loads((out / "metrics.json").read_text())
    task = doc["task"]
    headline = {"mr": "mIoU", "vhd": "HIT@1", "dvc": "CIDEr"}[task]
    m = doc["metrics"]
    # Random weights: most generations hold no usable event; the original's averages then
    # have nothing to average and are None ("n/a"), never a made-up 0.
    empty = m["predictions"] == 0 or m.get("parsed") == 0
    assert headline in m and (m[headline] is None) == empty
    assert m["missing_videos"] == n_missing
    assert doc["published"] is not None or bench == "coco-format"
    assert len((out / "missing_videos.txt").read_text().splitlines()) == n_missing
    assert (out / f"refmt_{task}.json").is_file()
    md = (out / "metrics.md").read_text()
    assert "TRACE release (paper)" in md and md in capsys.readouterr().out
    if task == "dvc":  # --no-java: never a 0 for a metric that could not be computed
        assert doc["metrics"]["METEOR"] is None and "n/a" in md
        assert "disabled" in doc["metrics"]["unavailable"]["SODA_c"]


def _settings(tmp_path, art, videos, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    items = [*fx.CHARADES[:2], MomentQuery("2", "CCC", "the colour changes", (0.0, 1.0))]
    ann_file = fx.write_charades(tmp_path / "c.txt", items)
    kw = {"frames": 2, "max_new_tokens": 8, "progress": False} | kw
    return runner.EvalSettings("charades-sta", [str(ann_file)], str(videos), str(art),
                               out=str(tmp_path / "out"), **kw)  # fmt: skip


def test_resume_after_interruption(art, videos, tmp_path, monkeypatch):
    s = _settings(tmp_path, art, videos)
    calls: list[str] = []
    real = runner._Engine.answer
    interrupt = [True]

    def interrupted_at_second(self, w):
        calls.append(w.key)
        if len(calls) == 2 and interrupt and interrupt.pop():
            raise KeyboardInterrupt
        return real(self, w)

    monkeypatch.setattr(runner._Engine, "answer", interrupted_at_second)
    with pytest.raises(KeyboardInterrupt):
        runner.run_eval(s, log=lambda m: None)
    pred = tmp_path / "out" / "predictions.jsonl"
    assert [json.loads(x)["key"] for x in pred.read_text().splitlines()] == ["0"]
    assert not (tmp_path / "out" / "metrics.json").exists()
    with pred.open("a") as f:
        f.write('{"key": "1", "rele')  # a line torn by a kill in the middle of a write
    calls.clear()
    metrics = runner.run_eval(s, log=lambda m: None)
    assert calls == ["1", "2"]  # only what was missing
    assert [json.loads(x)["key"] for x in pred.read_text().splitlines()] == ["0", "1", "2"]
    assert metrics["queries"] == 3 and (tmp_path / "out" / "metrics.json").is_file()
    calls.clear()
    runner.run_eval(s, log=lambda m: None)
    assert calls == []
    with pytest.raises(InputError, match="max_new_tokens"):
        runner.run_eval(dataclasses.replace(s, max_new_tokens=9))


def test_bad_video_is_recorded_and_retried(art, videos, tmp_path):
    vids = tmp_path / "v"
    vids.mkdir()
    (vids / "AAA.mp4").symlink_to(videos / "AAA.mp4")
    (vids / "BBB.mp4").write_bytes(b"not a video at all")
    logs: list[str] = []
    s = _settings(tmp_path, art, vids)
    metrics = runner.run_eval(s, log=logs.append)
    assert metrics["errors"] == 1 and metrics["missing_videos"] == 1
    assert any(m.startswith("1: NotAVideoError") for m in logs)
    again = runner.run_eval(s, log=logs.append)  # the failed one is tried again
    assert again["errors"] == 1 and again["predictions"] == metrics["predictions"]


def test_concurrency_needs_a_server(art, videos, tmp_path):
    with pytest.raises(InputError, match="--url"):
        runner.run_eval(_settings(tmp_path, art, videos, concurrency=2))
    with pytest.raises(InputError, match="server's model"):
        runner.run_eval(_settings(tmp_path, art, videos, url="127.0.0.1:1"))


def test_onnxruntime_eval_does_not_import_torch(art, videos, tmp_path):
    ann_file = fx.write_charades(tmp_path / "c.txt")
    code = (
        "import sys; from trace_rt.cli import main; "
        f"rc = main(['eval', 'charades-sta', '--annotations', {str(ann_file)!r}, "
        f"'--videos', {str(videos)!r}, '--model', {str(art)!r}, '--out', {str(tmp_path / 'o')!r}, "
        "'--frames', '2', '--max-new-tokens', '4', '--no-progress']); "
        "assert rc == 0 and 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def _score(capsys, *args):
    assert cli_main(["eval", "score", *args, "--no-java"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["metrics"]


def test_score_the_originals_prediction_files(tmp_path, capsys):
    gts = fx.write_coco_mr(tmp_path / "test.caption_coco_format.json")
    refmt = tmp_path / "refmt.json"  # reformat_tvg.py's output: {} where no span was parsed
    refmt.write_text(json.dumps({"0": {"timestamp": [0.0, 1.5]}, "1": {}}))
    m = _score(capsys, "coco-format", "--annotations", str(gts), "--predictions", str(refmt))
    assert m["R@0.7"] == 100.0 and m["parsed"] == 1 and m["R@0.7 (all)"] == pytest.approx(100 / 3)
    raw = tmp_path / "fmt_charades_test_f128_result.json"  # evaluate.py's raw results
    raw.write_text(json.dumps([{"video": "/v/AAA.mp4", "id": 0, "timestamps": [[1.5, 0.0]],
                                "scores": [], "captions": [""]}]))  # fmt: skip
    args = ["coco-format", "--annotations", str(gts), "--predictions", str(raw)]
    assert _score(capsys, *args)["mIoU"] == 0.0  # reversed: IoU 0 under the original rules
    assert _score(capsys, *args, "--rules", "lenient")["mIoU"] == 100.0
    hl = fx.write_qvhighlights(tmp_path / "hl.jsonl")
    vhd = tmp_path / "vhd.json"
    vhd.write_text(json.dumps([{"qid": 7, "pred_saliency_scores": [1.0, 0.0, 0.5]}]))
    m = _score(capsys, "qvhighlights", "--annotations", str(hl), "--predictions", str(vhd))
    assert m["HIT@1"] == 100.0 and m["predictions"] == 1  # clip 0 has a 4 (VeryGood)
    yc = fx.write_youcook2(tmp_path / "yc.json")
    dvc = tmp_path / "dvc.json"
    dvc.write_text(json.dumps({"CCC.mp4": [{"timestamp": [0.0, 1.0], "caption": "crack eggs"}]}))
    out = tmp_path / "scored"
    args = ["youcook2", "--annotations", str(yc), "--predictions", str(dvc), "--out", str(out)]
    m = _score(capsys, *args)
    assert m["Precision"] == 100.0 and m["Recall"] == 50.0 and m["videos"] == 1
    assert json.loads((out / "metrics.json").read_text())["metrics"]["METEOR"] is None
    args = ["youcook2", "--annotations", str(yc), "--predictions", str(tmp_path / "no.jsonl")]
    assert cli_main(["eval", "score", *args]) == 2
    assert "predictions file not found" in capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys, art, videos):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    rc = cli_main(["eval", "qvhighlights", "--annotations", str(bad), "--videos", str(videos),
                   "--model", str(art), "--out", str(tmp_path / "o"), *FAST])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and f"{bad}:1: not valid JSON" in err and "Traceback" not in err
    charades = str(fx.write_charades(tmp_path / "c.txt"))
    rc = cli_main(["eval", "charades-sta", "--annotations", charades,
                   "--videos", str(tmp_path / "nope"), "--model", str(art), *FAST])  # fmt: skip
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_training_eval_uses_the_same_code(art, videos, tmp_path, capsys):
    from training.cli import main as train_main

    split = tmp_path / "val.json"
    split.write_text(json.dumps({"format": "trace-rt-train/1", "samples": [
        {"id": "q0", "video": str(videos / "AAA.mp4"), "task": "mr", "query": "a door opens",
         "events": [{"timestamps": [0.5, 2.0]}]}]}))  # fmt: skip
    assert train_main(["eval", str(art), "--data", str(split), "--max-new-tokens", "8"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["backend"] == "onnxruntime" and rep["rules"] == "original"  # inferred
    assert rep["template"] == "llama_2"  # the release's evaluation
    args = ["eval", str(art), "--data", str(split), "--max-new-tokens", "8"]
    assert train_main([*args, "--template", "mistral_instruct"]) == 0
    assert json.loads(capsys.readouterr().out)["template"] == "mistral_instruct"
    assert rep["whole_video_baseline"]["R@0.3 (all)"] == 100.0  # 1.5 s of 3 s: IoU 0.5
    assert train_main(["eval", str(art), "--data", str(tmp_path / "none.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert train_main(["eval", str(tmp_path / "empty"), "--data", str(split)]) == 2
    assert "neither an exported artifact" in capsys.readouterr().err


def test_training_eval_reads_dense_captions_event_by_event(art, videos, tmp_path, capsys):
    from training.cli import main as train_main

    split = tmp_path / "val.json"
    split.write_text(json.dumps({"format": "trace-rt-train/1", "samples": [
        {"id": "d0", "video": str(videos / "AAA.mp4"), "task": "dvc", "events": [
            {"timestamps": [0.0, 1.0], "caption": "a red circle"},
            {"timestamps": [1.5, 3.0], "caption": "a blue square"}]}]}))  # fmt: skip
    out = tmp_path / "dvc.json"
    args = ["eval", str(art), "--data", str(split), "--task", "dvc", "--max-new-tokens", "12"]
    assert train_main([*args, "--out", str(out)]) == 0
    m = json.loads(capsys.readouterr().out)["model_metrics"]
    assert m["events"] == 2 and m["videos"] == 1 and m["true_events_per_video"] == 2
    rows = json.loads(out.read_text())["predictions"]
    assert [p["caption"] for p in rows[0]["events"]] == ["a red circle", "a blue square"]
    assert m["events_per_video"] == len(rows[0]["pred"])
    # A split without dense-caption samples, and mr-only options, are named.
    mr = tmp_path / "mr.json"
    mr.write_text(json.dumps({"format": "trace-rt-train/1", "samples": [
        {"id": "q0", "video": str(videos / "AAA.mp4"), "task": "mr", "query": "a door opens",
         "events": [{"timestamps": [0.5, 2.0]}]}]}))  # fmt: skip
    assert train_main(["eval", str(art), "--data", str(mr), "--task", "dvc"]) == 2
    assert "no 'dvc' samples" in capsys.readouterr().err
    assert train_main([*args, "--constrained"]) == 2
    assert "--task mr only" in capsys.readouterr().err


def test_dense_events_are_paired_by_overlap_and_scored_by_words():
    from training.evaluate import dense_metrics, pair_events

    true = [((0.0, 2.0), "a red circle moves left"), ((3.0, 5.0), "a blue square moves up")]
    pred = [
        {"timestamp": [3.2, 5.0], "caption": "a blue triangle moves up."},
        {"timestamp": [0.0, 1.9], "caption": "a red circle moves left."},
        {"timestamp": [0.5, 4.0], "caption": "a yellow square moves down."},
    ]
    pairs = pair_events(true, pred)
    assert [p["pred_caption"] for p in pairs] == [pred[1]["caption"], pred[0]["caption"]]
    assert pairs[0]["exact"] and not pairs[1]["exact"]
    assert pairs[1]["words"] == pytest.approx(4 / 5)  # a, blue, moves, up; not square
    m = dense_metrics(pairs)
    assert m["located@0.5"] == 100.0 and m["exact_captions"] == 50.0
    assert m["caption_words"] == pytest.approx(90.0)
    # No prediction overlapping an event: nothing paired, nothing said.
    far = pair_events(true, [{"timestamp": [8.0, 9.0], "caption": "a red circle moves left"}])
    assert [p["pred_caption"] for p in far] == [None, None]
    assert dense_metrics(far) == {"events": 2, "located@0.5": 0.0, "caption_words": 0.0,
                                  "exact_captions": 0.0}  # fmt: skip
    with pytest.raises(ValueError, match="no true events"):
        dense_metrics([])


def test_training_convert_reads_the_official_files(videos, tmp_path):
    from training.convert import convert
    from training.data import load_split

    out = tmp_path / "data"
    out.mkdir()
    txt = fx.write_charades(tmp_path / "charades_sta_train.txt")
    assert convert(txt, out / "mr.json", video_root=videos) == 3
    mr = load_split(out / "mr.json")
    assert mr[1].video == (videos / "v_BBB.mp4").resolve() and mr[1].events[0].timestamps == (
        1,
        2.5,
    )
    hl = fx.write_qvhighlights(tmp_path / "highlight_train_release.jsonl")
    assert convert(hl, out / "vhd.json", video_root=videos) == 2
    vhd = load_split(out / "vhd.json")
    assert [(e.timestamps, e.scores) for e in vhd[0].events] == [((1.0,), (4.0,)), ((5.0,), (3.0,))]
    yc = fx.write_youcook2(tmp_path / "youcookii_annotations_trainval.json")
    assert convert(yc, out / "yc.json", video_root=videos, subset="validation") == 2
    (ccc, _) = load_split(out / "yc.json")
    assert ccc.video == (videos / "validation" / "101" / "CCC.mp4").resolve()
    assert [e.caption for e in ccc.events] == ["crack the eggs", "whisk them"]


def test_url_mode_equals_local_run(art, videos, tmp_path):
    """--url against a real tritonserver (trace-rt serve's), two requests in flight: the
    same generations as the local onnxruntime run."""
    from tests.triton_server import running_server
    from triton_repo.build import build_repository

    repo = build_repository(art, tmp_path / "repo", max_new_tokens=64, progress=False)
    local = runner.run_eval(_settings(tmp_path / "local", art, videos, frames=None))
    with running_server(repo) as server:
        s = _settings(tmp_path / "remote", art, videos, frames=None, url=server.grpc_url)
        remote = runner.run_eval(dataclasses.replace(s, concurrency=2))
    assert remote == local and remote["errors"] == 0

    def ids(d):
        lines = (d / "out" / "predictions.jsonl").read_text().splitlines()
        return {r["key"]: r["token_ids"] for r in map(json.loads, lines)}

    assert ids(tmp_path / "remote") == ids(tmp_path / "local") and len(ids(tmp_path / "local")) == 3
