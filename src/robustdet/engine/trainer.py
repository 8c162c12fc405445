"""The training loop: iteration-based, resumable, one process or many under ``torchrun``.

Each iteration is a short sequence of named steps (``Trainer._iteration``): the data; the forward pass,
where the detector (``models.base.Detector``) returns its unweighted per-level losses L_i; the combine,
L_total = Σ_i w_i · L_i (Luo Eq. 1) plus any loss outside the weighting (Faster R-CNN's RPN); one
all-reduced decision (finite? stop? corrupt images?); backward, or the skip of a non-finite step; the
optimizer; the weighting step, which sees each level's measured loss (plain or trained, ``measure``) and
returns the weights for the next iteration; then the periodic log, checkpoint and evaluation.
Everything that decides what happens next (model, optimizer, scheduler, weighting state, every RNG, the
iteration that fixes the data position) goes into each checkpoint. The trainer knows the detector and the
weighting only through their contracts; what they log they name themselves (``log_fields``).
"""

from __future__ import annotations

import math
import os
import random
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn

from robustdet import distributed as dist
from robustdet.config import Config, config_from_stored, config_to_yaml
from robustdet.data import DetectionDataset, build_dataset, build_eval_loader, build_train_loader
from robustdet.data.loader import shutdown_workers
from robustdet.data.noise import write_noise_report
from robustdet.engine.best import BestTracker, save_best
from robustdet.engine.checkpoint import (
    find_resumable,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from robustdet.engine.console import PlainProgress, is_terminal, start_summary
from robustdet.engine.evaluator import evaluate, format_metrics
from robustdet.engine.plan import RunPlan, make_plan
from robustdet.engine.run_log import RunLog
from robustdet.engine.schedule import build_scheduler
from robustdet.errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    DistributedFailure,
    Interrupted,
    TrainingDiverged,
)
from robustdet.files import write_json_atomic, write_text_atomic
from robustdet.losses import set_finite_checks
from robustdet.models import Detector, DetectorLosses, build_model
from robustdet.models.weights import load_detector_weights
from robustdet.weighting import LevelWeighting, build_weighting

CHECKPOINT_FORMAT = 1


# Test-only hook: "RANK:ITER" makes that rank exit at once (os._exit(1), like a crash) when it starts
# iteration ITER (1-based), to test how the other ranks and torchrun react (tests/test_robustness.py).
TEST_DIE_ENV = "ROBUSTDET_TEST_DIE_AT_ITER"


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(
    model: nn.Module, weighting: nn.Module, cfg: Config, lr_scale: float = 1.0
) -> torch.optim.Optimizer:
    """Model weights with weight decay; the detector's log-variances and a weighting's learnable
    parameters (Kendall's per-level u_i) in the log-variance group: never weight-decayed, own lr.
    ``lr_scale`` multiplies both learning rates (the linear scaling of engine/plan.py)."""
    opt = cfg.train.optimizer.model_copy(
        update={
            "lr": cfg.train.optimizer.lr * lr_scale,
            "log_var_lr": None if cfg.train.optimizer.log_var_lr is None else cfg.train.optimizer.log_var_lr * lr_scale,
        }
    )
    lv = model.log_variances if isinstance(model, Detector) else None
    special_params = [*(lv.parameters() if lv is not None else ()), *weighting.parameters()]
    special = [p for p in special_params if p.requires_grad]
    ids = {id(p) for p in special}
    main = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups: list[dict[str, Any]] = [{"params": main, "weight_decay": opt.weight_decay, "name": "model"}]
    if special:
        groups.append({"params": special, "weight_decay": 0.0, "lr": opt.log_var_lr or opt.lr, "name": "log_var"})
    # the fused kernels update every tensor in one pass: on 1 CPU thread torch's default per-tensor AdamW
    # took 196 ms a step for the demo's 12 M parameters, the fused one 38 ms (docs/benchmarks.md)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in [*main, *special])
    if opt.name == "sgd":
        return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, fused=fused)
    return torch.optim.AdamW(groups, lr=opt.lr, fused=fused)


def _unwrap(model: nn.Module) -> Detector:
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    assert isinstance(inner, Detector)
    return inner


