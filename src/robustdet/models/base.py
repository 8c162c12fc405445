"""The detector contract: what every detector gives the engine, and the per-level bookkeeping they share.

The engine relies on :class:`Detector` and nothing else: ``level_names`` (the pyramid levels the weighting
acts on), ``loss_tasks`` (the Bayesian tasks and their initial s, the one place that names them),
``log_variances`` (s per task, or None), ``log_fields()`` (the loss state to log), ``from_config`` and a
``forward`` that returns :class:`DetectorLosses` in training and torchvision detections (labels 0..C-1)
in evaluation.

The multi-scale weighting (Luo et al. Eq. 1) acts on L_i, the part of the detector's normalised loss that
comes from pyramid level i, so that Σ_i L_i is the detector's ordinary total (``shared/design/equations.md``,
"Per-level losses"). Detectors compute per-anchor (or per-location, per-RoI) losses, sum them per image and
level with :func:`level_sums`, and normalise with :func:`normalise`.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from robustdet import distributed as dist
from robustdet.losses import LogVariances, LossConfig, box_loss_row, detaches_features
from robustdet.models.voting import DEFAULT_SIGMA_T
from robustdet.section import Section

# "tiny": a test-sized body for tests and smoke runs (models/backbones.py, TinyBody)
BackboneName = Literal["resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large", "tiny"]


class ModelSection(Section):
    """The settings every detector has: backbone and FPN, input resizing, detection post-processing.

    Each detector's own section (``model.name`` picks it) adds its anchors or regression ranges and its
    head settings; a key another detector uses is an error naming the key and the detector.
    """

    name: str
    backbone: BackboneName = "resnet50"
    # None (random init, the default and what every test uses), a local .pth file, or a torchvision
    # weights enum name such as "ResNet50_Weights.IMAGENET1K_V1" (downloads on a user's machine).
    backbone_weights: str | None = None
    # A trained detector to start training from (not when resuming): a robustdet checkpoint (its "model")
    # or a torchvision detection state dict, e.g. retinanet_resnet50_fpn_v2's file; supersedes
    # backbone_weights (docs/models.md, "Start from trained weights").
    weights: str | None = None
    trainable_backbone_layers: int = Field(5, ge=0, le=6)
    fpn_channels: int = Field(256, ge=8)
    head_norm: Literal["none", "group_norm"] = "none"
    group_norm_groups: int = Field(32, ge=1)
    # GeneralizedRCNNTransform: shorter side resized to min_size, longer side capped at max_size.
    min_size: int = Field(800, ge=16)
    max_size: int = Field(1333, ge=16)
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    score_thresh: float = Field(0.05, ge=0, le=1)
    nms_thresh: float = Field(0.5, gt=0, le=1)
    detections_per_img: int = Field(100, ge=1)
    # α = log σ² per box regression output (KL-Loss); every detection then carries bbox_std (docs/models.md)
    box_uncertainty: bool = False
    # var voting (He et al. 2019, Alg. 1) of the boxes NMS keeps, weighted by the candidates' σ (models/voting.py)
    var_voting: bool = False
    var_voting_sigma_t: float = Field(DEFAULT_SIGMA_T, gt=0)

    def transform_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of torchvision's ``GeneralizedRCNNTransform`` every detector passes on."""
        return {
            "min_size": self.min_size,
            "max_size": self.max_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }

    @model_validator(mode="after")
    def _check_common(self) -> ModelSection:
        if self.max_size < self.min_size:
            raise ValueError("model.max_size must be at least model.min_size")
        if self.head_norm == "group_norm" and self.fpn_channels % self.group_norm_groups:
            raise ValueError("model.fpn_channels must be divisible by model.group_norm_groups")
        if self.var_voting and not self.box_uncertainty:
            raise ValueError(
                "model.var_voting=true needs model.box_uncertainty=true: voting weighs the candidates by "
                "their predicted σ"
            )
        return self


def check_per_level(key: str, values: list[float], num_levels: int, what: str) -> None:
    """A list setting needs exactly one value per pyramid level."""
    if len(values) != num_levels:
        raise ValueError(f"model.{key} needs one {what} per level ({num_levels}), got {len(values)}: {values}")


