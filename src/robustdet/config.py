"""The typed run configuration: YAML in, validated pydantic models out.

Components own their sections: each detector (``models/``), weighting (``weighting/``) and dataset format
(``data/``) declares the keys it reads, and this module assembles them. ``model`` and ``weighting`` are
unions keyed on ``name`` (``data.train`` / ``data.val`` on ``format``), so a key the chosen component does
not use is an error naming the key and the component. Every section forbids unknown keys, so a typo such
as ``weighting.intervall`` is an error too. ``load_config`` applies dotted ``KEY=VALUE`` overrides (values
parsed as YAML scalars) before validation, so an override gets the same checks as the file.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from robustdet.data.config import FORMATS, AugmentConfig, DataConfig, DatasetSource, SyntheticConfig
from robustdet.errors import ConfigError
from robustdet.losses.config import LossConfig
from robustdet.models.build import DETECTORS
from robustdet.section import Section, tagged_union
from robustdet.weighting import WEIGHTINGS

# The unions keyed on ``name``: each member is the component's own section, found through the one table of
# its kind (models/build.py DETECTORS, weighting/__init__.py WEIGHTINGS). pydantic reports a key the
# chosen component does not declare against that component.
ModelConfig = tagged_union((d.section for d in DETECTORS.values()), "name")
WeightingConfig = tagged_union((w.section for w in WEIGHTINGS.values()), "name")
# section key -> (the table whose member its ``name`` / ``format`` picks, the discriminator, the default)
_MODEL_SECTIONS: dict[str, type[Section]] = {name: d.section for name, d in DETECTORS.items()}
_WEIGHTING_SECTIONS: dict[str, type[Section]] = {name: w.section for name, w in WEIGHTINGS.items()}
_FORMAT_SECTIONS: dict[str, type[Section]] = dict(FORMATS)
SWITCHED = {
    ("model",): (_MODEL_SECTIONS, "name", "retinanet"),
    ("weighting",): (_WEIGHTING_SECTIONS, "name", "equal"),
    ("data", "train"): (_FORMAT_SECTIONS, "format", "synthetic"),
    ("data", "val"): (_FORMAT_SECTIONS, "format", "synthetic"),
}


class OptimizerConfig(Section):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    # learning rate of the log-variances (their own group, never weight-decayed); None: same as lr
    log_var_lr: float | None = Field(None, gt=0)
    # iterations for which the log-variance group (the Bayesian s, UW's u) is held still (lr 0), after
    # which it follows the schedule: a warm-up of s (issue 16 §4; docs/results.md measures it)
    log_var_warmup: int = Field(0, ge=0)
    # the total batch (batch_size x world size) lr and log_var_lr are stated for: when set (and
    # train.scale_lr), both are scaled linearly to the run's total batch (docs/training.md, Schedules)
    reference_batch_size: int | None = Field(None, ge=1)


class ScheduleConfig(Section):
    name: Literal["step", "cosine", "constant"] = "step"
    warmup_iters: int | None = Field(None, ge=0)  # None with no warmup_epochs: 500
    warmup_factor: float = Field(0.001, gt=0, le=1)
    steps: list[int] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0, le=1)
    min_lr_factor: float = Field(0.0, ge=0, le=1)
    # the same in epochs, converted to iterations once at setup (engine/plan.py)
    warmup_epochs: float | None = Field(None, ge=0)
    step_epochs: list[float] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _default_warmup(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("warmup_iters") is None and data.get("warmup_epochs") is None:
            data = {**data, "warmup_iters": 500}
        return data

    @model_validator(mode="after")
    def _one_of_each(self) -> ScheduleConfig:
        if self.warmup_iters is not None and self.warmup_epochs is not None:
            raise ValueError("give one of train.schedule.warmup_iters and warmup_epochs (set the other to null)")
        if self.steps and self.step_epochs:
            raise ValueError("give one of train.schedule.steps and step_epochs (set the other to [])")
        return self


class TrainConfig(Section):
    max_iter: int | None = Field(None, ge=1)  # None with no max_epochs: 1000
    # the length in passes over data.train instead: ceil(epochs x images / (batch_size x world size))
    max_epochs: float | None = Field(None, gt=0)
    # scale the optimizer's lr from train.optimizer.reference_batch_size (when set) to the total batch
    scale_lr: bool = True
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

    @model_validator(mode="before")
    @classmethod
    def _default_length(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("max_iter") is None and data.get("max_epochs") is None:
            data = {**data, "max_iter": 1000}
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.max_iter is not None and self.max_epochs is not None:
            raise ValueError("give one of train.max_iter and train.max_epochs (set the other to null)")
        if self.max_iter is None:  # steps in iterations are checked once max_epochs is converted
            return self
        bad = [s for s in self.schedule.steps if not 0 < s < self.max_iter]
        if bad:
            raise ValueError(f"train.schedule.steps {bad} must lie in (0, train.max_iter={self.max_iter})")
        return self


def installed_eval_backend() -> Literal["faster", "pycocotools"]:
    """The default COCOeval: faster-coco-eval (same numbers, C++ matching) when it is installed."""
    return "faster" if importlib.util.find_spec("faster_coco_eval") is not None else "pycocotools"


class EvalConfig(Section):
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


# the 12 COCO bbox numbers (engine/evaluator.py METRIC_NAMES)
MetricName = Literal["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


class CheckpointConfig(Section):
    period: int = Field(500, ge=0)  # 0: only at the end
    # keep checkpoints/best.pt: the state at the evaluation with the highest value of this COCO metric
    best_metric: MetricName | None = None


class LogConfig(Section):
    period: int = Field(20, ge=1)
    tensorboard: bool = True
    progress: bool = True


class Config(Section):
    seed: int = 0
    model: ModelConfig = Field(default_factory=lambda: DETECTORS["retinanet"].section())
    loss: LossConfig = Field(default_factory=LossConfig)
    weighting: WeightingConfig = Field(default_factory=lambda: WEIGHTINGS["equal"].section())
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @model_validator(mode="before")
    @classmethod
    def _default_names(cls, data: Any) -> Any:
        """A ``model`` or ``weighting`` section without ``name`` is the default detector / weighting."""
        if isinstance(data, dict):
            data = dict(data)
            for key, default in (("model", "retinanet"), ("weighting", "equal")):
                if isinstance(data.get(key), dict) and "name" not in data[key]:
                    data[key] = {"name": default, **data[key]}
        return data

    @model_validator(mode="after")
    def _check_noisy_label_losses(self) -> Config:
        """The noise-robust classification switches act on a dense detector's sigmoid focal loss."""
        switches = self.loss.noisy_label_switches()
        if switches and not getattr(DETECTORS[self.model.name], "sigmoid_focal_classifier", False):
            dense = ", ".join(n for n, d in DETECTORS.items() if getattr(d, "sigmoid_focal_classifier", False))
            raise ValueError(
                f"{switches[0]} with model.name={self.model.name}: it changes the sigmoid focal loss of the "
                f"dense detectors ({dense}), which {self.model.name} does not have"
            )
        return self


