"""The base of every configuration section, and the error a bad configuration raises.

Each component (a detector, a weighting, a dataset format, the losses) declares its own section next to
its code; ``robustdet.config`` only assembles them. Sections forbid unknown keys, so a key that a
component does not use is an error naming the key and the component instead of a silently ignored setting.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """A configuration section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def tagged_union(sections: Iterable[type[Section]], key: str) -> Any:
    """The pydantic union of ``sections`` keyed on their ``key`` field (a discriminated union), built from
    a table of components at import time; pydantic then validates a mapping against the member its
    ``key`` names and reports a wrong key against that member."""
    members = tuple(sections)
    return Annotated[Union[members], Field(discriminator=key)]  # noqa: UP007 - a runtime tuple of members


__all__ = ["Section", "tagged_union"]
