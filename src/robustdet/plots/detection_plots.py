"""The plots a user reads after a run: precision-recall curves per class, a confusion matrix, AP per evaluation.

All three work from what a run directory holds: ``detections.json`` (the final evaluation's COCO results),
the run's ``data.val`` (the ground truth, through its ``config.yaml``) and ``eval.jsonl``. The PR curves
come from pycocotools' ``COCOeval.eval["precision"]`` ([T IoU thresholds, R=101 recall points, K classes,
A areas, M maxDets], -1 where a class has no ground truth); the confusion matrix follows Ultralytics'
``ConfusionMatrix`` (a background row and column, rows normalised), with greedy matching by score.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from torchvision.ops import box_convert, box_iou

from robustdet.engine.evaluator import run_cocoeval

# Above this many classes the PR plot draws thin grey lines without a legend, and the confusion matrix
# has no numbers in its cells (Ultralytics draws the same way: a legend of 80 names hides the curves).
LEGEND_MAX_CLASSES = 20
ANNOTATE_MAX_CLASSES = 30


def coco_precision(
    coco_gt: Any, results: list[dict[str, Any]], image_ids: list[int]
) -> tuple[np.ndarray, list[int]]:
    """``COCOeval.eval["precision"]`` of bbox ``results`` against ``coco_gt`` on ``image_ids``, and the
    category ids of its K axis. Shape [10 IoU 0.50:0.05:0.95, 101 recall points, K, 4 areas, 3 maxDets].
    The evaluator's own COCOeval run (pycocotools: the reference)."""
    ev = run_cocoeval(coco_gt, results, image_ids, "pycocotools")
    return np.asarray(ev.eval["precision"]), [int(c) for c in ev.params.catIds]


def pr_curves(precision: np.ndarray, iou: str) -> np.ndarray:
    """Precision at the 101 recall points per class, area ``all``, maxDets 100: [K, 101], NaN where a class
    has no ground truth. ``iou`` is ``"50"`` (T index 0) or ``"50:95"`` (the mean over the 10 thresholds,
    as COCO's AP averages them)."""
    p = precision[:, :, :, 0, -1].astype(np.float64)  # [T, R, K]
    p[p < 0] = np.nan
    if iou == "50":
        curves = p[0]
    elif iou == "50:95":
        with np.errstate(invalid="ignore"), contextlib.suppress(RuntimeWarning):
            curves = np.nanmean(p, axis=0) if np.isfinite(p).any() else p[0]
    else:
        raise ValueError(f"iou {iou!r}: use '50' or '50:95'")
    return curves.T  # [K, R]


