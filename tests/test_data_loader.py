"""Exact, resumable data order and seed-determined augmentation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from robustdet.config import AugmentConfig, DataConfig, SyntheticConfig
from robustdet.data import (
    DetectionDataset,
    InfiniteBatchSampler,
    build_dataset,
    build_eval_loader,
    build_train_loader,
    sample_seed,
)


def test_resume_yields_the_tail_of_an_uninterrupted_run() -> None:
    full = list(InfiniteBatchSampler(10, 3, seed=5, max_iter=25))
    assert len(full) == 25 and all(len(b) == 3 for b in full)
    for k in (0, 1, 3, 7, 24):
        assert list(InfiniteBatchSampler(10, 3, seed=5, start_iter=k, max_iter=25)) == full[k:]
    assert len(InfiniteBatchSampler(10, 3, seed=5, start_iter=7, max_iter=25)) == 18
    # every epoch is a permutation, even where a batch straddles two epochs
    stream = [index for batch in full for index, _ in batch]
    for epoch in range(7):
        assert sorted(stream[epoch * 10 : (epoch + 1) * 10]) == list(range(10))
    assert stream[:10] != stream[10:20]
    seeds = [s for batch in full for _, s in batch]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)
    assert seeds[4] == sample_seed(5, 4)
    assert [i for b in InfiniteBatchSampler(10, 3, seed=6, max_iter=4) for i, _ in b] != stream[:12]
    assert [i for b in InfiniteBatchSampler(4, 3, seed=6, max_iter=2, shuffle=False) for i, _ in b] == [
        0,
        1,
        2,
        3,
        0,
        1,
    ]


def test_ranks_partition_each_global_batch() -> None:
    single = InfiniteBatchSampler(13, 4, seed=1, max_iter=9)
    ranks = [InfiniteBatchSampler(13, 2, seed=1, max_iter=9, rank=r, world_size=2) for r in (0, 1)]
    for i, (whole, r0, r1) in enumerate(zip(single, *ranks, strict=True)):
        assert r0 + r1 == whole, i
    # an infinite sampler is a stream, not a sized collection
    with pytest.raises(TypeError):
        len(InfiniteBatchSampler(13, 2, seed=1))
    with pytest.raises(ValueError, match="rank"):
        InfiniteBatchSampler(13, 2, seed=1, rank=2, world_size=2)


@pytest.fixture(scope="module")
def train_set(tmp_path_factory: pytest.TempPathFactory) -> DetectionDataset:
    cfg = DataConfig(
        synthetic=SyntheticConfig(
            image_size=64, num_train=12, num_val=2, seed=9, cache_dir=str(tmp_path_factory.mktemp("c"))
        ),
        augment=AugmentConfig(hflip=True, photometric=True, scale_range=(0.5, 1.5)),
    )
    return build_dataset(cfg.train, cfg, train=True)


def _same(a: tuple[torch.Tensor, dict], b: tuple[torch.Tensor, dict]) -> bool:  # type: ignore[type-arg]
    return (
        torch.equal(a[0], b[0])
        and torch.equal(a[1]["boxes"], b[1]["boxes"])
        and torch.equal(a[1]["labels"], b[1]["labels"])
        and a[1]["image_id"] == b[1]["image_id"]
    )


def test_augmentation_is_a_function_of_the_seed_and_leaves_the_caller_rng(
    train_set: DetectionDataset,
) -> None:
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first = train_set[(3, 77)]
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(100)  # a different caller RNG state does not matter either
    assert _same(first, train_set[(3, 77)])
    variants = [train_set[(3, s)] for s in range(8)]
    assert sum(not _same(first, v) for v in variants) >= 7
    image, target = variants[0]
    assert image.shape == (3, 64, 64) and len(target["boxes"]) == len(target["labels"])
    assert target["boxes"].canvas_size == (64, 64)
    if len(target["boxes"]):
        boxes = target["boxes"]
        assert (boxes[:, 2:] > boxes[:, :2]).all() and boxes.min() >= 0 and boxes.max() <= 64


def test_loader_batches_do_not_depend_on_workers_or_resume(train_set: DetectionDataset) -> None:
    state = torch.get_rng_state()
    serial = list(build_train_loader(train_set, 3, seed=4, max_iter=5, num_workers=0))
    assert torch.equal(torch.get_rng_state(), state)
    loader = build_train_loader(train_set, 3, seed=4, start_iter=2, max_iter=5, num_workers=2)
    assert loader.persistent_workers
    parallel = list(loader)
    assert len(serial) == 5 and len(parallel) == 3
    for (images_a, targets_a), (images_b, targets_b) in zip(serial[2:], parallel, strict=True):
        assert isinstance(images_a, list) and isinstance(targets_a, list) and len(images_a) == 3
        for a in zip(images_a, targets_a, strict=True):
            b = (images_b.pop(0), targets_b.pop(0))
            assert _same(a, b)


def test_eval_loader_shards(tmp_path: Path) -> None:
    data = {
        "images": [{"id": i + 1, "file_name": "x.png", "width": 8, "height": 8} for i in range(7)],
        "annotations": [],
        "categories": [{"id": 1, "name": "a"}],
    }
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    ds = DetectionDataset(data, tmp_path)
    seen = []
    state = torch.get_rng_state()
    for rank in range(3):
        ids = [t["image_id"] for _, targets in build_eval_loader(ds, 2, 0, rank, 3) for t in targets]
        assert ids == sorted(ids)
        seen += ids
    assert seen == list(range(1, 8))  # contiguous shards, nothing twice, nothing left out
    assert torch.equal(torch.get_rng_state(), state)
