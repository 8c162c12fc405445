"""What ``train`` tells a person on the console: a start summary, and progress lines for batch jobs.

On a terminal the progress is a tqdm bar. In a batch job (stderr not a terminal: SLURM, ``nohup``, a pipe)
a bar's carriage returns fill the log file with one huge line, so there a plain line is printed every
``log.period`` iterations instead (as detectron2 does): iteration/max, ETA, loss, lr. ``make_progress``
makes that choice.
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import Any, TextIO

import torch
from torch import nn

from robustdet import distributed as dist
from robustdet.config import Config


def warn(msg: str) -> None:
    """``robustdet: warning: ...`` on stderr, once (by rank 0)."""
    if dist.is_main():
        print(f"robustdet: warning: {msg}", file=sys.stderr, flush=True)


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=max(0, round(seconds))))


class Progress:
    """No progress shown (``log.progress: false``, or a rank other than 0); the interface of the others."""

    def step(self, done: int, logged: bool, loss: torch.Tensor, lr: float) -> None:
        """Iteration ``done`` finished; ``logged``: it is a ``log.period`` iteration."""

    def close(self) -> None:
        pass


class BarProgress(Progress):
    """A tqdm bar on stderr, its loss and lr refreshed at the logged iterations."""

    def __init__(self, max_iter: int, start_iter: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=max_iter, initial=start_iter, desc="train", dynamic_ncols=True, file=sys.stderr)

    def step(self, done: int, logged: bool, loss: torch.Tensor, lr: float) -> None:
        self.bar.update(1)
        if logged:  # loss.item() would be a host sync every step
            self.bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", refresh=False)

    def close(self) -> None:
        self.bar.close()


class PlainProgress(Progress):
    """Plain progress lines, one per call of ``line``; the ETA from the iterations of this process."""

    def __init__(self, max_iter: int, start_iter: int, stream: TextIO) -> None:
        self.max_iter = max_iter
        self.start_iter = start_iter
        self.stream = stream
        self.t0 = time.perf_counter()

    def line(self, done: int, loss: float, lr: float) -> str:
        elapsed = time.perf_counter() - self.t0
        ran = done - self.start_iter
        eta = elapsed / ran * (self.max_iter - done) if ran > 0 else float("nan")
        eta_text = format_eta(eta) if eta == eta else "?"
        text = f"iter {done}/{self.max_iter}  eta {eta_text}  loss {loss:.4f}  lr {lr:.3e}"
        print(text, file=self.stream, flush=True)
        return text

    def step(self, done: int, logged: bool, loss: torch.Tensor, lr: float) -> None:
        if logged:
            self.line(done, float(loss.detach()), lr)


def make_progress(show: bool, max_iter: int, start_iter: int, console: TextIO) -> Progress:
    """A bar when stderr is a terminal, plain lines on ``console`` in a batch job (no carriage returns in
    its log file), nothing when ``show`` is false."""
    if not show:
        return Progress()
    if is_terminal(sys.stderr):
        return BarProgress(max_iter, start_iter)
    return PlainProgress(max_iter, start_iter, console)


def start_summary(
    cfg: Config,
    *,
    device: torch.device,
    world: int,
    model: nn.Module,
    train_set: Any,
    val_set: Any,
    plan: Any,
    out_dir: Any,
) -> str:
    """A few lines on what the run is about to do, as Ultralytics and detectron2 print them."""
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    boxes = sum(1 for a in train_set.coco.dataset.get("annotations", []) if not a.get("iscrowd", 0))
    methods = [f"weighting {cfg.weighting.name}"]
    if cfg.loss.bayesian:
        methods.insert(0, "loss.bayesian")
    if cfg.train.amp and device.type == "cuda":
        methods.append("bf16 autocast")
    lr = f"{plan.lr:g}" + (f" (scaled x{plan.lr_scale:g})" if plan.lr_scale != 1.0 else "")
    lines = [
        f"device {device} x {world} process(es), {torch.get_num_threads()} threads each",
        f"detector {cfg.model.name}, backbone {cfg.model.backbone}: {n_params / 1e6:.2f} M parameters "
        f"({n_train / 1e6:.2f} M trainable)",
        f"data: {len(train_set)} train images with {boxes} boxes, {len(val_set)} val images, "
        f"{train_set.num_classes} classes",
        f"schedule: {plan.max_iter} iterations ({plan.epochs:.3g} epochs), batch {cfg.train.batch_size} x {world} "
        f"= {plan.total_batch}, lr {lr}, {cfg.train.schedule.name} schedule",
        f"methods: {', '.join(methods)}",
        f"run directory: {out_dir}",
    ]
    return "\n".join(lines)
