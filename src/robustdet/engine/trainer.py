"""The training loop: iteration-based, resumable, one process or many under ``torchrun``.

Each iteration is a short sequence of named steps (``Trainer._iteration``): the data; the forward pass,
where the detector (``models.base.Detector``) returns its unweighted per-level losses L_i; the combine,
L_total = Σ_i w_i · L_i (Luo Eq. 1) plus any loss outside the weighting (Faster R-CNN's RPN); one
all-reduced decision (finite? stop? corrupt images?); backward, or the skip of a non-finite step; the
optimizer; the weighting step, which sees each level's measured loss (plain or trained, ``measure``) and
returns the weights for the next iteration; then the periodic log, checkpoint and evaluation.
Everything beside the loop is in its own module (docs/architecture.md, "One training step"); the trainer
knows the detector and the weighting only through their contracts.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from robustdet import distributed as dist
from robustdet.config import Config
from robustdet.data import DetectionDataset, build_dataset, build_train_loader
from robustdet.data.loader import shutdown_workers
from robustdet.engine.batch import Batch, Step, to_device
from robustdet.engine.best import BestTracker
from robustdet.engine.checkpoint import Checkpointer
from robustdet.engine.console import Progress, make_progress, start_summary, warn
from robustdet.engine.corrupt import note_corrupt
from robustdet.engine.diagnostics import LogVarRangeWatch, nonfinite_report
from robustdet.engine.machine import record_machine
from robustdet.engine.optim import build_optimizer
from robustdet.engine.periodic_eval import PeriodicEval
from robustdet.engine.plan import RunPlan, make_plan
from robustdet.engine.run_log import RunLog, step_record, write_run_files
from robustdet.engine.runtime import autocast_dtype, lost_rank, resolve_device, seed_everything, set_threads
from robustdet.engine.schedule import build_scheduler
from robustdet.engine.signals import StopRequest
from robustdet.engine.state import Found, TrainState, find_training_checkpoint
from robustdet.errors import ConfigError, DatasetError, Interrupted, TrainingDiverged
from robustdet.losses import set_finite_checks
from robustdet.models import build_model
from robustdet.models.weights import load_detector_weights
from robustdet.weighting import build_weighting


class Trainer:
    """Builds everything a run needs from a ``Config`` and trains it into ``out_dir``."""

    def __init__(self, cfg: Config, out_dir: str | Path, resume: bool = False, console: TextIO | None = None):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.console = console if console is not None else sys.stdout
        # the process and what the run is made of: set by _setup, in this order
        self.device = torch.device("cpu")
        self.rank, self.world = 0, 1
        self._owns_group = False
        self.train_set: DetectionDataset | None = None
        self.val_set: DetectionDataset | None = None
        self.plan: RunPlan | None = None
        self.state: TrainState | None = None
        self.model: nn.Module | None = None  # the detector, in its DistributedDataParallel wrapper under torchrun
        self.autocast_dtype: torch.dtype | None = None
        self.train_loader: Any = None
        self.log: RunLog | None = None
        self.evaluation: PeriodicEval | None = None
        self._params: list[nn.Parameter] = []  # what the gradient clipping sees
        self._isolated_params: list[nn.Parameter] = []  # clipped on their own (Detector.isolated_parameters)
        self._weighting_params: list[nn.Parameter] = []  # a weighting's own, outside the DDP model
        # the loop's bookkeeping
        self.checkpoints = Checkpointer(self.out_dir / "checkpoints", cfg.checkpoint.period)
        self._stop = StopRequest()
        self._iter = 0
        self._bad_in_row = 0
        self._log_vars = LogVarRangeWatch()
        self._progress = Progress()
        self._t0 = 0.0

    # ----------------------------------------------------------------------------------------- setup
    def _setup(self) -> None:
        """Process group, data, detector, weighting, optimizer, checkpoint, loader and log, in that order."""
        cfg = self.cfg
        self.device = resolve_device(cfg.train.device)
        self._owns_group = dist.init_from_env(self.device.type, cfg.train.dist_timeout_s)
        self.rank, self.world = dist.rank(), dist.world_size()
        set_threads(cfg.train.num_threads)
        seed_everything(cfg.seed)
        self.train_set = build_dataset(cfg.data.train, cfg.data, train=True)
        self.val_set = build_dataset(cfg.data.val, cfg.data, train=False)
        if self.val_set.classes != self.train_set.classes:
            raise DatasetError(
                "data.val has other classes than data.train: "
                f"{self.val_set.classes[:5]}... vs {self.train_set.classes[:5]}..."
            )
        self.plan = plan = make_plan(cfg, len(self.train_set), self.world)
        for line in plan.lines(cfg, self.world):
            self._say(line)
        found = find_training_checkpoint(self.out_dir) if self.resume else None
        if self.resume and found is None:  # a job script that always passes --resume, on its first launch
            self._say(f"--resume: no checkpoint in {self.out_dir / 'checkpoints'} yet; starting a new run")
            self.resume = False
        self.state = state = self._build_model(plan, self.train_set, self.device)
        if found is not None:
            self._resume(found, plan)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel
        self.model = state.model if self.world == 1 else ddp(state.model, device_ids=device_ids)
        isolated = {id(p) for p in state.model.isolated_parameters()}
        params = [p for g in state.optimizer.param_groups for p in g["params"]]
        self._params = [p for p in params if id(p) not in isolated]
        self._isolated_params = [p for p in params if id(p) in isolated]
        self._weighting_params = [p for p in state.weighting.parameters() if p.requires_grad]
        self.autocast_dtype = autocast_dtype(cfg.train.amp, self.device)
        self.train_loader = build_train_loader(
            self.train_set, batch_size=cfg.train.batch_size, seed=cfg.seed, start_iter=state.start_iter,
            max_iter=plan.max_iter, rank=self.rank, world_size=self.world, num_workers=cfg.data.num_workers,
            pin_memory=self.device.type == "cuda", group_aspect_ratio=cfg.data.group_aspect_ratio,
        )  # fmt: skip
        self.log = RunLog(self.out_dir, rank=self.rank, resume_from=state.start_iter if self.resume else None,
                          tensorboard=cfg.log.tensorboard)  # fmt: skip
        if found is not None:
            self.log.event({"iter": state.start_iter, "event": "resumed", "checkpoint": str(found[0]),
                            "passed_over": found[2]})  # fmt: skip
        self.evaluation = PeriodicEval(cfg, self.val_set, self.device, self.autocast_dtype, self.out_dir, self.log)

    def _build_model(self, plan: RunPlan, train_set: DetectionDataset, device: torch.device) -> TrainState:
        """The detector, the weighting of its levels, the optimizer and the schedule, at iteration 0."""
        cfg, num_classes = self.cfg, train_set.num_classes
        try:
            model = build_model(cfg, num_classes).to(device)
        except ValueError as exc:  # the model's own checks of its config (e.g. loss.log_var_init keys)
            raise ConfigError(f"model: {exc}") from exc
        if cfg.model.weights is not None and not self.resume:  # a resumed run has its own weights
            self._say(load_detector_weights(model, cfg.model.weights, num_classes).line())
        weighting = build_weighting(cfg.weighting, len(model.level_names), cfg.seed)
        weighting.to(device)
        optimizer = build_optimizer(model, weighting, cfg, plan.lr_scale)
        scheduler = build_scheduler(
            optimizer, plan.schedule, plan.max_iter, cfg.train.optimizer.log_var_warmup
        )
        best = BestTracker(cfg.checkpoint.best_metric) if cfg.checkpoint.best_metric else None
        return TrainState(model, weighting, optimizer, scheduler, best, train_set.classes, train_set.category_ids)

    def _resume(self, found: Found, plan: RunPlan) -> None:
        """Restore the checkpoint ``find_training_checkpoint`` found (warning of the newer ones passed over)."""
        path, ckpt, problems = found
        for problem in problems:
            warn(f"--resume: passed over {problem}")
        self.state.restore(ckpt, path, self.cfg, plan.max_iter, warn)
        self.checkpoints.last_saved = self.state.start_iter
        self._say(f"resumed from {path} at iteration {self.state.start_iter}")

    def _save(self, iteration: int) -> None:
        """The checkpoint of ``iteration``; collective, as building the state is."""
        self.checkpoints.save(self.state.checkpoint(iteration, self.cfg), iteration)

    def _say(self, msg: str) -> None:
        if dist.is_main():
            print(msg, file=self.console, flush=True)

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> dict[str, Any] | None:
        """Run to the plan's last iteration (or from the checkpoint on), evaluate, return the final metrics."""
        finite_checks_before: bool | None = None
        failed = False
        try:
            self._setup()
            self._write_run_files()
            # The losses' input checks would raise on a NaN logit and end the run; the loop instead checks
            # the total each step and skips a non-finite step (train.max_nonfinite_steps). They are also a
            # host sync each on CUDA (about 0.2 ms, docs/benchmarks.md).
            finite_checks_before = set_finite_checks(False)
            self._stop.install()
            return self._loop()
        except Exception as exc:
            failed = True
            if self.world > 1 and dist.is_peer_failure(exc):
                raise lost_rank(exc, self.rank, self._iter + 1, self.checkpoints.resume_text()) from exc
            raise
        finally:
            self._stop.restore()
            shutdown_workers(self.train_loader)
            if self.log is not None:
                self.log.close()
            if finite_checks_before is not None:
                set_finite_checks(finite_checks_before)
            # after a failure a collective could wait on a dead rank: leave the group to the exit
            if self._owns_group and not failed:
                torch.distributed.destroy_process_group()

    def _write_run_files(self) -> None:
        """The start summary on the console; config.yaml and label_noise.json in the run directory."""
        if dist.is_main():
            self._say(start_summary(
                self.cfg, device=self.device, world=self.world, model=self.state.model, train_set=self.train_set,
                val_set=self.val_set, plan=self.plan, out_dir=self.out_dir,
            ))  # fmt: skip
            write_run_files(self.out_dir, self.cfg, self.train_set.label_noise)
            record_machine(self.out_dir, self.device, self.state.start_iter)

    def _loop(self) -> dict[str, Any] | None:
        """Iterations from the checkpoint (or 0) to ``train.max_iter``, then the final checkpoint and eval."""
        self.model.train()
        start, max_iter = self.state.start_iter, self.plan.max_iter
        self._progress = make_progress(dist.is_main() and self.cfg.log.progress, max_iter, start, self.console)
        self._t0 = time.perf_counter()
        loader = iter(self.train_loader)
        try:
            for it in range(start, max_iter):
                self._iteration(it, loader)
        finally:
            self._progress.close()
        return self._finish()

    def _iteration(self, it: int, loader: Any) -> None:
        """One training iteration as its named steps."""
        batch = self._next_batch(it, loader)
        step = self._forward(it, batch)
        nonfinite = self._agree(step)
        if not nonfinite:
            self._backward(step)
        if not math.isfinite(step.grad_norm):
            self._skip(step)  # raises when too many in a row, or when a signal asks to stop
            return
        self._bad_in_row = 0
        lr, weights_used = self._optimizer_step(step)
        self._weighting_step(step)
        self._periodic(step, lr, weights_used)

    def _next_batch(self, it: int, loader: Any) -> Batch:
        self._iter = it
        images, targets = next(loader)
        return to_device(images, targets, self.device)

    def _forward(self, it: int, batch: Batch) -> Step:
        """The detector's per-level losses and the weighted total (Luo Eq. 1) plus the loss outside it."""
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out = self.model(batch.images, batch.targets)
        level_losses = out.level_losses.float()
        total = self.state.weighting.combine(level_losses) + out.extra_loss.float()
        return Step(it, batch, out, level_losses, total)

    def _agree(self, step: Step) -> bool:
        """One all-reduce decides, on every rank alike, whether the loss is finite, whether a signal asks to
        stop, and whether any rank replaced a corrupt image: one rank acting alone would leave the others
        waiting in a collective. Built on the device, so its ``tolist`` is the step's one host sync before
        backward. Returns whether the loss is non-finite on any rank."""
        host_flags = torch.tensor(
            [0.0 if self._stop.signum is None else 1.0, float(len(step.batch.skipped))], device=self.device
        )
        flags = dist.all_reduce_sum(
            torch.cat([(~torch.isfinite(step.total.detach())).float().reshape(1), host_flags])
        ).tolist()
        if flags[1] > 0:
            step.stop_signal = self._stop.signum or signal.SIGTERM
        if flags[2] > 0:
            note_corrupt(self.state.corrupt_images, step.batch.skipped, step.it, self.cfg.data.max_corrupt_images,
                         self.log, warn, self.checkpoints.resume_text())  # fmt: skip
        return flags[0] > 0

    def _backward(self, step: Step) -> None:
        """Backward; a weighting's own parameters (not in the DDP model) get their gradients averaged."""
        self.state.optimizer.zero_grad(set_to_none=True)
        step.total.backward()
        dist.average_gradients(self._weighting_params)
        clip = self.cfg.train.clip_grad_norm if self.cfg.train.clip_grad_norm is not None else math.inf
        step.grad_norm = float(torch.nn.utils.clip_grad_norm_(self._params, clip))
        if self._isolated_params:  # the norm over all gradients, as one clipping would report it
            alpha_norm = float(torch.nn.utils.clip_grad_norm_(self._isolated_params, clip))
            step.grad_norm = math.hypot(step.grad_norm, alpha_norm)

    def _skip(self, step: Step) -> None:
        """A non-finite loss or gradient: log it, skip the step, stop after too many in a row."""
        state, limit_n = self.state, self.cfg.train.max_nonfinite_steps
        self._bad_in_row += 1
        state.nonfinite_total += 1
        msg = nonfinite_report(step.it, step.out, state.model, step.batch.image_ids)
        self.log.event({"iter": step.done, "event": "nonfinite_step_skipped", "detail": msg,
                        "in_a_row": self._bad_in_row, "total": state.nonfinite_total})  # fmt: skip
        limit = f"train.max_nonfinite_steps={limit_n}"
        warn(f"{msg}: step skipped ({self._bad_in_row} in a row, {limit})")
        state.optimizer.zero_grad(set_to_none=True)
        if self._bad_in_row >= limit_n:
            raise TrainingDiverged(
                f"{msg}; {self._bad_in_row} non-finite steps in a row ({limit}); {self.checkpoints.resume_text()}"
            )
        state.scheduler.step()
        if step.stop_signal is not None:
            # no checkpoint of a state inside a run of bad steps: the last good one stays
            name = signal.Signals(step.stop_signal).name
            self._say(f"{name}: stopped at iteration {step.done} (a skipped step); {self.checkpoints.resume_text()}")
            raise Interrupted(step.stop_signal)

    def _optimizer_step(self, step: Step) -> tuple[float, torch.Tensor]:
        """The optimizer and the schedule; returns the lr and the weights this step used (on the device,
        read back only when the step is logged)."""
        self.state.optimizer.step()
        lr = self.state.optimizer.param_groups[0]["lr"]
        self.state.scheduler.step()
        return lr, self.state.weighting.weights.detach().clone()

    def _weighting_step(self, step: Step) -> None:
        """The weighting sees each level's measure (plain or trained loss, its ``measure``), detached."""
        weighting = self.state.weighting
        weighting.step(step.out.measured(weighting.measure).float())

    def _periodic(self, step: Step, lr: float, weights_used: torch.Tensor) -> None:
        """Log, progress, evaluation, checkpoint and a requested stop, each at its period."""
        cfg = self.cfg
        done, max_iter = step.done, self.plan.max_iter
        log_now = done % cfg.log.period == 0 or done == max_iter
        if log_now:
            self._log_step(step, lr, weights_used.cpu().tolist(), time.perf_counter() - self._t0)
        self._progress.step(done, log_now, step.total, lr)
        # evaluate before the checkpoint of the same iteration, so that it holds that evaluation's best
        if cfg.eval.period and done % cfg.eval.period == 0 and done < max_iter:
            self._evaluate(done)
        if cfg.checkpoint.period and done % cfg.checkpoint.period == 0 and done < max_iter:
            self._save(done)
        if step.stop_signal is not None and done < max_iter:
            if self.checkpoints.last_saved != done:
                self._save(done)
            name = signal.Signals(step.stop_signal).name
            self._say(f"{name}: saved a checkpoint at iteration {done}; continue with --resume")
            raise Interrupted(step.stop_signal)

    def _log_step(self, step: Step, lr: float, weights: list[float], secs: float) -> None:
        state = self.state
        health = {**self._log_vars.fields(step.done, state.model, self.log, warn), **state.skipped_counts()}
        self.log.step(step_record(step.done, lr, step.total, step.out, weights, step.grad_norm, secs, state.model,
                                  state.weighting, health))  # fmt: skip

    def _finish(self) -> dict[str, Any]:
        max_iter = self.plan.max_iter
        self._iter = max_iter
        self._save(max_iter)
        # From here a signal stops at once: the final checkpoint is written, --resume only re-evaluates.
        self._stop.at_once = True
        if self._stop.signum is not None:
            raise Interrupted(self._stop.signum)
        return self._evaluate(max_iter, final=True)

    def _evaluate(self, done: int, final: bool = False) -> dict[str, Any]:
        """COCO evaluation of the model as checkpointed; ``best.pt`` when it beats the best so far."""
        metrics = self.evaluation.run(self.state.model, done, final)
        self._say(self.evaluation.text(done, metrics))
        if self.state.best is not None and self.state.best.improves(metrics):
            self._say(self.evaluation.save_best(self.state, done, metrics))  # with the streams training left
        return metrics
