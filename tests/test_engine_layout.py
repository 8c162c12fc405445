"""Using a checkpoint (eval, predict, export) does not load the training loop (engine/runtime.py holds what
both need), and the trainer holds no test hook."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import REPO


def test_inference_and_export_do_not_import_the_trainer() -> None:
    code = (
        "import sys, robustdet.engine.inference, robustdet.engine.export\n"
        "print(sorted(m for m in sys.modules if m.startswith('robustdet.engine')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    loaded = ast.literal_eval(out)
    assert "robustdet.engine.runtime" in loaded and "robustdet.engine.inference" in loaded
    assert "robustdet.engine.trainer" not in loaded


def test_the_trainer_reads_no_test_environment_variable() -> None:
    text = (REPO / "src" / "robustdet" / "engine" / "trainer.py").read_text()
    assert "ROBUSTDET_TEST" not in text and "os.environ" not in text