def box_uncertainty_conflict(loss: LossConfig) -> str | None:
    """Why ``model.box_uncertainty`` cannot go with ``loss`` (one line naming both keys), or None."""
    if box_loss_row(loss).decoded:
        return (
            f"model.box_uncertainty=true needs loss.box_loss l1 or smooth_l1: loss.box_loss={loss.box_loss} "
            "compares decoded boxes, and the KL-Loss puts one α on each regressed delta"
        )
    if loss.bayesian:
        return (
            "model.box_uncertainty=true with loss.bayesian=true: the box loss would carry both a σ per box and "
            "the task's σ (s_reg); set one of them to false (docs/losses.md)"
        )
    return None


@dataclass
class DetectorLosses:
    """A detector's training output.

    ``level_losses`` (shape [L], with grad) are the unweighted L_i; the engine forms
    Σ_i w_i · L_i + ``extra_loss``. ``plain_level_losses`` [L] (detached) are the same levels' losses at
    σ = 1 when the loss is Bayesian, the measure the weightings take (equations.md, "Bayesian losses with
    AVW / RLO"); None when the loss is plain (they would equal ``level_losses``). ``components`` split
    each L_i for logging (detached, each [L]) and sum to ``level_losses``; ``extra_loss`` is what stays
    outside the weighting (Faster R-CNN's RPN), split for logging in ``extra_components`` (each one value
    per ``extra_level_names`` entry).
    """

    level_names: list[str]
    level_losses: Tensor
    components: dict[str, Tensor]
    extra_loss: Tensor
    extra_components: dict[str, Tensor] = field(default_factory=dict)
    extra_level_names: list[str] = field(default_factory=list)
    plain_level_losses: Tensor | None = None

    @property
    def total(self) -> Tensor:
        """The unweighted total, Σ_i L_i + extra: the detector's ordinary loss."""
        return self.level_losses.sum() + self.extra_loss

    def measured(self, measure: str) -> Tensor:
        """What a weighting with ``measure`` ("plain" or "trained") sees of each level, detached."""
        if measure == "plain" and self.plain_level_losses is not None:
            return self.plain_level_losses
        return self.level_losses.detach()


def level_sums(per_item: Tensor, counts: list[int]) -> Tensor:
    """Sum ``per_item`` [B, N] over consecutive segments of ``counts`` along dim 1: [B, L].

    Anchors are laid out level after level (torchvision's heads concatenate the levels), so a
    level's anchors are one contiguous segment. ``split`` + ``sum`` keeps the summation order fixed,
    so the result is deterministic on every device (``index_add_`` on CUDA is not).
    """
    if sum(counts) != per_item.shape[1]:
        raise ValueError(f"level counts {counts} do not add up to the {per_item.shape[1]} items per image")
    return torch.stack([seg.sum(dim=1) for seg in per_item.split(counts, dim=1)], dim=1)


def foreground_normaliser(num_foreground: Tensor, mode: str) -> Tensor:
    """The divisor of ``normalise``: per image max(1, n_b) [B], or for the batch max(1, N̄) [].

    ``per_batch`` under ``torch.distributed`` uses N̄ = the foreground count summed over the ranks divided
    by the world size (detectron2's and MMDetection's ``reduce_mean(num_pos)``): each rank's loss is then
    its share of the loss over the global batch, and DDP's gradient average equals the gradient of one
    process that saw every rank's images (tests/test_models_distributed.py).
    """
    n = num_foreground.to(torch.float64 if num_foreground.dtype == torch.float64 else torch.float32)
    if mode == "per_image":
        return n.clamp(min=1.0)
    if mode == "per_batch":
        total = n.sum()
        if dist.is_distributed():
            total = dist.all_reduce_sum(total) / dist.world_size()
        return total.clamp(min=1.0)
    raise ValueError(f"loss.normalization must be 'per_image' or 'per_batch', got {mode!r}")


def normalise(per_image_level: Tensor, num_foreground: Tensor, mode: str) -> Tensor:
    """Per-level losses [L] from per-image, per-level sums [B, L] and foreground counts [B].

    ``per_image`` (torchvision): L_i = (1/B) Σ_b S_{b,i} / max(1, n_b).
    ``per_batch`` (detectron2, MMDetection): L_i = Σ_b S_{b,i} / max(1, N̄), N̄ = Σ_b n_b in one process
    (the mean over the ranks of that sum under ``torch.distributed``, :func:`foreground_normaliser`).
    Both are linear in S, so Σ_i L_i is the normalised total either way.
    """
    divisor = foreground_normaliser(num_foreground, mode).to(per_image_level.dtype)
    if mode == "per_image":
        return (per_image_level / divisor[:, None]).mean(dim=0)
    return per_image_level.sum(dim=0) / divisor


