"""Ultralytics YOLO datasets (``data.yaml`` + ``images/`` + ``labels/``) turned into a COCO dict."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml

from robustdet.data.headers import cache_file, read_header, read_headers
from robustdet.data.schema import (
    ErrorList,
    annotation_record,
    categories_from_names,
    check_image_file,
    check_image_root,
    validate_coco,
)
from robustdet.data.source import FileSource
from robustdet.errors import DatasetError

# The Ultralytics image suffixes that torchvision.io or PIL can decode here (no DNG/HEIC/PFM/MPO).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})


def header_size(path: Path) -> tuple[int, int]:
    """(width, height) as the image will be decoded, EXIF orientation applied, read without decoding."""
    width, height, _ = read_header(path)
    return width, height


def _names(cfg: dict[str, Any], source: str) -> list[str]:
    names = cfg.get("names")
    if isinstance(names, dict):
        keys = sorted(names)
        if not all(isinstance(k, int) for k in keys) or keys != list(range(len(keys))):
            raise DatasetError(f"{source}: 'names' keys must be the class ids 0..{len(keys) - 1}, got {keys}")
        names = [names[k] for k in keys]
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{source}: 'names' must be a non-empty list or a dict of class id -> name")
    if not all(isinstance(n, str | int) and not isinstance(n, bool) for n in names):
        raise DatasetError(f"{source}: 'names' must hold strings")
    nc = cfg.get("nc")
    if nc is not None and nc != len(names):
        raise DatasetError(f"{source}: 'nc' is {nc} but 'names' has {len(names)} entries")
    return [str(n) for n in names]


def _label_path(image: Path, source: str) -> Path:
    parts = list(image.parts)
    # the last 'images' component, as Ultralytics' img2label_paths does
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    raise DatasetError(
        f"{source}: {image} has no 'images' folder in its path, so its labels/ file cannot be found"
    )


def _parse_labels(label: Path, width: int, height: int, num_classes: int, errors: ErrorList) -> list[Any]:
    """[(class_id, [x, y, w, h] in pixels), ...]; a missing label file means an image without objects."""
    try:
        text = label.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        errors.add(f"{label}: cannot read the label file ({exc})")
        return []
    boxes = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{label}:{lineno}"
        if len(fields) != 5:
            hint = " (polygon segment lines are not supported)" if len(fields) > 5 else ""
            errors.add(f"{where}: expected 5 fields 'class cx cy w h', got {len(fields)}{hint}")
            continue
        try:
            values = [float(v) for v in fields]
        except ValueError:
            errors.add(f"{where}: fields must be numbers, got {line.strip()!r}")
            continue
        cls, cx, cy, w, h = values
        if not cls.is_integer() or not 0 <= cls < num_classes:
            errors.add(f"{where}: class {fields[0]} is not a class id in 0..{num_classes - 1}")
            continue
        if not all(math.isfinite(v) for v in values[1:]):
            errors.add(f"{where}: non-finite coordinate in {line.strip()!r}")
            continue
        if not all(0.0 <= v <= 1.0 for v in values[1:]):
            errors.add(f"{where}: coordinates must be normalized to [0, 1], got {line.strip()!r}")
            continue
        if w <= 0 or h <= 0:
            errors.add(f"{where}: box has non-positive {'width' if w <= 0 else 'height'}")
            continue
        # cx +- w/2 may leave [0, 1]; the dataset's out_of_image policy deals with that, as with COCO
        boxes.append((int(cls), [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]))
    return boxes


def _split_folders(cfg: dict[str, Any], split: str, root: Path, source: str) -> list[Path]:
    if split not in cfg or cfg[split] is None:
        keys = [k for k in ("train", "val", "test") if cfg.get(k)]
        raise DatasetError(f"{source}: no split {split!r} (it has {keys})")
    entries = cfg[split] if isinstance(cfg[split], list) else [cfg[split]]
    folders = []
    root_real = root.resolve()
    for entry in entries:
        if not isinstance(entry, str):
            raise DatasetError(f"{source}: {split}: expected a folder path, got {entry!r}")
        folder = root / entry
        if folder.suffix == ".txt":
            raise DatasetError(
                f"{source}: {split}: image list files ({entry}) are not supported; name a folder"
            )
        if not folder.is_dir():
            raise DatasetError(f"{source}: {split}: image folder {folder} not found")
        if not folder.resolve().is_relative_to(root_real):
            raise DatasetError(f"{source}: {split}: image folder {folder} is outside the dataset root {root}")
        folders.append(folder)
    return folders


class YoloSource(FileSource):
    """``format: yolo``: ``path`` is the Ultralytics data.yaml, ``split`` its key (train/val/test); the
    image headers are read while loading, so ``verify_headers`` stays off."""

    format: Literal["yolo"] = "yolo"

    def load(self, split: str, cache_dir: str | Path | None = None) -> tuple[dict[str, Any], Path]:
        return load_yolo(self.path or "", split, self.image_root, cache_dir)


def load_yolo(
    data_yaml: str | Path, split: str, image_root: str | Path | None = None, cache_dir: str | Path | None = None
) -> tuple[dict[str, Any], Path]:
    """Read one split of an Ultralytics dataset as a COCO dict; the image root is the dataset root.

    ``path`` in data.yaml, when relative, is taken relative to the data.yaml's folder (Ultralytics
    takes it relative to its datasets dir); ``image_root`` replaces it. Category ids are the YOLO class
    ids + 1 (so COCO ids start at 1 and their sorted order is the YOLO class order); image ids are
    1..N in sorted file order; ``file_name`` is the path relative to the dataset root. The image
    sizes come from the headers, read on rank 0 and cached in ``cache_dir`` (see data/headers.py).
    """
    data_yaml = Path(data_yaml)
    source = str(data_yaml)
    try:
        cfg = yaml.safe_load(data_yaml.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{source}: file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DatasetError(f"{source}: cannot read it as YAML ({exc})") from None
    if not isinstance(cfg, dict):
        raise DatasetError(f"{source}: the top level must be a mapping")
    names = _names(cfg, source)
    root = Path(image_root) if image_root is not None else data_yaml.parent / str(cfg.get("path") or ".")
    root_real = check_image_root(root, source)

    files: list[Path] = []
    for folder in _split_folders(cfg, split, root, source):
        files.extend(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    rel_names = sorted({os.path.relpath(p, root) for p in files})
    if not rel_names:
        raise DatasetError(f"{source}: split {split!r} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")

    errors = ErrorList()
    usable: list[tuple[int, str]] = []
    for image_id, file_name in enumerate(rel_names, start=1):
        problem = check_image_file(root, root_real, file_name, f"{source}: {split}")
        if problem:
            errors.add(problem)
        else:
            usable.append((image_id, file_name))
    paths = [str(root / file_name) for _, file_name in usable]
    headers = read_headers(paths, cache_file(cache_dir, source, str(root)))
    images, annotations = [], []
    for (image_id, file_name), header in zip(usable, headers, strict=True):
        if isinstance(header, str):
            errors.add(header)
            continue
        width, height, _ = header
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for cls, bbox in _parse_labels(_label_path(root / file_name, source), width, height, len(names), errors):
            annotations.append(annotation_record(len(annotations) + 1, image_id, cls, bbox, 0))
    errors.raise_if_any()
    data = {
        "info": {"description": f"converted by robustdet from {data_yaml.name} split {split}"},
        "images": images,
        "annotations": annotations,
        "categories": categories_from_names(names),
    }
    # the files were checked above; this checks the generated entries with the same rules as COCO
    return validate_coco(data, source, root, check_files=False), root
