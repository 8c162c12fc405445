"""Variance voting (He et al., CVPR 2019, "Bounding Box Regression with Uncertainty for Accurate Object
Detection", Algorithm 1): each box that NMS keeps is replaced by an average of the candidates that overlap it.

For a kept box b and the pre-NMS candidates b_i of its class (b among them) with IoU(b_i, b) > 0, each
coordinate x ∈ {x1, y1, x2, y2} becomes

    p_i = exp(−(1 − IoU(b_i, b))² / σ_t)
    x   = Σ_i p_i · x_i / σ²_{x,i}  /  Σ_i p_i / σ²_{x,i}

with σ_{x,i} the predicted standard deviation of that coordinate of candidate i: candidates close to b and
sure of a coordinate pull it most. Scores stay as they are. b itself has IoU 1, so p = 1 and the
denominator is never 0 (b votes with p = 1 also when it has no area and its IoU is 0/0). Candidates of
another class, or not touching b, get weight 0 (the paper's ``IoU(b_m, B) > 0``); the IoU is of the
candidates before voting, as in Algorithm 1.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

# The paper's σ_t for COCO (section 4, var voting; the official code's STD.IOU_SIGMA default is 0.01)
DEFAULT_SIGMA_T = 0.02


def variance_voting(
    boxes: Tensor, labels: Tensor, std: Tensor, keep: Tensor, sigma_t: float = DEFAULT_SIGMA_T
) -> Tensor:
    """The voted boxes [K, 4] of the kept candidates ``keep`` [K] (indices into the N candidates).

    ``boxes`` [N, 4] XYXY and ``std`` [N, 4] (σ of each coordinate, same units as the boxes, > 0) are the
    candidates of one image before NMS, ``labels`` [N] their classes. Two [K, N] × [N, 4] products, no
    loop over boxes.
    """
    if sigma_t <= 0:
        raise ValueError(f"sigma_t must be > 0, got {sigma_t}")
    kept = boxes[keep]
    iou = box_iou(kept, boxes)  # [K, N]
    same = labels[keep][:, None] == labels[None, :]
    p = torch.exp(-((1 - iou) ** 2) / sigma_t)
    p = torch.where(same & (iou > 0), p, torch.zeros_like(p))
    # b itself always votes with p = 1, also when it has no area (IoU 0/0, NaN: clipped to a line at the
    # border), so that such a box stays as it is instead of becoming NaN
    p = p.scatter(1, keep[:, None], 1.0)
    precision = std.pow(-2)  # 1 / σ² per coordinate [N, 4]
    numerator = p @ (boxes * precision)
    denominator = p @ precision
    return numerator / denominator


def kept_detections(
    boxes: Tensor, scores: Tensor, labels: Tensor, std: Tensor, keep: Tensor, sigma_t: float | None
) -> dict[str, Tensor]:
    """The detections ``keep`` selects from one image's candidates, with ``bbox_std``: boxes voted when
    ``sigma_t`` is given (``model.var_voting``), else as NMS kept them. σ is the kept box's own: its
    neighbours come from the same features, so treating their σ as independent evidence would shrink it
    without reason."""
    kept_boxes = boxes[keep] if sigma_t is None else variance_voting(boxes, labels, std, keep, sigma_t)
    return {"boxes": kept_boxes, "scores": scores[keep], "labels": labels[keep], "bbox_std": std[keep]}


__all__ = ["DEFAULT_SIGMA_T", "kept_detections", "variance_voting"]
