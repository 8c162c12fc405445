"""YOLO and VOC loaders, and their conversion to COCO json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from robustdet.data import (
    VOC_CLASSES,
    DataConfig,
    DatasetError,
    DetectionDataset,
    build_dataset,
    convert_to_coco,
    load_coco,
    load_voc,
    load_yolo,
    parse_source,
)

COCO128 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco128"
needs_coco128 = pytest.mark.skipif(not COCO128.is_dir(), reason=f"{COCO128} is absent")


def _image(path: Path, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (40, 160, 90)).save(path)


def make_yolo(root: Path, names: object = None, labels: dict[str, str] | None = None) -> Path:
    """A tiny Ultralytics dataset: train images a (40x20) and b (30x30), c without a label file."""
    _image(root / "images" / "train" / "a.jpg", (40, 20))
    _image(root / "images" / "train" / "sub" / "b.png", (30, 30))
    _image(root / "images" / "train" / "c.png", (16, 16))
    default = {"a": "0 0.5 0.5 0.5 0.5\n1 0.25 0.5 0.5 1.0\n", "sub/b": "\n2 0.9 0.9 0.4 0.4\n"}
    for stem, text in (labels or default).items():
        path = root / "labels" / "train" / f"{stem}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    data_yaml = root / "data.yaml"
    names = names if names is not None else {0: "zero", 1: "one", 2: "two"}
    data_yaml.write_text(yaml.safe_dump({"path": ".", "train": "images/train", "names": names}))
    return data_yaml


def test_tiny_yolo(tmp_path: Path) -> None:
    data, root = load_yolo(make_yolo(tmp_path), "train")
    assert root == tmp_path / "."
    assert [c["id"] for c in data["categories"]] == [1, 2, 3]
    assert [i["file_name"] for i in data["images"]] == [
        "images/train/a.jpg",
        "images/train/c.png",
        "images/train/sub/b.png",
    ]
    boxes = {(a["image_id"], a["category_id"]): a["bbox"] for a in data["annotations"]}
    assert boxes[(1, 1)] == [10.0, 5.0, 20.0, 10.0]  # class 0 -> category 1, pixels of a 40x20 image
    assert boxes[(1, 2)] == [0.0, 0.0, 20.0, 20.0]
    assert boxes[(3, 3)] == pytest.approx([21.0, 21.0, 12.0, 12.0])  # sticks out right and bottom
    ds = DetectionDataset(data, root, validate=False)
    assert ds.classes == ["zero", "one", "two"]
    assert ds.target(2)["boxes"].tolist() == [pytest.approx([21.0, 21.0, 30.0, 30.0])]  # clipped
    assert ds.target(1)["boxes"].shape == (0, 4)  # no label file: background image
    image, _ = ds[0]
    assert image.shape == (3, 20, 40)


def test_yolo_names_as_list_and_image_root_override(tmp_path: Path) -> None:
    data_yaml = make_yolo(tmp_path / "ds", names=["zero", "one", "two"])
    text = yaml.safe_load(data_yaml.read_text())
    text["path"] = "/somewhere/else/on/another/machine"
    data_yaml.write_text(yaml.safe_dump(text))
    with pytest.raises(DatasetError, match=r"data\.yaml: image root /somewhere/else"):
        load_yolo(data_yaml, "train")
    data, _ = load_yolo(data_yaml, "train", image_root=tmp_path / "ds")
    assert [c["name"] for c in data["categories"]] == ["zero", "one", "two"]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("0 0.5 0.5 0.2", "expected 5 fields 'class cx cy w h', got 4"),
        ("0 0.5 0.5 0.2 0.2 0.3 0.3", "got 7 (polygon segment lines are not supported)"),
        ("0 1.5 0.5 0.2 0.2", "normalized to [0, 1]"),
        ("0 0.5 -0.1 0.2 0.2", "normalized to [0, 1]"),
        ("3 0.5 0.5 0.2 0.2", "class 3 is not a class id in 0..2"),
        ("1.5 0.5 0.5 0.2 0.2", "class 1.5 is not a class id"),
        ("a 0.5 0.5 0.2 0.2", "fields must be numbers"),
        ("0 nan 0.5 0.2 0.2", "non-finite"),
        ("0 0.5 0.5 0 0.2", "non-positive width"),
    ],
)
def test_yolo_bad_lines_name_file_and_line(tmp_path: Path, line: str, expected: str) -> None:
    data_yaml = make_yolo(tmp_path, labels={"a": f"0 0.5 0.5 0.5 0.5\n{line}\n"})
    with pytest.raises(DatasetError) as info:
        load_yolo(data_yaml, "train")
    assert f"{Path('labels', 'train', 'a.txt')}:2: " in str(info.value)
    assert expected in str(info.value)


def test_yolo_bad_yaml(tmp_path: Path) -> None:
    data_yaml = make_yolo(tmp_path)
    with pytest.raises(DatasetError, match=r"data\.yaml: no split 'val' \(it has \['train'\]\)"):
        load_yolo(data_yaml, "val")
    data_yaml.write_text(yaml.safe_dump({"train": "images/train", "names": {0: "a", 2: "c"}}))
    with pytest.raises(DatasetError, match=r"'names' keys must be the class ids 0\.\.1"):
        load_yolo(data_yaml, "train")
    data_yaml.write_text(yaml.safe_dump({"train": "../outside", "names": ["a"]}))
    (tmp_path.parent / "outside").mkdir(exist_ok=True)
    with pytest.raises(DatasetError, match="outside the dataset root"):
        load_yolo(data_yaml, "train")
    data_yaml.write_text("train: [unclosed")
    with pytest.raises(DatasetError, match=r"data\.yaml: cannot read it as YAML"):
        load_yolo(data_yaml, "train")


def test_yolo_corrupt_image_header(tmp_path: Path) -> None:
    data_yaml = make_yolo(tmp_path)
    (tmp_path / "images" / "train" / "c.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(DatasetError, match=r"c\.png: cannot read the image header"):
        load_yolo(data_yaml, "train")


def test_convert_yolo_to_coco_roundtrip(tmp_path: Path) -> None:
    data_yaml = make_yolo(tmp_path / "ds")
    out = tmp_path / "out" / "train.json"
    image_root = convert_to_coco("yolo", data_yaml, "train", out)
    assert not list(out.parent.glob(".*.tmp"))  # the temporary file was renamed away
    coco, root = load_coco(out, image_root)
    yolo, _ = load_yolo(data_yaml, "train")
    assert coco["annotations"] == yolo["annotations"] and coco["categories"] == yolo["categories"]
    a = DetectionDataset(coco, root, validate=False)
    b = DetectionDataset(yolo, image_root, validate=False)
    for i in range(len(a)):
        assert torch.equal(a.target(i)["boxes"], b.target(i)["boxes"])
    with pytest.raises(DatasetError, match="yolo or voc"):
        convert_to_coco("coco", out, "train", tmp_path / "x.json")


@pytest.mark.coco128
@needs_coco128
def test_coco128_val_yolo_and_convert(tmp_path: Path) -> None:
    source = parse_source({"format": "yolo", "path": str(COCO128 / "data.yaml"), "split": "val"})
    ds = build_dataset(source, DataConfig(), train=False)
    assert len(ds) == 128
    train = json.loads((COCO128 / "annotations" / "instances_train2017.json").read_text())
    assert ds.classes == [c["name"] for c in sorted(train["categories"], key=lambda c: c["id"])]
    assert ds.category_ids == list(range(1, 81))
    lines = sum(
        len([ln for ln in p.read_text().splitlines() if ln.strip()])
        for p in (COCO128 / "labels" / "val2017").glob("*.txt")
    )
    assert sum(len(ds.target(i)["labels"]) for i in range(len(ds))) == lines
    grey = next(i for i in range(len(ds)) if ds.image_path(i).endswith("000000007888.jpg"))
    image, target = ds[grey]
    assert image.shape[0] == 3 and tuple(image.shape[1:]) == target["boxes"].canvas_size

    out = tmp_path / "val2017.json"
    root = convert_to_coco("yolo", COCO128 / "data.yaml", "val", out)
    again = DetectionDataset(*load_coco(out, root))
    assert again.classes == ds.classes and len(again) == 128
    assert all(torch.equal(again.target(i)["boxes"], ds.target(i)["boxes"]) for i in range(0, 128, 9))


VOC_XML = """<annotation>
  <filename>{stem}.jpg</filename>
  <size><width>50</width><height>40</height><depth>3</depth></size>
  <object><name>dog</name><difficult>0</difficult>
    <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>20</xmax><ymax>10</ymax></bndbox></object>
  <object><name>person</name><difficult>1</difficult>
    <bndbox><xmin>11</xmin><ymin>5</ymin><xmax>50</xmax><ymax>40</ymax></bndbox></object>
