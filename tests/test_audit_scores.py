"""The audit's scores on hand-made cases where the wrong label is known (docs/audit.md)."""

import time

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from robustdet.audit.scores import (
    ISSUES,
    Annotations,
    Detections,
    ScoreConfig,
    class_quantiles,
    image_pairs,
    loss_rank,
    pair_iou,
    score_annotations,
)


def _anns(rows, loss=None):
    """rows: (image, id, [x1, y1, x2, y2], label, crowd)."""
    return Annotations(
        image=np.array([r[0] for r in rows], dtype=np.int64),
        ids=np.array([r[1] for r in rows], dtype=np.int64),
        boxes=np.array([r[2] for r in rows], dtype=np.float64).reshape(-1, 4),
        labels=np.array([r[3] for r in rows], dtype=np.int64),
        crowd=np.array([r[4] for r in rows], dtype=bool),
        loss=None if loss is None else np.asarray(loss, dtype=np.float64),
    )


def _dets(rows, std=None):
    """rows: (image, [x1, y1, x2, y2], score, label)."""
    return Detections(
        image=np.array([r[0] for r in rows], dtype=np.int64),
        boxes=np.array([r[1] for r in rows], dtype=np.float64).reshape(-1, 4),
        scores=np.array([r[2] for r in rows], dtype=np.float64),
        labels=np.array([r[3] for r in rows], dtype=np.int64),
        std=None if std is None else np.asarray(std, dtype=np.float64),
    )


# the equations' tests read the scores as probabilities; calibration has its own tests below
RAW = ScoreConfig(calibration="none")

# image 0: a correct box (A), a flipped one (B, labelled 1, the object is a 0), a shifted one (C), a box on
# background (D), and an object nobody labelled (detected at [40, 40, 50, 50], also as a weaker duplicate)
ANNS = [
    (0, 11, [10, 10, 40, 40], 0, False),  # A: correct
    (0, 12, [50, 50, 90, 90], 1, False),  # B: flipped
    (0, 13, [10, 60, 30, 80], 2, False),  # C: shifted; the object is at [20, 66, 40, 86] (IoU 0.21)
    (0, 14, [60, 5, 80, 25], 0, False),  # D: nothing there
    (1, 21, [5, 5, 25, 25], 1, False),  # image 1: one correct box
]
DETS = [
    (0, [11, 10, 40, 41], 0.9, 0),
    (0, [50, 50, 90, 90], 0.8, 0),
    (0, [20, 66, 40, 86], 0.7, 2),
    (0, [40, 40, 50, 50], 0.6, 1),  # overlooked
    (0, [40, 40, 50, 51], 0.5, 2),  # the same object as another class: suppressed among the proposals
    (0, [85, 0, 95, 10], 0.1, 0),  # too weak to propose
    (1, [5, 5, 25, 26], 0.95, 1),
]


def test_each_known_error_gets_its_issue_score_and_suggestion():
    out = score_annotations(_anns(ANNS), _dets(DETS), num_images=2, threshold=0.5, cfg=RAW)
    issues = [ISSUES[i] for i in out.issue]
    assert issues == ["ok", "class", "box", "spurious", "ok"]
    # the equations by hand: s_class = q_other (1 - q_same), s_box = q_near (1 - q_same), s_spurious = 1 - q_any
    assert out.score == pytest.approx([1 - 0.9, 0.8, 0.7, 1.0, 1 - 0.95])
    assert out.parts["class"][1] == pytest.approx(0.8) and out.parts["spurious"][1] == pytest.approx(0.2)
    assert out.parts["box"][2] == pytest.approx(0.7) and out.parts["class"][2] == 0
    assert out.suggested_label.tolist() == [-1, 0, -1, -1, -1]
    assert out.suggested_box[2].tolist() == [20, 66, 40, 86]
    assert np.isnan(out.suggested_box[[0, 1, 3, 4]]).all()
    # one proposal: the overlooked object, once, with its stronger class
    assert out.missing.image.tolist() == [0] and out.missing.labels.tolist() == [1]
    assert out.missing.boxes.tolist() == [[40, 40, 50, 50]] and out.missing.scores.tolist() == [0.6]
    assert out.image_score.tolist() == pytest.approx([1.0, 0.05])


def test_a_correct_dataset_scores_low_and_the_threshold_decides_the_issue():
    anns = _anns([ANNS[0], ANNS[4]])
    dets = _dets([DETS[0], DETS[6]])
    out = score_annotations(anns, dets, num_images=2, threshold=0.07, cfg=RAW)
    assert [ISSUES[i] for i in out.issue] == ["spurious", "ok"]  # scores 0.1 >= 0.07 > 0.05
    assert score_annotations(anns, dets, num_images=2, cfg=RAW).issue.tolist() == [0, 0]
    assert len(out.missing.image) == 0


