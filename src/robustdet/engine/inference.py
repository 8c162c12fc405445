"""Using a trained checkpoint: rebuild the model, evaluate it, draw its predictions."""

from __future__ import annotations

import glob
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes

from robustdet.config import Config, config_from_stored
from robustdet.data import read_image
from robustdet.data.yolo import IMAGE_SUFFIXES
from robustdet.engine.checkpoint import load_checkpoint
from robustdet.engine.runtime import resolve_device
from robustdet.errors import CheckpointError, ConfigError
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


def per_class_table(metrics: dict[str, Any], coco_gt: Any, image_ids: list[int]) -> str:
    """The per-class AP (``metrics["per_class"]``, COCO AP@[.5:.95] in percent) with each class's number of
    images and boxes (crowd boxes left out, as COCO matches them to nothing) on the evaluated images."""
    images: Counter[int] = Counter()
    boxes: Counter[int] = Counter()
    for image_id in image_ids:
        anns = [a for a in coco_gt.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes.update(int(a["category_id"]) for a in anns)
        images.update({int(a["category_id"]) for a in anns})
    ids = {c["name"]: int(c["id"]) for c in coco_gt.dataset["categories"]}
    width = max([5, *(len(n) for n in metrics["per_class"])])
    lines = [f"{'class':<{width}} {'images':>7} {'boxes':>7} {'AP':>6}"]
    for name, ap in metrics["per_class"].items():
        cat = ids.get(name, -1)
        lines.append(f"{name:<{width}} {images[cat]:>7} {boxes[cat]:>7} {ap:6.1f}")
    return "\n".join(lines)


def collect_images(inputs: list[str]) -> tuple[list[Path], Path]:
    """The image files that ``inputs`` name, and their common parent folder.

    An input is a file (taken whatever its suffix), a folder (its images at any depth, by the YOLO image
    suffixes) or a glob (``glob.glob`` with ``**``; only image suffixes). Order: the inputs' order, a
    folder's or a glob's files sorted; a file named twice is taken once. Nothing found for an input is a
    FileNotFoundError naming it.
    """
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise FileNotFoundError(f"{item}: no images in the folder ({', '.join(sorted(IMAGE_SUFFIXES))})")
        elif glob.has_magic(item):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True)
                           if Path(p).suffix.lower() in IMAGE_SUFFIXES and Path(p).is_file())
            if not found:
                raise FileNotFoundError(f"{item}: the pattern matches no image files")
        else:
            raise FileNotFoundError(f"{item}: no such image file, folder or pattern")
        paths.extend(found)
    unique = list(dict.fromkeys(Path(os.path.abspath(p)) for p in paths))
    return unique, Path(os.path.commonpath([p.parent for p in unique]))


def output_names(paths: list[Path], root: Path) -> list[Path]:
    """Each image's drawn PNG, relative to the output folder: its path under ``root`` with ``.png`` for its
    suffix (``a/1.jpg`` -> ``a/1.png``), or with ``.png`` appended where two images would share a name
    (``a/1.jpg`` and ``a/1.png`` -> ``a/1.jpg.png``, ``a/1.png.png``)."""
    rel = [p.relative_to(root) for p in paths]
    plain = [r.with_suffix(".png") for r in rel]
    taken = Counter(plain)
    return [q if taken[q] == 1 else r.with_name(r.name + ".png") for r, q in zip(rel, plain, strict=True)]


def class_filter(loaded: LoadedModel, wanted: list[str], where: str) -> set[int]:
    """The model's labels (0..C-1) of ``wanted`` class names or dataset category ids."""
    labels = set()
    for item in wanted:
        if item in loaded.classes:
            labels.add(loaded.classes.index(item))
        elif item.lstrip("-").isdigit() and int(item) in loaded.category_ids:
            labels.add(loaded.category_ids.index(int(item)))
        else:
            shown = ", ".join(f"{c} ({n})" for c, n in zip(loaded.category_ids[:5], loaded.classes[:5], strict=True))
            raise ConfigError(f"{where}: {item!r} is not a class name or category id of the model ({shown}, ...)")
    return labels


