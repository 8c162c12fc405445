"""One training step of robustdet's per-level RetinaNet against torchvision's RetinaNet, side by side.

Both models have identical weights (torchvision's is loaded with our state dict) and get the same batch;
the loss is the same quantity (per_image normalisation, L1 box loss, torchvision's defaults). Measured:

- step: forward (transform, backbone, head, anchors, loss) + backward, median ms;
- loss: the loss alone from fixed head outputs (matching + losses, forward + backward to the head
  outputs), median ms.

Measurements alternate between the two models so that drift on a shared machine hits both alike.

Run: ``.venv/bin/python benchmarks/bench_train_step.py [--device cpu|cuda] [--repeats 10]``.
Prints a Markdown table with the ratio ours / torchvision (below 1: ours is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead

from robustdet.config import Config, config_from_dict
from robustdet.losses import set_finite_checks
from robustdet.models import PerLevelRetinaNet, build_model
from robustdet.models.anchors import build_anchor_generator
from robustdet.models.backbones import build_backbone


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    size: int  # image width (and height unless ``height`` is given)
    boxes_per_image: int
    height: int | None = None


CASES = (
    Case("resnet18-fpn64, 16 x 128 px", 16, 128, 6),
    Case("resnet18-fpn64, 2 x 512 px", 2, 512, 12),
)


def make_cfg(size: int) -> Config:
    return config_from_dict(
        {
            "model": {
                "backbone": "resnet18",
                "fpn_channels": 64,
                "head_norm": "group_norm",
                "group_norm_groups": 16,
                "min_size": size,
                "max_size": size,
                "anchor_sizes": [16, 32, 64, 128, 256] if size <= 256 else [32, 64, 128, 256, 512],
            },
            "loss": {"normalization": "per_image", "box_loss": "l1"},
        }
    )


def torchvision_twin(model: PerLevelRetinaNet, cfg: Config, num_classes: int) -> RetinaNet:
    m = cfg.model
    anchors = build_anchor_generator(m.anchor_sizes, m.anchor_scales, m.aspect_ratios)
    head = RetinaNetHead(
        m.fpn_channels,
        anchors.num_anchors_per_location()[0],
        num_classes,
        norm_layer=(lambda c: torch.nn.GroupNorm(m.group_norm_groups, c)) if m.head_norm == "group_norm" else None,
    )
    tv = RetinaNet(
        build_backbone(m, "p3p7"),
        num_classes,
        min_size=m.min_size,
        max_size=m.max_size,
        anchor_generator=anchors,
        head=head,
    )
    tv.load_state_dict(model.state_dict())
    return tv


def make_batch(
    case: Case, num_classes: int, device: torch.device
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    width, height = case.size, case.height or case.size
    extent = torch.tensor([float(width), float(height)])
    for _ in range(case.batch):
        images.append(torch.rand(3, height, width, generator=g).to(device))
        n = case.boxes_per_image
        wh = min(width, height) * (0.04 + 0.6 * torch.rand(n, 2, generator=g) ** 2)  # many small, a few large
        xy = (extent - wh) * torch.rand(n, 2, generator=g)
        boxes = torch.cat([xy, xy + wh], 1)
        targets.append(
            {
                "boxes": boxes.to(device),
                "labels": torch.randint(0, num_classes, (n,), generator=g).to(device),
            }
        )
    return images, targets


def timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def alternate(
    a: Callable[[], None], b: Callable[[], None], repeats: int, warmup: int, device: torch.device
) -> tuple[float, float]:
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(timed(a, device))
        tb.append(timed(b, device))
    return statistics.median(ta), statistics.median(tb)


def run_case(case: Case, args: argparse.Namespace, device: torch.device) -> list[str]:
    cfg = make_cfg(case.size)
    torch.manual_seed(0)
    ours = build_model(cfg, args.num_classes)
    assert isinstance(ours, PerLevelRetinaNet)
    tv = torchvision_twin(ours, cfg, args.num_classes)
    ours.to(device).train()
    tv.to(device).train()
    images, targets = make_batch(case, args.num_classes, device)

    # same quantity, or the timing comparison means nothing
    ours_total = ours(images, targets).level_losses.sum()
    tv_losses = tv(images, targets)
    tv_total = tv_losses["classification"] + tv_losses["bbox_regression"]
    rel = abs(float(ours_total.detach()) - float(tv_total.detach())) / abs(float(tv_total.detach()))
    if rel > 1e-4:
        raise RuntimeError(
            f"{case.name}: losses differ, ours {float(ours_total)} vs torchvision {float(tv_total)}"
        )

    def step_ours() -> None:
        ours.zero_grad(set_to_none=True)
        ours(images, targets).level_losses.sum().backward()

    def step_tv() -> None:
        tv.zero_grad(set_to_none=True)
        losses = tv(images, targets)
        (losses["classification"] + losses["bbox_regression"]).backward()

    step = alternate(step_ours, step_tv, args.repeats, args.warmup, device)

    # loss alone: head outputs fixed once (leaves, so backward stops at them)
    with torch.no_grad():
        image_list, t = ours.transform(images, [dict(x) for x in targets])
        features = list(ours.backbone(image_list.tensors).values())
        outputs = ours.head(features)
        anchors, counts = ours.batch_anchors(image_list, features)
    leaves = {k: v.detach().requires_grad_(True) for k, v in outputs.items()}
    anchor_list = tv.anchor_generator(image_list, features)

    def loss_ours() -> None:
        for v in leaves.values():
            v.grad = None
        ours.compute_level_losses(t, leaves, anchors, counts).level_losses.sum().backward()

    def loss_tv() -> None:
        for v in leaves.values():
            v.grad = None
        losses = tv.compute_loss(t, leaves, anchor_list)
        (losses["classification"] + losses["bbox_regression"]).backward()

    loss = alternate(loss_ours, loss_tv, args.repeats, args.warmup, device)
    return [
        f"| {case.name} | step | {step[0]:.1f} | {step[1]:.1f} | {step[0] / step[1]:.2f} |",
        f"| {case.name} | loss only | {loss[0]:.2f} | {loss[1]:.2f} | {loss[0] / loss[1]:.2f} |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument(
        "--finite-checks",
        choices=["on", "off"],
        default="on",
        help="robustdet.losses' NaN/inf input scans (one host sync per call on CUDA)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    set_finite_checks(args.finite_checks == "on")
    device = torch.device(args.device)
    print(
        f"device {device}, torch {torch.__version__}, {args.num_classes} classes, {args.repeats} repeats, "
        f"finite checks {args.finite_checks}"
    )
    print("| case | what | ours ms | torchvision ms | ours / torchvision |")
    print("|---|---|---|---|---|")
    for case in CASES:
        for line in run_case(case, args, device):
            print(line, flush=True)


if __name__ == "__main__":
    main()
