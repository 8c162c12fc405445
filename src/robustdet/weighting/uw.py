"""Uncertainty weighting across pyramid levels (Kendall, Gal, Cipolla, CVPR 2018; the form LibMTL uses).

A baseline from the multi-task literature to compare AVW and RLO against (equations.md, "Per-level
baselines"): each level i gets a learnable u_i = log σ_i², and

    L_total = Σ_i [ ½·exp(−u_i)·L_i + ½·u_i ]

so the weight w_i = ½·exp(−u_i) carries gradient: ∂L_total/∂u_i = −½·exp(−u_i)·L_i + ½, which drives
u_i towards log L_i. u_i starts at −log 2, so every weight starts at 1 (LibMTL starts at −0.5).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from robustdet.weighting.base import LevelWeighting, LogFields, WeightingSection

INIT_LOG_VAR = -math.log(2.0)  # ½·exp(−u) = 1: the run starts as the equal weighting


class UWConfig(WeightingSection):
    """``weighting.name: uw``: the initial u_i = log σ_i² of every level (−log 2: all weights start at 1).

    The u_i are trained in the log-variance optimizer group (``train.optimizer.log_var_lr``), never
    weight-decayed.
    """

    name: Literal["uw"] = "uw"
    init: float = Field(INIT_LOG_VAR, ge=-20, le=20)


class UncertaintyWeighting(LevelWeighting):
    """Kendall et al.'s uncertainty weighting with one log-variance u_i per pyramid level.

    ``combine`` returns Σ_i ½·exp(−u_i)·L_i + ½·u_i; gradients reach both the detector (through L_i) and
    the u_i. ``weights`` holds the detached ½·exp(−u_i) as of the last ``step`` (or construction): the
    weights the next ``combine`` uses, which the engine logs for that iteration. It measures nothing over
    windows, so ``step`` only checks its input and refreshes the weights after the optimizer moved u.
    Under ``torch.distributed`` the u_i are not part of the DDP model: the engine averages their gradients
    over the ranks (``distributed.average_gradients``) so that every rank keeps the same u.
    """

    section = UWConfig

    def __init__(self, num_levels: int, init: float = INIT_LOG_VAR) -> None:
        super().__init__(num_levels)
        if not math.isfinite(init):
            raise ValueError(f"init must be finite, got {init}")
        self.log_vars = nn.Parameter(torch.full((num_levels,), float(init)))
        self._refresh()

    @classmethod
    def from_config(cls, section: UWConfig, num_levels: int, seed: int) -> UncertaintyWeighting:
        return cls(num_levels, section.init)

    def _refresh(self) -> None:
        with torch.no_grad():
            self.weights.copy_(0.5 * torch.exp(-self.log_vars.detach().to(torch.float64)))

    def combine(self, level_losses: Tensor) -> Tensor:
        """Σ_i ½·exp(−u_i)·L_i + ½·u_i (Kendall et al. Eq. 7 in LibMTL's form), differentiable in u."""
        self._check_shape(level_losses)
        u = self.log_vars.to(device=level_losses.device, dtype=level_losses.dtype)
        return (0.5 * torch.exp(-u) * level_losses + 0.5 * u).sum()

    def step(self, level_losses: Tensor) -> Tensor:
        x = level_losses.detach()
        self._check_shape(x)
        self._check_finite(x.tolist(), "")
        self._refresh()
        return self.weights.clone()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[no-untyped-def]
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._refresh()
        return result

    def log_fields(self) -> LogFields:
        """σ_i = exp(u_i / 2) per level."""
        return {"sigma": torch.exp(0.5 * self.log_vars.detach().double()).tolist()}

    def extra_repr(self) -> str:
        return f"num_levels={self.num_levels}"
