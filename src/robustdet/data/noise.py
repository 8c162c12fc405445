"""Synthetic label noise on training annotations: class flips, box jitter, dropped and spurious boxes.

Applied once, to the COCO dict a training dataset is built from (``build_dataset``) or to a json file
(``robustdet noise``); the noisy labels are then fixed for the whole run, like the noise of a real
dataset, not re-drawn each epoch. Every random draw of an annotation comes from a hash of
(seed, kind, annotation id), so the result does not depend on the order of the annotations, on the
rank that builds the dataset or on a resume. See docs/data.md ("Label noise").
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationError

from robustdet.data.schema import read_json, validate_coco
from robustdet.errors import ConfigError
from robustdet.files import write_json_atomic
from robustdet.section import Section

NOISE_KINDS = ("class_flip", "box_jitter", "drop", "spurious")

# a jittered or clipped box keeps at least this width and height (pixels)
MIN_BOX_SIDE = 1.0


class LabelNoiseConfig(Section):
    """``data.train.label_noise``: the rates of each kind of noise (all 0 by default)."""

    # probability that a (kept) box gets another class
    class_flip: float = Field(0.0, ge=0, le=1)
    # uniform: any other class; pairs: the fixed partner of flip_partners
    flip_mode: Literal["uniform", "pairs"] = "uniform"
    # r: each edge moves by U(-r, r) times the box's width (x edges) or height (y edges)
    box_jitter: float = Field(0.0, ge=0, le=1)
    # the category ids whose boxes are jittered (None: every box): noise on one class only, to see whether
    # a per-box σ picks out that class (issue 16 §3)
    box_jitter_classes: list[int] | None = None
    # probability that a box is removed
    drop: float = Field(0.0, ge=0, le=1)
    # expected number of added boxes per existing box (each box spawns one with this probability)
    spurious: float = Field(0.0, ge=0, le=1)
    seed: int = 0


def label_noise_config(values: dict[str, Any], name_of: Callable[[str], str] = str) -> LabelNoiseConfig:
    """Validate ``values``; a bad one is a ConfigError naming it as ``name_of(field)`` (e.g. a CLI flag)."""
    try:
        return LabelNoiseConfig.model_validate(values)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = name_of(".".join(str(p) for p in err["loc"])) if err["loc"] else "label_noise"
            lines.append(f"{key}: {'unknown key' if err['type'] == 'extra_forbidden' else err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def flip_partners(num_classes: int) -> list[int]:
    """The confusable partner of each label 0..C-1 for ``flip_mode: pairs``: 0<->1, 2<->3, ...

    With an odd C the last label has no pair of its own and flips to its neighbour C-2 (whose own
    partner stays C-3). Labels are in order of sorted category id, as in ``DetectionDataset``.
    """
    if num_classes < 2:
        raise ValueError(f"flip_partners: need at least 2 classes, got {num_classes}")
    return [k ^ 1 if k ^ 1 < num_classes else k - 1 for k in range(num_classes)]


def _uniforms(seed: int, kind: str, ann_ids: Sequence[int], n: int) -> np.ndarray:
    """[len(ann_ids), n] independent U[0, 1) draws; row i depends on (seed, kind, ann_ids[i]) only.

    The construction of ``loader.hash63`` (BLAKE2b over a domain-tagged text, little-endian words),
    with an 8n-byte digest so one hash gives an annotation's n draws; 53 bits each, a double's precision.
    """
    blob = b"".join(
        hashlib.blake2b(f"robustdet.noise.{kind}:{seed},{int(i)}".encode(), digest_size=8 * n).digest() for i in ann_ids
    )
    words = np.frombuffer(blob, dtype="<u8").reshape(len(ann_ids), n)
    return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _jitter_axis(
    lo: np.ndarray, hi: np.ndarray, d_lo: np.ndarray, d_hi: np.ndarray, limit: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Move the edges of one axis by d x the side, clip to [0, limit], keep at least MIN_BOX_SIDE."""
    side = hi - lo
    moved_lo, moved_hi = lo + d_lo * side, hi + d_hi * side
    new_lo, new_hi = np.clip(moved_lo, 0.0, limit), np.clip(moved_hi, 0.0, limit)
    min_side = np.minimum(MIN_BOX_SIDE, limit)
    # crossed or collapsed edges (possible for r > 0.5) or a box pushed against the border: a minimal
    # box around where the moved edges met, shifted back into the image
    centre = np.clip((moved_lo + moved_hi) / 2, min_side / 2, limit - min_side / 2)
    small = new_hi - new_lo < min_side
    return np.where(small, centre - min_side / 2, new_lo), np.where(small, centre + min_side / 2, new_hi)


