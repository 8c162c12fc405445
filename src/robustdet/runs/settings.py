"""Which settings of a run's config make its result: the flattened config that ``compare`` groups runs by
and that a sweep checks a cell folder against, and how a config value is written on one line."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml

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


# Settings read only when a switch is on: with the switch off (or absent) they cannot change a result, so a
# changed default of theirs does not make earlier runs "another config" (switch -> the keys it owns).
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


def matches(key: str, patterns: Iterable[str]) -> bool:
    """``patterns`` hold exact keys, and prefixes ending with a dot (a whole section)."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) or key.startswith(p + ".") for p in patterns)


def result_config(config: dict[str, Any]) -> dict[str, Any]:
    """The flattened config without ``seed``, the settings in IGNORED_KEYS and those of a switch that is off
    (SWITCHED_KEYS)."""
    flat = flatten(config)
    unread = [k for switch, keys in SWITCHED_KEYS.items() if not flat.get(switch) for k in keys]
    return {k: v for k, v in flat.items() if k != "seed" and not matches(k, IGNORED_KEYS) and k not in unread}


def yaml_inline(value: Any) -> str:
    """``value`` as one line of YAML that reads back as the same value (``'20'`` for the string 20)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip().removesuffix("...").strip()


def value_text(value: Any) -> str:
    """A config value as a label shows it: ``true``, ``avw``, ``[8, 16]`` (strings unquoted)."""
    return value if isinstance(value, str) else yaml_inline(value)


__all__ = ["IGNORED_KEYS", "SWITCHED_KEYS", "flatten", "matches", "result_config", "value_text", "yaml_inline"]
