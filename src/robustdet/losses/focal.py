"""Sigmoid focal loss (Eq. 7) and the Bayesian focal loss (Eq. 16, Khanzhina et al.).

Elementwise, with logit x, target t in [0, 1], s = log σ² and p = sigmoid(x):

    p_t = p·t + (1 − p)·(1 − t)                     (probability given to the target)
    q   = 1 − p_t = (1 − t)·p + t·(1 − p)
    CE  = −t·log p − (1 − t)·log(1 − p)              (binary cross-entropy with logits)
    α_t = α·t + (1 − α)·(1 − t)                      (1 when α < 0, as torchvision does)
    BFL = α_t · [σ⁻¹ · q^(σ⁻²)]^γ · (σ⁻²·CE + log σ)
        = α_t · exp(−γs/2) · exp(γ·e^(−s)·log q) · (e^(−s)·CE + s/2)

With s = 0 this is the focal loss FL = α_t · q^γ · CE of RetinaNet (Lin et al.), which is what
:func:`sigmoid_focal_loss` computes.

The gradients, computed in the forward pass, with e = σ⁻² = exp(−s), r = r(s) the form's regulariser
(log σ = s/2, or log(1 + σ²); losses/bayesian_form.py), g = 1 with Eq. 16's scaled focusing and 0 with the
fixed one, M = σ^(−gγ)·q^(γ·e^g), C = α_t·M, A = e·CE + r, so that loss = C·A:

    d log q / dx = [(1 − t)·σ(x)·σ(−x) − t·σ(x)·σ(−x)] / q
                 = (1 − t)·σ(−x) − t·σ(x) + t(1 − t)·(σ(x) − σ(−x)) / q
    d loss / dx  = γ·e^g·loss·(d log q / dx) + e·C·(p − t)
    d loss / ds  = C·(r + r') − loss·(1 + g·(γ/2 + γ·e·log q))

The second form of d log q / dx is exact for hard targets even where q underflows to 0: the soft-target
term is multiplied by t(1 − t) = 0 there.

Everything is computed from log-sigmoids of the logits, never as log(sigmoid(x)): log q is
``log((1 − t)·σ(x) + t·σ(−x))`` with both sigmoids taken directly (so no 1 − p cancellation), and where
that underflows (|x| ≳ 87 in float32) the exact hard-target value ``(1 − 2t)·x − CE`` takes over. The
forward pass also computes the gradient in closed form (one ``autograd.Function``): the backward pass then
only scales it. That is what keeps the Bayesian loss within a few percent of the plain focal loss's cost;
see docs/benchmarks.md.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from robustdet.losses._reduction import (
    as_log_var,
    check_finite,
    check_float,
    check_reduction,
    check_same_shape,
    finite_checks_enabled,
    reduce,
)
from robustdet.losses.bayesian_form import PAPER, BayesianForm, form_of, regulariser, regulariser_grad

__all__ = [
    "bayesian_binary_cross_entropy",
    "bayesian_cross_entropy",
    "bayesian_focal_loss",
    "bayesian_focal_loss_and_plain",
    "sigmoid_focal_loss",
]


def _focal_terms(
    x: Tensor,
    t: Tensor,
    s: Tensor,
    alpha: float,
    gamma: float,
    reduction: str,
    want_grad_x: bool,
    want_grad_s: bool,
    want_plain: bool = False,
    form: BayesianForm = PAPER,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Loss (reduced), d(loss)/dx and d(loss)/ds of Eq. 16 in the ``form`` (losses/bayesian_form.py),
    computed together in one forward call (the derivation is in the module docstring).

    With ``want_plain`` also the plain loss at σ = 1 (the focal loss, Eq. 7), elementwise: the measure the
    multi-scale weightings take of a Bayesian detector (equations.md, "Bayesian losses with AVW / RLO"),
    from the CE and log q this pass computes anyway. The gradients are those of the *reduced* loss for
    "sum"/"mean" (so backward only multiplies by the incoming scalar) and elementwise for "none".
    """
    e = torch.exp(-s)
    r, r_grad = regulariser(s, form), regulariser_grad(s, form)
    u = 1.0 - t
    log_p = F.logsigmoid(x)
    ce = u * x
    ce.sub_(log_p)  # softplus(x) − t·x, the stable BCE with logits
    grad_scale: float = 1.0 / x.numel() if reduction == "mean" and x.numel() > 0 else 1.0
    if gamma == 0.0:
        # Bayesian BCE: no modulating factor, so q and its derivative are never needed.
        return _bce_terms(
            x, t, ce, log_p, e, r, r_grad, alpha, reduction, grad_scale, want_grad_x, want_grad_s, want_plain
        )

    p, pn, q, log_q = _log_q(x, t, u, ce, log_p)
    focus = gamma * e if form.scaled_focus else gamma  # γ·σ⁻² (Eq. 16) or the plain γ
    c = (log_q * focus).exp_()
    plain = None if not want_plain else c.mul(ce) if not form.scaled_focus else (log_q * gamma).exp_().mul_(ce)
    at = _alpha_t(t, alpha)
    if at is not None:
        c.mul_(at)
        if plain is not None:
            plain.mul_(at)
    if form.scaled_focus:
        c.mul_(torch.exp(-0.5 * gamma * s))  # σ^(−γ), log σ = s/2
    a = ce.mul_(e).add_(r)
    loss = c * a

    grad_x = grad_s = None
    if want_grad_x:
        grad_x = _d_log_q(t, u, p, pn, q).mul_(loss).mul_(focus)
        grad_x.add_(p.sub_(t).mul_(c).mul_(e))
        grad_x.mul_(grad_scale)
    if want_grad_s:
        w = log_q.mul_(gamma * e).add_(1.0 + 0.5 * gamma) if form.scaled_focus else torch.ones_like(loss)
        if reduction == "none":
            grad_s = c.mul_(r + r_grad).sub_(w.mul_(loss))
        else:
            grad_s = ((r + r_grad) * c.sum() - torch.dot(loss.reshape(-1), w.reshape(-1))) * grad_scale
    return reduce(loss, reduction), grad_x, grad_s, plain


