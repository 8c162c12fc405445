"""The COCO-format dict every dataset is turned into: its validation, json reading, and the records loaders build.

Each loader (COCO, YOLO, VOC, synthetic) produces a plain COCO dict (``images``, ``annotations``,
``categories``) plus the folder its ``file_name``s are relative to, and ``validate_coco`` checks it
once, at load time, so that a bad dataset stops the run before the first iteration with a message
naming the file and the entry. This module knows no format (the ``coco`` format is ``data/coco.py``):
every format, the label noise and the dataset import it, and it imports only ``errors``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from pycocotools.coco import COCO

from robustdet.errors import DatasetError

# Problems listed in one DatasetError before the rest are only counted: enough to fix a batch of
# them at once, few enough to stay readable.
MAX_LISTED_ERRORS = 20


class ErrorList:
    """Collects independent per-entry problems so that one run reports many of them."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        self.messages.append(message)

    def raise_if_any(self) -> None:
        if not self.messages:
            return
        shown = self.messages[:MAX_LISTED_ERRORS]
        more = len(self.messages) - len(shown)
        text = "\n".join(shown) + (f"\n(and {more} more problems)" if more else "")
        raise DatasetError(text)


def is_number(value: Any) -> bool:
    # bool is an int subclass, and `true` as a coordinate is a data error, not 1
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_image_file(root: Path, root_real: Path, file_name: Any, where: str) -> str | None:
    """Why ``file_name`` cannot be used as an image under ``root``, or None when it can.

    Refuses names that leave the root (absolute, ``..``, or a symlink pointing out of it), so a
    dataset file can never make the loader read elsewhere on the machine; then a cheap stat for
    existence and non-zero size (decoding every image up front would cost as much as an epoch).
    """
    if not isinstance(file_name, str) or not file_name:
        return f"{where}: 'file_name' must be a non-empty string, got {file_name!r}"
    posix = PurePosixPath(file_name)
    if posix.is_absolute() or PureWindowsPath(file_name).is_absolute() or file_name.startswith("\\"):
        return f"{where}: file_name {file_name!r} is an absolute path; it must be relative to {root}"
    if ".." in posix.parts or ".." in PureWindowsPath(file_name).parts:
        return f"{where}: file_name {file_name!r} escapes the image root {root} ('..')"
    full = root / file_name
    real = full.resolve()
    if not real.is_relative_to(root_real):
        return f"{where}: file_name {file_name!r} resolves to {real}, outside the image root {root} (symlink)"
    try:
        st = real.stat()
    except OSError:
        return f"{where}: image file not found: {full}"
    if not os.path.isfile(real):
        return f"{where}: {full} is not a file"
    if st.st_size == 0:
        return f"{where}: image file is empty (0 bytes): {full}"
    return None


def check_image_root(image_root: Path, source: str) -> Path:
    if not image_root.is_dir():
        raise DatasetError(f"{source}: image root {image_root} is not a folder")
    return image_root.resolve()


def _require_list(data: dict[str, Any], key: str, source: str) -> list[Any]:
    if key not in data:
        raise DatasetError(
            f"{source}: missing top-level key {key!r} (a COCO json has images, annotations, categories)"
        )
    value = data[key]
    if not isinstance(value, list):
        raise DatasetError(f"{source}: {key!r} must be a list, got {type(value).__name__}")
    return value


def _records(
    items: list[Any], kind: str, source: str, errors: ErrorList, describe: Callable[[dict[str, Any]], str]
) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """``(where, id, record)`` of each entry of ``items`` (the json's ``kind`` list) that is an object with
    an integer ``id``; the others, and duplicate ids, are added to ``errors``. ``where`` names the entry by
    its index plus ``describe(entry)`` (e.g. its id and file name)."""
    seen: set[int] = set()
    for i, item in enumerate(items):
        where = f"{source}: {kind}[{i}]"
        if not isinstance(item, dict):
            errors.add(f"{where}: must be an object")
            continue
        rid = item.get("id")
        if not is_int(rid):
            errors.add(f"{where}: 'id' must be an integer, got {rid!r}")
            continue
        where += describe(item)
        if rid in seen:
            errors.add(f"{where}: duplicate {kind.removesuffix('s').replace('categorie', 'category')} id {rid}")
        seen.add(rid)
        yield where, rid, item


def _check_category(cat: dict[str, Any], where: str, errors: ErrorList) -> None:
    name = cat.get("name")
    if not isinstance(name, str) or not name:
        errors.add(f"{where} (id {cat['id']}): 'name' must be a non-empty string, got {name!r}")


def _check_image(img: dict[str, Any], where: str, files: tuple[Path, Path] | None, errors: ErrorList) -> None:
    for key in ("width", "height"):
        v = img.get(key)
        if not is_number(v) or not math.isfinite(v) or v <= 0 or v != int(v):
            errors.add(f"{where}: {key!r} must be a positive integer, got {v!r}")
    if files is not None:
        problem = check_image_file(files[0], files[1], img.get("file_name"), where)
        if problem:
            errors.add(problem)
    elif not isinstance(img.get("file_name"), str):
        errors.add(f"{where}: 'file_name' must be a string")


