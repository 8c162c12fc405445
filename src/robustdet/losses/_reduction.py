"""Argument checks and reductions shared by the loss functions.

The finite-value check reads every input once (a sum, see :func:`check_finite`). That is cheap on CPU
(docs/benchmarks.md), but each check reads a value back to the host, a device sync on CUDA, so the
training loop may switch the value checks off with :func:`set_finite_checks`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Reduction = Literal["none", "sum", "mean"]
_REDUCTIONS: tuple[str, ...] = ("none", "sum", "mean")

_finite_checks = True


def set_finite_checks(enabled: bool) -> bool:
    """Turn the non-finite input checks of every loss on or off; returns the previous setting.

    Shape, dtype and argument checks always run: they read no tensor data. The value checks (one
    finiteness test per input tensor, and that of a tensor ``log_var``) are what this switches, since
    each reads a device value back to the host.
    """
    global _finite_checks
    previous = _finite_checks
    _finite_checks = bool(enabled)
    return previous


def finite_checks_enabled() -> bool:
    """Whether the losses scan their inputs for NaN/inf (see :func:`set_finite_checks`)."""
    return _finite_checks


def check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_finite(name: str, x: Tensor) -> None:
    if not _finite_checks or x.numel() == 0:
        return
    # Any NaN/inf element makes the sum NaN/inf, and a sum reads x once without writing a bool tensor
    # (about 30x cheaper than isfinite().all() on 8M floats). Only a non-finite sum, which may also be a
    # mere overflow of huge finite values, pays for the exact elementwise test.
    total = x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    if not bool(torch.isfinite(total)) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")


def check_float(name: str, x: Tensor) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def as_log_var(log_var: float | Tensor, like: Tensor) -> Tensor:
    """``log_var`` as a 0-dim tensor in ``like``'s dtype and device (a float becomes a constant).

    The cast keeps the autograd graph, so the gradient reaches a float32 ``nn.Parameter`` even when the
    loss is computed in float64.
    """
    if isinstance(log_var, Tensor):
        if log_var.dim() != 0:
            raise ValueError(f"log_var must be a float or a 0-dim tensor, got shape {tuple(log_var.shape)}")
        if not log_var.is_floating_point():
            raise ValueError(f"log_var must be floating point, got {log_var.dtype}")
        # A NaN s poisons every term of the loss, so it is worth a (switchable) look.
        if _finite_checks and not bool(torch.isfinite(log_var)):
            raise ValueError(f"log_var must be finite, got {log_var.item()}")
        return log_var.to(dtype=like.dtype, device=like.device)
    value = float(log_var)
    if not math.isfinite(value):
        raise ValueError(f"log_var must be finite, got {value}")
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
