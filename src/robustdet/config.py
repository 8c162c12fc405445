"""The typed run configuration: YAML in, validated pydantic models out.

Every section forbids unknown keys, so a typo such as ``weighting.intervall`` is an error that names the
key instead of a silently ignored setting. ``load_config`` applies dotted ``KEY=VALUE`` overrides (values
parsed as YAML scalars) before validation, so an override gets the same checks as the file.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration that cannot be run; the message names the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


BackboneName = Literal["resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large"]


class ModelConfig(_Section):
    name: Literal["retinanet", "fcos", "faster_rcnn"] = "retinanet"
    backbone: BackboneName = "resnet50"
    # None (random init, the default and what every test uses), a local .pth file, or a torchvision
    # weights enum name such as "ResNet50_Weights.IMAGENET1K_V1" (downloads on a user's machine).
    backbone_weights: str | None = None
    trainable_backbone_layers: int = Field(5, ge=0, le=6)
    fpn_channels: int = Field(256, ge=8)
    head_norm: Literal["none", "group_norm"] = "none"
    group_norm_groups: int = Field(32, ge=1)
    # GeneralizedRCNNTransform: shorter side resized to min_size, longer side capped at max_size.
    min_size: int = Field(800, ge=16)
    max_size: int = Field(1333, ge=16)
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # Anchors: one base size per pyramid level (P3-P7 for RetinaNet), times octave scales and ratios.
    anchor_sizes: list[float] = Field(default_factory=lambda: [32.0, 64.0, 128.0, 256.0, 512.0])
    anchor_scales: list[float] = Field(default_factory=lambda: [1.0, 2 ** (1 / 3), 2 ** (2 / 3)])
    aspect_ratios: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0])
    fg_iou_thresh: float = Field(0.5, gt=0, le=1)
    bg_iou_thresh: float = Field(0.4, ge=0, le=1)
    score_thresh: float = Field(0.05, ge=0, le=1)
    nms_thresh: float = Field(0.5, gt=0, le=1)
    detections_per_img: int = Field(100, ge=1)
    topk_candidates: int = Field(1000, ge=1)
    prior_probability: float = Field(0.01, gt=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.bg_iou_thresh > self.fg_iou_thresh:
            raise ValueError("model.bg_iou_thresh must not exceed model.fg_iou_thresh")
        if self.max_size < self.min_size:
            raise ValueError("model.max_size must be at least model.min_size")
        if self.head_norm == "group_norm" and self.fpn_channels % self.group_norm_groups:
            raise ValueError("model.fpn_channels must be divisible by model.group_norm_groups")
        return self


class LossConfig(_Section):
    box_loss: Literal["l1", "smooth_l1", "giou"] = "smooth_l1"
    beta: float = Field(0.1, ge=0)
    focal_alpha: float = 0.25
    focal_gamma: float = Field(2.0, ge=0)
    cls_weight: float = Field(1.0, ge=0)
    # per_image: torchvision (each image's loss over its own foreground count, then the mean over images);
    # per_batch: detectron2 / MMDetection (the batch's loss over the batch's foreground count).
    normalization: Literal["per_image", "per_batch"] = "per_batch"
    bayesian: bool = False
    log_var_init: dict[str, float] | None = None
    log_var_range: tuple[float, float] | None = None

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
        return self


class WeightingConfig(_Section):
    name: Literal["equal", "avw", "rlo"] = "equal"
    interval: int = Field(100, ge=2)
    lambdas: tuple[float, float] = (1.5, 1.0)
    eps: float = Field(1e-5, gt=0)
    rl_step: float = Field(0.01, ge=0, le=1)
    p_min: float = Field(0.1, ge=0, le=1)
    p_max: float = Field(0.9, ge=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> WeightingConfig:
        if self.p_min > self.p_max:
            raise ValueError("weighting.p_min must not exceed weighting.p_max")
        return self


class DatasetSource(_Section):
    """One split of a dataset, in one of the formats people have."""

    format: Literal["synthetic", "coco", "yolo", "voc"] = "synthetic"
    # coco: the annotation json; yolo: the data.yaml; voc: the VOCdevkit/VOC20xx folder;
    # synthetic: ignored (see data.synthetic).
    path: str | None = None
    # coco: the folder file_name is relative to; yolo/voc: derived from path when None.
    image_root: str | None = None
    # yolo: the data.yaml key (train/val/test); voc: the ImageSets/Main list (train/val/trainval/test);
    # synthetic: train or val.
    split: str | None = None

    @model_validator(mode="after")
    def _check(self) -> DatasetSource:
        if self.format != "synthetic" and not self.path:
            raise ValueError(f"a {self.format} dataset needs 'path'")
        return self


class SyntheticConfig(_Section):
    num_classes: int = Field(5, ge=1)
    image_size: int = Field(128, ge=32)
    num_train: int = Field(2000, ge=1)
    num_val: int = Field(200, ge=1)
    seed: int = 0
    # None: $ROBUSTDET_CACHE or ~/.cache/robustdet/synthetic
    cache_dir: str | None = None


class AugmentConfig(_Section):
    hflip: bool = True
    photometric: bool = False
    # random zoom-out / crop (scale jitter) as a fraction range; None disables it
    scale_range: tuple[float, float] | None = None


class DataConfig(_Section):
    train: DatasetSource = Field(default_factory=lambda: DatasetSource(split="train"))
    val: DatasetSource = Field(default_factory=lambda: DatasetSource(split="val"))
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    # Images without boxes: keep them (they teach background) or leave them out of training.
    empty_images: Literal["keep", "skip"] = "keep"
    # Boxes that stick out of the image: clip them to it, or stop with an error naming the box.
    out_of_image: Literal["clip", "error"] = "clip"
    # Read every image's header before training (coco and voc; yolo always does): non-image files,
    # animated images and sizes that differ from the annotation stop the run before it starts.
    verify_images: bool = True
    # Training images that fail to decode mid-run (e.g. truncated files) are skipped, replaced by the
    # next readable image, and reported; the run stops once more distinct images than this failed.
    max_corrupt_images: int = Field(10, ge=0)
    num_workers: int = Field(2, ge=0)


class OptimizerConfig(_Section):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    # learning rate of the log-variances (their own group, never weight-decayed); None: same as lr
    log_var_lr: float | None = Field(None, gt=0)


class ScheduleConfig(_Section):
    name: Literal["step", "cosine", "constant"] = "step"
    warmup_iters: int = Field(500, ge=0)
    warmup_factor: float = Field(0.001, gt=0, le=1)
    steps: list[int] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0, le=1)
    min_lr_factor: float = Field(0.0, ge=0, le=1)


class TrainConfig(_Section):
    max_iter: int = Field(1000, ge=1)
    batch_size: int = Field(2, ge=1)  # per process
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    clip_grad_norm: float | None = Field(None, gt=0)
    amp: bool = True  # bf16 autocast on CUDA; always off on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int | None = Field(None, ge=1)
    # how many non-finite steps in a row are skipped before the run stops
    max_nonfinite_steps: int = Field(5, ge=1)
    # under torchrun: how long a collective waits for a rank that stopped answering before the run
    # stops with an error (a rank that died is noticed at once)
    dist_timeout_s: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        bad = [s for s in self.schedule.steps if not 0 < s < self.max_iter]
        if bad:
            raise ValueError(f"train.schedule.steps {bad} must lie in (0, train.max_iter={self.max_iter})")
        return self


def installed_eval_backend() -> Literal["faster", "pycocotools"]:
    """The default COCOeval: faster-coco-eval (same numbers, C++ matching) when it is installed."""
    return "faster" if importlib.util.find_spec("faster_coco_eval") is not None else "pycocotools"


class EvalConfig(_Section):
    period: int = Field(0, ge=0)  # 0: only at the end
    batch_size: int = Field(4, ge=1)
    max_images: int | None = Field(None, ge=1)
    backend: Literal["faster", "pycocotools"] = Field(default_factory=installed_eval_backend)

    @model_validator(mode="after")
    def _check_backend(self) -> EvalConfig:
        # at load time, not after a whole training run when the final evaluation starts
        if self.backend == "faster" and installed_eval_backend() != "faster":
            raise ValueError("eval.backend=faster needs the faster-coco-eval package; or set eval.backend=pycocotools")
        return self


class CheckpointConfig(_Section):
    period: int = Field(500, ge=0)  # 0: only at the end


class LogConfig(_Section):
    period: int = Field(20, ge=1)
    tensorboard: bool = True
    progress: bool = True


class Config(_Section):
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    weighting: WeightingConfig = Field(default_factory=WeightingConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    log: LogConfig = Field(default_factory=LogConfig)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[1, 2]"]`` into a nested dict, values parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form KEY=VALUE (e.g. train.max_iter=200)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from exc
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
            node = child
        node[parts[-1]] = value
    return tree


def merge_dicts(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping, with MMDetection-style ``_base_`` files (relative paths) merged underneath."""
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: _base_ includes itself (" + " -> ".join(str(p) for p in chain) + ")")
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror})") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    bases = loaded.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a file name or a list of file names")
    data: dict[str, Any] = {}
    for base in bases:
        data = merge_dicts(data, _read_yaml(path.parent / base, (*chain, path)))
    return merge_dicts(data, loaded)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply dotted overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        data = _read_yaml(Path(path))
    if overrides:
        data = merge_dicts(data, parse_overrides(overrides))
        source = f"{source} (with overrides)"
    return config_from_dict(data, source)


def config_to_yaml(cfg: Config) -> str:
    """The resolved config, every default written out, as a run directory stores it."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def default_log_var_init(model_name: str) -> dict[str, float]:
    """Initial s per task: s_reg 1.0, s_cls 0.0 (Bayesian paper section 4.2)."""
    if model_name == "faster_rcnn":
        return {"rpn_cls": 0.0, "rpn_reg": 1.0, "roi_cls": 0.0, "roi_reg": 1.0}
    return {"cls": 0.0, "reg": 1.0}


__all__ = [
    "Config",
    "ConfigError",
    "config_from_dict",
    "config_to_yaml",
    "default_log_var_init",
    "load_config",
    "parse_overrides",
]

