"""One entry point for a detector's task losses, plain or Bayesian: :func:`task_loss`.

Detectors call ``task_loss(kind, pred, target, log_var, loss_cfg)`` and never choose between the plain and
the Bayesian form, or between the box losses, themselves:

| kind    | plain (``log_var`` None)                     | Bayesian (``log_var`` = s)                         |
|---------|----------------------------------------------|----------------------------------------------------|
| "focal" | sigmoid focal loss (Eq. 7), elementwise      | Bayesian focal loss (Eq. 16), elementwise           |
| "bce"   | BCE with logits, elementwise                 | e^(−s)·BCE + s/2 (Eq. 16, γ = 0, no α)              |
| "ce"    | softmax CE per row                           | e^(−s)·CE + s/2 (Kendall; Eq. 5, section 2.1)       |
| "box"   | ``loss.box_loss`` (``box.py::BOX_LOSSES``):  | Bayesian smooth L1 (Eq. 14) on deltas, summed over  |
|         | L1 / smooth L1 (Eq. 6) on deltas, or GIoU on | the last dimension                                 |
|         | decoded boxes; per box                       |                                                    |

(Khanzhina et al.'s equation numbers; ``loss.bayesian_form`` picks a row of losses/bayesian_form.py, whose
"paper" row is the table's.) A Bayesian call also returns the *plain* loss at σ = 1,
detached: the measure that the multi-scale weightings take of each level (equations.md, "Bayesian losses
with AVW / RLO"). For the focal loss it comes out of the same pass; a plain call returns None for it.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from robustdet.losses.bayesian_form import form_of
from robustdet.losses.box import GIOU_EPS, box_beta, box_loss_row, plain_box_loss
from robustdet.losses.config import LossConfig
from robustdet.losses.focal import (
    bayesian_cross_entropy,
    bayesian_focal_loss,
    bayesian_focal_loss_and_plain,
    sigmoid_focal_loss,
)
from robustdet.losses.smooth_l1 import bayesian_smooth_l1_loss

TaskKind = Literal["focal", "bce", "ce", "box"]


class TaskLoss(NamedTuple):
    """``value``: the loss to train on (with gradient); ``plain``: the same at σ = 1, detached, when the loss
    is Bayesian (None when it is plain: it would be ``value`` itself, and nobody needs a second copy)."""

    value: Tensor
    plain: Tensor | None


def task_loss(kind: TaskKind, pred: Tensor, target: Tensor, log_var: Tensor | None, loss: LossConfig) -> TaskLoss:
    """The ``kind`` loss of ``pred`` against ``target``: Bayesian with s = ``log_var``, plain when None.

    Shapes: "focal" and "bce" elementwise (``pred`` and float ``target`` alike); "ce" ``pred`` [N, C],
    ``target`` [N] class indices, result [N]; "box" ``pred``/``target`` [..., 4] (deltas, or XYXY boxes
    when ``loss.box_loss`` is giou), result [...].

    With the ``detached`` form (losses/bayesian_form.py) the network trains on the plain loss and s on the
    Bayesian one of the detached predictions: the value is the plain loss, its gradient in ``pred`` the
    plain one, its gradient in s that of the Bayesian loss.
    """
    if log_var is None:
        return TaskLoss(_plain(kind, pred, target, loss), None)
    if form_of(loss.bayesian_form).detached:
        fitted = _bayesian_value(kind, pred.detach(), target, log_var, loss)
        plain = _plain(kind, pred, target, loss)
        return TaskLoss(plain + (fitted - fitted.detach()), plain.detach())
    if kind == "focal":  # one pass gives both the Bayesian and the plain focal loss
        return TaskLoss(*bayesian_focal_loss_and_plain(
            pred, target, log_var, loss.focal_alpha, loss.focal_gamma, loss.bayesian_form
        ))
    value = _bayesian_value(kind, pred, target, log_var, loss)
    with torch.no_grad():
        return TaskLoss(value, _plain(kind, pred, target, loss))


def _plain(kind: TaskKind, pred: Tensor, target: Tensor, loss: LossConfig) -> Tensor:
    if kind == "focal":
        return sigmoid_focal_loss(pred, target, alpha=loss.focal_alpha, gamma=loss.focal_gamma)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(pred, target, reduction="none")
    if kind == "ce":
        return F.cross_entropy(pred, target, reduction="none")
    if kind == "box":
        return plain_box_loss(pred, target, loss)
    raise ValueError(f"unknown task loss kind {kind!r}; one of focal, bce, ce, box")


def _bayesian_value(kind: TaskKind, pred: Tensor, target: Tensor, log_var: Tensor, loss: LossConfig) -> Tensor:
    """The Bayesian loss of ``loss.bayesian_form`` alone (no plain loss beside it)."""
    form = loss.bayesian_form
    if kind == "focal":
        return bayesian_focal_loss(pred, target, log_var, loss.focal_alpha, loss.focal_gamma, form=form)
    if kind == "bce":
        return bayesian_focal_loss(pred, target, log_var, alpha=-1.0, gamma=0.0, form=form)
    if kind == "ce":
        return bayesian_cross_entropy(pred, target, log_var, form=form)
    if kind == "box":
        if box_loss_row(loss).decoded:  # the config refuses it; a direct call gets the reason
            raise ValueError(f"loss.box_loss={loss.box_loss} has no Bayesian form (Eq. 14 is on deltas)")
        return bayesian_smooth_l1_loss(pred, target, log_var, beta=box_beta(loss), form=form).sum(dim=-1)
    raise ValueError(f"unknown task loss kind {kind!r}; one of focal, bce, ce, box")


__all__ = ["GIOU_EPS", "TaskKind", "TaskLoss", "box_beta", "task_loss"]
