"""What one training iteration carries: its batch on the device (images as float in [0, 1], boxes and
labels, the corrupt images the dataset replaced) and, as it goes through the loop's steps, its losses."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from robustdet.models import DetectorLosses


@dataclass
class Batch:
    images: list[torch.Tensor]
    targets: list[dict[str, Any]]
    image_ids: list[int]
    skipped: list[tuple[str, str]]  # (path, reason) of corrupt images the dataset replaced


def to_device(images: list[torch.Tensor], targets: list[dict[str, Any]], device: torch.device) -> Batch:
    """The loader's uint8 images and targets (tv_tensors boxes) as the detector's float inputs on ``device``."""
    imgs = [img.to(device, non_blocking=True).float().div_(255) for img in images]
    tgts = [
        {
            "boxes": t["boxes"].as_subclass(torch.Tensor).to(device, non_blocking=True).float(),
            "labels": t["labels"].to(device, non_blocking=True),
        }
        for t in targets
    ]
    skipped = [(str(p), str(why)) for t in targets for p, why in t.get("skipped", ())]
    return Batch(imgs, tgts, [int(t["image_id"]) for t in targets], skipped)


@dataclass
class Step:
    """One iteration as it goes through the steps of ``Trainer._iteration``."""

    it: int
    batch: Batch
    out: DetectorLosses
    level_losses: torch.Tensor  # float32, with grad
    total: torch.Tensor
    stop_signal: int | None = None
    grad_norm: float = math.nan

    @property
    def done(self) -> int:
        return self.it + 1
