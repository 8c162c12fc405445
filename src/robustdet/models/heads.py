"""The heads of the three detectors, declared: torchvision's layers under torchvision's names, plus outputs.

Each head is a subclass of torchvision's, so the state-dict keys stay torchvision's (its published files
and older robustdet checkpoints load unchanged) and torchvision's own code (``compute_loss``) still runs
on them. What they add is a place for more outputs: a dense head returns a dict of per-anchor outputs
[B, A, ...] (``cls_logits``, ``bbox_regression``, FCOS's ``bbox_ctrness``), and with a
``log_var_range`` (``model.box_uncertainty``) one more, ``bbox_log_var`` [B, A, 4]: α = log σ² of each
regression output, from a layer beside the box regression on the same tower (one 3x3 conv), clamped to
the range here so that every consumer (loss, ``bbox_std``, voting) sees the same α. With
``detach_features`` (``loss.box_uncertainty_form=isolated``) the α layer reads the tower detached: α's
loss trains that layer only, its initial weights are drawn apart from the global random stream and the
trainer clips its gradients apart (``Detector.isolated_parameters``), so the detector trains as the plain
one, bitwise. Faster R-CNN's box
predictor returns (class logits, deltas, α) likewise, α [R, 4·(C+1)] in the layout of the deltas.

The α layers are initialised as KL-Loss does (He et al. 2019, section 3.3): weights ~ N(0, 10⁻⁴), bias 0,
so every σ starts near 1 and the loss starts as the plain box loss. To add an output: one more layer in
the head, one more key in its ``outputs``; the loss step reads it by name (``dense.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.models.detection.retinanet import (
    RetinaNetClassificationHead,
    RetinaNetHead,
    RetinaNetRegressionHead,
)

LOG_VAR_INIT_STD = 1e-4  # KL-Loss's Gaussian initialisation of the α layer
NormLayer = Callable[..., nn.Module]


def log_var_conv(in_channels: int, out_channels: int, keep_rng: bool = False) -> nn.Conv2d:
    """The 3x3 conv predicting α, initialised as KL-Loss does (N(0, 10⁻⁴), bias 0); with ``keep_rng``
    drawn without advancing the global random stream (:func:`_alpha_init`)."""
    with _alpha_init(keep_rng):
        conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        nn.init.normal_(conv.weight, std=LOG_VAR_INIT_STD)
        nn.init.zeros_(conv.bias)
    return conv


def log_var_linear(in_features: int, out_features: int, keep_rng: bool = False) -> nn.Linear:
    """The fc layer predicting α in a box predictor, initialised as KL-Loss does (``keep_rng`` as above)."""
    with _alpha_init(keep_rng):
        fc = nn.Linear(in_features, out_features)
        nn.init.normal_(fc.weight, std=LOG_VAR_INIT_STD)
        nn.init.zeros_(fc.bias)
    return fc


def _alpha_init(keep_rng: bool) -> AbstractContextManager[object]:
    """The isolated α layer (``detach_features``) draws its weights from a fork of the global random
    stream, so that every later draw (the layers built after it, the training's) is the plain model's."""
    return torch.random.fork_rng(devices=[]) if keep_rng else nullcontext()


def alpha_input(features: Tensor, detach: bool) -> Tensor:
    """What the α layer reads: the features, detached for the isolated form (no gradient into the tower)."""
    return features.detach() if detach else features


def per_anchor(x: Tensor, k: int) -> Tensor:
    """torchvision's layout of a head output: [N, A·k, H, W] → [N, H·W·A, k]."""
    n, _, h, w = x.shape
    return x.view(n, -1, k, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, k)


def clamp_log_var(log_var: Tensor, log_var_range: tuple[float, float]) -> Tensor:
    """α clamped to ``loss.box_log_var_range``: gradient 1 inside the range, 0 outside (probdet's clamp)."""
    return log_var.clamp(min=log_var_range[0], max=log_var_range[1])


class RetinaNetBoxHead(RetinaNetRegressionHead):
    """torchvision's RetinaNet regression head and, given ``log_var_range``, α per delta (``bbox_log_var``)."""

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        norm_layer: NormLayer | None = None,
        log_var_range: tuple[float, float] | None = None,
        detach_features: bool = False,
    ) -> None:
        super().__init__(in_channels, num_anchors, norm_layer=norm_layer)
        self.log_var_range = log_var_range
        self.detach_features = detach_features
        self.bbox_log_var = (
            None if log_var_range is None else log_var_conv(in_channels, num_anchors * 4, keep_rng=detach_features)
        )

    def outputs(self, x: list[Tensor]) -> dict[str, Tensor]:
        """``bbox_regression`` [N, A, 4] (torchvision's forward) and ``bbox_log_var`` [N, A, 4] when on."""
        if self.bbox_log_var is None or self.log_var_range is None:
            return {"bbox_regression": self(x)}
        # one tower pass feeds both layers: the same ops as torchvision's forward, so the deltas are its own
        towers = [self.conv(f) for f in x]
        alpha = [self.bbox_log_var(alpha_input(t, self.detach_features)) for t in towers]
        log_var = torch.cat([per_anchor(a, 4) for a in alpha], dim=1)
        return {
            "bbox_regression": torch.cat([per_anchor(self.bbox_reg(t), 4) for t in towers], dim=1),
            "bbox_log_var": clamp_log_var(log_var, self.log_var_range),
        }


