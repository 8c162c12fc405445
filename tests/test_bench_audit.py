"""benchmarks/bench_audit.py's metrics on hand-made cases (cleanlab is not needed for these)."""

from pathlib import Path

import numpy as np
import pytest

from robustdet.audit.scores import Detections

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def bench(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_audit

    return bench_audit


def test_auroc_and_precision_at_k(bench) -> None:
    score = np.array([0.9, 0.8, 0.7, 0.1, 0.8])
    positive = np.array([True, False, True, False, True])
    # pairs (pos, neg): 0.9>0.8, 0.9>0.1, 0.7<0.8, 0.7>0.1, 0.8=0.8 (half), 0.8>0.1: 4.5 of 6
    assert bench.auroc(score, positive) == pytest.approx(4.5 / 6)
    assert bench.precision_at_k(score, positive, 3) == pytest.approx(2 / 3)
    assert np.isnan(bench.auroc(score, np.zeros(5, bool)))


def test_proposals_match_dropped_boxes_once_by_class_and_iou(bench) -> None:
    def dets(rows):
        return Detections(np.array([r[0] for r in rows]), np.array([r[1] for r in rows], dtype=np.float64),
                          np.array([r[2] for r in rows], dtype=np.float64), np.array([r[3] for r in rows]))

    dropped = dets([(0, [0, 0, 10, 10], 1, 0), (1, [0, 0, 10, 10], 1, 1)])
    proposals = dets([
        (0, [0, 0, 10, 11], 0.9, 0),  # hit
        (0, [0, 0, 10, 10], 0.8, 0),  # the same dropped box again: no
        (1, [0, 0, 10, 10], 0.7, 0),  # wrong class
        (1, [5, 5, 15, 15], 0.6, 1),  # IoU 1/7
        (1, [1, 0, 10, 10], 0.5, 1),  # hit
    ])
    assert bench.match_proposals(proposals, dropped).tolist() == [True, False, False, False, True]
    recall, area = bench.drop_metrics(proposals, dropped)
    assert recall == 0.5  # the top 2 proposals find one of the 2 dropped boxes
    assert area == pytest.approx(bench.auroc(proposals.scores, np.array([1, 0, 0, 0, 1], bool)))