</annotation>"""


def make_voc(root: Path, xml: dict[str, str] | None = None) -> Path:
    stems = ["2008_000001", "2008_000002"]
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(stems) + "\n")
    (root / "Annotations").mkdir()
    for stem in stems:
        _image(root / "JPEGImages" / f"{stem}.jpg", (50, 40))
        text = (xml or {}).get(stem, VOC_XML.format(stem=stem))
        (root / "Annotations" / f"{stem}.xml").write_text(text)
    return root


def test_tiny_voc(tmp_path: Path) -> None:
    data, _ = load_voc(make_voc(tmp_path / "VOC2012"), "train", class_names=VOC_CLASSES)
    assert [c["name"] for c in data["categories"]] == list(VOC_CLASSES)
    anns = [a for a in data["annotations"] if a["image_id"] == 1]
    assert anns[0]["bbox"] == [0.0, 0.0, 20.0, 10.0]  # 1-based inclusive -> [x1 - 1, y1 - 1, x2, y2]
    assert anns[0]["category_id"] == VOC_CLASSES.index("dog") + 1 and anns[0]["iscrowd"] == 0
    assert anns[1]["bbox"] == [10.0, 4.0, 40.0, 36.0] and anns[1]["iscrowd"] == 1  # difficult
    ds = build_dataset(
        parse_source(
            {"format": "voc", "path": str(tmp_path / "VOC2012"), "split": "train", "class_names": list(VOC_CLASSES)}
        ),
        DataConfig(),
        True,
    )
    _, target = ds[(0, 7)]
    assert target["labels"].tolist() == [VOC_CLASSES.index("dog")]  # the difficult person is not trained on
    assert len(ds.coco.getAnnIds(imgIds=[1], iscrowd=None)) == 2  # but stays in the evaluation ground truth
    out = tmp_path / "voc.json"
    coco, _ = load_coco(out, convert_to_coco("voc", tmp_path / "VOC2012", "train", out))
    # convert reads the class names from the XML files (dog, person), so dog is category 1 there
    assert [c["name"] for c in coco["categories"]] == ["dog", "person"]
    assert [(a["bbox"], a["category_id"]) for a in coco["annotations"]] == [
        (a["bbox"], ["dog", "person"].index(VOC_CLASSES[a["category_id"] - 1]) + 1) for a in data["annotations"]
    ]


@pytest.mark.parametrize(
    ("xml", "expected"),
    [
        ("<annotation><size><width>50</width>", "not well-formed XML"),
        (
            VOC_XML.replace("<size><width>50</width><height>40</height><depth>3</depth></size>", ""),
            "missing <size>",
        ),
        (
            VOC_XML.replace(
                "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>20</xmax><ymax>10</ymax></bndbox>", ""
            ),
            "object[0]",
        ),
        (VOC_XML.replace("<name>dog</name>", "<name>wolf</name>"), "object[0]: unknown class 'wolf'"),
        (VOC_XML.replace("<xmax>20</xmax>", "<xmax>abc</xmax>"), "object[0] (dog): <xmax> must be a number"),
        (VOC_XML.replace("<xmax>20</xmax>", "<xmax>0</xmax>"), "object[0] (dog): box has non-positive width"),
        (VOC_XML.replace("<ymin>5</ymin>", ""), "object[1] (person): missing <ymin>"),
    ],
)
def test_malformed_voc_names_the_xml(tmp_path: Path, xml: str, expected: str) -> None:
    root = make_voc(tmp_path / "VOC2007", xml={"2008_000002": xml.format(stem="2008_000002")})
    with pytest.raises(DatasetError) as info:
        load_voc(root, "train", class_names=VOC_CLASSES)
    assert "2008_000002.xml" in str(info.value) and expected in str(info.value)


def test_voc_entity_bomb_is_refused(tmp_path: Path) -> None:
    bomb = (
        '<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
        + "".join(
            f' <!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">\n'
            for i in range(1, 10)
        )
        + "]>\n<annotation><filename>&lol9;</filename></annotation>"
    )
    root = make_voc(tmp_path / "VOC2007", xml={"2008_000001": bomb})
    with pytest.raises(DatasetError, match=r"2008_000001\.xml: refused unsafe XML \(EntitiesForbidden"):
        load_voc(root, "train")


def test_voc_split_problems(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "VOC2007")
    with pytest.raises(DatasetError, match=r"val\.txt: split file not found"):
        load_voc(root, "val")
    (root / "ImageSets" / "Main" / "train.txt").write_text("2008_000001\n../../secret\n")
    with pytest.raises(DatasetError, match=r"train\.txt: line 2 \('../../secret'\).*escapes the image root"):
        load_voc(root, "train")
