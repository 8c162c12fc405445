"""Forward+backward cost of the Bayesian losses against the standard ones, at RetinaNet scale.

Run: ``.venv/bin/python benchmarks/bench_losses.py [--repeats 30] [--device cpu|cuda]``.
One training step's classification and regression losses: 2 images × 50,000 anchors, 80 classes
(logits [100000, 80]), 200 foreground anchors (deltas [200, 4]), each loss summed as the detector does.
Three variants run interleaved in every repeat, so that a busy machine slows them alike; the table gives
medians over the repeats and the ratios Bayesian / standard. The results live in docs/benchmarks.md.

``bench_losses`` is importable; ``main`` runs every section of this file (a weighting section can be
added beside the losses one).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision

from robustdet.losses import (
    bayesian_focal_loss,
    bayesian_smooth_l1_loss,
    set_finite_checks,
    sigmoid_focal_loss,
    smooth_l1_loss,
)


def _timer(device: torch.device) -> Callable[[], float]:
    if device.type == "cuda":

        def clock() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return clock
    return time.perf_counter


def bench_losses(
    repeats: int = 30,
    device: str = "cpu",
    num_images: int = 2,
    anchors_per_image: int = 50_000,
    num_classes: int = 80,
    num_foreground: int = 200,
    beta: float = 0.1,
    finite_checks: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """Median milliseconds of forward+backward per variant, and the Bayesian / standard ratios.

    Variants (each: classification + regression, summed):
      ``torchvision``: ``torchvision.ops.sigmoid_focal_loss`` + ``F.smooth_l1_loss``;
      ``standard``: this package's ``sigmoid_focal_loss`` + ``smooth_l1_loss``;
      ``bayesian``: ``bayesian_focal_loss`` + ``bayesian_smooth_l1_loss`` with learnable s_cls, s_reg.
    Also the classification part alone (``*_cls``), which is where all the cost is.
    """
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    n = num_images * anchors_per_image
    # Logits around the RetinaNet prior bias log(0.01/0.99), as early in training.
    logits = (torch.randn(n, num_classes, generator=gen) - 4.6).to(dev).requires_grad_()
    targets = torch.zeros(n, num_classes)
    fg = torch.randperm(n, generator=gen)[:num_foreground]
    targets[fg, torch.randint(num_classes, (num_foreground,), generator=gen)] = 1.0
    targets = targets.to(dev)
    deltas = torch.randn(num_foreground, 4, generator=gen).mul(0.2).to(dev).requires_grad_()
    gt_deltas = torch.randn(num_foreground, 4, generator=gen).mul(0.2).to(dev)
    s_cls = torch.tensor(0.0, device=dev, requires_grad=True)
    s_reg = torch.tensor(1.0, device=dev, requires_grad=True)
    leaves = (logits, deltas, s_cls, s_reg)

    variants: dict[str, Callable[[], torch.Tensor]] = {
        "torchvision_cls": lambda: torchvision.ops.sigmoid_focal_loss(logits, targets, reduction="sum"),
        "standard_cls": lambda: sigmoid_focal_loss(logits, targets, reduction="sum"),
        "bayesian_cls": lambda: bayesian_focal_loss(logits, targets, s_cls, reduction="sum"),
        "torchvision": lambda: (
            torchvision.ops.sigmoid_focal_loss(logits, targets, reduction="sum")
            + F.smooth_l1_loss(deltas, gt_deltas, beta=beta, reduction="sum")
        ),
        "standard": lambda: (
            sigmoid_focal_loss(logits, targets, reduction="sum")
            + smooth_l1_loss(deltas, gt_deltas, beta=beta, reduction="sum")
        ),
        "bayesian": lambda: (
            bayesian_focal_loss(logits, targets, s_cls, reduction="sum")
            + bayesian_smooth_l1_loss(deltas, gt_deltas, s_reg, beta=beta, reduction="sum")
        ),
    }
    clock = _timer(dev)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    previous = set_finite_checks(finite_checks)
    try:
        for rep in range(repeats + 2):
            for name, fn in variants.items():
                for leaf in leaves:
                    leaf.grad = None
                start = clock()
                fn().backward()
                elapsed = clock() - start
                if rep >= 2:  # the first two rounds warm the allocator and caches
                    samples[name].append(1e3 * elapsed)
    finally:
        set_finite_checks(previous)

    result = {f"{name}_ms": statistics.median(v) for name, v in samples.items()}
    for part in ("", "_cls"):
        result[f"bayesian/standard{part}"] = result[f"bayesian{part}_ms"] / result[f"standard{part}_ms"]
        result[f"bayesian/torchvision{part}"] = result[f"bayesian{part}_ms"] / result[f"torchvision{part}_ms"]
        result[f"standard/torchvision{part}"] = result[f"standard{part}_ms"] / result[f"torchvision{part}_ms"]
    return result


def print_losses(result: dict[str, float]) -> None:
    print("| variant | cls + reg (ms) | cls only (ms) |")
    print("|---|---|---|")
    for name in ("torchvision", "standard", "bayesian"):
        print(f"| {name} | {result[f'{name}_ms']:.1f} | {result[f'{name}_cls_ms']:.1f} |")
    print()
    print("| ratio | cls + reg | cls only |")
    print("|---|---|---|")
    for ratio in ("bayesian/standard", "bayesian/torchvision", "standard/torchvision"):
        print(f"| {ratio} | {result[ratio]:.2f} | {result[ratio + '_cls']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--no-finite-checks", action="store_true", help="time the losses with the NaN/inf input scans off"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
          f"{args.repeats} repeats, finite checks {'off' if args.no_finite_checks else 'on'}")
    print("\n## Losses\n")
    result = bench_losses(repeats=args.repeats, device=args.device, finite_checks=not args.no_finite_checks)
    print_losses(result)


if __name__ == "__main__":
    main()