# the α layers' attribute name in every head and box predictor (models/heads.py)
ALPHA_LAYER = "bbox_log_var"


class Detector(abc.ABC):
    """The contract between a detector and the engine (mixed into a torchvision detector ``nn.Module``).

    Class attributes: ``section``, the detector's config section (keyed on ``model.name``); ``loss_tasks``,
    the tasks that get a learnable s = log σ² when ``loss.bayesian`` is on, with their initial values
    (Khanzhina et al. section 4.2: s_reg = 1, s_cls = 0). Instance attributes set by ``__init__``:
    ``level_names`` (the weighted levels, in ``level_losses`` order), ``num_classes``, ``loss_cfg`` and
    ``log_variances``.
    """

    section: ClassVar[type[ModelSection]]
    loss_tasks: ClassVar[dict[str, float]]
    level_names: list[str]
    num_classes: int
    loss_cfg: LossConfig
    log_variances: LogVariances | None
    box_uncertainty: bool = False

    def setup_losses(
        self,
        loss: LossConfig,
        num_classes: int,
        level_names: list[str],
        log_variances: LogVariances | None,
        box_uncertainty: bool = False,
    ) -> None:
        """The loss state every detector's ``__init__`` sets (after ``nn.Module.__init__``), with its checks.

        With ``box_uncertainty`` the module gets the buffer ``box_uncertainty_iter`` (int64 []), the number
        of training forwards so far: the warm-up of the KL-Loss reads it (``box_uncertainty_weight``), and
        being in the state dict it resumes exactly with no help from the trainer.
        """
        if loss.bayesian and log_variances is None:
            raise ValueError(f"loss.bayesian=true needs log_variances ({', '.join(self.loss_tasks)})")
        if box_uncertainty and (reason := box_uncertainty_conflict(loss)) is not None:
            raise ValueError(reason)
        self.loss_cfg = loss
        self.num_classes = num_classes
        self.level_names = list(level_names)
        self.log_variances = log_variances if loss.bayesian else None
        self.box_uncertainty = box_uncertainty
        if box_uncertainty:
            as_module(self).register_buffer("box_uncertainty_iter", torch.zeros((), dtype=torch.int64))

    def box_uncertainty_weight(self) -> float | Tensor:
        """w = min(1, iteration / ``loss.box_uncertainty_warmup``) of the KL-Loss blend; 1 without warm-up.

        A 0-dim tensor computed on the device from the buffer, so reading it costs no host sync.
        """
        warmup = self.loss_cfg.box_uncertainty_warmup
        if warmup == 0:
            return 1.0
        step: Tensor = as_module(self).get_buffer("box_uncertainty_iter")
        return (step.to(torch.float32) / float(warmup)).clamp(max=1.0)

    def isolated_parameters(self) -> list[nn.Parameter]:
        """The α layers' parameters when ``loss.box_uncertainty_form=isolated`` (else none): the trainer clips
        their gradients apart from the detector's, so that α's gradient cannot scale the detector's update
        through the shared clipping norm."""
        if not self.box_uncertainty or not detaches_features(self.loss_cfg):
            return []
        return [p for n, p in as_module(self).named_parameters() if ALPHA_LAYER in n]

    def count_training_forward(self) -> None:
        """One more training forward for the warm-up (a no-op without ``box_uncertainty``)."""
        if self.box_uncertainty:
            with torch.no_grad():
                as_module(self).get_buffer("box_uncertainty_iter").add_(1)
    # σ_t of var voting in post-processing (``model.var_voting``), None: off; set by ``build_detector``
    var_voting_sigma_t: float | None = None

    @classmethod
    @abc.abstractmethod
    def from_config(cls, section: Any, loss: LossConfig, num_classes: int) -> Detector:
        """The detector for ``num_classes`` classes (labels 0..C-1) from its own section and the loss's."""

    @abc.abstractmethod
    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> DetectorLosses | list[dict[str, Tensor]]:
        """Training (targets needed): ``DetectorLosses``. Eval: per image ``{boxes, scores, labels}``."""

    @classmethod
    def build_log_variances(cls, loss: LossConfig) -> LogVariances | None:
        """The learnable s per task (Eq. 19) when ``loss.bayesian``; None otherwise."""
        if not loss.bayesian:
            return None
        init = loss.log_var_init or cls.loss_tasks
        if set(init) != set(cls.loss_tasks):
            raise ValueError(
                f"loss.log_var_init for {cls.section.model_fields['name'].default} needs exactly the keys "
                f"{sorted(cls.loss_tasks)}, got {sorted(init)}"
            )
        return LogVariances(dict(init), log_var_range=loss.log_var_range)

    def log_var(self, task: str) -> Tensor | None:
        """s of ``task`` as the losses use it (clamped to ``loss.log_var_range``), or None when plain."""
        return None if self.log_variances is None else self.log_variances[task]

    def log_fields(self) -> dict[str, float]:
        """The loss state to log as ``loss/<name>``: s and σ = exp(s/2) per Bayesian task (none when plain)."""
        if self.log_variances is None:
            return {}
        fields: dict[str, float] = {}
        for task, s in self.log_variances.as_dict().items():
            fields[f"log_var/{task}"] = s
            fields[f"sigma/{task}"] = math.exp(0.5 * s) if math.isfinite(s) else s
        return fields

    # --- input handling shared by every detector ------------------------------------------------

    def _transform_inputs(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None
    ) -> tuple[Any, list[dict[str, Tensor]] | None, list[tuple[int, int]]]:
        """torchvision's transform (resize, normalise, pad) with the input checks: (image_list, resized
        targets or None in eval, original sizes). In training the targets are checked before resizing
        (shapes and dtypes) and after it (boxes with positive size, labels 0..C-1)."""
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            self._check_target_shapes(targets, len(images))
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        image_list, targets = self.transform(images, targets if self.training else None)  # type: ignore[attr-defined]
        if self.training:
            assert targets is not None
            self._check_boxes(targets)
        return image_list, targets, original_sizes

    def _check_target_shapes(self, targets: list[dict[str, Tensor]], num_images: int) -> None:
        if len(targets) != num_images:
            raise ValueError(f"got {num_images} images but {len(targets)} targets")
        for i, t in enumerate(targets):
            boxes, labels = t.get("boxes"), t.get("labels")
            if (
                not isinstance(boxes, Tensor)
                or not boxes.is_floating_point()
                or boxes.dim() != 2
                or boxes.shape[-1] != 4
            ):
                raise ValueError(f"target {i}: 'boxes' must be a float tensor [N, 4] (XYXY pixels)")
            if not isinstance(labels, Tensor) or labels.shape != boxes.shape[:1] or labels.dtype != torch.int64:
                raise ValueError(f"target {i}: 'labels' must be an int64 tensor [N] matching 'boxes'")

    def _check_boxes(self, targets: list[dict[str, Tensor]]) -> None:
        """Degenerate boxes and labels outside 0..C-1, with a single host sync for the whole batch."""
        boxes = torch.cat([t["boxes"] for t in targets])
        labels = torch.cat([t["labels"] for t in targets])
        if boxes.numel() == 0:
            return
        bad_box = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        bad_label = (labels < 0) | (labels >= self.num_classes)
        if not bool((bad_box | bad_label).any()):
            return
        sizes = [t["boxes"].shape[0] for t in targets]
        image = [i for i, n in enumerate(sizes) for _ in range(n)]
        k = int(torch.nonzero(bad_box | bad_label)[0])
        if bad_box[k]:
            raise ValueError(
                f"target {image[k]}: box {boxes[k].tolist()} has no positive width and height "
                "(after resizing; boxes are XYXY pixels)"
            )
        raise ValueError(f"target {image[k]}: label {int(labels[k])} is outside 0..{self.num_classes - 1}")


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype losses, anchors and decoding use for head outputs of ``dtype``.

    bf16/fp16 outputs under autocast: float32 (bf16 has 8 mantissa bits, an anchor at x = 1000 would be off
    by 4 px); float64 stays float64 for the equivalence tests.
    """
    return torch.promote_types(dtype, torch.float32)


def as_module(detector: Detector) -> nn.Module:
    """The detector as the ``nn.Module`` it is (every Detector is mixed into one)."""
    assert isinstance(detector, nn.Module)
    return detector


__all__ = [
    "BackboneName",
    "Detector",
    "DetectorLosses",
    "ModelSection",
    "as_module",
    "box_uncertainty_conflict",
    "check_per_level",
    "foreground_normaliser",
    "level_sums",
    "loss_dtype",
    "normalise",
]
