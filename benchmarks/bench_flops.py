"""How close to the machine does the demo's training step run on this CPU?

For the demo configuration (``configs/default.yaml``: RetinaNet R18-FPN64, 128 px, batch 8, Bayesian
losses + RLO, AdamW): one training step as the trainer runs it (batch to float, forward, weighting
``combine``, backward, gradient clipping, AdamW, LR schedule, weighting ``step``) on one batch of the
synthetic training set held in memory.

- **FLOPs** of forward + backward, counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions
  and matrix products; elementwise ops, the optimizer and NMS-free loss bookkeeping count 0);
- **step time**: median of ``--repeats`` steps after ``--warmup``;
- **the machine's rate**: ``torch.mm`` of float32 square matrices (the size with the best median of
  several), on the same number of threads;
- **where the time goes**: ``torch.profiler`` over ``--profile-steps`` steps, grouped by
  ``record_function`` ranges this script places (module hooks on ``transform``, ``backbone``, ``head``;
  nothing in the library). Each backward op is charged to the range of the forward op that created it
  (matched by the autograd sequence number), so "backbone" is the backbone's forward and backward.
- the data loader's time per batch (decode + augmentation, ``num_workers=0``), which the demo runs in a
  worker process beside the step.

Run: ``.venv/bin/python benchmarks/bench_flops.py [--threads 2] [--repeats 20]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from robustdet.config import load_config
from robustdet.data import build_dataset, build_train_loader
from robustdet.engine.optim import build_optimizer
from robustdet.engine.runtime import seed_everything
from robustdet.engine.schedule import build_scheduler
from robustdet.losses import set_finite_checks
from robustdet.models import build_model
from robustdet.weighting import build_weighting

REPO = Path(__file__).resolve().parents[1]
PREFIX = "bench::"
# report order; "loss" is the model's forward outside transform/backbone/head (anchors, matching, losses)
# plus the weighting's combine
GROUPS = ("data", "transform", "backbone", "head", "loss", "backward (other)", "optimizer")


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(1e3 * (time.perf_counter() - start))
    return statistics.median(samples)


def matmul_gflops(sizes: tuple[int, ...], repeats: int) -> tuple[float, int]:
    """The best median float32 ``torch.mm`` rate over ``sizes``: (GFLOP/s, n)."""
    best = (0.0, 0)
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        ms = median_ms(lambda a=a, b=b: torch.mm(a, b), repeats, 2)
        best = max(best, (2 * n**3 / (ms * 1e-3) / 1e9, n))
    return best


class ModuleRanges:
    """``record_function`` ranges around submodules' forwards, opened and closed by hooks."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self._open: list[Any] = []
        self._handles = []
        for name, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(self._enter(name)))
            self._handles.append(module.register_forward_hook(self._exit))

    def _enter(self, name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any) -> None:
            rf = record_function(PREFIX + name)
            rf.__enter__()
            self._open.append(rf)

        return hook

    def _exit(self, _module: nn.Module, _args: Any, _out: Any) -> None:
        self._open.pop().__exit__(None, None, None)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def innermost_range(event: Any) -> str | None:
    e = event
    while e is not None:
        if e.name.startswith(PREFIX):
            return e.name[len(PREFIX) :]
        e = e.cpu_parent
    return None


