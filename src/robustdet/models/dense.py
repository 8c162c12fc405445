"""The parent of the dense (one-stage) detectors, RetinaNet and FCOS, as detectron2's ``DenseDetector``.

Both are torchvision detectors whose heads predict, for every anchor (RetinaNet) or location (FCOS) of
every pyramid level, class logits and a box; the batch shares one set of anchors after padding, so the
losses are per-anchor tensors [B, A] summed per level over the contiguous anchor segments of each level
(``base.level_sums``) and normalised (``base.normalise``). This class holds what they share: the forward
pass, the anchors, the detection post-processing, the classification loss and the box-loss dispatch.
A subclass provides ``compute_level_losses`` and the box encoding of its head (``encode_boxes``,
``decode_boxes``).
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor
from torchvision.models.detection.image_list import ImageList

from robustdet.losses import LossConfig, TaskLoss, task_loss
from robustdet.losses.noisy_labels import bootstrap_targets, gce_focal_loss, recalibrate_background, smooth_labels
from robustdet.models.base import Detector, DetectorLosses, ModelSection, level_sums, loss_dtype, normalise

# 2**16 float32 elements = 256 KiB: fits an L2 cache; 2**15-2**17 measured alike on a Xeon, 2**20 slower
CPU_CHUNK_ELEMENTS = 1 << 16


class DenseSection(ModelSection):
    """Settings of the dense detectors besides ``ModelSection``'s: candidates per level and the prior."""

    topk_candidates: int = Field(1000, ge=1)
    prior_probability: float = Field(0.01, gt=0, lt=1)


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
            return self.compute_level_losses(targets, head_outputs, anchors, counts)
        return self._detect(head_outputs, anchors, counts, image_list.image_sizes, original_sizes)

    @abc.abstractmethod
    def compute_level_losses(
        self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor], anchors: Tensor, counts: list[int]
    ) -> DetectorLosses:
        """Per-level losses from head outputs [B, A, ...], ``anchors`` [A, 4] shared by the batch and the
        anchor ``counts`` of each level in head-output order; ``targets`` in resized coordinates."""

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
        self, regression: Tensor, anchors: Tensor, matched_boxes: Tensor, target: Tensor | None = None
    ) -> TaskLoss:
        """``loss.box_loss`` (Bayesian with s_reg) per anchor [B, A]: on decoded boxes for GIoU, else on the
        encoded targets (``target`` when the caller has them already)."""
        if self.loss_cfg.box_loss == "giou":
            return task_loss("box", self.decode_boxes(regression, anchors), matched_boxes, None, self.loss_cfg)
        if target is None:
            target = self.encode_boxes(matched_boxes, anchors)
        return task_loss("box", regression, target, self.log_var("reg"), self.loss_cfg)

    def level_output(self, parts: dict[str, TaskLoss], counts: list[int], num_foreground: Tensor) -> DetectorLosses:
        """``DetectorLosses`` from named per-anchor losses [B, A] (already masked): each summed per level and
        normalised (the classification part times ``loss.cls_weight``), L_i their sum; the plain L_i too
        when the loss is Bayesian. Nothing stays outside the weighting."""
        mode = self.loss_cfg.normalization
        scale = {"cls": self.loss_cfg.cls_weight}

        def levels_of(per_anchor: Tensor, name: str) -> Tensor:
            lv = normalise(level_sums(per_anchor, counts), num_foreground, mode)
            return scale[name] * lv if name in scale else lv

        levels = {name: levels_of(p.value, name) for name, p in parts.items()}
        plain = None
        if self.log_variances is not None:
            # a part without a Bayesian form (FCOS's centerness) is its own plain measure
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


__all__ = ["CPU_CHUNK_ELEMENTS", "DenseDetector", "DenseSection", "masked", "noisy_label_focal"]
