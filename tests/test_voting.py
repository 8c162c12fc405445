"""Variance voting against He et al.'s Algorithm 1 written out box by box in float64."""

from __future__ import annotations

import math

import pytest
import torch

from robustdet.models.voting import DEFAULT_SIGMA_T, variance_voting


def iou64(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def paper_vote(
    boxes: list[list[float]], labels: list[int], std: list[list[float]], m: int, sigma_t: float
) -> list[float]:
    """One kept box b_m of Algorithm 1: p_i over IoU(b_m, B) > 0 of its class, then Σ p x/σ² / Σ p/σ²."""
    out = []
    for k in range(4):
        num = den = 0.0
        for i, b in enumerate(boxes):
            overlap = iou64(boxes[m], b)
            if labels[i] != labels[m] or overlap <= 0:
                continue
            p = math.exp(-((1 - overlap) ** 2) / sigma_t)
            num += p * b[k] / std[i][k] ** 2
            den += p / std[i][k] ** 2
        out.append(num / den)
    return out


BOXES = [
    [10.0, 10.0, 50.0, 50.0],   # kept, class 0
    [12.0, 8.0, 52.0, 49.0],    # overlaps 0, sure of x1
    [30.0, 30.0, 80.0, 90.0],   # overlaps 0 a little
    [100.0, 100.0, 140.0, 150.0],  # kept, class 0, touches nothing
    [11.0, 11.0, 51.0, 51.0],   # class 1: must not vote for 0
    [9.0, 12.0, 49.0, 52.0],    # kept, class 1
    [50.0, 10.0, 90.0, 50.0],   # class 0, shares only an edge with box 0 (IoU 0): no vote
]
LABELS = [0, 0, 0, 0, 1, 1, 0]
STD = [
    [2.0, 1.0, 3.0, 1.5],
    [0.2, 4.0, 1.0, 1.0],
    [5.0, 5.0, 5.0, 5.0],
    [1.0, 1.0, 1.0, 1.0],
    [0.1, 0.1, 0.1, 0.1],
    [1.0, 2.0, 0.5, 1.0],
    [0.01, 0.01, 0.01, 0.01],
]


@pytest.mark.parametrize("sigma_t", [DEFAULT_SIGMA_T, 0.1, 1.0])
def test_voting_matches_algorithm_1(sigma_t: float) -> None:
    keep = [0, 3, 5]
    got = variance_voting(
        torch.tensor(BOXES, dtype=torch.float64), torch.tensor(LABELS), torch.tensor(STD, dtype=torch.float64),
        torch.tensor(keep), sigma_t,
    )
    want = torch.tensor([paper_vote(BOXES, LABELS, STD, m, sigma_t) for m in keep], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # a box that touches nothing of its class stays exactly where it was
    assert got[1].tolist() == BOXES[3]
    # box 1 is much surer of x1 than box 0, and close (IoU ~0.86): x1 moves towards 12 visibly
    assert 11.0 < float(got[0, 0]) < 12.0


def test_voting_hand_worked_two_boxes() -> None:
    """Two boxes, IoU 0.5 (b2 is b1 shifted by a third of its width), σ 1 and 2: x = (x1 + p x2 / 4) / (1 + p / 4)."""
    boxes = torch.tensor([[0.0, 0.0, 3.0, 1.0], [1.0, 0.0, 4.0, 1.0]], dtype=torch.float64)
    std = torch.tensor([[1.0] * 4, [2.0] * 4], dtype=torch.float64)
    p = math.exp(-(0.5**2) / 0.5)
    got = variance_voting(boxes, torch.tensor([3, 3]), std, torch.tensor([0]), sigma_t=0.5)
    w = p / 4
    want = [(0 + w * 1) / (1 + w), 0.0, (3 + w * 4) / (1 + w), 1.0]
    torch.testing.assert_close(got[0], torch.tensor(want, dtype=torch.float64), rtol=1e-14, atol=1e-14)


def test_box_without_area_stays() -> None:
    """A candidate clipped to a line at the border has IoU 0/0 with itself: it keeps its own coordinates."""
    boxes = torch.tensor([[0.0, 5.0, 0.0, 9.0], [0.0, 5.0, 2.0, 9.0]])
    got = variance_voting(boxes, torch.tensor([0, 0]), torch.ones(2, 4), torch.tensor([0, 1]))
    assert torch.equal(got[0], boxes[0]) and torch.equal(got[1], boxes[1])


def test_voting_float32_and_empty() -> None:
    got = variance_voting(torch.tensor(BOXES), torch.tensor(LABELS), torch.tensor(STD), torch.tensor([0, 5]))
    assert got.dtype == torch.float32 and got.shape == (2, 4)
    empty = torch.zeros(0, dtype=torch.long)
    none = variance_voting(torch.tensor(BOXES), torch.tensor(LABELS), torch.tensor(STD), empty)
    assert none.shape == (0, 4)
    with pytest.raises(ValueError, match="sigma_t"):
        variance_voting(torch.tensor(BOXES), torch.tensor(LABELS), torch.tensor(STD), torch.tensor([0]), 0.0)


def test_class_groups_and_the_traced_path_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many random candidates of 5 classes: the grouped path (eager) and the masked one (export) both give
    Algorithm 1's boxes."""
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g, dtype=torch.float64) * 80
    boxes = torch.cat([xy, xy + 5 + torch.rand(300, 2, generator=g, dtype=torch.float64) * 30], dim=1)
    labels = torch.randint(5, (300,), generator=g)
    std = 0.1 + torch.rand(300, 4, generator=g, dtype=torch.float64) * 5
    keep = torch.tensor([3, 17, 40, 41, 99, 250, 299])
    grouped = variance_voting(boxes, labels, std, keep, 0.1)
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
    masked = variance_voting(boxes, labels, std, keep, 0.1)
    want = torch.tensor(
        [paper_vote(boxes.tolist(), labels.tolist(), std.tolist(), m, 0.1) for m in keep.tolist()], dtype=torch.float64
    )
    torch.testing.assert_close(grouped, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(masked, want, rtol=1e-12, atol=1e-12)
