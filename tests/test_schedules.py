"""Schedules as people state them (epochs, a learning rate for a reference batch), and the ``train`` CLI
around them: overrides anywhere on the line, ``--resume`` on a first launch, the start summary, and plain
progress lines in a batch job."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from robustdet.cli import main
from robustdet.config import load_config
from robustdet.engine.checkpoint import load_checkpoint
from robustdet.engine.plan import make_plan
from robustdet.engine.schedule import lr_factor
from robustdet.errors import ConfigError
from tests.conftest import REPO, tiny_overrides

CONFIG = str(REPO / "configs" / "default.yaml")


# ------------------------------------------------------------------------------------ the conversion
@pytest.mark.parametrize(
    ("epochs", "images", "batch", "world", "expected"),
    [(1, 24, 2, 1, 12), (0.5, 24, 2, 2, 3), (12, 117266, 2, 4, 175899), (1, 7, 2, 2, 2), (0.1, 10, 4, 1, 1)],
)
def test_max_epochs_become_ceil_of_images_over_total_batch(epochs, images, batch, world, expected) -> None:
    cfg = load_config(None, ["train.max_iter=null", f"train.max_epochs={epochs}", f"train.batch_size={batch}"])
    plan = make_plan(cfg, images, world)
    assert plan.max_iter == expected == math.ceil(epochs * images / (batch * world) - 1e-9)
    assert plan.total_batch == batch * world


def test_steps_and_warmup_in_epochs_match_the_same_schedule_in_iterations() -> None:
    """100 images, batch 5 x 2 ranks: 10 iterations per epoch, so epochs [3, 4.5] are iterations [30, 45]."""
    by_epochs = load_config(
        None,
        [
            "train.max_iter=null", "train.max_epochs=5", "train.batch_size=5", "train.schedule.name=step",
            "train.schedule.warmup_iters=null", "train.schedule.warmup_epochs=0.5",
            "train.schedule.step_epochs=[3, 4.5]",
        ],
    )  # fmt: skip
    by_iters = load_config(
        None,
        [
            "train.max_iter=50", "train.batch_size=5", "train.schedule.name=step",
            "train.schedule.warmup_iters=5", "train.schedule.steps=[30, 45]",
        ],
    )  # fmt: skip
    a, b = make_plan(by_epochs, 100, 2), make_plan(by_iters, 100, 2)
    assert a.max_iter == b.max_iter == 50
    assert a.schedule.steps == [30, 45] and a.schedule.warmup_iters == 5
    assert [lr_factor(i, a.schedule, a.max_iter) for i in range(50)] == [
        lr_factor(i, by_iters.train.schedule, 50) for i in range(50)
    ]
    line = "\n".join(a.lines(by_epochs, 2))
    assert "10 iterations per epoch" in line and "50 iterations for 5 epochs" in line
    assert "warm-up 0.5 epochs -> 5 iterations" in line and "steps at epochs [3, 4.5] -> iterations [30, 45]" in line
    assert b.lines(by_iters, 2) == []  # nothing converted, nothing printed


def test_lr_scales_linearly_only_with_a_reference_batch() -> None:
    base = ["train.optimizer.lr=0.01", "train.batch_size=2", "train.optimizer.log_var_lr=0.002"]
    plain = make_plan(load_config(None, base), 100, 4)
    assert (plain.lr, plain.log_var_lr, plain.lr_scale) == (0.01, 0.002, 1.0)  # existing configs: unchanged
    cfg = load_config(None, [*base, "train.optimizer.reference_batch_size=16"])
    scaled = make_plan(cfg, 100, 4)
    assert scaled.lr == pytest.approx(0.01 * 8 / 16) and scaled.log_var_lr == pytest.approx(0.002 * 8 / 16)
    assert scaled.lines(cfg, 4) == ["lr 0.01 for batch 16 -> 0.005 for batch 2 x 4 ranks"]
    off_cfg = load_config(None, [*base, "train.optimizer.reference_batch_size=16", "train.scale_lr=false"])
    off = make_plan(off_cfg, 100, 4)
    assert off.lr == 0.01 and off.lr_scale == 1.0


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["train.max_epochs=2"], "give one of train.max_iter and train.max_epochs"),
        (["train.schedule.warmup_epochs=1"], "give one of train.schedule.warmup_iters and warmup_epochs"),
        (["train.schedule.steps=[10]", "train.schedule.step_epochs=[1]"], "steps and step_epochs"),
        (["checkpoint.best_metric=mAP"], "checkpoint.best_metric"),
    ],
)
def test_conflicting_schedule_keys_are_config_errors(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(CONFIG, overrides)


def test_step_epochs_past_the_run_are_an_error_at_setup() -> None:
    cfg = load_config(None, ["train.max_iter=null", "train.max_epochs=2", "train.schedule.step_epochs=[2.5]"])
    with pytest.raises(ConfigError, match=r"step_epochs \[2.5\] fall outside the run's \(0, 10\) iterations"):
        make_plan(cfg, 20, 2)


# ------------------------------------------------------------------------------------- end to end
def test_train_in_epochs_with_scaled_lr_from_a_job_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What a batch job types: overrides after --out, --resume on its first launch, stdout not a terminal."""
    out = tmp_path / "run"
    extra = {
        "train.max_iter": "null", "train.max_epochs": 0.25, "train.schedule.warmup_iters": 2,
        "train.optimizer.reference_batch_size": 8, "log.progress": "true", "log.period": 2,
        "log.tensorboard": "false", "checkpoint.period": 0, "eval.max_images": 3,
    }  # fmt: skip
    argv = ["train", CONFIG, "--out", str(out), "--resume", *tiny_overrides(tmp_path, extra)]
    capsys.readouterr()
    assert main(argv) == 0
    cap = capsys.readouterr()
    text = cap.out + cap.err
    # 24 images, batch 2 x 1 rank: 0.25 epochs = 3 iterations; lr 0.0005 for batch 8 -> 0.000125 for batch 2
    assert f"--resume: no checkpoint in {out / 'checkpoints'} yet; starting a new run" in cap.out
    assert "3 iterations for 0.25 epochs" in cap.out
    assert "lr 0.0005 for batch 8 -> 0.000125 for batch 2 x 1 ranks" in cap.out
    for fragment in (
        "device cpu x 1 process(es), 1 threads each",
        "detector retinanet, backbone tiny:",
        "24 train images with",
        "6 val images, 5 classes",
        "schedule: 3 iterations (0.25 epochs), batch 2 x 1 = 2, lr 0.000125 (scaled x0.25)",
        "methods: loss.bayesian, weighting rlo",
        f"run directory: {out}",
    ):
        assert fragment in cap.out, fragment
    assert "\r" not in text  # no progress bar in a log file
    plain = [line for line in cap.out.splitlines() if line.startswith("iter ")]
    assert [line.split()[1] for line in plain] == ["2/3", "3/3"]  # every log.period and at the end
    assert all("eta " in line and " loss " in line and " lr " in line for line in plain)

    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    cfg = load_config(CONFIG, tiny_overrides(tmp_path, extra))
    plan = make_plan(cfg, 24, 1)
    assert [r["iter"] for r in log] == [2, 3]
    for r in log:  # the lr the optimizer ran: the scaled lr times the schedule's factor
        assert r["lr"] == pytest.approx(0.000125 * lr_factor(r["iter"] - 1, plan.schedule, 3), rel=1e-12)
    assert load_checkpoint(out / "checkpoints" / "last.pt")["iteration"] == 3

    # eval takes overrides after its options too; an unknown option is still an error
    metrics = tmp_path / "metrics.json"
    assert main(["eval", str(out / "checkpoints" / "last.pt"), "--out", str(metrics), "eval.max_images=2"]) == 0
    assert json.loads(metrics.read_text())["iter"] == 3
    with pytest.raises(SystemExit) as exc:
        main(["train", CONFIG, "--out", str(out), "train.max_iter=2", "--bogus"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_sweep_dry_run_lists_cells_in_epochs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["sweep", CONFIG, "--grid", "weighting.name=equal,avw", "--out", str(tmp_path / "sw"), "--dry-run"]
    assert main([*argv, "train.max_iter=null", "train.max_epochs=2"]) == 0
    out = capsys.readouterr().out
    cells = [line for line in out.splitlines() if line.strip().endswith("[new]")]
    assert len(cells) == 2 and all("       2 epochs  [new]" in line for line in cells)
    assert "0 iterations in all" in out and "(cells in epochs not counted)" in out
