"""How likely each annotation is wrong, from out-of-sample detections (docs/audit.md, the equations).

Pure numpy over flat arrays (all images at once): every (annotation, detection) pair of an image gets
its IoU u. The scores are first calibrated (``ScoreConfig.calibration``): p_d <- min(1, p_d / r_{c_d}),
r_c the median over class c's annotations of max_{d: c_d = c_a, u >= tau_loc} p_d. Then segmented maxima
over the pairs give, per annotation a with class c_a,

    q_same(a)  = max_{d: c_d = c_a, u >= tau_low} p_d * pi(a, d)          the model agrees
    q_near(a)  = max_{d: c_d = c_a, u >= tau_low} p_d * (1 - pi(a, d))    same class, elsewhere nearby
    q_other(a) = max_{d: c_d != c_a, u >= tau_loc} p_d                    another class in its place
    q_any(a)   = max_{d: u >= tau_low} p_d                                anything under it at all

with u = IoU(a, d), p_d the detection's (per-class) score and pi(a, d) the probability that d marks the
same place: 1[u >= tau_loc] without box uncertainty, exp(-1/2 mean_j z_j^2), z_j = (a_j - d_j) / sigma_dj,
with the detection's per-coordinate sigma (``bbox_std``). Then

    s_class = q_other (1 - q_same),   s_box = q_near (1 - q_same),   s_spurious = 1 - q_any,
    score   = (1 - w) max(s_class, s_box, s_spurious) + w * rank(loss)        (w = 0 without a loss)

and the issue is the largest part when score >= threshold, else ``ok``. A detection that overlaps no
annotation (u < tau_low for all, crowd regions included) with p_d >= missing_min is a proposed missing
object (class-agnostic NMS among them); an image scores the max of its annotations' and proposals' scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

ISSUES = ("ok", "class", "box", "spurious")


@dataclass(frozen=True)
class ScoreConfig:
    """The scores' constants (docs/audit.md); the defaults are what ``robustdet audit`` uses."""

    # IoU at which a detection marks the same object (COCO's AP50 criterion)
    tau_loc: float = 0.5
    # IoU below which a detection has nothing to do with an annotation
    tau_low: float = 0.1
    # weight of the per-annotation training loss's rank in the score (used only when losses are given)
    loss_weight: float = 0.25
    # lowest detection score proposed as a missing object
    missing_min: float = 0.2
    # IoU of class-agnostic NMS among the proposals (one proposal per object, whatever its class)
    missing_nms: float = 0.5
    # floor of the detections' sigma in pixels (a near-zero sigma would make every offset infinitely unlikely)
    sigma_min: float = 1.0
    # how detection scores become probabilities before the equations: "class_median" divides each score by
    # r_c, the median over class c's annotations of their best same-class score at IoU >= tau_loc (clipped
    # to 1); "none" reads the scores as they are. Focal-loss scores of correct detections sit near 0.3
    # (docs/audit.md, "Calibration"), which read as probabilities flag nearly every annotation spurious.
    calibration: Literal["class_median", "none"] = "class_median"
    # the quantile of those best scores that r_c is (0.5: the median)
    calibration_quantile: float = 0.5
    # a class with fewer matched annotations than this uses the quantile over all classes (too few to trust)
    calibration_min: int = 10


@dataclass
class Annotations:
    """The annotations of all images, flat, sorted by ``image``; boxes XYXY in pixels."""

    image: np.ndarray  # int64 [N], index of the image (0..I-1)
    ids: np.ndarray  # int64 [N]
    boxes: np.ndarray  # float64 [N, 4]
    labels: np.ndarray  # int64 [N]
    crowd: np.ndarray  # bool [N]: never scored, but no missing object is proposed over it
    loss: np.ndarray | None = None  # float64 [N]: the training loss of each annotation (nan: unknown)


