"""COCO loading: the coco128 json, a corpus of broken jsons, out-of-image boxes, EXIF, decode errors."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from robustdet.data import DataConfig, DetectionDataset, build_dataset, load_coco, parse_source
from robustdet.data.yolo import header_size
from robustdet.errors import DatasetError

COCO128 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco128"
needs_coco128 = pytest.mark.skipif(not COCO128.is_dir(), reason=f"{COCO128} is absent")
TRAIN_JSON = COCO128 / "annotations" / "instances_train2017.json"
TRAIN_IMAGES = COCO128 / "images" / "train2017"


def _write_image(
    path: Path, size: tuple[int, int] = (32, 24), colour: tuple[int, int, int] = (90, 120, 200)
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def tiny_coco() -> dict[str, Any]:
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 32, "height": 24},
            {"id": 2, "file_name": "b.png", "width": 32, "height": 24},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 3, 10, 8], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [12, 4, 6, 6], "iscrowd": 1},
            {"id": 3, "image_id": 2, "category_id": 7, "bbox": [0, 0, 32, 24]},
        ],
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
    }


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    for name in ("a.png", "b.png"):
        _write_image(tmp_path / "images" / name)
    return tmp_path


def _dump(folder: Path, data: Any) -> Path:
    path = folder / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_tiny_coco_labels_crowd_and_targets(tiny: Path) -> None:
    data, root = load_coco(_dump(tiny, tiny_coco()), tiny / "images")
    ds = DetectionDataset(data, root)
    assert ds.category_ids == [3, 7] and ds.classes == ["three", "seven"] and ds.num_classes == 2
    image, target = ds[0]
    assert isinstance(image, tv_tensors.Image) and image.shape == (3, 24, 32) and image.dtype == torch.uint8
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes) and target["boxes"].dtype == torch.float32
    assert target["boxes"].tolist() == [[2, 3, 12, 11]]  # the crowd box is not a training target
    assert target["labels"].tolist() == [0] and target["labels"].dtype == torch.int64
    assert target["image_id"] == 1
    assert [a["iscrowd"] for a in ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=[1]))] == [0, 1]
    assert ds.coco.anns[3]["area"] == 32 * 24  # filled in: COCOeval needs it


CorpusEntry = tuple[str, Callable[[dict[str, Any], Path], None], list[str]]


def _symlink_out(data: dict[str, Any], folder: Path) -> None:
    outside = folder / "outside.png"
    _write_image(outside)
    os.symlink(outside, folder / "images" / "link.png")
    data["images"][0]["file_name"] = "link.png"


def _empty_file(data: dict[str, Any], folder: Path) -> None:
    (folder / "images" / "empty.png").write_bytes(b"")
    data["images"][1]["file_name"] = "empty.png"


def _set(path: str, value: Any) -> Callable[[dict[str, Any], Path], None]:
    def mutate(data: dict[str, Any], folder: Path) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[int(last) if last.isdigit() else last] = value

    return mutate


def _delete(key: str) -> Callable[[dict[str, Any], Path], None]:
    return lambda data, folder: data.pop(key)


def _duplicate(key: str, index: int) -> Callable[[dict[str, Any], Path], None]:
    def mutate(data: dict[str, Any], folder: Path) -> None:
        data[key][index + 1]["id"] = data[key][index]["id"]

    return mutate


BAD_COCO: list[CorpusEntry] = [
    ("no images", _delete("images"), ["missing top-level key 'images'"]),
    ("no annotations", _delete("annotations"), ["missing top-level key 'annotations'"]),
    ("no categories", _delete("categories"), ["missing top-level key 'categories'"]),
    ("images not a list", _set("images", {}), ["'images' must be a list"]),
    ("duplicate image id", _duplicate("images", 0), ["images[1] (id 1", "duplicate image id 1"]),
    (
        "duplicate annotation id",
        _duplicate("annotations", 0),
        ["annotations[1] (id 1)", "duplicate annotation id"],
    ),
    ("duplicate category id", _duplicate("categories", 0), ["categories[1]", "duplicate category id 7"]),
    ("unknown image", _set("annotations.0.image_id", 99), ["annotations[0] (id 1)", "image_id 99"]),
    ("unknown category", _set("annotations.2.category_id", 5), ["annotations[2] (id 3)", "category_id 5"]),
    ("zero width", _set("annotations.0.bbox", [1, 1, 0, 5]), ["annotations[0] (id 1)", "non-positive width"]),
    (
        "negative height",
        _set("annotations.2.bbox", [1, 1, 4, -2]),
        ["annotations[2] (id 3)", "non-positive height"],
    ),
    (
        "NaN coordinate",
        _set("annotations.0.bbox", [float("nan"), 1, 4, 4]),
        ["annotations[0] (id 1)", "non-finite"],
    ),
    (
        "infinite width",
        _set("annotations.0.bbox", [1, 1, float("inf"), 4]),
        ["annotations[0] (id 1)", "non-finite"],
    ),
    ("short bbox", _set("annotations.0.bbox", [1, 1, 4]), ["annotations[0] (id 1)", "'bbox' must be"]),
    ("string bbox", _set("annotations.0.bbox", "1 1 4 4"), ["annotations[0] (id 1)", "'bbox' must be"]),
    ("bad iscrowd", _set("annotations.0.iscrowd", 2), ["annotations[0] (id 1)", "'iscrowd'"]),
    ("missing annotation id", lambda d, f: d["annotations"][0].pop("id"), ["annotations[0]", "'id' must be"]),
    ("float image id", _set("images.0.id", 1.5), ["images[0]", "'id' must be an integer"]),
    ("missing width", lambda d, f: d["images"][0].pop("width"), ["images[0] (id 1", "'width'"]),
    ("zero height", _set("images.1.height", 0), ["images[1] (id 2", "'height'"]),
    ("dot-dot file", _set("images.0.file_name", "../a.png"), ["images[0] (id 1", "escapes the image root"]),
    ("absolute file", _set("images.0.file_name", "/etc/passwd"), ["images[0] (id 1", "absolute path"]),
    ("symlink out", _symlink_out, ["images[0] (id 1", "outside the image root"]),
    (
        "missing file",
        _set("images.1.file_name", "nope.png"),
        ["images[1] (id 2", "image file not found", "nope.png"],
    ),
    ("empty file", _empty_file, ["images[1] (id 2", "empty (0 bytes)"]),
    ("category without name", _set("categories.0.name", ""), ["categories[0] (id 7)", "'name'"]),
    ("no category at all", _set("categories", []), ["'categories' is empty"]),
]


@pytest.mark.parametrize(
    ("mutate", "expected"), [(m, e) for _, m, e in BAD_COCO], ids=[n for n, _, _ in BAD_COCO]
)
def test_bad_coco_names_file_and_entry(
    tiny: Path, mutate: Callable[[dict[str, Any], Path], None], expected: list[str]
) -> None:
    data = copy.deepcopy(tiny_coco())
    mutate(data, tiny)
    path = _dump(tiny, data)
    with pytest.raises(DatasetError) as info:
        load_coco(path, tiny / "images")
    message = str(info.value)
    assert "instances.json" in message
    for part in expected:
        assert part in message


def test_broken_json_and_missing_file(tiny: Path) -> None:
    (tiny / "instances.json").write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"instances\.json: not valid JSON"):
        load_coco(tiny / "instances.json", tiny / "images")
    with pytest.raises(DatasetError, match=r"absent\.json: file not found"):
        load_coco(tiny / "absent.json", tiny / "images")
    with pytest.raises(DatasetError, match="is not a folder"):
        load_coco(_dump(tiny, tiny_coco()), tiny / "no-such-folder")


def test_many_problems_in_one_error(tiny: Path) -> None:
    data = tiny_coco()
    for ann in data["annotations"]:
        ann["bbox"][2] = 0
    with pytest.raises(DatasetError) as info:
        load_coco(_dump(tiny, data), tiny / "images")
    assert str(info.value).count("non-positive width") == 3


def test_out_of_image_clip_and_error(tiny: Path) -> None:
    data = tiny_coco()
    data["annotations"][0]["bbox"] = [-3.0, 20.0, 10.0, 10.0]  # sticks out left and bottom (24 high)
    loaded, root = load_coco(_dump(tiny, data), tiny / "images")
    clipped = DetectionDataset(loaded, root, out_of_image="clip")
    assert clipped.target(0)["boxes"].tolist() == [[0.0, 20.0, 7.0, 24.0]]
    assert clipped.coco.anns[1]["bbox"] == [0.0, 20.0, 7.0, 4.0]  # evaluation sees the same box
    with pytest.raises(
        DatasetError, match=r"instances\.json: annotations\[0\] \(id 1, image 'a.png'.*sticks out"
    ):
        DetectionDataset(loaded, root, out_of_image="error", source=str(tiny / "instances.json"))
    # float noise at the border is not an error
    data["annotations"][0]["bbox"] = [2.0, 3.0, 30.0001, 8.0]
    loaded, root = load_coco(_dump(tiny, data), tiny / "images")
    assert DetectionDataset(loaded, root, out_of_image="error").target(0)["boxes"].tolist()[0][2] == 32.0
    data["annotations"][0]["bbox"] = [40.0, 3.0, 5.0, 5.0]  # entirely outside: no clipping rescues it
    loaded, root = load_coco(_dump(tiny, data), tiny / "images")
    with pytest.raises(DatasetError, match=r"annotations\[0\] \(id 1.*lies outside the image"):
        DetectionDataset(loaded, root, out_of_image="clip")


def test_exif_rotated_jpeg_decodes_upright(tmp_path: Path) -> None:
    # upright: 40 wide, 20 high, a red block at x 4..16, y 2..10 on grey
    upright = Image.new("RGB", (40, 20), (128, 128, 128))
    upright.paste((255, 0, 0), (4, 2, 16, 10))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera stored: 20 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    (tmp_path / "img").mkdir()
    stored.save(tmp_path / "img" / "r.jpg", quality=98, exif=exif.tobytes())
    assert header_size(tmp_path / "img" / "r.jpg") == (40, 20)
    data = {
        "images": [{"id": 1, "file_name": "r.jpg", "width": 40, "height": 20}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 2, 12, 8]}],
        "categories": [{"id": 1, "name": "block"}],
    }
    loaded, root = load_coco(_dump(tmp_path, data), tmp_path / "img")
    image, target = DetectionDataset(loaded, root)[0]
    assert image.shape == (3, 20, 40)
    x1, y1, x2, y2 = (int(v) for v in target["boxes"][0].tolist())
    inside = image[:, y1 + 1 : y2 - 1, x1 + 1 : x2 - 1].float().mean(dim=(1, 2))
    assert inside[0] > 230 and inside[1] < 30 and inside[2] < 30
    assert image[0, 15:, 25:].float().mean() < 150  # grey outside the box


def test_undecodable_and_mismatched_images_name_the_file(tiny: Path) -> None:
    (tiny / "images" / "a.png").write_bytes(b"this is not an image")
    loaded, root = load_coco(_dump(tiny, tiny_coco()), tiny / "images")  # stat-only checks pass
    ds = DetectionDataset(loaded, root)
    with pytest.raises(DatasetError, match=r"a\.png: cannot decode the image"):
        ds[0]
    _write_image(tiny / "images" / "b.png", size=(24, 32))
    with pytest.raises(
        DatasetError, match=r"b\.png: decoded size 24x32 differs .* 32x24 \(width and height swapped"
    ):
        ds[1]


def test_empty_images_keep_or_skip(tiny: Path) -> None:
    data = tiny_coco()
    data["annotations"] = data["annotations"][:2]  # b.png is now empty, a.png has a crowd box besides
    loaded, root = load_coco(_dump(tiny, data), tiny / "images")
    assert len(DetectionDataset(loaded, root, train=True, empty_images="keep")) == 2
    skipped = DetectionDataset(loaded, root, train=True, empty_images="skip")
    assert skipped.image_ids == [1] and len(skipped.coco.imgs) == 2
    assert len(DetectionDataset(loaded, root, train=False, empty_images="skip")) == 2  # evaluation sees all


@pytest.mark.coco128
@needs_coco128
def test_coco128_train_json() -> None:
    raw = json.loads(TRAIN_JSON.read_text())
    source = parse_source({"format": "coco", "path": str(TRAIN_JSON), "image_root": str(TRAIN_IMAGES)})
    ds = build_dataset(source, DataConfig(), train=False)
    assert len(ds) == 128 and ds.num_classes == 80
    assert ds.category_ids == sorted(c["id"] for c in raw["categories"]) and ds.category_ids[-1] == 90
    names = {c["id"]: c["name"] for c in raw["categories"]}
    assert ds.classes == [names[cid] for cid in ds.category_ids]
    # labels map back to the original category ids of the json
    by_image: dict[int, list[int]] = {}
    for ann in raw["annotations"]:
        if not ann["iscrowd"]:
            by_image.setdefault(ann["image_id"], []).append(ann["category_id"])
    total = 0
    for index in range(len(ds)):
        target = ds.target(index)
        got = sorted(ds.category_ids[label] for label in target["labels"].tolist())
        assert got == sorted(by_image.get(target["image_id"], []))
        total += len(got)
    crowd = sum(a["iscrowd"] for a in raw["annotations"])
    assert crowd == 10 and total == len(raw["annotations"]) - crowd
    assert sum(a["iscrowd"] for a in ds.coco.dataset["annotations"]) == 10

    skipped = build_dataset(source, DataConfig(empty_images="skip"), train=True)
    kept = build_dataset(source, DataConfig(empty_images="keep"), train=True)
    assert len(kept) == 128 and len(skipped) == 126

    # the README says two grayscale images; train2017 holds one of them (000000000086), val2017 the other
    grey = [i for i in range(len(ds)) if Image.open(ds.image_path(i)).mode == "L"]
    assert len(grey) >= 1
    for index in grey:
        image, _ = ds[index]
        assert image.shape[0] == 3 and image.dtype == torch.uint8