def plot_pr_curves(path: Path, precision: np.ndarray, names: list[str], iou: str) -> Path:
    """One precision-recall curve per class and their mean (AP in the legend), at IoU ``iou``."""
    curves = pr_curves(precision, iou)
    recall = np.linspace(0, 1, curves.shape[1])
    has_gt = ~np.isnan(curves).all(axis=1)
    fig, ax = plt.subplots(figsize=(8, 6))
    few = int(has_gt.sum()) <= LEGEND_MAX_CLASSES
    for k in np.flatnonzero(has_gt):
        ap = float(np.nanmean(curves[k]))
        if few:
            ax.plot(recall, curves[k], linewidth=1.2, label=f"{names[k]} {ap:.3f}")
        else:
            ax.plot(recall, curves[k], linewidth=0.6, color="grey", alpha=0.5)
    if has_gt.any():
        mean = np.nanmean(curves[has_gt], axis=0)
        ax.plot(recall, mean, linewidth=3, color="blue", label=f"all classes {float(np.mean(mean)):.3f} mAP")
    label = "0.5" if iou == "50" else "0.5:0.95"
    title = f"precision-recall per class, IoU {label} (area all, maxDets 100)"
    if not few:
        title += f"\n{int(has_gt.sum())} classes in grey"
    ax.set_title(title)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if has_gt.any():
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), title="class  AP")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusion_matrix(
    coco_gt: Any,
    results: list[dict[str, Any]],
    category_ids: list[int],
    image_ids: list[int],
    score_thresh: float = 0.25,
    iou_thresh: float = 0.5,
) -> np.ndarray:
    """Counts [C+1, C+1]: rows the true class, columns the predicted class, the last row and column
    background. Per image, detections with score >= ``score_thresh`` are taken in decreasing score and each
    is matched to the unmatched ground-truth box (any class, crowd boxes left out) of largest IoU >=
    ``iou_thresh``: a match counts at [true, predicted] (off the diagonal when the class is wrong); an
    unmatched detection is a false positive at [background, predicted]; an unmatched ground-truth box is a
    miss at [true, background]. Detections on images outside ``image_ids`` are ignored."""
    index = {int(c): k for k, c in enumerate(category_ids)}
    bg = len(category_ids)
    counts = np.zeros((bg + 1, bg + 1), dtype=np.int64)
    by_image: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        if r["score"] >= score_thresh and int(r["category_id"]) in index:
            by_image.setdefault(int(r["image_id"]), []).append(r)
    for image_id in image_ids:
        anns = [a for a in coco_gt.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        gt_cls = [index[int(a["category_id"])] for a in anns]
        dets = sorted(by_image.get(image_id, []), key=lambda r: -r["score"])
        if anns and dets:
            iou = box_iou(_xyxy([d["bbox"] for d in dets]), _xyxy([a["bbox"] for a in anns])).numpy()
        else:
            iou = np.zeros((len(dets), len(anns)))
        taken = np.zeros(len(anns), dtype=bool)
        for i, det in enumerate(dets):
            pred = index[int(det["category_id"])]
            cand = np.where(taken, -1.0, iou[i]) if len(anns) else np.zeros(0)
            j = int(np.argmax(cand)) if cand.size else -1
            if j >= 0 and cand[j] >= iou_thresh:
                taken[j] = True
                counts[gt_cls[j], pred] += 1
            else:
                counts[bg, pred] += 1
        for j in np.flatnonzero(~taken):
            counts[gt_cls[j], bg] += 1
    return counts


def _xyxy(xywh: list[list[float]]) -> torch.Tensor:
    return box_convert(torch.as_tensor(xywh, dtype=torch.float64).reshape(-1, 4), "xywh", "xyxy")


def plot_confusion_matrix(path: Path, counts: np.ndarray, names: list[str], score_thresh: float) -> Path:
    """The matrix with each row divided by its sum (a true class's boxes: found as which class, or missed)."""
    rows = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=np.float64), where=rows > 0)
    labels = [*names, "background"]
    n = len(labels)
    size = min(max(6.0, 0.22 * n + 3), 24.0)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the row")
    tick_font = 9 if n <= ANNOTATE_MAX_CLASSES else max(4.0, 9 - n / 20)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=tick_font)
    ax.set_yticks(range(n), labels, fontsize=tick_font)
    if n <= ANNOTATE_MAX_CLASSES:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, f"{norm[i, j]:.2f}\n({counts[i, j]})", ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"confusion matrix (IoU >= 0.5, score >= {score_thresh:g}; rows sum to 1)\n"
                 "background row: false positives; background column: missed boxes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ap_vs_iteration(path: Path, evals: list[dict[str, Any]]) -> Path:
    """AP, AP50 and AP75 (%) of each evaluation in ``eval.jsonl`` against its iteration."""
    # a resumed run re-evaluates an iteration it had evaluated: the later record counts
    evals = sorted({r["iter"]: r for r in evals}.values(), key=lambda r: r["iter"])
    iters = [r["iter"] for r in evals]
    fig, ax = plt.subplots(figsize=(7, 4))
    top = 0.0
    for key in ("AP", "AP50", "AP75"):
        values = [r["bbox"][key] for r in evals]
        top = max(top, *values)
        ax.plot(iters, values, marker="o", markersize=4, linewidth=1.2, label=key)
    ax.set_title("COCO AP on data.val at each evaluation")
    ax.set_xlabel("iteration")
    ax.set_ylabel("AP (%)")
    ax.set_ylim(0, max(1.0, top * 1.1))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def detection_report(run_dir: Path, out: Path, score_thresh: float = 0.25) -> tuple[list[Path], list[str]]:
    """The plots above for a run directory: the files written, and a note for each plot left out (no
    ``eval.jsonl``, no ``detections.json``, a ``data.val`` that cannot be read any more)."""
    from robustdet.files import read_jsonl

    files: list[Path] = []
    notes: list[str] = []
    evals = [r for r in read_jsonl(run_dir / "eval.jsonl") if "bbox" in r]
    if evals:
        files.append(plot_ap_vs_iteration(out / "ap_vs_iteration.png", evals))
    else:
        notes.append(f"{run_dir / 'eval.jsonl'}: no evaluations, no ap_vs_iteration.png")
    det_path = run_dir / "detections.json"
    if not det_path.exists():
        notes.append(f"{det_path}: absent (written by the final evaluation), no PR curves or confusion matrix")
        return files, notes
    try:
        coco_gt, image_ids = _val_ground_truth(run_dir)
    except Exception as exc:  # the report's other plots must not depend on the dataset still being there
        notes.append(f"{run_dir / 'config.yaml'}: data.val cannot be read ({exc}); no PR curves or confusion matrix")
        return files, notes
    results = json.loads(det_path.read_text())
    category_ids = sorted(int(c) for c in coco_gt.getCatIds())
    names = [coco_gt.cats[c]["name"] for c in category_ids]
    if results:
        precision, cat_axis = coco_precision(coco_gt, results, image_ids)
        axis_names = [coco_gt.cats[c]["name"] for c in cat_axis]
        files.append(plot_pr_curves(out / "pr_curves_iou50.png", precision, axis_names, "50"))
        files.append(plot_pr_curves(out / "pr_curves_iou50-95.png", precision, axis_names, "50:95"))
    else:
        notes.append(f"{det_path}: no detections, no PR curves")
    counts = confusion_matrix(coco_gt, results, category_ids, image_ids, score_thresh)
    files.append(plot_confusion_matrix(out / "confusion_matrix.png", counts, names, score_thresh))
    return files, notes


def _val_ground_truth(run_dir: Path) -> tuple[Any, list[int]]:
    """The run's ``data.val`` as the evaluator saw it (``DetectionDataset.coco``) and the images it
    evaluated (the first ``eval.max_images``, as ``build_eval_loader`` takes them)."""
    from robustdet.config import load_config
    from robustdet.data import build_dataset

    cfg = load_config(run_dir / "config.yaml")
    dataset = build_dataset(cfg.data.val, cfg.data, train=False)
    return dataset.coco, list(dataset.image_ids[: cfg.eval.max_images])
