"""``index.html``: the audit's static review page, one self-contained file (inline CSS and JS, the images as
small JPEG data URIs), that works opened from the folder with no server.

The worst images first; each with its given boxes (solid; a suspect one in its issue's colour), the
detector's boxes (dashed) and the proposed missing objects (dotted), and beside it every suspect with its
issue, score and suggestion. Filters by issue and class, and a count of the suspects shown; the URL hash
preselects the filters (``index.html#issue=class,box&class=3``). A suspect is an annotation whose issue is
not ``ok``, or a proposed missing object at or above the threshold.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from robustdet.audit.outputs import AuditResult, xywh
from robustdet.audit.scores import ISSUES, Detections
from robustdet.files import write_text_atomic

# the page holds at most this many images (the worst); more would make it slow to open, not faster to review
PAGE_IMAGES = 1000
# embedded images are downscaled to this longer side: enough to judge a box, small enough to embed
THUMB_SIDE = 320
# the detector's boxes drawn for context: those at least this confident, at most this many per image
PRED_MIN_SCORE = 0.3
PRED_PER_IMAGE = 20


def thumbnail(path: str) -> str:
    """The image as a JPEG data URI, its longer side at most THUMB_SIDE."""
    with Image.open(path) as im:
        rgb = im.convert("RGB")
        rgb.thumbnail((THUMB_SIDE, THUMB_SIDE))
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _by_image(image: np.ndarray, num_images: int) -> list[np.ndarray]:
    """Positions of each image's rows (``image`` sorted)."""
    bounds = np.searchsorted(image, np.arange(num_images + 1))
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(num_images)]


def page_images(r: AuditResult) -> list[dict[str, Any]]:
    """The images with a suspect, worst first (at most PAGE_IMAGES), as the page's compact records."""
    ds, s, cats = r.split.dataset, r.scores, r.category_ids
    n = len(ds)
    anns, dets, miss = _by_image(r.anns.image, n), _by_image(r.dets.image, n), _by_image(s.missing.image, n)
    names = {img["id"]: img["file_name"] for img in r.split.coco["images"]}
    out = []
    for i in np.argsort(-s.image_score, kind="stable").tolist():
        kept_missing = [k for k in miss[i] if s.missing.scores[k] >= r.threshold]
        if not kept_missing and not (s.issue[anns[i]] > 0).any():
            continue
        h, w = ds.annotated_size(i)
        preds = [d for d in dets[i] if r.dets.scores[d] >= PRED_MIN_SCORE][:PRED_PER_IMAGE]
        out.append({
            "id": ds.image_ids[i], "file": names[ds.image_ids[i]], "w": w, "h": h, "src": thumbnail(ds.image_path(i)),
            "score": round(float(s.image_score[i]), 4),
            "anns": [_annotation(r, j) for j in anns[i]],
            "preds": [_box(cats, r.dets, d) for d in preds],
            "missing": [_box(cats, s.missing, k) for k in kept_missing],
        })  # fmt: skip
        if len(out) == PAGE_IMAGES:
            break
    return out


def _box(cats: list[int], dets: Detections, k: int) -> list[float]:
    """[category_id, x, y, w, h, score] of detection ``k``."""
    return [cats[int(dets.labels[k])], *xywh(dets.boxes[k]), round(float(dets.scores[k]), 3)]


def _annotation(r: AuditResult, j: int) -> dict[str, Any]:
    s = r.scores
    label, box = int(s.suggested_label[j]), s.suggested_box[j]
    return {
        "id": int(r.anns.ids[j]), "cat": r.category_ids[int(r.anns.labels[j])], "box": xywh(r.anns.boxes[j]),
        "issue": ISSUES[int(s.issue[j])], "score": round(float(s.score[j]), 4),
        "sug_cat": r.category_ids[label] if label >= 0 else None,
        "sug_box": xywh(box) if np.isfinite(box).all() else None,
    }  # fmt: skip


def write_page(r: AuditResult, out: Path) -> Path:
    """index.html in ``out``; returns its path."""
    images = page_images(r)
    suspects = sum(sum(a["issue"] != "ok" for a in im["anns"]) + len(im["missing"]) for im in images)
    data = {
        "categories": {c["id"]: c["name"] for c in r.split.coco["categories"]},
        "threshold": r.threshold,
        "images": images,
        "suspects": suspects,
        "total_images": len(r.split.dataset),
        "truncated": len(images) == PAGE_IMAGES,
    }
    text = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    html = TEMPLATE.read_text(encoding="utf-8").replace("__AUDIT_DATA__", text)
    return write_text_atomic(out / "index.html", html)


TEMPLATE = Path(__file__).with_name("page.html")
