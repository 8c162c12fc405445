"""Losses of (Bayesian) RetinaNet: focal and smooth L1 (Eq. 6-7) and their Bayesian forms (Eq. 14, 16).

Every function takes ``reduction="none" | "sum" | "mean"``; the Bayesian ones take ``log_var`` = s = log σ²
as a float or a 0-dim tensor (gradients flow to it). See docs/losses.md for the formulas and names.
"""

from robustdet.losses._reduction import finite_checks_enabled, set_finite_checks
from robustdet.losses.box import BOX_LOSSES, BoxLoss, box_loss_row
from robustdet.losses.box_uncertainty import detaches_features, kl_box_loss, uncertain_box_loss
from robustdet.losses.config import LossConfig
from robustdet.losses.focal import (
    bayesian_binary_cross_entropy,
    bayesian_cross_entropy,
    bayesian_focal_loss,
    bayesian_focal_loss_and_plain,
    sigmoid_focal_loss,
)
from robustdet.losses.log_variance import LogVariances
from robustdet.losses.smooth_l1 import bayesian_smooth_l1_loss, log_tau, smooth_l1_loss
from robustdet.losses.task import TaskLoss, task_loss

__all__ = [
    "BOX_LOSSES",
    "BoxLoss",
    "LogVariances",
    "LossConfig",
    "TaskLoss",
    "bayesian_binary_cross_entropy",
    "bayesian_cross_entropy",
    "bayesian_focal_loss",
    "bayesian_focal_loss_and_plain",
    "bayesian_smooth_l1_loss",
    "box_loss_row",
    "detaches_features",
    "finite_checks_enabled",
    "kl_box_loss",
    "log_tau",
    "set_finite_checks",
    "sigmoid_focal_loss",
    "smooth_l1_loss",
    "task_loss",
    "uncertain_box_loss",
]
