"""Do an audit's fold models tell the classes apart? Per annotation, the best out-of-fold detection score of
each class among the detections at IoU >= 0.5 with it; then how often the best class is the clean class
(chance: 1 / classes), the mean best score per class by clean class, and the AUROC of "another class
scores higher than the given one" (max other − given) for the flipped annotations against the others.
A swapped class can only be found when the first number is well above chance.

    PYTHONPATH=src .venv/bin/python experiments/cleaning/class_agreement.py AUDIT_DIR [AUDIT_DIR ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_audit import auroc, load_audit, truth
from robustdet.audit.outputs import score_split
from robustdet.audit.scores import Annotations, Detections


def best_per_class(anns: Annotations, dets: Detections, num_classes: int) -> np.ndarray:
    """[N, C]: per annotation the highest score of each class's detections at IoU >= 0.5 (0: none)."""
    best = np.zeros((len(anns.ids), num_classes))
    for image in np.unique(anns.image):
        ai, di = np.flatnonzero(anns.image == image), np.flatnonzero(dets.image == image)
        if len(di) == 0:
            continue
        near = box_iou(torch.from_numpy(anns.boxes[ai]), torch.from_numpy(dets.boxes[di])).numpy() >= 0.5
        for c in range(num_classes):
            of_c = dets.labels[di] == c
            if of_c.any():
                best[ai, c] = np.where(near[:, of_c], dets.scores[di][of_c][None, :], 0.0).max(axis=1)
    return best


def report(audit_dir: Path) -> str:
    split, preds, noise, clean = load_audit(audit_dir)
    result = score_split(split, preds, 0.5)
    anns, ds = result.anns, split.dataset
    label_of = {cid: label for label, cid in enumerate(ds.category_ids)}
    clean_label = np.array([label_of[clean[int(i)]["category_id"]] for i in anns.ids])
    classes = len(ds.category_ids)
    best = best_per_class(anns, result.dets, classes)
    seen = best.max(axis=1) > 0
    top = best.argmax(axis=1)
    flipped = truth(result, noise, clean)["class_flip"]
    given = best[np.arange(len(anns.ids)), anns.labels]
    other = np.where(np.eye(classes, dtype=bool)[anns.labels], -1.0, best).max(axis=1)
    lines = [f"{audit_dir}: {len(anns.ids)} annotations, {seen.mean():.1%} with a detection at IoU >= 0.5",
             f"  best class = clean class: {(top[seen] == clean_label[seen]).mean():.3f} (chance {1 / classes:.3f})"]
    if flipped.any():
        lines.append(f"  flipped ({flipped.sum()}): best = clean class "
                     f"{(top == clean_label)[seen & flipped].mean():.3f}, best = given class "
                     f"{(top == anns.labels)[seen & flipped].mean():.3f}; AUROC of max other − given "
                     f"{auroc((other - given)[seen], flipped[seen]):.3f}")
    for c in range(classes):
        rows = seen & (clean_label == c)
        lines.append(f"  clean class {c} ({rows.sum()}): mean best score per class "
                     + " ".join(f"{x:.3f}" for x in best[rows].mean(axis=0)))
    return "\n".join(lines)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(report(Path(arg)), flush=True)
