"""Anchors: a base size per pyramid level, times octave scales and aspect ratios (torchvision's generator)."""

from __future__ import annotations

from collections.abc import Sequence

from torchvision.models.detection.anchor_utils import AnchorGenerator


def build_anchor_generator(
    sizes: Sequence[float], scales: Sequence[float], aspect_ratios: Sequence[float]
) -> AnchorGenerator:
    """Level i gets sizes ``sizes[i] * scales`` at every aspect ratio: len(scales) · len(ratios) per location.

    Unlike torchvision's ``_default_anchorgen`` the scaled sizes are not truncated to integers
    (32 · 2^(1/3) stays 40.32, not 40), as in the RetinaNet paper and detectron2.
    """
    if not sizes or not scales or not aspect_ratios:
        raise ValueError("model.anchor_sizes, model.anchor_scales and model.aspect_ratios must not be empty")
    per_level = tuple(tuple(float(s) * float(k) for k in scales) for s in sizes)
    return AnchorGenerator(per_level, (tuple(float(r) for r in aspect_ratios),) * len(sizes))


__all__ = ["build_anchor_generator"]
