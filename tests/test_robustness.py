"""Never lose a run: SIGKILL / SIGTERM and --resume are bitwise exact, corrupt checkpoints fall back,
non-finite steps are skipped then stop the run, corrupt images mid-training are skipped, and a rank that
dies under torchrun stops the others instead of hanging (tests/test_multinode.py). See docs/robustness.md."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import robustdet.engine.trainer as trainer_mod
from robustdet.cli import main
from robustdet.engine.checkpoint import TEST_DELAY_ENV, load_checkpoint
from tests.conftest import REPO, same_state, tiny_overrides
from tests.test_bad_input import coco_overrides, make_coco, truncate, write_image

CONFIG = str(REPO / "configs" / "default.yaml")
# RLO with a short window, Bayesian losses (log-variances), a checkpoint every 2 iterations. ResNet-18, not
# tiny_overrides' tiny body: the kills land at random moments inside a run, which needs iterations that take
# a while (a tiny run is over before the kill), and the DDP runs here and in test_multinode.py need DDP's
# several gradient buckets (ResNet-18's 45 MB of gradients against the 25 MB bucket; the tiny body fits one).
RESUME: dict[str, object] = {
    "model.backbone": "resnet18",
    "train.max_iter": 10,
    "checkpoint.period": 2,
    "weighting.name": "rlo",
    "weighting.interval": 2,
    "loss.bayesian": "true",
    "log.tensorboard": "false",
}
# The tests that stop a run from inside this process or hand it bad data (Ctrl-C, a truncated last.pt,
# non-finite steps, corrupt images) need no slow iterations: RESUME on the tiny body, whose checkpoints are
# under 1 MB where ResNet-18's are 136 MB (weights + AdamW state), and whose runs take a second or two.
TINY: dict[str, object] = {"model.backbone": "tiny"}
# the other weightings' state through a resume (RESUME's own, RLO, goes through the SIGKILL and truncation
# tests): RESUME with the weighting switched (None drops RESUME's key). AVW and DWA take windows of 3, so
# that the checkpoints (every 2 iterations) fall inside a window too.
WEIGHTING_RESUME: dict[str, dict[str, object]] = {
    "equal": {"weighting.name": "equal", "weighting.interval": None},
    "avw": {"weighting.name": "avw", "weighting.interval": 3},
    "uw": {"weighting.name": "uw", "weighting.interval": None},
    "dwa": {"weighting.name": "dwa", "weighting.interval": 3},
}


# ------------------------------------------------------------------------------------------- helpers
def _records(path: Path, drop: tuple[str, ...] = ("time",)) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [{k: v for k, v in json.loads(x).items() if k not in drop} for x in path.read_text().splitlines() if x]


def assert_same_run(run: Path, ref: Path) -> None:
    """Final checkpoint (weights incl. log-variances, weighting state, optimizer, RNG, ...), logs, metrics."""
    a = load_checkpoint(ref / "checkpoints" / "last.pt")
    b = load_checkpoint(run / "checkpoints" / "last.pt")
    assert a.keys() == b.keys()
    for key in a:
        if key != "config":  # data.num_workers may differ between the pieces of a run
            assert same_state(a[key], b[key]), key
    assert any("log_variances" in k for k in b["model"])
    if "probabilities" in a["weighting"].get("_extra_state", {}):  # RLO
        assert b["weighting"]["_extra_state"]["probabilities"] == a["weighting"]["_extra_state"]["probabilities"]
    assert _records(run / "log.jsonl") == _records(ref / "log.jsonl")
    assert [r for r in _records(run / "events.jsonl") if r["event"] != "resumed"] == _records(ref / "events.jsonl")
    assert _records(run / "eval.jsonl") == _records(ref / "eval.jsonl")
    assert json.loads((run / "metrics.json").read_text()) == json.loads((ref / "metrics.json").read_text())
    assert not list((run / "checkpoints").glob(".*tmp*")), "temporary checkpoint files left behind"


def _argv(data: Path, out: Path, extra: dict[str, object] | None = None, *flags: str) -> list[str]:
    return ["train", CONFIG, *tiny_overrides(data, {**RESUME, **(extra or {})}), "--out", str(out), *flags]


def _spawn(
    data: Path, out: Path, extra: dict[str, object] | None = None, *flags: str, env: dict[str, str] | None = None
) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    stderr = open(out.parent / f"{out.name}.stderr.{time.monotonic_ns()}", "w")  # noqa: SIM115 - closed by the OS
    return subprocess.Popen(
        [sys.executable, "-m", "robustdet", *_argv(data, out, extra, *flags)],
        stdout=subprocess.DEVNULL, stderr=stderr, cwd=REPO, start_new_session=True,  # its own process group
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )  # fmt: skip


def _logged(out: Path) -> int:
    """The last iteration in log.jsonl (0 when none)."""
    try:
        lines = (out / "log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    done = 0
    for line in lines:
        with contextlib.suppress(ValueError, KeyError):  # a line being written
            done = max(done, int(json.loads(line)["iter"]))
    return done


def _wait(what: str, ready: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _kill(proc: subprocess.Popen) -> None:
    assert proc.poll() is None, "the run finished before the kill"
    os.killpg(proc.pid, signal.SIGKILL)  # with its data workers
    assert proc.wait(timeout=30) == -signal.SIGKILL


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An uninterrupted ResNet-18 run; its data folder (the synthetic cache) is shared by the tests below,
    which put their own runs in their ``tmp_path`` (removed as soon as the test passed)."""
    data = tmp_path_factory.mktemp("robust")
    ref = data / "reference"
    assert main(_argv(data, ref)) == 0
    # only last.pt is compared against: its predecessor would hold 136 MB for the whole module
    (ref / "checkpoints" / "prev.pt").unlink()
    return data, ref


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """RESUME's uninterrupted run on the tiny body, with its ``prev.pt`` (the truncation test falls back to it)."""
    data = tmp_path_factory.mktemp("robust_tiny")
    ref = data / "reference"
    assert main(_argv(data, ref, TINY)) == 0
    return data, ref


