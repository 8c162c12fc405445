"""Using a trained checkpoint: rebuild the model, evaluate it, draw its predictions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes

from robustdet.config import Config, config_from_stored
from robustdet.data import read_image
from robustdet.engine.checkpoint import CheckpointError, load_checkpoint
from robustdet.engine.trainer import resolve_device
from robustdet.models import build_model


@dataclass
class LoadedModel:
    model: torch.nn.Module
    cfg: Config
    classes: list[str]
    category_ids: list[int]
    iteration: int
    device: torch.device


def load_trained(checkpoint: str | Path, overrides: list[str] | None = None) -> LoadedModel:
    """The model of a checkpoint in eval mode, with the run's config (plus ``overrides``)."""
    state = load_checkpoint(checkpoint)
    missing = [k for k in ("config", "model", "classes", "category_ids", "iteration") if k not in state]
    if missing:
        raise CheckpointError(f"{checkpoint}: not a robustdet checkpoint (no {', '.join(missing)})")
    cfg = config_from_stored(state["config"], f"{checkpoint} config", overrides)
    device = resolve_device(cfg.train.device)
    classes = list(state["classes"])
    model = build_model(cfg, len(classes))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{checkpoint}: its weights do not fit the model of its config ({str(exc).splitlines()[0]})"
        ) from None
    model.to(device).eval()
    return LoadedModel(model, cfg, classes, list(state["category_ids"]), int(state["iteration"]), device)


@torch.no_grad()
def predict(
    loaded: LoadedModel, image_paths: list[Path], out_dir: Path, score_thresh: float = 0.3
) -> list[dict[str, Any]]:
    """Detect on each image; write ``<stem>.png`` with boxes drawn and ``predictions.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for path in image_paths:
        img = read_image(str(path))  # the datasets' reader: Pillow for BMP/TIFF, DatasetError naming the file
        det = loaded.model([img.to(loaded.device).float().div(255)])[0]
        keep = det["scores"] >= score_thresh
        boxes, scores, labels = (det[k][keep].cpu() for k in ("boxes", "scores", "labels"))
        names = [f"{loaded.classes[int(lbl)]} {float(s):.2f}" for lbl, s in zip(labels, scores, strict=True)]
        drawn = draw_bounding_boxes(img, boxes, labels=names, colors="red", width=2) if len(boxes) else img
        out_png = out_dir / f"{path.stem}.png"
        write_png(drawn, str(out_png))
        records.append(
            {
                "image": str(path),
                "output": str(out_png),
                "detections": [
                    {"box_xyxy": [round(v, 2) for v in b], "label": loaded.classes[int(lbl)], "score": float(s)}
                    for b, lbl, s in zip(boxes.tolist(), labels.tolist(), scores.tolist(), strict=True)
                ],
            }
        )
    (out_dir / "predictions.json").write_text(json.dumps(records, indent=2) + "\n")
    return records
