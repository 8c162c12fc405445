"""Reinforcement Learning Optimization (Sec. 3.3, Eq. 6-9, Algorithm 1, Luo et al.)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from robustdet.weighting.actions import ACTIONS
from robustdet.weighting.base import LogFields, require_float, require_int
from robustdet.weighting.window import ActionSection, ActionWeighting, WindowStats

# how the log and the report name the actions (Sec. 3.3): weighting/action_probability/<name>
ACTION_NAMES = ("a0_avw", "a1_smallest_loss", "a2_largest_loss", "a3_equal")


class RLOConfig(ActionSection):
    """``weighting.name: rlo``: AVW's settings plus the policy's step γ (Eq. 9) and bounds β_min, β_max."""

    name: Literal["rlo"] = "rlo"
    rl_step: float = Field(0.01, ge=0, le=1)
    p_min: float = Field(0.1, ge=0, le=1)
    p_max: float = Field(0.9, ge=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> RLOConfig:
        if self.p_min > self.p_max:
            raise ValueError("weighting.p_min must not exceed weighting.p_max")
        return self


def window_reward(previous_total: float, total: float) -> int:
    """Eq. 7 (Luo et al.): R = sign(Σ_i 𝓛_{i,t−1} − Σ_i 𝓛_{i,t}), on the unweighted window sums."""
    difference = previous_total - total
    return (difference > 0) - (difference < 0)


def update_probabilities(
    probabilities: Sequence[float], action: int, reward: int, rl_step: float, p_min: float, p_max: float
) -> list[float]:
    """Eq. 9 (Luo et al.): reward or punish the action that was in force, renormalise the others.

    p_k,new = clip(p_k,old + rl_step if reward > 0 else p_k,old − rl_step, p_min, p_max) (``brelu``);
    every other p_q ← p_q · (1 − p_k,new) / (1 − p_k,old), which keeps Σ p = 1. A reward of 0 (equal
    totals) punishes, as the paper's "non-positive reward". Only p_k is clipped: the rescaled others can
    leave [p_min, p_max], as in the paper.

    p_k,old = 1 (only reachable with p_max = 1) makes the ratio 0/0; the others are then all 0 and
    share 1 − p_k,new equally, so the probabilities still sum to 1.
    """
    p_old = probabilities[action]
    p_new = min(max(p_old + rl_step if reward > 0 else p_old - rl_step, p_min), p_max)
    others = [k for k in range(len(probabilities)) if k != action]
    updated = list(probabilities)
    updated[action] = p_new
    if 1.0 - p_old <= 0.0 or sum(probabilities[k] for k in others) == 0.0:
        for k in others:
            updated[k] = (1.0 - p_new) / len(others)
    else:
        scale = (1.0 - p_new) / (1.0 - p_old)
        for k in others:
            updated[k] = probabilities[k] * scale
    return updated


def sample_action(probabilities: Sequence[float], u: float) -> int:
    """Inverse-CDF draw of an action (Eq. 8): the first k with u < p_0 + … + p_k, for u uniform in [0, 1).

    Should rounding leave the cumulative sum just under 1 and u above it, the last action with p > 0 is
    taken, so an action of probability 0 is never drawn.
    """
    cumulative = 0.0
    for k, p in enumerate(probabilities):
        cumulative += p
        if p > 0.0 and u < cumulative:
            return k
    return max(k for k, p in enumerate(probabilities) if p > 0.0)


class ReinforcementLearningOptimization(ActionWeighting):
    """RLO: every ``interval`` iterations, draw one of four weight-update actions and learn from the loss.

    Actions (Sec. 3.3): a0 = AVW's choice (two largest r, Eq. 4-5); a1 = the two smallest 𝓛 (λ_1 to the
    smallest); a2 = the two largest 𝓛 (λ_1 to the largest); a3 = all weights 1. P starts at 0.25 each.

    At the end of window t (Algorithm 1, lines 6-11):

    1. reward R = sign(Σ𝓛_{t−1} − Σ𝓛_t) on the unweighted sums (Eq. 7); none at the first window;
    2. if an action a_k was in force during window t, update P by Eq. 9 (see ``update_probabilities``);
    3. draw the next action from P (Eq. 8) and set the weights from it; they hold during window t+1.

    Timing: during window 1 no action is in force (weights 1), so window 1's close only draws. The
    action drawn at the end of window 1 is in force during window 2; at the end of window 2 the reward
    sign(Σ𝓛_1 − Σ𝓛_2) judges it and updates its probability; then the action for window 3 is drawn.
    In general the reward at the end of window t judges the action drawn at the end of window t − 1
    (the paper's R_{A_{t−1}}).

    Draws use a private CPU ``torch.Generator`` seeded with ``seed`` and consume exactly one float64
    uniform per closed window. Under ``torch.distributed`` every rank sees the same all-reduced losses,
    so every rank takes the same branches and consumes the same stream: the draws agree without a
    broadcast, provided every rank uses the same ``seed`` (the run seed, not a per-rank seed).
    """

    def __init__(
        self,
        num_levels: int,
        interval: int = 100,
        lambdas: Sequence[float] = (1.5, 1.0),
        eps: float = 1e-5,
        rl_step: float = 0.01,
        p_min: float = 0.1,
        p_max: float = 0.9,
        seed: int = 0,
    ) -> None:
        super().__init__(num_levels, interval, lambdas, eps)
        self.rl_step = require_float("rl_step", rl_step, 0.0, 1.0, "γ of Eq. 9, a probability step")
        self.p_min = require_float("p_min", p_min, 0.0, 1.0, "β_min of Eq. 9, a probability")
        self.p_max = require_float("p_max", p_max, 0.0, 1.0, "β_max of Eq. 9, a probability")
        if self.p_min > self.p_max:
            raise ValueError(f"p_min ({p_min}) must not exceed p_max ({p_max})")
        self.seed = require_int("seed", seed, 0, "seed of the action draws")
        self._probabilities = [1.0 / len(ACTIONS)] * len(ACTIONS)
        self._generator = torch.Generator().manual_seed(self.seed)

    section = RLOConfig

    @classmethod
    def from_config(cls, section: RLOConfig, num_levels: int, seed: int) -> ReinforcementLearningOptimization:
        """Every rank passes the run seed, so every rank draws the same actions."""
        weighting = cls(
            num_levels,
            section.interval,
            section.lambdas,
            section.eps,
            rl_step=section.rl_step,
            p_min=section.p_min,
            p_max=section.p_max,
            seed=seed,
        )
        weighting.measure = section.measure
        return weighting

    @property
    def probabilities(self) -> Tensor:
        """P = (p_0, p_1, p_2, p_3) (Eq. 8), float64."""
        return torch.tensor(self._probabilities, dtype=torch.float64)

    @property
    def action(self) -> int | None:
        """The action a_k in force now (drawn at the last window close); None before the first close."""
        return self._action

    def _choose_action(self, stats: WindowStats) -> int:
        if self._sums_prev is not None and self._action is not None:
            reward = window_reward(sum(self._sums_prev), sum(stats.sums))
            self._probabilities = update_probabilities(
                self._probabilities, self._action, reward, self.rl_step, self.p_min, self.p_max
            )
        return self._draw_action()

    def _draw_action(self) -> int:
        u = float(torch.rand((), generator=self._generator, dtype=torch.float64))
        return sample_action(self._probabilities, u)

    def log_fields(self) -> LogFields:
        """The action probabilities P (one family), the action in force (−1 before the first) and r_i."""
        probabilities = zip(ACTION_NAMES, self._probabilities, strict=True)
        fields: LogFields = {f"action_probability/{n}": p for n, p in probabilities}
        fields["action"] = -1 if self._action is None else self._action
        fields.update(super().log_fields())
        return fields

    def get_extra_state(self) -> dict[str, Any]:
        """The window state plus P and the generator state (a uint8 tensor)."""
        state = super().get_extra_state()
        state["probabilities"] = list(self._probabilities)
        state["generator_state"] = self._generator.get_state()
        return state

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        probabilities = [float(p) for p in state["probabilities"]]
        if (
            len(probabilities) != len(ACTIONS)
            or not all(0.0 <= p <= 1.0 for p in probabilities)
            or not math.isclose(sum(probabilities), 1.0, abs_tol=1e-6)
        ):
            raise ValueError(
                f"checkpoint RLO probabilities {probabilities} are not 4 probabilities summing to 1"
            )
        self._probabilities = probabilities
        self._generator.set_state(state["generator_state"])

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, rl_step={self.rl_step}, p_min={self.p_min}, p_max={self.p_max}, "
            f"seed={self.seed}"
        )
