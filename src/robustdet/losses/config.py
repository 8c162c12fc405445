"""The ``loss`` section: box loss, focal parameters, normalisation, the Bayesian switch (Eq. 19) and the
noise-robust classification switches of the dense detectors (``losses/noisy_labels.py``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from robustdet.losses.bayesian_form import BayesianFormName
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
    # which Bayesian loss (losses/bayesian_form.py): "paper" is Eq. 14 / 16 exactly, the form that collapses
    # when s converges; "detached" (the default) fits s on detached predictions and trains the network on
    # the plain losses, the only candidate that kept AP with s converged (docs/results.md)
    bayesian_form: BayesianFormName = "detached"
    # initial s per task; None: the detector's own (``Detector.loss_tasks``, the paper's s_reg 1, s_cls 0)
    log_var_init: dict[str, float] | None = None
    log_var_range: tuple[float, float] | None = None
    # model.box_uncertainty (KL-Loss, losses/box_uncertainty.py): the range every α = log σ² per box
    # coordinate is clamped to (probdet's), and the iterations over which the KL term is blended in
    box_log_var_range: tuple[float, float] = (-7.0, 7.0)
    box_uncertainty_warmup: int = Field(0, ge=0)
    # isolated (the default): the α layers read detached features and α is fitted on the detached deltas, so
    # the detector trains as without α (bitwise) and σ per box is a read-out; detached: α's gradient still
    # reaches the shared box tower; kl: He et al.'s KL-Loss trains the deltas (e^(−α) weights their loss),
    # which halved AP in docs/results.md (losses/box_uncertainty.py, BOX_UNCERTAINTY_FORMS)
    box_uncertainty_form: Literal["kl", "detached", "isolated"] = "isolated"

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
        if self.box_uncertainty_form != "kl" and self.box_uncertainty_warmup > 0:
            raise ValueError(
                f"loss.box_uncertainty_warmup > 0 with loss.box_uncertainty_form={self.box_uncertainty_form}: the "
                "warm-up blends the KL term into the deltas' loss, which that form never does; set the warm-up to 0 "
                "or loss.box_uncertainty_form=kl"
            )
        return self

    # --- noise-robust classification of the dense detectors (issue 17; losses/noisy_labels.py) ----------
    # focal: today's loss; bootstrap (Reed et al. 2015, soft) and label_smoothing change the focal loss's
    # targets; gce puts the generalized cross entropy (Zhang & Sabuncu 2018) inside the focal loss
    cls_method: Literal["focal", "bootstrap", "label_smoothing", "gce"] = "focal"
    bootstrap_beta: float = Field(0.95, ge=0, le=1)  # weight of the label in the target (Reed's soft β)
    label_smoothing: float = Field(0.1, ge=0, lt=1)  # ε of foreground rows: (1 − ε)·t + ε/C
    gce_q: float = Field(0.7, gt=0, le=1)  # q of (1 − p_t^q)/q; Zhang & Sabuncu's default
    # Background Recalibration Loss (Zhang et al. 2020): background elements scored above brl_threshold
    # get the mirrored (positive-style) focal term
    brl: bool = False
    brl_threshold: float = Field(0.5, gt=0, lt=1)

    def noisy_label_switches(self) -> list[str]:
        """The noise-robust classification switches that are on, as ``key=value`` (empty when none is)."""
        on = [f"loss.cls_method={self.cls_method}"] if self.cls_method != "focal" else []
        return on + (["loss.brl=true"] if self.brl else [])

    @model_validator(mode="after")
    def _check_noisy_labels(self) -> LossConfig:
        if self.bayesian and (self.cls_method == "gce" or self.brl):
            switch = "loss.brl=true" if self.brl else "loss.cls_method=gce"
            raise ValueError(
                f"{switch} with loss.bayesian=true: it has no Bayesian form (Eq. 16 is defined on the focal "
                "loss's −log p_t); loss.cls_method bootstrap and label_smoothing, which only change targets, do"
            )
        return self


__all__ = ["LossConfig"]
