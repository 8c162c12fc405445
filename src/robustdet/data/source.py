"""The base of the dataset-format sections (``data.train`` / ``data.val``), keyed on ``format``.

Each format declares its section next to its loader (``coco.py``, ``yolo.py``, ``voc.py``,
``synthetic.py``): the keys it reads and a ``load`` that returns the split as a COCO dict plus the image
root. ``data/config.py`` holds the one table of formats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import model_validator

from robustdet.data.noise import LabelNoiseConfig
from robustdet.section import Section


class SourceSection(Section):
    """One split of a dataset in one format. ``split`` names the part of the dataset to read (a YOLO
    data.yaml key, a VOC ImageSets/Main list, synthetic train/val); None means train or val."""

    format: str
    split: str | None = None
    # synthetic label noise, applied once when the training dataset is built (robustdet.data.noise)
    label_noise: LabelNoiseConfig | None = None
    # read every image's header before training (``data.verify_images``) for this format
    verify_headers: ClassVar[bool] = False

    def load(self, split: str, cache_dir: str | Path | None = None) -> tuple[dict[str, Any], Path]:
        """The split as a validated COCO dict, and the folder its ``file_name``s are relative to;
        ``cache_dir``: where a loader that reads image headers caches them (data/headers.py). Everything
        else a format reads is in its own section (the synthetic one's settings: ``SyntheticSource``)."""
        raise NotImplementedError

    def describe(self, split: str) -> str:
        """How messages name this source."""
        return f"{self.format} {split}"


class FileSource(SourceSection):
    """A source read from files: ``path`` (required) and an optional ``image_root``."""

    path: str | None = None
    image_root: str | None = None

    @model_validator(mode="after")
    def _needs_path(self) -> FileSource:
        if not self.path:
            raise ValueError(f"a {self.format} dataset needs 'path'")
        return self

    def describe(self, split: str) -> str:
        return str(self.path)


__all__ = ["FileSource", "SourceSection"]
