"""The box losses: one row per ``loss.box_loss``, saying what the loss compares.

| name        | compares                        | per coordinate | Bayesian (Eq. 14) | per-box α (KL-Loss) |
|-------------|---------------------------------|----------------|-------------------|---------------------|
| "l1"        | the box coder's deltas          | yes (c = 0)    | no (no threshold) | yes                 |
| "smooth_l1" | the box coder's deltas          | yes (c = beta) | yes               | yes                 |
| "giou"      | decoded XYXY boxes (1 − GIoU)   | no             | no                | no                  |

A detector asks the row whether to decode its regression first (``decoded``) and never names a loss;
a loss with a per-coordinate form has the smooth-L1 threshold c of Eq. 6 (``threshold``), which is what
the Bayesian smooth L1 and the KL-Loss take inside. To add a box loss: one row here, and its function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

from robustdet.losses.config import LossConfig
from robustdet.losses.smooth_l1 import smooth_l1_loss

GIOU_EPS = 1e-7  # torchvision's _box_loss default, kept so that the GIoU loss matches it


class BoxLoss(NamedTuple):
    """One box loss. ``decoded``: it compares decoded boxes (an IoU loss), not deltas. ``threshold``: the
    smooth-L1 threshold c of a per-coordinate loss on deltas (0 is L1), None for a decoded loss."""

    decoded: bool
    threshold: Callable[[LossConfig], float] | None


BOX_LOSSES: dict[str, BoxLoss] = {
    "l1": BoxLoss(decoded=False, threshold=lambda loss: 0.0),
    "smooth_l1": BoxLoss(decoded=False, threshold=lambda loss: loss.beta),
    "giou": BoxLoss(decoded=True, threshold=None),
}


def box_loss_row(loss: LossConfig) -> BoxLoss:
    """The row of ``loss.box_loss``."""
    return BOX_LOSSES[loss.box_loss]


def box_beta(loss: LossConfig) -> float:
    """The smooth-L1 threshold c of ``loss.box_loss`` (Eq. 6; 0 for L1); an error for a decoded loss."""
    threshold = box_loss_row(loss).threshold
    if threshold is None:
        raise ValueError(f"loss.box_loss={loss.box_loss} compares decoded boxes and has no per-coordinate form")
    return threshold(loss)


def coordinate_box_loss(pred: Tensor, target: Tensor, loss: LossConfig) -> Tensor:
    """The per-coordinate loss on deltas [..., 4] → [..., 4]: smooth L1 with c = ``box_beta`` (Eq. 6)."""
    return smooth_l1_loss(pred, target, beta=box_beta(loss), reduction="none")


def plain_box_loss(pred: Tensor, target: Tensor, loss: LossConfig) -> Tensor:
    """The box loss per box [...]: 1 − GIoU of XYXY boxes for a decoded loss, else the per-coordinate loss
    of the deltas summed over the 4 coordinates."""
    if box_loss_row(loss).decoded:
        return generalized_box_iou_loss(
            pred.reshape(-1, 4), target.reshape(-1, 4), reduction="none", eps=GIOU_EPS
        ).view(pred.shape[:-1])
    return coordinate_box_loss(pred, target, loss).sum(dim=-1)


__all__ = ["BOX_LOSSES", "GIOU_EPS", "BoxLoss", "box_beta", "box_loss_row", "coordinate_box_loss", "plain_box_loss"]
