"""Multi-scale loss weighting: L_total = Σ_i w_i · L_i over FPN levels (Eq. 1, Luo et al.).

``WEIGHTINGS`` maps the config name (``weighting.name``) to the class; it is the only name lookup.
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
from robustdet.weighting.avw import AdaptiveVarianceWeighting
from robustdet.weighting.base import LevelWeighting
from robustdet.weighting.equal import EqualWeighting
from robustdet.weighting.rlo import (
    ReinforcementLearningOptimization,
    sample_action,
    update_probabilities,
    window_reward,
)
from robustdet.weighting.window import WindowedWeighting, WindowStats

WEIGHTINGS: dict[str, type[LevelWeighting]] = {
    "equal": EqualWeighting,
    "avw": AdaptiveVarianceWeighting,
    "rlo": ReinforcementLearningOptimization,
}

__all__ = [
    "ACTIONS",
    "WEIGHTINGS",
    "AdaptiveVarianceWeighting",
    "EqualWeighting",
    "LevelWeighting",
    "ReinforcementLearningOptimization",
    "WindowStats",
    "WindowedWeighting",
    "amplify",
    "amplify_largest_loss",
    "amplify_largest_rate",
    "amplify_smallest_loss",
    "equal_weights",
    "sample_action",
    "two_levels",
    "update_probabilities",
    "window_reward",
]
