"""σ of each detected box's corners (x1, y1, x2, y2) in pixels, from the head's α = log σ² per regression output.

The heads with ``model.box_uncertainty`` predict, besides each regression output t_k, its log-variance
α_k (KL-Loss, He et al. 2019). A box is a function of the outputs through the detector's box coder, so
its corners' σ follow by propagating the variances through that function (docs/models.md, "bbox_std"):

Anchor deltas (RetinaNet: weights (1, 1, 1, 1); Faster R-CNN box head: (10, 10, 5, 5)), anchor (x_a, y_a,
w_a, h_a), ``box_coder.BoxCoder``: x1 = x_a + w_a·t_x/w_x − w/2, x2 = x_a + w_a·t_x/w_x + w/2 with
w = w_a·exp(t_w/w_w). First order (the delta method), the outputs independent:

    σ²_x1 = σ²_x2 = (w_a/w_x)²·e^{α_x} + (w/(2·w_w))²·e^{α_w}          (likewise y with h_a, w_y, h, w_h)

exact in t_x (linear), first order in t_w (the log-size). Where the coder clamps t_w/w_w at its
``clamp`` the box no longer moves with t_w, and the second term is 0.

FCOS distances (l, t, r, b) in units of the location's size s (torchvision's ``BoxLinearCoder`` with
``normalize_by_size``): x1 = c_x − s·l is linear, so σ_x1 = s·σ_l exactly (σ_y1 = s·σ_t, σ_x2 = s·σ_r,
σ_y2 = s·σ_b).

The clip of the boxes to the image is not propagated (a clipped corner would get σ 0): σ is that of
the box the head predicts. :class:`DetectionTransform` rescales σ to the original image like the boxes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes


def delta_std(
    log_var: Tensor, deltas: Tensor, anchors: Tensor, weights: tuple[float, float, float, float],
    clamp: float = math.log(1000 / 16),
) -> Tensor:
    """σ of (x1, y1, x2, y2) [..., 4] of the boxes that ``deltas`` [..., 4] (t_x, t_y, t_w, t_h) decode to
    from ``anchors`` [..., 4] (XYXY, broadcast), with log-variances ``log_var`` [..., 4] of the deltas.
    x and y in one pass each step (a dozen elementwise ops: post-processing calls this per image)."""
    centre_w = deltas.new_tensor(weights[:2])
    size_w = deltas.new_tensor(weights[2:])
    anchor_size = anchors[..., 2:] - anchors[..., :2]  # (w_a, h_a)
    var = log_var.exp()
    scaled = deltas[..., 2:] / size_w
    half = 0.5 * anchor_size * torch.exp(scaled.clamp(max=clamp)) / size_w  # ∂(w/2)/∂t_w, ∂(h/2)/∂t_h
    half = torch.where(scaled < clamp, half, torch.zeros_like(half))
    sigma = ((anchor_size / centre_w).square() * var[..., :2] + half.square() * var[..., 2:]).sqrt()
    return torch.cat([sigma, sigma], dim=-1)


def distance_std(log_var: Tensor, anchors: Tensor) -> Tensor:
    """σ of (x1, y1, x2, y2) [..., 4] for FCOS's size-normalised distances (l, t, r, b) with log-variances
    ``log_var`` [..., 4], from the locations' squares ``anchors`` [..., 4] (XYXY): s·e^{α/2}, exact."""
    wa = anchors[..., 2] - anchors[..., 0]
    ha = anchors[..., 3] - anchors[..., 1]
    size = torch.stack((wa, ha, wa, ha), dim=-1)
    return size * (0.5 * log_var).exp()


def std_per_image(std: Callable[..., Tensor], inputs: list[list[Tensor]], index: list[Tensor | None]) -> list[Tensor]:
    """σ [K_i, 4] of each image's candidates: ``std(*(x[index[i]] for x in inputs[i]))`` for every image i
    (all its candidates for None), in one call of ``std`` over the batch. ``std`` is a dozen elementwise
    ops per row, so one call a batch instead of one an image is most of what bbox_std saves at inference
    (docs/benchmarks.md). One image, or a trace (export), keeps the call per image: a trace would freeze
    the batch's split sizes."""
    picked = [[x if ix is None else x[ix] for x in xs] for xs, ix in zip(inputs, index, strict=True)]
    if len(picked) == 1 or torch.jit.is_tracing():
        return [std(*xs) for xs in picked]
    sizes = [xs[0].shape[0] for xs in picked]
    return list(std(*(torch.cat(parts) for parts in zip(*picked, strict=True))).split(sizes))


class DetectionTransform(GeneralizedRCNNTransform):
    """torchvision's transform whose ``postprocess`` also rescales ``bbox_std`` to the original image.

    The resize is a scaling of each axis, so σ scales by the same ratios as the corners (torchvision's
    ``resize_boxes`` on σ, which has no offset). No parameters or buffers of its own: state dicts are
    those of torchvision's transform.
    """

    def postprocess(
        self,
        result: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        result = super().postprocess(result, image_shapes, original_image_sizes)
        if self.training:
            return result
        for pred, im_s, o_im_s in zip(result, image_shapes, original_image_sizes, strict=True):
            if "bbox_std" in pred:
                pred["bbox_std"] = resize_boxes(pred["bbox_std"], im_s, o_im_s)
        return result

    @classmethod
    def like(cls, transform: GeneralizedRCNNTransform) -> DetectionTransform:
        """The same transform (sizes, normalisation, padding) with ``bbox_std`` rescaling."""
        return cls(
            transform.min_size, transform.max_size, transform.image_mean, transform.image_std,
            size_divisible=transform.size_divisible, fixed_size=transform.fixed_size,
            _skip_resize=transform._skip_resize,
        )


__all__ = ["DetectionTransform", "delta_std", "distance_std", "std_per_image"]