def test_crowd_regions_are_not_scored_and_cover_proposals():
    rows = [*ANNS, (0, 15, [38, 38, 52, 52], 0, True)]
    rows.sort(key=lambda r: r[0])
    out = score_annotations(_anns(rows), _dets(DETS), num_images=2)
    crowd = next(i for i, r in enumerate(rows) if r[4])
    assert out.score[crowd] == 0 and out.issue[crowd] == 0
    assert len(out.missing.image) == 0  # the overlooked object lies in a crowd region


def test_sigma_turns_the_place_test_into_the_detections_own_uncertainty():
    # the box is 4 px off on each edge of a 40 px object: IoU 0.67, the same place by IoU alone
    anns = _anns([(0, 1, [14, 14, 54, 54], 0, False)])
    det_rows = [(0, [10, 10, 50, 50], 0.9, 0)]
    plain = score_annotations(anns, _dets(det_rows), 1, cfg=RAW)
    assert plain.issue.tolist() == [0] and plain.parts["box"][0] == 0
    sure = score_annotations(anns, _dets(det_rows, std=[[1.0, 1.0, 1.0, 1.0]]), 1, cfg=RAW)
    # pi = exp(-1/2 * 16) ~ 0: the detection is sure of its box, 4 sigma away
    pi = np.exp(-8)
    assert sure.issue.tolist() == [2] and sure.parts["box"][0] == pytest.approx(0.9 * (1 - pi) * (1 - 0.9 * pi))
    assert sure.suggested_box[0].tolist() == [10, 10, 50, 50]
    unsure = score_annotations(anns, _dets(det_rows, std=[[8.0, 8.0, 8.0, 8.0]]), 1, cfg=RAW)
    pi = np.exp(-0.5 * 0.25)
    assert unsure.parts["box"][0] == pytest.approx(0.9 * (1 - pi) * (1 - 0.9 * pi))
    assert unsure.issue.tolist() == [0]


def test_the_loss_rank_moves_the_score():
    loss = [0.1, 5.0, 0.2, 0.3, 0.0]
    cfg = ScoreConfig(loss_weight=0.5, calibration="none")
    out = score_annotations(_anns(ANNS, loss=loss), _dets(DETS), 2, cfg=cfg)
    ranks = np.array([0.25, 1.0, 0.5, 0.75, 0.0])
    base = np.array([0.1, 0.8, 0.7, 1.0, 0.05])
    assert out.score == pytest.approx(0.5 * base + 0.5 * ranks)
    assert loss_rank(np.array([1.0, 1.0, 3.0, np.nan]), np.ones(4, bool)).tolist() == [0.25, 0.25, 1.0, 0.5]


def test_pairs_and_iou_against_torchvision():
    rng = np.random.default_rng(0)
    a_img = np.sort(rng.integers(0, 7, 40))
    d_img = np.sort(rng.integers(0, 7, 90))
    xy = rng.uniform(0, 50, (130, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 30, (130, 2))], axis=1)
    a_boxes, d_boxes = boxes[:40], boxes[40:]
    ann, det = image_pairs(a_img, d_img, 7)
    want = [(i, j) for i in range(40) for j in range(90) if a_img[i] == d_img[j]]
    assert list(zip(ann.tolist(), det.tolist(), strict=True)) == want
    full = box_iou(torch.from_numpy(a_boxes), torch.from_numpy(d_boxes)).numpy()
    assert pair_iou(a_boxes[ann], d_boxes[det]) == pytest.approx(full[ann, det], abs=1e-12)


def test_unsorted_input_is_refused():
    with pytest.raises(ValueError, match="sorted by image"):
        score_annotations(_anns([ANNS[4], ANNS[0]]), _dets(DETS), 2)


def _scaled(rows, factor):
    return [(img, box, score * factor, label) for img, box, score, label in rows]


def test_calibration_finds_the_known_errors_when_every_score_is_low():
    # a focal-loss detector: the same detections at 0.3 times the scores (correct ones at 0.27-0.29)
    low = _dets(_scaled(DETS, 0.3))
    raw = score_annotations(_anns(ANNS), low, 2, cfg=RAW)
    assert [ISSUES[i] for i in raw.issue] == ["spurious"] * 5  # read as probabilities: nothing is there
    out = score_annotations(_anns(ANNS), low, 2)
    assert [ISSUES[i] for i in out.issue] == ["ok", "class", "box", "spurious", "ok"]
    # r: the median of the matched annotations' best same-class scores (A 0.27, E 0.285; B, C, D unmatched),
    # pooled over the classes (each has fewer than calibration_min); p' = min(1, p / r)
    r = (0.27 + 0.285) / 2
    assert out.reference == pytest.approx([r, r, r])
    assert out.quantities["q_same"][[0, 4]] == pytest.approx([0.27 / r, 1.0])
    assert out.score[1:4] == pytest.approx([0.24 / r, 0.21 / r, 1.0])
    assert out.suggested_label[1] == 0 and out.suggested_box[2].tolist() == [20, 66, 40, 86]
    assert out.missing.boxes.tolist() == [[40, 40, 50, 50]] and out.missing.scores == pytest.approx([0.18 / r])


