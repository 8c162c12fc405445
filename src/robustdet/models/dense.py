"""The parent of the dense (one-stage) detectors, RetinaNet and FCOS, as detectron2's ``DenseDetector``.

Both are torchvision detectors whose heads predict, for every anchor (RetinaNet) or location (FCOS) of
every pyramid level, class logits and a box; the batch shares one set of anchors after padding. The
training loss runs in three steps (``compute_level_losses``):

(a) ``assign``: per anchor the annotation it serves, or background / ignored, kept as an
    :class:`Assignment` (the subclass's matcher: IoU for RetinaNet, centre sampling for FCOS);
(b) ``anchor_losses``: named per-anchor losses [B, A] (``TaskLoss``, already masked), read off the head
    outputs and the assignment, so that a loss may use any head output (``bbox_log_var``);
(c) ``level_output``: each summed per level over the contiguous anchor segments of each level
    (``base.level_sums``) and normalised (``base.normalise``).

``annotation_losses`` runs (a) and (b) without gradient and sums the per-anchor losses per annotation.
This class holds the forward pass, the anchors, the detection post-processing, the classification loss,
the box loss (``losses.box.BOX_LOSSES`` says whether it needs decoded boxes) and steps (c) and the
per-annotation sums; a subclass gives (a), (b) and its box encoding (``encode_boxes``, ``decode_boxes``).
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import batched_nms, clip_boxes_to_image

from robustdet.losses import LossConfig, TaskLoss, task_loss
from robustdet.losses.box import box_loss_row
from robustdet.losses.box_uncertainty import uncertain_box_loss
from robustdet.losses.noisy_labels import bootstrap_targets, gce_focal_loss, recalibrate_background, smooth_labels
from robustdet.models.base import Detector, DetectorLosses, ModelSection, level_sums, loss_dtype, normalise
from robustdet.models.matching import BETWEEN_THRESHOLDS
from robustdet.models.voting import ImageCandidates, batch_detections

# 2**16 float32 elements = 256 KiB: fits an L2 cache; 2**15-2**17 measured alike on a Xeon, 2**20 slower
CPU_CHUNK_ELEMENTS = 1 << 16


class DenseSection(ModelSection):
    """Settings of the dense detectors besides ``ModelSection``'s: candidates per level and the prior."""

    topk_candidates: int = Field(1000, ge=1)
    prior_probability: float = Field(0.01, gt=0, lt=1)


@dataclass
class Assignment:
    """Step (a) of the dense loss: which annotation each anchor of the batch serves.

    ``matched`` [B, A] int64 holds, per anchor, the index j >= 0 of its annotation in the image's targets
    (= its row in ``gt_boxes[b]``), ``BACKGROUND`` (-1) or ``IGNORED`` (-2: RetinaNet's anchors of IoU in
    [low, high), in no loss). ``gt_boxes`` [B, G, 4], ``gt_labels`` [B, G] and ``gt_valid`` [B, G] are the
    targets padded to G boxes (``matching.pad_boxes``), in the resized coordinates.
    """

    BACKGROUND = -1
    IGNORED = BETWEEN_THRESHOLDS

    matched: Tensor
    gt_boxes: Tensor
    gt_labels: Tensor
    gt_valid: Tensor

    @cached_property
    def foreground(self) -> Tensor:
        """[B, A] bool: the anchor serves an annotation."""
        return self.matched >= 0

    @cached_property
    def valid(self) -> Tensor:
        """[B, A] bool: the anchor enters the classification loss (it is not ignored)."""
        return self.matched != self.IGNORED

    @cached_property
    def index(self) -> Tensor:
        """[B, A]: the annotation index, 0 for background and ignored anchors (gathers stay in range)."""
        return self.matched.clamp(min=0)

    @cached_property
    def labels(self) -> Tensor:
        """[B, A]: the class of each anchor's annotation (junk where not foreground)."""
        return self.gt_labels.gather(1, self.index)

    @cached_property
    def boxes(self) -> Tensor:
        """[B, A, 4]: each anchor's annotation box (a padding box where not foreground)."""
        batch, num_anchors = self.matched.shape
        return self.gt_boxes.gather(1, self.index[..., None].expand(batch, num_anchors, 4))

    def num_foreground(self) -> Tensor:
        """[B]: the foreground anchors per image, the normalisation's n_b."""
        return self.foreground.sum(dim=1)

    def per_annotation(self, per_anchor: Tensor, num_boxes: list[int]) -> list[Tensor]:
        """Σ of ``per_anchor`` [B, A] over the anchors assigned to each annotation: per image [N_b]."""
        sums = []
        for b, n in enumerate(num_boxes):
            fg = self.foreground[b]
            sums.append(per_anchor.new_zeros(n).index_add_(0, self.matched[b][fg], per_anchor[b][fg]))
        return sums


