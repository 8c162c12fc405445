"""Anchor box coding: boxes <-> regression deltas (Faster R-CNN Eq. 2, as RetinaNet and the RPN use it)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["BoxCoder"]


def _centres_and_sizes(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # Width is x2 − x1 (no +1), torchvision's convention for continuous coordinates.
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights, widths, heights


def _check_boxes(name: str, boxes: Tensor) -> None:
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"{name} must have shape [..., 4] as (x1, y1, x2, y2), got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {boxes.dtype}")


class BoxCoder:
    """Encodes boxes as deltas relative to anchors, and decodes the network's deltas back into boxes.

    How a network prediction becomes a box: the regression head does not predict coordinates. For each
    anchor, a fixed reference box with centre (x_a, y_a), width w_a and height h_a, it predicts four
    numbers (t_x, t_y, t_w, t_h): how far to move the anchor's centre, measured in anchor widths and
    heights, and by what factor, on a log scale, to stretch its width and height. The predicted box is the
    anchor moved and stretched accordingly:

        x = x_a + w_a · t_x / w_x                   w = w_a · exp(min(t_w / w_w, clamp))
        y = y_a + h_a · t_y / w_y                   h = h_a · exp(min(t_h / w_h, clamp))
        box = (x − w/2, y − h/2, x + w/2, y + h/2)

    Training goes the other way: each ground-truth box (x, y, w, h) matched to an anchor is encoded as
    the deltas the head should have predicted (Faster R-CNN Eq. 2, scaled by the weights),

        t_x = w_x · (x − x_a) / w_a,    t_y = w_y · (y − y_a) / h_a,
        t_w = w_w · log(w / w_a),       t_h = w_h · log(h / h_a),

    and the regression loss (smooth L1, Eq. 6, or its Bayesian form, Eq. 14) compares predicted and
    encoded deltas, never decoded boxes. Dividing by the anchor's size makes the deltas scale-invariant,
    and the log makes stretching and shrinking symmetric.

    Args:
        weights: (w_x, w_y, w_w, w_h); (1, 1, 1, 1) for RetinaNet and the RPN, (10, 10, 5, 5) for the
            Faster R-CNN box head (they bring the deltas to roughly unit variance).
        clamp: upper bound on t_w / w_w and t_h / w_h before the exponential when decoding, so that a wild
            prediction cannot overflow: log(1000 / 16) caps a box at 62.5 times its anchor's size.

    Boxes are (x1, y1, x2, y2) with width x2 − x1 (torchvision's convention). Boxes, anchors and deltas
    may have any leading shape ``[..., 4]`` as long as they broadcast; for per-class deltas [N, K·4],
    decode ``deltas.view(N, K, 4)`` against ``anchors[:, None]``.
    """

    def __init__(
        self,
        weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
        clamp: float = math.log(1000 / 16),
    ) -> None:
        if len(weights) != 4 or not all(math.isfinite(w) and w > 0 for w in weights):
            raise ValueError(f"weights must be 4 finite positive numbers, got {weights}")
        if not clamp > 0:
            raise ValueError(f"clamp must be > 0, got {clamp}")
        self.weights = tuple(float(w) for w in weights)
        self.clamp = float(clamp)

    def __repr__(self) -> str:
        return f"BoxCoder(weights={self.weights}, clamp={self.clamp:.4g})"

    def encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """Deltas [..., 4] of ``boxes`` relative to ``anchors`` (both [..., 4], broadcast).

        Raises ValueError for a box or anchor of zero, negative or NaN width or height: their log-size
        delta would be ±inf or NaN and poison the loss.
        """
        _check_boxes("boxes", boxes)
        _check_boxes("anchors", anchors)
        anchors = anchors.to(boxes.dtype)
        x, y, w, h = _centres_and_sizes(boxes)
        xa, ya, wa, ha = _centres_and_sizes(anchors)
        for name, size in (("boxes", w), ("boxes", h), ("anchors", wa), ("anchors", ha)):
            bad = ~(size > 0)
            if bool(bad.any()):
                which = "width" if size is w or size is wa else "height"
                raise ValueError(
                    f"{name} must have positive width and height: {int(bad.sum())} have {which} <= 0 or NaN"
                )
        wx, wy, ww, wh = self.weights
        return torch.stack(
            (
                wx * (x - xa) / wa,
                wy * (y - ya) / ha,
                ww * torch.log(w / wa),
                wh * torch.log(h / ha),
            ),
            dim=-1,
        )

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """Boxes (x1, y1, x2, y2) [..., 4] from ``deltas`` relative to ``anchors`` (broadcast).

        t_w / w_w and t_h / w_h are clamped at ``clamp`` before the exponential; the result has the dtype of
        ``deltas``.
        """
        _check_boxes("deltas", deltas)
        _check_boxes("anchors", anchors)
        xa, ya, wa, ha = _centres_and_sizes(anchors.to(deltas.dtype))
        wx, wy, ww, wh = self.weights
        x = deltas[..., 0] / wx * wa + xa
        y = deltas[..., 1] / wy * ha + ya
        half_w = 0.5 * torch.exp(torch.clamp(deltas[..., 2] / ww, max=self.clamp)) * wa
        half_h = 0.5 * torch.exp(torch.clamp(deltas[..., 3] / wh, max=self.clamp)) * ha
        return torch.stack((x - half_w, y - half_h, x + half_w, y + half_h), dim=-1)
