"""Multi-scale loss weighting: L_total = Σ_i w_i · L_i over FPN levels (Eq. 1, Luo et al.).

``WEIGHTINGS`` is the one table of weightings: ``weighting.name`` → class. Each class declares its own
config section (``cls.section``, keyed on ``name``) and builds itself from it (``cls.from_config``), so a
new weighting is one new file plus one row here (docs/architecture.md).
"""

from __future__ import annotations

from robustdet.weighting.actions import (
    ACTIONS,
    amplify,
    amplify_largest_loss,
    amplify_largest_rate,
    amplify_smallest_loss,
    equal_weights,
    two_levels,
)
from robustdet.weighting.avw import AdaptiveVarianceWeighting, AVWConfig
from robustdet.weighting.base import LevelWeighting, LogFields, WeightingSection
from robustdet.weighting.dwa import DWAConfig, DynamicWeightAverage
from robustdet.weighting.equal import EqualConfig, EqualWeighting
from robustdet.weighting.rlo import (
    ReinforcementLearningOptimization,
    RLOConfig,
    sample_action,
    update_probabilities,
    window_reward,
)
from robustdet.weighting.uw import UncertaintyWeighting, UWConfig
from robustdet.weighting.window import ActionWeighting, WindowedWeighting, WindowStats

WEIGHTINGS: dict[str, type[LevelWeighting]] = {
    "equal": EqualWeighting,
    "avw": AdaptiveVarianceWeighting,
    "rlo": ReinforcementLearningOptimization,
    "uw": UncertaintyWeighting,
    "dwa": DynamicWeightAverage,
}


def build_weighting(section: WeightingSection, num_levels: int, seed: int) -> LevelWeighting:
    """The weighting ``section.name`` from its own section, for ``num_levels`` levels and the run seed."""
    return WEIGHTINGS[section.name].from_config(section, num_levels, seed)


__all__ = [
    "ACTIONS",
    "WEIGHTINGS",
    "AVWConfig",
    "ActionWeighting",
    "AdaptiveVarianceWeighting",
    "DWAConfig",
    "DynamicWeightAverage",
    "EqualConfig",
    "EqualWeighting",
    "LevelWeighting",
    "LogFields",
    "RLOConfig",
    "ReinforcementLearningOptimization",
    "UWConfig",
    "UncertaintyWeighting",
    "WeightingSection",
    "WindowStats",
    "WindowedWeighting",
    "amplify",
    "amplify_largest_loss",
    "amplify_largest_rate",
    "amplify_smallest_loss",
    "build_weighting",
    "equal_weights",
    "sample_action",
    "two_levels",
    "update_probabilities",
    "window_reward",
]
