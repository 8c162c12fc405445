"""RetinaNet whose training loss comes out per pyramid level, computed for the whole batch at once.

torchvision's ``RetinaNet`` supplies the transform, backbone, head, anchor generator and post-processing;
this subclass replaces the loss. torchvision matches anchors and computes the losses image by image in
Python (with a host sync per image); here all images share their anchors after padding, so matching is
one [B, A, G_max] IoU (``matching.py``) and the losses are per-anchor tensors [B, A] summed per level
over the contiguous anchor segments of each level.

Loss (``docs/models.md``), for image b, level i, anchors a of that level, n_b foreground anchors:

    S^cls_{b,i} = Σ_{a valid} Σ_c FL(x_{a,c}, t_{a,c})        (ignored anchors, IoU in [low, high), left out)
    S^reg_{b,i} = Σ_{a foreground} ℓ(δ_a, δ*_a)              (ℓ: L1 / smooth L1 on deltas, or GIoU)
    L_i = cls_weight · N(S^cls)_i + N(S^reg)_i

with N the per-image or per-batch normalisation of ``base.normalise``; Σ_i L_i is torchvision's
``classification + bbox_regression`` for per_image, cls_weight 1 and the same box loss. With
``loss.bayesian`` (Eq. 19 of Khanzhina et al.) FL becomes the Bayesian focal loss with s_cls (Eq. 16) and
ℓ the Bayesian smooth L1 with s_reg (Eq. 14), normalised the same way. With ``model.box_uncertainty`` ℓ
becomes the KL-Loss e^(−α)·ℓ + α/2 per delta with the head's α (He et al. 2019 Eq. 9/10,
``losses/box_uncertainty.py``), blended in over ``loss.box_uncertainty_warmup``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torchvision.models.detection.retinanet import RetinaNet

from robustdet.box_coder import BoxCoder
from robustdet.losses import LogVariances, LossConfig, TaskLoss, detaches_features
from robustdet.models.anchors import build_anchor_generator
from robustdet.models.backbones import build_backbone, level_names
from robustdet.models.base import check_per_level
from robustdet.models.box_std import DetectionTransform, delta_std
from robustdet.models.dense import Assignment, DenseDetector, DenseSection, masked
from robustdet.models.heads import RetinaNetDenseHead
from robustdet.models.matching import batched_box_iou, match_anchors, pad_boxes

PYRAMID = "p3p7"


class RetinaNetConfig(DenseSection):
    """``model.name: retinanet``: anchors (one base size per level P3-P7, times scales and ratios) and the
    IoU thresholds of the anchor matcher."""

    name: Literal["retinanet"] = "retinanet"
    anchor_sizes: list[float] = Field(default_factory=lambda: [32.0, 64.0, 128.0, 256.0, 512.0])
    anchor_scales: list[float] = Field(default_factory=lambda: [1.0, 2 ** (1 / 3), 2 ** (2 / 3)])
    aspect_ratios: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0])
    fg_iou_thresh: float = Field(0.5, gt=0, le=1)
    bg_iou_thresh: float = Field(0.4, ge=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> RetinaNetConfig:
        if self.bg_iou_thresh > self.fg_iou_thresh:
            raise ValueError("model.bg_iou_thresh must not exceed model.fg_iou_thresh")
        check_per_level("anchor_sizes", self.anchor_sizes, len(level_names(PYRAMID)), "anchor size")
        return self


class PerLevelRetinaNet(DenseDetector, RetinaNet):
    """torchvision's RetinaNet with a batched, per-level training loss (``DetectorLosses``).

    Evaluation mode returns torchvision's detections (boxes in input-image pixels, labels 0..C-1).
    ``log_variances`` holds s_cls and s_reg when the loss is Bayesian, else None.
    """

    section = RetinaNetConfig
    loss_tasks: ClassVar[dict[str, float]] = {"cls": 0.0, "reg": 1.0}  # Khanzhina et al. section 4.2

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        loss: LossConfig,
        level_names: list[str],
        log_variances: LogVariances | None = None,
        box_uncertainty: bool = False,
        **retinanet_kwargs: object,
    ) -> None:
        super().__init__(backbone, num_classes, **retinanet_kwargs)
        self.setup_losses(loss, num_classes, level_names, log_variances, box_uncertainty)
        self.delta_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.transform = DetectionTransform.like(self.transform)  # rescales bbox_std too

    @classmethod
    def from_config(cls, section: RetinaNetConfig, loss: LossConfig, num_classes: int) -> PerLevelRetinaNet:
        """RetinaNet: backbone P3-P7 (P6/P7 from C5), anchors, head with the configured prior."""
        m = section
        backbone = build_backbone(m, PYRAMID)
        anchor_generator = build_anchor_generator(m.anchor_sizes, m.anchor_scales, m.aspect_ratios)
        norm_layer = partial(nn.GroupNorm, m.group_norm_groups) if m.head_norm == "group_norm" else None
        head = RetinaNetDenseHead(
            backbone.out_channels,
            anchor_generator.num_anchors_per_location()[0],
            num_classes,
            norm_layer=norm_layer,
            log_var_range=loss.box_log_var_range if m.box_uncertainty else None,
            detach_features=detaches_features(loss),
        )
        # RetinaNetHead always uses prior 0.01; the configured prior sets the initial foreground probability
        nn.init.constant_(
            head.classification_head.cls_logits.bias, -math.log((1 - m.prior_probability) / m.prior_probability)
        )
        return cls(
            backbone,
            num_classes,
            loss=loss,
            level_names=level_names(PYRAMID),
            log_variances=cls.build_log_variances(loss),
            box_uncertainty=m.box_uncertainty,
            **m.transform_kwargs(),
            anchor_generator=anchor_generator,
            head=head,
            score_thresh=m.score_thresh,
            nms_thresh=m.nms_thresh,
            detections_per_img=m.detections_per_img,
            fg_iou_thresh=m.fg_iou_thresh,
            bg_iou_thresh=m.bg_iou_thresh,
            topk_candidates=m.topk_candidates,
        )

    def encode_boxes(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        return self.delta_coder.encode(boxes, anchors)

    def decode_boxes(self, regression: Tensor, anchors: Tensor) -> Tensor:
        return self.delta_coder.decode(regression, anchors)

    def candidate_scores(self, level: dict[str, Tensor]) -> Tensor:
        return torch.sigmoid(level["cls_logits"])

    def candidate_boxes(self, regression: Tensor, anchors: Tensor) -> Tensor:
        return self.box_coder.decode_single(regression, anchors)

    def candidate_std(self, log_var: Tensor, regression: Tensor, anchors: Tensor) -> Tensor:
        coder = self.box_coder
        return delta_std(log_var, regression, anchors, coder.weights, coder.bbox_xform_clip)

    def assign(self, targets: list[dict[str, Tensor]], anchors: Tensor, counts: list[int]) -> Assignment:
        """Each anchor's box by IoU: torchvision's ``Matcher`` for the whole batch (``matching.py``);
        IoU in [low, high) is ignored."""
        gt_boxes, gt_labels, gt_valid = pad_boxes(
            [t["boxes"].to(anchors.dtype) for t in targets], [t["labels"] for t in targets]
        )
        matched = match_anchors(
            batched_box_iou(anchors, gt_boxes, gt_valid),
            gt_valid,
            self.proposal_matcher.high_threshold,
            self.proposal_matcher.low_threshold,
        )
        return Assignment(matched, gt_boxes, gt_labels, gt_valid)

    def anchor_losses(
        self, outputs: dict[str, Tensor], anchors: Tensor, assignment: Assignment
    ) -> dict[str, TaskLoss]:
        """S^cls per anchor on the anchors not ignored, S^reg on the foreground ones (module docstring)."""
        logits = outputs["cls_logits"]
        batch, num_anchors, _ = logits.shape
        fg = assignment.foreground
        cls = masked(self.classification_loss(logits, assignment.labels, fg), assignment.valid)
        batch_anchors = anchors.expand(batch, num_anchors, 4)
        reg = masked(self.box_loss(outputs, batch_anchors, assignment.boxes), fg)
        return {"cls": cls, "reg": reg}


__all__ = ["PerLevelRetinaNet", "RetinaNetConfig"]