def _check_annotation(
    ann: dict[str, Any], where: str, image_ids: set[int], cat_ids: set[int], errors: ErrorList
) -> dict[str, Any] | None:
    """The normalised annotation, or None when its box is unusable (the problem is in ``errors``)."""
    out = dict(ann)
    iid, cid = ann.get("image_id"), ann.get("category_id")
    if iid not in image_ids or not is_int(iid):
        errors.add(f"{where}: image_id {iid!r} is not in 'images'")
    if cid not in cat_ids or not is_int(cid):
        errors.add(f"{where}: category_id {cid!r} is not in 'categories'")
    crowd = ann.get("iscrowd", 0)
    if crowd not in (0, 1):  # also admits True/False
        errors.add(f"{where}: 'iscrowd' must be 0 or 1, got {crowd!r}")
    out["iscrowd"] = int(crowd) if crowd in (0, 1) else 0
    box = ann.get("bbox")
    if not isinstance(box, list | tuple) or len(box) != 4 or not all(is_number(v) for v in box):
        errors.add(f"{where}: 'bbox' must be [x, y, width, height] numbers, got {box!r}")
        return None
    x, y, w, h = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        errors.add(f"{where}: box has non-finite coordinates {box}")
        return None
    if w <= 0:
        errors.add(f"{where}: box has non-positive width {w:g}")
    if h <= 0:
        errors.add(f"{where}: box has non-positive height {h:g}")
    out["bbox"] = [x, y, w, h]
    area = ann.get("area")
    if area is None:
        out["area"] = w * h
    elif not is_number(area) or not math.isfinite(area) or area < 0:
        errors.add(f"{where}: 'area' must be a finite number >= 0, got {area!r}")
    return out


def validate_coco(data: Any, source: str, image_root: Path, check_files: bool = True) -> dict[str, Any]:
    """Check a COCO detection dict and return a normalized copy (the input is not modified).

    Normalization: ``iscrowd`` defaults to 0 (and true/false become 1/0), a missing ``area`` becomes the
    box area (COCOeval needs it for its small/medium/large ranges), and ``bbox`` values become floats.
    Everything else, e.g. segmentation, is kept as it is. Every problem found is reported at once.
    """
    if not isinstance(data, dict):
        raise DatasetError(f"{source}: the top level must be a JSON object, got {type(data).__name__}")
    images_in = _require_list(data, "images", source)
    anns_in = _require_list(data, "annotations", source)
    cats_in = _require_list(data, "categories", source)
    errors = ErrorList()
    files = (image_root, check_image_root(image_root, source)) if check_files else None

    categories: list[dict[str, Any]] = []
    for where, _, cat in _records(cats_in, "categories", source, errors, lambda c: ""):
        _check_category(cat, where, errors)
        categories.append(dict(cat))
    if not cats_in:
        errors.add(f"{source}: 'categories' is empty; a detection dataset needs at least one class")
    images: list[dict[str, Any]] = []
    def image_name(img: dict[str, Any]) -> str:
        return f" (id {img['id']}, {img.get('file_name')!r})"

    for where, _, img in _records(images_in, "images", source, errors, image_name):
        _check_image(img, where, files, errors)
        images.append(dict(img))
    cat_ids = {c["id"] for c in categories}
    image_ids = {i["id"] for i in images}
    annotations: list[dict[str, Any]] = []
    for where, _, ann in _records(anns_in, "annotations", source, errors, lambda a: f" (id {a['id']})"):
        checked = _check_annotation(ann, where, image_ids, cat_ids, errors)
        if checked is not None:
            annotations.append(checked)

    errors.raise_if_any()
    result = {k: v for k, v in data.items() if k not in ("images", "annotations", "categories")}
    result.update(images=images, annotations=annotations, categories=categories)
    return result


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None


def coco_api(data: dict[str, Any]) -> COCO:
    """A ``pycocotools.coco.COCO`` over an in-memory dict, without its progress prints."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def annotation_record(ann_id: int, image_id: int, label: int, bbox: list[float], iscrowd: int = 0) -> dict[str, Any]:
    """One COCO annotation from a contiguous label 0..C-1 and an XYWH box (categories numbered 1..C)."""
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": label + 1,
        "bbox": bbox,
        "area": bbox[2] * bbox[3],
        "iscrowd": iscrowd,
    }


def categories_from_names(names: Iterable[str]) -> list[dict[str, Any]]:
    """COCO categories with ids 1..C, so that sorted id order is the order of ``names``."""
    return [{"id": i + 1, "name": name, "supercategory": ""} for i, name in enumerate(names)]


__all__ = [
    "MAX_LISTED_ERRORS",
    "ErrorList",
    "annotation_record",
    "categories_from_names",
    "check_image_file",
    "check_image_root",
    "coco_api",
    "is_int",
    "is_number",
    "read_json",
    "validate_coco",
]
