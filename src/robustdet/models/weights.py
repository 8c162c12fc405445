"""Start a detector from trained weights: a robustdet checkpoint or a torchvision detection state dict.

robustdet's detectors subclass torchvision's and assemble the same modules under the same names
(``backbone.body`` / ``backbone.fpn`` from ``BackboneWithFPN``, ``head.*`` for RetinaNet and FCOS,
``rpn.*`` / ``roi_heads.*`` for Faster R-CNN), so the key mapping from the files torchvision publishes is the
identity; what differs is checked here, tensor by tensor, and either kept at the model's own initialisation
(and reported) or refused with an error naming the file and the first key:

- the classification layers (RetinaNet/FCOS ``cls_logits``, Faster R-CNN ``box_predictor``) keep their
  fresh initialisation (the prior-probability bias of the focal-loss detectors) when the file's class count
  differs from the model's;
- the P6/P7 block (``backbone.fpn.extra_blocks``) keeps its fresh initialisation when its input differs:
  torchvision's ``retinanet_resnet50_fpn`` (v1) computes P6 from P5, robustdet's RetinaNet from C5 as
  ``retinanet_resnet50_fpn_v2`` does;
- the log-variances of the Bayesian losses are robustdet's own: absent from torchvision's files (kept at
  ``loss.log_var_init``) and ignored when the file has them and the model does not;
- the α layers of ``model.box_uncertainty`` (``bbox_log_var``, models/heads.py) are robustdet's own too:
  absent from torchvision's files and from checkpoints trained without them, they keep their KL-Loss
  initialisation and the report line names them; a file's α layers are ignored by a model without them;
- ``box_uncertainty_iter`` (the KL-Loss warm-up's count) is never taken from the file: a run started
  from trained weights warms up afresh;
- ``num_batches_tracked`` counters are ignored: torchvision's trained models have ``FrozenBatchNorm2d``
  (no counter), a locally built one ``BatchNorm2d``.

Any other missing or unexpected key, or any other shape that differs, is a ``CheckpointError``: a partial
load would start training from a silently broken network.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from robustdet.errors import CheckpointError

# Per prefix: how many outputs the layer has besides the per-class ones (Faster R-CNN's background at 0).
CLASSIFICATION_LAYERS: dict[str, int] = {
    "head.classification_head.cls_logits.": 0,  # RetinaNet [A·C, ...], FCOS [C, ...]
    "roi_heads.box_predictor.": 1,  # Faster R-CNN cls_score [C+1, 1024], bbox_pred [4(C+1), 1024]
}
EXTRA_BLOCKS = "backbone.fpn.extra_blocks."
ROBUSTDET_ONLY = ("log_variances.",)
BOX_UNCERTAINTY = ("head.regression_head.bbox_log_var.", "roi_heads.box_predictor.bbox_log_var.")
RUN_STATE = ("box_uncertainty_iter",)  # the model's own, never loaded
SHOWN = 3  # names shown per list in the report line and in errors

# Keys whose presence in a file tells which torchvision variant it is, for a hint when it does not fit.
_HINTS: tuple[tuple[str, bool, str], ...] = (
    (
        "head.classification_head.conv.0.1.weight",
        True,
        "the file's head has GroupNorm (torchvision's *_v2 RetinaNet, FCOS): set model.head_norm=group_norm",
    ),
    (
        "head.classification_head.conv.0.0.bias",
        True,
        "the file's head has no normalisation (torchvision's retinanet_resnet50_fpn): set model.head_norm=none",
    ),
    (
        "roi_heads.box_head.fc6.weight",
        True,
        "the file's box head is two fc layers (torchvision's fasterrcnn_resnet50_fpn): set model.head_norm=none",
    ),
    (
        "rpn.head.conv.1.0.weight",
        True,
        "torchvision's fasterrcnn_resnet50_fpn_v2 (BatchNorm in the FPN and box head, two RPN convs) has no "
        "robustdet counterpart; use fasterrcnn_resnet50_fpn",
    ),
)


def _show(keys: list[str]) -> str:
    if not keys:
        return ""
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return " (" + ", ".join(keys[:SHOWN]) + more + ")"


@dataclass
class LoadReport:
    """What :func:`load_detector_weights` did; :meth:`line` is the one line the trainer prints."""

    path: Path
    source: str  # "robustdet checkpoint" or "state dict"
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # the model's, absent from the file: kept their init
    initialised: list[str] = field(default_factory=list)  # box-uncertainty layers the file lacks: fresh init
    unexpected: list[str] = field(default_factory=list)  # the file's, absent from the model: ignored
    file_classes: int | None = None
    model_classes: int | None = None
    reasons: list[str] = field(default_factory=list)

    def line(self) -> str:
        why = f": {'; '.join(self.reasons)}" if self.reasons else ""
        return (
            f"model.weights: loaded {len(self.loaded)} tensors from {self.path} ({self.source}); "
            f"re-initialised {len(self.reinitialised)}{_show(self.reinitialised)}{why}; "
            f"missing {len(self.missing)}{_show(self.missing)}; "
            f"unexpected {len(self.unexpected)}{_show(self.unexpected)}"
            + (
                f"; box uncertainty: initialised {len(self.initialised)}{_show(self.initialised)} (KL-Loss init)"
                if self.initialised
                else ""
            )
        )


def read_state_dict(path: str | Path) -> tuple[dict[str, Tensor], str]:
    """The model state dict in ``path`` and what held it, loaded with ``weights_only=True``.

    A dict with a ``"model"`` entry is a checkpoint (robustdet's ``last.pt``, or torchvision's reference
    scripts' ``checkpoint.pth``); any other dict of tensors is taken as the state dict itself.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.weights: no such file {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is a paragraph; the reason is the first line after "WeightsUnpickler error:"
        text = str(exc).split("WeightsUnpickler error:", 1)[-1]
        reason = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
        reason = reason.split(". Please", 1)[0].rstrip(".")
        if "GLOBAL" in reason:  # a class or function to import: what weights_only loading exists to refuse
            raise CheckpointError(
                f"{path}: refused: model.weights holds objects that weights_only loading does not allow ({reason})"
            ) from None
        raise CheckpointError(f"{path}: cannot read model.weights as a state dict ({reason})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot read model.weights as a state dict ({first})") from None
    source = "state dict"
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state, source = state["model"], "robustdet checkpoint"
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: model.weights is not a state dict (holds a {type(state).__name__})")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: model.weights is not a state dict of tensors (entry {bad[0]!r})")
    return state, source


