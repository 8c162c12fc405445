"""Window statistics shared by AVW and RLO (Eq. 2-4, Luo et al.).

Every ``interval`` iterations (the paper's α) a window closes: its per-level sums 𝓛_i (Eq. 2), sample
variances Var_i (Eq. 3, ddof = 1) and variance-decrease rates r_i (Eq. 4) go to ``_choose_action``,
which returns the action number k; the weights become ``ACTIONS[k]`` of those statistics and hold for
the whole next window. AVW always answers 0; RLO learns (Eq. 7-9).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from robustdet.weighting.actions import ACTIONS
from robustdet.weighting.base import LevelWeighting, distributed_world_size, mean_over_ranks, require_int

_STATE_VERSION = 1


class WindowStats(NamedTuple):
    """One closed window, in float64: 𝓛_i (Eq. 2), Var_i (Eq. 3) and r_i (Eq. 4), one entry per level."""

    sums: list[float]
    variances: list[float]
    rates: list[float]


class WindowedWeighting(LevelWeighting):
    """Base of AVW and RLO: a preallocated [interval, num_levels] float64 window and its statistics.

    State carried across windows (all of it in ``get_extra_state``): the window rows filled so far,
    Var^prev (1 for every level before the first window, equations.md), 𝓛^prev (None before the first
    window), the action in force (None before the first window closes) and the number of closed windows.
    """

    def __init__(
        self,
        num_levels: int,
        interval: int = 100,
        lambdas: Sequence[float] = (1.5, 1.0),
        eps: float = 1e-5,
    ) -> None:
        super().__init__(num_levels, min_levels=2)  # Eq. 5 selects two levels
        self.interval = require_int(
            "interval", interval, 2, "the sample variance of Eq. 3 needs 2 iterations"
        )
        lam = tuple(lambdas)
        if len(lam) != 2 or not all(isinstance(v, int | float) and math.isfinite(v) for v in lam):
            raise ValueError(
                f"lambdas must be 2 finite numbers (λ of the first and second selected level, Eq. 5), "
                f"got {lambdas!r}"
            )
        self.lambdas: tuple[float, float] = (float(lam[0]), float(lam[1]))
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0.0 < eps < math.inf:
            raise ValueError(f"eps must be a finite number > 0 (denominator of Eq. 4), got {eps!r}")
        self.eps = float(eps)
        # Preallocated so a step is one row copy; the row views avoid an indexing op per step.
        self._window = torch.zeros(self.interval, num_levels, dtype=torch.float64)
        self._rows = list(self._window.unbind(0))
        self._position = 0
        self._windows_closed = 0
        self._var_prev = torch.ones(num_levels, dtype=torch.float64)
        self._sums_prev: list[float] | None = None
        self._action: int | None = None

    def step(self, level_losses: Tensor) -> Tensor:
        """Add one iteration's per-level losses L_{i,m} to the window; close it every ``interval`` steps.

        Under ``torch.distributed`` (world size > 1) the losses are first all-reduced to their mean over
        the ranks, so every rank's window, statistics and weights are identical. Every rank must call
        ``step`` every iteration (it is a collective). The finiteness check runs on the reduced mean, so
        a NaN on one rank makes every rank raise together instead of leaving the others in a collective.
        Returns the weights in force from the next iteration on.
        """
        x = level_losses.detach()
        self._check_shape(x)
        world_size = distributed_world_size()
        where = ""
        if world_size > 1:
            x = mean_over_ranks(x, world_size)
            where = f" (mean over {world_size} ranks)"
        row = self._rows[self._position]
        row.copy_(x)
        # Checked after the copy (one device sync instead of two); the position does not advance on error,
        # so the bad row is overwritten by the next step.
        self._check_finite(row.tolist(), where)
        self._position += 1
        if self._position == self.interval:
            self._close_window()
        return self.weights.clone()

    def _close_window(self) -> None:
        window = self._window
        sums = window.sum(dim=0)  # Eq. 2
        variances = window.var(dim=0, correction=1)  # Eq. 3
        rates = (self._var_prev - variances) / (self._var_prev + self.eps)  # Eq. 4
        stats = WindowStats(sums.tolist(), variances.tolist(), rates.tolist())
        action = self._choose_action(stats)  # reads 𝓛^prev and the action in force: update them after
        self.weights.copy_(
            torch.tensor(ACTIONS[action](stats.rates, stats.sums, self.lambdas), dtype=torch.float64)
        )
        self._var_prev = variances
        self._sums_prev = stats.sums
        self._action = action
        self._windows_closed += 1
        self._position = 0

    def _choose_action(self, stats: WindowStats) -> int:
        """The action a_k whose weights hold during the next window (index into ``ACTIONS``)."""
        raise NotImplementedError

    @property
    def windows_closed(self) -> int:
        """How many windows have closed so far (t of Eq. 2 for the last closed window)."""
        return self._windows_closed

    def get_extra_state(self) -> dict[str, Any]:
        """Window buffer, counters, Var^prev, 𝓛^prev and action in force; loads with ``weights_only=True``."""
        return {
            "version": _STATE_VERSION,
            "window": self._window.clone(),
            "position": self._position,
            "windows_closed": self._windows_closed,
            "var_prev": self._var_prev.clone(),
            "sums_prev": None if self._sums_prev is None else list(self._sums_prev),
            "action": self._action,
        }

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"{type(self).__name__}: unrecognised weighting state (expected version 1)")
        window = state["window"]
        if tuple(window.shape) != tuple(self._window.shape):
            raise ValueError(
                f"{type(self).__name__}: checkpoint window has shape {tuple(window.shape)} "
                f"(interval, num_levels) but this weighting has {tuple(self._window.shape)}"
            )
        position = require_int("position", state["position"], 0, "rows filled in the checkpoint's window")
        if position >= self.interval:
            raise ValueError(f"checkpoint window position {position} must be < interval={self.interval}")
        action = state["action"]
        if action is not None and not 0 <= action < len(ACTIONS):
            raise ValueError(f"checkpoint action {action!r} is not one of 0..{len(ACTIONS) - 1}")
        sums_prev = state["sums_prev"]
        if sums_prev is not None and len(sums_prev) != self.num_levels:
            raise ValueError(f"checkpoint sums_prev has {len(sums_prev)} levels, expected {self.num_levels}")
        if tuple(state["var_prev"].shape) != (self.num_levels,):
            raise ValueError(
                f"checkpoint var_prev has shape {tuple(state['var_prev'].shape)}, expected {self.num_levels}"
            )
        # copy_ into the existing buffer keeps the row views of ``_rows`` valid
        self._window.copy_(window)
        self._position = position
        self._windows_closed = require_int("windows_closed", state["windows_closed"], 0, "a counter")
        self._var_prev = state["var_prev"].to(torch.float64).clone()
        self._sums_prev = None if sums_prev is None else [float(v) for v in sums_prev]
        self._action = action

    def extra_repr(self) -> str:
        return (
            f"num_levels={self.num_levels}, interval={self.interval}, lambdas={self.lambdas}, eps={self.eps}"
        )
