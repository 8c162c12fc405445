"""What each training method costs per detector: one full training step, side by side in one process.

For each detector (RetinaNet, FCOS, Faster R-CNN, from their synthetic CPU configs) one ``Trainer`` is set
up per method, all from the same seed (so identical initial weights), and each runs the trainer's own steps
on one fixed batch of the synthetic train split, held in memory: ``_to_device``, ``_forward`` (detector +
``weighting.combine``), ``_agree``, ``_backward`` (with clipping), ``_optimizer_step`` and
``_weighting_step``; the periodic log / checkpoint / eval is left out. Methods alternate step by step (the
starting method rotates every round) so that drift on a shared machine hits them alike; the table gives
median process CPU ms and wall ms per step and their ratios to the detector's baseline (plain losses,
equal weights).

The method ``bayesian+rlo, no plain`` (``--no-plain``) is ``bayesian+rlo`` with the plain σ = 1 measure
of issue 9 switched off by a patch of the detectors' ``task_loss`` (the Bayesian loss alone, its value
standing in for the plain one): the difference to ``bayesian+rlo`` is what the plain measure costs.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/bench_methods.py [--detectors retinanet fcos faster_rcnn]
[--repeats 15] [--threads 1] [--profile bayesian+rlo]``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

import robustdet.models.dense as dense_module
import robustdet.models.faster_rcnn as faster_rcnn_module
from robustdet.config import Config, load_config
from robustdet.data import collate
from robustdet.engine.batch import Batch, to_device
from robustdet.engine.trainer import Trainer
from robustdet.losses import LossConfig, TaskLoss, task_loss
from robustdet.losses.focal import bayesian_binary_cross_entropy, bayesian_cross_entropy, bayesian_focal_loss
from robustdet.losses.smooth_l1 import bayesian_smooth_l1_loss
from robustdet.losses.task import box_beta

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "retinanet": REPO / "configs" / "default.yaml",
    "fcos": REPO / "configs" / "fcos_synthetic.yaml",
    "faster_rcnn": REPO / "configs" / "faster_rcnn_synthetic.yaml",
}
METHODS: dict[str, list[str]] = {
    "baseline": ["loss.bayesian=false", "weighting.name=equal"],
    "bayesian": ["loss.bayesian=true", "weighting.name=equal"],
    "avw": ["loss.bayesian=false", "weighting.name=avw"],
    "rlo": ["loss.bayesian=false", "weighting.name=rlo"],
    "bayesian+rlo": ["loss.bayesian=true", "weighting.name=rlo"],
    "uw": ["loss.bayesian=false", "weighting.name=uw"],
    "dwa": ["loss.bayesian=false", "weighting.name=dwa"],
}
NO_PLAIN = "bayesian+rlo, no plain"


def _bayesian_only(kind: str, pred: Tensor, target: Tensor, log_var: Tensor | None, loss: LossConfig) -> TaskLoss:
    """``task_loss`` without the plain σ = 1 measure: the Bayesian value alone, itself standing in for the
    plain loss (a detached alias costs nothing; the per-level sums of it remain, a few [B, A] passes)."""
    if log_var is None or (kind == "box" and loss.box_loss == "giou"):
        return task_loss(kind, pred, target, log_var, loss)  # type: ignore[arg-type]
    if kind == "focal":
        value = bayesian_focal_loss(pred, target, log_var, loss.focal_alpha, loss.focal_gamma)
        # [rows, 0]: the detector's sum over classes of it is an allocation, not a pass over the logits
        return TaskLoss(value, value.detach()[:, :0])
    if kind == "bce":
        value = bayesian_binary_cross_entropy(pred, target, log_var)
    elif kind == "ce":
        value = bayesian_cross_entropy(pred, target, log_var)
    else:
        value = bayesian_smooth_l1_loss(pred, target, log_var, beta=box_beta(loss), reduction="none").sum(dim=-1)
    return TaskLoss(value, value.detach())


@contextlib.contextmanager
def plain_measure_off() -> Iterator[None]:
    saved = dense_module.task_loss, faster_rcnn_module.task_loss
    dense_module.task_loss = _bayesian_only  # type: ignore[assignment]
    faster_rcnn_module.task_loss = _bayesian_only  # type: ignore[assignment]
    try:
        yield
    finally:
        dense_module.task_loss, faster_rcnn_module.task_loss = saved


def method_config(detector: str, overrides: list[str], extra: list[str]) -> Config:
    # in-process data, no periodic work: the step alone is timed
    common = ["data.num_workers=0", "log.progress=false", "train.device=cpu", "eval.period=0"]
    return load_config(CONFIGS[detector], [*overrides, *common, *extra])


class MethodStep:
    """A ``Trainer`` set up to iteration 0 whose ``step`` runs one training iteration on a fixed batch."""

    def __init__(self, cfg: Config, out_dir: Path, batch_size: int, no_plain: bool = False) -> None:
        self.trainer = tr = Trainer(cfg, out_dir)
        tr._setup()  # same seed for every method: identical initial weights
        tr.model.train()  # as Trainer._loop does before its first iteration
        # a fixed batch of the train split (augmentation seeded as the loader does, per index)
        images, targets = collate([tr.train_set[(i, cfg.seed + i)] for i in range(batch_size)])
        self.images, self.targets = images, targets
        self.no_plain = no_plain
        self.it = 0

    def step(self) -> None:
        tr = self.trainer
        with plain_measure_off() if self.no_plain else contextlib.nullcontext():
            batch: Batch = to_device(self.images, self.targets, tr.device)
            step = tr._forward(self.it, batch)
            if tr._agree(step):
                raise RuntimeError("non-finite loss in the benchmark")
            tr._backward(step)
            tr._optimizer_step(step)
            tr._weighting_step(step)
        self.it += 1

    def close(self) -> None:
        if self.trainer.log is not None:
            self.trainer.log.close()


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    """(wall s, process CPU s) of ``fn``: on a CPU shared with other jobs the wall time mostly measures the
    wait for a core, the CPU time the step's own work (one torch thread, so it is not summed over cores)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_detector(detector: str, args: argparse.Namespace, tmp: Path) -> list[str]:
    methods = dict(METHODS)
    if args.no_plain:
        methods[NO_PLAIN] = METHODS["bayesian+rlo"]
    if args.methods:
        methods = {k: v for k, v in methods.items() if k in args.methods or k == "baseline"}
    extra = list(args.set or [])
    if detector == "faster_rcnn" and args.frcnn_rois:
        extra.append(f"model.box_batch_size_per_image={args.frcnn_rois}")
    steps = {
        name: MethodStep(
            method_config(detector, ov, extra), tmp / f"{detector}-{i}", args.batch_size, no_plain=name == NO_PLAIN
        )
        for i, (name, ov) in enumerate(methods.items())
    }
    names = list(steps)
    for _ in range(args.warmup):
        for name in names:
            steps[name].step()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for r in range(args.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            times[name].append(timed(steps[name].step))
    if args.profile:
        for name in ("baseline", *args.profile):
            if name in steps:
                profile(detector, name, steps[name])
    for s in steps.values():
        s.close()
    base_wall = statistics.median(t[0] for t in times["baseline"])
    base_cpu = statistics.median(t[1] for t in times["baseline"])
    lines = []
    for name in names:
        wall = statistics.median(t[0] for t in times[name])
        cpus = [t[1] for t in times[name]]
        cpu = statistics.median(cpus)
        q1, _, q3 = statistics.quantiles(cpus, n=4) if len(cpus) > 1 else (cpu, cpu, cpu)
        lines.append(
            f"| {detector} | {name} | {cpu * 1e3:.0f} | {q1 * 1e3:.0f}-{q3 * 1e3:.0f} | {cpu / base_cpu:.3f} "
            f"| {wall * 1e3:.0f} | {wall / base_wall:.3f} |"
        )
    return lines


def plain_cost_loss_only(detector: str, args: argparse.Namespace, tmp: Path) -> str:
    """The plain measure's cost alone: the Bayesian + RLO detector's losses from fixed head outputs (matching,
    losses, per-level sums; forward + backward to the head outputs), with the plain measure on and off
    alternating; CPU ms, medians. Dense detectors only (their ``compute_level_losses``)."""
    cfg = method_config(detector, METHODS["bayesian+rlo"], list(args.set or []))
    ms = MethodStep(cfg, tmp / "plain", args.batch_size)
    model = ms.trainer.model
    assert isinstance(model, dense_module.DenseDetector)
    batch = to_device(ms.images, ms.targets, ms.trainer.device)
    with torch.no_grad():
        image_list, targets = model.transform(batch.images, batch.targets)
        features = list(model.backbone(image_list.tensors).values())
        outputs = model.head(features)
        anchors, counts = model.batch_anchors(image_list, features)
    leaves = {k: v.detach().requires_grad_(True) for k, v in outputs.items()}

    def losses() -> None:
        for v in leaves.values():
            v.grad = None
        model.compute_level_losses(targets, leaves, anchors, counts).level_losses.sum().backward()

    def losses_no_plain() -> None:
        with plain_measure_off():
            losses()

    on, off = [], []
    for r in range(args.warmup + 3 * args.repeats):
        pair = [(on, losses), (off, losses_no_plain)]
        for out, fn in pair if r % 2 else pair[::-1]:
            cpu = timed(fn)[1]
            if r >= args.warmup:
                out.append(cpu)
    ms.close()
    a, b = statistics.median(on), statistics.median(off)
    return f"| {detector} | {a * 1e3:.2f} | {b * 1e3:.2f} | {(a - b) * 1e3:.2f} |"


def profile(detector: str, name: str, step: MethodStep, steps: int = 3) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step.step()
    print(f"\n### profile: {detector}, {name}, {steps} steps, by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detectors", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--methods", nargs="+", default=None, help="a subset of the methods (baseline always)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--frcnn-rois", type=int, default=None, help="model.box_batch_size_per_image for Faster R-CNN")
    parser.add_argument("--no-plain", action="store_true", help=f"add the method {NO_PLAIN!r}")
    parser.add_argument(
        "--plain-loss-only", action="store_true", help="time the plain measure on the losses alone (dense detectors)"
    )
    parser.add_argument("--profile", nargs="*", default=None, help="methods to profile (with the baseline)")
    parser.add_argument("--set", nargs="*", default=None, help="extra config overrides for every method")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch_size}, {args.repeats} repeats "
        f"after {args.warmup} warm-up rounds, methods alternating"
    )
    print("| detector | method | CPU ms / step | CPU quartiles ms | CPU ratio | wall ms / step | wall ratio |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        if args.plain_loss_only:
            print("| detector | losses CPU ms, plain on | plain off | plain measure ms |\n|---|---|---|---|")
            for detector in args.detectors:
                if detector != "faster_rcnn":
                    print(plain_cost_loss_only(detector, args, Path(tmp)), flush=True)
            return
        for detector in args.detectors:
            for line in run_detector(detector, args, Path(tmp)):
                print(line, flush=True)


if __name__ == "__main__":
    main()
