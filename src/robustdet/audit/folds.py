"""The audit's out-of-fold detections: fold k's model is trained by the ordinary ``Trainer`` on the split
minus fold k, then predicts fold k's images without augmentation and without a score threshold.

Fold k lives in ``DIR/fold_k/``: ``train.json`` (its training images, the labels as audited), the run
(``config.yaml``, ``checkpoints/``, ``log.jsonl``, ``train.log``: the trainer's console), and, once done,
``predictions.npz``. A fold with ``predictions.npz`` is finished and skipped; one with a checkpoint
resumes exactly (``Trainer(resume=True)``), as ``robustdet train --resume`` would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustdet.audit.split import AuditSplit, fold_coco
from robustdet.config import Config, config_from_dict
from robustdet.engine.inference import LoadedModel, load_trained
from robustdet.files import write_atomic, write_json_atomic

# the overrides a model predicts with in the audit: every detection the model makes is evidence
PREDICT_OVERRIDES = ["model.score_thresh=0"]
ARRAYS = ("image_index", "boxes", "scores", "labels", "std", "ann_ids", "ann_loss")


@dataclass
class Predictions:
    """Detections of some images (flat, by image index into the audit split) and their annotations'
    losses under the model (nan: unknown, or a model without ``annotation_losses``)."""

    image_index: np.ndarray  # int64 [D]
    boxes: np.ndarray  # float64 [D, 4] XYXY pixels
    scores: np.ndarray  # float64 [D]
    labels: np.ndarray  # int64 [D], 0..C-1
    std: np.ndarray | None  # float64 [D, 4] or None
    ann_ids: np.ndarray  # int64 [N]
    ann_loss: np.ndarray  # float64 [N]

    def save(self, path: Path) -> None:
        arrays = {k: getattr(self, k) for k in ARRAYS if getattr(self, k) is not None}
        write_atomic(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: Path) -> Predictions:
        with np.load(path) as z:
            return cls(**{k: z.get(k) for k in ARRAYS})

    @classmethod
    def concat(cls, parts: list[Predictions]) -> Predictions:
        """All parts in one, sorted by image index (a stable sort keeps each image's detections in order)."""
        cat = {k: np.concatenate([getattr(p, k) for p in parts]) for k in ARRAYS if k != "std"}
        std = np.concatenate([p.std for p in parts]) if all(p.std is not None for p in parts) else None
        order = np.argsort(cat["image_index"], kind="stable")
        return cls(cat["image_index"][order], cat["boxes"][order], cat["scores"][order], cat["labels"][order],
                   None if std is None else std[order], cat["ann_ids"], cat["ann_loss"])


def fold_config(cfg: Config, train_json: Path, image_root: Path) -> Config:
    """The run config of a fold: ``cfg`` with ``data.train`` the fold's json (the label noise is already in
    it) and the headers unchecked (the audit checked them, and checking would cache them outside DIR)."""
    data = cfg.model_dump(mode="json")
    # absolute: the fold's config.yaml and checkpoints stay valid from any working directory
    data["data"]["train"] = {"format": "coco", "path": str(train_json.resolve()),
                             "image_root": str(image_root.resolve())}
    data["data"]["verify_images"] = False
    return config_from_dict(data, f"{train_json.parent} config")


def train_fold(cfg: Config, split: AuditSplit, held_out: set[int], fold_dir: Path) -> Path:
    """Train fold ``fold_dir``'s model (resuming when it has a checkpoint); its last checkpoint."""
    from robustdet.engine.trainer import Trainer

    train_json = fold_dir / "train.json"
    if not train_json.exists():
        keep = {img["id"] for img in split.coco["images"]} - held_out
        write_json_atomic(train_json, fold_coco(split.coco, keep), indent=None)
    run_cfg = fold_config(cfg, train_json, split.dataset.image_root)
    resume = (fold_dir / "checkpoints").is_dir()
    with open(fold_dir / "train.log", "a", encoding="utf-8") as log:
        Trainer(run_cfg, fold_dir, resume=resume, console=log).train()
    return fold_dir / "checkpoints" / "last.pt"


def load_for_audit(checkpoint: Path) -> LoadedModel:
    return load_trained(checkpoint, PREDICT_OVERRIDES)


@torch.no_grad()
def predict_images(loaded: LoadedModel, split: AuditSplit, indices: list[int], batch_size: int,
                   bar: Any = None) -> Predictions:
    """The model's detections (and ``bbox_std`` when it has box uncertainty) on the split's ``indices``,
    un-augmented, and each of their annotations' loss (cls + box summed over its anchors, the plain losses
    of ``annotation_losses``; nan where no anchor served it)."""
    model, device, ds = loaded.model, loaded.device, split.dataset
    parts: list[dict[str, list[Any]]] = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        samples = [ds[i] for i in chunk]  # DatasetError naming an unreadable image
        images = [img.to(device).float().div(255) for img, _ in samples]
        targets = [{"boxes": t["boxes"].as_subclass(torch.Tensor).to(device), "labels": t["labels"].to(device)}
                   for _, t in samples]
        dets = model(images)
        losses = model.annotation_losses(images, targets) if hasattr(model, "annotation_losses") else None
        for k, (index, det) in enumerate(zip(chunk, dets, strict=True)):
            loss = None if losses is None else losses[k]
            parts.append(_image_part(index, det, samples[k][1]["annotation_ids"], loss))
        if bar is not None:
            bar.update(len(chunk))
    return _flatten(parts, all("std" in p for p in parts))


def _image_part(index: int, det: dict[str, torch.Tensor], ann_ids: torch.Tensor,
                loss: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    n = len(det["scores"])
    part = {
        "image_index": np.full(n, index, dtype=np.int64),
        "boxes": det["boxes"].double().cpu().numpy().reshape(-1, 4),
        "scores": det["scores"].double().cpu().numpy(),
        "labels": det["labels"].cpu().numpy().astype(np.int64),
        "ann_ids": ann_ids.numpy().astype(np.int64),
        "ann_loss": np.full(len(ann_ids), np.nan),
    }
    if "bbox_std" in det:
        part["std"] = det["bbox_std"].double().cpu().numpy().reshape(-1, 4)
    if loss is not None:
        total = (loss["cls"] + loss["box"]).double().cpu().numpy()
        part["ann_loss"] = np.where(loss["anchors"].cpu().numpy() > 0, total, np.nan)
    return part


def _flatten(parts: list[dict[str, Any]], with_std: bool) -> Predictions:
    def cat(key: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return np.concatenate([p[key] for p in parts]) if parts else np.zeros(shape, dtype)

    return Predictions(
        cat("image_index", (0,), np.int64), cat("boxes", (0, 4), np.float64), cat("scores", (0,), np.float64),
        cat("labels", (0,), np.int64), cat("std", (0, 4), np.float64) if with_std and parts else None,
        cat("ann_ids", (0,), np.int64), cat("ann_loss", (0,), np.float64),
    )
