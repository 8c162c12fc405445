"""The ``loss`` section: box loss, focal parameters, normalisation and the Bayesian switch (Eq. 19)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from robustdet.section import Section


class LossConfig(Section):
    box_loss: Literal["l1", "smooth_l1", "giou"] = "smooth_l1"
    beta: float = Field(0.1, ge=0)
    focal_alpha: float = 0.25
    focal_gamma: float = Field(2.0, ge=0)
    cls_weight: float = Field(1.0, ge=0)
    # per_image: torchvision (each image's loss over its own foreground count, then the mean over images);
    # per_batch: detectron2 / MMDetection (the batch's loss over the batch's foreground count, all-reduced
    # over the ranks under torchrun)
    normalization: Literal["per_image", "per_batch"] = "per_batch"
    bayesian: bool = False
    # initial s per task; None: the detector's own (``Detector.loss_tasks``, the paper's s_reg 1, s_cls 0)
    log_var_init: dict[str, float] | None = None
    log_var_range: tuple[float, float] | None = None
    # model.box_uncertainty (KL-Loss, losses/box_uncertainty.py): the range every α = log σ² per box
    # coordinate is clamped to (probdet's), and the iterations over which the KL term is blended in
    box_log_var_range: tuple[float, float] = (-7.0, 7.0)
    box_uncertainty_warmup: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> LossConfig:
        if self.bayesian and self.box_loss == "giou":
            raise ValueError(
                "loss.bayesian=true needs loss.box_loss l1 or smooth_l1: GIoU has no Bayesian form "
                "(the Bayesian smooth L1, Eq. 14, is defined on box deltas)"
            )
        if self.bayesian and self.box_loss == "l1":
            raise ValueError(
                "loss.bayesian=true with loss.box_loss=l1: the Bayesian smooth L1 (Eq. 14) needs a threshold "
                "beta > 0 and L1 has none; use loss.box_loss=smooth_l1 with a small loss.beta (e.g. 0.1)"
            )
        if self.bayesian and self.box_loss == "smooth_l1" and self.beta <= 0:
            raise ValueError("loss.beta must be > 0 with loss.bayesian=true (Eq. 14 divides by it)")
        if self.log_var_range is not None and self.log_var_range[0] >= self.log_var_range[1]:
            raise ValueError("loss.log_var_range must be (low, high) with low < high")
        if self.box_log_var_range[0] >= self.box_log_var_range[1]:
            raise ValueError("loss.box_log_var_range must be (low, high) with low < high")
        return self


__all__ = ["LossConfig"]
