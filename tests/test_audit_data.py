"""What audit needs from the data layer: annotation ids in the targets, and a split built with its noisy
labels but without augmentation (``SplitUse``)."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from robustdet.data import EVALUATION, TRAINING, DataConfig, build_dataset, build_train_loader, load_synthetic
from robustdet.data.noise import LabelNoiseConfig, apply_label_noise
from robustdet.data.synthetic import SyntheticSource
from robustdet.errors import ConfigError, DatasetError
from robustdet.models import build_model
from tests.conftest import tiny_overrides

NOISE = LabelNoiseConfig(class_flip=0.3, box_jitter=0.2, drop=0.2, spurious=0.2, seed=3)


def _data_cfg(tmp_path: Path, **extra: object) -> DataConfig:
    return DataConfig.model_validate(
        {"synthetic": {"num_train": 12, "num_val": 2, "image_size": 64, "cache_dir": str(tmp_path)}, **extra}
    )


def _noisy_source() -> SyntheticSource:
    return SyntheticSource(split="train", label_noise=NOISE)


def _expected(cfg: DataConfig) -> dict[int, dict]:
    clean, _ = load_synthetic(cfg.synthetic, "train")
    noisy, _ = apply_label_noise(clean, NOISE, "synthetic train")
    return {a["id"]: a for a in noisy["annotations"]}


def test_targets_carry_the_annotation_ids_of_their_boxes(tmp_path):
    cfg = _data_cfg(tmp_path)
    by_id = _expected(cfg)
    ds = build_dataset(_noisy_source(), cfg, replace(TRAINING, augment=False))
    seen = []
    for index in range(len(ds)):
        _, target = ds[index]
        ids = target["annotation_ids"]
        assert ids.dtype == torch.int64 and ids.shape == target["labels"].shape
        for box, label, ann_id in zip(target["boxes"].tolist(), target["labels"].tolist(), ids.tolist(), strict=True):
            ann = by_id[ann_id]
            x, y, w, h = ann["bbox"]
            assert ann["image_id"] == target["image_id"]
            assert ds.category_ids[label] == ann["category_id"]
            assert box == pytest.approx([x, y, x + w, y + h], abs=1e-4)
            seen.append(ann_id)
    # every noisy annotation once (the spurious ones too), none of the dropped ones
    assert sorted(seen) == sorted(by_id)


def test_augmentation_drops_the_id_with_its_box(tmp_path):
    # a strong zoom-in crops boxes away: the ids that stay are the ids of the boxes that stay
    cfg = _data_cfg(tmp_path, augment={"hflip": True, "scale_range": [2.5, 3.0]})
    by_id = _expected(cfg)
    ds = build_dataset(_noisy_source(), cfg, train=True)
    removed = 0
    for index in range(len(ds)):
        full = ds.target(index)
        _, target = ds[(index, 1000 + index)]
        ids, labels = target["annotation_ids"].tolist(), target["labels"].tolist()
        assert len(ids) == len(labels) == len(target["boxes"])
        assert set(ids) <= set(full["annotation_ids"].tolist())
        assert [ds.category_ids[lbl] for lbl in labels] == [by_id[i]["category_id"] for i in ids]
        removed += len(full["annotation_ids"]) - len(ids)
    assert removed > 0  # the case the test is about did happen


def test_the_loader_collates_the_ids_and_the_models_ignore_them(tmp_path):
    from robustdet.config import load_config

    cfg = _data_cfg(tmp_path)
    ds = build_dataset(_noisy_source(), cfg, train=True)
    images, targets = next(iter(build_train_loader(ds, batch_size=3, seed=0, max_iter=1)))
    assert all("annotation_ids" in t for t in targets)
    run_cfg = load_config(None, tiny_overrides(tmp_path))
    for name in ("retinanet", "fcos", "faster_rcnn"):
        torch.manual_seed(0)
        overrides = tiny_overrides(tmp_path, {"model.name": name, "model.anchor_sizes": None,
                                              "model.head_norm": None, "model.group_norm_groups": None})
        run_cfg = load_config(None, overrides)
        model = build_model(run_cfg, ds.num_classes).train()
        batch = [img.float() / 255 for img in images]
        plain = [{"boxes": t["boxes"].as_subclass(torch.Tensor), "labels": t["labels"]} for t in targets]
        full = [{**p, "annotation_ids": t["annotation_ids"], "image_id": t["image_id"]}
                for p, t in zip(plain, targets, strict=True)]
        torch.manual_seed(1)
        a = model(batch, plain).level_losses
        torch.manual_seed(1)
        b = model(batch, full).level_losses
        assert torch.equal(a, b), name


def test_a_split_with_its_noisy_labels_without_augmentation(tmp_path):
    cfg = _data_cfg(tmp_path, empty_images="skip")
    trained_on = build_dataset(_noisy_source(), cfg, train=True)
    held_out = build_dataset(_noisy_source(), cfg, replace(TRAINING, augment=False, skip_corrupt=False))
    assert held_out.transform is None and not held_out.skip_corrupt
    assert trained_on.transform is not None and trained_on.skip_corrupt
    assert held_out.label_noise == trained_on.label_noise and held_out.label_noise is not None
    assert held_out.image_ids == trained_on.image_ids  # the same images (empty ones skipped alike)
    for index in range(len(held_out)):
        image, target = held_out[(index, 12345)]
        again, _ = held_out[(index, 999)]
        assert torch.equal(image, again)  # no augmentation: the seed changes nothing
        assert torch.equal(target["boxes"], trained_on.target(index)["boxes"])
    # the evaluation preset still refuses a noised source, and True/False are the two presets
    with pytest.raises(ConfigError, match="never noised"):
        build_dataset(_noisy_source(), cfg, EVALUATION)
    assert len(build_dataset(SyntheticSource(split="train"), cfg, False)) >= len(trained_on)


def test_without_skip_corrupt_an_unreadable_image_is_an_error_naming_it(tmp_path):
    cfg = _data_cfg(tmp_path, verify_images=False)
    ds = build_dataset(SyntheticSource(split="train"), cfg, replace(TRAINING, augment=False, skip_corrupt=False))
    path = Path(ds.image_path(2))
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(DatasetError, match=path.name):
        ds[2]
    skipping = build_dataset(SyntheticSource(split="train"), cfg, train=True)
    _, target = skipping[2]
    assert target["skipped"][0][0] == str(path)