def _log_q(x: Tensor, t: Tensor, u: Tensor, ce: Tensor, log_p: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """p = σ(x), σ(−x), q = 1 − p_t and log q, stable where q underflows (``log_p`` is consumed)."""
    p = log_p.exp()
    pn = log_p.sub_(x).exp_()  # σ(−x) taken directly: 1 − p would cancel for easy positives
    q = u * p
    q.addcmul_(t, pn)
    log_q = torch.log(q)
    # Where q underflows (log q = −inf) the hard-target value (1 − 2t)·x − CE is exact; for soft targets
    # it is a lower bound of log q (Jensen), so the maximum never picks it there.
    log_q_hard = (u - t).mul_(x).sub_(ce)
    torch.maximum(log_q, log_q_hard, out=log_q)
    # q <= 1 only up to rounding, and a log q of +1e-7 times σ⁻² = 5e8 (s = −20) would overflow exp.
    log_q.clamp_max_(0.0)
    return p, pn, q, log_q


def _d_log_q(t: Tensor, u: Tensor, p: Tensor, pn: Tensor, q: Tensor) -> Tensor:
    """d log q / dx in the form that stays exact for hard targets where q underflows (``q`` is clamped)."""
    d_log_q = u * pn
    d_log_q.addcmul_(t, p, value=-1.0)
    soft = (u * t).mul_(p - pn).div_(q.clamp_min_(torch.finfo(q.dtype).tiny))
    return d_log_q.add_(soft)


def _bce_terms(
    x: Tensor,
    t: Tensor,
    ce: Tensor,
    log_p: Tensor,
    e: Tensor,
    r: Tensor,
    r_grad: Tensor,
    alpha: float,
    reduction: str,
    grad_scale: float,
    want_grad_x: bool,
    want_grad_s: bool,
    want_plain: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """:func:`_focal_terms` for γ = 0 (Eq. 16 without the modulating factor, the Bayesian BCE): loss
    α_t·(e·CE + r), d/dx = α_t·e·(p − t), d/ds = α_t·(r + r') − loss. ``ce`` and ``log_p`` are consumed."""
    n = x.numel()
    at = _alpha_t(t, alpha)
    plain = None
    if want_plain:
        plain = ce * at if at is not None else ce.clone()
    loss = ce.mul_(e).add_(r)
    if at is not None:
        loss.mul_(at)
    grad_x = grad_s = None
    if want_grad_x:
        grad_x = log_p.exp_().sub_(t).mul_(e * grad_scale)
        if at is not None:
            grad_x.mul_(at)
    if want_grad_s:
        c_sum: Tensor | float = at.sum() if at is not None else float(n)
        if reduction == "none":
            grad_s = (at if at is not None else torch.ones_like(loss)) * (r + r_grad) - loss
        else:
            grad_s = ((r + r_grad) * c_sum - loss.sum()) * grad_scale
    return reduce(loss, reduction), grad_x, grad_s, plain


def _alpha_t(t: Tensor, alpha: float) -> Tensor | None:
    """α_t = α·t + (1 − α)·(1 − t), or None when α < 0 (no class balancing)."""
    if alpha < 0:
        return None
    return t.mul(2.0 * alpha - 1.0).add_(1.0 - alpha)


class _FocalFunction(torch.autograd.Function):
    """Eq. 16 with a closed-form backward; gradients flow to the logits and to s, not to the targets.

    Returns (loss, plain): ``plain`` is the elementwise loss at σ = 1 when asked for (no gradient), else
    an empty tensor.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: Tensor,
        targets: Tensor,
        log_var: Tensor,
        alpha: float,
        gamma: float,
        reduction: str,
        want_grad_x: bool,
        want_grad_s: bool,
        want_plain: bool,
        form: BayesianForm,
    ) -> tuple[Tensor, Tensor]:
        loss, grad_x, grad_s, plain = _focal_terms(
            logits, targets, log_var, alpha, gamma, reduction, want_grad_x, want_grad_s, want_plain, form
        )
        ctx.reduced = reduction != "none"
        ctx.save_for_backward(grad_x, grad_s)
        plain_out = plain if plain is not None else logits.new_empty(0)
        ctx.mark_non_differentiable(plain_out)
        return loss, plain_out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor, _grad_plain: Tensor | None) -> tuple[Tensor | None, ...]:
        grad_x, grad_s = ctx.saved_tensors
        gx = gs = None
        if ctx.needs_input_grad[0] and grad_x is not None:
            gx = grad_x * grad_out
        if ctx.needs_input_grad[2] and grad_s is not None:
            gs = grad_s * grad_out if ctx.reduced else (grad_s * grad_out).sum()
        return gx, None, gs, None, None, None, None, None, None, None


def _check_focal_args(logits: Tensor, targets: Tensor, alpha: float, gamma: float, reduction: str) -> Tensor:
    check_reduction(reduction)
    check_float("logits", logits)
    check_same_shape("logits", logits, "targets", targets)
    if math.isnan(alpha) or alpha > 1.0:
        raise ValueError(f"alpha must be in [0, 1], or negative to switch class balancing off, got {alpha}")
    if not (gamma >= 0.0 and math.isfinite(gamma)):
        raise ValueError(f"gamma must be finite and >= 0, got {gamma}")
    if targets.requires_grad:
        raise ValueError("targets must not require grad: the focal losses give no gradient to the targets")
    if finite_checks_enabled():
        check_finite("logits", logits)
        check_finite("targets", targets)
    return targets.to(dtype=logits.dtype)


def _focal_with_plain(
    logits: Tensor,
    targets: Tensor,
    s: Tensor,
    alpha: float,
    gamma: float,
    reduction: str,
    want_plain: bool,
    form: BayesianForm = PAPER,
) -> tuple[Tensor, Tensor]:
    grad_on = torch.is_grad_enabled()
    return _FocalFunction.apply(
        logits,
        targets,
        s,
        float(alpha),
        float(gamma),
        reduction,
        grad_on and logits.requires_grad,
        grad_on and s.requires_grad,
        want_plain,
        form,
    )


def _focal(
    logits: Tensor, targets: Tensor, s: Tensor, alpha: float, gamma: float, reduction: str, form: BayesianForm = PAPER
) -> Tensor:
    return _focal_with_plain(logits, targets, s, alpha, gamma, reduction, False, form)[0]


def bayesian_focal_loss_and_plain(
    logits: Tensor,
    targets: Tensor,
    log_var: float | Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    form: str = "paper",
) -> tuple[Tensor, Tensor]:
    """Elementwise (Eq. 16, Eq. 7): the Bayesian focal loss in ``form`` (losses/bayesian_form.py) and,
    detached, the plain focal loss at σ = 1.

    One pass computes both; with ``gamma = 0`` and ``alpha < 0`` they are the Bayesian BCE and the BCE.
    """
    targets = _check_focal_args(logits, targets, alpha, gamma, "none")
    s = as_log_var(log_var, logits)
    return _focal_with_plain(logits, targets, s, alpha, gamma, "none", True, form_of(form))


def sigmoid_focal_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> Tensor:
    """Focal loss of RetinaNet, FL = −α_t·(1 − p_t)^γ·log p_t (Eq. 7, Khanzhina et al.; Lin et al.).

    Same contract as ``torchvision.ops.sigmoid_focal_loss`` (which it matches to float rounding), but
    computed from log-sigmoids, so it stays finite, gradients included, for any logit and any γ ≥ 0.

    Args:
        logits: float tensor of any shape, the raw scores x.
        targets: same shape, in [0, 1] (soft targets allowed); cast to the logits' dtype.
        alpha: α of α_t = α·t + (1 − α)·(1 − t); any negative value switches it off.
        gamma: focusing exponent γ ≥ 0.
        reduction: "none" (same shape as ``logits``), "sum" or "mean".
    """
    targets = _check_focal_args(logits, targets, alpha, gamma, reduction)
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    return _focal(logits, targets, zero, alpha, gamma, reduction)


def bayesian_focal_loss(
    logits: Tensor,
    targets: Tensor,
    log_var: float | Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    form: str = "paper",
) -> Tensor:
    """Bayesian focal loss, Eq. 16, Khanzhina et al. (``form`` "paper"; the other forms of
    losses/bayesian_form.py change its focusing factor or its regulariser):

        BFL = α_t · [σ⁻¹ · (1 − p_t)^(σ⁻²)]^γ · (σ⁻²·CE + log σ),   σ² = exp(s)

    It equals :func:`sigmoid_focal_loss` at s = 0. In s, a single anchor's loss tends to 0 as s → ±∞ and
    is slightly negative for well-classified anchors when s < 0 (docs/losses.md has the measurements).

    Args:
        logits: float tensor of any shape, the raw scores x.
        targets: same shape, in [0, 1] (soft targets allowed); no gradient flows to them.
        log_var: s = log σ², a float (a constant) or a 0-dim tensor (its gradient is computed).
        alpha: α of α_t; any negative value switches class balancing off.
        gamma: focusing exponent γ ≥ 0.
        reduction: "none", "sum" or "mean".
        form: a row of ``BAYESIAN_FORMS``.
    """
    targets = _check_focal_args(logits, targets, alpha, gamma, reduction)
    return _focal(logits, targets, as_log_var(log_var, logits), alpha, gamma, reduction, form_of(form))


def bayesian_binary_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    log_var: float | Tensor,
    reduction: str = "none",
) -> Tensor:
    """Bayesian binary cross-entropy, e^(−s)·BCE + s/2: Eq. 16 with γ = 0 and no α_t.

    For sigmoid classifiers without focusing (e.g. the Faster R-CNN RPN objectness).
    """
    targets = _check_focal_args(logits, targets, -1.0, 0.0, reduction)
    return _focal(logits, targets, as_log_var(log_var, logits), -1.0, 0.0, reduction)


def bayesian_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    log_var: float | Tensor,
    reduction: str = "none",
    form: str = "paper",
) -> Tensor:
    """Kendall's Bayesian softmax cross-entropy, exp(−s)·CE + r(s) (classification term of Eq. 5, Khanzhina
    et al., section 2.1; r = log σ = s/2 in the paper form, log(1 + σ²) in the Liebel forms).

    Args:
        logits: [N, C] float scores.
        targets: [N] integer class indices in [0, C) (no ignore index).
        log_var: s = log σ², a float or a 0-dim tensor.
        reduction: "none" ([N]), "sum" or "mean".
        form: a row of ``BAYESIAN_FORMS`` (only its regulariser matters here).
    """
    check_reduction(reduction)
    check_float("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [N, C], got {tuple(logits.shape)}")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"targets must have shape [N] = [{logits.shape[0]}], got {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex():
        raise ValueError(f"targets must be integer class indices, got {targets.dtype}")
    if finite_checks_enabled():
        check_finite("logits", logits)
        if targets.numel() and not (int(targets.min()) >= 0 and int(targets.max()) < logits.shape[1]):
            raise ValueError(f"targets must lie in [0, {logits.shape[1]})")
    s = as_log_var(log_var, logits)
    ce = F.cross_entropy(logits, targets.long(), reduction="none")
    return reduce(torch.exp(-s) * ce + regulariser(s, form_of(form)), reduction)
