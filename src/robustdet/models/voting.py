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

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from robustdet.models.box_std import std_per_image

# The paper's σ_t for COCO (section 4, var voting; the official code's STD.IOU_SIGMA default is 0.01)
DEFAULT_SIGMA_T = 0.02


def variance_voting(
    boxes: Tensor, labels: Tensor, std: Tensor, keep: Tensor, sigma_t: float = DEFAULT_SIGMA_T
) -> Tensor:
    """The voted boxes [K, 4] of the kept candidates ``keep`` [K] (indices into the N candidates).

    ``boxes`` [N, 4] XYXY and ``std`` [N, 4] (σ of each coordinate, same units as the boxes, > 0) are the
    candidates of one image before NMS, ``labels`` [N] their classes. No loop over boxes: each kept box
    meets only the candidates of its class (:func:`class_groups`, a [K, M] table with M the largest class's
    candidate count), or, while tracing for export, all N with the other classes masked (the grouping's
    ``searchsorted`` has no ONNX form). Both give the same weights; tests/test_voting.py checks both.
    """
    if sigma_t <= 0:
        raise ValueError(f"sigma_t must be > 0, got {sigma_t}")
    precision = std.pow(-2)  # 1 / σ² per coordinate [N, 4]
    # what the candidates contribute, gathered once per kept box: x/σ², 1/σ², the box and its area
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    table = torch.cat([boxes * precision, precision, boxes, area[:, None]], dim=1)  # [N, 13]
    if torch.jit.is_tracing() or keep.numel() == 0:
        index = torch.arange(boxes.shape[0], device=boxes.device)[None].expand(keep.shape[0], -1)
        valid = labels[keep][:, None] == labels[None, :]
    else:
        index, valid = class_groups(labels, keep)
    # index_select of the flat indices: several times faster than advanced indexing with a [K, M] index
    candidates = table.index_select(0, index.reshape(-1)).view(*index.shape, table.shape[1])
    return _vote(table[keep], candidates, valid, index == keep[:, None], sigma_t)


def class_groups(labels: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """For each kept candidate, the candidates of its class: indices [K, M] and which are real [K, M] (a
    class with fewer than M candidates is padded with its first one, marked not real)."""
    order = torch.argsort(labels)  # the order within a class does not matter
    ordered = labels[order]
    kept_labels = labels[keep]
    start = torch.searchsorted(ordered, kept_labels, right=False)
    end = torch.searchsorted(ordered, kept_labels, right=True)
    width = int((end - start).max())
    position = start[:, None] + torch.arange(width, device=labels.device)[None]
    valid = position < end[:, None]
    return order[torch.where(valid, position, start[:, None])], valid


def _vote(kept: Tensor, candidates: Tensor, valid: Tensor, is_self: Tensor, sigma_t: float) -> Tensor:
    """Σ p·x/σ² / Σ p/σ² for the kept boxes' rows [K, 13] of the table over their candidates' [K, M, 13]."""
    box = kept[:, None, 8:12]
    lt = torch.maximum(box[..., :2], candidates[..., 8:10])
    rb = torch.minimum(box[..., 2:], candidates[..., 10:12])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)  # [K, M]
    iou = inter / (kept[:, None, 12] + candidates[..., 12] - inter)
    p = torch.exp((iou - 1).square() * (-1.0 / sigma_t))
    p = torch.where(valid & (iou > 0), p, torch.zeros_like(p))
    # b itself always votes with p = 1, also when it has no area (IoU 0/0, NaN: clipped to a line at the
    # border), so that such a box stays as it is instead of becoming NaN
    p = torch.where(is_self, torch.ones_like(p), p)
    sums = (p[:, None, :] @ candidates[..., :8]).squeeze(1)  # [K, 8]: Σ p·x/σ², Σ p/σ²
    return sums[:, :4] / sums[:, 4:]


def kept_detections(
    boxes: Tensor, scores: Tensor, labels: Tensor, keep: Tensor, std: Tensor, sigma_t: float | None
) -> dict[str, Tensor]:
    """The detections ``keep`` selects from one image's candidates, with ``bbox_std``: boxes voted when
    ``sigma_t`` is given (``model.var_voting``), else as NMS kept them.

    ``std`` is σ [N, 4] of every candidate when voting, else σ [K, 4] of the kept ones only (what
    ``box_std.std_per_image`` computes for ``index`` None or ``keep``). σ is the kept box's own, also when
    voted: its neighbours come from the same features, so treating their σ as independent evidence would
    shrink it without reason.
    """
    if sigma_t is None:
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep], "bbox_std": std}
    voted = variance_voting(boxes, labels, std, keep, sigma_t)
    return {"boxes": voted, "scores": scores[keep], "labels": labels[keep], "bbox_std": std[keep]}


class ImageCandidates(NamedTuple):
    """One image's candidates before NMS, the ones NMS keeps, and what their σ is computed from (the
    inputs of the detector's σ function, row-aligned with the candidates)."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    keep: Tensor
    coded: list[Tensor]


def batch_detections(
    images: list[ImageCandidates], std: Callable[..., Tensor], sigma_t: float | None
) -> list[dict[str, Tensor]]:
    """Every image's detections (:func:`kept_detections`), σ computed in one call over the batch: of the
    kept candidates, or of all of them when voting (``sigma_t``) needs their σ."""
    index = [None if sigma_t is not None else image.keep for image in images]
    stds = std_per_image(std, [image.coded for image in images], index)
    return [
        kept_detections(image.boxes, image.scores, image.labels, image.keep, image_std, sigma_t)
        for image, image_std in zip(images, stds, strict=True)
    ]


__all__ = [
    "DEFAULT_SIGMA_T", "ImageCandidates", "batch_detections", "class_groups", "kept_detections", "variance_voting",
]
