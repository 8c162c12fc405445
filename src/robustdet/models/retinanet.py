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
ℓ the Bayesian smooth L1 with s_reg (Eq. 14), normalised the same way.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.ops import generalized_box_iou_loss

from robustdet.box_coder import BoxCoder
from robustdet.config import Config, LossConfig
from robustdet.losses import (
    LogVariances,
    bayesian_focal_loss,
    bayesian_smooth_l1_loss,
    sigmoid_focal_loss,
    smooth_l1_loss,
)
from robustdet.models.anchors import build_anchor_generator
from robustdet.models.backbones import build_backbone, level_names
from robustdet.models.base import DetectorLosses, build_log_variances, level_sums, normalise
from robustdet.models.matching import BETWEEN_THRESHOLDS, batched_box_iou, match_anchors, pad_boxes

# 2**16 float32 elements = 256 KiB: fits an L2 cache; 2**15-2**17 measured alike on a Xeon, 2**20 slower
CPU_CHUNK_ELEMENTS = 1 << 16
GIOU_EPS = 1e-7  # torchvision's _box_loss default, kept so that the GIoU loss matches it


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 outputs under autocast: losses and anchors in float32 (bf16 has 8 mantissa bits, an
    # anchor at x = 1000 would be off by 4 px); float64 stays float64 for the equivalence tests
    return torch.promote_types(dtype, torch.float32)


class PerLevelRetinaNet(RetinaNet):
    """torchvision's RetinaNet with a batched, per-level training loss (``DetectorLosses``).

    Evaluation mode returns torchvision's detections (boxes in input-image pixels, labels 0..C-1).
    ``log_variances`` holds s_cls and s_reg when the loss is Bayesian, else None.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        loss: LossConfig,
        level_names: list[str],
        log_variances: LogVariances | None = None,
        **retinanet_kwargs: object,
    ) -> None:
        super().__init__(backbone, num_classes, **retinanet_kwargs)
        if loss.bayesian and log_variances is None:
            raise ValueError("loss.bayesian=true needs log_variances (s_cls, s_reg)")
        self.loss_cfg = loss
        self.num_classes = num_classes
        self.level_names = list(level_names)
        self.log_variances = log_variances if loss.bayesian else None
        self.delta_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))

    # --- forward -------------------------------------------------------------------------------

    def forward(  # type: ignore[override]
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> DetectorLosses | list[dict[str, Tensor]]:
        """Training (targets needed): ``DetectorLosses``. Eval: per image ``{boxes, scores, labels}``."""
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            self._check_target_shapes(targets, len(images))
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        image_list, targets = self.transform(images, targets if self.training else None)
        features = self.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        feature_list = list(features.values())
        head_outputs = self.head(feature_list)
        anchors, counts = self.batch_anchors(image_list, feature_list)
        if self.training:
            assert targets is not None
            self._check_boxes(targets)
            return self.compute_level_losses(targets, head_outputs, anchors, counts)
        return self._detect(head_outputs, anchors, counts, image_list.image_sizes, original_sizes)

    def batch_anchors(self, image_list: ImageList, features: list[Tensor]) -> tuple[Tensor, list[int]]:
        """The anchors every image of the padded batch shares [A, 4], and the anchor count per level."""
        dtype = _loss_dtype(features[0].dtype)
        # The generator reads only the shapes, dtype and device of the feature maps and the padded batch
        # size (not the per-image sizes), so empty stand-ins with one image give the same anchors once,
        # in float32 even under autocast.
        shapes = [f.new_empty((0, 0, *f.shape[-2:]), dtype=dtype) for f in features]
        one = ImageList(image_list.tensors, image_list.image_sizes[:1])
        anchors = self.anchor_generator(one, shapes)[0]
        per_loc = self.anchor_generator.num_anchors_per_location()
        counts = [int(f.shape[-2] * f.shape[-1]) * a for f, a in zip(features, per_loc, strict=True)]
        return anchors, counts

    def _detect(
        self,
        head_outputs: dict[str, Tensor],
        anchors: Tensor,
        counts: list[int],
        image_sizes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        # decoding in bf16 would move boxes by pixels, so the head outputs go to the anchors' dtype
        split = {k: list(v.to(anchors.dtype).split(counts, dim=1)) for k, v in head_outputs.items()}
        per_level_anchors = list(anchors.split(counts))
        detections = self.postprocess_detections(split, [per_level_anchors] * len(image_sizes), image_sizes)
        return self.transform.postprocess(detections, image_sizes, original_sizes)

    # --- loss ----------------------------------------------------------------------------------

    def compute_level_losses(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: Tensor,
        counts: list[int],
    ) -> DetectorLosses:
        """Per-level losses L_i (Eq. 19 when Bayesian) from head outputs [B, A, C] / [B, A, 4].

        ``targets`` are in the transformed (resized) coordinates, ``anchors`` [A, 4] shared by the
        batch, ``counts`` the anchors of each level in head-output order.
        """
        cfg = self.loss_cfg
        dtype = _loss_dtype(head_outputs["cls_logits"].dtype)
        logits = head_outputs["cls_logits"].to(dtype)
        deltas = head_outputs["bbox_regression"].to(dtype)
        anchors = anchors.to(dtype)
        batch, num_anchors, _ = logits.shape

        gt_boxes, gt_labels, gt_valid = pad_boxes(
            [t["boxes"].to(dtype) for t in targets], [t["labels"] for t in targets]
        )
        matched = match_anchors(
            batched_box_iou(anchors, gt_boxes, gt_valid),
            gt_valid,
            self.proposal_matcher.high_threshold,
            self.proposal_matcher.low_threshold,
        )
        foreground = matched >= 0
        valid = matched != BETWEEN_THRESHOLDS
        num_foreground = foreground.sum(dim=1)
        gt_index = matched.clamp(min=0)

        labels = gt_labels.gather(1, gt_index)
        cls_anchor = torch.where(valid, self._focal_per_anchor(logits, labels, foreground), 0.0)

        matched_boxes = gt_boxes.gather(1, gt_index[..., None].expand(batch, num_anchors, 4))
        batch_anchors = anchors.expand(batch, num_anchors, 4)
        if cfg.box_loss == "giou":
            predicted = self.delta_coder.decode(deltas, batch_anchors)
            reg_anchor = generalized_box_iou_loss(
                predicted.reshape(-1, 4), matched_boxes.reshape(-1, 4), reduction="none", eps=GIOU_EPS
            ).view(batch, num_anchors)
        else:
            target_deltas = self.delta_coder.encode(matched_boxes, batch_anchors)
            beta = 0.0 if cfg.box_loss == "l1" else cfg.beta
            lv = self.log_variances
            if lv is not None:
                reg_elem = bayesian_smooth_l1_loss(
                    deltas, target_deltas, lv["reg"], beta=beta, reduction="none"
                )
            else:
                reg_elem = smooth_l1_loss(deltas, target_deltas, beta=beta, reduction="none")
            reg_anchor = reg_elem.sum(dim=2)
        reg_anchor = torch.where(foreground, reg_anchor, 0.0)

        cls_levels = cfg.cls_weight * normalise(
            level_sums(cls_anchor, counts), num_foreground, cfg.normalization
        )
        reg_levels = normalise(level_sums(reg_anchor, counts), num_foreground, cfg.normalization)
        return DetectorLosses(
            level_names=list(self.level_names),
            level_losses=cls_levels + reg_levels,
            components={"cls": cls_levels.detach(), "reg": reg_levels.detach()},
            extra_loss=logits.new_zeros(()),
            extra_components={},
        )

    def _focal_per_anchor(self, logits: Tensor, labels: Tensor, foreground: Tensor) -> Tensor:
        """Σ_c of the (Bayesian) focal loss per anchor [B, A], one-hot targets built on the fly.

        On CPU the elements go through in chunks of ``CPU_CHUNK_ELEMENTS``: the focal loss is some 30
        elementwise passes, and a chunk that stays in cache between them makes the batched loss faster
        than torchvision's image-by-image one instead of slower. On GPUs one call covers the batch.
        """
        cfg = self.loss_cfg
        batch, num_anchors, num_classes = logits.shape
        flat = logits.reshape(-1, num_classes)
        rows = flat.shape[0] if logits.device.type != "cpu" else max(1, CPU_CHUNK_ELEMENTS // num_classes)
        lv = self.log_variances
        sums = []
        for x, lab, fg in zip(
            flat.split(rows), labels.reshape(-1).split(rows), foreground.reshape(-1).split(rows), strict=True
        ):
            # background anchors stay all-zero, foreground ones get a 1 at their class
            t = torch.zeros_like(x).scatter_(1, lab[:, None], fg[:, None].to(x.dtype))
            if lv is not None:
                elem = bayesian_focal_loss(
                    x, t, lv["cls"], alpha=cfg.focal_alpha, gamma=cfg.focal_gamma, reduction="none"
                )
            else:
                elem = sigmoid_focal_loss(
                    x, t, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma, reduction="none"
                )
            sums.append(elem.sum(dim=1))
        return torch.cat(sums).view(batch, num_anchors)

    # --- checks --------------------------------------------------------------------------------

    def _check_target_shapes(self, targets: list[dict[str, Tensor]], num_images: int) -> None:
        if len(targets) != num_images:
            raise ValueError(f"got {num_images} images but {len(targets)} targets")
        for i, t in enumerate(targets):
            boxes, labels = t.get("boxes"), t.get("labels")
            if (
                not isinstance(boxes, Tensor)
                or not boxes.is_floating_point()
                or boxes.dim() != 2
                or boxes.shape[-1] != 4
            ):
                raise ValueError(f"target {i}: 'boxes' must be a float tensor [N, 4] (XYXY pixels)")
            if (
                not isinstance(labels, Tensor)
                or labels.shape != boxes.shape[:1]
                or labels.dtype != torch.int64
            ):
                raise ValueError(f"target {i}: 'labels' must be an int64 tensor [N] matching 'boxes'")

    def _check_boxes(self, targets: list[dict[str, Tensor]]) -> None:
        """Degenerate boxes and labels outside 0..C-1, with a single host sync for the whole batch."""
        boxes = torch.cat([t["boxes"] for t in targets])
        labels = torch.cat([t["labels"] for t in targets])
        if boxes.numel() == 0:
            return
        bad_box = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        bad_label = (labels < 0) | (labels >= self.num_classes)
        if not bool((bad_box | bad_label).any()):
            return
        sizes = [t["boxes"].shape[0] for t in targets]
        image = [i for i, n in enumerate(sizes) for _ in range(n)]
        k = int(torch.nonzero(bad_box | bad_label)[0])
        if bad_box[k]:
            raise ValueError(
                f"target {image[k]}: box {boxes[k].tolist()} has no positive width and height "
                "(after resizing; boxes are XYXY pixels)"
            )
        raise ValueError(f"target {image[k]}: label {int(labels[k])} is outside 0..{self.num_classes - 1}")


def build_retinanet(cfg: Config, num_classes: int) -> PerLevelRetinaNet:
    """RetinaNet from ``cfg.model`` / ``cfg.loss``: backbone P3-P7 (P6/P7 from C5), anchors, head."""
    m = cfg.model
    names = level_names("p3p7")
    if len(m.anchor_sizes) != len(names):
        raise ValueError(
            f"model.anchor_sizes needs one size per level {names}, got {len(m.anchor_sizes)}: "
            f"{m.anchor_sizes}"
        )
    backbone = build_backbone(m, "p3p7")
    anchor_generator = build_anchor_generator(m.anchor_sizes, m.anchor_scales, m.aspect_ratios)
    norm_layer = partial(nn.GroupNorm, m.group_norm_groups) if m.head_norm == "group_norm" else None
    head = RetinaNetHead(
        backbone.out_channels,
        anchor_generator.num_anchors_per_location()[0],
        num_classes,
        norm_layer=norm_layer,
    )
    # RetinaNetHead always uses prior 0.01; the configured prior sets the initial foreground probability
    nn.init.constant_(
        head.classification_head.cls_logits.bias, -math.log((1 - m.prior_probability) / m.prior_probability)
    )
    return PerLevelRetinaNet(
        backbone,
        num_classes,
        loss=cfg.loss,
        level_names=names,
        log_variances=build_log_variances(cfg),
        min_size=m.min_size,
        max_size=m.max_size,
        image_mean=list(m.image_mean),
        image_std=list(m.image_std),
        anchor_generator=anchor_generator,
        head=head,
        score_thresh=m.score_thresh,
        nms_thresh=m.nms_thresh,
        detections_per_img=m.detections_per_img,
        fg_iou_thresh=m.fg_iou_thresh,
        bg_iou_thresh=m.bg_iou_thresh,
        topk_candidates=m.topk_candidates,
    )


__all__ = ["PerLevelRetinaNet", "build_retinanet"]