def image_ids_from(coco_json: Path, paths: list[Path]) -> list[int]:
    """The ``images[].id`` of each path in a COCO json, matched by ``file_name`` (the path's last parts)."""
    if not Path(coco_json).is_file():
        raise FileNotFoundError(f"{coco_json}: no such COCO json")
    try:
        images = json.loads(Path(coco_json).read_text())["images"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{coco_json}: not a COCO json with an 'images' list ({exc})") from None
    by_name: dict[str, list[tuple[tuple[str, ...], int]]] = {}
    for img in images:
        parts = Path(img["file_name"]).parts
        by_name.setdefault(parts[-1], []).append((parts, int(img["id"])))
    ids = []
    for path in paths:
        hits = [i for parts, i in by_name.get(path.name, []) if path.parts[-len(parts):] == parts]
        if len(hits) != 1:
            what = "no image entry" if not hits else f"{len(hits)} image entries"
            raise ConfigError(f"{coco_json}: {what} for {path}")
        ids.append(hits[0])
    return ids


def coco_image_id(path: Path) -> int | None:
    """COCO's own file names are the image id (``000000000139.jpg`` -> 139), as Ultralytics reads them."""
    return int(path.stem) if path.stem.isdigit() else None


@torch.no_grad()
def predict(
    loaded: LoadedModel,
    image_paths: list[Path],
    out_dir: Path,
    score_thresh: float = 0.3,
    batch_size: int = 1,
    root: Path | None = None,
    classes: set[int] | None = None,
    image_ids: list[int | None] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Detect on the images, ``batch_size`` at a time; write the drawn PNGs under ``out_dir`` mirroring the
    images' tree below ``root`` (default: their common parent), and ``predictions.json``.

    Returns the per-image records and the COCO result records (``image_id`` where known, ``file_name`` the
    path below ``root``, the dataset's ``category_id``, XYWH ``bbox``, ``score``; with
    ``model.box_uncertainty`` also ``bbox_std``, σ of (x1, y1, x2, y2) in pixels, ``std_xyxy`` in the
    records); ``classes`` keeps only those labels (0..C-1).
    """
    if root is None:
        root = Path(os.path.commonpath([p.parent for p in image_paths]))
    names_out = output_names(image_paths, root)
    ids = image_ids if image_ids is not None else [coco_image_id(p) for p in image_paths]
    palette = [tuple(int(255 * c) for c in rgb[:3]) for rgb in plt_colors()]
    records: list[dict[str, Any]] = []
    coco: list[dict[str, Any]] = []
    for start in range(0, len(image_paths), batch_size):
        chunk = image_paths[start:start + batch_size]
        images = [read_image(str(p)) for p in chunk]  # Pillow for BMP/TIFF, DatasetError naming the file
        dets = loaded.model([img.to(loaded.device).float().div(255) for img in images])
        for k, (path, img, det) in enumerate(zip(chunk, images, dets, strict=True)):
            index = start + k
            keep = det["scores"] >= score_thresh
            if classes is not None:
                keep &= torch.isin(det["labels"], torch.as_tensor(sorted(classes), device=det["labels"].device))
            boxes, scores, labels = (det[key][keep].cpu() for key in ("boxes", "scores", "labels"))
            std = det["bbox_std"][keep].cpu() if "bbox_std" in det else None
            text = [f"{loaded.classes[int(lbl)]} {float(s):.2f}" for lbl, s in zip(labels, scores, strict=True)]
            if std is not None:
                text = [f"{t} ±{100 * r:.0f}%" for t, r in zip(text, relative_std(boxes, std).tolist(), strict=True)]
            colors = [palette[int(lbl) % len(palette)] for lbl in labels]
            out_png = out_dir / names_out[index]
            out_png.parent.mkdir(parents=True, exist_ok=True)
            write_png(draw_detections(img, boxes, text, colors, std), str(out_png))
            record, results = image_results(
                loaded, (boxes, scores, labels, std), path, out_png, path.relative_to(root).as_posix(), ids[index]
            )
            records.append(record)
            coco.extend(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "predictions.json").write_text(json.dumps(records, indent=2) + "\n")
    return records, coco


def image_results(
    loaded: LoadedModel,
    detections: tuple[Tensor, Tensor, Tensor, Tensor | None],
    path: Path,
    out_png: Path,
    rel: str,
    image_id: int | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One image's ``predictions.json`` record and COCO result records from its kept (boxes, scores,
    labels, σ or None)."""
    boxes, scores, labels, std = detections
    extra = std_fields(std, "std_xyxy", 2, len(boxes))
    record = {
        "image": str(path),
        "output": str(out_png),
        "detections": [
            {"box_xyxy": [round(v, 2) for v in b], "label": loaded.classes[int(lbl)], "score": float(s), **e}
            for b, lbl, s, e in zip(boxes.tolist(), labels.tolist(), scores.tolist(), extra, strict=True)
        ],
    }
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1) if len(boxes) else boxes
    head = {"image_id": image_id} if image_id is not None else {}
    coco_extra = std_fields(std, "bbox_std", 3, len(boxes))
    results = [
        {**head, "file_name": rel, "category_id": loaded.category_ids[int(lbl)],
         "bbox": [round(v, 3) for v in b], "score": round(float(s), 5), **e}
        for b, lbl, s, e in zip(xywh.tolist(), labels.tolist(), scores.tolist(), coco_extra, strict=True)
    ]
    return record, results


def std_fields(std: Tensor | None, key: str, digits: int, count: int) -> list[dict[str, list[float]]]:
    """Per detection ``{key: σ of (x1, y1, x2, y2) rounded}``, or ``count`` empty dicts without σ."""
    if std is None:
        return [{} for _ in range(count)]
    return [{key: [round(v, digits) for v in row]} for row in std.tolist()]


def relative_std(boxes: Tensor, std: Tensor) -> Tensor:
    """Each box's σ relative to its size [N]: the mean of σ_x1, σ_x2 over the width and σ_y1, σ_y2 over
    the height, the number ``predict`` writes beside the score (±12% is a box whose sides are unsure by
    about an eighth of its size)."""
    size = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-6).repeat(1, 2)  # (w, h, w, h)
    return (std / size).mean(dim=1)