@dataclass
class Detections:
    """The detections of all images, flat, sorted by ``image``."""

    image: np.ndarray  # int64 [D]
    boxes: np.ndarray  # float64 [D, 4]
    scores: np.ndarray  # float64 [D]
    labels: np.ndarray  # int64 [D]
    std: np.ndarray | None = None  # float64 [D, 4]: per-coordinate sigma of the box, pixels


@dataclass
class AuditScores:
    parts: dict[str, np.ndarray]  # "class", "box", "spurious": float64 [N] each
    score: np.ndarray  # float64 [N] in [0, 1]
    issue: np.ndarray  # int64 [N], index into ISSUES
    suggested_label: np.ndarray  # int64 [N], -1: none
    suggested_box: np.ndarray  # float64 [N, 4], nan: none
    missing: Detections  # the proposed missing objects (std None), by image
    image_score: np.ndarray  # float64 [I]
    quantities: dict[str, np.ndarray] = field(default_factory=dict)  # q_same, q_near, q_other, q_any
    reference: np.ndarray = field(default_factory=lambda: np.ones(0))  # r_c by label (1: not rescaled)


def pair_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of row-aligned XYXY boxes a[i], b[i]."""
    w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = w * h
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a + area_b - inter, 1e-12)


def image_pairs(ann_image: np.ndarray, det_image: np.ndarray, num_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(annotation index, detection index) of every pair within an image, grouped by annotation."""
    det_count = np.bincount(det_image, minlength=num_images)
    det_start = np.cumsum(det_count) - det_count
    counts = det_count[ann_image]
    seg_start = np.cumsum(counts) - counts
    ann = np.repeat(np.arange(len(ann_image)), counts)
    det = np.arange(int(counts.sum())) - np.repeat(seg_start, counts) + np.repeat(det_start[ann_image], counts)
    return ann, det


