"""Iteration-based learning-rate schedule: linear warmup, then step, cosine or constant."""

from __future__ import annotations

import math

import torch

from robustdet.config import ScheduleConfig


def lr_factor(it: int, cfg: ScheduleConfig, max_iter: int) -> float:
    """The multiplier of the base learning rate at iteration ``it`` (0-based, the step about to run).
    ``cfg`` in iterations: warmup_epochs and step_epochs are converted first (engine/plan.py)."""
    warmup = cfg.warmup_iters or 0
    if cfg.name == "step":
        factor = cfg.gamma ** sum(1 for s in cfg.steps if it >= s)
    elif cfg.name == "cosine":
        # cosine from the end of warmup, so warmup and decay do not fight over the first iterations
        start = min(warmup, max_iter - 1)
        progress = min(1.0, max(0.0, (it - start) / max(1, max_iter - start)))
        factor = cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    else:
        factor = 1.0
    if it < warmup:
        alpha = it / warmup
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, max_iter: int, log_var_warmup: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of every parameter group; the "log_var" group (engine/optim.py) additionally stands
    still (factor 0) for its first ``log_var_warmup`` iterations."""

    def held(it: int) -> float:
        return 0.0 if it < log_var_warmup else lr_factor(it, cfg, max_iter)

    lambdas = [
        held if log_var_warmup and group.get("name") == "log_var" else (lambda it: lr_factor(it, cfg, max_iter))
        for group in optimizer.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
