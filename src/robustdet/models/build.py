"""The one table of detectors: ``cfg.model.name`` → builder."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from robustdet.config import Config
from robustdet.models.faster_rcnn import build_faster_rcnn
from robustdet.models.fcos import build_fcos
from robustdet.models.retinanet import build_retinanet

# Every detector returns DetectorLosses in training and torchvision detections (labels 0..C-1) in eval.
DETECTORS: dict[str, Callable[[Config, int], nn.Module]] = {
    "retinanet": build_retinanet,
    "fcos": build_fcos,
    "faster_rcnn": build_faster_rcnn,
}


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    """The detector ``cfg.model.name`` for ``num_classes`` classes (labels 0..C-1, no background class)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    builder = DETECTORS.get(cfg.model.name)
    if builder is None:
        raise NotImplementedError(
            f"model.name={cfg.model.name!r} is not implemented yet; available: {', '.join(sorted(DETECTORS))}"
        )
    return builder(cfg, num_classes)


__all__ = ["DETECTORS", "build_model"]
