"""Moment-retrieval metrics: IoU, R@θ, mIoU; unparseable predictions count as IoU 0."""

from __future__ import annotations

import pytest

from training.metrics import grounding_metrics, iou


def test_iou():
    assert iou((0.0, 10.0), (0.0, 10.0)) == 1.0
    assert iou((0.0, 4.0), (2.0, 6.0)) == pytest.approx(2 / 6)
    assert iou((6.0, 2.0), (2.0, 6.0)) == 1.0  # endpoints in any order
    assert iou((0.0, 1.0), (2.0, 3.0)) == 0.0  # disjoint
    assert iou((1.0, 3.0), (0.0, 4.0)) == pytest.approx(0.5)  # contained
    assert iou(None, (1.0, 2.0)) == 0.0
    assert iou((2.0, 2.0), (2.0, 2.0)) == 1.0 and iou((2.0, 2.0), (3.0, 3.0)) == 0.0


def test_recall_and_miou():
    gts = [(0.0, 10.0), (2.0, 6.0), (0.0, 4.0), (5.0, 9.0)]
    preds = [(0.0, 10.0), (0.0, 4.0), (1.0, 3.0), None]  # IoU 1, 1/3, 1/2, 0 (unparsed)
    m = grounding_metrics(preds, gts)
    assert m["R@0.3"] == 0.75 and m["R@0.5"] == 0.5 and m["R@0.7"] == 0.25
    assert m["mIoU"] == pytest.approx((1 + 1 / 3 + 0.5 + 0) / 4)
    assert m["n"] == 4 and m["unparsed"] == 1


def test_metrics_errors():
    with pytest.raises(ValueError, match="predictions"):
        grounding_metrics([None], [])
    with pytest.raises(ValueError, match="no queries"):
        grounding_metrics([], [])
