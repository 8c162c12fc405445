"""A schedule as people state it, turned once at setup into the iterations and learning rate the loop runs.

``train.max_epochs``, ``train.schedule.warmup_epochs`` and ``train.schedule.step_epochs`` become iterations
with the number of images one iteration consumes on all ranks together::

    iterations = ceil(epochs × train images / (batch_size × world size))

and a learning rate stated for ``train.optimizer.reference_batch_size`` is scaled linearly to the run's total
batch (Goyal et al. 2017, "Accurate, Large Minibatch SGD", the linear scaling rule)::

    lr = lr_ref × (batch_size × world size) / reference_batch_size

Without ``reference_batch_size`` (or with ``train.scale_lr: false``) the learning rate is the configured one,
so a config that states neither epochs nor a reference batch runs exactly as before. The user's config is
kept as written (``config.yaml`` still says epochs); the resolved numbers live in ``RunPlan``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from robustdet.config import Config, ScheduleConfig
from robustdet.errors import ConfigError


def epochs_to_iters(epochs: float, images: int, total_batch: int) -> int:
    """ceil(epochs × images / total_batch): the iterations that see ``epochs`` passes over ``images``."""
    # round first: 0.5 × 24 / 4 must give 3, not 4 from a float a hair above 3
    return math.ceil(round(epochs * images / total_batch, 9))


@dataclass(frozen=True)
class RunPlan:
    """What the loop runs: its length, the schedule in iterations, and the learning rates."""

    max_iter: int
    schedule: ScheduleConfig  # warmup_iters and steps in iterations
    lr: float
    log_var_lr: float | None
    lr_scale: float  # lr / the configured lr
    total_batch: int  # batch_size × world size
    train_images: int

    @property
    def epochs(self) -> float:
        """The passes over data.train that max_iter makes."""
        return self.max_iter * self.total_batch / max(1, self.train_images)

    def lines(self, cfg: Config, world: int) -> list[str]:
        """What was converted or scaled, as one line each (empty when the config said iterations and lr)."""
        out = []
        sched, per_epoch = cfg.train.schedule, self.train_images / self.total_batch
        if cfg.train.max_epochs is not None or sched.warmup_epochs is not None or sched.step_epochs:
            parts = [f"{self.max_iter} iterations"]
            if cfg.train.max_epochs is not None:
                parts[0] += f" for {cfg.train.max_epochs:g} epochs"
            if sched.warmup_epochs is not None:
                parts.append(f"warm-up {sched.warmup_epochs:g} epochs -> {self.schedule.warmup_iters} iterations")
            if sched.step_epochs:
                epochs = ", ".join(f"{e:g}" for e in sched.step_epochs)
                parts.append(f"steps at epochs [{epochs}] -> iterations {self.schedule.steps}")
            head = f"schedule: {per_epoch:.4g} iterations per epoch ({self.train_images} images / batch "
            out.append(head + f"{cfg.train.batch_size} x {world} ranks): " + "; ".join(parts))
        if self.lr_scale != 1.0:
            ref = cfg.train.optimizer.reference_batch_size
            out.append(
                f"lr {cfg.train.optimizer.lr:g} for batch {ref} -> {self.lr:g} for batch "
                f"{cfg.train.batch_size} x {world} ranks"
            )
        return out


def make_plan(cfg: Config, train_images: int, world: int) -> RunPlan:
    """Resolve ``cfg``'s epochs and reference batch for ``train_images`` images and ``world`` ranks."""
    train, sched, opt = cfg.train, cfg.train.schedule, cfg.train.optimizer
    total = train.batch_size * world
    if train.max_epochs is not None:
        max_iter = max(1, epochs_to_iters(train.max_epochs, train_images, total))
    else:
        assert train.max_iter is not None  # the config's validator gives one of the two
        max_iter = train.max_iter
    warmup = sched.warmup_iters
    if sched.warmup_epochs is not None:
        warmup = epochs_to_iters(sched.warmup_epochs, train_images, total)
    steps = list(sched.steps)
    if sched.step_epochs:
        steps = [epochs_to_iters(e, train_images, total) for e in sched.step_epochs]
        bad = [e for e, s in zip(sched.step_epochs, steps, strict=True) if not 0 < s < max_iter]
        if bad:
            raise ConfigError(
                f"train.schedule.step_epochs {bad} fall outside the run's (0, {max_iter}) iterations "
                f"({train_images} images, batch {train.batch_size} x {world} ranks)"
            )
    elif train.max_epochs is not None:
        bad_iters = [s for s in steps if not 0 < s < max_iter]
        if bad_iters:
            raise ConfigError(
                f"train.schedule.steps {bad_iters} must lie in (0, {max_iter}), the iterations of "
                f"train.max_epochs={train.max_epochs:g}"
            )
    scale = 1.0
    if train.scale_lr and opt.reference_batch_size is not None:
        scale = total / opt.reference_batch_size
    return RunPlan(
        max_iter=max_iter,
        schedule=sched.model_copy(update={"warmup_iters": warmup, "steps": steps}),
        lr=opt.lr * scale,
        log_var_lr=None if opt.log_var_lr is None else opt.log_var_lr * scale,
        lr_scale=scale,
        total_batch=total,
        train_images=train_images,
    )
