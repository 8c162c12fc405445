"""The forms of the Bayesian losses (``loss.bayesian_form``): one table, read by focal.py and smooth_l1.py.

Eq. 16 (Khanzhina et al.) is α_t · [σ⁻¹ · q^(σ⁻²)]^γ · (σ⁻²·CE + log σ) and Eq. 14 adds log σ to every box
coordinate. Two parts of it decide what happens when s = log σ² is free to converge (docs/results.md,
"Bayesian losses that survive convergence"):

- the focusing factor [σ⁻¹ · q^(σ⁻²)]^γ: as s_cls grows, the exponent γ·σ⁻² falls towards 0, the easy
  negatives regain the weight focal loss took from them, and the per-anchor loss tends to 0 as s → +∞, so
  nothing bounds s_cls. ``focus: "fixed"`` keeps the focal loss's own factor q^γ (σ-free): the loss is then
  α_t·q^γ·(σ⁻²·CE + r(s)), whose minimum in s is finite (s* = log(2·mean_w CE) for r = log σ, with weights
  w = α_t·q^γ).
- the regulariser r(s): log σ = s/2 (the paper's) rewards σ → 0 without bound below; Liebel & Körner's
  log(1 + σ²) (2018, "Auxiliary tasks in multi-task learning") is ≥ 0, so the loss cannot go below zero.

| form                 | focusing factor        | r(s)          | note                                      |
|----------------------|------------------------|---------------|-------------------------------------------|
| paper                | [σ⁻¹·q^(σ⁻²)]^γ (Eq.16) | log σ         | Eq. 14 / 16 exactly; collapses (AP 0 at   |
|                      |                        |               | the default threshold) when s converges   |
| liebel               | [σ⁻¹·q^(σ⁻²)]^γ         | log(1 + σ²)   | Eq. 16's focusing, Liebel's regulariser   |
| fixed_focus          | q^γ                    | log σ         | Kendall's σ⁻²·L + log σ per anchor        |
| fixed_focus_liebel   | q^γ                    | log(1 + σ²)   | both changes                              |
| detached             | q^γ                    | log σ         | s fitted by fixed_focus on the detached   |
|                      |                        |               | predictions; the network trains on the    |
|                      |                        |               | plain losses: σ per task is an estimate,  |
|                      |                        |               | not a weight                              |

The detached form separates the two jobs Eq. 19 gives s: σ per task is still the maximum-likelihood value of
Eq. 14 / the fixed-focus Eq. 16 given the network's current errors (so it reads the label noise as the paper
intends), but it no longer re-weights the tasks, so it cannot starve one of them when s converges.

The box loss (Eq. 14) and the softmax / binary CE of Faster R-CNN take only r(s) from the form: they have no
focusing factor. At σ = 1 the log σ forms are the plain losses. The Liebel forms add r(0) = log 2: a
constant in the network's weights for the box loss and the CE, but under the focal loss's focusing factor
it becomes log 2 · α_t · q^γ, which the logits do feel (it pulls every q down, like a second focal term).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BAYESIAN_FORMS", "BayesianForm", "BayesianFormName", "form_of", "regulariser", "regulariser_grad"]

BayesianFormName = Literal["paper", "liebel", "fixed_focus", "fixed_focus_liebel", "detached"]


@dataclass(frozen=True)
class BayesianForm:
    """``scaled_focus``: Eq. 16's σ-dependent focusing factor (else the plain q^γ); ``liebel``: r(s) =
    log(1 + σ²) = softplus(s) (else log σ = s/2); ``detached``: s is fitted on the detached predictions and
    the network trains on the plain losses (losses/task.py)."""

    scaled_focus: bool
    liebel: bool
    detached: bool = False


BAYESIAN_FORMS: dict[str, BayesianForm] = {
    "paper": BayesianForm(scaled_focus=True, liebel=False),
    "liebel": BayesianForm(scaled_focus=True, liebel=True),
    "fixed_focus": BayesianForm(scaled_focus=False, liebel=False),
    "fixed_focus_liebel": BayesianForm(scaled_focus=False, liebel=True),
    "detached": BayesianForm(scaled_focus=False, liebel=False, detached=True),
}

PAPER = BAYESIAN_FORMS["paper"]


def form_of(name: str) -> BayesianForm:
    """The row of ``name``; an unknown name is one line listing the forms."""
    if name not in BAYESIAN_FORMS:
        raise ValueError(f"unknown Bayesian form {name!r}; one of {', '.join(BAYESIAN_FORMS)}")
    return BAYESIAN_FORMS[name]


def regulariser(s: Tensor, form: BayesianForm) -> Tensor:
    """r(s): log σ = s/2, or log(1 + σ²) = softplus(s) (stable for any s)."""
    return F.softplus(s) if form.liebel else 0.5 * s


def regulariser_grad(s: Tensor, form: BayesianForm) -> Tensor:
    """dr/ds: 1/2, or σ²/(1 + σ²) = sigmoid(s)."""
    return torch.sigmoid(s) if form.liebel else torch.full_like(s, 0.5)


def regulariser_at_zero(form: BayesianForm) -> float:
    """r(0): the constant by which a form differs from the plain loss at σ = 1."""
    return math.log(2.0) if form.liebel else 0.0
