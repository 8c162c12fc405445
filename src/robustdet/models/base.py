"""What every detector returns in training, and the per-level bookkeeping the detectors share.

The multi-scale weighting (Luo et al. Eq. 1) acts on L_i, the part of the detector's normalised loss that
comes from pyramid level i, so that Σ_i L_i is the detector's ordinary total (see
``shared/design/equations.md``, "Per-level losses"). Detectors compute per-anchor (or per-location,
per-RoI) losses, sum them per image and level with :func:`level_sums`, and normalise with
:func:`normalise`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from robustdet.config import Config, default_log_var_init
from robustdet.losses import LogVariances


@dataclass
class DetectorLosses:
    """A detector's training output.

    ``level_losses`` (shape [L], with grad) are the unweighted L_i; the engine forms
    Σ_i w_i · L_i + ``extra_loss``. ``components`` split each L_i for logging (detached, each [L]) and
    sum to ``level_losses``; ``extra_loss`` is what stays outside the weighting (Faster R-CNN's RPN).
    """

    level_names: list[str]
    level_losses: Tensor
    components: dict[str, Tensor]
    extra_loss: Tensor
    extra_components: dict[str, Tensor] = field(default_factory=dict)

    @property
    def total(self) -> Tensor:
        """The unweighted total, Σ_i L_i + extra: the detector's ordinary loss."""
        return self.level_losses.sum() + self.extra_loss


def level_sums(per_item: Tensor, counts: list[int]) -> Tensor:
    """Sum ``per_item`` [B, N] over consecutive segments of ``counts`` along dim 1: [B, L].

    Anchors are laid out level after level (torchvision's heads concatenate the levels), so a
    level's anchors are one contiguous segment. ``split`` + ``sum`` keeps the summation order fixed,
    so the result is deterministic on every device (``index_add_`` on CUDA is not).
    """
    if sum(counts) != per_item.shape[1]:
        raise ValueError(f"level counts {counts} do not add up to the {per_item.shape[1]} items per image")
    return torch.stack([seg.sum(dim=1) for seg in per_item.split(counts, dim=1)], dim=1)


def normalise(per_image_level: Tensor, num_foreground: Tensor, mode: str) -> Tensor:
    """Per-level losses [L] from per-image, per-level sums [B, L] and foreground counts [B].

    ``per_image`` (torchvision): L_i = (1/B) Σ_b S_{b,i} / max(1, n_b).
    ``per_batch`` (detectron2, MMDetection): L_i = Σ_b S_{b,i} / max(1, Σ_b n_b).
    Both are linear in S, so Σ_i L_i is the normalised total either way.
    """
    n = num_foreground.to(per_image_level.dtype)
    if mode == "per_image":
        return (per_image_level / n.clamp(min=1.0)[:, None]).mean(dim=0)
    if mode == "per_batch":
        return per_image_level.sum(dim=0) / n.sum().clamp(min=1.0)
    raise ValueError(f"loss.normalization must be 'per_image' or 'per_batch', got {mode!r}")


def build_log_variances(cfg: Config) -> LogVariances | None:
    """The learnable s per task (Eq. 19) when ``loss.bayesian``; None otherwise."""
    if not cfg.loss.bayesian:
        return None
    init = cfg.loss.log_var_init or default_log_var_init(cfg.model.name)
    needed = set(default_log_var_init(cfg.model.name))
    if set(init) != needed:
        raise ValueError(
            f"loss.log_var_init for {cfg.model.name} needs exactly the keys {sorted(needed)}, "
            f"got {sorted(init)}"
        )
    return LogVariances(dict(init), log_var_range=cfg.loss.log_var_range)


__all__ = ["DetectorLosses", "build_log_variances", "level_sums", "normalise"]