def time_by_group(prof: Any, steps: int) -> dict[str, float]:
    """Milliseconds per step and group; backward ops go to the group of the forward op that made them."""
    events = list(prof.events())
    forward_group: dict[int, str] = {}
    for e in events:
        group = innermost_range(e)
        if e.sequence_nr >= 0 and group is not None and group != "backward":
            forward_group.setdefault(e.sequence_nr, group)
    ms: dict[str, float] = defaultdict(float)
    for e in events:
        group = innermost_range(e)
        if group is None:
            continue
        if group != "backward":
            ms[group] += e.self_cpu_time_total / 1e3
            continue
        if e.name.startswith(PREFIX):  # the backward range's own time (autograd engine overhead)
            ms["backward (other)"] += e.self_cpu_time_total / 1e3
        elif e.cpu_parent is not None and e.cpu_parent.name == PREFIX + "backward":  # top-level backward op
            target = forward_group.get(e.sequence_nr, "backward (other)") if e.name.startswith("autograd::") else (
                "backward (other)"
            )  # fmt: skip
            ms[target] += e.cpu_time_total / 1e3
    return {k: v / steps for k, v in ms.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--mm-sizes", type=int, nargs="+", default=[512, 1024, 2048])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    cfg = load_config(args.config, [])
    seed_everything(cfg.seed)
    set_finite_checks(False)  # as the trainer runs

    dataset = build_dataset(cfg.data.train, cfg.data, train=True)
    loader = iter(build_train_loader(dataset, batch_size=cfg.train.batch_size, seed=cfg.seed, num_workers=0))
    load_ms = median_ms(lambda: next(loader), 10, 1)
    images_u8, raw_targets = next(loader)  # the batch every step reuses, held in memory

    model = build_model(cfg, dataset.num_classes)
    model.train()
    weighting = build_weighting(cfg.weighting, len(model.level_names), cfg.seed)
    optimizer = build_optimizer(model, weighting, cfg)
    scheduler = build_scheduler(optimizer, cfg.train.schedule, 10**6)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    clip = cfg.train.clip_grad_norm if cfg.train.clip_grad_norm is not None else math.inf

    def batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        images = [img.float().div_(255) for img in images_u8]
        targets = [{"boxes": t["boxes"].as_subclass(torch.Tensor).float(), "labels": t["labels"]} for t in raw_targets]
        return images, targets

    def forward_backward() -> torch.Tensor:
        with record_function(PREFIX + "data"):
            images, targets = batch()
        with record_function(PREFIX + "loss"):
            out = model(images, targets)
            level_losses = out.level_losses.float()
            total = weighting.combine(level_losses) + out.extra_loss.float()
        optimizer.zero_grad(set_to_none=True)
        with record_function(PREFIX + "backward"):
            total.backward()
        return level_losses

    def step() -> None:
        level_losses = forward_backward()
        with record_function(PREFIX + "optimizer"):
            torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            scheduler.step()
            weighting.step(level_losses.detach())

    with FlopCounterMode(display=False) as counter:
        forward_backward()
    flops = counter.get_total_flops()
    by_module = counter.get_flop_counts()
    top = type(model).__name__

    def forward_flops(module: str) -> int:
        # forward ops only: FlopCounterMode's module tracking mislabels backward ops (e.g. it charged most
        # of the backbone body's convolution_backward to the FPN), so the split is by forward FLOPs
        counts = by_module.get(module, {})
        return int(sum(n for op, n in counts.items() if "backward" not in str(op)))

    forward_total = forward_flops("Global")

    step_ms = median_ms(step, args.repeats, args.warmup)
    mm_gflops, mm_n = matmul_gflops(tuple(args.mm_sizes), args.repeats)
    achieved = flops / (step_ms * 1e-3) / 1e9

    ranges = ModuleRanges({"transform": model.transform, "backbone": model.backbone, "head": model.head})
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.profile_steps):
            step()
    ranges.remove()
    groups = time_by_group(prof, args.profile_steps)
    profiled = sum(groups.values())

    print(f"torch {torch.__version__}, {threads} threads, config {args.config}, batch {cfg.train.batch_size}")
    print("\n| what | value |\n|---|---|")
    print(f"| FLOPs per step (forward + backward) | {flops / 1e9:.2f} G |")
    print(f"| of which forward | {forward_total / 1e9:.2f} G |")
    for name in ("backbone", "head"):
        share = forward_flops(f"{top}.{name}") / max(forward_total, 1)
        print(f"| {name}'s share of the forward FLOPs | {100 * share:.0f} % |")
    print(f"| step time (median of {args.repeats}) | {step_ms:.1f} ms |")
    print(f"| achieved rate | {achieved:.2f} GFLOP/s |")
    print(f"| torch.mm float32 (n={mm_n}, median) | {mm_gflops:.2f} GFLOP/s |")
    print(f"| share of the machine (achieved / torch.mm) | {100 * achieved / mm_gflops:.0f} % |")
    print(f"| data loader, per batch (decode + augment, main process) | {load_ms:.1f} ms |")
    print(f"\nwhere the time goes (torch.profiler, {args.profile_steps} steps, CPU time per step; the profiler "
          f"slows the step: {profiled:.0f} ms profiled vs {step_ms:.0f} ms)\n")  # fmt: skip
    print("| part | ms per step | share |\n|---|---|---|")
    for name in GROUPS:
        print(f"| {name} | {groups.get(name, 0.0):.1f} | {100 * groups.get(name, 0.0) / profiled:.0f} % |")
    other = {k: v for k, v in groups.items() if k not in GROUPS}
    if other:
        print(f"(other ranges: {other})")


if __name__ == "__main__":
    main()
