"""FCOS whose training loss comes out per pyramid level, computed for the whole batch at once.

torchvision's ``FCOS`` supplies the transform, backbone (P3-P7, P6/P7 from P5), head, points and
post-processing; this subclass replaces the loss. torchvision assigns points to boxes and builds the
targets image by image in Python (with a host sync per image and one for the foreground count); here all
images share their points after padding, so the assignment is one set of [B, A, G_max] comparisons and
the losses are dense per-location tensors [B, A] summed per level over each level's contiguous segment.

Assignment (:func:`assign_points`, torchvision's ``FCOS.compute_loss`` rule): a location a of level i
with centre p and size s_i (torchvision's "anchor" of width s_i = the level's stride 8, 16, ..., 128) is
foreground for box g when

    1. |p − centre(g)|_∞ < ρ·s_i                                  (centre sampling, ρ = 1.5)
    2. min(l, t, r, b) > 0                                         (p inside g)
    3. m_i < max(l, t, r, b) < m_{i+1}                             (the level's regression range)

with (l, t, r, b) the distances from p to the sides of g; among several such boxes it takes the one of
least area. m_1..m_4 = ``model.regression_ranges``, m_0 = 0 and m_5 = ∞ (:func:`fcos_range_bounds`).

Loss (``docs/models.md``, "FCOS"), for image b, level i, n_b foreground locations:

    S^cls_{b,i} = Σ_{a on level i} Σ_c FL(x_{a,c}, t_{a,c})                  (all locations, Eq. 7)
    S^reg_{b,i} = Σ_{a foreground} (1 − GIoU(decode(δ_a), g(a)))           (box_loss giou, torchvision)
               or Σ_{a foreground} Σ_k SmoothL1_β(δ_{a,k} − δ*_{a,k})       (box_loss smooth_l1 / l1, Eq. 6)
    S^ctr_{b,i} = Σ_{a foreground} BCE(c_a, ctr*_a)                          (centerness)
    L_i = cls_weight · N(S^cls)_i + N(S^reg)_i + N(S^ctr)_i

δ_a are the head's (l, t, r, b) outputs, which torchvision's ``BoxLinearCoder(normalize_by_size=True)``
already reads in units of the level's size s_i, and δ* = (l, t, r, b)/s_i of the assigned box (the same
coder's ``encode``): the smooth L1 compares distances in units of the stride, so one β serves all levels.
ctr* = sqrt(min(l, r)/max(l, r) · min(t, b)/max(t, b)). N is the per-image or per-batch normalisation
of ``base.normalise``; Σ_i L_i is torchvision's ``classification + bbox_regression + bbox_ctrness`` for
per_batch (torchvision divides all three by the batch's foreground count), cls_weight 1 and box_loss giou.

Bayesian (``loss.bayesian``, Eq. 19 of Khanzhina et al.): FL becomes the Bayesian focal loss with s_cls
(Eq. 16) and SmoothL1 the Bayesian smooth L1 with s_reg (Eq. 14) on the stride-normalised distances.
GIoU has no Bayesian form (the config rejects bayesian + giou), L1 has no threshold β for Eq. 14 (rejected
here), and the centerness term stays the plain BCE: it is neither of the two tasks Eq. 19 models.
With ``model.box_uncertainty`` the smooth L1 (or L1) becomes the KL-Loss with one α per stride-normalised
distance (``losses/box_uncertainty.py``); GIoU cannot take it (refused).
"""

from __future__ import annotations

import itertools
import math
from functools import partial
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS

from robustdet.losses import LogVariances, LossConfig, TaskLoss, detaches_features
from robustdet.models.backbones import PYRAMIDS, build_backbone, level_names
from robustdet.models.base import check_per_level
from robustdet.models.box_std import DetectionTransform, distance_std
from robustdet.models.dense import Assignment, DenseDetector, DenseSection, masked
from robustdet.models.heads import FCOSDenseHead
from robustdet.models.matching import pad_boxes

PYRAMID = "p3p7_from_p5"
CENTER_SAMPLING_RADIUS = 1.5  # torchvision's default (FCOS "center sampling", in units of the stride)
# torchvision's tie-break: a matching box scores 1e8 − area in float32, the largest score wins
_AREA_OFFSET = 1e8


