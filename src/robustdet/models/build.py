"""The one table of detectors: ``model.name`` → class.

Each detector declares its config section (``cls.section``, keyed on ``model.name``) and its loss tasks,
and builds itself (``cls.from_config``); a new detector is its file plus one row here
(docs/architecture.md).
"""

from __future__ import annotations

from typing import Any

from robustdet.losses import LossConfig
from robustdet.models.base import Detector, as_module
from robustdet.models.faster_rcnn import PerLevelFasterRCNN
from robustdet.models.fcos import PerLevelFCOS
from robustdet.models.retinanet import PerLevelRetinaNet

# Every detector returns DetectorLosses in training and torchvision detections (labels 0..C-1) in eval.
DETECTORS: dict[str, type[Detector]] = {
    "retinanet": PerLevelRetinaNet,
    "fcos": PerLevelFCOS,
    "faster_rcnn": PerLevelFasterRCNN,
}


def build_detector(section: Any, loss: LossConfig, num_classes: int) -> Detector:
    """The detector ``section.name`` for ``num_classes`` classes (labels 0..C-1, no background class)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    cls = DETECTORS.get(section.name)
    if cls is None:
        raise NotImplementedError(
            f"model.name={section.name!r} is not implemented; available: {', '.join(sorted(DETECTORS))}"
        )
    detector = cls.from_config(section, loss, num_classes)
    as_module(detector)
    detector.var_voting_sigma_t = section.var_voting_sigma_t if section.var_voting else None
    return detector


def build_model(cfg: Any, num_classes: int) -> Any:
    """``build_detector`` from a whole run ``Config`` (its ``model`` and ``loss`` sections)."""
    return build_detector(cfg.model, cfg.loss, num_classes)


__all__ = ["DETECTORS", "build_detector", "build_model"]
