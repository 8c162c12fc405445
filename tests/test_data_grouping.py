"""Aspect-ratio grouped batches: one group per batch, a pure function of (seed, iteration, rank)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from robustdet.config import DataConfig
from robustdet.data import DetectionDataset, build_train_loader
from robustdet.data.loader import AspectRatioBatchSampler, aspect_groups, epoch_seed, sample_seed

# 15 landscape (0) and 8 portrait (1) images, interleaved
GROUPS = [int(i % 3 == 1) for i in range(23)]


def test_each_batch_holds_one_group_and_resume_replays_it() -> None:
    full = list(AspectRatioBatchSampler(GROUPS, 4, seed=3, max_iter=40))
    assert len(full) == 40 and all(len(b) == 4 for b in full)
    for batch in full:
        assert len({GROUPS[i] for i, _ in batch}) == 1
    for k in (0, 1, 5, 6, 17, 39):
        # a fresh sampler started at k: what a resumed run builds
        assert list(AspectRatioBatchSampler(GROUPS, 4, seed=3, start_iter=k, max_iter=40)) == full[k:]
        assert AspectRatioBatchSampler(GROUPS, 4, seed=3).batch(k) == full[k]
    seeds = [s for batch in full for _, s in batch]
    assert len(set(seeds)) == len(seeds) and seeds[:4] == [sample_seed(3, p) for p in range(4)]
    other = list(AspectRatioBatchSampler(GROUPS, 4, seed=4, max_iter=6))
    assert full[:6] != other


def test_every_image_once_per_epoch_except_the_documented_fill() -> None:
    sampler = AspectRatioBatchSampler(GROUPS, 4, seed=3, max_iter=12)
    assert sampler.batches_per_epoch == 4 + 2  # ceil(15 / 4) + ceil(8 / 4)
    batches = list(sampler)
    for epoch in (0, 1):
        counts = Counter(i for b in batches[epoch * 6 : (epoch + 1) * 6] for i, _ in b)
        assert set(counts) == set(range(23))
        # the landscape group's short last batch is filled with its first image in the epoch's order
        perm = torch.randperm(23, generator=torch.Generator().manual_seed(epoch_seed(3, epoch))).tolist()
        first_landscape = next(i for i in perm if GROUPS[i] == 0)
        assert {i for i, c in counts.items() if c > 1} == {first_landscape} and counts[first_landscape] == 2
    order = [[i for i, _ in b] for b in batches]
    assert order[:6] != order[6:12]  # a new order (and new batches) each epoch
    # a group smaller than a batch repeats cyclically
    tiny = list(AspectRatioBatchSampler([0, 0, 0, 0, 1, 1], 4, seed=0, max_iter=2))
    portrait = next(b for b in tiny if b[0][0] >= 4)
    indices = [i for i, _ in portrait]
    assert indices[:2] == indices[2:] and set(indices) == {4, 5}


def test_ranks_get_disjoint_batches_of_the_same_stream() -> None:
    groups = [int(i % 3 == 1) for i in range(24)]  # 16 and 8: no filling, so disjointness is exact
    single = list(AspectRatioBatchSampler(groups, 4, seed=7, max_iter=12))
    ranks = [list(AspectRatioBatchSampler(groups, 4, seed=7, max_iter=6, rank=r, world_size=2)) for r in (0, 1)]
    for i in range(6):
        r0, r1 = ({index for index, _ in ranks[r][i]} for r in (0, 1))
        assert not r0 & r1
        # rank r's batch i is batch 2i + r of the one-process stream, seeds included
        assert ranks[0][i] == single[2 * i] and ranks[1][i] == single[2 * i + 1]
    epoch = sorted(index for r in (0, 1) for b in ranks[r][:3] for index, _ in b)
    assert epoch == list(range(24))
    with pytest.raises(ValueError, match="groups must be 0 or 1"):
        AspectRatioBatchSampler([0, 2], 1, seed=0)


def test_train_loader_groups_by_the_annotated_size(tmp_path: Path) -> None:
    Image.new("RGB", (12, 8), (200, 0, 0)).save(tmp_path / "wide.png")
    Image.new("RGB", (8, 12), (0, 200, 0)).save(tmp_path / "tall.png")
    names = ["tall.png" if g else "wide.png" for g in GROUPS]
    data = {
        "images": [
            {"id": i + 1, "file_name": n, "width": 8 if g else 12, "height": 12 if g else 8}
            for i, (n, g) in enumerate(zip(names, GROUPS, strict=True))
        ],
        "annotations": [],
        "categories": [{"id": 1, "name": "a"}],
    }
    ds = DetectionDataset(data, tmp_path, train=True)
    assert aspect_groups(ds) == GROUPS
    assert DataConfig(group_aspect_ratio=True).group_aspect_ratio and not DataConfig().group_aspect_ratio
    loader = build_train_loader(ds, 4, seed=3, max_iter=7, group_aspect_ratio=True)
    expected = list(AspectRatioBatchSampler(GROUPS, 4, seed=3, max_iter=7))
    for (images, targets), batch in zip(loader, expected, strict=True):
        assert [t["image_id"] - 1 for t in targets] == [i for i, _ in batch]
        assert len({tuple(img.shape) for img in images}) == 1  # one canvas, nothing to pad
