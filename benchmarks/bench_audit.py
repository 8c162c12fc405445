"""How well ``robustdet audit`` finds injected label errors, against a loss-only ranking and cleanlab's
ObjectLab fed the same out-of-fold predictions (issue 18 §2; docs/audit.md, docs/results.md).

Each AUDIT_DIR is a finished audit of data with ``data.train.label_noise``; its ``label_noise.json`` says
which annotation ids each kind corrupted. Per kind (one audit may hold several):

- ``class_flip``, ``box_jitter``, ``spurious``: the corrupted annotations (for jitter only those whose
  noisy box has IoU < 0.5 with the clean one) against the clean ones (no kind touched them; a jitter that
  kept IoU >= 0.5 counts as clean), ranked by each method's per-annotation suspicion: AUROC, and P@k, the
  share of corrupted labels among the k most suspect (k = the number corrupted);
- ``drop``: the dropped boxes (read from the split without noise) against the proposals of missing
  objects: recall@k, the share of dropped boxes matched (IoU >= 0.5, same class, each once) by the k
  most confident proposals (k = the number dropped), and the AUROC of the proposals' scores for being
  one of them.

Methods: ``robustdet`` (the audit's score, calibrated as by default; and with ``calibration="none"``),
``loss`` (each annotation's held-out loss alone), ``objectlab`` (cleanlab's per-box scores: suspicion
1 - min(swap, badloc), overlooked scores on the predicted boxes for drops; and the same fed the calibrated
scores). An image table compares image rankings with ``get_label_quality_scores`` and
``find_label_issues``. cleanlab is the ``bench`` extra (``pip install cleanlab``), never imported by src/.

    PYTHONPATH=src python benchmarks/bench_audit.py /tmp/audit2/r18_400 [MORE_DIRS ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

from robustdet.audit.folds import Predictions
from robustdet.audit.outputs import AuditResult, score_split
from robustdet.audit.scores import Detections, ScoreConfig, all_pairs, calibrate, pair_iou, score_annotations
from robustdet.audit.split import load_split
from robustdet.config import config_from_stored

KINDS = ("class_flip", "box_jitter", "spurious", "drop")


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(a positive outranks a negative), ties counted half (Mann-Whitney U / n_pos n_neg)."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    r = rankdata(score)
    return float((r[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_at_k(score: np.ndarray, positive: np.ndarray, k: int) -> float:
    order = np.argsort(-score, kind="stable")
    return float(positive[order[:k]].mean()) if k else float("nan")


def xyxy(bbox: list[float]) -> list[float]:
    return [bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]]


def load_audit(audit_dir: Path) -> tuple[Any, Predictions, dict[str, Any], dict[int, dict[str, Any]]]:
    """The audited split, the out-of-fold predictions, label_noise.json, and the clean annotations by id."""
    manifest = json.loads((audit_dir / "audit.json").read_text())
    stored = manifest["fingerprint"]["config"]
    split = load_split(config_from_stored(stored, str(audit_dir / "audit.json")))
    clean_cfg = json.loads(json.dumps(stored))
    clean_cfg["data"]["train"].pop("label_noise", None)
    clean = load_split(config_from_stored(clean_cfg, str(audit_dir / "audit.json")))
    files = sorted(audit_dir.glob("fold_*/predictions.npz")) or [audit_dir / "predictions.npz"]
    preds = Predictions.concat([Predictions.load(p) for p in files])
    noise = json.loads((audit_dir / "label_noise.json").read_text())
    return split, preds, noise, {a["id"]: a for a in clean.coco["annotations"]}


def truth(result: AuditResult, noise: dict[str, Any], clean: dict[int, dict[str, Any]]) -> dict[str, np.ndarray]:
    """Per kind a bool mask over result.anns (corrupted by that kind), and ``clean`` (untouched)."""
    ids = result.anns.ids
    changed = noise["changed"]
    masks = {k: np.isin(ids, changed.get(k, [])) for k in ("class_flip", "box_jitter")}
    masks["spurious"] = np.isin(ids, noise.get("added", []))
    jit = np.flatnonzero(masks["box_jitter"])
    if len(jit):
        before = np.array([xyxy(clean[int(i)]["bbox"]) for i in ids[jit]], dtype=np.float64)
        masks["box_jitter"][jit] = pair_iou(result.anns.boxes[jit], before) < 0.5
    touched = np.isin(ids, changed.get("class_flip", []) + changed.get("box_jitter", [])) | masks["spurious"]
    masks["clean"] = ~touched | (np.isin(ids, changed.get("box_jitter", [])) & ~masks["box_jitter"]
                                 & ~np.isin(ids, changed.get("class_flip", [])))
    masks["clean"] &= ~result.anns.crowd
    return masks


def dropped_boxes(result: AuditResult, noise: dict[str, Any], clean: dict[int, dict[str, Any]]) -> Detections:
    """The dropped annotations as they were (image index, XYXY box, label; score 1)."""
    ds = result.split.dataset
    index_of = {image_id: i for i, image_id in enumerate(ds.image_ids)}
    label_of = {cid: label for label, cid in enumerate(ds.category_ids)}
    rows = [clean[i] for i in noise["changed"].get("drop", []) if i in clean]
    rows.sort(key=lambda a: index_of[a["image_id"]])
    return Detections(np.array([index_of[a["image_id"]] for a in rows], dtype=np.int64),
                      np.array([xyxy(a["bbox"]) for a in rows], dtype=np.float64).reshape(-1, 4),
                      np.ones(len(rows)), np.array([label_of[a["category_id"]] for a in rows], dtype=np.int64))


def match_proposals(proposals: Detections, dropped: Detections) -> np.ndarray:
    """For each proposal (most confident first, greedy) whether it takes a not yet matched dropped box of
    its class at IoU >= 0.5."""
    hit = np.zeros(len(proposals.scores), bool)
    taken = np.zeros(len(dropped.scores), bool)
    by_image: dict[int, list[int]] = {}
    for j, img in enumerate(dropped.image.tolist()):
        by_image.setdefault(img, []).append(j)
    for i in np.argsort(-proposals.scores, kind="stable"):
        cand = [j for j in by_image.get(int(proposals.image[i]), []) if not taken[j]
                and dropped.labels[j] == proposals.labels[i]]
        if not cand:
            continue
        ious = pair_iou(np.repeat(proposals.boxes[i:i + 1], len(cand), 0), dropped.boxes[cand])
        if ious.max() >= 0.5:
            taken[cand[int(ious.argmax())]] = True
            hit[i] = True
    return hit


def drop_metrics(proposals: Detections, dropped: Detections) -> tuple[float, float]:
    """(recall@k with k = the number dropped, AUROC of the proposals' scores for matching one)."""
    k = len(dropped.scores)
    order = np.argsort(-proposals.scores, kind="stable")[:k]
    top = Detections(proposals.image[order], proposals.boxes[order], proposals.scores[order],
                     proposals.labels[order])
    recall = match_proposals(top, dropped).sum() / k if k else float("nan")
    return float(recall), auroc(proposals.scores, match_proposals(proposals, dropped))


def objectlab_inputs(result: AuditResult, dets: Detections) -> tuple[list[dict[str, Any]], list[np.ndarray],
                                                                     list[np.ndarray]]:
    """cleanlab's format: per image {'bboxes': [L, 4], 'labels': [L]} of the non-crowd annotations, and an
    object array of K [M_k, 5] arrays (x1, y1, x2, y2, score); with each image's annotation rows."""
    anns, num_images = result.anns, len(result.split.dataset)
    num_classes = len(result.split.dataset.category_ids)
    rows = np.flatnonzero(~anns.crowd)
    ann_rows = np.split(rows, np.searchsorted(anns.image[rows], np.arange(1, num_images)))
    det_rows = np.split(np.arange(len(dets.image)), np.searchsorted(dets.image, np.arange(1, num_images)))
    labels, predictions = [], []
    for a, d in zip(ann_rows, det_rows, strict=True):
        labels.append({"bboxes": anns.boxes[a].astype(np.float32), "labels": anns.labels[a]})
        per_class = np.empty(num_classes, dtype=object)
        for c in range(num_classes):
            sel = d[dets.labels[d] == c]
            per_class[c] = np.concatenate([dets.boxes[sel], dets.scores[sel, None]], axis=1).astype(np.float32)
        predictions.append(per_class)
    return labels, predictions, ann_rows


def objectlab_scores(result: AuditResult, dets: Detections) -> dict[str, Any]:
    """ObjectLab's per-annotation suspicion, its overlooked proposals, image scores and flagged images."""
    from cleanlab.object_detection.filter import find_label_issues
    from cleanlab.object_detection.rank import (
        compute_badloc_box_scores,
        compute_overlooked_box_scores,
        compute_swap_box_scores,
        get_label_quality_scores,
    )

    labels, predictions, ann_rows = objectlab_inputs(result, dets)
    swap = compute_swap_box_scores(labels=labels, predictions=predictions)
    badloc = compute_badloc_box_scores(labels=labels, predictions=predictions)
    s_swap, s_badloc = np.zeros(len(result.anns.ids)), np.zeros(len(result.anns.ids))
    for rows, s, b in zip(ann_rows, swap, badloc, strict=True):
        s_swap[rows], s_badloc[rows] = 1 - np.nan_to_num(s, nan=1.0), 1 - np.nan_to_num(b, nan=1.0)
    suspicion = np.maximum(s_swap, s_badloc)
    parts = {"class_flip": s_swap, "box_jitter": s_badloc, "spurious": s_badloc}
    overlooked = compute_overlooked_box_scores(labels=labels, predictions=predictions)
    img, boxes, score, lab = [], [], [], []
    for i, (pred, over) in enumerate(zip(predictions, overlooked, strict=True)):
        flat = [(c, row) for c in range(len(pred)) for row in pred[c]]
        for (c, row), o in zip(flat, over, strict=True):
            if np.isfinite(o):  # cleanlab scores only its confident predictions (nan: not a proposal)
                img.append(i), boxes.append(row[:4]), score.append(1 - o), lab.append(c)
    proposals = Detections(np.array(img, dtype=np.int64), np.array(boxes, dtype=np.float64).reshape(-1, 4),
                           np.array(score, dtype=np.float64), np.array(lab, dtype=np.int64))
    quality = get_label_quality_scores(labels, predictions, verbose=False)
    flagged = find_label_issues(labels, predictions)
    return {"annotation": suspicion, "parts": parts, "proposals": proposals, "image": 1 - quality,
            "flagged": flagged}


def loss_suspicion(result: AuditResult) -> np.ndarray:
    loss = result.anns.loss if result.anns.loss is not None else np.full(len(result.anns.ids), np.nan)
    return np.where(np.isfinite(loss), loss, np.nanmedian(loss) if np.isfinite(loss).any() else 0.0)


def annotation_rows(suspicion: np.ndarray | dict[str, np.ndarray], masks: dict[str, np.ndarray],
                    proposals: Detections | None, dropped: Detections) -> dict[str, tuple[float, float]]:
    """kind -> (AUROC, P@k) for one method (drop: the proposals' AUROC and recall@k); ``suspicion`` one
    ranking for every kind, or one per kind."""
    out = {}
    for kind in ("class_flip", "box_jitter", "spurious"):
        pool = masks[kind] | masks["clean"]
        score = suspicion[kind] if isinstance(suspicion, dict) else suspicion
        positive = masks[kind][pool]
        out[kind] = (auroc(score[pool], positive), precision_at_k(score[pool], positive, int(positive.sum())))
    if proposals is not None:
        recall, area = drop_metrics(proposals, dropped)
        out["drop"] = (area, recall)
    return out


def image_truth(result: AuditResult, masks: dict[str, np.ndarray], dropped: Detections) -> np.ndarray:
    bad = np.zeros(len(result.split.dataset), bool)
    for kind in ("class_flip", "box_jitter", "spurious"):
        bad[result.anns.image[masks[kind]]] = True
    bad[dropped.image] = True
    return bad


def fmt(pair: tuple[float, float]) -> str:
    return " / ".join("–" if not np.isfinite(v) else f"{v:.3f}" for v in pair)


def print_images(bad: np.ndarray, methods: dict[str, Any], objectlab: dict[str, dict[str, Any]]) -> None:
    """The image table: each method's image ranking against the images with any corrupted label."""
    print(f"\nImages with any corrupted label: {int(bad.sum())} of {len(bad)}.\n")
    print("| method | image AUROC | P@k |\n|---|---|---|")
    for name, (_, _, image) in methods.items():
        if image is not None:
            print(f"| {name} | {auroc(image, bad):.3f} | {precision_at_k(image, bad, int(bad.sum())):.3f} |")
    for name, res in objectlab.items():
        f = np.asarray(res["flagged"], bool)
        print(f"\nfind_label_issues ({name} scores): {int(f.sum())} images flagged, "
              f"precision {bad[f].mean() if f.any() else float('nan'):.3f}, recall {f[bad].mean():.3f}")


def evaluate(audit_dir: Path, quantiles: list[float]) -> None:
    """Print the tables for one audit folder."""
    split, preds, noise, clean = load_audit(audit_dir)
    t0 = time.perf_counter()
    result = score_split(split, preds, 0.5)
    t_ours = time.perf_counter() - t0
    n_img = len(split.dataset)
    raw = score_annotations(result.anns, result.dets, n_img, 0.5, ScoreConfig(calibration="none"))
    masks, dropped = truth(result, noise, clean), dropped_boxes(result, noise, clean)
    calibrated, reference = calibrate(result.anns, result.dets, all_pairs(result.anns, result.dets, n_img),
                                      ScoreConfig())
    t0 = time.perf_counter()
    lab = objectlab_scores(result, result.dets)
    t_lab = time.perf_counter() - t0
    lab_cal = objectlab_scores(result, calibrated)
    methods = {
        "robustdet (calibrated, default)": (result.scores.score, result.scores.missing, result.scores.image_score),
        "robustdet (calibration=none)": (raw.score, raw.missing, raw.image_score),
        "robustdet, the kind's own part (s_class, s_box, s_spurious)": (
            {"class_flip": result.scores.parts["class"], "box_jitter": result.scores.parts["box"],
             "spurious": result.scores.parts["spurious"]}, result.scores.missing, None),
        "loss only": (loss_suspicion(result), None, None),
        "ObjectLab (raw scores)": (lab["annotation"], lab["proposals"], lab["image"]),
        "ObjectLab (scores ÷ r_c)": (lab_cal["annotation"], lab_cal["proposals"], lab_cal["image"]),
        "ObjectLab, the kind's own part (swap, badloc, badloc)": (lab["parts"], lab["proposals"], None),
    }
    for q in quantiles:
        alt = score_annotations(result.anns, result.dets, n_img, 0.5, ScoreConfig(calibration_quantile=q))
        methods[f"robustdet (calibration_quantile={q})"] = (alt.score, alt.missing, alt.image_score)
    counts = {k: int(masks[k].sum()) for k in ("class_flip", "box_jitter", "spurious")}
    print(f"\n### {audit_dir}\n\n{len(result.anns.ids)} annotations ({int(masks['clean'].sum())} clean) on {n_img} "
          f"images; corrupted: flips {counts['class_flip']}, jitter IoU < 0.5 {counts['box_jitter']} "
          f"(of {len(noise['changed'].get('box_jitter', []))} jittered), spurious {counts['spurious']}, "
          f"dropped {len(dropped.scores)}; r_c = {np.round(reference, 3).tolist()}\n")
    print("| method | class_flip AUROC / P@k | box_jitter AUROC / P@k | spurious AUROC / P@k | "
          "drop proposals AUROC / recall@k |\n|---|---|---|---|---|")
    for name, (susp, proposals, _) in methods.items():
        row = annotation_rows(susp, masks, proposals, dropped)
        print(f"| {name} | " + " | ".join(fmt(row[k]) if k in row else "–" for k in KINDS[:3])
              + f" | {fmt(row['drop']) if 'drop' in row else '–'} |")
    print_images(image_truth(result, masks, dropped), methods, {"raw": lab, "calibrated": lab_cal})
    print(f"\ntimes: robustdet score_split {t_ours:.2f} s; ObjectLab (per-box scores, image scores, "
          f"find_label_issues) {t_lab:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audit_dirs", type=Path, nargs="+")
    parser.add_argument("--quantiles", type=float, nargs="*", default=[],
                        help="also rows for robustdet with these calibration_quantile values")
    args = parser.parse_args()
    try:
        import cleanlab  # noqa: F401
    except ImportError:
        sys.exit("bench_audit.py: needs cleanlab (pip install 'robustdet[bench]' or pip install cleanlab)")
    print("Command: `PYTHONPATH=src python " + " ".join(sys.argv) + "`")
    for d in args.audit_dirs:
        evaluate(d, args.quantiles)


if __name__ == "__main__":
    main()
