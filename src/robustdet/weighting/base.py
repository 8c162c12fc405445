"""The interface every multi-scale loss weighting implements (Eq. 1, Luo et al.).

The engine calls, once per training iteration and on every rank::

    total = weighting.combine(level_losses)   # Eq. 1 with the weights in force now
    total.backward()
    weighting.step(level_losses.detach())     # may change the weights for the next iteration

``combine`` comes first: the weights that ``step`` returns hold from the *next* iteration on.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn


def require_int(name: str, value: object, minimum: int, why: str) -> int:
    """Return ``value`` if it is an int (not a bool) ``>= minimum``; otherwise raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} ({why}), got {value!r}")
    return value


def require_float(name: str, value: object, low: float, high: float, why: str) -> float:
    """Return ``value`` as a float if it is a finite real number in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low}, {high}] ({why}), got {value!r}")
    return float(value)


def distributed_world_size() -> int:
    """World size of the default process group, or 1 when ``torch.distributed`` is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def mean_over_ranks(values: Tensor, world_size: int) -> Tensor:
    """All-reduce (mean) a small tensor over the default process group, in float64.

    Float64 so that the mean every rank receives is the one a single process fed the mean would
    compute; ``ReduceOp.AVG`` is NCCL-only, hence SUM and a division.
    """
    reduced = values.to(torch.float64, copy=True)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    reduced /= world_size
    return reduced


class LevelWeighting(nn.Module):
    """Weights w_i of the per-level losses L_i in L_total = Σ_i w_i · L_i (Eq. 1, Luo et al.).

    A ``nn.Module`` so that weightings with learnable state (Kendall's per-level log-variances) fit
    the same interface: the engine puts ``weighting.parameters()`` into the optimizer; it is empty
    for the equal, AVW and RLO weightings, whose weights are constants (buffers, no gradient).
    """

    weights: Tensor

    def __init__(self, num_levels: int, *, min_levels: int = 1) -> None:
        super().__init__()
        self.num_levels = require_int("num_levels", num_levels, min_levels, "pyramid levels to weight")
        # float64 so the weights logged and checkpointed are the ones Eq. 5 gives, not float32 roundings
        self.register_buffer("weights", torch.ones(num_levels, dtype=torch.float64))

    def step(self, level_losses: Tensor) -> Tensor:
        """Record one iteration's unweighted per-level losses; return the weights for the next one."""
        raise NotImplementedError

    def combine(self, level_losses: Tensor) -> Tensor:
        """Total loss for backprop, Σ_i w_i · L_i (Eq. 1, Luo et al.), with the weights as constants.

        The gradient with respect to ``level_losses`` is ``weights``. Subclasses with learnable
        weights (Kendall's uncertainty weighting) override this to add their own terms.
        """
        self._check_shape(level_losses)
        w = self.weights.to(device=level_losses.device, dtype=level_losses.dtype)
        return (w * level_losses).sum()

    def forward(self, level_losses: Tensor) -> Tensor:
        return self.combine(level_losses)

    def log_fields(self) -> dict[str, object]:
        """What the engine writes to ``log.jsonl`` each time it logs (JSON-serialisable)."""
        return {"level_weights": self.weights.tolist()}

    def _check_shape(self, level_losses: Tensor) -> None:
        if level_losses.dim() != 1 or level_losses.shape[0] != self.num_levels:
            raise ValueError(
                f"expected a 1-D tensor of {self.num_levels} per-level losses, "
                f"got shape {tuple(level_losses.shape)}"
            )

    @staticmethod
    def _check_finite(values: list[float], where: str) -> None:
        for level, value in enumerate(values):
            if not math.isfinite(value):
                raise ValueError(f"level {level} loss is {value}{where}; per-level losses must be finite")

    def extra_repr(self) -> str:
        return f"num_levels={self.num_levels}"