def draw_detections(
    image: Tensor, boxes: Tensor, text: list[str], colors: list[tuple[int, ...]], std: Tensor | None
) -> Tensor:
    """The image [3, H, W] uint8 with each box drawn (2 px) and labelled; with ``std`` [N, 4] also a thin
    box at ±σ outside and inside each side (outer x1 − σ_x1 ... x2 + σ_x2, inner x1 + σ_x1 ... x2 − σ_x2,
    the inner one collapsing to the centre line where σ exceeds half the size), so that a sure box is
    one line and an unsure one a wide band; the labels are then drawn on a filled background."""
    if not len(boxes):
        return image
    if std is not None:
        # the ±σ boxes first, so that the boxes and their labels stay on top
        h, w = image.shape[-2:]
        limit = torch.tensor([w - 1, h - 1, w - 1, h - 1], dtype=boxes.dtype)
        outer = torch.cat([boxes[:, :2] - std[:, :2], boxes[:, 2:] + std[:, 2:]], dim=1).clamp(min=0)
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        inner = torch.cat(
            [torch.minimum(boxes[:, :2] + std[:, :2], centre), torch.maximum(boxes[:, 2:] - std[:, 2:], centre)],
            dim=1,
        )
        image = draw_bounding_boxes(image, torch.cat([torch.minimum(outer, limit), inner]), colors=colors * 2, width=1)
    # σ's lines run through the labels: filled labels stay legible over them
    return draw_bounding_boxes(image, boxes, labels=text, colors=colors, width=2, fill_labels=std is not None)


def plt_colors() -> list[tuple[float, ...]]:
    """Twenty distinct colours (matplotlib's tab20), one per class modulo 20."""
    from matplotlib import colormaps

    return [colormaps["tab20"](i) for i in range(20)]
