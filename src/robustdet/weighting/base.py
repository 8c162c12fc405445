"""The interface every multi-scale loss weighting implements (Eq. 1, Luo et al.).

The engine calls, once per training iteration and on every rank::

    total = weighting.combine(level_losses)   # Eq. 1 with the weights in force now
    total.backward()
    weighting.step(level_losses.detach())     # may change the weights for the next iteration

``combine`` comes first: the weights that ``step`` returns hold from the *next* iteration on.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from robustdet.section import Section

LogFields = dict[str, float | int | list[float]]


class WeightingSection(Section):
    """What every ``weighting`` section has: its ``name`` (the discriminator of the union in config.py)."""

    name: str


class MeasuredSection(WeightingSection):
    """Sections of weightings that measure the levels over windows of ``interval`` iterations.

    ``measure`` (equations.md, "Bayesian losses with AVW / RLO"): ``plain`` takes each level's statistics
    on its plain loss (focal + smooth L1 at σ = 1, detached) and applies the weights to the trained one;
    ``trained`` measures the trained (Bayesian) loss itself. Without Bayesian losses the two are the same.
    """

    interval: int = Field(100, ge=2)
    measure: Literal["plain", "trained"] = "plain"


def require_int(name: str, value: object, minimum: int, why: str) -> int:
    """Return ``value`` if it is an int (not a bool) ``>= minimum``; otherwise raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} ({why}), got {value!r}")
    return value


def require_float(name: str, value: object, low: float, high: float, why: str) -> float:
    """Return ``value`` as a float if it is a finite real number in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low}, {high}] ({why}), got {value!r}")
    return float(value)


class LevelWeighting(nn.Module):
    """Weights w_i of the per-level losses L_i in L_total = Σ_i w_i · L_i (Eq. 1, Luo et al.).

    A ``nn.Module`` so that weightings with learnable state (Kendall's per-level log-variances) fit
    the same interface: the engine puts ``weighting.parameters()`` into the optimizer; it is empty
    for the equal, AVW and RLO weightings, whose weights are constants (buffers, no gradient).
    """

    weights: Tensor
    # the config section this weighting reads (a pydantic model keyed on ``name``); see ``from_config``
    section: ClassVar[type[WeightingSection]]
    # what ``step`` is fed: the detector's plain per-level losses ("plain") or the trained ones ("trained")
    measure: str = "trained"

    def __init__(self, num_levels: int, *, min_levels: int = 1) -> None:
        super().__init__()
        self.num_levels = require_int("num_levels", num_levels, min_levels, "pyramid levels to weight")
        # float64 so the weights logged and checkpointed are the ones Eq. 5 gives, not float32 roundings
        self.register_buffer("weights", torch.ones(num_levels, dtype=torch.float64))

    @classmethod
    def from_config(cls, section: Any, num_levels: int, seed: int) -> LevelWeighting:
        """Build from this weighting's own config ``section`` for ``num_levels`` levels and the run ``seed``."""
        raise NotImplementedError

    def step(self, level_losses: Tensor) -> Tensor:
        """Record one iteration's unweighted per-level losses; return the weights for the next one."""
        raise NotImplementedError

    def combine(self, level_losses: Tensor) -> Tensor:
        """Total loss for backprop, Σ_i w_i · L_i (Eq. 1, Luo et al.), with the weights as constants.

        The gradient with respect to ``level_losses`` is ``weights``. Subclasses with learnable
        weights (Kendall's uncertainty weighting) override this to add their own terms.
        """
        self._check_shape(level_losses)
        w = self.weights.to(device=level_losses.device, dtype=level_losses.dtype)
        return (w * level_losses).sum()

    def forward(self, level_losses: Tensor) -> Tensor:
        return self.combine(level_losses)

    def log_fields(self) -> LogFields:
        """This weighting's state as named scalars or short vectors, beyond the weights themselves.

        The engine logs them as ``weighting/<name>`` (``log.jsonl``, TensorBoard) and ``report`` draws one
        plot per family: names ``family/member`` share a plot, a vector of one value per level is drawn per
        level. The weights in force are logged by the engine for every weighting (``level_weights``).
        """
        return {}

    def _check_shape(self, level_losses: Tensor) -> None:
        if level_losses.dim() != 1 or level_losses.shape[0] != self.num_levels:
            raise ValueError(
                f"expected a 1-D tensor of {self.num_levels} per-level losses, "
                f"got shape {tuple(level_losses.shape)}"
            )

    @staticmethod
    def _check_finite(values: list[float], where: str) -> None:
        for level, value in enumerate(values):
            if not math.isfinite(value):
                raise ValueError(f"level {level} loss is {value}{where}; per-level losses must be finite")

    def extra_repr(self) -> str:
        return f"num_levels={self.num_levels}"
