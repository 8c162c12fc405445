"""The built-in synthetic dataset: deterministic, cached atomically, and covering sizes and classes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from robustdet.config import DataConfig, SyntheticConfig
from robustdet.data import build_dataset, ensure_synthetic, load_synthetic
from robustdet.data import synthetic as synthetic_module
from robustdet.errors import DatasetError

SIZE = 96


def _cfg(cache: Path, **kw: object) -> SyntheticConfig:
    base = {
        "num_classes": 5,
        "image_size": SIZE,
        "num_train": 48,
        "num_val": 8,
        "seed": 3,
        "cache_dir": str(cache),
    }
    return SyntheticConfig(**{**base, **kw})  # type: ignore[arg-type]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_synthetic(_cfg(tmp_path_factory.mktemp("cache")))


def test_same_seed_same_bytes_other_seed_differs(generated: Path, tmp_path: Path) -> None:
    again = ensure_synthetic(_cfg(tmp_path / "other-cache"))
    assert again.name == generated.name
    first, second = _files(generated), _files(again)
    assert len(first) == 48 + 8 + 2 and first == second
    other = _files(ensure_synthetic(_cfg(tmp_path / "c3", seed=4)))
    assert other["train.json"] != first["train.json"]
    assert other["images/train/000000.png"] != first["images/train/000000.png"]


def test_boxes_sizes_and_classes(generated: Path) -> None:
    data = json.loads((generated / "train.json").read_text())
    per_image: dict[int, int] = {}
    extents, labels = [], set()
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= SIZE and y + h <= SIZE
        per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
        extents.append(max(w, h))
        labels.add(ann["category_id"])
    assert labels == {1, 2, 3, 4, 5}
    assert [c["name"] for c in data["categories"]] == ["rectangle", "ellipse", "triangle", "ring", "cross"]
    assert len(per_image) == 48 and min(per_image.values()) >= 1 and max(per_image.values()) <= 8
    assert min(extents) <= 10 and max(extents) >= 0.4 * SIZE  # from ~8 px to ~half the image
    # log-uniform: about as many objects below the geometric middle of the range as above it
    middle = math.sqrt(8 * SIZE / 2)
    small = sum(e < middle for e in extents) / len(extents)
    assert 0.3 < small < 0.7


def test_boxes_are_tight_around_the_drawn_shape(generated: Path) -> None:
    data = json.loads((generated / "val.json").read_text())
    pixels = np.asarray(Image.open(generated / "images" / "val" / "000000.png")).astype(np.float32)
    assert pixels.shape == (SIZE, SIZE, 3)
    for ann in [a for a in data["annotations"] if a["image_id"] == 1]:
        x, y, w, h = (int(v) for v in ann["bbox"])
        if min(w, h) < 6:
            continue
        # the box's border rows/columns hold object pixels, so the colour changes across them
        row_in, row_out = pixels[y, x : x + w], pixels[max(0, y - 1), x : x + w]
        assert np.abs(row_in - row_out).max() > 20 or y == 0


def test_cache_is_reused_and_never_half_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(tmp_path, num_train=4, num_val=2)
    calls = []
    real = synthetic_module._generate_split

    def failing(*args: object) -> object:
        calls.append(args[1])
        if args[1] == "val":
            raise KeyboardInterrupt  # killed half way through
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(synthetic_module, "_generate_split", failing)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(cfg)
    assert list(tmp_path.iterdir()) == []  # neither a dataset folder nor a temporary one
    monkeypatch.setattr(synthetic_module, "_generate_split", real)
    root = ensure_synthetic(cfg)
    stamp = (root / "train.json").stat().st_mtime_ns
    monkeypatch.setattr(synthetic_module, "_generate_split", failing)
    assert ensure_synthetic(cfg) == root and (root / "train.json").stat().st_mtime_ns == stamp
    assert calls == ["train", "val"]  # the second call generated nothing


def test_more_classes_cycle_shape_and_hue(tmp_path: Path) -> None:
    names = synthetic_module.class_names(8)
    assert names[0] == "rectangle_hue0" and names[6] == "rectangle_hue1" and len(set(names)) == 8
    data, _ = load_synthetic(_cfg(tmp_path, num_classes=8, num_train=40, num_val=2), "train")
    assert {a["category_id"] for a in data["annotations"]} == set(range(1, 9))


def test_build_dataset_from_config(generated: Path) -> None:
    cfg = DataConfig(synthetic=_cfg(generated.parent.parent))
    train = build_dataset(cfg.train, cfg, train=True)
    val = build_dataset(cfg.val, cfg, train=False)
    assert (len(train), len(val)) == (48, 8) and train.classes == val.classes
    image, target = train[(5, 123)]
    assert image.shape == (3, SIZE, SIZE) and len(target["boxes"]) == len(target["labels"]) >= 1
    with pytest.raises(DatasetError, match="split must be one of"):
        load_synthetic(cfg.synthetic, "test")


def test_default_cache_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROBUSTDET_CACHE", str(tmp_path / "env-cache"))
    assert synthetic_module.cache_base(SyntheticConfig()) == tmp_path / "env-cache" / "synthetic"
    monkeypatch.delenv("ROBUSTDET_CACHE")
    assert (
        synthetic_module.cache_base(SyntheticConfig()) == Path.home() / ".cache" / "robustdet" / "synthetic"
    )
