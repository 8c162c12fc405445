"""Per-box uncertainty: the KL-Loss of He et al. (CVPR 2019), with the configured box loss inside.

The box head predicts, beside each regression output δ_k, its log-variance α_k = log σ_k². He et al.
model the target as a Dirac and the prediction as N(δ_k, σ_k²); the KL divergence between them is, up to
constants, their Eq. (9), and Eq. (10) its smooth-L1 form for errors beyond 1:

    |δ − δ*| <= 1:  e^(−α)/2 · (δ − δ*)² + α/2                          (Eq. 9)
    |δ − δ*| >  1:  e^(−α) · (|δ − δ*| − 1/2) + α/2                      (Eq. 10)

i.e. e^(−α)·ℓ(δ − δ*) + α/2 with ℓ the smooth L1 of threshold 1. Here ℓ is ``loss.box_loss``'s own
per-coordinate loss (``box.py``: smooth L1 with c = ``loss.beta``, or L1), so that at α = 0 the loss is
exactly the plain box loss. probdet (Harakeh & Waslander, ICLR 2021), which trains such heads for
RetinaNet, found two things essential: α clamped (to [−7, 7]; the heads clamp, ``models/heads.py``) and
the uncertainty term annealed in from the plain loss:

    L_k = (1 − w)·ℓ_k + w·(e^(−α_k)·ℓ_k + α_k/2),      w = min(1, iteration / loss.box_uncertainty_warmup)

(linear in w here; probdet anneals over its own schedule). d/dα_k = w·(1/2 − e^(−α_k)·ℓ_k), zero at
e^(α_k) = ℓ_k·2: σ² tracks twice the loss of the box, which is what makes σ per box mean something.

The KL-Loss also weights each delta's gradient by e^(−α_k): the boxes the head is sure of pull hardest.
Here that halved AP on clean labels (docs/results.md, "Per-box uncertainty"), as the Bayesian losses' σ per
task did (``bayesian_form.py``). ``loss.box_uncertainty_form`` (``BOX_UNCERTAINTY_FORMS``) takes the
Bayesian losses' way out:

| form     | gradient to δ_k        | gradient to α_k        | value (logged, weighted)     |
|----------|------------------------|------------------------|------------------------------|
| kl       | ((1 − w) + w·e^(−α))·ℓ' | w·(1/2 − e^(−α)·ℓ)    | (1 − w)·ℓ + w·(e^(−α)ℓ + α/2) |
| detached | ℓ' (the plain loss's)  | 1/2 − e^(−α)·ℓ         | ℓ (the plain loss's)          |
| isolated | ℓ' (the plain loss's)  | 1/2 − e^(−α)·ℓ         | ℓ (the plain loss's)          |

The detached form fits α to the detached deltas' loss, so σ per box is the same maximum-likelihood estimate
of the current error, while the deltas train exactly as without it; α's gradient still reaches the shared
box tower through the α layer. The isolated form also detaches the features the α layer reads (the heads,
``models/heads.py``), so that nothing but the α layer learns from α; with the α layer's initialisation
and gradient clipping kept apart too (``models/heads.py``, ``Detector.isolated_parameters``) the detector
trains as the plain one, bitwise, and σ per box is a read-out beside it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from robustdet.losses._reduction import check_float, check_reduction, check_same_shape, reduce
from robustdet.losses.box import box_loss_row, coordinate_box_loss
from robustdet.losses.config import LossConfig
from robustdet.losses.task import TaskLoss


class BoxUncertaintyForm(NamedTuple):
    detach_deltas: bool  # α fitted on the detached deltas, the deltas on the plain box loss
    detach_features: bool  # the α layer reads the detached tower (box head) features


# loss.box_uncertainty_form -> what α's loss is kept from (module docstring's table)
BOX_UNCERTAINTY_FORMS: dict[str, BoxUncertaintyForm] = {
    "kl": BoxUncertaintyForm(detach_deltas=False, detach_features=False),
    "detached": BoxUncertaintyForm(detach_deltas=True, detach_features=False),
    "isolated": BoxUncertaintyForm(detach_deltas=True, detach_features=True),
}


def detaches_features(loss: LossConfig) -> bool:
    """Whether the α layers read detached features (``loss.box_uncertainty_form=isolated``)."""
    return BOX_UNCERTAINTY_FORMS[loss.box_uncertainty_form].detach_features


def kl_box_loss(
    plain: Tensor, log_var: Tensor, weight: float | Tensor = 1.0, reduction: str = "none"
) -> Tensor:
    """(1 − w)·ℓ + w·(e^(−α)·ℓ + α/2), elementwise (He et al. 2019, Eq. 9/10 with ℓ inside; module docstring).

    Args:
        plain: ℓ, the per-coordinate box loss of each regression output (e.g. smooth L1 of δ − δ*), >= 0.
        log_var: α = log σ², same shape (already clamped by the head).
        weight: w in [0, 1], the warm-up blend (1: the KL-Loss alone, 0: the plain loss alone).
        reduction: "none", "sum" or "mean".
    """
    check_reduction(reduction)
    check_float("log_var", log_var)
    check_same_shape("plain", plain, "log_var", log_var)
    kl = torch.exp(-log_var) * plain + 0.5 * log_var
    if isinstance(weight, float) and weight == 1.0:
        return reduce(kl, reduction)
    if isinstance(weight, float) and not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must lie in [0, 1], got {weight}")
    return reduce((1.0 - weight) * plain + weight * kl, reduction)


def uncertain_box_loss(
    pred: Tensor, target: Tensor, log_var: Tensor, weight: float | Tensor, loss: LossConfig
) -> TaskLoss:
    """The KL-Loss of deltas ``pred`` [..., 4] against ``target`` with α = ``log_var`` [..., 4], summed over
    the 4 coordinates: ``TaskLoss(value [...], plain [...])``, plain the box loss without α (detached),
    the measure the level weightings take. ``loss.box_uncertainty_form`` detached or isolated: the value is
    the plain loss and α's gradient that of the KL-Loss on the detached deltas (module docstring's table)."""
    if box_loss_row(loss).decoded:
        raise ValueError(f"loss.box_loss={loss.box_loss} has no per-coordinate form for a per-box α")
    plain = coordinate_box_loss(pred, target, loss)
    if BOX_UNCERTAINTY_FORMS[loss.box_uncertainty_form].detach_deltas:
        fitted = kl_box_loss(plain.detach(), log_var.to(plain.dtype))
        value = (plain + (fitted - fitted.detach())).sum(dim=-1)
        return TaskLoss(value, value.detach())
    value = kl_box_loss(plain, log_var.to(plain.dtype), weight).sum(dim=-1)
    return TaskLoss(value, plain.detach().sum(dim=-1))


__all__ = ["BOX_UNCERTAINTY_FORMS", "BoxUncertaintyForm", "detaches_features", "kl_box_loss", "uncertain_box_loss"]
