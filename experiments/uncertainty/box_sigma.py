"""Issue 16 §3: does the per-box σ mean anything? For each run (or an eval folder of one), from its COCO
detections with ``bbox_std`` and the clean validation labels of its config:

- AP, AP50, AP75 and AP at IoU 0.9 (COCOeval's precision array at that threshold; He et al.'s gains from
  KL-Loss and variance voting concentrate at high IoU);
- every detection matched to the ground truth of its class (greedy by score, IoU >= 0.5, COCO's rule): its
  relative σ, the mean over the 4 coordinates of σ_j / side_j (x: the ground-truth width, y: its height),
  and its relative error, the same mean of |d_j − g_j| / side_j;
- Spearman's ρ between relative σ and relative error over the matched detections, and the median relative
  σ per category.

    .venv/bin/python experiments/uncertainty/box_sigma.py RUN [RUN ...] [--detections NAME] [--min-score S]

``--detections`` names the detections file inside each folder (default detections.json, the run's final
ones; ``robustdet eval RUN model.var_voting=true --out D --save-json`` writes D/detections.json with voting).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import stats
from torchvision.ops import box_convert, box_iou

from robustdet.data import load_synthetic
from robustdet.runs.reader import run_config


def coco_metrics(gt: dict[str, Any], dets: list[dict[str, Any]]) -> dict[str, float]:
    """AP, AP50, AP75 and AP90 in %, from COCOeval's precision array [T, R, K, A, M] (area all, 100 dets)."""
    if not dets:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "AP90": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"][:, :, :, 0, -1]  # [T=10 IoUs 0.5:0.95, R, K]

    def ap(t: slice | int) -> float:
        p = prec[t]
        return 100.0 * float(p[p > -1].mean()) if (p > -1).any() else 0.0

    return {"AP": ap(slice(None)), "AP50": ap(0), "AP75": ap(5), "AP90": ap(8)}


def _xyxy(xywh: np.ndarray) -> torch.Tensor:
    return box_convert(torch.from_numpy(xywh), "xywh", "xyxy")


def matched_sigma_error(gt: dict[str, Any], dets: list[dict[str, Any]], min_score: float) -> np.ndarray:
    """[M, 3] rows (category id, relative σ, relative error) of the detections matched to a ground truth box."""
    by_image: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for a in gt["annotations"]:
        by_image.setdefault((a["image_id"], a["category_id"]), []).append(a)
    rows, taken = [], set()
    for d in sorted(dets, key=lambda d: -d["score"]):
        cands = by_image.get((d["image_id"], d["category_id"]), [])
        if d["score"] < min_score or "bbox_std" not in d or not cands:
            continue
        boxes = np.array([a["bbox"] for a in cands], dtype=np.float64)
        iou = box_iou(_xyxy(np.asarray([d["bbox"]], dtype=np.float64)), _xyxy(boxes))[0].numpy()
        iou[[k for k, a in enumerate(cands) if a["id"] in taken]] = -1.0
        k = int(iou.argmax())
        if iou[k] < 0.5:
            continue
        taken.add(cands[k]["id"])
        g, b = boxes[k], np.asarray(d["bbox"], dtype=np.float64)
        side = np.array([g[2], g[3], g[2], g[3]])
        g_xyxy, d_xyxy = np.r_[g[:2], g[:2] + g[2:]], np.r_[b[:2], b[:2] + b[2:]]
        rows.append((d["category_id"], float(np.mean(np.asarray(d["bbox_std"]) / side)),
                     float(np.mean(np.abs(d_xyxy - g_xyxy) / side))))
    return np.array(rows, dtype=np.float64).reshape(-1, 3)


def analyse(folder: Path, detections: str, min_score: float) -> dict[str, Any]:
    """The metrics and σ statistics of one run folder (or an eval folder inside a run's)."""
    run = folder if (folder / "config.yaml").exists() else folder.parent
    cfg = run_config(run)
    gt, _ = load_synthetic(cfg.data.synthetic, "val")
    dets = json.loads((folder / detections).read_text())
    out: dict[str, Any] = {"run": str(folder), **coco_metrics(gt, dets)}
    m = matched_sigma_error(gt, dets, min_score)
    out["matched"] = len(m)
    if len(m) >= 3:
        rho, p = stats.spearmanr(m[:, 1], m[:, 2])
        out.update(spearman_rho=float(rho), spearman_p=float(p))
        out["median_rel_sigma"] = {int(c): float(np.median(m[m[:, 0] == c, 1])) for c in np.unique(m[:, 0])}
        out["median_rel_error"] = {int(c): float(np.median(m[m[:, 0] == c, 2])) for c in np.unique(m[:, 0])}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--detections", default="detections.json")
    ap.add_argument("--min-score", type=float, default=0.05, help="lowest score of a matched detection")
    args = ap.parse_args(argv)
    for folder in args.folders:
        print(json.dumps(analyse(folder, args.detections, args.min_score)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