# ----------------------------------------------------------------------------------- exact resume
def test_sigkill_anywhere_then_resume_is_bitwise_exact(reference: tuple[Path, Path], tmp_path: Path) -> None:
    """SIGKILL twice at random moments (the first run with a data worker), once in the middle of a
    checkpoint write, then --resume: the same weights, RLO state, log-variances, logs and metrics. The other
    weightings' state goes through a resume in the test below: a kill leaves nothing but the last checkpoint."""
    data, ref = reference
    run = tmp_path / "killed"
    rng = random.Random(20240601)

    first = _spawn(data, run, {"data.num_workers": 1})
    _wait("iteration 3", lambda: _logged(run) >= 3, first)  # the checkpoint of iteration 2 is complete
    time.sleep(rng.uniform(0.0, 0.4))
    _kill(first)

    target = min(_logged(run) + 2, 7)
    second = _spawn(data, run, None, "--resume")
    _wait(f"iteration {target}", lambda: _logged(run) >= target, second)
    time.sleep(rng.uniform(0.0, 0.4))
    _kill(second)

    # the next checkpoint write sleeps between its complete temporary file and the renames
    third = _spawn(data, run, None, "--resume", env={TEST_DELAY_ENV: "60"})
    tmp = run / "checkpoints" / f".last.pt.tmp-{third.pid}"  # (an earlier kill may have left its own)
    _wait("a checkpoint write", tmp.exists, third)
    time.sleep(rng.uniform(0.0, 0.2))
    _kill(third)
    assert tmp.exists(), "the kill should have left the temporary file"
    load_checkpoint(run / "checkpoints" / "last.pt")  # still the complete previous one

    assert main(_argv(data, run, None, "--resume")) == 0
    assert_same_run(run, ref)
    assert not (load_checkpoint(ref / "checkpoints" / "last.pt")["weighting"]["weights"] == 1).all()


@pytest.mark.parametrize("weighting", list(WEIGHTING_RESUME))
def test_every_weighting_resumes_bitwise_from_a_mid_window_checkpoint(
    weighting: str, tiny_reference: tuple[Path, Path], tmp_path: Path
) -> None:
    """A run whose last.pt is lost resumes from prev.pt (iteration 8) and ends as the uninterrupted run:
    weights, the weighting's state (AVW's and DWA's window buffer mid-window, UW's u through the optimizer),
    log-variances, logs and metrics. On the tiny body: the state, not the kill, is the point."""
    data, _ = tiny_reference
    extra = {**TINY, **WEIGHTING_RESUME[weighting]}
    ref = tmp_path / "reference"
    assert main(_argv(data, ref, extra)) == 0
    run = tmp_path / "resumed"
    shutil.copytree(ref, run)
    (run / "checkpoints" / "last.pt").unlink()
    ckpt = load_checkpoint(run / "checkpoints" / "prev.pt")
    assert ckpt["iteration"] == 8
    assert main(_argv(data, run, extra, "--resume")) == 0
    assert_same_run(run, ref)
    # the weighting did something the resume had to carry over
    weights = load_checkpoint(ref / "checkpoints" / "last.pt")["weighting"]["weights"]
    assert (weights == 1).all() if weighting == "equal" else not (weights == 1).all()
    if weighting in ("avw", "dwa"):  # iteration 8 of windows of 3
        assert ckpt["weighting"]["_extra_state"]["position"] == 2


