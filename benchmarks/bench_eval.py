"""COCO evaluation time of the two ``eval.backend``s on generated detections (docs/benchmarks.md).

What is timed is what ``robustdet.engine.evaluator.evaluate`` does after the model has run: the detections
(torch tensors, as a detector returns them) become COCO result records (``to_coco_results``) and are
evaluated (``coco_evaluate``: loadRes, evaluate, accumulate, summarize, per-class AP). The backends
alternate within each repeat (order flipped every other repeat); medians over the repeats, after a
warm-up of each on 20 images.

    .venv/bin/python benchmarks/bench_eval.py --images 2000 5000 --repeats 3

``make_eval_set`` is also what tests/test_eval_backend.py checks the two backends on.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import time
from typing import Any

import numpy as np
import torch

from robustdet.data import coco_api
from robustdet.engine.evaluator import backend_label, coco_evaluate, to_coco_results

BACKENDS = ("pycocotools", "faster")


def jittered_detections(
    rng: np.random.Generator,
    gt_boxes: np.ndarray,
    gt_labels: np.ndarray,
    width: int,
    height: int,
    num_classes: int,
    count: int,
) -> dict[str, torch.Tensor]:
    """``count`` detections as a detector returns them: 1-3 jittered copies of each ground-truth box (the
    class wrong one time in ten), random false positives for the rest, random scores (true copies higher).
    False positives take the image's classes or 8 others, as a detector's confusions gather on a few classes.

    ``gt_boxes`` are XYWH; the returned boxes are XYXY in the image, labels contiguous 0..C-1.
    """
    boxes, labels, scores = [], [], []
    for (x, y, w, h), label in zip(gt_boxes, gt_labels, strict=True):
        for _ in range(int(rng.integers(1, 4))):
            dx, dy, dw, dh = rng.normal(0.0, 0.08, 4)
            cx, cy = x + w / 2 + dx * w, y + h / 2 + dy * h
            bw, bh = w * np.exp(dw), h * np.exp(dh)
            boxes.append([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2])
            labels.append(label if rng.random() < 0.9 else int(rng.integers(num_classes)))
            scores.append(rng.beta(4, 2))
    extra = max(count - len(boxes), 0)
    side = np.exp(rng.uniform(np.log(4), np.log(0.8 * min(width, height)), (extra, 2)))
    corner = rng.uniform(0, 1, (extra, 2)) * (np.array([width, height]) - side)
    boxes += np.concatenate([corner, corner + side], axis=1).tolist()
    confusable = np.concatenate([np.asarray(gt_labels, dtype=np.int64), rng.integers(num_classes, size=8)])
    labels += rng.choice(confusable, size=extra).tolist()
    scores += rng.beta(1.5, 4, extra).tolist()
    xyxy = np.clip(np.array(boxes, dtype=np.float64).reshape(-1, 4), 0, [width, height, width, height])
    keep = np.argsort(-np.array(scores), kind="stable")[:count]  # a detector's top-k by score
    return {
        "boxes": torch.tensor(xyxy[keep], dtype=torch.float32),
        "scores": torch.tensor(np.array(scores)[keep], dtype=torch.float32),
        "labels": torch.tensor(np.array(labels, dtype=np.int64)[keep]),
    }


def make_eval_set(
    num_images: int, dets_per_image: int = 100, num_classes: int = 80, seed: int = 0
) -> tuple[dict[str, Any], list[dict[str, torch.Tensor]], list[int], list[int]]:
    """A COCO-like ground truth and detections for it: (gt dict, detections, image ids, category ids).

    Category ids are 80 of 1-90 with gaps (like COCO's), image ids sparse; about 7 boxes per image,
    3 % of them crowd boxes; every 25th image has no boxes (it still gets false positives);
    ``area`` is below the box area as for COCO's polygons, so the small/medium/large split is the json's.
    """
    rng = np.random.default_rng(seed)
    category_ids = sorted(int(c) for c in rng.choice(np.arange(1, 91), num_classes, replace=False))
    images, annotations, detections, image_ids = [], [], [], []
    for i in range(num_images):
        image_id = 1000 + 7 * i
        width, height = (int(v) for v in rng.integers(320, 641, 2))
        n = 0 if i % 25 == 0 else int(rng.poisson(7)) + 1
        size = np.exp(rng.uniform(np.log(4), np.log(0.7 * min(width, height)), (n, 1))) * rng.uniform(0.6, 1.4, (n, 2))
        size = np.minimum(size, [width - 1, height - 1])
        corner = rng.uniform(0, 1, (n, 2)) * ([width, height] - size)
        gt_boxes = np.concatenate([corner, size], axis=1)
        gt_labels = rng.integers(num_classes, size=n)
        crowd = rng.random(n) < 0.03
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": width, "height": height})
        for box, label, is_crowd in zip(gt_boxes.tolist(), gt_labels.tolist(), crowd.tolist(), strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_ids[label],
                    "bbox": box,
                    "area": box[2] * box[3] * float(rng.uniform(0.4, 1.0)),
                    "iscrowd": int(is_crowd),
                }
            )
        detections.append(
            jittered_detections(rng, gt_boxes, gt_labels, width, height, num_classes, dets_per_image)
        )
        image_ids.append(image_id)
    categories = [{"id": c, "name": f"class_{c}"} for c in category_ids]
    gt = {"images": images, "annotations": annotations, "categories": categories}
    return gt, detections, image_ids, category_ids


def time_backend(
    gt: dict[str, Any], dets: list[dict[str, torch.Tensor]], ids: list[int], cats: list[int], backend: str
) -> tuple[dict[str, float], dict[str, Any]]:
    """Wall and CPU seconds of to_coco_results + coco_evaluate (``all``) and of coco_evaluate alone
    (``eval``), and the metrics; each on a fresh index of ``gt`` as a dataset holds it."""
    coco_gt = coco_api(gt)  # built once at load time in robustdet, not per evaluation: not timed
    gc.collect()
    wall, cpu = time.perf_counter, time.process_time
    w0, c0 = wall(), cpu()
    results = to_coco_results(dets, ids, cats)
    w1, c1 = wall(), cpu()
    metrics = coco_evaluate(coco_gt, results, ids, backend)  # type: ignore[arg-type]
    w2, c2 = wall(), cpu()
    times = {"all_wall": w2 - w0, "all_cpu": c2 - c0, "eval_wall": w2 - w1, "eval_cpu": c2 - c1}
    return times, metrics


def max_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest absolute difference over the 12 numbers and the per-class APs (NaN where only one is NaN)."""
    pairs = [(a[p][k], b[p][k]) for p in ("bbox", "per_class") for k in a[p]]
    return max(0.0 if (math.isnan(x) and math.isnan(y)) else abs(x - y) for x, y in pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, nargs="+", default=[2000, 5000])
    ap.add_argument("--dets", type=int, default=100, help="detections per image")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the evaluators are single-threaded)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    labels = ", ".join(backend_label(b) for b in BACKENDS)  # type: ignore[arg-type]
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; {labels}")
    print("| images | detections | GT boxes (crowd) | what | pycocotools s | faster s | ratio | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    warm = make_eval_set(20, args.dets)
    for b in BACKENDS:  # imports and first-call costs
        time_backend(*warm, b)
    for n in args.images:
        gt, dets, ids, cats = make_eval_set(n, args.dets)
        times: dict[str, dict[str, list[float]]] = {b: {} for b in BACKENDS}
        metrics: dict[str, dict[str, Any]] = {}
        for rep in range(args.repeats):
            for b in BACKENDS if rep % 2 == 0 else BACKENDS[::-1]:
                t, metrics[b] = time_backend(gt, dets, ids, cats, b)
                for k, v in t.items():
                    times[b].setdefault(k, []).append(v)
        diff = max_difference(metrics["pycocotools"], metrics["faster"])
        num_dets = sum(len(d["scores"]) for d in dets)
        crowd = sum(a["iscrowd"] for a in gt["annotations"])
        for key, what in (
            ("all_cpu", "results + coco_evaluate, CPU"),
            ("all_wall", "results + coco_evaluate, wall"),
            ("eval_cpu", "coco_evaluate, CPU"),
        ):
            old, new = (statistics.median(times[b][key]) for b in BACKENDS)
            print(
                f"| {n} | {num_dets} | {len(gt['annotations'])} ({crowd}) | {what} | {old:.2f} | {new:.2f} "
                f"| {old / new:.2f} | {diff:.1e} |",
                flush=True,
            )

if __name__ == "__main__":
    main()
