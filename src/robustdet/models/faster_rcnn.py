"""Faster R-CNN (FPN) whose RoI-head loss comes out per pyramid level, the RPN's logged per anchor level.

torchvision's ``FasterRCNN`` supplies the transform, backbone, RPN (head, anchors, matcher, sampler,
proposal filtering), the RoI head (sampling, ``MultiScaleRoIAlign``, box head, predictor) and the
post-processing; this subclass runs those parts itself and replaces the two loss functions, so that
every sampled anchor and every sampled RoI keeps the pyramid level it came from.

Loss (``docs/models.md``; ``shared/design/equations.md``, "Per-level losses"). The RPN samples a set S of
anchors over the batch (torchvision's ``BalancedPositiveNegativeSampler``, 256 per image, half positive
at most), P ⊂ S the positives; the RoI head samples R RoIs (512 per image, a quarter positive at most),
each pooled from the FPN level k(r) of torchvision's ``LevelMapper`` (FPN Eq. 1), Q ⊂ R the foreground
ones. With ℓ(a) the level of anchor a, ρ = ``cls_weight``:

    RPN, level i ∈ P2..P6:   rpn_cls_i = ρ · Σ_{a ∈ S, ℓ(a) = i} BCE(o_a, y_a) / |S|
                             rpn_reg_i =     Σ_{a ∈ P, ℓ(a) = i} Σ_k SmoothL1_β(δ_ak − δ*_ak) / |S|
    RoI, level i ∈ P2..P5:   roi_cls_i = ρ · Σ_{r ∈ R, k(r) = i} CE(z_r, c_r) / |R|
                             roi_reg_i =     Σ_{r ∈ Q, k(r) = i} Σ_k SmoothL1_β(δ_{r,c_r,k} − δ*_rk) / |R|

which is torchvision's normalisation (the sampled count, not the foreground count), so Σ_i over the RPN
levels is ``loss_objectness + loss_rpn_box_reg`` and Σ_i over the RoI levels ``loss_classifier +
loss_box_reg`` (for β = 1/9 and ρ = 1, torchvision's values). As in Luo et al. ("we omit RPN"), only the
RoI levels L_i = roi_cls_i + roi_reg_i are weighted; the RPN total is ``extra_loss``.

With ``loss.bayesian`` each of the four tasks has its own s (``LogVariances`` keys rpn_cls, rpn_reg,
roi_cls, roi_reg): BCE becomes the Bayesian BCE e^(−s)·BCE + s/2 (Eq. 16 of Khanzhina et al. with γ = 0 and
no α), CE Kendall's e^(−s)·CE + s/2 (Eq. 5, section 2.1), SmoothL1 the Bayesian smooth L1 (Eq. 14); the
sampling, level split and normalisation stay the same.

Labels: the engine's labels are 0..C-1 without background, torchvision's Faster R-CNN reserves 0 for
background, so labels go in shifted by +1 and detections come out shifted back by −1.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNConvFCHead, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RPNHead, concat_box_prediction_layers
from torchvision.ops import MultiScaleRoIAlign, batched_nms, clip_boxes_to_image, remove_small_boxes
from torchvision.ops.poolers import initLevelMapper

from robustdet.losses import (
    LogVariances,
    LossConfig,
    TaskLoss,
    box_loss_row,
    detaches_features,
    task_loss,
    uncertain_box_loss,
)
from robustdet.models.anchors import build_anchor_generator
from robustdet.models.backbones import PYRAMIDS, build_backbone, level_names
from robustdet.models.base import Detector, DetectorLosses, ModelSection, check_per_level, loss_dtype
from robustdet.models.box_std import DetectionTransform, delta_std
from robustdet.models.heads import box_predictor
from robustdet.models.voting import ImageCandidates, batch_detections

# torchvision's FasterRCNN: 7x7 RoIAlign with 2 samples per bin from P2-P5, a 1024-wide box head
ROI_FEATURE_MAPS = ["0", "1", "2", "3"]
ROI_OUTPUT_SIZE = 7
ROI_SAMPLING_RATIO = 2
REPRESENTATION_SIZE = 1024
# FPN Eq. 1 sends a 224x224 RoI (the ImageNet size) to P4, for torchvision's anchors of 32 px on P2
CANONICAL_SCALE = 224
CANONICAL_P2_ANCHOR = 32.0


PYRAMID = "p2p6"


class FasterRCNNConfig(ModelSection):
    """``model.name: faster_rcnn``: RPN anchors on P2-P6 and the RPN / RoI-head sampling sizes.

    Anchors: level i gets sizes ``anchor_sizes[i] × anchor_scales`` at every ``aspect_ratios`` entry
    (Faster R-CNN's FPN convention, and the default, is a single scale). The sampling sizes and the
    other RPN / RoI settings are torchvision's defaults; ``box_batch_size_per_image`` is the main cost
    of an iteration on a CPU (every sampled RoI goes through the box head).
    """

    name: Literal["faster_rcnn"] = "faster_rcnn"
    anchor_sizes: list[float] = Field(default_factory=lambda: [32.0, 64.0, 128.0, 256.0, 512.0])
    anchor_scales: list[float] = Field(default_factory=lambda: [1.0])
    aspect_ratios: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0])
    rpn_batch_size_per_image: int = Field(256, ge=1)
    box_batch_size_per_image: int = Field(512, ge=1)

    @model_validator(mode="after")
    def _check(self) -> FasterRCNNConfig:
        check_per_level("anchor_sizes", self.anchor_sizes, len(level_names(PYRAMID)), "anchor size")
        return self


def sum_by_level(values: Tensor, levels: Tensor, num_levels: int) -> Tensor:
    """Σ of ``values`` [N] per level index ``levels`` [N] (0..num_levels-1): [num_levels].

    A masked sum over a [num_levels, N] table rather than ``index_add_``, whose float atomics on CUDA
    make the sums differ from run to run; N is at most a few thousand sampled anchors or RoIs.
    """
    hit = levels[None, :] == torch.arange(num_levels, device=levels.device)[:, None]
    return torch.where(hit, values[None, :], 0.0).sum(dim=1)


class PerLevelFasterRCNN(Detector, FasterRCNN):
    """torchvision's Faster R-CNN (FPN) with per-level training losses (``DetectorLosses``).

    ``num_classes`` counts the object classes only (labels 0..C-1); the predictor has C + 1 outputs,
    torchvision's class 0 being background. Training returns ``DetectorLosses`` with the RoI head's
    losses per level P2-P5 (``level_names``) and the RPN's total in ``extra_loss``, its per-level parts
    (``rpn_level_names``, P2-P6) in ``extra_components``. Evaluation returns torchvision's detections
    (boxes in input-image pixels) with labels 0..C-1. ``log_variances`` holds s_rpn_cls, s_rpn_reg,
    s_roi_cls, s_roi_reg when the loss is Bayesian, else None.
    """

    section = FasterRCNNConfig
    # one s per task of both stages (Khanzhina et al. section 4.2: s_reg 1, s_cls 0)
    loss_tasks: ClassVar[dict[str, float]] = {"rpn_cls": 0.0, "rpn_reg": 1.0, "roi_cls": 0.0, "roi_reg": 1.0}

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        loss: LossConfig,
        log_variances: LogVariances | None = None,
        box_uncertainty: bool = False,
        **faster_rcnn_kwargs: object,
    ) -> None:
        if box_loss_row(loss).decoded:
            raise ValueError(
                f"loss.box_loss={loss.box_loss} is not available for Faster R-CNN: its RPN and box head regress "
                "anchor/proposal deltas with smooth L1; use loss.box_loss=smooth_l1 (loss.beta=0.1111111111111111 "
                "is torchvision's 1/9) or l1"
            )
        # +1: torchvision's box predictor has a background output at index 0
        predictor_classes = None if "box_predictor" in faster_rcnn_kwargs else num_classes + 1
        super().__init__(backbone, predictor_classes, **faster_rcnn_kwargs)
        roi_pool = self.roi_heads.box_roi_pool
        if list(roi_pool.featmap_names) != ROI_FEATURE_MAPS:
            raise ValueError(f"box_roi_pool must pool from {ROI_FEATURE_MAPS} (P2-P5), got {roi_pool.featmap_names}")
        roi_levels = level_names(PYRAMID)[: len(ROI_FEATURE_MAPS)]  # P2-P5: the RoI levels, weighted
        self.setup_losses(loss, num_classes, roi_levels, log_variances, box_uncertainty)
        self.rpn_level_names = level_names(PYRAMID)  # P2-P6: the RPN's anchor levels, logged
        self.transform = DetectionTransform.like(self.transform)  # rescales bbox_std too

    @classmethod
    def from_config(cls, section: FasterRCNNConfig, loss: LossConfig, num_classes: int) -> PerLevelFasterRCNN:
        """Faster R-CNN: backbone P2-P6 (P6 max-pooled), RPN, RoI head.

        ``model.head_norm: group_norm`` gives the box head torchvision's ``FastRCNNConvFCHead`` (4 conv + 1
        fc, as ``fasterrcnn_resnet50_fpn_v2``) with GroupNorm; ``none`` the paper's two-fc ``TwoMLPHead``.
        IoU thresholds and proposal counts are torchvision's defaults.
        """
        m = section
        backbone = build_backbone(m, PYRAMID)
        channels = backbone.out_channels
        anchor_generator = build_anchor_generator(m.anchor_sizes, m.anchor_scales, m.aspect_ratios)
        rpn_head = RPNHead(channels, anchor_generator.num_anchors_per_location()[0])
        roi_pool = MultiScaleRoIAlign(
            ROI_FEATURE_MAPS, ROI_OUTPUT_SIZE, ROI_SAMPLING_RATIO, canonical_scale=canonical_scale(m.anchor_sizes)
        )
        # torchvision's pooler infers the levels' scales on its first call from the largest unpadded image
        # size, which on small images (43 px padded to 64) comes out a factor 2 off and then sticks for
        # every later batch; the pyramid's strides are known, so the scales are set here
        strides = PYRAMIDS[PYRAMID].strides[: len(ROI_FEATURE_MAPS)]
        roi_pool.scales = [1.0 / s for s in strides]
        roi_pool.map_levels = initLevelMapper(
            int(math.log2(strides[0])), int(math.log2(strides[-1])), canonical_scale=roi_pool.canonical_scale,
            canonical_level=roi_pool.canonical_level,
        )
        box_head: nn.Module
        if m.head_norm == "group_norm":
            box_head = FastRCNNConvFCHead(
                (channels, ROI_OUTPUT_SIZE, ROI_OUTPUT_SIZE),
                [channels] * 4,
                [REPRESENTATION_SIZE],
                norm_layer=partial(nn.GroupNorm, m.group_norm_groups),
            )
        else:
            box_head = TwoMLPHead(channels * ROI_OUTPUT_SIZE**2, REPRESENTATION_SIZE)
        return cls(
            backbone,
            num_classes,
            loss=loss,
            log_variances=cls.build_log_variances(loss),
            box_uncertainty=m.box_uncertainty,
            rpn_batch_size_per_image=m.rpn_batch_size_per_image,
            box_batch_size_per_image=m.box_batch_size_per_image,
            **m.transform_kwargs(),
            rpn_anchor_generator=anchor_generator,
            rpn_head=rpn_head,
            box_roi_pool=roi_pool,
            box_head=box_head,
            box_predictor=box_predictor(
                REPRESENTATION_SIZE,
                num_classes + 1,
                loss.box_log_var_range if m.box_uncertainty else None,
                detaches_features(loss),
            ),
            box_score_thresh=m.score_thresh,
            box_nms_thresh=m.nms_thresh,
            box_detections_per_img=m.detections_per_img,
        )

    # --- forward -------------------------------------------------------------------------------

    def forward(  # type: ignore[override]
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> DetectorLosses | list[dict[str, Tensor]]:
        """Training (targets needed): ``DetectorLosses``. Eval: per image ``{boxes, scores, labels}``."""
        # checked with labels still 0..C-1, so the messages speak the user's labels
        image_list, targets, original_sizes = self._transform_inputs(images, targets)
        if targets is not None:
            targets = [{**t, "labels": t["labels"] + 1} for t in targets]
        features = self.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        proposals, rpn_losses = self._rpn_forward(image_list, features, targets)
        if not self.training:
            detections = self._detect(features, proposals, image_list.image_sizes)
            return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)
        assert rpn_losses is not None and targets is not None
        roi_cls, roi_reg, roi_plain = self._roi_losses(features, proposals, image_list.image_sizes, targets)
        self.count_training_forward()
        rpn_cls, rpn_reg = rpn_losses
        return DetectorLosses(
            level_names=list(self.level_names),
            level_losses=roi_cls + roi_reg,
            components={"roi_cls": roi_cls.detach(), "roi_reg": roi_reg.detach()},
            extra_loss=rpn_cls.sum() + rpn_reg.sum(),
            extra_components={"rpn_cls": rpn_cls.detach(), "rpn_reg": rpn_reg.detach()},
            extra_level_names=list(self.rpn_level_names),
            plain_level_losses=roi_plain,
        )

    def batch_anchors(self, image_list: ImageList, features: list[Tensor]) -> list[Tensor]:
        """The RPN's anchors, one [A, 4] per image (all alike: they depend on the padded batch only).

        Empty stand-ins for the feature maps make torchvision's generator produce them in float32 even
        under bf16 autocast (it reads only the shapes, dtype and device of the maps).
        """
        dtype = loss_dtype(features[0].dtype)
        shapes = [f.new_empty((0, 0, *f.shape[-2:]), dtype=dtype) for f in features]
        return self.rpn.anchor_generator(image_list, shapes)

    def _rpn_forward(
        self,
        image_list: ImageList,
        features: dict[str, Tensor],
        targets: list[dict[str, Tensor]] | None,
    ) -> tuple[list[Tensor], tuple[Tensor, Tensor] | None]:
        """torchvision's ``RegionProposalNetwork.forward`` with per-level losses: (proposals, losses).

        The same calls in the same order, so the sampler draws the same random numbers as torchvision's.
        """
        rpn = self.rpn
        feature_list = list(features.values())
        objectness, deltas = rpn.head(feature_list)
        anchors = self.batch_anchors(image_list, feature_list)
        counts = [int(o[0].numel()) for o in objectness]  # A·H·W anchors per level
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)  # [B·A, 1], [B·A, 4]
        dtype = loss_dtype(objectness.dtype)
        objectness, deltas = objectness.to(dtype), deltas.to(dtype)
        # proposals do not backpropagate into the RPN (torchvision detaches them too)
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, _ = rpn.filter_proposals(proposals, objectness, image_list.image_sizes, counts)
        if not self.training:
            return boxes, None
        assert targets is not None
        labels, matched_gt_boxes = rpn.assign_targets_to_anchors(anchors, targets)
        regression_targets = rpn.box_coder.encode(matched_gt_boxes, anchors)
        return boxes, self.rpn_level_losses(objectness, deltas, labels, regression_targets, counts)

    def _roi_losses(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """torchvision's ``RoIHeads.forward`` (training, boxes only) with per-level losses (and plain total)."""
        heads = self.roi_heads
        proposals, _, labels, regression_targets = heads.select_training_samples(proposals, targets)
        class_logits, box_regression, *log_var = self._box_outputs(features, proposals, image_sizes)
        levels = self.roi_levels(proposals)
        return self.roi_level_losses(
            class_logits, box_regression, labels, regression_targets, levels, log_var[0] if log_var else None
        )

    def _box_outputs(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> tuple[Tensor, ...]:
        """The box predictor's outputs: class logits [R, C+1], deltas [R, 4·(C+1)] and, with
        ``model.box_uncertainty``, their log-variances α [R, 4·(C+1)] (``heads.py``)."""
        heads = self.roi_heads
        pooled = heads.box_roi_pool(features, proposals, image_sizes)
        outputs = heads.box_predictor(heads.box_head(pooled))
        dtype = loss_dtype(outputs[0].dtype)
        return tuple(o.to(dtype) for o in outputs)

    def roi_levels(self, proposals: list[Tensor]) -> Tensor:
        """The pyramid level (0 = P2 .. 3 = P5) each RoI is pooled from: the pooler's own ``LevelMapper``.

        The mapper is set up from the pyramid's strides when the model is built (``from_config``).
        """
        mapper = self.roi_heads.box_roi_pool.map_levels
        if mapper is None:
            raise RuntimeError("roi_levels needs the RoI pooler to have run once (it sets up its level mapper)")
        return mapper(proposals)

    def _detect(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        outputs = self._box_outputs(features, proposals, image_sizes)
        if len(outputs) == 3:  # model.box_uncertainty
            return self._uncertain_detections(*outputs, proposals, image_sizes)
        boxes, scores, labels = self.roi_heads.postprocess_detections(*outputs, proposals, image_sizes)
        # torchvision's labels are 1..C here (background dropped): back to the engine's 0..C-1
        return [
            {"boxes": b, "scores": s, "labels": lab - 1} for b, s, lab in zip(boxes, scores, labels, strict=True)
        ]

    def _uncertain_detections(
        self,
        class_logits: Tensor,
        box_regression: Tensor,
        box_log_var: Tensor,
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """torchvision's ``RoIHeads.postprocess_detections`` with each class-specific candidate carrying what
        σ of its corners comes from (``box_std.delta_std``, the box head's weights (10, 10, 5, 5)): softmax,
        decoding, clipping, score threshold, small boxes out, batched NMS, ``detections_per_img``; then
        ``bbox_std`` and, with ``model.var_voting``, the kept boxes voted (``voting.py``). Labels 0..C-1."""
        coder = self.roi_heads.box_coder
        rois = box_regression.shape[0]
        counts = [p.shape[0] for p in proposals]
        parts = zip(
            coder.decode(box_regression, proposals).split(counts),
            F.softmax(class_logits, -1).split(counts),
            box_log_var.reshape(rois, -1, 4).split(counts),
            box_regression.reshape(rois, -1, 4).split(counts),
            proposals,
            image_sizes,
            strict=True,
        )
        coder = self.roi_heads.box_coder
        std = partial(delta_std, weights=coder.weights, clamp=coder.bbox_xform_clip)
        return batch_detections([self._image_candidates(*part) for part in parts], std, self.var_voting_sigma_t)

    def _image_candidates(
        self, boxes: Tensor, scores: Tensor, log_var: Tensor, deltas: Tensor, rois: Tensor, size: tuple[int, int]
    ) -> ImageCandidates:
        """One image's candidates (boxes, scores, labels), the ones NMS keeps, and what their σ comes from
        (α, deltas, RoIs), from its RoIs' per-class boxes [R, C+1, 4], scores [R, C+1], α and deltas
        [R, C+1, 4] and the RoIs [R, 4]."""
        heads = self.roi_heads
        # every class of every RoI its own candidate, background (column 0) left out; the candidates that
        # pass the score threshold are picked first, so only they are clipped and gathered (torchvision
        # clips and flattens all R·(C+1) boxes first: the same values, in the same order)
        foreground = scores[:, 1:].reshape(-1)
        num_classes = scores.shape[1] - 1
        inds = torch.where(foreground > heads.score_thresh)[0]
        roi = torch.div(inds, num_classes, rounding_mode="floor")
        cls = inds - roi * num_classes + 1
        boxes = clip_boxes_to_image(boxes[roi, cls], size)
        scores, labels = foreground[inds], cls - 1  # labels 0..C-1
        coded = [log_var[roi, cls], deltas[roi, cls], rois[roi]]
        inds = remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels, coded = boxes[inds], scores[inds], labels[inds], [x[inds] for x in coded]
        keep = batched_nms(boxes, scores, labels, heads.nms_thresh)[: heads.detections_per_img]
        return ImageCandidates(boxes, scores, labels, keep, coded)

    # --- losses --------------------------------------------------------------------------------

    def rpn_level_losses(
        self,
        objectness: Tensor,
        deltas: Tensor,
        labels: list[Tensor],
        regression_targets: list[Tensor],
        counts: list[int],
    ) -> tuple[Tensor, Tensor]:
        """RPN objectness and box losses per anchor level (rpn_cls, rpn_reg), each [len(counts)].

        ``objectness`` [B·A, 1] and ``deltas`` [B·A, 4] are the RPN outputs flattened image after image,
        each image's anchors level after level (``counts`` per level); ``labels`` per image [A] hold 1
        (foreground), 0 (background), −1 (ignored); ``regression_targets`` per image [A, 4] the encoded
        matched boxes. The anchors are sampled by the RPN's own sampler exactly as torchvision's
        ``compute_loss`` does, and both sums are divided by the number sampled (torchvision's
        normalisation). Bayesian: Eq. 16 with γ = 0 and no α for the objectness, Eq. 14 for the boxes.
        """
        cfg = self.loss_cfg
        if objectness.shape[0] != len(labels) * sum(counts):
            raise ValueError(
                f"{objectness.shape[0]} RPN outputs for {len(labels)} images of {sum(counts)} anchors each "
                f"(levels {counts})"
            )
        pos_masks, neg_masks = self.rpn.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos_masks, dim=0))[0]
        neg = torch.where(torch.cat(neg_masks, dim=0))[0]
        sampled = torch.cat([pos, neg], dim=0)
        num_sampled = max(1, sampled.numel())
        anchor_level = torch.repeat_interleave(
            torch.arange(len(counts), device=objectness.device),
            torch.tensor(counts, device=objectness.device),
        )
        level = anchor_level.repeat(len(labels))  # every image has the same anchors
        targets_all = torch.cat(regression_targets, dim=0)
        logits = objectness.flatten()[sampled]
        target = torch.cat(labels, dim=0)[sampled].to(logits.dtype)
        cls = task_loss("bce", logits, target, self.log_var("rpn_cls"), cfg).value
        # indexing the positives, not masking all anchors: an image without boxes has −inf targets
        # (log 0 in the encoding), finite only where torchvision never looks
        reg = task_loss("box", deltas[pos], targets_all[pos], self.log_var("rpn_reg"), cfg).value
        num_levels = len(counts)
        cls_levels = cfg.cls_weight * sum_by_level(cls, level[sampled], num_levels) / num_sampled
        reg_levels = sum_by_level(reg, level[pos], num_levels) / num_sampled
        return cls_levels, reg_levels

    def roi_level_losses(
        self,
        class_logits: Tensor,
        box_regression: Tensor,
        labels: list[Tensor],
        regression_targets: list[Tensor],
        levels: Tensor,
        box_log_var: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Box-head classification and regression losses per RoI level (roi_cls, roi_reg), each [4], and
        their plain (σ = 1, no α, detached) sum per level, the weightings' measure when the trained loss
        differs from it (Bayesian, KL-Loss; else None).

        ``class_logits`` [R, C+1], ``box_regression`` [R, 4·(C+1)] for the R sampled RoIs of the batch,
        ``labels`` per image (0 = background, 1..C), ``regression_targets`` per image [R_b, 4] (weights
        10, 10, 5, 5), ``levels`` [R] the level each RoI was pooled from, ``box_log_var`` the α of the
        deltas [R, 4·(C+1)] with ``model.box_uncertainty``. torchvision's ``fastrcnn_loss`` split by level:
        CE over all R, smooth L1 (or the KL-Loss) of the true class's deltas over the foreground ones, both
        divided by R.
        """
        cfg = self.loss_cfg
        labels_all = torch.cat(labels, dim=0)
        targets_all = torch.cat(regression_targets, dim=0)
        num_rois = max(1, labels_all.numel())
        cls = task_loss("ce", class_logits, labels_all, self.log_var("roi_cls"), cfg)
        pos = torch.where(labels_all > 0)[0]
        reg = self._roi_box_loss(box_regression, box_log_var, targets_all, pos, labels_all[pos])
        num_levels = len(self.level_names)
        cls_levels = cfg.cls_weight * sum_by_level(cls.value, levels, num_levels) / num_rois
        reg_levels = sum_by_level(reg.value, levels[pos], num_levels) / num_rois
        if cls.plain is None and reg.plain is None:  # plain losses are their own measure
            return cls_levels, reg_levels, None
        cls_plain = cls.value.detach() if cls.plain is None else cls.plain
        reg_plain = reg.value.detach() if reg.plain is None else reg.plain
        plain_cls = cfg.cls_weight * sum_by_level(cls_plain, levels, num_levels)
        plain_reg = sum_by_level(reg_plain, levels[pos], num_levels)
        return cls_levels, reg_levels, (plain_cls + plain_reg) / num_rois

    def _roi_box_loss(
        self, box_regression: Tensor, box_log_var: Tensor | None, targets: Tensor, pos: Tensor, classes: Tensor
    ) -> TaskLoss:
        """The box loss of the foreground RoIs ``pos`` on their class's deltas (and α): [len(pos)]."""
        per_class = box_regression.reshape(box_regression.shape[0], -1, 4)
        deltas = per_class[pos, classes]
        if box_log_var is None:
            return task_loss("box", deltas, targets[pos], self.log_var("roi_reg"), self.loss_cfg)
        log_var = box_log_var.reshape(box_log_var.shape[0], -1, 4)[pos, classes]
        return uncertain_box_loss(deltas, targets[pos], log_var, self.box_uncertainty_weight(), self.loss_cfg)


def canonical_scale(anchor_sizes: list[float]) -> int:
    """The RoI size FPN Eq. 1 maps to P4, scaled with the anchors: 224 · anchor_sizes[0] / 32.

    torchvision's 224 goes with its anchors (32 px on P2, ..., 512 on P6) on images of 800-1333 px;
    with smaller anchors (small images, e.g. 8 px on P2 for the 128 px synthetic data) every RoI would land
    on P2 and the RoI levels the weighting acts on would be empty but one. Scaling the canonical size
    with the P2 anchor keeps the ratio between the RPN's and the RoI head's level assignment, and is
    exactly torchvision's 224 for its default anchors.
    """
    return max(1, round(CANONICAL_SCALE * float(anchor_sizes[0]) / CANONICAL_P2_ANCHOR))


__all__ = ["FasterRCNNConfig", "PerLevelFasterRCNN", "canonical_scale", "sum_by_level"]
