"""Detectors that return their training loss per pyramid level (``DetectorLosses``)."""

from robustdet.models.backbones import BACKBONES, PYRAMIDS, build_backbone
from robustdet.models.base import DetectorLosses, level_sums, normalise
from robustdet.models.build import DETECTORS, build_model
from robustdet.models.faster_rcnn import PerLevelFasterRCNN, build_faster_rcnn
from robustdet.models.fcos import PerLevelFCOS, build_fcos
from robustdet.models.retinanet import PerLevelRetinaNet, build_retinanet

__all__ = [
    "BACKBONES",
    "DETECTORS",
    "PYRAMIDS",
    "DetectorLosses",
    "PerLevelFCOS",
    "PerLevelFasterRCNN",
    "PerLevelRetinaNet",
    "build_backbone",
    "build_faster_rcnn",
    "build_fcos",
    "build_model",
    "build_retinanet",
    "level_sums",
    "normalise",
]
