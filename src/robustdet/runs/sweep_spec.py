"""A sweep's spec and its cells: a base config, overrides for every cell, seeds, and axes.

Each axis has levels, and each level a label and the dotted overrides it sets
(``method: {avw: {loss.bayesian: false, weighting.name: avw}}``, or ``weighting.interval: [50, 100]`` for
one key), from a sweep file or the command line (``--grid KEY=V1,V2``, ``--seeds``). A cell is one point of
the product with one seed, its config loaded and validated, and its folder name
``<axis>=<label>__...__seed=<s>``. A sweep file may also hold how its cells are submitted to SLURM
(``slurm:``, ``runs/submit.py``). See docs/experiments.md.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from robustdet.config import Config, load_config
from robustdet.errors import ConfigError
from robustdet.runs.settings import value_text, yaml_inline

SWEEP_KEYS = ("config", "overrides", "seeds", "grid", "slurm")


@dataclass
class Axis:
    name: str
    levels: list[tuple[str, dict[str, Any]]]  # (label, dotted key -> value)

    @property
    def keys(self) -> list[str]:
        return list(dict.fromkeys(k for _, o in self.levels for k in o))


@dataclass
class SweepSpec:
    config: Path
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted key -> value, for every cell
    seeds: list[int] | None = None  # None: the config's own seed
    axes: list[Axis] = field(default_factory=list)
    source: str = "sweep"
    slurm: dict[str, Any] = field(default_factory=dict)  # the sweep file's ``slurm:`` (runs/submit.py reads it)


@dataclass
class Cell:
    name: str
    labels: dict[str, str]
    seed: int
    overrides: list[str]  # KEY=VALUE, as ``robustdet train`` would take them
    cfg: Config


# --------------------------------------------------------------------------------------------- the spec
def override_text(key: str, value: Any) -> str:
    """``key=value`` with the value written so that ``parse_overrides`` (YAML) reads back the same value."""
    return f"{key}={yaml_inline(value)}"


def split_values(text: str) -> list[str]:
    """``"a,[1, 2],{x: 1}"`` -> ``["a", "[1, 2]", "{x: 1}"]``: commas inside brackets do not split."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts]


def parse_grid_arg(text: str) -> Axis:
    """``--grid KEY=V1,V2``: one axis named KEY, its values parsed as YAML scalars like override values."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")) or not raw.strip():
        raise ConfigError(f"--grid {text!r} is not of the form KEY=V1,V2 (e.g. weighting.name=avw,rlo)")
    levels = []
    for item in split_values(raw):
        if not item:
            raise ConfigError(f"--grid {text!r}: an empty value")
        try:
            value = yaml.safe_load(item)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--grid {text!r}: {item!r} is not valid YAML ({exc})") from None
        levels.append((item, {key: value}))
    return Axis(key, levels)


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2``."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: not a comma-separated list of integers (e.g. 0,1,2)") from None
    if not seeds:
        raise ConfigError(f"--seeds {text!r}: no seeds")
    return seeds


def is_sweep_file(path: str | Path) -> bool:
    """A sweep file has a ``grid`` or ``config`` key; a run config never does (unknown keys are errors)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and ("grid" in data or "config" in data)


def _dotted_mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise ConfigError(f"{where}: must be a mapping of dotted keys to values (e.g. {{weighting.name: avw}})")
    return dict(value)


def _axes(grid: dict[Any, Any], path: Path) -> list[Axis]:
    axes = []
    for name, levels in grid.items():
        where = f"{path}: grid.{name}"
        if isinstance(levels, list):
            if not levels:
                raise ConfigError(f"{where}: no values")
            axes.append(Axis(str(name), [(value_text(v), {str(name): v}) for v in levels]))
        elif isinstance(levels, dict) and levels:
            mapped = [(str(lab), _dotted_mapping(o, f"{where}.{lab}")) for lab, o in levels.items()]
            axes.append(Axis(str(name), mapped))
        else:
            raise ConfigError(
                f"{where}: must be a list of values of the key {name!r}, or a mapping of labels to dotted overrides"
            )
    return axes


