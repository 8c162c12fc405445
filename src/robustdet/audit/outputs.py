"""What ``robustdet audit`` writes from the scores: annotations.csv, missing.csv, images.csv, cleaned.json,
and the console summary (docs/audit.md, "Outputs")."""

from __future__ import annotations

import copy
import csv
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robustdet.audit.folds import Predictions
from robustdet.audit.scores import ISSUES, Annotations, AuditScores, Detections, score_annotations
from robustdet.audit.split import AuditSplit
from robustdet.files import write_json_atomic, write_text_atomic

FIXES = ("relabel", "drop", "add")
ANNOTATION_COLUMNS = ("annotation_id", "image_id", "category_id", "issue", "score", "suggested_category_id",
                      "suggested_bbox")
MISSING_COLUMNS = ("image_id", "category_id", "bbox", "score")
IMAGE_COLUMNS = ("image_id", "file_name", "score")


@dataclass
class AuditResult:
    split: AuditSplit
    anns: Annotations  # sorted by image; ``order[j]`` is row j's position in the split's annotations
    dets: Detections
    scores: AuditScores
    threshold: float

    @property
    def category_ids(self) -> list[int]:
        return self.split.dataset.category_ids


def score_split(split: AuditSplit, preds: Predictions, threshold: float) -> AuditResult:
    """Every annotation of the split (crowd ones too, never scored) against the out-of-fold detections."""
    ds = split.dataset
    index_of = {image_id: i for i, image_id in enumerate(ds.image_ids)}
    label_of = {cid: label for label, cid in enumerate(ds.category_ids)}
    raw = split.coco["annotations"]
    image = np.array([index_of[a["image_id"]] for a in raw], dtype=np.int64)
    order = np.argsort(image, kind="stable")
    xywh = np.array([a["bbox"] for a in raw], dtype=np.float64).reshape(-1, 4)[order]
    loss_of = dict(zip(preds.ann_ids.tolist(), preds.ann_loss.tolist(), strict=True))
    ids = np.array([raw[i]["id"] for i in order], dtype=np.int64)
    anns = Annotations(
        image=image[order], ids=ids, boxes=np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
        labels=np.array([label_of[raw[i]["category_id"]] for i in order], dtype=np.int64),
        crowd=np.array([bool(raw[i].get("iscrowd", 0)) for i in order], dtype=bool),
        loss=np.array([loss_of.get(i, np.nan) for i in ids.tolist()]) if np.isfinite(preds.ann_loss).any() else None,
    )
    dets = Detections(preds.image_index, preds.boxes, preds.scores, preds.labels, preds.std)
    return AuditResult(split, anns, dets, score_annotations(anns, dets, len(ds), threshold), threshold)


def xywh(box: np.ndarray) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]


def annotation_rows(r: AuditResult) -> list[dict[str, Any]]:
    """One row per annotation, the most likely wrong first (ties by annotation id)."""
    s, ds = r.scores, r.split.dataset
    rows = []
    for j in np.lexsort((r.anns.ids, -s.score)).tolist():
        label, box = int(s.suggested_label[j]), s.suggested_box[j]
        rows.append({
            "annotation_id": int(r.anns.ids[j]), "image_id": ds.image_ids[int(r.anns.image[j])],
            "category_id": r.category_ids[int(r.anns.labels[j])], "issue": ISSUES[int(s.issue[j])],
            "score": round(float(s.score[j]), 6),
            "suggested_category_id": r.category_ids[label] if label >= 0 else "",
            "suggested_bbox": json.dumps(xywh(box)) if np.isfinite(box).all() else "",
        })  # fmt: skip
    return rows


def missing_rows(r: AuditResult) -> list[dict[str, Any]]:
    """One row per proposed missing object, the most confident first."""
    m, ids = r.scores.missing, r.split.dataset.image_ids
    return [
        {"image_id": ids[int(m.image[k])], "category_id": r.category_ids[int(m.labels[k])],
         "bbox": json.dumps(xywh(m.boxes[k])), "score": round(float(m.scores[k]), 6)}
        for k in np.argsort(-m.scores, kind="stable").tolist()
    ]  # fmt: skip