def _group(key: str) -> str | None:
    """The re-initialisable group of ``key`` (its prefix), or None (the α layers are their own case)."""
    if key.startswith(BOX_UNCERTAINTY):
        return None
    for prefix in (*CLASSIFICATION_LAYERS, EXTRA_BLOCKS):
        if key.startswith(prefix):
            return prefix
    return None


def _file_classes(state: dict[str, Tensor], model_state: dict[str, Tensor], num_classes: int) -> int | None:
    """The file's class count, read off the first classification layer both have (rows per class × C)."""
    for prefix, extra in CLASSIFICATION_LAYERS.items():
        for key, ours in model_state.items():
            if key.startswith(prefix) and key in state:
                per_class = ours.shape[0] // (num_classes + extra)
                return state[key].shape[0] // per_class - extra
    return None


def _hint(state: dict[str, Tensor], model_state: dict[str, Tensor]) -> str:
    for key, _, text in _HINTS:
        if key in state and key not in model_state:
            return f"; {text}"
    return ""


def _compare_keys(
    path: Path, state: dict[str, Tensor], model_state: dict[str, Tensor]
) -> tuple[list[str], list[str], set[str]]:
    """(missing, unexpected, the groups to re-initialise) of ``state`` against the model's, or a
    ``CheckpointError`` for a difference that no rule of the module docstring covers."""

    def counted(key: str) -> bool:
        return not key.endswith("num_batches_tracked") and key not in RUN_STATE

    def own(key: str) -> bool:  # robustdet's own tensors, allowed to be absent on either side
        return key.startswith(ROBUSTDET_ONLY) or key.startswith(BOX_UNCERTAINTY)

    missing = [k for k in model_state if k not in state and counted(k)]
    unexpected = [k for k in state if k not in model_state and counted(k)]
    mismatched = [k for k in model_state if k in state and counted(k) and state[k].shape != model_state[k].shape]
    # a group (classification layers, P6/P7) is kept whole at its init when any of its tensors differs
    reinit_groups = {g for k in mismatched if (g := _group(k)) is not None}
    hard_missing = [k for k in missing if not own(k) and _group(k) is None]
    hard_unexpected = [k for k in unexpected if not own(k) and _group(k) is None]
    hard_mismatched = [k for k in mismatched if _group(k) is None and not k.startswith(BOX_UNCERTAINTY)]
    if hard_mismatched:
        k = hard_mismatched[0]
        raise CheckpointError(
            f"{path}: model.weights does not fit this model: {k} has shape {tuple(state[k].shape)} in the file, "
            f"{tuple(model_state[k].shape)} in the model ({len(hard_mismatched)} shapes differ; another "
            f"backbone, fpn_channels or anchors?){_hint(state, model_state)}"
        )
    if hard_missing or hard_unexpected:
        parts = []
        if hard_missing:
            parts.append(f"{len(hard_missing)} of the model's keys are missing, first {hard_missing[0]}")
        if hard_unexpected:
            parts.append(f"{len(hard_unexpected)} keys are unexpected, first {hard_unexpected[0]}")
        raise CheckpointError(
            f"{path}: model.weights does not fit this model ({'; '.join(parts)}; another detector or head?)"
            f"{_hint(state, model_state)}"
        )
    return missing, unexpected, reinit_groups