class FCOSConfig(DenseSection):
    """``model.name: fcos``: the boundaries between the levels' regression ranges, and centre sampling.

    Level i regresses the locations whose largest distance to the box sides, max(l, t, r, b), lies in
    (m_i, m_{i+1}); ``regression_ranges`` are m_1..m_4 (P3 takes everything below m_1, P7 everything
    above m_4). The default (64, 128, 256, 512) is the FCOS paper's and torchvision's.
    """

    name: Literal["fcos"] = "fcos"
    regression_ranges: list[float] = Field(default_factory=lambda: [64.0, 128.0, 256.0, 512.0])
    center_sampling_radius: float = Field(CENTER_SAMPLING_RADIUS, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "anchor_sizes" in data:
            sizes = data["anchor_sizes"]
            hint = f" [{', '.join(f'{v:g}' for v in sizes[1:])}]" if isinstance(sizes, list) and sizes else ""
            raise ValueError(
                "model.anchor_sizes is not a key of fcos (FCOS has no anchors): its regression ranges are "
                f"model.regression_ranges, the boundaries between levels, i.e. the old anchor_sizes[1:]{hint}"
            )
        return data

    @model_validator(mode="after")
    def _check(self) -> FCOSConfig:
        check_per_level("regression_ranges", [0.0, *self.regression_ranges], len(level_names(PYRAMID)), "bound")
        fcos_range_bounds(self.regression_ranges)
        return self


def assign_points(
    points: Tensor,
    counts: list[int],
    gt_boxes: Tensor,
    gt_valid: Tensor,
    lower: Tensor,
    upper: Tensor,
    radius: float = CENTER_SAMPLING_RADIUS,
) -> Tensor:
    """The box assigned to each location [B, A] (index into G, or -1), for the whole batch at once.

    ``points`` [A, 4] are torchvision's FCOS "anchors" (squares of the level's size around each
    location), ``gt_boxes`` [B, G, 4] with validity ``gt_valid`` [B, G] (``matching.pad_boxes``),
    ``lower`` / ``upper`` [A] each location's regression range. The arithmetic is that of torchvision's
    ``FCOS.compute_loss`` term by term, so the result (ties included) equals its per-image one; padding
    boxes never match.
    """
    num_points = points.shape[0]
    if sum(counts) != num_points:
        raise ValueError(f"level counts {counts} do not add up to the {num_points} points")
    centers = (points[:, :2] + points[:, 2:]) / 2  # [A, 2]
    sizes = points[:, 2] - points[:, 0]  # [A]
    gt_centers = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # [B, G, 2]
    x = centers[None, :, None, 0]
    y = centers[None, :, None, 1]
    # centre sampling: max(|dx|, |dy|) < r·s, one [B, A, G] at a time instead of torchvision's [A, G, 2]
    near = torch.maximum((x - gt_centers[:, None, :, 0]).abs(), (y - gt_centers[:, None, :, 1]).abs())
    match = near < (radius * sizes)[None, :, None]
    x0, y0, x1, y1 = (gt_boxes[:, None, :, k] for k in range(4))
    left, top, right, bottom = x - x0, y - y0, x1 - x, y1 - y
    inside = torch.minimum(torch.minimum(left, top), torch.minimum(right, bottom)) > 0
    farthest = torch.maximum(torch.maximum(left, top), torch.maximum(right, bottom))
    match &= inside & (farthest > lower[None, :, None]) & (farthest < upper[None, :, None])
    match &= gt_valid[:, None, :]
    areas = (gt_boxes[..., 2] - gt_boxes[..., 0]) * (gt_boxes[..., 3] - gt_boxes[..., 1])  # [B, G]
    # the smallest box wins; float32 like torchvision (1e8 − area is rounded to a multiple of 8 there,
    # so boxes of nearly equal area tie and the first one wins, in both implementations)
    score = match.to(torch.float32) * (_AREA_OFFSET - areas[:, None, :])
    best, index = score.max(dim=2)
    return index.masked_fill_(best < 1e-5, -1)


class PerLevelFCOS(DenseDetector, FCOS):
    """torchvision's FCOS with a batched, per-level training loss (``DetectorLosses``).

    Evaluation mode returns torchvision's detections (boxes in input-image pixels, labels 0..C-1, scores
    sqrt(p_cls · p_ctr)). ``log_variances`` holds s_cls and s_reg when the loss is Bayesian, else None.
    ``range_bounds`` are m_0..m_L of the levels' regression ranges (m_0 = 0, m_L = ∞).
    """

    section = FCOSConfig
    # Khanzhina et al. section 4.2; centerness stays plain BCE
    loss_tasks: ClassVar[dict[str, float]] = {"cls": 0.0, "reg": 1.0}

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        loss: LossConfig,
        level_names: list[str],
        range_bounds: list[float],
        log_variances: LogVariances | None = None,
        box_uncertainty: bool = False,
        **fcos_kwargs: object,
    ) -> None:
        super().__init__(backbone, num_classes, **fcos_kwargs)
        if len(range_bounds) != len(level_names) + 1:
            raise ValueError(f"range_bounds needs {len(level_names) + 1} values, got {range_bounds}")
        self.setup_losses(loss, num_classes, level_names, log_variances, box_uncertainty)
        self.range_bounds = [float(b) for b in range_bounds]
        self.transform = DetectionTransform.like(self.transform)  # rescales bbox_std too

    @classmethod
    def from_config(cls, section: FCOSConfig, loss: LossConfig, num_classes: int) -> PerLevelFCOS:
        """FCOS: backbone P3-P7 (P6/P7 from P5), one point per location, head.

        - ``model.regression_ranges`` set the levels' ranges (:func:`fcos_range_bounds`). The points
          themselves are torchvision's: squares of the level's stride (8, ..., 128), which set the
          centre-sampling radius (in strides) and the unit of the regressed distances.
        - ``model.head_norm``: ``group_norm`` gives the head GroupNorm with ``group_norm_groups`` groups
          (torchvision's FCOS, and the paper, always use GroupNorm(32)); ``none`` gives no normalisation.
        - ``prior_probability`` sets the initial classification bias; score and NMS thresholds,
          ``detections_per_img`` and ``topk_candidates`` go to torchvision's post-processing, where the
          score is sqrt(p_cls · p_ctr).
        """
        m = section
        names = level_names(PYRAMID)
        backbone = build_backbone(m, PYRAMID)
        first_stride = PYRAMIDS[PYRAMID].strides[0]
        strides = tuple(first_stride * 2**i for i in range(len(names)))
        points = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(names))
        norm_layer = partial(nn.GroupNorm, m.group_norm_groups) if m.head_norm == "group_norm" else nn.Identity
        head = FCOSDenseHead(
            backbone.out_channels,
            num_classes,
            norm_layer,
            m.prior_probability,
            log_var_range=loss.box_log_var_range if m.box_uncertainty else None,
            detach_features=detaches_features(loss),
        )
        return cls(
            backbone,
            num_classes,
            loss=loss,
            level_names=names,
            range_bounds=fcos_range_bounds(m.regression_ranges),
            log_variances=cls.build_log_variances(loss),
            box_uncertainty=m.box_uncertainty,
            **m.transform_kwargs(),
            anchor_generator=points,
            head=head,
            center_sampling_radius=m.center_sampling_radius,
            score_thresh=m.score_thresh,
            nms_thresh=m.nms_thresh,
            detections_per_img=m.detections_per_img,
            topk_candidates=m.topk_candidates,
        )

    def encode_boxes(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """(l, t, r, b) / s of ``boxes`` from the points (torchvision's ``BoxLinearCoder``, normalised)."""
        return self.head.box_coder.encode(anchors, boxes)

    def decode_boxes(self, regression: Tensor, anchors: Tensor) -> Tensor:
        return self.head.box_coder.decode(regression, anchors)

    def candidate_scores(self, level: dict[str, Tensor]) -> Tensor:
        return torch.sqrt(torch.sigmoid(level["cls_logits"]) * torch.sigmoid(level["bbox_ctrness"]))

    def candidate_boxes(self, regression: Tensor, anchors: Tensor) -> Tensor:
        return self.head.box_coder.decode(regression, anchors)

    def candidate_std(self, log_var: Tensor, regression: Tensor, anchors: Tensor) -> Tensor:
        return distance_std(log_var, anchors)

    def point_ranges(self, counts: list[int], dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """Each location's regression range (lower, upper) [A]: (m_i, m_{i+1}) of its level i."""
        if len(counts) != len(self.level_names):
            raise ValueError(f"got {len(counts)} feature levels, the model has {self.level_names}")
        repeats = torch.tensor(counts, device=device)
        bounds = torch.tensor(self.range_bounds, dtype=dtype, device=device)
        total = sum(counts)  # given, so that repeat_interleave needs no device sync to size its output
        return (
            bounds[:-1].repeat_interleave(repeats, output_size=total),
            bounds[1:].repeat_interleave(repeats, output_size=total),
        )

    def assign(self, targets: list[dict[str, Tensor]], points: Tensor, counts: list[int]) -> Assignment:
        """Each location's box by centre sampling within its level's range (:func:`assign_points`); FCOS
        ignores no location."""
        gt_boxes, gt_labels, gt_valid = pad_boxes(
            [t["boxes"].to(points.dtype) for t in targets], [t["labels"] for t in targets]
        )
        lower, upper = self.point_ranges(counts, points.dtype, points.device)
        assigned = assign_points(points, counts, gt_boxes, gt_valid, lower, upper, self.center_sampling_radius)
        return Assignment(assigned, gt_boxes, gt_labels, gt_valid)

    def anchor_losses(
        self, outputs: dict[str, Tensor], points: Tensor, assignment: Assignment
    ) -> dict[str, TaskLoss]:
        """S^cls on every location, S^reg and S^ctr on the foreground ones (module docstring)."""
        logits = outputs["cls_logits"]
        batch, num_points, _ = logits.shape
        foreground = assignment.foreground
        # FCOS ignores no location: every one enters the classification loss
        cls = self.classification_loss(logits, assignment.labels, foreground)

        matched_boxes = assignment.boxes
        batch_points = points.expand(batch, num_points, 4)
        # (l, t, r, b) / s of the assigned box; for background locations it is finite junk (masked below)
        target_distances = self.encode_boxes(matched_boxes, batch_points)
        reg = masked(self.box_loss(outputs, batch_points, matched_boxes, target_distances), foreground)

        lr, tb = target_distances[..., 0::2], target_distances[..., 1::2]
        ctr_target = torch.sqrt(
            (lr.min(dim=-1).values / lr.max(dim=-1).values) * (tb.min(dim=-1).values / tb.max(dim=-1).values)
        )
        # background targets can be NaN (0/0) or negative: zero them before the BCE, whose input
        # gradient (p − target) would otherwise carry the NaN through the mask
        ctr_target = torch.where(foreground, ctr_target, 0.0)
        ctr_logits = outputs["bbox_ctrness"].squeeze(dim=2)
        ctr_point = nn.functional.binary_cross_entropy_with_logits(ctr_logits, ctr_target, reduction="none")
        return {"cls": cls, "reg": reg, "ctr": masked(TaskLoss(ctr_point, None), foreground)}


def fcos_range_bounds(regression_ranges: list[float]) -> list[float]:
    """m_0..m_L from ``model.regression_ranges`` (m_1..m_{L−1}): level i takes max(l, t, r, b) in (m_i, m_{i+1}).

    The lowest level takes everything below (m_0 = 0) and the highest everything above (m_L = ∞), as in
    the FCOS paper and torchvision. The default (64, 128, 256, 512) gives torchvision's and the paper's
    ranges exactly: 4 and 8 times each level's stride.
    """
    if any(b <= a for a, b in itertools.pairwise(regression_ranges)) or regression_ranges[0] <= 0:
        raise ValueError(f"model.regression_ranges must be positive and increasing, got {regression_ranges}")
    return [0.0, *(float(s) for s in regression_ranges), math.inf]


__all__ = ["FCOSConfig", "PerLevelFCOS", "assign_points", "fcos_range_bounds"]
