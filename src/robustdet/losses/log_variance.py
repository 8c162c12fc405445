"""The learnable homoscedastic log-variances of one detector (s = log σ², Khanzhina et al. section 3)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["LogVariances"]


class LogVariances(nn.Module):
    """One 0-dim ``nn.Parameter`` s = log σ² per task, the σ of Eq. 14 and Eq. 16.

    Keep these parameters out of weight decay (decay would pull σ² towards 1 for no reason in the
    likelihood) and log them every iteration: nothing in the Bayesian focal loss stops s from drifting
    (docs/losses.md).

    Args:
        init: initial s per task name (a detector's ``loss_tasks``: the paper's s_reg = 1.0, s_cls = 0.0,
            section 4.2).
        log_var_range: optional (low, high). ``self[name]`` is then s clamped to it with ``torch.clamp``,
            whose gradient is zero outside the range: a parameter that crossed a bound gets no gradient
            from the loss until something else (not the loss) brings it back, so it stays where it was
            stopped. :meth:`out_of_range` lists those tasks for a warning.
    """

    def __init__(
        self,
        init: Mapping[str, float],
        log_var_range: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        values = dict(init)
        if not values:
            raise ValueError("init must name at least one task")
        if log_var_range is not None:
            low, high = (float(v) for v in log_var_range)
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(
                    f"log_var_range must be finite (low, high) with low < high, got {log_var_range}"
                )
            self.log_var_range: tuple[float, float] | None = (low, high)
        else:
            self.log_var_range = None
        self.log_vars = nn.ParameterDict()
        for name, value in values.items():
            if not name.isidentifier():
                raise ValueError(f"task name must be a Python identifier, got {name!r}")
            if not math.isfinite(float(value)):
                raise ValueError(f"init[{name!r}] must be finite, got {value}")
            if self.log_var_range is not None and not (
                self.log_var_range[0] < float(value) < self.log_var_range[1]
            ):
                # on a bound torch.clamp passes no gradient, so s would never move (measured: a run with
                # s_reg initialised at the upper bound kept it there for 1,000 iterations)
                raise ValueError(
                    f"init[{name!r}] = {value} must lie strictly inside log_var_range {self.log_var_range}: "
                    "at a bound s gets no gradient and never moves"
                )
            self.log_vars[name] = nn.Parameter(torch.tensor(float(value)))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.log_vars.keys())

    def __getitem__(self, name: str) -> Tensor:
        """s of task ``name`` as the losses should use it: clamped to ``log_var_range`` when one is set."""
        if name not in self.log_vars:
            raise KeyError(f"no log-variance for task {name!r}; tasks: {self.names}")
        s = self.log_vars[name]
        if self.log_var_range is None:
            return s
        return torch.clamp(s, self.log_var_range[0], self.log_var_range[1])

    def sigma(self, name: str) -> float:
        """σ = exp(s/2) of task ``name``, from the s the losses use (clamped when a range is set)."""
        return math.exp(0.5 * float(self[name].detach()))

    def as_dict(self) -> dict[str, float]:
        """The raw (unclamped) s of every task, for logging."""
        return {name: float(p.detach()) for name, p in self.log_vars.items()}

    def out_of_range(self) -> dict[str, float]:
        """Tasks whose raw s lies outside ``log_var_range`` (empty without a range), with their s."""
        if self.log_var_range is None:
            return {}
        low, high = self.log_var_range
        return {name: v for name, v in self.as_dict().items() if not low <= v <= high}

    def extra_repr(self) -> str:
        return f"names={self.names}, log_var_range={self.log_var_range}"