def test_scaling_every_score_changes_nothing_once_calibrated():
    full = score_annotations(_anns(ANNS), _dets(DETS), 2)
    for factor in (0.3, 0.05):
        low = score_annotations(_anns(ANNS), _dets(_scaled(DETS, factor)), 2)
        assert low.issue.tolist() == full.issue.tolist() == [0, 1, 2, 3, 0]
        assert low.score == pytest.approx(full.score)
        assert low.missing.scores == pytest.approx(full.missing.scores)
        assert low.reference == pytest.approx(full.reference * factor)
    # the same on a larger random case, with the loss term and sigma, where a detection near each
    # annotation (same class, a few pixels off) gives the reference its matches
    anns, dets = _synthetic_case(50, 7, 30, seed=1)
    rng = np.random.default_rng(2)
    near = np.repeat(np.arange(50) * 30, 7) + np.tile(np.arange(7), 50)
    dets.boxes[near] = anns.boxes + rng.normal(0, 2, anns.boxes.shape)
    dets.labels[near] = anns.labels
    base = score_annotations(anns, dets, 50)
    assert (base.reference != 1).all() and (base.issue > 0).any() and (base.issue == 0).any()
    dets.scores = dets.scores * 0.3
    low = score_annotations(anns, dets, 50)
    assert low.issue.tolist() == base.issue.tolist() and low.score == pytest.approx(base.score)


def test_class_quantiles_per_class_and_pooled_for_rare_classes():
    values = np.array([0.2, 0.9, 0.4, 0.3])
    labels = np.array([0, 0, 0, 1])
    assert class_quantiles(values, labels, 3, min_count=2) == pytest.approx([0.4, 0.35, 0.35])
    assert class_quantiles(values, labels, 2, min_count=1) == pytest.approx([0.4, 0.3])
    assert class_quantiles(np.zeros(0), np.zeros(0, np.int64), 2, 1).tolist() == [1.0, 1.0]
    rng = np.random.default_rng(0)
    values, labels = rng.uniform(size=200), rng.integers(0, 4, 200)
    for q in (0.1, 0.5, 0.9):
        want = [np.quantile(values[labels == c], q) for c in range(4)]
        assert class_quantiles(values, labels, 4, 1, q) == pytest.approx(want)


def test_crowd_and_unmatched_annotations_do_not_set_the_reference():
    rows = [(0, 1, [0, 0, 10, 10], 0, False), (0, 2, [20, 20, 30, 30], 0, True), (0, 3, [40, 40, 50, 50], 0, False)]
    dets = _dets([(0, [0, 0, 10, 10], 0.4, 0), (0, [20, 20, 30, 30], 0.1, 0), (0, [40, 40, 50, 50], 0.3, 1)])
    out = score_annotations(_anns(rows), dets, 1, cfg=ScoreConfig(calibration_min=1))
    assert out.reference == pytest.approx([0.4, 0.4])  # class 1: no annotation, the pooled median
    assert out.quantities["q_same"][0] == 1.0 and out.quantities["q_other"][2] == pytest.approx(0.75)


def _synthetic_case(num_images: int, per_image: int, dets_per_image: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n, d = num_images * per_image, num_images * dets_per_image
    xy = rng.uniform(0, 500, (n + d, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 120, (n + d, 2))], axis=1)
    anns = Annotations(np.repeat(np.arange(num_images), per_image), np.arange(n), boxes[:n],
                       rng.integers(0, 20, n), np.zeros(n, bool), rng.exponential(1.0, n))
    # scores as a detector gives them: most of its 100 detections weak
    dets = Detections(np.repeat(np.arange(num_images), dets_per_image), boxes[n:], rng.beta(0.5, 5.0, d),
                      rng.integers(0, 20, d), rng.uniform(1, 10, (d, 4)))
    return anns, dets


def test_scoring_runs_at_more_than_10000_annotations_a_second():
    # COCO-like: 7 boxes and the detector's 100 detections per image
    anns, dets = _synthetic_case(3000, 7, 100)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        score_annotations(anns, dets, 3000)
        times.append(time.perf_counter() - t0)
    rate = len(anns.ids) / float(np.median(times))
    assert rate > 10_000, f"{rate:.0f} annotations/s"
