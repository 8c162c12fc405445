"""Images that fail to decode mid-training: the dataset puts the next readable image in their place, the
loop records them here (``data.max_corrupt_images`` distinct ones at most, then the run stops)."""

from __future__ import annotations

from collections.abc import Callable

from robustdet import distributed as dist
from robustdet.engine.run_log import RunLog
from robustdet.errors import DatasetError


def note_corrupt(
    seen: list[str],
    skipped: list[tuple[str, str]],
    it: int,
    limit: int,
    log: RunLog,
    warn: Callable[[str], None],
    resume_text: str,
) -> None:
    """Add this step's replaced images (``skipped``: (path, reason), every rank's, gathered) to ``seen``,
    each as an event and a warning; raise past ``limit`` distinct ones. Collective (the all-reduced
    decision brings every rank here)."""
    reports = [r for part in dist.gather_objects(skipped) for r in part]
    for path, why in reports:
        if path not in seen:
            seen.append(path)
        count = len(seen)
        log.event({"iter": it + 1, "event": "corrupt_image_skipped", "image": path, "reason": why, "distinct": count})
        warn(
            f"iteration {it + 1}: skipped corrupt image {why}; the next readable image took its place "
            f"({count} distinct corrupt images, data.max_corrupt_images={limit})"
        )
    if len(seen) > limit:
        listed = ", ".join(seen[:10]) + (" ..." if len(seen) > 10 else "")
        raise DatasetError(
            f"iteration {it + 1}: {len(seen)} distinct training images failed to decode, "
            f"more than data.max_corrupt_images={limit}: {listed}; {resume_text}"
        )
