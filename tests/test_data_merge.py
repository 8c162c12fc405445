"""A split made of several sources (VOC07+12, two COCO jsons) and VOC class names from the XML files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from robustdet.config import config_from_dict
from robustdet.data import DataConfig, build_dataset, load_voc, parse_source
from robustdet.errors import ConfigError, DatasetError
from tests.conftest import REPO, tiny_overrides

XML = """<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objects}</annotation>"""
OBJECT = (
    "<object><name>{name}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax>"
    "</bndbox></object>"
)


def make_voc(root: Path, images: dict[str, list[tuple[str, int, int, int, int]]], split: str = "trainval") -> Path:
    """A VOC20xx folder: one 48x40 jpg per stem, its XML listing (class, xmin, ymin, xmax, ymax) objects."""
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(images) + "\n")
    (root / "Annotations").mkdir()
    (root / "JPEGImages").mkdir()
    for stem, objects in images.items():
        Image.new("RGB", (48, 40), (30 * len(stem) % 255, 90, 140)).save(root / "JPEGImages" / f"{stem}.jpg")
        body = "".join(OBJECT.format(name=n, x1=a, y1=b, x2=c, y2=d) for n, a, b, c, d in objects)
        (root / "Annotations" / f"{stem}.xml").write_text(XML.format(w=48, h=40, objects=body))
    return root


VOC07 = {"000001": [("pear", 1, 1, 20, 10), ("apple", 5, 5, 30, 30)], "000002": [("apple", 2, 3, 12, 13)]}
VOC12 = {"2012_000001": [("apple", 10, 10, 40, 35)], "2012_000002": [("pear", 1, 2, 3, 4)], "2012_000003": []}


def _boxes_by_file(ds) -> dict[str, list[tuple[str, list[float]]]]:
    """{image file (resolved): [(class name, [x1, y1, x2, y2])]} of a dataset's training targets."""
    out = {}
    for i in range(len(ds)):
        t = ds.target(i)
        out[str(Path(ds.image_path(i)).resolve())] = sorted(
            (ds.classes[int(k)], b.tolist()) for k, b in zip(t["labels"], t["boxes"], strict=True)
        )
    return out


def test_voc07_plus_12_with_own_class_names(tmp_path: Path) -> None:
    a = make_voc(tmp_path / "VOCdevkit" / "VOC2007", VOC07)
    b = make_voc(tmp_path / "VOCdevkit" / "VOC2012", VOC12)
    cfg = config_from_dict(
        {"data": {"train": [{"format": "voc", "path": str(a), "split": "trainval"},
                            {"format": "voc", "path": str(b), "split": "trainval"}]}}
    )  # fmt: skip
    merged = build_dataset(cfg.data.train, cfg.data, train=True)
    alone = [
        build_dataset(parse_source({"format": "voc", "path": str(p), "split": "trainval"}), DataConfig(), train=True)
        for p in (a, b)
    ]

    assert merged.classes == ["apple", "pear"] and len(merged) == 5
    assert len(set(merged.image_ids)) == 5
    ann_ids = merged.coco.getAnnIds(iscrowd=None)
    assert len(ann_ids) == len(set(ann_ids)) == 5
    # every image keeps its own boxes under its own class names: the union of the two loads on their own
    assert _boxes_by_file(merged) == {**_boxes_by_file(alone[0]), **_boxes_by_file(alone[1])}
    # the first source's ids are kept and the second's shifted past them
    assert merged.image_ids == [1, 2, 3, 4, 5]
    assert merged.source == f"{a} + {b}"
    # the evaluation ground truth is the same merged dict
    assert sorted(merged.coco.imgs) == [1, 2, 3, 4, 5]
    sample, target = merged[(3, 0)]
    assert sample.shape[-2:] == (40, 48) and target["image_id"] == 4


def test_merged_class_sets_must_agree(tmp_path: Path) -> None:
    a = make_voc(tmp_path / "VOC2007", VOC07)
    b = make_voc(tmp_path / "VOC2012", {"x": [("apple", 1, 1, 5, 5), ("plum", 2, 2, 9, 9)]})
    sources = [parse_source({"format": "voc", "path": str(p), "split": "trainval"}) for p in (a, b)]
    with pytest.raises(DatasetError) as info:
        build_dataset(sources, DataConfig(), train=True)
    message = str(info.value)
    assert str(a) in message and str(b) in message and "different classes" in message
    assert f"only in {a}: ['pear']" in message and f"only in {b}: ['plum']" in message
    # the same class table given to both makes them agree (plum simply has no box in VOC2007)
    names = ["apple", "pear", "plum"]
    sources = [
        parse_source({"format": "voc", "path": str(p), "split": "trainval", "class_names": names}) for p in (a, b)
    ]
    assert build_dataset(sources, DataConfig(), train=True).classes == names