# Settings read only when a switch is on: with the switch off (or absent) they cannot change a result, so a
# changed default of theirs does not make an earlier run "another config", neither for a sweep's cells
# (runs/settings.py) nor for --resume (switch -> the keys it owns).
SWITCHED_KEYS: dict[str, tuple[str, ...]] = {
    "model.box_uncertainty": ("loss.box_uncertainty_form", "loss.box_uncertainty_warmup", "loss.box_log_var_range"),
}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def read_settings(tree: dict[str, Any]) -> dict[str, Any]:
    """A config (as a dict) flattened, without the keys of a switch that is off (SWITCHED_KEYS): two configs
    with equal read settings build the same thing."""
    flat = flatten(tree)
    unread = {k for switch, keys in SWITCHED_KEYS.items() if not flat.get(switch) for k in keys}
    return {k: v for k, v in flat.items() if k not in unread}


def trains_alike(a: Config, b: Config) -> bool:
    """``a`` and ``b`` build the same model and loss: equal ``model`` and ``loss`` sections, up to the
    settings of a switch that is off."""
    a_set, b_set = (read_settings({"model": c.model.model_dump(mode="json"), "loss": c.loss.model_dump(mode="json")})
                    for c in (a, b))  # fmt: skip
    return a_set == b_set


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


def merge_dicts(base: dict[str, Any], update: dict[str, Any], _path: tuple[str, ...] = ()) -> dict[str, Any]:
    """``update`` laid over ``base`` (nested mappings merged key by key).

    Where ``update`` switches a component (``model.name``, ``weighting.name``, ``data.train.format``...),
    the keys ``base`` gave the old component that the new one does not declare are dropped: they were
    settings of the component being replaced (e.g. ``weighting.interval`` of rlo when a child file or an
    override says ``weighting.name=equal``). Keys the update itself gives are kept and validated.
    """
    out = dict(base)
    for key, value in update.items():
        path = (*_path, key)
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            out[key] = merge_dicts(_drop_foreign_keys(path, old, value), value, path)
        else:
            out[key] = value
    return out