class RetinaNetDenseHead(RetinaNetHead):
    """torchvision's ``RetinaNetHead`` whose box sub-head is a :class:`RetinaNetBoxHead`."""

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        norm_layer: NormLayer | None = None,
        log_var_range: tuple[float, float] | None = None,
        detach_features: bool = False,
    ) -> None:
        # torchvision's two sub-heads in torchvision's order: the same random initialisation as its own head
        nn.Module.__init__(self)
        self.classification_head = RetinaNetClassificationHead(
            in_channels, num_anchors, num_classes, norm_layer=norm_layer
        )
        self.regression_head = RetinaNetBoxHead(in_channels, num_anchors, norm_layer, log_var_range, detach_features)

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:  # type: ignore[override]
        return {"cls_logits": self.classification_head(x), **self.regression_head.outputs(x)}


class FCOSBoxHead(FCOSRegressionHead):
    """torchvision's FCOS regression head (distances and centerness) and, given ``log_var_range``, α per
    distance (``bbox_log_var``)."""

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        norm_layer: NormLayer | None = None,
        log_var_range: tuple[float, float] | None = None,
        detach_features: bool = False,
    ) -> None:
        super().__init__(in_channels, num_anchors, norm_layer=norm_layer)
        self.log_var_range = log_var_range
        self.detach_features = detach_features
        self.bbox_log_var = (
            None if log_var_range is None else log_var_conv(in_channels, num_anchors * 4, keep_rng=detach_features)
        )

    def outputs(self, x: list[Tensor]) -> dict[str, Tensor]:
        """``bbox_regression`` [N, A, 4], ``bbox_ctrness`` [N, A, 1] and ``bbox_log_var`` [N, A, 4] when on."""
        if self.bbox_log_var is None or self.log_var_range is None:
            regression, ctrness = self(x)
            return {"bbox_regression": regression, "bbox_ctrness": ctrness}
        towers = [self.conv(f) for f in x]
        alpha = [self.bbox_log_var(alpha_input(t, self.detach_features)) for t in towers]
        log_var = torch.cat([per_anchor(a, 4) for a in alpha], dim=1)
        return {
            "bbox_regression": torch.cat([per_anchor(nn.functional.relu(self.bbox_reg(t)), 4) for t in towers], 1),
            "bbox_ctrness": torch.cat([per_anchor(self.bbox_ctrness(t), 1) for t in towers], dim=1),
            "bbox_log_var": clamp_log_var(log_var, self.log_var_range),
        }


class FCOSDenseHead(FCOSHead):
    """torchvision's ``FCOSHead`` with the configured norm layer and prior, its box sub-head an
    :class:`FCOSBoxHead`."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        norm_layer: NormLayer,
        prior_probability: float,
        log_var_range: tuple[float, float] | None = None,
        detach_features: bool = False,
    ) -> None:
        # FCOSHead builds its sub-heads with GroupNorm(32) and has no norm argument; num_convs=0 makes it
        # build none, and the sub-heads are replaced with the configured ones (same parameter names). The
        # throw-away layers keep the random initialisation stream of earlier versions.
        super().__init__(in_channels, 1, num_classes, num_convs=0)
        self.classification_head = FCOSClassificationHead(
            in_channels, 1, num_classes, prior_probability=prior_probability, norm_layer=norm_layer
        )
        self.regression_head = FCOSBoxHead(
            in_channels, 1, norm_layer=norm_layer, log_var_range=log_var_range, detach_features=detach_features
        )

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:  # type: ignore[override]
        return {"cls_logits": self.classification_head(x), **self.regression_head.outputs(x)}


class UncertainFastRCNNPredictor(FastRCNNPredictor):
    """torchvision's box predictor with α per class-specific delta: (class logits, deltas, α)."""

    def __init__(
        self, in_channels: int, num_classes: int, log_var_range: tuple[float, float], detach_features: bool = False
    ) -> None:
        super().__init__(in_channels, num_classes)
        self.log_var_range = log_var_range
        self.detach_features = detach_features
        self.bbox_log_var = log_var_linear(in_channels, num_classes * 4, keep_rng=detach_features)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        scores, deltas = super().forward(x)
        features = x.flatten(start_dim=1)
        log_var = self.bbox_log_var(alpha_input(features, self.detach_features))
        return scores, deltas, clamp_log_var(log_var, self.log_var_range)


def box_predictor(
    in_channels: int, num_classes: int, log_var_range: tuple[float, float] | None, detach_features: bool = False
) -> FastRCNNPredictor:
    """Faster R-CNN's box predictor (``num_classes`` with background), with α when ``log_var_range``."""
    if log_var_range is None:
        return FastRCNNPredictor(in_channels, num_classes)
    return UncertainFastRCNNPredictor(in_channels, num_classes, log_var_range, detach_features)


__all__ = [
    "LOG_VAR_INIT_STD",
    "FCOSBoxHead",
    "FCOSDenseHead",
    "RetinaNetBoxHead",
    "RetinaNetDenseHead",
    "UncertainFastRCNNPredictor",
    "box_predictor",
    "clamp_log_var",
    "log_var_conv",
    "log_var_linear",
    "per_anchor",
]
