"""Two side-by-side CPU timings in one process, alternating the two sides so that drift hits both alike.

Order: A B, then B A, repeat after repeat.

1. ``split``: the dense loss in steps (assign → anchor_losses → level_output, ``models/dense.py``) against
   the one-block loss it replaced, RetinaNet. The old ``dense.py`` and ``retinanet.py`` are read from git
   (``--old-rev``, default the commit before the split) into temporary modules; both models get the same
   weights and batch and must give the same loss. Measured: a training step (forward + backward) and the
   loss alone from fixed head outputs.
2. ``uncertainty``: a training step of the demo config (``configs/default.yaml``: RetinaNet resnet18-FPN64,
   batch 8 x 128 px, 5 classes) without and with ``model.box_uncertainty`` (α head + KL-Loss). The demo
   config's ``loss.bayesian`` is set false: the combination is refused (docs/losses.md).

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/bench_loss_steps.py [--repeats 15] [--threads 1]``.
Prints medians (ms) and the ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from robustdet.config import config_from_dict, load_config
from robustdet.models import build_model

REPO = Path(__file__).resolve().parents[1]
OLD_REV = "82512b9"


def old_retinanet_class(rev: str) -> type:
    """``PerLevelRetinaNet`` as it was at ``rev``, loaded from git into temporary modules."""
    tmp = Path(tempfile.mkdtemp(prefix="robustdet_old_"))
    for name in ("dense", "retinanet"):
        text = subprocess.run(
            ["git", "show", f"{rev}:src/robustdet/models/{name}.py"], cwd=REPO, check=True, capture_output=True,
            text=True,
        ).stdout
        text = text.replace("from robustdet.models.dense import", "from old_dense import")
        (tmp / f"old_{name}.py").write_text(text)
    sys.path.insert(0, str(tmp))
    for name in ("old_dense", "old_retinanet"):
        spec = importlib.util.spec_from_file_location(name, tmp / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules["old_retinanet"].PerLevelRetinaNet


def make_batch(batch: int, size: int, boxes: int, num_classes: int) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, size, size, generator=g))
        wh = size * (0.06 + 0.5 * torch.rand(boxes, 2, generator=g) ** 2)
        xy = (size - wh) * torch.rand(boxes, 2, generator=g)
        labels = torch.randint(0, num_classes, (boxes,), generator=g)
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": labels})
    return images, targets


def alternate(a: Callable[[], None], b: Callable[[], None], repeats: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for i in range(repeats):
        # ABBA: which side runs first swaps every repeat (measured: ±5 % from the order alone)
        for fn, out in ((a, ta), (b, tb))[:: 1 if i % 2 == 0 else -1]:
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1e3)
    return statistics.median(ta), statistics.median(tb)


def stepper(model: torch.nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]]) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(images, targets).level_losses.sum().backward()

    return step


def loss_only(model, images, targets) -> Callable[[], None]:
    with torch.no_grad():
        image_list, t = model.transform(images, [dict(x) for x in targets])
        features = list(model.backbone(image_list.tensors).values())
        outputs = model.head(features)
        anchors, counts = model.batch_anchors(image_list, features)
    leaves = {k: v.detach().requires_grad_(True) for k, v in outputs.items()}

    def run() -> None:
        for v in leaves.values():
            v.grad = None
        model.compute_level_losses(t, leaves, anchors, counts).level_losses.sum().backward()

    return run


def bench_split(args: argparse.Namespace) -> list[str]:
    cfg = config_from_dict(
        {
            "model": {"backbone": "resnet18", "fpn_channels": 64, "head_norm": "group_norm", "group_norm_groups": 16,
                      "min_size": 128, "max_size": 128, "anchor_sizes": [16, 32, 64, 128, 256]},
            "loss": {"normalization": "per_image", "box_loss": "l1"},
        }
    )
    torch.manual_seed(0)
    new = build_model(cfg, args.num_classes).train()
    old_cls = old_retinanet_class(args.old_rev)
    torch.manual_seed(0)
    old = old_cls.from_config(cfg.model, cfg.loss, args.num_classes).train()
    old.load_state_dict(new.state_dict())
    images, targets = make_batch(16, 128, 6, args.num_classes)
    with torch.no_grad():
        a, b = float(new(images, targets).level_losses.sum()), float(old(images, targets).level_losses.sum())
    if abs(a - b) > 1e-5 * abs(b):
        raise RuntimeError(f"the split loss {a} differs from the old one {b}")
    step = alternate(stepper(new, images, targets), stepper(old, images, targets), args.repeats, args.warmup)
    loss = alternate(loss_only(new, images, targets), loss_only(old, images, targets), args.repeats, args.warmup)
    return [
        f"| split (RetinaNet 16 x 128 px, {args.num_classes} classes) | step | {step[0]:.1f} | {step[1]:.1f} | "
        f"{step[0] / step[1]:.3f} |",
        f"| split (RetinaNet 16 x 128 px, {args.num_classes} classes) | loss only | {loss[0]:.2f} | {loss[1]:.2f} | "
        f"{loss[0] / loss[1]:.3f} |",
    ]


def bench_uncertainty(args: argparse.Namespace) -> list[str]:
    cfg = load_config(REPO / "configs" / "default.yaml", ["loss.bayesian=false"])
    with_unc = load_config(REPO / "configs" / "default.yaml", ["loss.bayesian=false", "model.box_uncertainty=true",
                                                              f"loss.box_uncertainty_form={args.form}"])
    num_classes = cfg.data.synthetic.num_classes
    torch.manual_seed(0)
    plain = build_model(cfg, num_classes).train()
    torch.manual_seed(0)
    unc = build_model(with_unc, num_classes).train()
    images, targets = make_batch(cfg.train.batch_size, cfg.model.min_size, 4, num_classes)
    step = alternate(stepper(unc, images, targets), stepper(plain, images, targets), args.repeats, args.warmup)
    return [
        f"| box_uncertainty, form {args.form} (demo config, batch {cfg.train.batch_size}) | step "
        f"| {step[0]:.1f} | {step[1]:.1f} | "
        f"{step[0] / step[1]:.3f} |"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--old-rev", default=OLD_REV)
    parser.add_argument("--only", choices=["split", "uncertainty"], default=None)
    parser.add_argument("--form", choices=["isolated", "kl", "detached"], default="isolated",
                        help="loss.box_uncertainty_form of the box_uncertainty side (the default's: isolated)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} repeats (medians)")
    print("| comparison | what | new ms | reference ms | new / reference |")
    print("|---|---|---|---|---|")
    if args.only in (None, "split"):
        for line in bench_split(args):
            print(line, flush=True)
    if args.only in (None, "uncertainty"):
        for line in bench_uncertainty(args):
            print(line, flush=True)


if __name__ == "__main__":
    main()
