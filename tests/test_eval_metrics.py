"""trace-rt eval's metrics against hand-computed values (and pycocoevalcap's CIDEr)."""

from __future__ import annotations

import numpy as np
import pytest

from trace_rt.evaluation.annotations import CaptionedVideo
from trace_rt.evaluation.captions import cider_d, java_status, simple_ptb_tokenize
from trace_rt.evaluation.dense import best_matching_score, dense_metrics, detection_scores, dvc_iou
from trace_rt.evaluation.metrics import (
    average_precision,
    gt_clip_scores,
    highlight_metrics,
    iou_original,
    iou_sorted,
    moment_metrics,
)

GTS = {"a": (0.0, 10.0), "b": (2.0, 6.0), "c": (0.0, 4.0), "d": (5.0, 9.0), "e": (1.0, 3.0)}
# IoU 1, 1/3, reversed (original 0, sorted 1/2), no span ([0, 0]: 0); "e" has no prediction.
PREDS = {"a": (0.0, 10.0), "b": (0.0, 4.0), "c": (3.0, 1.0), "d": None}


def test_iou_rules():
    assert iou_original((2.0, 6.0), (0.0, 4.0)) == pytest.approx(2 / 6)
    assert iou_original((0.0, 4.0), (3.0, 1.0)) == 0.0  # reversed span: no intersection
    assert iou_sorted((0.0, 4.0), (3.0, 1.0)) == pytest.approx(0.5)
    # Zero-length spans: the original would divide by zero on an exact hit; 0 here.
    assert iou_original((2.0, 2.0), (2.0, 2.0)) == 0.0 and iou_sorted((2.0, 2.0), (2.0, 2.0)) == 1
    assert iou_original((2.0, 2.0), (1.0, 3.0)) == 0.0 and iou_sorted((2.0, 2.0), (3.0, 3.0)) == 0
    assert iou_original((0.0, 10.0), (0.0, 5.0)) == 0.5  # a tie with the 0.5 threshold


def test_moment_metrics_original_denominators():
    m = moment_metrics(GTS, PREDS)
    # Parsed predictions: a, b, c (d has no span, e no prediction) -> the original's num = 3.
    assert m["parsed"] == 3 and m["predictions"] == 4 and m["queries"] == 5
    assert m["R@0.3"] == pytest.approx(100 * 2 / 3)
    assert m["R@0.5"] == pytest.approx(100 / 3) and m["R@0.7"] == pytest.approx(100 / 3)
    assert m["mIoU"] == pytest.approx(100 * (1 + 1 / 3) / 3)
    assert m["R@0.3 (all)"] == pytest.approx(40.0)
    assert m["mIoU (all)"] == pytest.approx(100 * (1 + 1 / 3) / 5)


def test_moment_metrics_lenient_and_ties():
    m = moment_metrics(GTS, PREDS, sort_spans=True)
    assert m["R@0.3"] == pytest.approx(100.0) and m["R@0.5"] == pytest.approx(200 / 3)
    assert m["mIoU"] == pytest.approx(100 * (1 + 1 / 3 + 0.5) / 3)
    tie = moment_metrics({"q": (0.0, 10.0)}, {"q": (0.0, 5.0)})  # IoU exactly 0.5 counts
    assert tie["R@0.5"] == 100.0 and tie["R@0.7"] == 0.0


def test_moment_metrics_empty_and_unparsed():
    # Nothing parsed: the original's denominator is 0 (it would divide by zero) -> None.
    empty = moment_metrics(GTS, {})
    assert empty["R@0.3"] is None and empty["mIoU"] is None and empty["parsed"] == 0
    assert empty["mIoU (all)"] == 0.0
    none = moment_metrics(GTS, dict.fromkeys(GTS))  # every query without a span
    assert none["mIoU"] is None and none["R@0.3 (all)"] == 0.0 and none["predictions"] == 5
    zero = moment_metrics({"z": (2.0, 2.0)}, {"z": (2.0, 2.0)}, sort_spans=True)
    assert zero["R@0.7"] == 100.0


