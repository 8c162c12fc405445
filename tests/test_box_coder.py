"""BoxCoder against torchvision's detection BoxCoder and against Faster R-CNN Eq. 2 written out."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder

from robustdet.box_coder import BoxCoder

WEIGHTS = [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]


def random_boxes(gen: torch.Generator, n: int, dtype: torch.dtype, max_size: float = 200.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen, dtype=dtype) * 800 - 100
    wh = torch.rand(n, 2, generator=gen, dtype=dtype) * max_size + 2
    return torch.cat([xy, xy + wh], dim=1)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(7)


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_encode_decode_match_torchvision(gen, weights, dtype):
    boxes, anchors = random_boxes(gen, 500, dtype), random_boxes(gen, 500, dtype)
    ours, theirs = BoxCoder(weights), TorchvisionBoxCoder(weights)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-4}
    torch.testing.assert_close(ours.encode(boxes, anchors), theirs.encode_single(boxes, anchors), **tol)
    deltas = torch.randn(500, 4, generator=gen, dtype=dtype) * torch.tensor([1.0, 1.0, 3.0, 3.0], dtype=dtype)
    torch.testing.assert_close(ours.decode(deltas, anchors), theirs.decode_single(deltas, anchors), **tol)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_encode_is_faster_rcnn_eq2(weights):
    box = torch.tensor([[10.0, 20.0, 50.0, 100.0]], dtype=torch.float64)  # centre (30, 60), 40 x 80
    anchor = torch.tensor([[0.0, 0.0, 32.0, 64.0]], dtype=torch.float64)  # centre (16, 32), 32 x 64
    wx, wy, ww, wh = weights
    expected = [wx * (30 - 16) / 32, wy * (60 - 32) / 64, ww * math.log(40 / 32), wh * math.log(80 / 64)]
    got = BoxCoder(weights).encode(box, anchor)[0]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("weights", WEIGHTS)
def test_decode_inverts_encode(gen, weights):
    # sizes within the clamp: a box at most 62.5 times its anchor
    boxes, anchors = random_boxes(gen, 300, torch.float64, 50), random_boxes(gen, 300, torch.float64, 50)
    coder = BoxCoder(weights)
    torch.testing.assert_close(coder.decode(coder.encode(boxes, anchors), anchors), boxes, rtol=0, atol=1e-10)


def test_leading_batch_shape_and_broadcasting(gen):
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    anchors = random_boxes(gen, 6, torch.float64)
    boxes = random_boxes(gen, 18, torch.float64).reshape(3, 6, 4)
    deltas = coder.encode(boxes, anchors)  # anchors [6, 4] broadcast over the leading 3
    assert deltas.shape == (3, 6, 4)
    flat = coder.encode(boxes.reshape(-1, 4), anchors.repeat(3, 1)).reshape(3, 6, 4)
    torch.testing.assert_close(deltas, flat)
    # per-class deltas [N, K, 4] against anchors [N, 1, 4], as the docstring tells
    per_class = torch.randn(6, 5, 4, generator=gen, dtype=torch.float64)
    decoded = coder.decode(per_class, anchors[:, None])
    reference = TorchvisionBoxCoder((10.0, 10.0, 5.0, 5.0)).decode_single(per_class.reshape(6, 20), anchors)
    torch.testing.assert_close(decoded.reshape(6, 20), reference)


def test_decode_clamps_log_size_before_exp():
    coder = BoxCoder()
    anchor = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    huge = torch.tensor([[0.0, 0.0, 50.0, 50.0]])
    box = coder.decode(huge, anchor)
    assert torch.isfinite(box).all()
    torch.testing.assert_close(box[0, 2] - box[0, 0], torch.tensor(1000.0))  # 16 · exp(log(1000/16))
    torch.testing.assert_close(box, TorchvisionBoxCoder((1.0, 1.0, 1.0, 1.0)).decode_single(huge, anchor))


def test_decode_is_differentiable(gen):
    anchors = random_boxes(gen, 4, torch.float64)
    deltas = torch.randn(4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda d: BoxCoder((10.0, 10.0, 5.0, 5.0)).decode(d, anchors), (deltas,))


@pytest.mark.parametrize("which", ["boxes", "anchors"])
@pytest.mark.parametrize(
    "bad, what",
    [
        ([10.0, 10.0, 10.0, 20.0], "width"),  # zero width
        ([10.0, 10.0, 5.0, 20.0], "width"),  # negative width
        ([10.0, 10.0, 20.0, 10.0], "height"),  # zero height
        ([10.0, 10.0, 20.0, 4.0], "height"),  # negative height
        ([10.0, 10.0, math.nan, 20.0], "width"),
    ],
)
def test_encode_rejects_degenerate_boxes(which, bad, what):
    good = torch.tensor([[0.0, 0.0, 8.0, 8.0], [1.0, 1.0, 9.0, 9.0]])
    poisoned = good.clone()
    poisoned[1] = torch.tensor(bad)
    boxes, anchors = (poisoned, good) if which == "boxes" else (good, poisoned)
    with pytest.raises(ValueError, match=rf"{which} must have positive width and height: 1 have {what}"):
        BoxCoder().encode(boxes, anchors)


def test_bad_shapes_and_arguments_raise():
    with pytest.raises(ValueError, match=r"boxes must have shape \[\.\.\., 4\]"):
        BoxCoder().encode(torch.zeros(3, 5), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"deltas must have shape \[\.\.\., 4\]"):
        BoxCoder().decode(torch.zeros(3, 8), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="weights must be 4 finite positive numbers"):
        BoxCoder((1.0, 1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="clamp must be > 0"):
        BoxCoder(clamp=0.0)