def _drop_foreign_keys(path: tuple[str, ...], old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    switched = SWITCHED.get(path)
    if switched is None:
        return old
    table, key, default = switched
    before, after = old.get(key, default), new.get(key, old.get(key, default))
    if before == after or after not in table:
        return old
    return {k: v for k, v in old.items() if k in table[after].model_fields}


def _source_list_location(loc: list[str]) -> list[str]:
    """``data.train`` is one source or a list (data/config.py DatasetSources): drop the union's tag from an
    error's location, and name a list entry ``data.train[1]``."""
    if len(loc) > 2 and loc[0] == "data" and loc[1] in ("train", "val") and loc[2] in ("source", "sources"):
        if loc[2] == "sources" and len(loc) > 3:
            return [loc[0], f"{loc[1]}[{loc[3]}]", *loc[4:]]
        return [loc[0], loc[1], *loc[3:]]
    return loc


def _format_errors(exc: ValidationError, source: str) -> str:
    """One line per error: the file, the dotted key and what is wrong with it.

    pydantic puts the chosen member of a union into the location (``model.faster_rcnn.fg_iou_thresh``):
    that tag is taken out of the key and named in the message instead ("not a key of model faster_rcnn").
    """
    lines = []
    for err in exc.errors():
        loc = _source_list_location([str(p) for p in err["loc"]])
        component = None
        for path, (table, field, _) in SWITCHED.items():
            n = len(path)
            if tuple(p.split("[")[0] for p in loc[:n]) == path and len(loc) > n and loc[n] in table:
                component = f"{'.'.join(loc[:n])} {field}={loc[n]}"
                loc = loc[:n] + loc[n + 1 :]
                break
        key = ".".join(loc) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown key for {component}" if component else "unknown key"
        elif err["type"] == "union_tag_invalid":
            msg = msg.replace("does not match any of the expected tags", "is not one of")
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def config_from_stored(data: dict[str, Any], source: str, overrides: list[str] | None = None) -> Config:
    """A run's stored, fully resolved config (``config.yaml``, a checkpoint's ``config``), also one written
    before components owned their sections: such a dump lists every key of the old flat ``model`` and
    ``weighting`` sections whatever the component. The keys the chosen component does not declare are
    dropped, and FCOS's old ``anchor_sizes`` become its ``regression_ranges`` (the boundaries, sizes[1:]).
    """
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for (key,), (table, field, default) in ((p, t) for p, t in SWITCHED.items() if len(p) == 1):
        section = data.get(key)
        if not isinstance(section, dict) or section.get(field, default) not in table:
            continue
        declared = table[section.get(field, default)].model_fields
        if key == "model" and section.get("name") == "fcos" and "anchor_sizes" in section:
            section.setdefault("regression_ranges", list(section["anchor_sizes"])[1:])
        data[key] = {k: v for k, v in section.items() if k in declared}
    if overrides:  # after the clean-up, so that a mistyped override is still an error
        data = merge_dicts(data, parse_overrides(overrides))
        source = f"{source} (with overrides)"
    return config_from_dict(data, source)


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
    except yaml.constructor.ConstructorError as exc:
        # a tag safe_load has no constructor for (!!python/object..., !Custom): never constructed
        found = re.search(r"tag '([^']*)'", str(exc.problem))
        tag = found.group(1).replace("tag:yaml.org,2002:", "!!") if found else str(exc.problem)
        where = f" (line {exc.problem_mark.line + 1})" if exc.problem_mark is not None else ""
        raise ConfigError(
            f"{path}: unsupported YAML tag {tag}{where}: "
            "configs hold plain mappings, lists and scalars"
        ) from None
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


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, *, layers: list[list[str]] | None = None
) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply dotted overrides.

    ``layers``: further override lists laid on top one after the other, as a child file is laid over its
    ``_base_``: a layer that switches a component drops the earlier layers' keys the new component does not
    declare (a sweep's common ``weighting.interval`` for the cell that switches to ``weighting.name=equal``).
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        data = _read_yaml(Path(path))
    for layer in [overrides or [], *(layers or [])]:
        if layer:
            data = merge_dicts(data, parse_overrides(layer))
            source = source if source.endswith("(with overrides)") else f"{source} (with overrides)"
    return config_from_dict(data, source)


def config_to_yaml(cfg: Config) -> str:
    """The resolved config, every default written out, as a run directory stores it."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


__all__ = [
    "SWITCHED_KEYS",
    "AugmentConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DatasetSource",
    "LossConfig",
    "ModelConfig",
    "SyntheticConfig",
    "WeightingConfig",
    "config_from_dict",
    "config_from_stored",
    "config_to_yaml",
    "flatten",
    "load_config",
    "parse_overrides",
    "read_settings",
    "trains_alike",
]

