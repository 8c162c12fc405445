"""Weightings that decide over windows of ``interval`` iterations (Luo et al. Eq. 2; Liu et al.'s DWA).

:class:`WindowedWeighting` keeps the window: every iteration's per-level losses (all-reduced to their mean
over the ranks under ``torch.distributed``) go into a preallocated [interval, num_levels] float64 buffer;
when it is full, :meth:`~WindowedWeighting._close_window` turns it into the weights of the next window.

:class:`ActionWeighting` is the base of AVW and RLO: each closed window's per-level sums 𝓛_i (Eq. 2),
sample variances Var_i (Eq. 3, ddof = 1) and variance-decrease rates r_i (Eq. 4) go to ``_choose_action``,
which returns the action number k; the weights become ``ACTIONS[k]`` of those statistics. AVW always
answers 0; RLO learns (Eq. 7-9).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from pydantic import Field
from torch import Tensor

from robustdet import distributed as dist
from robustdet.weighting.actions import ACTIONS
from robustdet.weighting.base import LevelWeighting, LogFields, MeasuredSection, require_int

_STATE_VERSION = 1


class WindowStats(NamedTuple):
    """One closed window, in float64: 𝓛_i (Eq. 2), Var_i (Eq. 3) and r_i (Eq. 4), one entry per level."""

    sums: list[float]
    variances: list[float]
    rates: list[float]


class WindowedWeighting(LevelWeighting):
    """A preallocated [interval, num_levels] float64 window of measured per-level losses.

    State (in ``get_extra_state``, so a resumed run continues exactly): the window rows filled so far, the
    fill position and the number of closed windows. Subclasses implement :meth:`_close_window`.
    """

    def __init__(self, num_levels: int, interval: int = 100, *, min_levels: int = 1) -> None:
        super().__init__(num_levels, min_levels=min_levels)
        self.interval = require_int("interval", interval, 2, "the sample variance of Eq. 3 needs 2 iterations")
        # Preallocated so a step is one row copy; the row views avoid an indexing op per step.
        self._window = torch.zeros(self.interval, num_levels, dtype=torch.float64)
        self._rows = list(self._window.unbind(0))
        self._position = 0
        self._windows_closed = 0

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
        where = ""
        if dist.is_distributed():
            x = dist.mean_over_ranks(x)
            where = f" (mean over {dist.world_size()} ranks)"
        row = self._rows[self._position]
        row.copy_(x)
        # Checked after the copy (one device sync instead of two); the position does not advance on error,
        # so the bad row is overwritten by the next step.
        self._check_finite(row.tolist(), where)
        self._position += 1
        if self._position == self.interval:
            self.weights.copy_(torch.as_tensor(self._close_window(self._window), dtype=torch.float64))
            self._windows_closed += 1
            self._position = 0
        return self.weights.clone()

    def _close_window(self, window: Tensor) -> list[float]:
        """The weights for the next window from the full ``window`` [interval, num_levels] (float64)."""
        raise NotImplementedError

    @property
    def windows_closed(self) -> int:
        """How many windows have closed so far (t of Eq. 2 for the last closed window)."""
        return self._windows_closed

    def get_extra_state(self) -> dict[str, Any]:
        """Window buffer and counters; loads with ``weights_only=True``."""
        return {
            "version": _STATE_VERSION,
            "window": self._window.clone(),
            "position": self._position,
            "windows_closed": self._windows_closed,
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
        # copy_ into the existing buffer keeps the row views of ``_rows`` valid
        self._window.copy_(window)
        self._position = position
        self._windows_closed = require_int("windows_closed", state["windows_closed"], 0, "a counter")

    def extra_repr(self) -> str:
        return f"num_levels={self.num_levels}, interval={self.interval}, measure={self.measure}"


class ActionSection(MeasuredSection):
    """The settings AVW and RLO share (Eq. 2-5, Luo et al.)."""

    lambdas: tuple[float, float] = (1.5, 1.0)
    eps: float = Field(1e-5, gt=0)


class ActionWeighting(WindowedWeighting):
    """Base of AVW and RLO: window statistics (Eq. 2-4) and the action rules of ``actions.py``.

    State carried across windows besides the window itself: Var^prev (1 for every level before the first
    window, equations.md), 𝓛^prev (None before the first window) and the action in force (None before
    the first window closes).
    """

    def __init__(
        self,
        num_levels: int,
        interval: int = 100,
        lambdas: Sequence[float] = (1.5, 1.0),
        eps: float = 1e-5,
    ) -> None:
        super().__init__(num_levels, interval, min_levels=2)  # Eq. 5 selects two levels
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
        self._var_prev = torch.ones(num_levels, dtype=torch.float64)
        self._sums_prev: list[float] | None = None
        self._action: int | None = None
        self._rates: list[float] | None = None

    def _close_window(self, window: Tensor) -> list[float]:
        sums = window.sum(dim=0)  # Eq. 2
        variances = window.var(dim=0, correction=1)  # Eq. 3
        rates = (self._var_prev - variances) / (self._var_prev + self.eps)  # Eq. 4
        stats = WindowStats(sums.tolist(), variances.tolist(), rates.tolist())
        action = self._choose_action(stats)  # reads 𝓛^prev and the action in force: update them after
        self._var_prev = variances
        self._sums_prev = stats.sums
        self._action = action
        self._rates = stats.rates
        return ACTIONS[action](stats.rates, stats.sums, self.lambdas)

    def _choose_action(self, stats: WindowStats) -> int:
        """The action a_k whose weights hold during the next window (index into ``ACTIONS``)."""
        raise NotImplementedError

    def log_fields(self) -> LogFields:
        """r_i of the last closed window (Eq. 4), one value per level, once a window has closed."""
        return {} if self._rates is None else {"variance_rate": list(self._rates)}

    def get_extra_state(self) -> dict[str, Any]:
        """The window state plus Var^prev, 𝓛^prev and the action in force."""
        state = super().get_extra_state()
        state.update(
            var_prev=self._var_prev.clone(),
            sums_prev=None if self._sums_prev is None else list(self._sums_prev),
            action=self._action,
            rates=None if self._rates is None else list(self._rates),
        )
        return state

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
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
        self._var_prev = state["var_prev"].to(torch.float64).clone()
        self._sums_prev = None if sums_prev is None else [float(v) for v in sums_prev]
        self._action = action
        rates = state.get("rates")  # absent from checkpoints written before it was logged
        self._rates = None if rates is None else [float(v) for v in rates]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lambdas={self.lambdas}, eps={self.eps}"
