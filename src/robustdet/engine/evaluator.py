"""COCO-protocol evaluation through pycocotools' COCOeval."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from pycocotools.cocoeval import COCOeval

from robustdet import distributed as dist
from robustdet.data.loader import shutdown_workers

# COCOeval.stats, in its order.
METRIC_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def to_coco_results(
    detections: list[dict[str, torch.Tensor]], image_ids: list[int], category_ids: list[int]
) -> list[dict[str, Any]]:
    """Detections (XYXY boxes, contiguous labels) as COCO result records (XYWH, original category ids)."""
    out: list[dict[str, Any]] = []
    cat = torch.as_tensor(category_ids)
    for det, image_id in zip(detections, image_ids, strict=True):
        boxes = det["boxes"].detach().float().cpu()
        if boxes.numel() == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = det["scores"].detach().float().cpu().tolist()
        cats = cat[det["labels"].detach().cpu()].tolist()
        out.extend(
            {"image_id": int(image_id), "category_id": int(c), "bbox": [round(v, 3) for v in b], "score": s}
            for b, s, c in zip(xywh, scores, cats, strict=True)
        )
    return out


def coco_evaluate(coco_gt: Any, results: list[dict[str, Any]], image_ids: list[int]) -> dict[str, Any]:
    """The 12 standard COCO numbers in percent, and AP per class (by category name)."""
    metrics: dict[str, Any] = {"bbox": dict.fromkeys(METRIC_NAMES, 0.0), "per_class": {}}
    names = {c["id"]: c["name"] for c in coco_gt.dataset["categories"]}
    if not results:
        metrics["per_class"] = dict.fromkeys(names.values(), 0.0)
        return metrics
    # COCOeval prints a page per call; the caller prints its own table.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # COCOeval writes -1 where there is nothing to measure (e.g. no small objects): report 0 there
    metrics["bbox"] = {k: float(max(v, 0.0) * 100) for k, v in zip(METRIC_NAMES, ev.stats, strict=True)}
    precision = ev.eval["precision"]  # [T IoU, R recall, K classes, A areas, M maxDets]
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        metrics["per_class"][names[cat_id]] = float(np.mean(p) * 100) if p.size else float("nan")
    return metrics


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable[tuple[list[torch.Tensor], list[dict[str, Any]]]],
    dataset: Any,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    keep_results: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run ``model`` over ``loader`` (this rank's shard) and COCO-evaluate all ranks' detections.

    ``keep_results``: a list that receives all ranks' COCO result records on the main rank (for
    ``detections.json``)."""
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    image_ids: list[int] = []
    batches = iter(loader)
    try:
        for images, targets in batches:
            batch = [img.to(device, non_blocking=True).float().div_(255) for img in images]
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                dets = model(batch)
            ids = [int(t["image_id"]) for t in targets]
            results.extend(to_coco_results(dets, ids, dataset.category_ids))
            image_ids.extend(ids)
    finally:
        model.train(was_training)
        shutdown_workers(batches)  # at once, also when an image fails (see shutdown_workers)
    gathered = dist.gather_objects((results, image_ids))
    metrics: dict[str, Any] | None = None
    if dist.is_main():
        all_results = [r for part, _ in gathered for r in part]
        all_ids = sorted({i for _, ids in gathered for i in ids})
        if keep_results is not None:
            keep_results.extend(all_results)
        metrics = coco_evaluate(dataset.coco, all_results, all_ids)
    return dist.broadcast_object(metrics)


def format_metrics(metrics: dict[str, Any]) -> str:
    """A plain-text table of the 12 numbers, as a person reads them."""
    bbox = metrics["bbox"]
    head = " ".join(f"{k:>6}" for k in METRIC_NAMES)
    vals = " ".join(f"{bbox[k]:6.1f}" for k in METRIC_NAMES)
    return f"{head}\n{vals}"
