"""The FCOS loss alone: robustdet's batched per-level loss against torchvision's ``FCOS.compute_loss``.

Both get the same head outputs, points and boxes (box_loss giou, per_batch: the same quantity, tested
equal in tests/test_models_fcos.py); measured is forward + backward to the head outputs, median ms,
alternating between the two so that drift on a shared machine hits both alike. No backbone is run.

Run: ``.venv/bin/python benchmarks/bench_fcos_loss.py [--device cpu|cuda] [--repeats 10] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.image_list import ImageList

from robustdet.config import config_from_dict
from robustdet.losses import set_finite_checks
from robustdet.models import PerLevelFCOS, build_model

# (name, images, padded height, padded width, classes, boxes per image)
CASES = (
    ("COCO-like, 2 x 800x1216, 80 classes, 15 boxes", 2, 800, 1216, 80, 15),
    ("COCO-like, 2 x 800x1216, 80 classes, 60 boxes", 2, 800, 1216, 80, 60),
    ("synthetic, 16 x 128x128, 5 classes, 6 boxes", 16, 128, 128, 5, 6),
)


def setup(batch: int, height: int, width: int, classes: int, boxes: int, device: torch.device, seed: int = 0):
    cfg = config_from_dict(
        {
            "model": {"name": "fcos", "backbone": "resnet18", "fpn_channels": 16, "group_norm_groups": 4},
            "loss": {"box_loss": "giou", "normalization": "per_batch"},
        }
    )
    model = build_model(cfg, classes).to(device)
    assert isinstance(model, PerLevelFCOS)
    g = torch.Generator().manual_seed(seed)
    feats = [
        torch.zeros(batch, 1, math.ceil(height / s), math.ceil(width / s), device=device)
        for s in (8, 16, 32, 64, 128)
    ]
    image_list = ImageList(torch.zeros(batch, 3, height, width, device=device), [(height, width)] * batch)
    points, counts = model.batch_anchors(image_list, feats)
    a = points.shape[0]
    outputs = {
        "cls_logits": torch.randn(batch, a, classes, generator=g) - 4.6,
        "bbox_regression": torch.rand(batch, a, 4, generator=g) * 4,
        "bbox_ctrness": torch.randn(batch, a, 1, generator=g),
    }
    outputs = {k: v.to(device).requires_grad_(True) for k, v in outputs.items()}
    targets = []
    for _ in range(batch):
        wh = torch.exp(torch.rand(boxes, 2, generator=g) * math.log(min(height, width) / 8)) * 8
        xy = torch.rand(boxes, 2, generator=g) * (torch.tensor([width, height]) - wh)
        labels = torch.randint(0, classes, (boxes,), generator=g)
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device), "labels": labels.to(device)})
    tv = FCOS(model.backbone, classes, head=model.head, anchor_generator=model.anchor_generator).to(device)
    return model, tv, outputs, points, counts, targets


def ours_loss(model: PerLevelFCOS, targets, outputs, points: Tensor, counts: list[int]) -> Tensor:
    return model.compute_level_losses(targets, outputs, points, counts).level_losses.sum()


def torchvision_loss(tv: FCOS, targets, outputs, points: Tensor, counts: list[int]) -> Tensor:
    return sum(tv.compute_loss(targets, outputs, [points] * len(targets), counts).values())


def timed(fn: Callable[[], Tensor], outputs: dict[str, Tensor], device: torch.device) -> float:
    for v in outputs.values():
        v.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-finite-checks", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_finite_checks:
        set_finite_checks(False)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {args.repeats}\n")
    print("| case | torchvision (ms) | robustdet (ms) | robustdet / torchvision |")
    print("|---|---|---|---|")
    for name, *shape in CASES:
        model, tv, outputs, points, counts, targets = setup(*shape, device)
        ours = partial(ours_loss, model, targets, outputs, points, counts)
        theirs = partial(torchvision_loss, tv, targets, outputs, points, counts)

        torch.testing.assert_close(ours(), theirs(), rtol=1e-4, atol=1e-5)
        for _ in range(2):
            timed(ours, outputs, device)
            timed(theirs, outputs, device)
        t_ours, t_tv = [], []
        for _ in range(args.repeats):
            t_tv.append(timed(theirs, outputs, device))
            t_ours.append(timed(ours, outputs, device))
        a, b = statistics.median(t_tv), statistics.median(t_ours)
        print(f"| {name} | {a:.1f} | {b:.1f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
