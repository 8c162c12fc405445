"""The ``data`` section: the train and val sources (one section per format), augmentation, input policies.

``FORMATS`` is the one table of dataset formats: ``format`` → section class. A section reads its own
keys and loads its split (``SourceSection.load``), so a new format is one new file plus one row here
(docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, TypeAdapter, model_validator

from robustdet.data.coco import CocoSource
from robustdet.data.merge import SEPARATOR, as_sources, merge_coco
from robustdet.data.source import SourceSection
from robustdet.data.synthetic import SyntheticConfig, SyntheticSource
from robustdet.data.voc import VocSource
from robustdet.data.yolo import YoloSource
from robustdet.section import Section, tagged_union

FORMATS: dict[str, type[SourceSection]] = {
    "synthetic": SyntheticSource,
    "coco": CocoSource,
    "yolo": YoloSource,
    "voc": VocSource,
}

# pydantic picks the section by ``format`` and reports a wrong key against that format's section
DatasetSource = tagged_union(FORMATS.values(), "format")
_SOURCE = TypeAdapter(DatasetSource)

# ``data.train`` / ``data.val``: one source, or a list merged into one split (data/merge.py). The callable
# discriminator keeps pydantic from reporting a bad mapping against the list member too; its tags
# ("source", "sources") are left out of error messages by config._format_errors.
DatasetSources = Annotated[
    Union[Annotated[DatasetSource, Tag("source")], Annotated[list[DatasetSource], Tag("sources")]],  # noqa: UP007
    Discriminator(lambda value: "sources" if isinstance(value, list) else "source"),
]


def parse_source(data: dict[str, Any]) -> SourceSection:
    """A source section from a mapping such as ``{"format": "yolo", "path": "data.yaml", "split": "val"}``."""
    return _SOURCE.validate_python({"format": "synthetic", **data})


class AugmentConfig(Section):
    hflip: bool = True
    photometric: bool = False
    # random zoom-out / crop (scale jitter) as a fraction range; None disables it
    scale_range: tuple[float, float] | None = None


class DataConfig(Section):
    train: DatasetSources = Field(default_factory=lambda: SyntheticSource(split="train"))
    val: DatasetSources = Field(default_factory=lambda: SyntheticSource(split="val"))
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
    # Batches of images of one orientation only (w >= h, or w < h), as torchvision's GroupedBatchSampler
    # and detectron2's AspectRatioGroupedDataset: less padding per batch; the (seed, iteration) data order
    # and exact resume stay (data/loader.py, AspectRatioBatchSampler).
    group_aspect_ratio: bool = False

    @model_validator(mode="before")
    @classmethod
    def _default_format(cls, data: Any) -> Any:
        """A source without ``format`` is the default synthetic one (as ``parse_source``), so that an
        override such as ``data.train.label_noise.drop=0.1`` over the defaults names its own key."""
        if isinstance(data, dict):
            data = dict(data)
            for key in ("train", "val"):
                value = data.get(key)
                if isinstance(value, dict) and "format" not in value:
                    data[key] = {"format": "synthetic", **value}
        return data

    @model_validator(mode="after")
    def _check_noise(self) -> DataConfig:
        if any(s.label_noise is not None for s in as_sources(self.val)):
            raise ValueError("data.val.label_noise: the validation split is never noised (use data.train.label_noise)")
        for key in ("train", "val"):
            sources = as_sources(getattr(self, key))
            if not sources:
                raise ValueError(f"data.{key}: an empty list of sources (give one source, or a list of several)")
            if any(s.label_noise != sources[0].label_noise for s in sources):
                raise ValueError(
                    f"data.{key}: the sources of a list must give the same label_noise (or none): it is applied "
                    "once, to the merged split"
                )
        return self

    def bind(self, source: SourceSection) -> SourceSection:
        """``source`` with what this section holds for it: the synthetic source's ``data.synthetic``."""
        return source.with_settings(self.synthetic) if isinstance(source, SyntheticSource) else source


def load_sources(
    sources: Sequence[SourceSection], data_cfg: DataConfig, train: bool, cache_dir: str | Path | None = None
) -> tuple[dict[str, Any], Path, str]:
    """The split the sources make together: its COCO dict, image root, and name (for messages).

    One source is loaded as it is; several are loaded one by one and merged (``merge.merge_coco``).
    """
    loaded = []
    for source in sources:
        split = source.split or ("train" if train else "val")
        data, root = data_cfg.bind(source).load(split, cache_dir)
        loaded.append((source.describe(split), data, root))
    if len(loaded) == 1:
        return loaded[0][1], loaded[0][2], loaded[0][0]
    data, root = merge_coco(loaded)
    return data, root, SEPARATOR.join(name for name, _, _ in loaded)


__all__ = [
    "FORMATS",
    "AugmentConfig",
    "DataConfig",
    "DatasetSource",
    "DatasetSources",
    "SyntheticConfig",
    "load_sources",
    "parse_source",
]
