"""A split made of several sources (``data.train: [{format: voc, path: VOC2007, ...}, {format: voc, ...}]``),
merged into one COCO dict: VOC07+12 trainval, or two COCO jsons read as one training set.

The merged dict has unique image and annotation ids (each source's ids shifted past the previous sources'
largest), one category table (the first source's; the others' categories matched to it by name, and a
``DatasetError`` naming both sources when the class sets differ), and ``file_name``s relative to the
deepest folder that holds every source's image root.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robustdet.data.source import SourceSection
from robustdet.errors import DatasetError

# how messages name the sources of a merged split
SEPARATOR = " + "


def _names_by_id(data: dict[str, Any], source: str) -> dict[int, str]:
    names = {c["id"]: str(c["name"]) for c in data["categories"]}
    repeated = sorted({n for n in names.values() if list(names.values()).count(n) > 1})
    if repeated:
        # matching by name needs names that say which category they are
        raise DatasetError(f"{source}: category names {repeated} occur more than once; cannot merge by name")
    return names


def merge_coco(parts: Sequence[tuple[str, dict[str, Any], Path]]) -> tuple[dict[str, Any], Path]:
    """``[(source name, COCO dict, image root)]`` (each already validated) as one COCO dict and its image root.

    Categories are matched by name to the first source's table, whose ids and order are kept (so labels are
    those the first source alone would give). Ids are shifted, not renumbered: source k's image id i becomes
    i + (largest image id of sources 0..k-1), likewise annotation ids, so an id maps back to its source.
    """
    if not parts:
        raise DatasetError("merging a split: no sources given")
    first_name, first, _ = parts[0]
    first_names = _names_by_id(first, first_name)
    id_of_name = {name: cid for cid, name in first_names.items()}

    roots = [root.resolve() for _, _, root in parts]
    try:
        common = Path(os.path.commonpath([str(r) for r in roots]))
    except ValueError:  # e.g. two drives on Windows: no folder holds both
        raise DatasetError(
            f"{SEPARATOR.join(n for n, _, _ in parts)}: the image roots {[str(r) for r in roots]} share no folder"
        ) from None

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    image_offset = ann_offset = 0
    for (name, data, _), root in zip(parts, roots, strict=True):
        names = _names_by_id(data, name)
        if set(names.values()) != set(first_names.values()):
            only_here = sorted(set(names.values()) - set(first_names.values()))
            only_first = sorted(set(first_names.values()) - set(names.values()))
            raise DatasetError(
                f"{first_name} and {name} have different classes (only in {first_name}: {only_first}; only in "
                f"{name}: {only_here}); a merged split needs the same class names in every source"
            )
        category = {cid: id_of_name[n] for cid, n in names.items()}
        prefix = root.relative_to(common).as_posix()
        for img in data["images"]:
            file_name = img["file_name"] if prefix == "." else f"{prefix}/{img['file_name']}"
            images.append({**img, "id": img["id"] + image_offset, "file_name": file_name})
        for ann in data["annotations"]:
            annotations.append(
                {
                    **ann,
                    "id": ann["id"] + ann_offset,
                    "image_id": ann["image_id"] + image_offset,
                    "category_id": category[ann["category_id"]],
                }
            )
        image_offset += max((img["id"] for img in data["images"]), default=0)
        ann_offset += max((ann["id"] for ann in data["annotations"]), default=0)
    merged = {
        "info": {"description": f"merged by robustdet from {SEPARATOR.join(n for n, _, _ in parts)}"},
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in first["categories"]],
    }
    return merged, common


def as_sources(source: SourceSection | Sequence[SourceSection]) -> list[SourceSection]:
    """``data.train`` / ``data.val`` as a list of sources, whether the config gave one or several."""
    return [source] if isinstance(source, SourceSection) else list(source)


__all__ = ["SEPARATOR", "as_sources", "merge_coco"]
