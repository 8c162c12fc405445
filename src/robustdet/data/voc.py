"""Pascal VOC (``VOCdevkit/VOC20xx``: ImageSets/Main, Annotations, JPEGImages) turned into a COCO dict."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Literal
from xml.etree.ElementTree import Element, ParseError

import defusedxml
import defusedxml.ElementTree as SafeET
from pydantic import field_validator

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

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def _text(node: Element, tag: str, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DatasetError(f"{where}: missing <{tag}>")
    return child.text.strip()


def _number(node: Element, tag: str, where: str) -> float:
    raw = _text(node, tag, where)
    try:
        value = float(raw)
    except ValueError:
        raise DatasetError(f"{where}: <{tag}> must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise DatasetError(f"{where}: <{tag}> is not finite ({raw})")
    return value


def _parse_xml(xml_path: Path) -> Element:
    try:
        return SafeET.parse(xml_path).getroot()
    except FileNotFoundError:
        raise DatasetError(f"{xml_path}: annotation file not found") from None
    except defusedxml.DefusedXmlException as exc:
        # entity declarations (billion laughs, external entities) are never needed by VOC annotations
        raise DatasetError(f"{xml_path}: refused unsafe XML ({type(exc).__name__}: {exc})") from None
    except ParseError as exc:
        raise DatasetError(f"{xml_path}: not well-formed XML ({exc})") from None
    except OSError as exc:
        raise DatasetError(f"{xml_path}: cannot read ({exc.strerror})") from None


def _objects(
    root: Element, xml_path: Path, class_index: dict[str, int]
) -> list[tuple[int, list[float], int]]:
    """[(class index, [x, y, w, h], difficult)] with VOC's 1-based inclusive pixel coordinates converted.

    As in detectron2: x1 - 1 and y1 - 1, x2 and y2 kept, so a box spanning pixels 1..W becomes [0, W].
    """
    out = []
    for k, obj in enumerate(root.findall("object")):
        where = f"{xml_path}: object[{k}]"
        name = _text(obj, "name", where)
        if name not in class_index:
            raise DatasetError(f"{where}: unknown class {name!r} (expected one of {sorted(class_index)})")
        where = f"{where} ({name})"
        difficult_node = obj.find("difficult")
        difficult = 0
        if difficult_node is not None and difficult_node.text and difficult_node.text.strip():
            try:
                difficult = int(difficult_node.text.strip())
            except ValueError:
                raise DatasetError(
                    f"{where}: <difficult> must be 0 or 1, got {difficult_node.text!r}"
                ) from None
        box = obj.find("bndbox")
        if box is None:
            raise DatasetError(f"{where}: missing <bndbox>")
        x1, y1, x2, y2 = (_number(box, t, where) for t in ("xmin", "ymin", "xmax", "ymax"))
        x1, y1 = x1 - 1, y1 - 1
        if x2 <= x1 or y2 <= y1:
            dim = "width" if x2 <= x1 else "height"
            raise DatasetError(
                f"{where}: box has non-positive {dim} (xmin..xmax {x1 + 1:g}..{x2:g}, "
                f"ymin..ymax {y1 + 1:g}..{y2:g})"
            )
        out.append((class_index[name], [x1, y1, x2 - x1, y2 - y1], 1 if difficult else 0))
    return out


class VocSource(FileSource):
    """``format: voc``: ``path`` is a VOCdevkit/VOC20xx folder, ``split`` its ImageSets/Main list
    (train/val/trainval/test); ``image_root`` defaults to its JPEGImages; ``class_names`` the classes in
    label order (None: every ``<name>`` of the split's XML files, sorted, and said once on the console)."""

    format: Literal["voc"] = "voc"
    class_names: list[str] | None = None
    verify_headers: ClassVar[bool] = True

    @field_validator("class_names")
    @classmethod
    def _check_names(cls, names: list[str] | None) -> list[str] | None:
        if names is not None:
            if not names or any(not n.strip() for n in names):
                raise ValueError("give a non-empty list of non-empty class names")
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"{repeated} listed more than once")
        return names

    def load(self, split: str, cache_dir: str | Path | None = None) -> tuple[dict[str, Any], Path]:
        coco, root = load_voc(self.path or "", split, class_names=self.class_names, image_root=self.image_root)
        if self.class_names is None and os.environ.get("RANK", "0") == "0":
            names = [c["name"] for c in coco["categories"]]
            # said once per source, on rank 0: a user who labelled with LabelImg sees which classes (and
            # which label order) the model gets, and a typo'd class shows up as an extra name
            print(
                f"robustdet: {self.path} {split}: {len(names)} classes read from the XML files (sorted; set "
                f"class_names to fix them): {', '.join(names)}",
                file=sys.stderr,
                flush=True,
            )
        return coco, root


