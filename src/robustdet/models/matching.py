"""Anchor-to-box matching for a whole batch at once.

After ``GeneralizedRCNNTransform`` pads a batch to one size, every image has the same anchors, so the
IoU of all images is one [B, A, G_max] tensor against ground truth padded to G_max boxes. The rules are
torchvision's ``Matcher(high, low, allow_low_quality_matches=True)`` exactly:

1. each anchor takes the box of highest IoU (the first one on ties);
2. IoU < low → ``BELOW_LOW_THRESHOLD`` (-1, background); low ≤ IoU < high → ``BETWEEN_THRESHOLDS``
   (-2, ignored);
3. for each box, every anchor whose IoU with it equals that box's highest IoU (ties included, even when
   that IoU is 0) gets back its step-1 match, whatever step 2 said.

Padding boxes get IoU -1, below any real IoU, so they never win step 1, and they are masked out of
step 3 (their "highest IoU" would otherwise tie with every anchor).
"""

from __future__ import annotations

import torch
from torch import Tensor

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


def pad_boxes(boxes: list[Tensor], labels: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Stack per-image boxes [N_b, 4] and labels [N_b] into [B, G, 4], [B, G] and a validity mask [B, G].

    Padding boxes are (0, 0, 1, 1), not zeros: the box coder takes their log width, and losses
    computed densely on unmatched anchors (then masked away) must stay finite.
    """
    # at least one (padding) slot, so that gathers by matched index work for a batch without boxes
    g = max(1, *(b.shape[0] for b in boxes))
    ref = boxes[0]
    out = ref.new_zeros((len(boxes), g, 4))
    out[..., 2:] = 1.0
    out_labels = torch.zeros((len(boxes), g), dtype=torch.int64, device=ref.device)
    valid = torch.zeros((len(boxes), g), dtype=torch.bool, device=ref.device)
    for i, (b, lab) in enumerate(zip(boxes, labels, strict=True)):
        n = b.shape[0]
        out[i, :n] = b
        out_labels[i, :n] = lab
        valid[i, :n] = True
    return out, out_labels, valid


def batched_box_iou(anchors: Tensor, boxes: Tensor, valid: Tensor) -> Tensor:
    """IoU of anchors [A, 4] with each image's boxes [B, G, 4]: [B, A, G], -1 where ``valid`` is False.

    The arithmetic is that of ``torchvision.ops.box_iou`` term by term, so the values (and hence
    the ties the matcher depends on) are bit-identical to torchvision's per-image matrix.
    """
    area_a = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])  # [A]
    area_b = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])  # [B, G]
    a = anchors[None, :, None, :]
    b = boxes[:, None, :, :]
    # width and height separately: the [B, A, G, 2] intermediates of box_iou would double the memory
    w = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    h = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = w * h
    union = area_b[:, None, :] + area_a[None, :, None] - inter
    iou = inter / union
    return iou.masked_fill(~valid[:, None, :], -1.0)


def match_anchors(iou: Tensor, valid: Tensor, high: float, low: float) -> Tensor:
    """Matched box index per anchor [B, A] (or -1 / -2), from IoU [B, A, G] and the box mask [B, G].

    torchvision's ``Matcher(high, low, allow_low_quality_matches=True)`` for every image at once; an
    image without boxes gets -1 everywhere, as torchvision's RetinaNet does.
    """
    b, a, g = iou.shape
    if g == 0:
        return torch.full((b, a), BELOW_LOW_THRESHOLD, dtype=torch.int64, device=iou.device)
    best_iou, best = iou.max(dim=2)  # [B, A]; padding has -1 and real IoU >= 0, so padding never wins
    matches = best.clone()
    matches[best_iou < low] = BELOW_LOW_THRESHOLD
    matches[(best_iou >= low) & (best_iou < high)] = BETWEEN_THRESHOLDS
    best_per_box = iou.max(dim=1, keepdim=True).values  # [B, 1, G]
    restore = ((iou == best_per_box) & valid[:, None, :]).any(dim=2)
    return torch.where(restore, best, matches)


__all__ = ["BELOW_LOW_THRESHOLD", "BETWEEN_THRESHOLDS", "batched_box_iou", "match_anchors", "pad_boxes"]
