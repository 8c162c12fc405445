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
least area. m_i = ``model.anchor_sizes[i]`` except m_0 = 0 and m_5 = ∞ (see :func:`build_fcos`).

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
"""

from __future__ import annotations

import itertools
import math
from functools import partial

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS, FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.ops import generalized_box_iou_loss

from robustdet.config import Config, LossConfig
from robustdet.losses import LogVariances, bayesian_smooth_l1_loss, smooth_l1_loss
from robustdet.models.backbones import PYRAMIDS, build_backbone, level_names
from robustdet.models.base import DetectorLosses, build_log_variances, level_sums, normalise
from robustdet.models.matching import pad_boxes
from robustdet.models.retinanet import GIOU_EPS, PerLevelRetinaNet, _loss_dtype

PYRAMID = "p3p7_from_p5"
CENTER_SAMPLING_RADIUS = 1.5  # torchvision's default (FCOS "center sampling", in units of the stride)
# torchvision's tie-break: a matching box scores 1e8 − area in float32, the largest score wins
_AREA_OFFSET = 1e8


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


class PerLevelFCOS(FCOS):
    """torchvision's FCOS with a batched, per-level training loss (``DetectorLosses``).

    Evaluation mode returns torchvision's detections (boxes in input-image pixels, labels 0..C-1, scores
    sqrt(p_cls · p_ctr)). ``log_variances`` holds s_cls and s_reg when the loss is Bayesian, else None.
    ``range_bounds`` are m_0..m_L of the levels' regression ranges (m_0 = 0, m_L = ∞).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        loss: LossConfig,
        level_names: list[str],
        range_bounds: list[float],
        log_variances: LogVariances | None = None,
        **fcos_kwargs: object,
    ) -> None:
        super().__init__(backbone, num_classes, **fcos_kwargs)
        if loss.bayesian and log_variances is None:
            raise ValueError("loss.bayesian=true needs log_variances (s_cls, s_reg)")
        if len(range_bounds) != len(level_names) + 1:
            raise ValueError(f"range_bounds needs {len(level_names) + 1} values, got {range_bounds}")
        self.loss_cfg = loss
        self.num_classes = num_classes
        self.level_names = list(level_names)
        self.range_bounds = [float(b) for b in range_bounds]
        self.log_variances = log_variances if loss.bayesian else None

    # Shared with RetinaNet (they read only anchor_generator, transform, postprocess_detections,
    # num_classes, loss_cfg and log_variances, which both detectors have): points shared by the padded
    # batch in float32 even under autocast, eval decoding in that dtype, the chunked (Bayesian) focal
    # loss, and the target checks with one host sync per batch.
    batch_anchors = PerLevelRetinaNet.batch_anchors
    _detect = PerLevelRetinaNet._detect
    _focal_per_anchor = PerLevelRetinaNet._focal_per_anchor
    _check_target_shapes = PerLevelRetinaNet._check_target_shapes
    _check_boxes = PerLevelRetinaNet._check_boxes

    # the same steps as RetinaNet's (transform, backbone, head, shared points, loss or detections); the
    # methods it calls (batch_anchors, compute_level_losses, _detect) are FCOS's own
    forward = PerLevelRetinaNet.forward

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

    def compute_level_losses(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        points: Tensor,
        counts: list[int],
    ) -> DetectorLosses:
        """Per-level losses L_i (Eq. 19 when Bayesian) from head outputs [B, A, C] / [B, A, 4] / [B, A, 1].

        ``targets`` are in the transformed (resized) coordinates, ``points`` [A, 4] shared by the batch,
        ``counts`` the locations of each level in head-output order.
        """
        cfg = self.loss_cfg
        dtype = _loss_dtype(head_outputs["cls_logits"].dtype)
        logits = head_outputs["cls_logits"].to(dtype)
        distances = head_outputs["bbox_regression"].to(dtype)
        ctr_logits = head_outputs["bbox_ctrness"].to(dtype).squeeze(dim=2)
        points = points.to(dtype)
        batch, num_points, _ = logits.shape

        gt_boxes, gt_labels, gt_valid = pad_boxes(
            [t["boxes"].to(dtype) for t in targets], [t["labels"] for t in targets]
        )
        lower, upper = self.point_ranges(counts, dtype, points.device)
        assigned = assign_points(points, counts, gt_boxes, gt_valid, lower, upper, self.center_sampling_radius)
        foreground = assigned >= 0
        num_foreground = foreground.sum(dim=1)
        gt_index = assigned.clamp(min=0)

        # FCOS ignores no location: every one enters the classification loss
        labels = gt_labels.gather(1, gt_index)
        cls_point = self._focal_per_anchor(logits, labels, foreground)

        matched_boxes = gt_boxes.gather(1, gt_index[..., None].expand(batch, num_points, 4))
        batch_points = points.expand(batch, num_points, 4)
        coder = self.head.box_coder
        # (l, t, r, b) / s of the assigned box; for background locations it is finite junk (masked below)
        target_distances = coder.encode(batch_points, matched_boxes)
        if cfg.box_loss == "giou":
            predicted = coder.decode(distances, batch_points)
            reg_point = generalized_box_iou_loss(
                predicted.reshape(-1, 4), matched_boxes.reshape(-1, 4), reduction="none", eps=GIOU_EPS
            ).view(batch, num_points)
        else:
            beta = 0.0 if cfg.box_loss == "l1" else cfg.beta
            lv = self.log_variances
            if lv is not None:
                reg_elem = bayesian_smooth_l1_loss(
                    distances, target_distances, lv["reg"], beta=beta, reduction="none"
                )
            else:
                reg_elem = smooth_l1_loss(distances, target_distances, beta=beta, reduction="none")
            reg_point = reg_elem.sum(dim=2)
        reg_point = torch.where(foreground, reg_point, 0.0)

        lr, tb = target_distances[..., 0::2], target_distances[..., 1::2]
        ctr_target = torch.sqrt(
            (lr.min(dim=-1).values / lr.max(dim=-1).values) * (tb.min(dim=-1).values / tb.max(dim=-1).values)
        )
        # background targets can be NaN (0/0) or negative: zero them before the BCE, whose input
        # gradient (p − target) would otherwise carry the NaN through the mask
        ctr_target = torch.where(foreground, ctr_target, 0.0)
        ctr_point = nn.functional.binary_cross_entropy_with_logits(ctr_logits, ctr_target, reduction="none")
        ctr_point = torch.where(foreground, ctr_point, 0.0)

        cls_levels = cfg.cls_weight * normalise(
            level_sums(cls_point, counts), num_foreground, cfg.normalization
        )
        reg_levels = normalise(level_sums(reg_point, counts), num_foreground, cfg.normalization)
        ctr_levels = normalise(level_sums(ctr_point, counts), num_foreground, cfg.normalization)
        return DetectorLosses(
            level_names=list(self.level_names),
            level_losses=cls_levels + reg_levels + ctr_levels,
            components={"cls": cls_levels.detach(), "reg": reg_levels.detach(), "ctr": ctr_levels.detach()},
            extra_loss=logits.new_zeros(()),
            extra_components={},
        )