def test_sigterm_saves_a_checkpoint_and_exits_143(reference: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    """SIGTERM to the whole process group, data worker included (as Ctrl-C or SLURM do)."""
    data, ref = reference
    run = tmp_path / "terminated"
    proc = _spawn(data, run, {"data.num_workers": 1})
    _wait("iteration 3", lambda: _logged(run) >= 3, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    stderr = "".join(p.read_text() for p in tmp_path.glob("terminated.stderr.*"))
    assert "interrupted (SIGTERM)" in stderr and "Traceback" not in stderr
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["iteration"] == _logged(run) >= 3  # the iteration it reached, not just the last period
    capsys.readouterr()
    assert main(_argv(data, run, None, "--resume")) == 0
    resumed = f"resumed from {run / 'checkpoints' / 'last.pt'} at iteration {state['iteration']}"
    assert resumed in capsys.readouterr().out
    assert_same_run(run, ref)


def test_ctrl_c_saves_a_checkpoint_and_exits_130(
    tiny_reference: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """SIGINT arrives (in this process) during iteration 5: the step completes, a checkpoint of iteration 5
    is saved (not a period iteration), the CLI returns 130, and --resume ends where the reference did."""
    data, ref = tiny_reference

    def ctrl_c(model: Any, out: Any, call: int) -> None:
        if call == 5:
            os.kill(os.getpid(), signal.SIGINT)

    _poison(monkeypatch, ctrl_c)
    run = tmp_path / "ctrl_c"
    capsys.readouterr()
    handler_before = signal.getsignal(signal.SIGINT)
    assert main(_argv(data, run, TINY)) == 128 + signal.SIGINT
    captured = capsys.readouterr()
    assert "SIGINT: saved a checkpoint at iteration 5" in captured.out
    assert "robustdet: interrupted (SIGINT)" in captured.err and "Traceback" not in captured.err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["iteration"] == 5 == _logged(run)
    assert signal.getsignal(signal.SIGINT) is handler_before  # the handlers were put back
    monkeypatch.undo()
    assert main(_argv(data, run, TINY, "--resume")) == 0
    assert_same_run(run, ref)


def test_truncated_last_checkpoint_falls_back_to_prev(
    tiny_reference: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    data, ref = tiny_reference
    run = tmp_path / "truncated"
    shutil.copytree(ref, run)
    truncate(run / "checkpoints" / "last.pt", keep=0.7)
    capsys.readouterr()
    assert main(_argv(data, run, TINY, "--resume")) == 0
    captured = capsys.readouterr()
    assert f"{run / 'checkpoints' / 'last.pt'}: corrupt or truncated checkpoint" in captured.err
    assert f"resumed from {run / 'checkpoints' / 'prev.pt'} at iteration 8" in captured.out
    assert_same_run(run, ref)


# 24 images, batch 2: 0.75 epochs are 9 iterations, 0.25 of warm-up 3; an evaluation every 3 keeps best.pt
EPOCHS: dict[str, object] = {
    "train.max_iter": "null", "train.max_epochs": 0.75, "train.schedule.warmup_iters": "null",
    "train.schedule.warmup_epochs": 0.25, "checkpoint.period": 3, "eval.period": 3, "eval.max_images": 3,
    "checkpoint.best_metric": "AR100",
}  # fmt: skip


def test_epochs_and_best_checkpoint_killed_and_resumed_end_equal(reference: tuple[Path, Path], tmp_path: Path) -> None:
    """A run stated in epochs that keeps best.pt, SIGKILLed after its first evaluation and checkpoint, then
    --resume: last.pt, best.pt (with its metric, value and iteration), logs and metrics as uninterrupted."""
    data, _ = reference
    ref, run = tmp_path / "reference", tmp_path / "killed"
    assert main(_argv(data, ref, EPOCHS)) == 0
    (ref / "checkpoints" / "prev.pt").unlink()  # never compared against: 136 MB less while the other run trains
    proc = _spawn(data, run, EPOCHS)
    _wait("iteration 4", lambda: _logged(run) >= 4, proc)  # the evaluation and checkpoint of 3 are done
    time.sleep(random.Random(11).uniform(0.0, 0.4))
    _kill(proc)
    assert main(_argv(data, run, EPOCHS, "--resume")) == 0
    assert_same_run(run, ref)
    assert load_checkpoint(ref / "checkpoints" / "last.pt")["iteration"] == 9
    a = load_checkpoint(ref / "checkpoints" / "best.pt")
    b = load_checkpoint(run / "checkpoints" / "best.pt")
    assert all(same_state(a[k], b[k]) for k in a if k != "config") and a.keys() == b.keys()
    # the best is the first evaluation with the highest AR100 (eval.jsonl, the final one included)
    evals = _records(ref / "eval.jsonl")
    assert [r["iter"] for r in evals] == [3, 6, 9]
    top = max(r["bbox"]["AR100"] for r in evals)
    first = next(r["iter"] for r in evals if r["bbox"]["AR100"] == top)
    assert b["best"] == {"metric": "AR100", "value": top, "iteration": first} and b["iteration"] == first


# ------------------------------------------------------------------------------------- divergence
def _poison(monkeypatch: pytest.MonkeyPatch, poison: Callable[[Any, Any, int], None]) -> None:
    """Wrap the built model's forward: ``poison(model, out, call)`` may spoil training call ``call`` (1-based)."""
    real = trainer_mod.build_model

    def build(cfg: Any, num_classes: int) -> Any:
        model = real(cfg, num_classes)
        forward, calls = model.forward, [0]

        def poisoned(images: Any, targets: Any = None) -> Any:
            if model.training:
                calls[0] += 1
            out = forward(images, targets)
            if model.training:
                poison(model, out, calls[0])
            return out

        model.forward = poisoned
        return model

    monkeypatch.setattr(trainer_mod, "build_model", build)


def test_one_nonfinite_step_is_skipped_and_log_variances_out_of_range_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    def nan_at_p4(model: Any, out: Any, call: int) -> None:
        if call == 3:
            out.level_losses = out.level_losses * torch.tensor([1.0, math.nan, 1.0, 1.0, 1.0])

    _poison(monkeypatch, nan_at_p4)
    extra = {
        "train.max_iter": 5,
        "checkpoint.period": 0,
        # both s start at 0 in a tight range, and one AdamW step of 0.1 takes them out of it
        "loss.log_var_init": "{cls: 0.0, reg: 0.0}",
        "loss.log_var_range": "[-0.01, 0.01]",
        "train.optimizer.log_var_lr": 0.1,
        "train.schedule.warmup_iters": 0,
        **TINY,
    }
    run = tmp_path / "run"
    assert main(_argv(tmp_path, run, extra)) == 0
    err = capsys.readouterr().err
    assert "iteration 3: non-finite P4=nan" in err and "step skipped (1 in a row" in err
    events = _records(run / "events.jsonl")
    skipped = [e for e in events if e["event"] == "nonfinite_step_skipped"]
    assert len(skipped) == 1 and skipped[0]["iter"] == 3 and "P4=nan" in skipped[0]["detail"]
    assert "images [" in skipped[0]["detail"]
    log = _records(run / "log.jsonl")
    assert [r["iter"] for r in log] == [1, 2, 4, 5]  # the run went on after the bad step
    assert [r.get("nonfinite_skipped", 0) for r in log] == [0, 0, 1, 1]
    assert all(math.isfinite(r["loss"]) for r in log)
    # log-variances that left loss.log_var_range: in every log record, one event, one warning
    assert all(set(r["log_var_out_of_range"]) == {"cls", "reg"} for r in log)
    assert [e["iter"] for e in events if e["event"] == "log_var_out_of_range"] == [1]
    assert "outside loss.log_var_range [-0.01, 0.01]" in err


def test_persistent_nonfinite_stops_with_exit_2_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    def bad_log_variance(model: Any, out: Any, call: int) -> None:
        if call >= 3:
            with torch.no_grad():
                model.log_variances.log_vars["reg"].fill_(math.nan)
            out.level_losses = out.level_losses * math.nan

    _poison(monkeypatch, bad_log_variance)
    run = tmp_path / "run"
    assert main(_argv(tmp_path, run, {**TINY, "train.max_iter": 8, "train.max_nonfinite_steps": 3})) == 2
    err = capsys.readouterr().err
    assert err.count("robustdet train: error: ") == 1 and "Traceback" not in err
    line = err.split("robustdet train: error: ", 1)[1]
    for fragment in (
        "iteration 5: non-finite", "log_var_reg=nan", "images [", "3 non-finite steps in a row",
        "train.max_nonfinite_steps=3", f"{run / 'checkpoints' / 'last.pt'} (iteration 2)", "--resume",
    ):  # fmt: skip
        assert fragment in line, fragment
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert len([e for e in _records(run / "events.jsonl") if e["event"] == "nonfinite_step_skipped"]) == 3


# --------------------------------------------------------------------------------- corrupt images
def test_corrupt_image_mid_training_is_skipped_and_resume_stays_exact(tmp_path: Path, capsys) -> None:
    """A truncated JPEG passes the header check, fails to decode in training, and is replaced by the next
    image; the run finishes, reports it, and a resume replays it exactly. With no allowance: exit 2."""
    train_json = make_coco(tmp_path / "coco", num_images=6)
    coco = json.loads(train_json.read_text())
    coco["images"][4]["file_name"] = "img4.jpg"
    train_json.write_text(json.dumps(coco))
    val_json = tmp_path / "coco" / "val.json"
    val = {**coco, "images": coco["images"][:2], "annotations": [a for a in coco["annotations"] if a["image_id"] <= 2]}
    val_json.write_text(json.dumps(val))
    bad = tmp_path / "coco" / "images" / "img4.jpg"
    write_image(bad)
    truncate(bad)
    bad = str(bad)
    extra = {**TINY, "train.max_iter": 6, "checkpoint.period": 3, "data.max_corrupt_images": 1}
    data = [*coco_overrides(train_json, tmp_path / "coco" / "images", val_json)]

    def argv(out: Path, *flags: str, **more: object) -> list[str]:
        return ["train", CONFIG, *tiny_overrides(tmp_path, {**RESUME, **extra, **more}), *data, "--out", str(out),
                *flags]  # fmt: skip

    ref = tmp_path / "ref"
    capsys.readouterr()
    assert main(argv(ref)) == 0
    err = capsys.readouterr().err
    assert f"skipped corrupt image {bad}: cannot decode the image" in err
    events = [e for e in _records(ref / "events.jsonl") if e["event"] == "corrupt_image_skipped"]
    assert len(events) == 2 and {e["image"] for e in events} == {bad}  # once per epoch, one distinct image
    assert _records(ref / "log.jsonl")[-1]["corrupt_images_skipped"] == 1
    assert load_checkpoint(ref / "checkpoints" / "last.pt")["corrupt_images"] == [bad]

    resumed = tmp_path / "resumed"
    shutil.copytree(ref, resumed)
    (resumed / "checkpoints" / "last.pt").unlink()  # back to iteration 3
    assert main(argv(resumed, "--resume")) == 0
    assert_same_run(resumed, ref)

    strict = tmp_path / "strict"
    capsys.readouterr()
    assert main(argv(strict, **{"data.max_corrupt_images": 0})) == 2
    err = capsys.readouterr().err
    assert "more than data.max_corrupt_images=0" in err and bad in err and "Traceback" not in err


def test_corrupt_validation_image_in_a_worker_is_one_clean_error(tmp_path: Path, capsys) -> None:
    """Evaluation needs every image: exit 2 naming the file, without the worker's traceback, and without
    hanging on the persistent training workers at exit."""
    coco_json = make_coco(tmp_path / "coco", num_images=4)
    truncate(tmp_path / "coco" / "images" / "img3.png", keep=0.9)  # PNG: the header check decodes it
    data = coco_overrides(coco_json, tmp_path / "coco" / "images")
    capsys.readouterr()
    argv = ["train", CONFIG, *tiny_overrides(tmp_path, {"train.max_iter": 1, "data.num_workers": 1}), *data,
            "data.verify_images=false", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    line = f"robustdet train: error: {tmp_path / 'coco' / 'images' / 'img3.png'}: cannot decode the image ("
    assert line in err
    assert "Traceback" not in err and "Caught" not in err


# A rank that dies under torchrun stops the others, which say where to resume: tests/test_multinode.py's
# lost node, whose resume is also bitwise exact (the launch differs, the engine's path is the same).
