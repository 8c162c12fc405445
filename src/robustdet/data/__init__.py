"""Datasets (COCO, YOLO, VOC, synthetic) as one COCO-backed ``DetectionDataset``, and exact loaders."""

from robustdet.data.coco import load_coco
from robustdet.data.config import FORMATS, AugmentConfig, DataConfig, SyntheticConfig, parse_source
from robustdet.data.dataset import (
    EVALUATION,
    TRAINING,
    DetectionDataset,
    SplitUse,
    build_dataset,
    convert_to_coco,
    read_image,
)
from robustdet.data.loader import (
    InfiniteBatchSampler,
    build_eval_loader,
    build_train_loader,
    collate,
    eval_shard,
    sample_seed,
)
from robustdet.data.schema import coco_api, validate_coco
from robustdet.data.synthetic import ensure_synthetic, load_synthetic
from robustdet.data.voc import VOC_CLASSES, load_voc
from robustdet.data.yolo import load_yolo
from robustdet.errors import DatasetError

__all__ = [
    "EVALUATION",
    "FORMATS",
    "TRAINING",
    "VOC_CLASSES",
    "AugmentConfig",
    "DataConfig",
    "DatasetError",
    "DetectionDataset",
    "InfiniteBatchSampler",
    "SplitUse",
    "SyntheticConfig",
    "build_dataset",
    "build_eval_loader",
    "build_train_loader",
    "coco_api",
    "collate",
    "convert_to_coco",
    "ensure_synthetic",
    "eval_shard",
    "load_coco",
    "load_synthetic",
    "load_voc",
    "load_yolo",
    "parse_source",
    "read_image",
    "sample_seed",
    "validate_coco",
]
