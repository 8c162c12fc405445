"""What the loop says when the numbers go wrong: which losses are non-finite, and which log-variances left
``loss.log_var_range``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from robustdet import distributed as dist
from robustdet.engine.run_log import RunLog
from robustdet.models import Detector, DetectorLosses


def nonfinite_report(it: int, out: DetectorLosses, detector: Detector, image_ids: list[int]) -> str:
    """One line naming every non-finite loss (per level and component), log-variance and the images.

    Collective: every rank takes this path together (the decision was all-reduced), so each rank's
    line is gathered into one."""
    names = detector.level_names
    bad = [
        f"{name}={v:.4g}"
        for name, v in zip(names, out.level_losses.detach().float().tolist(), strict=True)
        if not math.isfinite(v)
    ]
    for name, comp in out.components.items():
        for lvl, v in zip(names, comp.float().tolist(), strict=True):
            if not math.isfinite(v):
                bad.append(f"{name}[{lvl}]={v:.4g}")
    for name, comp in out.extra_components.items():  # losses outside the weighting (Faster R-CNN's RPN)
        values = comp.detach().float().flatten().tolist()
        if not all(math.isfinite(v) for v in values):
            bad.append(f"{name}={values[0] if len(values) == 1 else values}")
    if not bad and not math.isfinite(float(out.extra_loss)):
        bad.append(f"extra_loss={float(out.extra_loss):.4g}")
    lv = detector.log_variances
    if lv is not None:
        bad += [f"log_var_{k}={v:.4g}" for k, v in lv.as_dict().items() if not math.isfinite(v)]
    what = ", ".join(bad) or "gradient"
    local = f"non-finite {what} (images {image_ids})"
    parts = dist.gather_objects(local)
    if len(parts) > 1:
        local = "; ".join(f"rank {r}: {m}" for r, m in enumerate(parts))
    return f"iteration {it + 1}: {local}"


class LogVarRangeWatch:
    """Log-variances outside ``loss.log_var_range``: in every logged record, and once (each time the set
    of them grows) as an event and a warning."""

    def __init__(self) -> None:
        self.outside: set[str] = set()

    def fields(self, done: int, detector: Detector, log: RunLog, warn: Callable[[str], None]) -> dict[str, Any]:
        """``{"log_var_out_of_range": {task: s}}`` for the record, or {} when all are inside."""
        lv = detector.log_variances
        if lv is None:
            return {}
        out_of_range = lv.out_of_range()
        if set(out_of_range) - self.outside:
            assert lv.log_var_range is not None
            low, high = lv.log_var_range
            text = ", ".join(f"log_var_{k}={v:.4g}" for k, v in out_of_range.items())
            log.event({"iter": done, "event": "log_var_out_of_range", "log_vars": out_of_range})
            warn(
                f"iteration {done}: {text} outside loss.log_var_range [{low:g}, {high:g}]; the loss uses "
                "the clamped value, which gets no gradient there"
            )
        self.outside = set(out_of_range)
        return {"log_var_out_of_range": out_of_range} if out_of_range else {}
