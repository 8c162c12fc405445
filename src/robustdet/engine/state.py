"""The training state: what a checkpoint holds beside the config, and how a resumed run gets it back.

Everything that decides what happens next goes in: the detector, the weighting, the optimizer and the
schedule (their state dicts), the counters of skipped steps and corrupt images, the best evaluation so
far, every rank's random streams, and the iteration, which fixes the data position. The files themselves
(written atomically, loaded without executing anything) are ``engine/checkpoint.py``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from robustdet import distributed as dist
from robustdet.config import Config, config_from_stored, trains_alike
from robustdet.engine.best import BestTracker
from robustdet.engine.checkpoint import find_resumable, rng_state, set_rng_state
from robustdet.errors import CheckpointError, ConfigError
from robustdet.models import Detector
from robustdet.weighting import LevelWeighting

CHECKPOINT_FORMAT = 1
_REQUIRED = ("config", "model", "weighting", "optimizer", "scheduler", "iteration", "rng")

Found = tuple[Path, dict[str, Any], list[str]]  # a checkpoint's path, its state, the newer ones passed over


@dataclass
class TrainState:
    """The modules whose state a checkpoint saves, and the run's own counters."""

    model: Detector  # the detector itself, never its DistributedDataParallel wrapper
    weighting: LevelWeighting
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    best: BestTracker | None
    classes: list[str]  # the dataset's, with their category ids: what using the checkpoint needs to name them
    category_ids: list[int]
    start_iter: int = 0  # the iteration the run starts from: 0, or its checkpoint's
    nonfinite_total: int = 0
    corrupt_images: list[str] = field(default_factory=list)

    def checkpoint(self, iteration: int, cfg: Config) -> dict[str, Any]:
        """The checkpoint of ``iteration``. Collective: every rank takes part (the random streams)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "iteration": iteration,
            "config": cfg.model_dump(mode="json"),
            "classes": list(self.classes),
            "category_ids": list(self.category_ids),
            "level_names": list(self.model.level_names),
            "model": self.model.state_dict(),
            "weighting": self.weighting.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "nonfinite_total": self.nonfinite_total,
            "corrupt_images": list(self.corrupt_images),
            "best": self.best.state_dict() if self.best is not None else None,
            # every rank's streams, so each rank resumes its own
            "rng": dist.gather_objects(rng_state()),
        }

    def skipped_counts(self) -> dict[str, int]:
        """For the log records: the non-finite steps skipped and the corrupt images replaced, once there are any."""
        counts = {"nonfinite_skipped": self.nonfinite_total, "corrupt_images_skipped": len(self.corrupt_images)}
        return {k: v for k, v in counts.items() if v}

    def restore(
        self, state: dict[str, Any], path: Path, cfg: Config, max_iter: int, warn: Callable[[str], None]
    ) -> None:
        """Load a checkpoint written by ``checkpoint`` into a run of ``cfg`` (same model and loss) that
        ends at ``max_iter``."""
        missing = [k for k in _REQUIRED if k not in state]
        if missing:
            raise CheckpointError(f"{path}: not a training checkpoint of robustdet (no {', '.join(missing)})")
        saved = config_from_stored(state["config"], f"{path} config")
        if not trains_alike(saved, cfg):
            raise ConfigError(
                f"--resume: the model/loss config of {path} differs from this run's config "
                "(resume with the run's own config, e.g. its config.yaml)"
            )
        try:
            self.model.load_state_dict(state["model"])
            self.weighting.load_state_dict(state["weighting"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: does not fit this run ({str(exc).splitlines()[0]})") from None
        self.start_iter = int(state["iteration"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.corrupt_images = [str(p) for p in state.get("corrupt_images", [])]
        if self.best is not None and not self.best.load_state_dict(state.get("best")) and state.get("best"):
            warn(f"--resume: {path} tracked best.pt by another metric; tracking {self.best.metric} anew")
        set_rng_state(_own_streams(state["rng"], path, warn))
        if self.start_iter > max_iter:
            raise ConfigError(
                f"--resume: {path} is at iteration {self.start_iter}, past the run's {max_iter} "
                "iterations (train.max_iter / train.max_epochs)"
            )


def _own_streams(rng: Any, path: Path, warn: Callable[[str], None]) -> dict[str, Any]:
    """This rank's random streams of a checkpoint (one entry per rank that wrote it)."""
    if not isinstance(rng, list):
        return rng
    world = dist.world_size()
    if len(rng) != world:
        warn(
            f"--resume: {path} was written by {len(rng)} processes, this run has {world}: "
            "the data order and random streams differ from an uninterrupted run"
        )
    return rng[dist.rank() % len(rng)]


def find_training_checkpoint(out_dir: Path) -> Found | None:
    """The newest usable checkpoint of a run directory, with what was passed over; None when there is
    none at all (raises when there are only unusable ones)."""
    problems: list[str] = []
    found = find_resumable(out_dir / "checkpoints", problems)
    return None if found is None else (*found, problems)