def fcos_range_bounds(anchor_sizes: list[float]) -> list[float]:
    """m_0..m_L from ``model.anchor_sizes``: level i takes max(l, t, r, b) in (sizes[i], sizes[i+1]).

    The lowest level takes everything below (m_0 = 0) and the highest everything above (m_L = ∞), as in
    the FCOS paper and torchvision. The default sizes (32, 64, 128, 256, 512) give torchvision's and the
    paper's ranges exactly: 4 and 8 times each level's stride.
    """
    if any(b <= a for a, b in itertools.pairwise(anchor_sizes)) or anchor_sizes[0] <= 0:
        raise ValueError(
            f"model.anchor_sizes for FCOS are the lower ends of the levels' regression ranges and must be "
            f"positive and increasing, got {anchor_sizes}"
        )
    return [0.0, *(float(s) for s in anchor_sizes[1:]), math.inf]


def build_fcos(cfg: Config, num_classes: int) -> PerLevelFCOS:
    """FCOS from ``cfg.model`` / ``cfg.loss``: backbone P3-P7 (P6/P7 from P5), one point per location, head.

    - ``model.anchor_sizes`` (one per level) set the regression ranges (:func:`fcos_range_bounds`);
      ``anchor_scales``, ``aspect_ratios`` and the IoU thresholds have no meaning for FCOS and are unused.
      The points themselves are torchvision's: squares of the level's stride (8, ..., 128), which set the
      centre-sampling radius (1.5 strides) and the unit of the regressed distances.
    - ``model.head_norm``: ``group_norm`` gives the head GroupNorm with ``group_norm_groups`` groups
      (torchvision's FCOS, and the paper, always use GroupNorm(32)); ``none`` gives no normalisation.
    - ``prior_probability`` sets the initial classification bias; score and NMS thresholds,
      ``detections_per_img`` and ``topk_candidates`` go to torchvision's post-processing, where the score
      is sqrt(p_cls · p_ctr).
    """
    m = cfg.model
    names = level_names(PYRAMID)
    if len(m.anchor_sizes) != len(names):
        raise ValueError(
            f"model.anchor_sizes needs one size per level {names}, got {len(m.anchor_sizes)}: {m.anchor_sizes}"
        )
    bounds = fcos_range_bounds(list(m.anchor_sizes))
    backbone = build_backbone(m, PYRAMID)
    first_stride = PYRAMIDS[PYRAMID].strides[0]
    strides = tuple(first_stride * 2**i for i in range(len(names)))
    points = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(names))
    norm_layer = partial(nn.GroupNorm, m.group_norm_groups) if m.head_norm == "group_norm" else nn.Identity
    # FCOSHead builds its sub-heads with GroupNorm(32) and has no norm argument; num_convs=0 makes it
    # build none, and the sub-heads are replaced with the configured ones (same parameter names).
    head = FCOSHead(backbone.out_channels, 1, num_classes, num_convs=0)
    head.classification_head = FCOSClassificationHead(
        backbone.out_channels, 1, num_classes, prior_probability=m.prior_probability, norm_layer=norm_layer
    )
    head.regression_head = FCOSRegressionHead(backbone.out_channels, 1, norm_layer=norm_layer)
    return PerLevelFCOS(
        backbone,
        num_classes,
        loss=cfg.loss,
        level_names=names,
        range_bounds=bounds,
        log_variances=build_log_variances(cfg),
        min_size=m.min_size,
        max_size=m.max_size,
        image_mean=list(m.image_mean),
        image_std=list(m.image_std),
        anchor_generator=points,
        head=head,
        center_sampling_radius=CENTER_SAMPLING_RADIUS,
        score_thresh=m.score_thresh,
        nms_thresh=m.nms_thresh,
        detections_per_img=m.detections_per_img,
        topk_candidates=m.topk_candidates,
    )


__all__ = ["PerLevelFCOS", "assign_points", "build_fcos", "fcos_range_bounds"]
