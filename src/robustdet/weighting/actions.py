"""The four weight-update rules of the RLO action set 𝒜 = {a0, a1, a2, a3} (Sec. 3.3, Luo et al.).

AVW is RLO always taking a0 (Sec. 3.3), so both use these functions; nothing else selects levels.
They are pure functions on Python floats: the statistics of one window are a handful of numbers, and
Python's sort is stable, which gives the "ties: lower level index first" rule of equations.md for free.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

ActionRule = Callable[[Sequence[float], Sequence[float], tuple[float, float]], list[float]]


def two_levels(values: Sequence[float], *, largest: bool) -> tuple[int, int]:
    """Indices of the two largest (or smallest) values; among equal values the lower index comes first.

    ``sorted`` is stable, also with ``reverse=True``, so equal values keep their index order.
    """
    order = sorted(range(len(values)), key=values.__getitem__, reverse=largest)
    return order[0], order[1]


def amplify(levels: tuple[int, int], sums: Sequence[float], lambdas: tuple[float, float]) -> list[float]:
    """Eq. 5 (Luo et al.): w_j = 1 + λ_j · 𝓛_j / Σ_i 𝓛_i for the two selected levels, 1 elsewhere.

    ``levels[0]`` gets ``lambdas[0]`` (1.5 by default), ``levels[1]`` gets ``lambdas[1]`` (1.0).

    The share 𝓛_j / Σ_i 𝓛_i is taken over the positive parts, max(𝓛, 0): for the non-negative losses
    the paper has in mind this is Eq. 5 exactly, and every weight stays in [1, 1 + λ]. The Bayesian
    losses (Eq. 14, 16) contain log σ terms and go negative once σ < 1, and a per-level sum can then be
    negative or the total near zero; the plain ratio would give negative or unbounded weights, i.e.
    gradient ascent on a level (measured: w = −2.37 on P3 and a diverged run, docs/weighting.md). A window
    without positive loss mass leaves all weights at 1.
    """
    weights = [1.0] * len(sums)
    positive = [max(v, 0.0) for v in sums]
    total = sum(positive)
    if total <= 0.0:
        return weights
    for level, lam in zip(levels, lambdas, strict=True):
        weights[level] = 1.0 + lam * positive[level] / total
    return weights


def amplify_largest_rate(
    rate: Sequence[float], sums: Sequence[float], lambdas: tuple[float, float]
) -> list[float]:
    """Action a0 = AVW (Eq. 4-5, Luo et al.): amplify the two levels with the largest variance-decrease rate.

    λ_1 goes to the largest r.
    """
    return amplify(two_levels(rate, largest=True), sums, lambdas)


def amplify_smallest_loss(
    rate: Sequence[float], sums: Sequence[float], lambdas: tuple[float, float]
) -> list[float]:
    """Action a1 (Sec. 3.3, Luo et al.): amplify the two levels with the smallest window loss 𝓛 (Eq. 2).

    λ_1 goes to the smallest.
    """
    return amplify(two_levels(sums, largest=False), sums, lambdas)


def amplify_largest_loss(
    rate: Sequence[float], sums: Sequence[float], lambdas: tuple[float, float]
) -> list[float]:
    """Action a2 (Sec. 3.3, Luo et al.): amplify the two levels with the largest window loss 𝓛 (Eq. 2).

    λ_1 goes to the largest.
    """
    return amplify(two_levels(sums, largest=True), sums, lambdas)


def equal_weights(rate: Sequence[float], sums: Sequence[float], lambdas: tuple[float, float]) -> list[float]:
    """Action a3 (Sec. 3.3, Luo et al.): every weight 1."""
    return [1.0] * len(sums)


# Indexed by the action number k of a_k; the order is the paper's and is part of the checkpoint format.
ACTIONS: tuple[ActionRule, ...] = (
    amplify_largest_rate,
    amplify_smallest_loss,
    amplify_largest_loss,
    equal_weights,
)
