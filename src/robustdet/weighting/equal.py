"""Equal weighting: the detector's ordinary total loss (Eq. 1, Luo et al., with every w_i = 1)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from robustdet.weighting.base import LevelWeighting, WeightingSection


class EqualConfig(WeightingSection):
    """``weighting.name: equal`` (the default): no settings."""

    name: Literal["equal"] = "equal"


class EqualWeighting(LevelWeighting):
    """All weights 1: Eq. 1 (Luo et al.) with w_i = 1, so ``combine`` is Σ_i L_i.

    Keeps no statistics and does not all-reduce under ``torch.distributed``: its weights never depend
    on the losses, so the ranks cannot disagree.
    """

    section = EqualConfig

    @classmethod
    def from_config(cls, section: EqualConfig, num_levels: int, seed: int) -> EqualWeighting:
        return cls(num_levels)

    def step(self, level_losses: Tensor) -> Tensor:
        """Validate the losses (length, finiteness) and return the unchanged weights (all 1)."""
        x = level_losses.detach()
        self._check_shape(x)
        self._check_finite(x.tolist(), "")
        return self.weights.clone()
