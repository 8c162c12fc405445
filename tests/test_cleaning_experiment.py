"""Issue 18 §3's experiment scripts (experiments/cleaning/): valid bash, and the fix-precision count of
summarize.py on hand-made boxes."""

from __future__ import annotations

import importlib.util
import subprocess

from tests.conftest import REPO

E = REPO / "experiments" / "cleaning"


def load_summarize():
    spec = importlib.util.spec_from_file_location("cleaning_summarize", E / "summarize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_sh_is_valid_bash_and_refuses_an_unknown_kind(tmp_path):
    subprocess.run(["bash", "-n", str(E / "run.sh")], check=True)
    out = subprocess.run(["bash", str(E / "run.sh"), "spurious", "40", "0", str(tmp_path)], capture_output=True,
                         text=True)
    assert out.returncode == 2 and "KIND must be flip, jitter or drop" in out.stderr
    assert not any(tmp_path.iterdir())


def test_added_boxes_count_once_per_dropped_box_of_their_image_and_class():
    s = load_summarize()
    dropped = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
               {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 10, 10]}]
    added = [
        {"image_id": 1, "category_id": 1, "bbox": [11, 11, 20, 20]},   # IoU 0.82 with box 1: right
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},   # box 1 again: counted once
        {"image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10]},   # box 2's place, another class
        {"image_id": 2, "category_id": 2, "bbox": [50, 50, 10, 10]},   # another image
        {"image_id": 1, "category_id": 2, "bbox": [55, 50, 10, 10]},   # IoU 1/3 with box 2: too far
    ]
    assert s.matched_drops(added, dropped) == 1
    assert s.matched_drops([*added, {"image_id": 1, "category_id": 2, "bbox": [51, 50, 10, 10]}], dropped) == 2
