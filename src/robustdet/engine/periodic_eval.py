"""Evaluation during training: every ``eval.period`` iterations and at the end, and ``best.pt``.

An evaluation must not move any random stream (a resumed run does not repeat it), so the streams are
saved before and restored after. Every rank evaluates its share of ``data.val`` with rank 0's buffers,
the model as it is checkpointed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from robustdet import distributed as dist
from robustdet.config import Config
from robustdet.data import DetectionDataset, build_eval_loader
from robustdet.engine.best import BEST, save_best
from robustdet.engine.checkpoint import rng_state, set_rng_state
from robustdet.engine.evaluator import evaluate, format_metrics
from robustdet.engine.run_log import RunLog
from robustdet.engine.state import TrainState
from robustdet.files import write_json_atomic
from robustdet.models import Detector


class PeriodicEval:
    """The COCO evaluations of one run, logged to ``eval.jsonl`` (and ``metrics.json`` at the end)."""

    def __init__(
        self,
        cfg: Config,
        val_set: DetectionDataset,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        out_dir: Path,
        log: RunLog,
    ) -> None:
        self.cfg = cfg
        self.val_set = val_set
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.out_dir = out_dir
        self.log = log

    def run(self, detector: Detector, done: int, final: bool) -> dict[str, Any]:
        """The metrics of ``detector`` after ``done`` iterations; the final one also writes detections.json."""
        streams = rng_state()
        try:
            return self._evaluate(detector, done, final)
        finally:
            set_rng_state(streams)

    def _evaluate(self, detector: Detector, done: int, final: bool) -> dict[str, Any]:
        cfg = self.cfg
        dist.broadcast_buffers(detector)  # every rank evaluates the checkpointed model
        loader = build_eval_loader(
            self.val_set, cfg.eval.batch_size, cfg.data.num_workers, rank=dist.rank(), world_size=dist.world_size(),
            max_images=cfg.eval.max_images,
        )  # fmt: skip
        results: list[dict[str, Any]] | None = [] if final else None
        metrics = evaluate(
            detector, loader, self.val_set, self.device, self.autocast_dtype, keep_results=results,
            backend=cfg.eval.backend,
        )  # fmt: skip
        metrics["iter"] = done
        if final and dist.is_main():
            # the final COCO results (at most the detector's 100 per image): report's PR curves and confusion matrix
            write_json_atomic(self.out_dir / "detections.json", results, indent=None)
        self.log.metrics(done, metrics, final=final)
        return metrics

    @staticmethod
    def text(done: int, metrics: dict[str, Any]) -> str:
        return f"[iter {done}] COCO bbox metrics (%):\n{format_metrics(metrics)}"

    def save_best(self, state: TrainState, done: int, metrics: dict[str, Any]) -> str:
        """``checkpoints/best.pt``: this state, with the evaluation that made it the best (which it is:
        ``state.best.improves(metrics)``). Collective; rank 0 writes. Returns the line that says so."""
        best = state.best
        assert best is not None
        before = best.value
        best.record(metrics, done)
        ckpt = state.checkpoint(done, self.cfg)
        path = self.out_dir / "checkpoints" / BEST
        if dist.is_main():
            path = save_best(ckpt, self.out_dir / "checkpoints")
        dist.barrier()
        was = f", was {before:.2f}" if math.isfinite(before) else ""
        return f"[iter {done}] best {best.metric} {best.value:.2f}{was}: wrote {path}"