def test_average_precision_hand_values():
    # Ranked 1,0,1,0: precision 1 at recall 1/2, 2/3 at recall 1 -> AP 5/6.
    assert average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(5 / 6)
    # A tie at the top holding one positive of two: one point (P 1/2, R 1/2) -> AP 2/3.
    assert average_precision([1, 0, 1], [0.5, 0.5, 0.2]) == pytest.approx(2 / 3)
    assert average_precision([0, 0, 0], [0.3, 0.2, 0.1]) == 0.0
    assert average_precision([1, 1], [0.0, 0.0]) == 1.0
    # Constant predictions: one point at full recall -> AP = share of positives.
    assert average_precision([1, 0, 0, 0], [0.0] * 4) == pytest.approx(0.25)


def test_highlight_metrics_hit_and_map():
    gts = {
        "q1": gt_clip_scores(3, [1, 2], [[4, 0, 0], [3, 3, 3]]),
        "q2": gt_clip_scores(3, [0], [[3, 3, 3]]),
        "q3": gt_clip_scores(3, [0], [[4, 4, 4]]),
    }
    preds = {
        "q1": [0.1, 0.9, 0.9],  # tie: argmax takes clip 1 (VeryGood by one annotator)
        "q2": [5.0, 0.0],  # shorter than the video: zero-padded
        "q3": [],  # no clip predicted: no hit
        "q4": [1.0],  # not in the ground truth: ignored
    }
    m = highlight_metrics(gts, preds)
    assert m["VeryGood"]["queries"] == 3
    assert m["VeryGood"]["HIT@1"] == pytest.approx(100 / 3)
    assert m["Good"]["HIT@1"] == pytest.approx(200 / 3)
    # VeryGood APs: q1 annotator 0 -> clip 1 tied with clip 2 at the top: 1/2; annotators
    # 1, 2 all-negative: 0. q2: all-negative: 0. q3: all clips 0 -> AP 1/3 each.
    assert m["VeryGood"]["mAP"] == pytest.approx(100 * (0.5 + 3 * (1 / 3)) / 9)


def test_dvc_iou_detection_and_matching():
    assert dvc_iou((0.0, 4.0), (2.0, 6.0)) == pytest.approx(2 / 6, abs=1e-6)
    assert dvc_iou((6.0, 2.0), (2.0, 6.0)) == pytest.approx(1.0, abs=1e-6)  # sorted
    assert dvc_iou((1.0, 1.0), (1.0, 1.0)) == 0.0  # zero length: 0 / (0 + 1e-8)
    gt = CaptionedVideo("v", 10.0, ((0.0, 4.0), (5.0, 9.0)), ("a", "b"), (1, 1))
    # (0, 2) vs (0, 4): IoU 2 / (4 + 1e-8), just under 0.5: not a hit at 0.5.
    p, r = detection_scores([(0.0, 2.0), (5.0, 9.0), (9.5, 10.0)], gt, (0.3, 0.5))
    assert p == pytest.approx([2 / 3, 1 / 3]) and r == pytest.approx([1.0, 0.5])
    assert detection_scores([], gt, (0.5,)) == ([0.0], [0.0])
    assert best_matching_score(np.array([[1.0, 0.0], [0.0, 1.0]])) == 2.0
    assert best_matching_score(np.array([[0.0, 1.0], [1.0, 0.0]])) == 1.0  # no crossing
    assert best_matching_score(np.array([[0.2, 0.9, 0.1]])) == pytest.approx(0.9)


def test_cider_d_matches_pycocoevalcap():
    cider = pytest.importorskip("pycocoevalcap.cider.cider")
    refs = {"1": ["a man cuts onions", "a person slices an onion"], "2": ["he adds salt"],
            "3": ["the dog runs"], "4": ["stir the soup"]}  # fmt: skip
    hyps = {"1": "a man is cutting onions", "2": "adds salt", "3": "a dog runs fast", "4": ""}
    ours, per = cider_d(refs, hyps)
    theirs, their_per = cider.Cider().compute_score(refs, {k: [v] for k, v in hyps.items()})
    assert ours == pytest.approx(theirs) and list(per.values()) == pytest.approx(their_per)


