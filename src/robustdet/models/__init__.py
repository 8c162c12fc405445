"""Detectors that return their training loss per pyramid level (``DetectorLosses``)."""

from robustdet.models.backbones import BACKBONES, PYRAMIDS, build_backbone
from robustdet.models.base import Detector, DetectorLosses, ModelSection, level_sums, normalise
from robustdet.models.build import DETECTORS, build_detector, build_model
from robustdet.models.dense import DenseDetector
from robustdet.models.faster_rcnn import FasterRCNNConfig, PerLevelFasterRCNN
from robustdet.models.fcos import FCOSConfig, PerLevelFCOS
from robustdet.models.retinanet import PerLevelRetinaNet, RetinaNetConfig

__all__ = [
    "BACKBONES",
    "DETECTORS",
    "PYRAMIDS",
    "DenseDetector",
    "Detector",
    "DetectorLosses",
    "FCOSConfig",
    "FasterRCNNConfig",
    "ModelSection",
    "PerLevelFCOS",
    "PerLevelFasterRCNN",
    "PerLevelRetinaNet",
    "RetinaNetConfig",
    "build_backbone",
    "build_detector",
    "build_model",
    "level_sums",
    "normalise",
]
