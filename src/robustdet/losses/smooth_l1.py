"""Smooth L1 (Eq. 6) and the Bayesian smooth L1 loss (Eq. 14, Khanzhina et al.).

Names: the paper's threshold 1/β² is ``beta`` = c here (torch's convention), s = log σ².

Eq. 14, elementwise on ε = |input − target|, σ = exp(s/2):

    ε <  c:  ε²/(2σ²) + log σ                                   (Gaussian N(0, σ²))
    ε >= c:  −(ε/c)·log τ + log τ + c²/(2σ²) + log σ             (Laplace tail, rate −(1/c)·log τ)

with τ = 1 − erf(c/(σ√2)) = 2·Φ(−c/σ), the Gaussian's mass outside (−c, c). The rate −(1/c)·log τ of
Eq. 12 is the one for which a Laplace density carries exactly that mass τ beyond ±c, so the Gaussian core
plus the Laplace tails integrate to 1 (Eq. 11). The constant of the tail is Eq. 14's continuity fix, which
makes the two cases meet at ε = c.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from robustdet.losses._reduction import (
    as_log_var,
    check_finite,
    check_float,
    check_reduction,
    check_same_shape,
    finite_checks_enabled,
    reduce,
)
from robustdet.losses.bayesian_form import form_of, regulariser

__all__ = ["bayesian_smooth_l1_loss", "log_tau", "smooth_l1_loss"]

_LOG_2 = math.log(2.0)


def _check_pair(input: Tensor, target: Tensor, reduction: str) -> Tensor:
    check_reduction(reduction)
    check_float("input", input)
    check_same_shape("input", input, "target", target)
    if finite_checks_enabled():
        check_finite("input", input)
        check_finite("target", target)
    return target.to(dtype=input.dtype)


def smooth_l1_loss(input: Tensor, target: Tensor, beta: float = 0.1, reduction: str = "none") -> Tensor:
    """Smooth L1, Eq. 6, Khanzhina et al. (Girshick's Fast R-CNN loss), elementwise on ε = |input − target|:

        0.5·ε²/c if ε < c, else ε − 0.5·c,        c = ``beta`` = 1/β² of the paper

    ``beta`` = 0 is plain L1. It is ``torch.nn.functional.smooth_l1_loss`` (the baseline detectors' own
    kernel, so the non-Bayesian loss is bit-for-bit the baseline's) behind this package's argument checks.
    """
    target = _check_pair(input, target, reduction)
    if not (math.isfinite(beta) and beta >= 0.0):
        raise ValueError(f"beta must be finite and >= 0 (0 is plain L1), got {beta}")
    return F.smooth_l1_loss(input, target, beta=beta, reduction=reduction)


def log_tau(log_var: float | Tensor, beta: float) -> Tensor:
    """log τ with τ = 1 − erf(c/(σ√2)) (Eq. 12, Khanzhina et al.), c = ``beta``, σ = exp(s/2).

    Computed as log 2 + log Φ(−c/σ) (``torch.special.log_ndtr``), in float64 whatever the dtype of s:
    it is one scalar, and float64 keeps it and its s-derivative accurate from s = −20 (c/σ ≈ 2·10³, where
    erf-then-log has long returned log 0) to s = 20 (c/σ ≈ 5·10⁻⁶, where float32 would cancel log 2
    against log Φ). The result has the dtype of ``log_var`` (float64 for a float).
    """
    if not (math.isfinite(beta) and beta > 0.0):
        raise ValueError(f"beta must be finite and > 0, got {beta}")
    s = log_var if isinstance(log_var, Tensor) else torch.tensor(float(log_var), dtype=torch.float64)
    s64 = s.to(torch.float64)
    return (_LOG_2 + torch.special.log_ndtr(-beta * torch.exp(-0.5 * s64))).to(s.dtype)


def bayesian_smooth_l1_loss(
    input: Tensor,
    target: Tensor,
    log_var: float | Tensor,
    beta: float = 0.1,
    reduction: str = "none",
    form: str = "paper",
) -> Tensor:
    """Bayesian smooth L1, Eq. 14, Khanzhina et al., elementwise on ε = |input − target|:

        ε <  c:  ε²/(2σ²) + log σ
        ε >= c:  −(ε/c)·log τ + log τ + c²/(2σ²) + log σ,     log τ = log 2 + log Φ(−c/σ)

    with c = ``beta`` (the paper's 1/β²) and σ² = exp(s). Continuous at ε = c. The Laplace rate is
    −(1/c)·log τ as in Eq. 12 (the authors' TensorFlow code uses −c·log τ, which does not normalise the
    likelihood; docs/losses.md).

    Args:
        input: predicted box deltas, float, any shape.
        target: encoded ground-truth deltas, same shape.
        log_var: s = log σ², a float (a constant) or a 0-dim tensor (its gradient is computed).
        beta: c > 0, the L2-to-L1 threshold (detectron2's RetinaNet uses 0.1).
        reduction: "none", "sum" or "mean".
        form: a row of ``BAYESIAN_FORMS``: "paper" adds log σ (Eq. 14), the Liebel forms log(1 + σ²)
            (losses/bayesian_form.py); the Gaussian core and the Laplace tail are Eq. 14's in every form.
    """
    target = _check_pair(input, target, reduction)
    if not (math.isfinite(beta) and beta > 0.0):
        raise ValueError(
            f"beta must be finite and > 0 for the Bayesian smooth L1 (Eq. 14 divides by it), got {beta}"
        )
    s = as_log_var(log_var, input)
    err = (input - target).abs()
    inv_var = torch.exp(-s)
    quadratic = 0.5 * inv_var * err.square()
    tail = (1.0 - err / beta) * log_tau(s, beta) + (0.5 * beta * beta) * inv_var
    return reduce(torch.where(err < beta, quadratic, tail) + regulariser(s, form_of(form)), reduction)