def xml_class_names(roots: Iterable[Element]) -> list[str]:
    """Every object ``<name>`` in the parsed VOC annotations, sorted (a stable label order that does not
    depend on which image names a class first); objects without a name are reported by the loader."""
    names = set()
    for node in roots:
        for obj in node.findall("object"):
            name = obj.find("name")
            if name is not None and name.text and name.text.strip():
                names.add(name.text.strip())
    return sorted(names)


def _split_stems(split_file: Path, voc_root: Path) -> list[str]:
    """The image stems an ImageSets/Main list names, one a line (a second column, VOC's -1/1, is ignored)."""
    try:
        stems = [
            line.split()[0] for line in split_file.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
    except FileNotFoundError:
        raise DatasetError(
            f"{split_file}: split file not found (is {voc_root} a VOCdevkit/VOC20xx folder?)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{split_file}: cannot read ({exc})") from None
    if not stems:
        raise DatasetError(f"{split_file}: lists no images")
    return stems


def _image_size(node: Element, xml_path: Path) -> tuple[int, int]:
    size = node.find("size")
    if size is None:
        raise DatasetError(f"{xml_path}: missing <size>")
    width, height = (_number(size, t, f"{xml_path}: <size>") for t in ("width", "height"))
    if width <= 0 or height <= 0 or not width.is_integer() or not height.is_integer():
        raise DatasetError(f"{xml_path}: <size> must hold positive integers, got {width:g}x{height:g}")
    return int(width), int(height)


def _parse_images(
    voc_root: Path, split_file: Path, stems: list[str], root: Path, errors: ErrorList
) -> list[tuple[dict[str, Any], Path, Element]]:
    """(COCO image, XML path, parsed XML) of every listed image whose file and XML (size) are usable; the
    others are added to ``errors``. Image ids are 1..N in the order of the split file."""
    root_real = check_image_root(root, str(voc_root))
    annotations_dir = (voc_root / "Annotations").resolve()
    parsed: list[tuple[dict[str, Any], Path, Element]] = []
    for image_id, stem in enumerate(stems, start=1):
        where = f"{split_file}: line {image_id} ({stem!r})"
        file_name = f"{stem}.jpg"
        problem = check_image_file(root, root_real, file_name, where)
        if problem:
            errors.add(problem)
            continue
        xml_path = voc_root / "Annotations" / f"{stem}.xml"
        if not xml_path.resolve().is_relative_to(annotations_dir):
            errors.add(f"{where}: annotation path {xml_path} escapes {voc_root / 'Annotations'}")
            continue
        try:
            root_node = _parse_xml(xml_path)
            width, height = _image_size(root_node, xml_path)
        except DatasetError as exc:
            errors.add(str(exc))
            continue
        parsed.append(({"id": image_id, "file_name": file_name, "width": width, "height": height}, xml_path, root_node))
    return parsed


def load_voc(
    voc_root: str | Path,
    split: str,
    class_names: tuple[str, ...] | list[str] | None = None,
    image_root: str | Path | None = None,
) -> tuple[dict[str, Any], Path]:
    """Read ``ImageSets/Main/{split}.txt`` of a VOC20xx folder as a COCO dict.

    ``difficult=1`` objects become ``iscrowd=1``: COCOeval then ignores detections matched to them (as
    VOC's own evaluation does), and they stay out of the training targets. Category ids are 1..C in
    ``class_names`` order (``VOC_CLASSES`` for the 20 VOC classes; None: every ``<name>`` in the split's
    XML files, sorted, which for a VOC split holding all 20 classes is ``VOC_CLASSES``); image ids are
    1..N in the order of the split file.
    """
    voc_root = Path(voc_root)
    split_file = voc_root / "ImageSets" / "Main" / f"{split}.txt"
    stems = _split_stems(split_file, voc_root)
    root = Path(image_root) if image_root is not None else voc_root / "JPEGImages"
    errors = ErrorList()
    # first every XML (size checked), then the objects: the class table may come from the XML names
    parsed = _parse_images(voc_root, split_file, stems, root, errors)
    if class_names is None:
        class_names = xml_class_names(node for _, _, node in parsed)
        if not class_names and not errors.messages:
            raise DatasetError(
                f"{split_file}: no <object> with a <name> in any of its XML files, so no classes to read "
                "(set class_names)"
            )
    class_index = {name: i for i, name in enumerate(class_names)}
    images, annotations = [], []
    for image, xml_path, root_node in parsed:
        try:
            objects = _objects(root_node, xml_path, class_index)
        except DatasetError as exc:
            errors.add(str(exc))
            continue
        images.append(image)
        for cls, bbox, difficult in objects:
            annotations.append(annotation_record(len(annotations) + 1, image["id"], cls, bbox, difficult))
    errors.raise_if_any()
    data = {
        "info": {"description": f"converted by robustdet from {voc_root.name} split {split}"},
        "images": images,
        "annotations": annotations,
        "categories": categories_from_names(class_names),
    }
    return validate_coco(data, str(voc_root), root, check_files=False), root