def load_sweep_file(path: str | Path) -> SweepSpec:
    """Read a sweep YAML: ``{config, overrides, seeds, grid, slurm}``; ``config`` is relative to the sweep file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the sweep file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with {', '.join(SWEEP_KEYS)}")
    unknown = [k for k in data if k not in SWEEP_KEYS]
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}: unknown key (a sweep file holds {', '.join(SWEEP_KEYS)})")
    if not isinstance(data.get("config"), str):
        raise ConfigError(f"{path}: config: missing or not a path (the run config every cell starts from)")
    config = path.parent / data["config"]
    if not config.is_file():
        raise ConfigError(f"{path}: config: {config} does not exist (the path is relative to the sweep file)")
    seeds = data.get("seeds")
    if seeds is not None:
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            seeds = [seeds]
        if not isinstance(seeds, list) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in seeds
        ):
            raise ConfigError(f"{path}: seeds: must be a list of integers (e.g. [0, 1, 2])")
    grid = data.get("grid") or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"{path}: grid: must map each axis to its levels")
    slurm = data.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise ConfigError(f"{path}: slurm: must be a mapping of submitit options (e.g. {{partition: gpu}})")
    return SweepSpec(
        config=config,
        overrides=_dotted_mapping(data.get("overrides"), f"{path}: overrides"),
        seeds=seeds,
        axes=_axes(grid, path),
        source=str(path),
        slurm=slurm,
    )


def spec_from_args(config: str, overrides: list[str], grid: list[str], seeds: str | None) -> SweepSpec:
    """``robustdet sweep CONFIG [KEY=VALUE ...] --grid KEY=V1,V2 ... --seeds 0,1,2``: CONFIG is a run config
    or a sweep file; the command line's overrides, axes and seeds go on top of a sweep file's."""
    spec = load_sweep_file(config) if is_sweep_file(config) else SweepSpec(config=Path(config))
    if not spec.config.is_file():
        raise FileNotFoundError(f"{spec.config}: no such config file")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form KEY=VALUE (e.g. train.max_iter=200)")
        try:
            spec.overrides[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from None
    spec.axes += [parse_grid_arg(g) for g in grid]
    if seeds is not None:
        spec.seeds = parse_seeds(seeds)
    return spec


# -------------------------------------------------------------------------------------------- the cells
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


def safe_name(text: str) -> str:
    """``text`` as one path component: runs of other characters than ``A-Za-z0-9._+=-`` become ``_``."""
    return _UNSAFE.sub("_", text).strip("._") or "_"


def _check_keys(spec: SweepSpec) -> None:
    owner: dict[str, str] = {}
    for axis in spec.axes:
        if axis.name == "seed":
            raise ConfigError(f"{spec.source}: grid axis 'seed': the seeds are their own list (seeds / --seeds)")
        for key in axis.keys:
            if key == "seed":
                raise ConfigError(f"{spec.source}: grid.{axis.name} sets 'seed'; give the seeds as seeds / --seeds")
            if key in owner:
                raise ConfigError(f"{spec.source}: grid axes {owner[key]!r} and {axis.name!r} both set {key}")
            owner[key] = axis.name
    if spec.seeds is not None and "seed" in spec.overrides:
        raise ConfigError(f"{spec.source}: overrides set 'seed' and seeds are given too; keep one")


def build_cells(spec: SweepSpec) -> list[Cell]:
    """Every cell of the product, seeds outermost (a sweep cut short has every setting for its first seeds),
    each config loaded and validated now, so that a bad cell stops the sweep before anything trains."""
    _check_keys(spec)
    base = [override_text(k, v) for k, v in spec.overrides.items()]
    seeds: list[int | None] = list(spec.seeds) if spec.seeds is not None else [None]
    cells: list[Cell] = []
    names: dict[str, dict[str, str]] = {}
    for seed in seeds:
        for levels in itertools.product(*(axis.levels for axis in spec.axes)):
            labels = {axis.name: lab for axis, (lab, _) in zip(spec.axes, levels, strict=True)}
            cell = [override_text(k, v) for _, o in levels for k, v in o.items()]
            if seed is not None:
                cell.append(f"seed={seed}")
            overrides = base + cell
            try:
                # the cell's own keys over the common ones: a cell that switches the weighting drops the
                # common keys the new one does not take (config.merge_dicts)
                cfg = load_config(spec.config, base, layers=[cell])
            except ConfigError as exc:
                where = " ".join(f"{k}={v}" for k, v in labels.items()) or "the cell"
                raise ConfigError(f"cell {where}: {exc}") from None
            parts = [*(f"{a}={lab}" for a, lab in labels.items()), f"seed={cfg.seed}"]
            name = "__".join(safe_name(p) for p in parts)
            if name in names:
                raise ConfigError(
                    f"{spec.source}: the cells {names[name]} and {labels} get the same folder name {name!r} "
                    "(labels that differ only in characters a folder name cannot hold)"
                )
            names[name] = labels
            cells.append(Cell(name=name, labels=labels, seed=cfg.seed, overrides=overrides, cfg=cfg))
    return cells


def select_cells(cells: list[Cell], spec: SweepSpec, only: list[str]) -> list[Cell]:
    """``--only AXIS=L1,L2`` (repeatable): the cells whose label on each named axis is one of those given.

    The other cells keep their place in the sweep (``summary.csv`` lists every finished cell), so a subset
    run first and the whole sweep later train each cell once.
    """
    wanted: dict[str, set[str]] = {}
    axes = {a.name: [lab for lab, _ in a.levels] for a in spec.axes}
    for item in only:
        name, sep, raw = item.partition("=")
        if not sep or name not in axes:
            raise ConfigError(f"--only {item!r}: not AXIS=LABEL[,LABEL] with an axis of the sweep ({', '.join(axes)})")
        labels = split_values(raw)
        unknown = [lab for lab in labels if lab not in axes[name]]
        if unknown:
            raise ConfigError(f"--only {item!r}: {unknown[0]!r} is not a level of {name} ({', '.join(axes[name])})")
        wanted.setdefault(name, set()).update(labels)
    return [c for c in cells if all(c.labels[k] in v for k, v in wanted.items())]


def grid_keys(spec: SweepSpec) -> list[str]:
    return list(dict.fromkeys(k for axis in spec.axes for k in axis.keys))


__all__ = [
    "SWEEP_KEYS",
    "Axis",
    "Cell",
    "SweepSpec",
    "build_cells",
    "grid_keys",
    "load_sweep_file",
    "override_text",
    "parse_grid_arg",
    "parse_seeds",
    "safe_name",
    "select_cells",
    "spec_from_args",
    "split_values",
]