@dataclass
class _Batch:
    images: list[torch.Tensor]
    targets: list[dict[str, Any]]
    image_ids: list[int]
    skipped: list[tuple[str, str]]  # (path, reason) of corrupt images the dataset replaced


@dataclass
class _Step:
    """One iteration as it goes through the steps of ``Trainer._iteration``."""

    it: int
    batch: _Batch
    out: DetectorLosses
    level_losses: torch.Tensor  # float32, with grad
    total: torch.Tensor
    stop_signal: int | None = None
    grad_norm: float = math.nan

    @property
    def done(self) -> int:
        return self.it + 1


def _parse_die_hook(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    rank_text, _, iter_text = value.partition(":")
    return int(rank_text), int(iter_text)


def _short_dist_message(exc: BaseException) -> str:
    """gloo's first sentence, without its source location: e.g. 'Connection closed by peer [host]:port'."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". ", 1)[0]


class Trainer:
    """Builds everything a run needs from a ``Config`` and trains it into ``out_dir``."""

    def __init__(self, cfg: Config, out_dir: str | Path, resume: bool = False, console: TextIO | None = None):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.console = console if console is not None else sys.stdout
        self._stop_signal: int | None = None
        self._raise_on_signal = False
        self._owns_group = False
        self.rank, self.world = 0, 1
        self.log: RunLog | None = None
        self._finite_checks_before: bool | None = None
        self._iter = 0
        self._last_saved: int | None = None
        self._log_var_out: set[str] = set()
        self.corrupt_images: list[str] = []
        self._die_at = _parse_die_hook(os.environ.get(TEST_DIE_ENV))

    # ----------------------------------------------------------------------------------------- setup
    def _setup(self) -> None:
        """Process group, data, detector, weighting, optimizer, checkpoint, loader and log, in that order."""
        cfg = self.cfg
        self.device = resolve_device(cfg.train.device)
        self._owns_group = dist.init_from_env(self.device.type, cfg.train.dist_timeout_s)
        self.rank, self.world = dist.rank(), dist.world_size()
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        seed_everything(cfg.seed)
        self._build_data()
        self.plan: RunPlan = make_plan(cfg, len(self.train_set), self.world)
        for line in self.plan.lines(cfg, self.world):
            self._say(line)
        found = self._find_checkpoint() if self.resume else None
        if self.resume and found is None:  # a job script that always passes --resume, on its first launch
            self._say(f"--resume: no checkpoint in {self.out_dir / 'checkpoints'} yet; starting a new run")
            self.resume = False
        model = self._build_model()
        resumed_from, problems = self._resume(found) if found is not None else (None, [])
        self.model: nn.Module = model
        if self.world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.autocast_dtype = torch.bfloat16 if (cfg.train.amp and self.device.type == "cuda") else None
        # The losses' input checks would raise on a NaN logit and end the run; the loop instead checks
        # the total each step and skips a non-finite step (train.max_nonfinite_steps). They are also a
        # host sync each on CUDA (about 0.2 ms, docs/benchmarks.md).
        self._finite_checks_before = set_finite_checks(False)
        self.train_loader = build_train_loader(
            self.train_set,
            batch_size=cfg.train.batch_size,
            seed=cfg.seed,
            start_iter=self.start_iter,
            max_iter=self.plan.max_iter,
            rank=self.rank,
            world_size=self.world,
            num_workers=cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
            group_aspect_ratio=cfg.data.group_aspect_ratio,
        )
        self.log = RunLog(
            self.out_dir,
            rank=self.rank,
            resume_from=self.start_iter if self.resume else None,
            tensorboard=cfg.log.tensorboard,
        )
        if resumed_from is not None:
            self.log.event(
                {"iter": self.start_iter, "event": "resumed", "checkpoint": str(resumed_from), "passed_over": problems}
            )

    def _build_data(self) -> None:
        cfg = self.cfg
        self.train_set: DetectionDataset = build_dataset(cfg.data.train, cfg.data, train=True)
        self.val_set: DetectionDataset = build_dataset(cfg.data.val, cfg.data, train=False)
        if self.val_set.classes != self.train_set.classes:
            raise DatasetError(
                "data.val has other classes than data.train: "
                f"{self.val_set.classes[:5]}... vs {self.train_set.classes[:5]}..."
            )

    def _build_model(self) -> nn.Module:
        """The detector, the weighting of its levels, the optimizer and the schedule, at iteration 0."""
        cfg = self.cfg
        try:
            model = build_model(cfg, self.train_set.num_classes).to(self.device)
        except ValueError as exc:  # the model's own checks of its config (e.g. loss.log_var_init keys)
            raise ConfigError(f"model: {exc}") from exc
        if cfg.model.weights is not None and not self.resume:  # a resumed run has its own weights
            self._say(load_detector_weights(model, cfg.model.weights, self.train_set.num_classes).line())
        self.level_names = list(model.level_names)
        self.weighting: LevelWeighting = build_weighting(cfg.weighting, len(self.level_names), cfg.seed)
        self.weighting.to(self.device)
        self.optimizer = build_optimizer(model, self.weighting, cfg, self.plan.lr_scale)
        self.scheduler = build_scheduler(self.optimizer, self.plan.schedule, self.plan.max_iter)
        self.best = BestTracker(cfg.checkpoint.best_metric) if cfg.checkpoint.best_metric else None
        self.model = model
        self.start_iter = 0
        self.nonfinite_total = 0
        return model

    def _find_checkpoint(self) -> tuple[Path, dict[str, Any], list[str]] | None:
        """The newest usable checkpoint of the run directory, with what was passed over; None when there is
        none at all (raises when there are only unusable ones)."""
        problems: list[str] = []
        found = find_resumable(self.out_dir / "checkpoints", problems)
        return None if found is None else (*found, problems)

    def _resume(self, found: tuple[Path, dict[str, Any], list[str]]) -> tuple[Path, list[str]]:
        """Restore the checkpoint ``_find_checkpoint`` found; its path and what was passed over."""
        path, state, problems = found
        for problem in problems:
            self._warn(f"--resume: passed over {problem}")
        self._restore(state, path)
        if self.start_iter > self.plan.max_iter:
            raise ConfigError(
                f"--resume: {path} is at iteration {self.start_iter}, past the run's {self.plan.max_iter} "
                "iterations (train.max_iter / train.max_epochs)"
            )
        self._last_saved = self.start_iter
        self._say(f"resumed from {path} at iteration {self.start_iter}")
        return path, problems

    def _restore(self, state: dict[str, Any], path: Path) -> None:
        missing = [
            k for k in ("config", "model", "weighting", "optimizer", "scheduler", "iteration", "rng") if k not in state
        ]
        if missing:
            raise CheckpointError(f"{path}: not a training checkpoint of robustdet (no {', '.join(missing)})")
        saved = config_from_stored(state["config"], f"{path} config")
        if saved.model != self.cfg.model or saved.loss != self.cfg.loss:
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
            self._warn(f"--resume: {path} tracked best.pt by another metric; tracking {self.best.metric} anew")
        rng = state["rng"]
        if isinstance(rng, list):
            if len(rng) != self.world:
                self._warn(
                    f"--resume: {path} was written by {len(rng)} processes, this run has {self.world}: "
                    "the data order and random streams differ from an uninterrupted run"
                )
            rng = rng[self.rank % len(rng)]
        set_rng_state(rng)

    def _state(self, iteration: int) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "iteration": iteration,
            "config": self.cfg.model_dump(mode="json"),
            "classes": list(self.train_set.classes),
            "category_ids": list(self.train_set.category_ids),
            "level_names": list(self.level_names),
            "model": _unwrap(self.model).state_dict(),
            "weighting": self.weighting.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "nonfinite_total": self.nonfinite_total,
            "corrupt_images": list(self.corrupt_images),
            "best": self.best.state_dict() if self.best is not None else None,
            # every rank's streams, so each rank resumes its own
            "rng": dist.gather_objects(rng_state()),
        }

    def _save(self, iteration: int) -> None:
        state = self._state(iteration)  # collective: every rank takes part
        if dist.is_main():
            save_checkpoint(state, self.out_dir / "checkpoints")
        dist.barrier()
        self._last_saved = iteration

    def _say(self, msg: str) -> None:
        if dist.is_main():
            print(msg, file=self.console, flush=True)

    def _warn(self, msg: str) -> None:
        if dist.is_main():
            print(f"robustdet: warning: {msg}", file=sys.stderr, flush=True)

    def _last_checkpoint_text(self) -> str:
        ckpt = self.out_dir / "checkpoints" / "last.pt"
        if self._last_saved is None:
            return f"no checkpoint was written yet (checkpoint.period={self.cfg.checkpoint.period})"
        return f"the last checkpoint is {ckpt} (iteration {self._last_saved}); continue with --resume"

    # ------------------------------------------------------------------------------------------ loop
    def _to_device(self, images: list[torch.Tensor], targets: list[dict[str, Any]]) -> _Batch:
        dev = self.device
        imgs = [img.to(dev, non_blocking=True).float().div_(255) for img in images]
        tgts = [
            {
                "boxes": t["boxes"].as_subclass(torch.Tensor).to(dev, non_blocking=True).float(),
                "labels": t["labels"].to(dev, non_blocking=True),
            }
            for t in targets
        ]
        skipped = [(str(p), str(why)) for t in targets for p, why in t.get("skipped", ())]
        return _Batch(imgs, tgts, [int(t["image_id"]) for t in targets], skipped)

    def _note_corrupt(self, it: int, batch: _Batch) -> None:
        """Record the images the dataset replaced (every rank's, gathered); stop past the allowed count."""
        reports = [r for part in dist.gather_objects(batch.skipped) for r in part]
        limit = self.cfg.data.max_corrupt_images
        for path, why in reports:
            if path not in self.corrupt_images:
                self.corrupt_images.append(path)
            count = len(self.corrupt_images)
            assert self.log is not None
            self.log.event(
                {"iter": it + 1, "event": "corrupt_image_skipped", "image": path, "reason": why, "distinct": count}
            )
            self._warn(
                f"iteration {it + 1}: skipped corrupt image {why}; the next readable image took its place "
                f"({count} distinct corrupt images, data.max_corrupt_images={limit})"
            )
        if len(self.corrupt_images) > limit:
            listed = ", ".join(self.corrupt_images[:10]) + (" ..." if len(self.corrupt_images) > 10 else "")
            raise DatasetError(
                f"iteration {it + 1}: {len(self.corrupt_images)} distinct training images failed to decode, "
                f"more than data.max_corrupt_images={limit}: {listed}; {self._last_checkpoint_text()}"
            )

    def _nonfinite_report(self, it: int, batch: _Batch, out: DetectorLosses) -> str:
        bad = [
            f"{name}={v:.4g}"
            for name, v in zip(self.level_names, out.level_losses.detach().float().tolist(), strict=True)
            if not math.isfinite(v)
        ]
        for name, comp in out.components.items():
            for lvl, v in zip(self.level_names, comp.float().tolist(), strict=True):
                if not math.isfinite(v):
                    bad.append(f"{name}[{lvl}]={v:.4g}")
        for name, comp in out.extra_components.items():  # losses outside the weighting (Faster R-CNN's RPN)
            values = comp.detach().float().flatten().tolist()
            if not all(math.isfinite(v) for v in values):
                bad.append(f"{name}={values[0] if len(values) == 1 else values}")
        if not bad and not math.isfinite(float(out.extra_loss)):
            bad.append(f"extra_loss={float(out.extra_loss):.4g}")
        lv = _unwrap(self.model).log_variances
        if lv is not None:
            bad += [f"log_var_{k}={v:.4g}" for k, v in lv.as_dict().items() if not math.isfinite(v)]
        what = ", ".join(bad) or "gradient"
        local = f"non-finite {what} (images {batch.image_ids})"
        # every rank takes this path together (the decision was all-reduced), so gathering is safe
        parts = dist.gather_objects(local)
        if len(parts) > 1:
            local = "; ".join(f"rank {r}: {m}" for r, m in enumerate(parts))
        return f"iteration {it + 1}: {local}"

    def _handle_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum
        if self._raise_on_signal:  # after the final checkpoint: nothing left to save
            raise Interrupted(signum)

    def train(self) -> dict[str, Any] | None:
        """Run to the plan's last iteration (or from the checkpoint on), evaluate, return the final metrics."""
        cfg = self.cfg
        old_handlers: dict[int, Any] = {}
        failed = False
        try:
            self._setup()
            if dist.is_main():
                summary = start_summary(
                    cfg, device=self.device, world=self.world, model=_unwrap(self.model), train_set=self.train_set,
                    val_set=self.val_set, plan=self.plan, out_dir=self.out_dir,
                )  # fmt: skip
                self._say(summary)
                self.out_dir.mkdir(parents=True, exist_ok=True)
                write_text_atomic(self.out_dir / "config.yaml", config_to_yaml(cfg))
                if self.train_set.label_noise is not None:
                    write_noise_report(self.train_set.label_noise, self.out_dir / "label_noise.json")
            old_handlers = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGTERM, signal.SIGINT)}
            return self._loop()
        except Exception as exc:
            failed = True
            if self.world > 1 and dist.is_peer_failure(exc):
                first = _short_dist_message(exc)
                raise DistributedFailure(
                    f"rank {self.rank}: lost another rank at iteration {self._iter + 1} ({first}); "
                    f"{self._last_checkpoint_text()}"
                ) from exc
            raise
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            shutdown_workers(getattr(self, "train_loader", None))
            if self.log is not None:
                self.log.close()
            if self._finite_checks_before is not None:
                set_finite_checks(self._finite_checks_before)
            # after a failure a collective could wait on a dead rank: leave the group to the exit
            if self._owns_group and not failed:
                torch.distributed.destroy_process_group()

    def _loop(self) -> dict[str, Any] | None:
        """Iterations from the checkpoint (or 0) to ``train.max_iter``, then the final checkpoint and eval."""
        cfg = self.cfg
        self.model.train()
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._weighting_params = [p for p in self.weighting.parameters() if p.requires_grad]
        self._bad_in_row = 0
        self._pbar = None
        self._plain: PlainProgress | None = None
        if dist.is_main() and cfg.log.progress and is_terminal(sys.stderr):
            from tqdm import tqdm

            self._pbar = tqdm(
                total=self.plan.max_iter, initial=self.start_iter, desc="train", dynamic_ncols=True, file=sys.stderr
            )
        elif dist.is_main() and cfg.log.progress:  # a batch job: no carriage returns in its log file
            self._plain = PlainProgress(self.plan.max_iter, self.start_iter, self.console)
        self._t0 = time.perf_counter()
        loader = iter(self.train_loader)
        try:
            for it in range(self.start_iter, self.plan.max_iter):
                self._iteration(it, loader)
        finally:
            if self._pbar is not None:
                self._pbar.close()
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

    def _next_batch(self, it: int, loader: Any) -> _Batch:
        self._iter = it
        if self._die_at is not None and self._die_at == (self.rank, it + 1):
            print(f"{TEST_DIE_ENV}: rank {self.rank} exits at iteration {it + 1}", file=sys.stderr, flush=True)
            os._exit(1)
        images, targets = next(loader)
        return self._to_device(images, targets)

    def _forward(self, it: int, batch: _Batch) -> _Step:
        """The detector's per-level losses and the weighted total (Luo Eq. 1) plus the loss outside it."""
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out = self.model(batch.images, batch.targets)
        level_losses = out.level_losses.float()
        total = self.weighting.combine(level_losses) + out.extra_loss.float()
        return _Step(it, batch, out, level_losses, total)

    def _agree(self, step: _Step) -> bool:
        """One all-reduce decides, on every rank alike, whether the loss is finite, whether a signal asks to
        stop, and whether any rank replaced a corrupt image: one rank acting alone would leave the others
        waiting in a collective. Built on the device, so its ``tolist`` is the step's one host sync before
        backward. Returns whether the loss is non-finite on any rank."""
        host_flags = torch.tensor(
            [0.0 if self._stop_signal is None else 1.0, float(len(step.batch.skipped))], device=self.device
        )
        flags = dist.all_reduce_sum(
            torch.cat([(~torch.isfinite(step.total.detach())).float().reshape(1), host_flags])
        ).tolist()
        if flags[1] > 0:
            step.stop_signal = self._stop_signal or signal.SIGTERM
        if flags[2] > 0:
            self._note_corrupt(step.it, step.batch)
        return flags[0] > 0

    def _backward(self, step: _Step) -> None:
        """Backward; a weighting's own parameters (not in the DDP model) get their gradients averaged."""
        self.optimizer.zero_grad(set_to_none=True)
        step.total.backward()
        dist.average_gradients(self._weighting_params)
        clip = self.cfg.train.clip_grad_norm if self.cfg.train.clip_grad_norm is not None else math.inf
        step.grad_norm = float(torch.nn.utils.clip_grad_norm_(self._params, clip))

    def _skip(self, step: _Step) -> None:
        """A non-finite loss or gradient: log it, skip the step, stop after too many in a row."""
        cfg = self.cfg
        self._bad_in_row += 1
        self.nonfinite_total += 1
        msg = self._nonfinite_report(step.it, step.batch, step.out)
        assert self.log is not None
        self.log.event(
            {
                "iter": step.done,
                "event": "nonfinite_step_skipped",
                "detail": msg,
                "in_a_row": self._bad_in_row,
                "total": self.nonfinite_total,
            }
        )
        limit = f"train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}"
        self._warn(f"{msg}: step skipped ({self._bad_in_row} in a row, {limit})")
        self.optimizer.zero_grad(set_to_none=True)
        if self._bad_in_row >= cfg.train.max_nonfinite_steps:
            raise TrainingDiverged(
                f"{msg}; {self._bad_in_row} non-finite steps in a row ({limit}); {self._last_checkpoint_text()}"
            )
        self.scheduler.step()
        if step.stop_signal is not None:
            # no checkpoint of a state inside a run of bad steps: the last good one stays
            name = signal.Signals(step.stop_signal).name
            self._say(f"{name}: stopped at iteration {step.done} (a skipped step); {self._last_checkpoint_text()}")
            raise Interrupted(step.stop_signal)

    def _optimizer_step(self, step: _Step) -> tuple[float, torch.Tensor]:
        """The optimizer and the schedule; returns the lr and the weights this step used (on the device,
        read back only when the step is logged)."""
        self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return lr, self.weighting.weights.detach().clone()

    def _weighting_step(self, step: _Step) -> None:
        """The weighting sees each level's measure (plain or trained loss, its ``measure``), detached."""
        self.weighting.step(step.out.measured(self.weighting.measure).float())

    def _periodic(self, step: _Step, lr: float, weights_used: torch.Tensor) -> None:
        """Log, progress bar, checkpoint, evaluation and a requested stop, each at its period."""
        cfg = self.cfg
        done, max_iter = step.done, self.plan.max_iter
        log_now = done % cfg.log.period == 0 or done == max_iter
        if log_now:
            self._log_step(step, lr, weights_used.cpu().tolist(), time.perf_counter() - self._t0)
        if self._pbar is not None:
            self._pbar.update(1)
            if log_now:  # total.item() would be a host sync every step
                self._pbar.set_postfix(loss=f"{step.total.item():.3f}", lr=f"{lr:.2e}", refresh=False)
        if self._plain is not None and log_now:
            self._plain.line(done, float(step.total.detach()), lr)
        # evaluate before the checkpoint of the same iteration, so that it holds that evaluation's best
        if cfg.eval.period and done % cfg.eval.period == 0 and done < max_iter:
            self._evaluate(done)
        if cfg.checkpoint.period and done % cfg.checkpoint.period == 0 and done < max_iter:
            self._save(done)
        if step.stop_signal is not None and done < max_iter:
            if self._last_saved != done:
                self._save(done)
            name = signal.Signals(step.stop_signal).name
            self._say(f"{name}: saved a checkpoint at iteration {done}; continue with --resume")
            raise Interrupted(step.stop_signal)

    def _finish(self) -> dict[str, Any]:
        max_iter = self.plan.max_iter
        self._iter = max_iter
        self._save(max_iter)
        # From here a signal stops at once: the final checkpoint is written, --resume only re-evaluates.
        self._raise_on_signal = True
        if self._stop_signal is not None:
            raise Interrupted(self._stop_signal)
        return self._evaluate(max_iter, final=True)

    def _log_step(self, step: _Step, lr: float, weights: list[float], secs: float) -> None:
        """One ``log.jsonl`` record: the engine's own keys, then what the detector and weighting report."""
        out = step.out
        rec: dict[str, Any] = {
            "iter": step.done,
            "lr": lr,
            "loss": float(step.total.detach()),
            "level_names": self.level_names,
            "level_losses": out.level_losses.detach().float().cpu().tolist(),
            "level_weights": weights,
            "grad_norm": step.grad_norm,
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
        detector = _unwrap(self.model)
        rec.update({f"weighting/{k}": v for k, v in self.weighting.log_fields().items()})
        rec.update({f"loss/{k}": v for k, v in detector.log_fields().items()})
        self._note_log_var_range(step.done, detector, rec)
        if self.nonfinite_total:
            rec["nonfinite_skipped"] = self.nonfinite_total
        if self.corrupt_images:
            rec["corrupt_images_skipped"] = len(self.corrupt_images)
        assert self.log is not None
        self.log.step(rec)

    def _note_log_var_range(self, done: int, detector: Detector, rec: dict[str, Any]) -> None:
        """Log-variances outside ``loss.log_var_range``: in the record, and once as an event and a warning."""
        lv = detector.log_variances
        if lv is None:
            return
        out_of_range = lv.out_of_range()
        if out_of_range:
            rec["log_var_out_of_range"] = out_of_range
        if set(out_of_range) - self._log_var_out:
            assert lv.log_var_range is not None and self.log is not None
            low, high = lv.log_var_range
            text = ", ".join(f"log_var_{k}={v:.4g}" for k, v in out_of_range.items())
            self.log.event({"iter": done, "event": "log_var_out_of_range", "log_vars": out_of_range})
            self._warn(
                f"iteration {done}: {text} outside loss.log_var_range [{low:g}, {high:g}]; the loss uses "
                "the clamped value, which gets no gradient there"
            )
        self._log_var_out = set(out_of_range)

    def _evaluate(self, done: int, final: bool = False) -> dict[str, Any]:
        # evaluation must not move any random stream: a resumed run does not repeat it
        streams = rng_state()
        try:
            metrics = self._evaluate_inner(done, final)
        finally:
            set_rng_state(streams)
        if self.best is not None and self.best.improves(metrics):  # with the streams training left
            self._save_best(done, metrics)
        return metrics

    def _evaluate_inner(self, done: int, final: bool) -> dict[str, Any]:
        cfg = self.cfg
        dist.broadcast_buffers(_unwrap(self.model))  # every rank evaluates the checkpointed model
        loader = build_eval_loader(
            self.val_set, cfg.eval.batch_size, cfg.data.num_workers, rank=self.rank, world_size=self.world,
            max_images=cfg.eval.max_images,
        )
        results: list[dict[str, Any]] | None = [] if final else None
        metrics = evaluate(
            _unwrap(self.model), loader, self.val_set, self.device, self.autocast_dtype, keep_results=results,
            backend=cfg.eval.backend,
        )
        metrics["iter"] = done
        assert self.log is not None
        if final and self.rank == 0:
            # the final COCO results (at most the detector's 100 per image): report's PR curves and confusion matrix
            write_json_atomic(self.out_dir / "detections.json", results, indent=None)
        self.log.metrics(done, metrics, final=final)
        self._say(f"[iter {done}] COCO bbox metrics (%):\n{format_metrics(metrics)}")
        return metrics

    def _save_best(self, done: int, metrics: dict[str, Any]) -> None:
        """``checkpoints/best.pt``: this state, with the evaluation that made it the best."""
        assert self.best is not None
        before = self.best.value
        self.best.record(metrics, done)
        state = self._state(done)  # collective: every rank takes part
        if dist.is_main():
            path = save_best(state, self.out_dir / "checkpoints")
            was = f", was {before:.2f}" if math.isfinite(before) else ""
            self._say(f"[iter {done}] best {self.best.metric} {self.best.value:.2f}{was}: wrote {path}")
        dist.barrier()
