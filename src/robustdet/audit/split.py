"""The split ``robustdet audit`` scores: ``data.train`` with its noisy labels and without augmentation,
checked up front (every image readable, some annotation to score), and its folds."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from robustdet.config import Config
from robustdet.data import TRAINING, DetectionDataset, build_dataset
from robustdet.data.coco import CocoSource
from robustdet.data.headers import read_headers
from robustdet.data.merge import as_sources
from robustdet.data.schema import read_json
from robustdet.errors import ConfigError, DatasetError

# the training split as the detector saw it, minus augmentation; every image kept (a missing object may
# hide on an image without boxes) and an unreadable image an error naming it, not a silent substitute
AUDIT_USE = replace(TRAINING, augment=False, skip_empty=False, skip_corrupt=False)


@dataclass
class AuditSplit:
    dataset: DetectionDataset
    # the COCO dict cleaned.json starts from: the source json as read when data.train is one coco file
    # without label_noise, else the split as loaded (the synthetic data's COCO form, the noise applied)
    base: dict[str, Any]
    base_name: str

    @property
    def coco(self) -> dict[str, Any]:
        """The split as scored (boxes clipped to their images, data.out_of_image)."""
        return self.dataset.coco.dataset


def load_split(cfg: Config) -> AuditSplit:
    """``data.train`` as audited. Headers are checked here, uncached, so that nothing is written outside
    the audit folder (data/headers.py would cache them in ~/.cache)."""
    data_cfg = cfg.data.model_copy(update={"verify_images": False})
    dataset = build_dataset(cfg.data.train, data_cfg, AUDIT_USE)
    check_images(dataset)
    if not any(not a.get("iscrowd", 0) for a in dataset.coco.dataset["annotations"]):
        raise DatasetError(f"{dataset.source}: the split has no annotations to audit")
    sources = as_sources(cfg.data.train)
    if len(sources) == 1 and isinstance(sources[0], CocoSource) and sources[0].label_noise is None:
        path = Path(sources[0].path or "")
        return AuditSplit(dataset, read_json(path), str(path))
    return AuditSplit(dataset, dataset.coco.dataset, dataset.source)


def check_images(dataset: DetectionDataset) -> None:
    """Every image's header readable and of its annotated size: a DatasetError naming the first file that
    is not (before any fold trains, rather than when its fold predicts)."""
    paths = [dataset.image_path(i) for i in range(len(dataset))]
    for index, header in enumerate(read_headers(paths, None)):
        if isinstance(header, str):
            raise DatasetError(f"{dataset.source}: {header}")
        width, height, _ = header
        if (height, width) != dataset.annotated_size(index):
            h, w = dataset.annotated_size(index)
            raise DatasetError(f"{paths[index]}: the image is {width}x{height} but annotated as {w}x{h}")


def assign_folds(num_images: int, folds: int, seed: int) -> np.ndarray:
    """Each image's fold (0..K-1): a seeded permutation dealt round-robin, so fold sizes differ by <= 1."""
    if folds < 2:
        raise ConfigError(f"--folds {folds}: needs at least 2 folds (or --weights to score with one model)")
    if folds > num_images:
        raise ConfigError(f"--folds {folds}: more folds than the {num_images} images of data.train")
    order = np.random.default_rng(seed).permutation(num_images)
    fold = np.empty(num_images, dtype=np.int64)
    fold[order] = np.arange(num_images) % folds
    return fold


def fold_coco(coco: dict[str, Any], image_ids: set[int]) -> dict[str, Any]:
    """The split restricted to ``image_ids`` (their annotations, every category)."""
    return {
        **coco,
        "images": [img for img in coco["images"] if img["id"] in image_ids],
        "annotations": [a for a in coco["annotations"] if a["image_id"] in image_ids],
    }
