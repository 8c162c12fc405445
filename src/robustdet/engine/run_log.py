"""What a run writes: at its start ``config.yaml`` and ``label_noise.json``; as it goes ``log.jsonl``,
``events.jsonl``, ``eval.jsonl``, ``metrics.json``, TensorBoard.

On ``--resume`` the records past the checkpoint's iteration are dropped first, so a resumed run's logs
read as if it had never stopped. ``step_record`` builds a ``log.jsonl`` record: the engine's own keys,
then what the weighting and the detector report of themselves (``log_fields``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from robustdet.config import Config, config_to_yaml
from robustdet.data.noise import write_noise_report
from robustdet.files import read_jsonl, write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from robustdet.models import Detector, DetectorLosses
    from robustdet.weighting import LevelWeighting


def write_run_files(out_dir: Path, cfg: Config, label_noise: dict[str, Any] | None) -> None:
    """The run's config as it resolved (``config.yaml``, what ``--resume`` and ``report`` read) and what
    ``data.train.label_noise`` changed (``label_noise.json``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "config.yaml", config_to_yaml(cfg))
    if label_noise is not None:
        write_noise_report(label_noise, out_dir / "label_noise.json")


def step_record(
    done: int,
    lr: float,
    total: torch.Tensor,
    out: DetectorLosses,
    weights: list[float],
    grad_norm: float,
    secs: float,
    detector: Detector,
    weighting: LevelWeighting,
    health: dict[str, Any],
) -> dict[str, Any]:
    """The record of iteration ``done``: lr, loss, the per-level losses, components and weights, then the
    weighting's fields as ``weighting/…``, the detector's as ``loss/…``, and ``health`` (what went wrong so
    far: log-variances out of range, skipped steps, corrupt images)."""
    rec: dict[str, Any] = {
        "iter": done,
        "lr": lr,
        "loss": float(total.detach()),
        "level_names": list(detector.level_names),
        "level_losses": out.level_losses.detach().float().cpu().tolist(),
        "level_weights": weights,
        "grad_norm": grad_norm,
        "time": round(secs, 3),
    }
    if out.plain_level_losses is not None:
        rec["level_plain_losses"] = out.plain_level_losses.float().cpu().tolist()
    for name, comp in out.components.items():
        rec[f"level_{name}"] = comp.detach().float().cpu().tolist()
    for name, comp in out.extra_components.items():
        rec[name] = comp.detach().float().cpu().tolist()
    if out.extra_level_names:
        rec["extra_level_names"] = list(out.extra_level_names)
    rec.update({f"weighting/{k}": v for k, v in weighting.log_fields().items()})
    rec.update({f"loss/{k}": v for k, v in detector.log_fields().items()})
    rec.update(health)
    return rec


def _truncate_jsonl(path: Path, keep_through_iter: int) -> None:
    if not path.exists():
        return
    kept = [rec for rec in read_jsonl(path) if int(rec.get("iter", 0)) <= keep_through_iter]
    write_text_atomic(path, "".join(json.dumps(rec) + "\n" for rec in kept))


class RunLog:
    """Rank 0 writes ``log.jsonl``; rank r > 0 writes ``log.rank{r}.jsonl`` (so ranks can be compared)."""

    def __init__(self, out_dir: Path, rank: int = 0, resume_from: int | None = None, tensorboard: bool = True):
        self.out_dir = out_dir
        self.rank = rank
        out_dir.mkdir(parents=True, exist_ok=True)
        self.step_path = out_dir / ("log.jsonl" if rank == 0 else f"log.rank{rank}.jsonl")
        self.event_path = out_dir / ("events.jsonl" if rank == 0 else f"events.rank{rank}.jsonl")
        self.eval_path = out_dir / "eval.jsonl"
        if resume_from is not None:
            for p in (self.step_path, self.event_path) + ((self.eval_path,) if rank == 0 else ()):
                _truncate_jsonl(p, resume_from)
        else:
            for p in (self.step_path, self.event_path) + ((self.eval_path,) if rank == 0 else ()):
                if p.exists():
                    p.unlink()
        self._steps = open(self.step_path, "a")  # noqa: SIM115 - held open for the run, closed in close()
        self._tb = None
        if tensorboard and rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=resume_from)

    def step(self, rec: dict[str, Any]) -> None:
        self._steps.write(json.dumps(rec) + "\n")
        self._steps.flush()
        if self._tb is None:
            return
        it = rec["iter"]
        levels, extra_levels = rec.get("level_names", []), rec.get("extra_level_names", [])
        for key, value in rec.items():
            if key == "iter" or isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                self._tb.add_scalar(f"train/{key}", value, it)
            elif isinstance(value, list) and value and all(isinstance(v, int | float) for v in value):
                # vectors: one line per level where the length says which levels, else per index
                names = levels if len(value) == len(levels) else extra_levels
                if len(names) != len(value):
                    names = [str(k) for k in range(len(value))]
                self._tb.add_scalars(f"train/{key}", dict(zip(names, value, strict=True)), it)

    def event(self, rec: dict[str, Any]) -> None:
        with open(self.event_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def metrics(self, it: int, metrics: dict[str, Any], final: bool = False) -> None:
        if self.rank != 0:
            return
        with open(self.eval_path, "a") as f:
            f.write(json.dumps({"iter": it, **metrics}) + "\n")
        if self._tb is not None:
            for k, v in metrics["bbox"].items():
                self._tb.add_scalar(f"eval/{k}", v, it)
        if final:
            write_json_atomic(self.out_dir / "metrics.json", metrics)

    def close(self) -> None:
        self._steps.close()
        if self._tb is not None:
            self._tb.close()