def segment_max(values: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per contiguous segment (lengths ``counts``): the max of ``values`` (-inf when empty) and the position
    of its first occurrence in ``values`` (-1 when empty)."""
    n = len(counts)
    best = np.full(n, -np.inf)
    where = np.full(n, -1, dtype=np.int64)
    full = counts > 0
    if not full.any():
        return best, where
    starts = (np.cumsum(counts) - counts)[full]
    best[full] = np.maximum.reduceat(values, starts)
    hit = values == np.repeat(best, counts)
    position = np.where(hit, np.arange(len(values)), len(values))
    where[full] = np.minimum.reduceat(position, starts)
    return best, where


def same_place(ann_boxes: np.ndarray, det_boxes: np.ndarray, iou: np.ndarray, std: np.ndarray | None,
               cfg: ScoreConfig) -> np.ndarray:
    """pi(a, d): 1[u >= tau_loc], or with the detection's sigma exp(-1/2 mean_j z_j^2)."""
    if std is None:
        return (iou >= cfg.tau_loc).astype(np.float64)
    z = (ann_boxes - det_boxes) / np.maximum(std, cfg.sigma_min)
    return np.exp(-0.5 * np.mean(z * z, axis=1))


def loss_rank(loss: np.ndarray, scored: np.ndarray) -> np.ndarray:
    """Each scored annotation's loss as its rank in [0, 1] (ties share their mean rank; unknown: 0.5)."""
    out = np.full(len(loss), 0.5)
    known = scored & np.isfinite(loss)
    values = loss[known]
    if len(values) > 1:
        order = np.argsort(values, kind="stable")
        sorted_values = values[order]
        lo = np.searchsorted(sorted_values, values, "left")
        hi = np.searchsorted(sorted_values, values, "right") - 1
        out[known] = (lo + hi) / 2 / (len(values) - 1)
    return out


def _masked_max(values: np.ndarray, mask: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """segment_max over the pairs where ``mask`` holds; 0 and -1 where none does."""
    best, where = segment_max(np.where(mask, values, -1.0), counts)
    none = best < 0
    return np.where(none, 0.0, best), np.where(none, -1, where)


@dataclass
class Pairs:
    """Every (annotation, detection) pair of an image, grouped by annotation, and their IoU."""

    ann: np.ndarray  # int64 [P]
    det: np.ndarray  # int64 [P]
    counts: np.ndarray  # int64 [N]: pairs per annotation
    iou: np.ndarray  # float64 [P]


def all_pairs(anns: Annotations, dets: Detections, num_images: int) -> Pairs:
    ann, det = image_pairs(anns.image, dets.image, num_images)
    counts = np.bincount(ann, minlength=len(anns.image)) if len(ann) else np.zeros(len(anns.image), np.int64)
    return Pairs(ann, det, counts, pair_iou(anns.boxes[ann], dets.boxes[det]))


def class_quantiles(values: np.ndarray, labels: np.ndarray, num_classes: int, min_count: int,
                    q: float = 0.5) -> np.ndarray:
    """Per class the q-quantile of ``values`` (linear interpolation, as np.quantile; one sort over all of
    them); a class with fewer than ``min_count`` values gets the quantile over all (1 when there are none)."""
    pooled = float(np.quantile(values, q)) if len(values) else 1.0
    out = np.full(num_classes, pooled)
    order = np.lexsort((values, labels))
    v, n = values[order], np.bincount(labels, minlength=num_classes)
    start = np.cumsum(n) - n
    ok = n >= max(min_count, 1)
    at = q * (n[ok] - 1)
    lo = np.floor(at).astype(np.int64)
    hi = np.minimum(lo + 1, n[ok] - 1)
    frac = at - lo
    out[ok] = (1 - frac) * v[start[ok] + lo] + frac * v[start[ok] + hi]
    return out


def calibrate(anns: Annotations, dets: Detections, pairs: Pairs, cfg: ScoreConfig) -> tuple[Detections, np.ndarray]:
    """p'_d = min(1, p_d / r_{c_d}), r_c the median (``calibration_quantile``) of b(a) =
    max_{d: c_d = c_a, u >= tau_loc} p_d over class c's non-crowd annotations that have such a d
    (docs/audit.md, "Calibration first"); returns the rescaled detections and r by label (all 1 with
    ``calibration="none"``)."""
    num_classes = int(max(anns.labels.max(initial=-1), dets.labels.max(initial=-1))) + 1
    if cfg.calibration == "none":
        return dets, np.ones(num_classes)
    a, d = pairs.ann, pairs.det
    match = (dets.labels[d] == anns.labels[a]) & (pairs.iou >= cfg.tau_loc)
    best, _ = _masked_max(dets.scores[d], match, pairs.counts)
    has = np.zeros(len(anns.image), bool)
    has[a[match]] = True
    has &= ~anns.crowd
    ref = class_quantiles(best[has], anns.labels[has], num_classes, cfg.calibration_min, cfg.calibration_quantile)
    ref = np.maximum(ref, 1e-12)
    scores = np.minimum(1.0, dets.scores / ref[dets.labels]) if len(dets.labels) else dets.scores
    return Detections(dets.image, dets.boxes, scores, dets.labels, dets.std), ref


def annotation_quantities(
    anns: Annotations, dets: Detections, pairs: Pairs, cfg: ScoreConfig
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """q_same, q_near, q_other, q_any per annotation; the detection behind q_near and q_other (-1: none);
    and each detection's largest IoU with any annotation of its image (crowd included)."""
    ann, det, counts, iou = pairs.ann, pairs.det, pairs.counts, pairs.iou
    p = dets.scores[det]
    same_class = dets.labels[det] == anns.labels[ann]
    near = iou >= cfg.tau_low
    pi = np.zeros(len(ann))
    close = same_class & near
    std = dets.std[det[close]] if dets.std is not None else None
    pi[close] = same_place(anns.boxes[ann[close]], dets.boxes[det[close]], iou[close], std, cfg)
    q: dict[str, np.ndarray] = {}
    which: dict[str, np.ndarray] = {}
    q["same"], _ = _masked_max(p * pi, close, counts)
    q["near"], at_near = _masked_max(p * (1 - pi), close, counts)
    q["other"], at_other = _masked_max(p, ~same_class & (iou >= cfg.tau_loc), counts)
    q["any"], _ = _masked_max(p, near, counts)
    which["near"] = np.where(at_near >= 0, det[np.maximum(at_near, 0)], -1) if len(det) else at_near
    which["other"] = np.where(at_other >= 0, det[np.maximum(at_other, 0)], -1) if len(det) else at_other
    covered = np.zeros(len(dets.image))
    if len(det):
        np.maximum.at(covered, det, iou)
    return q, which, covered


def propose_missing(dets: Detections, covered: np.ndarray, cfg: ScoreConfig) -> Detections:
    """Detections over no annotation (IoU < tau_low with all) with score >= missing_min, after
    class-agnostic NMS within each image: the objects the labels may have overlooked."""
    import torch
    from torchvision.ops import nms

    keep = np.flatnonzero((covered < cfg.tau_low) & (dets.scores >= cfg.missing_min))
    # NMS image by image (keep is sorted by image): torchvision's batched_nms on CPU either scans every box
    # per image or runs one quadratic NMS over all of them
    bounds = np.flatnonzero(np.diff(dets.image[keep])) + 1
    kept = []
    for group in np.split(keep, bounds) if len(keep) else []:
        if len(group) == 1:
            kept.append(group)
            continue
        boxes, scores = torch.from_numpy(dets.boxes[group]), torch.from_numpy(dets.scores[group])
        kept.append(group[np.sort(nms(boxes, scores, cfg.missing_nms).numpy())])
    keep = np.concatenate(kept) if kept else keep
    return Detections(dets.image[keep], dets.boxes[keep], dets.scores[keep], dets.labels[keep])


def score_annotations(
    anns: Annotations, dets: Detections, num_images: int, threshold: float = 0.5, cfg: ScoreConfig | None = None
) -> AuditScores:
    """Every annotation's scores, issue and suggestion; the proposed missing objects; each image's score."""
    cfg = cfg or ScoreConfig()
    for name, arr in (("annotations", anns.image), ("detections", dets.image)):
        if len(arr) and np.any(np.diff(arr) < 0):
            raise ValueError(f"score_annotations: {name} must be sorted by image")
    pairs = all_pairs(anns, dets, num_images)
    dets, reference = calibrate(anns, dets, pairs, cfg)
    q, which, covered = annotation_quantities(anns, dets, pairs, cfg)
    scored = ~anns.crowd
    parts = {
        "class": q["other"] * (1 - q["same"]),
        "box": q["near"] * (1 - q["same"]),
        "spurious": 1 - q["any"],
    }
    stacked = np.stack([parts["class"], parts["box"], parts["spurious"]], axis=1)
    score = stacked.max(axis=1) if len(stacked) else np.zeros(0)
    if anns.loss is not None and cfg.loss_weight > 0:
        score = (1 - cfg.loss_weight) * score + cfg.loss_weight * loss_rank(anns.loss, scored)
    score = np.where(scored, np.clip(score, 0.0, 1.0), 0.0)
    issue = np.where(scored & (score >= threshold), 1 + (stacked.argmax(axis=1) if len(stacked) else 0), 0)
    suggested_label = np.where((issue == 1) & (which["other"] >= 0), dets.labels[np.maximum(which["other"], 0)]
                               if len(dets.labels) else -1, -1)
    suggested_box = np.full((len(score), 4), np.nan)
    rebox = (issue == 2) & (which["near"] >= 0)
    suggested_box[rebox] = dets.boxes[which["near"][rebox]]
    missing = propose_missing(dets, covered, cfg)
    image_score = np.zeros(num_images)
    np.maximum.at(image_score, anns.image, score)
    np.maximum.at(image_score, missing.image, missing.scores)
    return AuditScores(parts, score, issue.astype(np.int64), suggested_label.astype(np.int64), suggested_box,
                       missing, image_score, {f"q_{k}": v for k, v in q.items()}, reference)