class DenseDetector(Detector):
    """Forward, anchors, post-processing and loss helpers of RetinaNet and FCOS.

    Mixed into torchvision's ``RetinaNet`` / ``FCOS``, whose ``transform``, ``backbone``, ``head``,
    ``anchor_generator`` and ``postprocess_detections`` it uses.
    """

    # the config's check for loss.cls_method / loss.brl (config.Config): these act on this focal loss
    sigmoid_focal_classifier: ClassVar[bool] = True

    def forward(  # type: ignore[override]
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> DetectorLosses | list[dict[str, Tensor]]:
        """Training (targets needed): ``DetectorLosses``. Eval: per image ``{boxes, scores, labels}``."""
        image_list, targets, original_sizes = self._transform_inputs(images, targets)
        features = self.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        feature_list = list(features.values())
        head_outputs = self.head(feature_list)
        anchors, counts = self.batch_anchors(image_list, feature_list)
        if self.training:
            assert targets is not None
            losses = self.compute_level_losses(targets, head_outputs, anchors, counts)
            self.count_training_forward()
            return losses
        return self._detect(head_outputs, anchors, counts, image_list.image_sizes, original_sizes)

    def compute_level_losses(
        self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor], anchors: Tensor, counts: list[int]
    ) -> DetectorLosses:
        """Per-level losses from head outputs [B, A, ...], ``anchors`` [A, 4] shared by the batch and the
        anchor ``counts`` of each level in head-output order; ``targets`` in resized coordinates.
        Steps (a) ``assign``, (b) ``anchor_losses``, (c) ``level_output``."""
        outputs, anchors = self.loss_inputs(head_outputs, anchors)
        assignment = self.assign(targets, anchors, counts)
        parts = self.anchor_losses(outputs, anchors, assignment)
        return self.level_output(parts, counts, assignment.num_foreground())

    def loss_inputs(self, head_outputs: dict[str, Tensor], anchors: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Head outputs and anchors in the losses' dtype (``base.loss_dtype``: float32 under autocast)."""
        dtype = loss_dtype(head_outputs["cls_logits"].dtype)
        return {k: v.to(dtype) for k, v in head_outputs.items()}, anchors.to(dtype)

    @abc.abstractmethod
    def assign(self, targets: list[dict[str, Tensor]], anchors: Tensor, counts: list[int]) -> Assignment:
        """Step (a): the annotation each anchor serves (``anchors`` [A, 4] in the losses' dtype)."""

    @abc.abstractmethod
    def anchor_losses(
        self, outputs: dict[str, Tensor], anchors: Tensor, assignment: Assignment
    ) -> dict[str, TaskLoss]:
        """Step (b): named per-anchor losses [B, A], zero where they do not apply; "cls" and "reg" always."""

    @torch.no_grad()
    def annotation_losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Per image and annotation j: the summed per-anchor losses of the anchors assigned to j.

        One dict per image: "cls" [N_b] (Σ_c of the focal loss of those anchors), "box" [N_b] (their box
        loss) and "anchors" [N_b] int64 (how many anchors j got; 0 when none, and then both sums are 0).
        The losses are the plain ones (σ = 1 when ``loss.bayesian``, no α with ``model.box_uncertainty``),
        so they compare across models; ``targets`` are in the images' own pixels (the transform resizes
        them as in training). Runs in the module's current mode: call ``eval()`` first for a trained
        model (BatchNorm statistics would otherwise move). Built on steps (a) and (b) of the loss.
        """
        self._check_target_shapes(targets, len(images))
        image_list, resized = self.transform(images, [dict(t) for t in targets])  # type: ignore[attr-defined]
        self._check_boxes(resized)
        features = self.backbone(image_list.tensors)  # type: ignore[attr-defined]
        feature_list = [features] if isinstance(features, Tensor) else list(features.values())
        anchors, counts = self.batch_anchors(image_list, feature_list)
        outputs, anchors = self.loss_inputs(self.head(feature_list), anchors)  # type: ignore[attr-defined]
        assignment = self.assign(resized, anchors, counts)
        parts = self.anchor_losses(outputs, anchors, assignment)
        num_boxes = [int(t["boxes"].shape[0]) for t in targets]
        ones = assignment.foreground.to(torch.int64)
        sums = {
            name: assignment.per_annotation(p.value if p.plain is None else p.plain, num_boxes)
            for name, p in (("cls", parts["cls"]), ("box", parts["reg"]))
        }
        counts_per_box = assignment.per_annotation(ones, num_boxes)
        return [
            {"cls": c, "box": b, "anchors": n}
            for c, b, n in zip(sums["cls"], sums["box"], counts_per_box, strict=True)
        ]

    @abc.abstractmethod
    def encode_boxes(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """The regression targets of ``boxes`` [..., 4] (XYXY) against ``anchors`` [..., 4]."""

    @abc.abstractmethod
    def decode_boxes(self, regression: Tensor, anchors: Tensor) -> Tensor:
        """The XYXY boxes that head outputs ``regression`` [..., 4] predict for ``anchors`` [..., 4]."""

    def batch_anchors(self, image_list: ImageList, features: list[Tensor]) -> tuple[Tensor, list[int]]:
        """The anchors every image of the padded batch shares [A, 4], and the anchor count per level."""
        dtype = loss_dtype(features[0].dtype)
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

    def postprocess_detections(
        self, head_outputs: dict[str, list[Tensor]], anchors: list[list[Tensor]], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """torchvision's post-processing, and with ``bbox_log_var`` among the head outputs
        (``model.box_uncertainty``) the same steps carrying each candidate's σ: score threshold and top-k
        per level, decoding, clipping, batched NMS, ``detections_per_img``; then ``bbox_std`` per detection
        and, with ``model.var_voting``, the kept boxes voted from their candidates (``voting.py``).

        ``head_outputs`` per level [B, A_l, ...], ``anchors`` per image per level. torchvision's own eval
        forward calls this method too, so the exported program (``engine/export.py``) runs it.
        """
        if "bbox_log_var" not in head_outputs:
            return super().postprocess_detections(head_outputs, anchors, image_shapes)  # type: ignore[misc]
        images = []
        for index, image_shape in enumerate(image_shapes):
            per_level = [
                self._level_candidates({k: v[lv][index] for k, v in head_outputs.items()}, lv_anchors, image_shape)
                for lv, lv_anchors in enumerate(anchors[index])
            ]
            boxes, scores, labels, *coded = (torch.cat(part) for part in zip(*per_level, strict=True))
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            images.append(ImageCandidates(boxes, scores, labels, keep, coded))
        return batch_detections(images, self.candidate_std, self.var_voting_sigma_t)

    def _level_candidates(
        self, level: dict[str, Tensor], anchors: Tensor, image_shape: tuple[int, int]
    ) -> tuple[Tensor, ...]:
        """One image's candidates from one level, torchvision's steps: (boxes, scores, labels) and what
        their σ is computed from, (α, regression, anchors)."""
        num_classes = level["cls_logits"].shape[-1]
        scores = self.candidate_scores(level).flatten()
        keep = scores > self.score_thresh
        scores = scores[keep]
        topk_idxs = torch.where(keep)[0]
        num_topk = det_utils._topk_min(topk_idxs, self.topk_candidates, 0)
        scores, idxs = scores.topk(num_topk)
        topk_idxs = topk_idxs[idxs]
        anchor_idxs = torch.div(topk_idxs, num_classes, rounding_mode="floor")
        regression, anchors = level["bbox_regression"][anchor_idxs], anchors[anchor_idxs]
        boxes = clip_boxes_to_image(self.candidate_boxes(regression, anchors), image_shape)
        return boxes, scores, topk_idxs % num_classes, level["bbox_log_var"][anchor_idxs], regression, anchors

    @abc.abstractmethod
    def candidate_scores(self, level: dict[str, Tensor]) -> Tensor:
        """The detection scores [A, C] of one image's head outputs on one level (torchvision's)."""

    @abc.abstractmethod
    def candidate_boxes(self, regression: Tensor, anchors: Tensor) -> Tensor:
        """The boxes [K, 4] torchvision's post-processing decodes from ``regression`` [K, 4]."""

    @abc.abstractmethod
    def candidate_std(self, log_var: Tensor, regression: Tensor, anchors: Tensor) -> Tensor:
        """σ of (x1, y1, x2, y2) [K, 4] of those boxes, from the log-variances ``log_var`` [K, 4] (``box_std``)."""

    # --- losses --------------------------------------------------------------------------------

    def classification_loss(self, logits: Tensor, labels: Tensor, foreground: Tensor) -> TaskLoss:
        """Σ_c of the (Bayesian, s_cls) focal loss per anchor [B, A], one-hot targets built on the fly, with
        the noise-robust targets or terms ``loss.cls_method`` / ``loss.brl`` switch on (:func:`noisy_label_focal`).

        On CPU the elements go through in chunks of ``CPU_CHUNK_ELEMENTS``: the focal loss is some 30
        elementwise passes, and a chunk that stays in cache between them makes the batched loss faster
        than torchvision's image-by-image one instead of slower. On GPUs one call covers the batch.
        """
        batch, num_anchors, num_classes = logits.shape
        flat = logits.reshape(-1, num_classes)
        rows = flat.shape[0] if logits.device.type != "cpu" else max(1, CPU_CHUNK_ELEMENTS // num_classes)
        log_var = self.log_var("cls")
        values, plains = [], []
        for x, lab, fg in zip(
            flat.split(rows), labels.reshape(-1).split(rows), foreground.reshape(-1).split(rows), strict=True
        ):
            # background anchors stay all-zero, foreground ones get a 1 at their class
            t = torch.zeros_like(x).scatter_(1, lab[:, None], fg[:, None].to(x.dtype))
            part = noisy_label_focal(x, t, fg, log_var, self.loss_cfg)
            values.append(part.value.sum(dim=1))
            if part.plain is not None:
                plains.append(part.plain.sum(dim=1))
        plain = torch.cat(plains).view(batch, num_anchors) if plains else None
        return TaskLoss(torch.cat(values).view(batch, num_anchors), plain)

    def box_loss(
        self,
        outputs: dict[str, Tensor],
        anchors: Tensor,
        matched_boxes: Tensor,
        target: Tensor | None = None,
    ) -> TaskLoss:
        """``loss.box_loss`` per anchor [B, A] of ``outputs["bbox_regression"]``: on decoded boxes when its
        row in ``BOX_LOSSES`` says so, else on the encoded targets (``target`` when the caller has them);
        Bayesian with s_reg, or the KL-Loss with the head's α (``outputs["bbox_log_var"]``)."""
        regression = outputs["bbox_regression"]
        if box_loss_row(self.loss_cfg).decoded:
            return task_loss("box", self.decode_boxes(regression, anchors), matched_boxes, None, self.loss_cfg)
        if target is None:
            target = self.encode_boxes(matched_boxes, anchors)
        if "bbox_log_var" in outputs:
            weight = self.box_uncertainty_weight()
            return uncertain_box_loss(regression, target, outputs["bbox_log_var"], weight, self.loss_cfg)
        return task_loss("box", regression, target, self.log_var("reg"), self.loss_cfg)

    def level_output(self, parts: dict[str, TaskLoss], counts: list[int], num_foreground: Tensor) -> DetectorLosses:
        """``DetectorLosses`` from named per-anchor losses [B, A] (already masked): each summed per level and
        normalised (the classification part times ``loss.cls_weight``), L_i their sum; the plain L_i too
        when a part has a plain form (Bayesian losses, the KL-Loss). Nothing stays outside the weighting."""
        mode = self.loss_cfg.normalization
        scale = {"cls": self.loss_cfg.cls_weight}

        def levels_of(per_anchor: Tensor, name: str) -> Tensor:
            lv = normalise(level_sums(per_anchor, counts), num_foreground, mode)
            return scale[name] * lv if name in scale else lv

        levels = {name: levels_of(p.value, name) for name, p in parts.items()}
        plain = None
        if any(p.plain is not None for p in parts.values()):
            # a part without another form (FCOS's centerness, the focal loss with box uncertainty) is its own
            # plain measure
            plain = sum(levels_of(p.value if p.plain is None else p.plain, name) for name, p in parts.items())
            assert isinstance(plain, Tensor)
        total = sum(levels.values())
        assert isinstance(total, Tensor)
        return DetectorLosses(
            level_names=list(self.level_names),
            level_losses=total,
            components={name: v.detach() for name, v in levels.items()},
            extra_loss=total.new_zeros(()),
            plain_level_losses=None if plain is None else plain.detach(),
        )


def noisy_label_focal(x: Tensor, t: Tensor, foreground: Tensor, log_var: Tensor | None, loss: LossConfig) -> TaskLoss:
    """The elementwise classification loss [N, C] of logits ``x`` against one-hot rows ``t`` (zero rows for
    background; ``foreground`` [N]): the (Bayesian) focal loss of ``task_loss``, on targets transformed by
    ``loss.cls_method`` bootstrap / label_smoothing, or the GCE focal loss for gce; then, with ``loss.brl``,
    the background elements above ``loss.brl_threshold`` recalibrated. With the switches off it is
    ``task_loss("focal", ...)`` itself (losses/noisy_labels.py has the equations)."""
    method = loss.cls_method
    if method == "bootstrap":
        t = bootstrap_targets(x, t, loss.bootstrap_beta)
    elif method == "label_smoothing":
        t = smooth_labels(t, foreground, loss.label_smoothing)
    if method == "gce":
        part = TaskLoss(gce_focal_loss(x, t, loss.gce_q, loss.focal_alpha, loss.focal_gamma), None)
    else:
        part = task_loss("focal", x, t, log_var, loss)
    if loss.brl:  # the config refuses BRL with the Bayesian loss, so there is no plain part to keep
        value = recalibrate_background(
            part.value, x, ~foreground, loss.brl_threshold, loss.focal_alpha, loss.focal_gamma
        )
        part = TaskLoss(value, None)
    return part


def masked(loss: TaskLoss, mask: Tensor) -> TaskLoss:
    """``loss`` where ``mask`` holds, 0 elsewhere (value and plain alike)."""
    plain = None if loss.plain is None else torch.where(mask, loss.plain, 0.0)
    return TaskLoss(torch.where(mask, loss.value, 0.0), plain)


__all__ = ["CPU_CHUNK_ELEMENTS", "Assignment", "DenseDetector", "DenseSection", "masked", "noisy_label_focal"]
