"""Adaptive Variance Weighting (Sec. 3.2, Eq. 2-5, Luo et al.)."""

from __future__ import annotations

from typing import Literal

from robustdet.weighting.window import ActionSection, ActionWeighting, WindowStats


class AVWConfig(ActionSection):
    """``weighting.name: avw``: window length ``interval`` (α, Eq. 2), ``lambdas`` (λ, Eq. 5), ``eps`` (Eq. 4)."""

    name: Literal["avw"] = "avw"


class AdaptiveVarianceWeighting(ActionWeighting):
    """AVW: every ``interval`` iterations, amplify the two levels whose loss variance fell fastest.

    At the end of each window of ``interval`` (α, Eq. 2) iterations, in float64:

    - 𝓛_i = Σ_m L_{i,m} (Eq. 2); Var_i = sample variance of L_{i,m} in the window, ddof = 1 (Eq. 3);
    - r_i = (Var_i^prev − Var_i) / (Var_i^prev + eps) (Eq. 4), with Var^prev = 1 before the first window;
    - the levels with the largest and second-largest r get w_j = 1 + λ_j · 𝓛_j / Σ_i 𝓛_i (Eq. 5),
      λ = ``lambdas`` = (1.5, 1.0); every other level gets 1; ties go to the lower level index.

    The new weights hold for the whole next window; before the first window closes all weights are 1.
    This is RLO's action a0 taken with probability 1 (Sec. 3.3), and shares its code.
    """

    section = AVWConfig

    @classmethod
    def from_config(cls, section: AVWConfig, num_levels: int, seed: int) -> AdaptiveVarianceWeighting:
        weighting = cls(num_levels, section.interval, section.lambdas, section.eps)
        weighting.measure = section.measure
        return weighting

    def _choose_action(self, stats: WindowStats) -> int:
        return 0
