"""``checkpoints/best.pt``: the training state at the evaluation with the best value of one COCO metric.

``checkpoint.best_metric`` names the metric (AP, AP50, ... any of the 12). Each evaluation (every
``eval.period`` iterations and the final one) that beats the best so far writes ``best.pt``, a complete
checkpoint like ``last.pt`` with a ``best`` entry {metric, value, iteration}. The best so far is part of every
checkpoint's state, so a resumed run keeps comparing against the same number.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from robustdet.engine.checkpoint import write_failure
from robustdet.files import write_atomic

BEST = "best.pt"


class BestTracker:
    """The best value of ``metric`` seen so far and the iteration it was seen at."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.value = -math.inf
        self.iteration: int | None = None

    def improves(self, metrics: dict[str, Any]) -> bool:
        """Whether ``metrics`` (an evaluation's, with ``bbox``) beats the best so far (ties do not)."""
        value = float(metrics["bbox"][self.metric])
        return math.isfinite(value) and value > self.value

    def record(self, metrics: dict[str, Any], iteration: int) -> None:
        self.value = float(metrics["bbox"][self.metric])
        self.iteration = iteration

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.value, "iteration": self.iteration}

    def load_state_dict(self, state: dict[str, Any] | None) -> bool:
        """Restore a checkpoint's ``best`` entry; False (nothing restored) when it tracked another metric."""
        if not state or state.get("metric") != self.metric:
            return False
        self.value = float(state["value"])
        self.iteration = None if state.get("iteration") is None else int(state["iteration"])
        return True


def save_best(state: dict[str, Any], ckpt_dir: Path) -> Path:
    """Write ``state`` as ``ckpt_dir/best.pt`` with the one atomic writer: never half-written."""
    path = ckpt_dir / BEST
    try:
        return write_atomic(path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as exc:
        raise write_failure(path, exc) from exc