def image_rows(r: AuditResult) -> list[dict[str, Any]]:
    """One row per image, the worst first."""
    ds, score = r.split.dataset, r.scores.image_score
    names = {img["id"]: img["file_name"] for img in r.split.coco["images"]}
    return [{"image_id": ds.image_ids[i], "file_name": names[ds.image_ids[i]], "score": round(float(score[i]), 6)}
            for i in np.argsort(-score, kind="stable").tolist()]  # fmt: skip


def write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def cleaned_coco(r: AuditResult, fixes: set[str]) -> tuple[dict[str, Any], Counter[str]]:
    """The source COCO dict with the chosen fixes of every suggestion at or above the threshold: relabel a
    ``class`` annotation to the suggested category, drop a ``spurious`` one, add each proposed missing
    object; everything else as it was. Returns it and how many of each fix it applied."""
    s, done = r.scores, Counter[str]()
    relabel = {int(r.anns.ids[j]): r.category_ids[int(s.suggested_label[j])] for j in range(len(s.score))
               if s.issue[j] == ISSUES.index("class") and s.suggested_label[j] >= 0} if "relabel" in fixes else {}
    drop = {int(i) for i in r.anns.ids[s.issue == ISSUES.index("spurious")]} if "drop" in fixes else set()
    data = copy.deepcopy(r.split.base)
    annotations = []
    for ann in data["annotations"]:
        if ann["id"] in drop:
            done["drop"] += 1
            continue
        if ann["id"] in relabel:
            ann["category_id"] = relabel[ann["id"]]
            done["relabel"] += 1
        annotations.append(ann)
    if "add" in fixes:
        next_id = max([int(a["id"]) for a in data["annotations"]], default=0) + 1
        for row in missing_rows(r):
            if row["score"] >= r.threshold:
                x, y, w, h = json.loads(row["bbox"])
                annotations.append({"id": next_id, "image_id": row["image_id"], "category_id": row["category_id"],
                                    "bbox": [x, y, w, h], "area": round(w * h, 2), "iscrowd": 0})  # fmt: skip
                next_id += 1
                done["add"] += 1
    data["annotations"] = annotations
    return data, done


def write_outputs(r: AuditResult, out: Path, fixes: set[str]) -> tuple[list[dict[str, Any]], Counter[str]]:
    """The three csv files and cleaned.json; returns the annotation rows and the fixes applied."""
    rows = annotation_rows(r)
    write_csv(out / "annotations.csv", ANNOTATION_COLUMNS, rows)
    write_csv(out / "missing.csv", MISSING_COLUMNS, missing_rows(r))
    write_csv(out / "images.csv", IMAGE_COLUMNS, image_rows(r))
    cleaned, done = cleaned_coco(r, fixes)
    write_json_atomic(out / "cleaned.json", cleaned, indent=None)
    return rows, done


def summary_text(r: AuditResult, rows: list[dict[str, Any]], done: Counter[str], out: Path) -> str:
    """One screen: the counts per issue, the proposals, the fixes applied and the ten worst annotations."""
    counts = Counter(row["issue"] for row in rows)
    proposed = int((r.scores.missing.scores >= r.threshold).sum())
    names = {img["id"]: img["file_name"] for img in r.split.coco["images"]}
    lines = [
        f"audited {len(rows)} annotations on {len(r.split.dataset)} images (threshold {r.threshold:g}):",
        "  " + ", ".join(f"{issue} {counts.get(issue, 0)}" for issue in ISSUES)
        + f"; missing {proposed} (of {len(r.scores.missing.scores)} proposals)",
        "  cleaned.json: " + (", ".join(f"{k} {done.get(k, 0)}" for k in FIXES)),
        "  scores divided by r_c (docs/audit.md, calibration), by category id: "
        + ", ".join(f"{cid} {ref:.3f}" for cid, ref in zip(r.category_ids, r.scores.reference.tolist(), strict=False)),
        "worst annotations:",
        f"  {'annotation':>10} {'image':>8}  {'issue':<8} {'score':>6}  file",
    ]
    for row in rows[:10]:
        lines.append(f"  {row['annotation_id']:>10} {row['image_id']:>8}  {row['issue']:<8} {row['score']:6.3f}"
                     f"  {names[row['image_id']]}")
    lines.append(f"review: {out / 'index.html'}  (annotations.csv, missing.csv, images.csv, cleaned.json)")
    return "\n".join(lines)
