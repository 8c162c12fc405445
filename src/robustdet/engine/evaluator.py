"""COCO-protocol evaluation: faster-coco-eval (default when installed) or pycocotools' COCOeval.

Both give the same 12 numbers and per-class AP (tests/test_eval_backend.py checks this to 1e-6);
faster-coco-eval does the per-image matching and the accumulation in C++ (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import io
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import numpy as np
import torch

from robustdet import distributed as dist
from robustdet.config import installed_eval_backend
from robustdet.data.loader import shutdown_workers

# COCOeval.stats, in its order.
METRIC_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]

EvalBackend = Literal["faster", "pycocotools"]
_PACKAGES = {"faster": "faster-coco-eval", "pycocotools": "pycocotools"}


def backend_label(backend: EvalBackend) -> str:
    """The package and version that computes the numbers, e.g. ``faster-coco-eval 1.8.0``."""
    package = _PACKAGES[backend]
    return f"{package} {importlib.metadata.version(package)}"


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: while ~10^5 small dicts and lists are built, the collector
    walks every live object again and again (a third of faster-coco-eval's time, docs/benchmarks.md);
    what little cyclic garbage is made is collected after the pause.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def to_coco_results(
    detections: list[dict[str, torch.Tensor]], image_ids: list[int], category_ids: list[int]
) -> list[dict[str, Any]]:
    """Detections (XYXY boxes, contiguous labels) as COCO result records (XYWH, original category ids).

    Box values are rounded to 3 decimals. A model with ``model.box_uncertainty`` gives each detection
    ``bbox_std``, σ of (x1, y1, x2, y2) in pixels, written as ``"bbox_std"`` (3 decimals; COCOeval ignores
    the key). All images go through torch/numpy at once: per-value Python work was a large part of the
    evaluation time (docs/benchmarks.md).
    """
    if len(detections) != len(image_ids):
        raise ValueError(f"{len(detections)} detections for {len(image_ids)} image ids")
    counts = [len(det["scores"]) for det in detections]
    if sum(counts) == 0:
        return []
    with _gc_paused():  # tolist() and the records below are ~10^5 small containers
        boxes = torch.cat([det["boxes"].detach().float().cpu().reshape(-1, 4) for det in detections])
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
        # float32 values times 1000 are exact in float64, so numpy's rint(x * 1000) / 1000 is exactly
        # Python's round(x, 3) (both round the exact value half to even, then divide correctly rounded)
        bbox = np.round(xywh.double().numpy(), 3).tolist()
        scores = torch.cat([det["scores"].detach().float().cpu() for det in detections]).tolist()
        labels = torch.cat([det["labels"].detach().cpu() for det in detections])
        cats = torch.as_tensor(category_ids)[labels].tolist()
        images = np.repeat(np.asarray(image_ids, dtype=np.int64), counts).tolist()
        records = [
            {"image_id": i, "category_id": c, "bbox": b, "score": s}
            for i, c, b, s in zip(images, cats, bbox, scores, strict=True)
        ]
        if all("bbox_std" in det for det in detections):
            std = torch.cat([det["bbox_std"].detach().float().cpu().reshape(-1, 4) for det in detections])
            for record, sigma in zip(records, np.round(std.double().numpy(), 3).tolist(), strict=True):
                record["bbox_std"] = sigma
        return records


def run_cocoeval(coco_gt: Any, results: list[dict[str, Any]], image_ids: list[int], backend: EvalBackend) -> Any:
    """A bbox COCOeval after ``summarize()``: ``stats``, ``eval["precision"]`` and ``params.catIds`` filled."""
    if backend == "faster":
        from faster_coco_eval import COCO, COCOeval_faster

        # the same dict under faster-coco-eval's own index (its C++ matcher reads its COCO objects)
        gt = COCO(print_function=_silent)
        gt.dataset = coco_gt.dataset
        gt.createIndex()
        ev = COCOeval_faster(gt, gt.loadRes(results), iouType="bbox", print_function=_silent)
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        return ev
    from pycocotools.cocoeval import COCOeval

    # COCOeval prints a page per call; the caller prints its own table.
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="bbox")
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _silent(*args: Any, **kwargs: Any) -> None:
    return None


def coco_evaluate(
    coco_gt: Any, results: list[dict[str, Any]], image_ids: list[int], backend: EvalBackend | None = None
) -> dict[str, Any]:
    """The 12 standard COCO numbers in percent, AP per class (by category name) and the backend used.

    ``coco_gt`` is a ``pycocotools.coco.COCO`` (``DetectionDataset.coco``); ``backend`` None takes
    faster-coco-eval when it is installed. ``results`` gain ``id``/``area``/``iscrowd`` (``loadRes``).
    """
    backend = backend or installed_eval_backend()
    metrics: dict[str, Any] = {
        "bbox": dict.fromkeys(METRIC_NAMES, 0.0), "per_class": {}, "backend": backend_label(backend)
    }
    names = {c["id"]: c["name"] for c in coco_gt.dataset["categories"]}
    if not results:
        metrics["per_class"] = dict.fromkeys(names.values(), 0.0)
        return metrics
    with _gc_paused():
        ev = run_cocoeval(coco_gt, results, image_ids, backend)
    # COCOeval writes -1 where there is nothing to measure (e.g. no small objects): report 0 there
    metrics["bbox"] = {k: float(max(v, 0.0) * 100) for k, v in zip(METRIC_NAMES, ev.stats, strict=True)}
    precision = ev.eval["precision"]  # [T IoU, R recall, K classes, A areas, M maxDets]
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        metrics["per_class"][names[int(cat_id)]] = float(np.mean(p) * 100) if p.size else float("nan")
    return metrics


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable[tuple[list[torch.Tensor], list[dict[str, Any]]]],
    dataset: Any,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    backend: EvalBackend | None = None,
    keep_results: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run ``model`` over ``loader`` (this rank's shard) and COCO-evaluate all ranks' detections.

    ``backend``: ``eval.backend`` (None: faster-coco-eval when installed, else pycocotools).
    ``keep_results``: a list that receives all ranks' COCO result records on the main rank (for
    ``detections.json``).
    """
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
        metrics = coco_evaluate(dataset.coco, all_results, all_ids, backend)
    return dist.broadcast_object(metrics)


def format_metrics(metrics: dict[str, Any]) -> str:
    """A plain-text table of the 12 numbers, as a person reads them, and the evaluator that computed them."""
    bbox = metrics["bbox"]
    head = " ".join(f"{k:>6}" for k in METRIC_NAMES)
    vals = " ".join(f"{bbox[k]:6.1f}" for k in METRIC_NAMES)
    table = f"{head}\n{vals}"
    return f"{table}\n(COCOeval: {metrics['backend']})" if "backend" in metrics else table
