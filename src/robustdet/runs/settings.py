"""Which settings of a run's config make its result: the flattened config that ``compare`` groups runs by
and that a sweep checks a cell folder against, and how a config value is written on one line."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml

from robustdet.config import SWITCHED_KEYS, flatten, read_settings

# Settings that cannot change what a run learns or scores (data order does not depend on the worker count,
# evaluation saves and restores the random streams, docs/robustness.md): runs that differ only here are
# the same experiment.
IGNORED_KEYS: tuple[str, ...] = (
    "log.",
    "checkpoint.",
    "data.num_workers",
    "data.synthetic.cache_dir",
    "data.verify_images",
    "train.num_threads",
    "train.dist_timeout_s",
    "eval.period",
)


def matches(key: str, patterns: Iterable[str]) -> bool:
    """``patterns`` hold exact keys, and prefixes ending with a dot (a whole section)."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) or key.startswith(p + ".") for p in patterns)


def result_config(config: dict[str, Any]) -> dict[str, Any]:
    """The flattened config without ``seed``, the settings in IGNORED_KEYS and those of a switch that is off
    (SWITCHED_KEYS)."""
    return {k: v for k, v in read_settings(config).items() if k != "seed" and not matches(k, IGNORED_KEYS)}


def yaml_inline(value: Any) -> str:
    """``value`` as one line of YAML that reads back as the same value (``'20'`` for the string 20)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip().removesuffix("...").strip()


def value_text(value: Any) -> str:
    """A config value as a label shows it: ``true``, ``avw``, ``[8, 16]`` (strings unquoted)."""
    return value if isinstance(value, str) else yaml_inline(value)


__all__ = ["IGNORED_KEYS", "SWITCHED_KEYS", "flatten", "matches", "result_config", "value_text", "yaml_inline"]
