"""experiments/uncertainty/box_sigma.py (issue 16 §3): matching, relative σ and error, AP at IoU 0.9."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from scipy import stats

from tests.conftest import REPO

SCRIPT = REPO / "experiments" / "uncertainty" / "box_sigma.py"


@pytest.fixture(scope="module")
def box_sigma():
    spec = importlib.util.spec_from_file_location("box_sigma", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gt():
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 20], "area": 800, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [60, 60, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 50, 50], "area": 2500, "iscrowd": 0},
    ]
    return {"images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
            "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def test_matching_gives_relative_sigma_and_error_by_hand(box_sigma):
    dets = [
        # matches ann 1: x1 off by 4 (of width 40), y2 off by 2 (of height 20): error mean(0.1, 0, 0, 0.1)
        {"image_id": 1, "category_id": 1, "bbox": [14, 10, 36, 22], "score": 0.9, "bbox_std": [4, 2, 4, 2]},
        # the same object again, lower score: ann 1 is taken, so it matches nothing
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 20], "score": 0.5, "bbox_std": [1, 1, 1, 1]},
        # wrong class on ann 2: no match
        {"image_id": 1, "category_id": 1, "bbox": [60, 60, 20, 20], "score": 0.8, "bbox_std": [1, 1, 1, 1]},
        # exact on ann 3
        {"image_id": 2, "category_id": 1, "bbox": [0, 0, 50, 50], "score": 0.7, "bbox_std": [5, 5, 5, 5]},
        # below --min-score: skipped
        {"image_id": 1, "category_id": 2, "bbox": [60, 60, 20, 20], "score": 0.01, "bbox_std": [1, 1, 1, 1]},
    ]
    m = box_sigma.matched_sigma_error(_gt(), dets, min_score=0.05)
    np.testing.assert_allclose(m, [[1, np.mean([0.1, 0.1, 0.1, 0.1]), np.mean([0.1, 0, 0, 0.1])],
                                   [1, 0.1, 0.0]])


def test_ap90_reads_the_precision_array_at_iou_09(box_sigma):
    gt = _gt()
    # every box found, ann 1 at IoU 0.8 (between 0.75 and 0.9): AP50 = AP75 = 100, AP90 lower
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 16], "score": 0.9},
        {"image_id": 1, "category_id": 2, "bbox": [60, 60, 20, 20], "score": 0.9},
        {"image_id": 2, "category_id": 1, "bbox": [0, 0, 50, 50], "score": 0.95},  # ranked first
    ]
    got = box_sigma.coco_metrics(gt, dets)
    assert got["AP50"] == pytest.approx(100.0) and got["AP75"] == pytest.approx(100.0)
    # class 1 finds 1 of its 2 boxes at IoU 0.9 (recall 0.5: 51 of 101 recall points), class 2 all
    assert got["AP90"] == pytest.approx(100 * (51 / 101 + 1) / 2, abs=1e-6)
    assert box_sigma.coco_metrics(gt, []) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "AP90": 0.0}


def test_forms_study_paired_interval_and_exact_permutation_p():
    spec = importlib.util.spec_from_file_location("forms_study", REPO / "experiments" / "noise" / "forms_study.py")
    fs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fs)
    mean, low, high = fs.paired([1.0, 2.0, 3.0])
    half = stats.t.ppf(0.975, 2) * 1.0 / np.sqrt(3)  # std of (1, 2, 3) is 1
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    rho, p = fs.permutation_rho([0.0, 0.1, 0.2, 0.3, 0.4], [0.09, 0.11, 0.13, 0.15, 0.17])
    assert rho == pytest.approx(1.0) and p == pytest.approx(2 / 120)  # the order and its reverse
    rho, p = fs.permutation_rho([0.0, 0.1, 0.2, 0.3, 0.4], [0.09, 0.13, 0.11, 0.15, 0.17])
    assert rho == pytest.approx(0.9)