def test_voc_class_names_from_xml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = {"1": [("zebra", 1, 1, 9, 9)], "2": [("cat", 1, 1, 9, 9), ("zebra", 2, 2, 8, 8)]}
    root = make_voc(tmp_path / "mine", images)
    ds = build_dataset(parse_source({"format": "voc", "path": str(root), "split": "trainval"}), DataConfig(), False)
    assert ds.classes == ["cat", "zebra"]  # sorted, not in order of first appearance
    assert ds.target(0)["labels"].tolist() == [1] and ds.target(1)["labels"].tolist() == [0, 1]
    err = capsys.readouterr().err
    assert err.count("classes read from the XML files") == 1 and "2 classes" in err and "cat, zebra" in err
    # given names fix the order (and say nothing); a name outside them is an error naming the XML
    given = parse_source({"format": "voc", "path": str(root), "split": "trainval", "class_names": ["zebra", "cat"]})
    ds = build_dataset(given, DataConfig(), False)
    assert ds.classes == ["zebra", "cat"] and ds.target(1)["labels"].tolist() == [1, 0]
    assert "read from the XML" not in capsys.readouterr().err
    with pytest.raises(DatasetError, match=r"2\.xml: object\[0\]: unknown class 'cat'"):
        load_voc(root, "trainval", class_names=["zebra"])
    empty = make_voc(tmp_path / "empty", {"1": []})
    with pytest.raises(DatasetError, match=r"trainval\.txt: no <object> with a <name>.*set class_names"):
        load_voc(empty, "trainval")
    with pytest.raises(ConfigError, match=r"data\.train\.class_names: \['a'\] listed more than once"):
        config_from_dict({"data": {"train": {"format": "voc", "path": "x", "class_names": ["a", "b", "a"]}}})


def _coco_json(path: Path, image_dir: Path, categories: list[tuple[int, str]], boxes: list[tuple[int, str]]) -> Path:
    """A COCO json with images 1..N (one 32x24 png each) and annotation j on image j of class name boxes[j]."""
    image_dir.mkdir(parents=True, exist_ok=True)
    ids = {name: cid for cid, name in categories}
    images, annotations = [], []
    for j, (image_id, name) in enumerate(boxes, start=1):
        file_name = f"{path.stem}_{image_id}.png"
        Image.new("RGB", (32, 24), (j * 40, 0, 0)).save(image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": 32, "height": 24})
        annotations.append({"id": j, "image_id": image_id, "category_id": ids[name], "bbox": [j, 2.0, 10, 8]})
    data = {"images": images, "annotations": annotations, "categories": [{"id": c, "name": n} for c, n in categories]}
    path.write_text(json.dumps(data))
    return path


def test_two_coco_jsons_with_colliding_ids(tmp_path: Path) -> None:
    # both start their image and annotation ids at 1, and number the same classes differently
    a = _coco_json(tmp_path / "a.json", tmp_path / "imgs_a", [(1, "cat"), (2, "dog")], [(1, "dog"), (2, "cat")])
    b = _coco_json(tmp_path / "b" / "b.json", tmp_path / "b" / "imgs", [(5, "dog"), (7, "cat")], [(1, "cat")])
    sources = [
        parse_source({"format": "coco", "path": str(a), "image_root": str(tmp_path / "imgs_a")}),
        parse_source({"format": "coco", "path": str(b), "image_root": str(tmp_path / "b" / "imgs")}),
    ]
    ds = build_dataset(sources, DataConfig(), train=False)
    coco = ds.coco
    assert sorted(coco.imgs) == [1, 2, 3] and sorted(coco.anns) == [1, 2, 3]
    assert [c["id"] for c in coco.loadCats(coco.getCatIds())] == [1, 2]  # the first source's table
    named = {
        Path(coco.imgs[ann["image_id"]]["file_name"]).name: coco.cats[ann["category_id"]]["name"]
        for ann in coco.anns.values()
    }
    assert named == {"a_1.png": "dog", "a_2.png": "cat", "b_1.png": "cat"}  # b's cat (id 7) is still a cat
    assert all(Path(ds.image_path(i)).is_file() for i in range(len(ds)))
    # the images keep their pixels: the third image is b's
    assert torch.equal(ds[2][0][0], torch.full((24, 32), 40, dtype=torch.uint8))


def test_tiny_train_on_merged_voc_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from robustdet.cli import main

    a = make_voc(tmp_path / "VOC2007", VOC07)
    b = make_voc(tmp_path / "VOC2012", VOC12)
    make_voc(tmp_path / "VOC2007test", {"t1": [("pear", 3, 3, 30, 30)], "t2": [("apple", 1, 1, 40, 30)]}, "test")
    train = f"[{{format: voc, path: {a}, split: trainval}}, {{format: voc, path: {b}, split: trainval}}]"
    val = f"{{format: voc, path: {tmp_path / 'VOC2007test'}, split: test}}"
    run = tmp_path / "run"
    overrides = tiny_overrides(tmp_path, {"train.max_iter": 2, "checkpoint.period": 2, "model.min_size": 48})
    code = main(["train", str(REPO / "configs" / "default.yaml"), *overrides, f"data.train={train}", f"data.val={val}",
                 "--out", str(run)])  # fmt: skip
    assert code == 0
    stored = (run / "config.yaml").read_text()
    assert "VOC2012" in stored and (run / "checkpoints" / "last.pt").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["per_class"]) == {"apple", "pear"}
    code = main(["eval", str(run / "checkpoints" / "last.pt")])
    assert code == 0