def load_detector_weights(model: nn.Module, path: str | Path, num_classes: int) -> LoadReport:
    """Load ``path`` into ``model`` (a robustdet detector for ``num_classes`` classes) in place.

    See the module docstring for what is kept at its initialisation and what is an error. Raises
    ``FileNotFoundError`` for a missing file and ``CheckpointError`` (one line naming the file and the
    first key) for a file that does not fit.
    """
    state, source = read_state_dict(path)
    path = Path(path).expanduser()
    model_state = model.state_dict()
    missing, unexpected, reinit_groups = _compare_keys(path, state, model_state)

    report = LoadReport(path=path, source=source, model_classes=num_classes)
    report.file_classes = _file_classes(state, model_state, num_classes)
    if any(g in CLASSIFICATION_LAYERS for g in reinit_groups):
        report.reasons.append(f"the file has {report.file_classes} classes, the model {num_classes}")
    if EXTRA_BLOCKS in reinit_groups:
        report.reasons.append(
            "the file's P6/P7 take another input (torchvision's retinanet_resnet50_fpn computes P6 from P5, "
            "robustdet's RetinaNet from C5)"
        )
    merged = dict(model_state)
    for key in model_state:
        if key.endswith("num_batches_tracked") or key in RUN_STATE or key not in state:
            continue
        if key.startswith(BOX_UNCERTAINTY) and state[key].shape != model_state[key].shape:
            report.initialised.append(key)  # another class count: the α layer starts afresh as well
        elif _group(key) in reinit_groups:
            report.reinitialised.append(key)
        else:
            merged[key] = state[key]
            report.loaded.append(key)
    report.initialised += [k for k in missing if k.startswith(BOX_UNCERTAINTY)]
    report.reinitialised += [k for k in missing if _group(k) is not None]
    report.missing = [k for k in missing if _group(k) is None and not k.startswith(BOX_UNCERTAINTY)]
    report.unexpected = unexpected
    # the fresh model's own values stand for everything not loaded: its init is the re-initialisation
    model.load_state_dict(merged)
    return report


__all__ = ["LoadReport", "load_detector_weights", "read_state_dict"]