@dataclass(frozen=True)
class _Boxes:
    """The non-crowd annotations of a dataset, sorted by id, as arrays (what every kind of noise draws on)."""

    annotations: list[dict[str, Any]]
    ids: list[int]
    boxes: np.ndarray  # [n, 4] x, y, w, h
    labels: np.ndarray  # [n] contiguous labels 0..C-1 (sorted category id order)
    image_wh: np.ndarray  # [n, 2] the size of each box's image
    categories: list[int]  # sorted category ids: label k is categories[k]

    @classmethod
    def of(cls, data: dict[str, Any]) -> _Boxes:
        categories = sorted(c["id"] for c in data["categories"])
        label_of = {cid: k for k, cid in enumerate(categories)}
        sizes = {img["id"]: (float(img["width"]), float(img["height"])) for img in data["images"]}
        # sorted by id, so that nothing below depends on the order of the list
        eligible = sorted((a for a in data["annotations"] if not a["iscrowd"]), key=lambda a: a["id"])
        n = len(eligible)
        return cls(
            annotations=eligible,
            ids=[a["id"] for a in eligible],
            boxes=np.array([a["bbox"] for a in eligible], dtype=np.float64).reshape(n, 4),
            labels=np.array([label_of[a["category_id"]] for a in eligible], dtype=np.int64),
            image_wh=np.array([sizes[a["image_id"]] for a in eligible], dtype=np.float64).reshape(n, 2),
            categories=categories,
        )