def test_cider_d_hand_values():
    # One pair: idf = log(1) - log(1) = 0 for every n-gram -> 0 (the per-video case of a
    # single matched prediction).
    assert cider_d({"k": ["a b c"]}, {"k": "a b c"})[0] == 0.0
    # Two pairs, disjoint words: every n-gram has df 1 -> weight log 2; identical captions
    # have cosine 1 for n = 1..3 (4-grams absent), no length penalty -> 10 * 3/4.
    score, _ = cider_d({"x": ["a b c"], "y": ["d e f"]}, {"x": "a b c", "y": "d e f"})
    assert score == pytest.approx(7.5)
    assert cider_d({}, {}) == (0.0, {})
    with pytest.raises(ValueError, match="same keys"):
        cider_d({"a": ["x"]}, {"b": "x"})


def test_simple_tokenizer_follows_ptb_rules():
    assert (
        simple_ptb_tokenize("A man (in red) cuts onions.") == "a man -lrb- in red -rrb- cuts onions"
    )
    assert simple_ptb_tokenize("He doesn't stop, then adds salt...") == (
        "he does n't stop then adds salt"
    )


def _dense_case():
    caps = ("a man cuts the onions.", "he fries them in oil.")
    gts = {"v": CaptionedVideo("v", 20.0, ((0.0, 5.0), (6.0, 12.0)), caps, (2, 2))}
    preds = {"v": [{"timestamp": [0.0, 5.0], "caption": "A man cuts the onions."},
                   {"timestamp": [6.0, 12.0], "caption": "He fries them in oil."}]}  # fmt: skip
    return gts, preds


def test_dense_metrics_without_java_reports_unavailable():
    gts, preds = _dense_case()
    m = dense_metrics(gts, preds, use_java=False)
    assert m["METEOR"] is None and m["SODA_c"] is None
    assert "disabled" in m["unavailable"]["METEOR"] and "CIDEr" in m["approximate"]
    assert m["F1"] == pytest.approx(100.0, abs=1e-4) and m["Precision@0.9"] == pytest.approx(100)
    # Each prediction matches one reference exactly: 2 pairs, df 1 per n-gram -> 10 * 4/4
    # per pair for n-grams of every order present (the 4-grams exist in both captions).
    assert m["CIDEr"] == pytest.approx(1000.0)
    empty = dense_metrics(gts, {"v": []}, use_java=False)
    assert empty["CIDEr"] == 0.0 and empty["F1"] == 0.0 and empty["videos"] == 1
    nothing = dense_metrics(gts, {}, use_java=False)  # only predicted videos are scored
    assert nothing["videos"] == 0 and nothing["CIDEr"] is None and nothing["F1"] is None
    assert highlight_metrics({}, {})["VeryGood"]["mAP"] is None


@pytest.mark.slow
@pytest.mark.skipif(not java_status()[0], reason="needs Java and pycocoevalcap")
def test_dense_metrics_with_java_meteor_and_soda():
    gts, preds = _dense_case()
    m = dense_metrics(gts, preds)
    assert m["tokenizer"].startswith("PTB") and "unavailable" not in m
    assert m["METEOR"] == pytest.approx(100.0, abs=1.0)  # identical after tokenization
    # SODA_c: the diagonal matching with METEOR ~1 and IoU 1 -> ~100.
    assert m["SODA_c"] == pytest.approx(100.0, abs=1.0)
    # Captions on the wrong events (no word in common): localisation perfect, captions 0.
    a, b = preds["v"]
    swapped = {"v": [b | {"timestamp": a["timestamp"]}, a | {"timestamp": b["timestamp"]}]}
    low = dense_metrics(gts, swapped)
    assert low["METEOR"] == 0.0 and low["SODA_c"] == 0.0 and low["CIDEr"] == 0.0
    assert low["F1"] == pytest.approx(100, abs=1e-4)
