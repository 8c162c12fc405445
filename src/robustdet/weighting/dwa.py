"""Dynamic Weight Average across pyramid levels (Liu, Johns, Davison, CVPR 2019).

A baseline from the multi-task literature to compare AVW and RLO against (equations.md, "Per-level
baselines"). Per window t of ``interval`` iterations, with 𝓛_i(t) the mean of level i's measured loss:

    r_i = 𝓛_i(t−1) / 𝓛_i(t−2),     w_i(t) = K · exp(r_i / T) / Σ_j exp(r_j / T)

K the number of levels, T = ``temperature`` (2); all weights are 1 for the first two windows. A level
whose loss falls more slowly than the others' (larger r) gets more weight. Measured on the plain losses
(``measure: plain``) like AVW and RLO.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from robustdet.weighting.base import LogFields, MeasuredSection
from robustdet.weighting.window import WindowedWeighting


class DWAConfig(MeasuredSection):
    """``weighting.name: dwa``: window length ``interval``, softmax ``temperature`` T (Liu et al.: 2)."""

    name: Literal["dwa"] = "dwa"
    temperature: float = Field(2.0, gt=0)


class DynamicWeightAverage(WindowedWeighting):
    """DWA over windows of ``interval`` iterations; state: the last two window means (and the window)."""

    section = DWAConfig

    def __init__(self, num_levels: int, interval: int = 100, temperature: float = 2.0) -> None:
        super().__init__(num_levels, interval)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self._means: list[list[float]] = []  # 𝓛(t−2), 𝓛(t−1): the last two closed windows' means
        self._ratios: list[float] | None = None

    @classmethod
    def from_config(cls, section: DWAConfig, num_levels: int, seed: int) -> DynamicWeightAverage:
        weighting = cls(num_levels, section.interval, section.temperature)
        weighting.measure = section.measure
        return weighting

    def _close_window(self, window: Tensor) -> list[float]:
        self._means = [*self._means, window.mean(dim=0).tolist()][-2:]
        if len(self._means) < 2:
            return [1.0] * self.num_levels
        older, newer = (torch.tensor(m, dtype=torch.float64) for m in self._means)
        # a level with no loss in a window (no objects of its size) keeps ratio 1 instead of 0/0
        ratios = torch.where(older != 0, newer / torch.where(older != 0, older, 1.0), 1.0)
        self._ratios = ratios.tolist()
        return (self.num_levels * torch.softmax(ratios / self.temperature, dim=0)).tolist()

    def log_fields(self) -> LogFields:
        """r_i = 𝓛_i(t−1) / 𝓛_i(t−2) behind the weights in force, once two windows have closed."""
        return {} if self._ratios is None else {"loss_ratio": list(self._ratios)}

    def get_extra_state(self) -> dict[str, Any]:
        state = super().get_extra_state()
        state.update(means=[list(m) for m in self._means], ratios=self._ratios)
        return state

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        means = [[float(v) for v in m] for m in state["means"]]
        if len(means) > 2 or any(len(m) != self.num_levels for m in means):
            raise ValueError(f"checkpoint DWA means {means} are not at most 2 windows of {self.num_levels} levels")
        self._means = means
        self._ratios = None if state["ratios"] is None else [float(v) for v in state["ratios"]]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}"