def _flips(
    cfg: LabelNoiseConfig, b: _Boxes, kept: np.ndarray, partners: list[int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Which kept boxes change class, and every box's label after the flips."""
    if cfg.class_flip <= 0:
        return np.zeros(len(b.ids), dtype=bool), b.labels
    num_classes = len(b.categories)
    u = _uniforms(cfg.seed, "class_flip", b.ids, 2)
    flipped = kept & (u[:, 0] < cfg.class_flip)
    if partners is not None:
        other = np.asarray(partners, dtype=np.int64)[b.labels]
    else:  # uniform over the C - 1 other classes
        other = (b.labels + 1 + (u[:, 1] * (num_classes - 1)).astype(np.int64)) % num_classes
    return flipped, np.where(flipped, other, b.labels)


def _jitter(cfg: LabelNoiseConfig, b: _Boxes, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Which boxes moved, every box after the jitter, and the sum over moved boxes of |edge shifts| / side."""
    if cfg.box_jitter <= 0:
        return np.zeros(len(b.ids), dtype=bool), b.boxes, 0.0
    if cfg.box_jitter_classes is not None:
        labels = [b.categories.index(c) for c in cfg.box_jitter_classes]
        kept = kept & np.isin(b.labels, labels)
    d = cfg.box_jitter * (2 * _uniforms(cfg.seed, "box_jitter", b.ids, 4) - 1)
    x, y, w, h = b.boxes.T
    x1, x2 = _jitter_axis(x, x + w, d[:, 0], d[:, 1], b.image_wh[:, 0])
    y1, y2 = _jitter_axis(y, y + h, d[:, 2], d[:, 3], b.image_wh[:, 1])
    moved = (np.abs(x1 - x) + np.abs(x2 - x - w)) / w + (np.abs(y1 - y) + np.abs(y2 - y - h)) / h
    new_boxes = np.where(kept[:, None], np.stack([x1, y1, x2 - x1, y2 - y1], axis=1), b.boxes)
    return kept, new_boxes, float(moved[kept].sum())


def _spurious(cfg: LabelNoiseConfig, b: _Boxes, next_id: int) -> list[dict[str, Any]]:
    """The added boxes: each annotation spawns one with probability ``spurious`` (ids from ``next_id`` on)."""
    n = len(b.ids)
    if cfg.spurious <= 0 or not n:
        return []
    u = _uniforms(cfg.seed, "spurious", b.ids, 5)
    pick = (u[:, 2] * n).astype(np.int64)
    w = np.minimum(np.maximum(b.boxes[pick, 2], MIN_BOX_SIDE), b.image_wh[:, 0])
    h = np.minimum(np.maximum(b.boxes[pick, 3], MIN_BOX_SIDE), b.image_wh[:, 1])
    x, y = u[:, 3] * (b.image_wh[:, 0] - w), u[:, 4] * (b.image_wh[:, 1] - h)
    cls = (u[:, 1] * len(b.categories)).astype(np.int64)
    added: list[dict[str, Any]] = []
    for i in np.flatnonzero(u[:, 0] < cfg.spurious).tolist():
        bbox = [float(x[i]), float(y[i]), float(w[i]), float(h[i])]
        added.append(
            {
                "id": next_id + len(added),
                "image_id": b.annotations[i]["image_id"],
                "category_id": b.categories[int(cls[i])],
                "bbox": bbox,
                "area": bbox[2] * bbox[3],
                "iscrowd": 0,
            }
        )
    return added


def _changed_annotations(
    b: _Boxes, dropped: np.ndarray, flipped: np.ndarray, jittered: np.ndarray, boxes: np.ndarray, labels: np.ndarray
) -> dict[int, dict[str, Any] | None]:
    """Annotation id -> its noisy record (None: dropped), for the annotations that changed."""
    replaced: dict[int, dict[str, Any] | None] = {b.ids[i]: None for i in np.flatnonzero(dropped).tolist()}
    changed = np.flatnonzero(flipped | jittered)
    # whole arrays to Python lists at once: element-wise numpy access costs more than the noise itself
    changed_boxes, changed_labels = boxes[changed].tolist(), labels[changed].tolist()
    for i, bbox, label, moved_box in zip(
        changed.tolist(), changed_boxes, changed_labels, jittered[changed].tolist(), strict=True
    ):
        ann = b.annotations[i]
        replaced[b.ids[i]] = {
            **ann,
            "category_id": b.categories[label],
            "bbox": bbox,
            "area": bbox[2] * bbox[3] if moved_box else ann["area"],
        }
    return replaced


def _noise_report(
    cfg: LabelNoiseConfig, source: str, b: _Boxes, total: int, masks: dict[str, np.ndarray], shift: float,
    added: list[dict[str, Any]], partners: list[int] | None,
) -> dict[str, Any]:
    """What ``apply_label_noise`` changed: requested and realised rates, counts, changed and added ids."""
    n = len(b.ids)
    counts = {kind: int(mask.sum()) for kind, mask in masks.items()}
    counts["spurious"] = len(added)
    n_kept = n - counts["drop"]
    return {
        "source": source,
        "requested": cfg.model_dump(mode="json"),
        "realised": {
            "class_flip": counts["class_flip"] / n_kept if n_kept else 0.0,
            "box_jitter": 2 * shift / (4 * counts["box_jitter"]) if counts["box_jitter"] else 0.0,
            "drop": counts["drop"] / n if n else 0.0,
            "spurious": counts["spurious"] / n if n else 0.0,
        },
        "annotations": n,
        "crowd_untouched": total - n,
        "counts": {kind: counts[kind] for kind in NOISE_KINDS},
        "flip_pairs": [[b.categories[k], b.categories[p]] for k, p in enumerate(partners)] if partners else None,
        "changed": {kind: [b.ids[i] for i in np.flatnonzero(mask).tolist()] for kind, mask in masks.items()},
        "added": [a["id"] for a in added],
    }


def apply_label_noise(
    data: dict[str, Any], cfg: LabelNoiseConfig, source: str = "dataset"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A noisy copy of a validated COCO dict (the input is not modified) and the report of what changed.

    Per non-crowd annotation (crowd regions are left as they are), each kind with its own draws:

    1. drop: removed with probability ``drop``;
    2. class_flip: a kept box changes class with probability ``class_flip``, to a uniformly drawn other
       class (``uniform``) or to its fixed partner (``pairs``, see ``flip_partners``);
    3. box_jitter: each edge of a kept box moves by U(-r, r) times the box's width (left, right) or
       height (top, bottom), then the box is clipped to the image, keeping at least 1 px a side; with
       ``box_jitter_classes`` only the boxes of those category ids (the others keep their boxes);
    4. spurious: with probability ``spurious`` the annotation (dropped or not) spawns a new box in its
       image, of a uniformly drawn class, with the width and height of a uniformly drawn annotation of
       the dataset (shrunk to the image if larger), placed uniformly inside the image. New ids follow
       the largest existing id, in order of the spawning annotation's id.

    The report holds the requested and realised rates, the changed ids per kind and the added ids.
    Realised ``box_jitter`` is 2 x the mean |edge shift| / side over the jittered boxes (the mean of
    |U(-r, r)| is r/2), measured on the final, clipped boxes.
    """
    num_classes = len(data["categories"])
    if cfg.class_flip > 0 and num_classes < 2:
        raise ConfigError(
            f"label_noise.class_flip={cfg.class_flip}: {source} has a single category, there is nothing to flip to"
        )
    partners = flip_partners(num_classes) if cfg.flip_mode == "pairs" and num_classes >= 2 else None
    b = _Boxes.of(data)
    unknown = sorted(set(cfg.box_jitter_classes or ()) - set(b.categories))
    if unknown:
        raise ConfigError(
            f"label_noise.box_jitter_classes: category id(s) {unknown} are not in {source} "
            f"(its categories: {b.categories})"
        )
    dropped = _uniforms(cfg.seed, "drop", b.ids, 1)[:, 0] < cfg.drop if cfg.drop > 0 else np.zeros(len(b.ids), bool)
    flipped, labels = _flips(cfg, b, ~dropped, partners)
    jittered, boxes, shift = _jitter(cfg, b, ~dropped)
    added = _spurious(cfg, b, max((a["id"] for a in data["annotations"]), default=0) + 1)
    replaced = _changed_annotations(b, dropped, flipped, jittered, boxes, labels)
    annotations = [replaced.get(a["id"], a) for a in data["annotations"]]
    annotations = [a for a in annotations if a is not None] + added
    masks = {"class_flip": flipped, "box_jitter": jittered, "drop": dropped}
    report = _noise_report(cfg, source, b, len(data["annotations"]), masks, shift, added, partners)
    return {**data, "annotations": annotations}, report


def apply_source_noise(
    data: dict[str, Any], noise: LabelNoiseConfig | None, source: str, train: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``build_dataset``'s step: the noisy training dict and its report, or ``data`` untouched."""
    if noise is None:
        return data, None
    if not train:
        raise ConfigError(f"{source}: label_noise is for training data only; the validation split is never noised")
    return apply_label_noise(data, noise, source)


def write_noise_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write the report of ``apply_label_noise`` (a run's ``label_noise.json``), atomically."""
    return write_json_atomic(path, report)


def sidecar_path(dst: str | Path) -> Path:
    """Where ``robustdet noise`` puts the report of DST: ``DST-stem.label_noise.json`` next to it."""
    dst = Path(dst)
    return dst.with_name(f"{dst.stem}.label_noise.json")


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def noise_coco_file(src: str | Path, dst: str | Path, cfg: LabelNoiseConfig) -> tuple[Path, dict[str, Any]]:
    """Write a noisy copy of the COCO json ``src`` to ``dst`` and its report next to it; ``src`` is only read.

    Returns the report's path and the report. Image files are not needed (nor checked).
    """
    src, dst = Path(src), Path(dst)
    sidecar = sidecar_path(dst)
    for out in (dst, sidecar):
        if _same_file(src, out):
            raise ConfigError(f"noise: {out} is the source {src}; write the noisy copy to another file")
    data = validate_coco(read_json(src), str(src), src.parent, check_files=False)
    noisy, report = apply_label_noise(data, cfg, str(src))
    write_json_atomic(dst, noisy, indent=None)
    write_noise_report(report, sidecar)
    return sidecar, report


__all__ = [
    "NOISE_KINDS",
    "LabelNoiseConfig",
    "apply_label_noise",
    "apply_source_noise",
    "flip_partners",
    "label_noise_config",
    "noise_coco_file",
    "sidecar_path",
    "write_noise_report",
]
