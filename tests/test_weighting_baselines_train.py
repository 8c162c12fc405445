"""UW and DWA (equations.md, "Per-level baselines") train end to end: under 2-process torchrun gloo DDP
with identical weights and weighting state on the ranks, and from the CLI on all three detectors, with
their state logged through the generic ``weighting/…`` fields and plotted by ``report``.

Six tiny runs in all, sharing one synthetic cache: RetinaNet under torchrun (uw, dwa), FCOS and
Faster R-CNN in one process (uw, dwa)."""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from robustdet.cli import main
from robustdet.engine.checkpoint import load_checkpoint
from robustdet.models import DETECTORS
from tests.conftest import REPO, tiny_overrides

DETECTOR_CONFIGS = {
    "retinanet": ("default.yaml", {}),
    "fcos": ("fcos_synthetic.yaml", {"model.anchor_sizes": None}),  # FCOS has regression_ranges instead
    "faster_rcnn": ("faster_rcnn_synthetic.yaml", {}),
}
LEVELS = {"retinanet": 5, "fcos": 5, "faster_rcnn": 4}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder whose ``cache`` holds the one synthetic data set every run here reads."""
    return tmp_path_factory.mktemp("baselines_data")


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _weighting_fields(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k.startswith("weighting/")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _extra(weighting: str, detector: str, **more: object) -> dict[str, object]:
    extra: dict[str, object] = {
        "weighting.name": weighting,
        "log.tensorboard": "false",
        "checkpoint.period": 0,
        **DETECTOR_CONFIGS[detector][1],
    }
    if weighting == "dwa":
        extra["weighting.interval"] = 2
    extra.update(more)
    return extra


def _check_uw_log(records: list[dict[str, Any]], levels: int) -> None:
    """σ_i logged per level, and the weights of iteration k + 1 are ½·exp(−u_i) = ½/σ_i² of the u logged at k."""
    for r in records:
        sigma = r["weighting/sigma"]
        assert isinstance(sigma, list) and len(sigma) == levels and all(s > 0 for s in sigma)
    assert records[0]["level_weights"] == pytest.approx([1.0] * levels, abs=1e-7)  # init −log 2
    for before, after in itertools.pairwise(records):
        expected = [0.5 / s**2 for s in before["weighting/sigma"]]
        assert after["level_weights"] == pytest.approx(expected, rel=1e-12)
    # the optimizer moved u: the weights carry gradient
    assert records[-1]["level_weights"] != records[0]["level_weights"]


def _check_uw_checkpoint(run: Path, detector: str) -> None:
    """u is in the checkpoint, and in the optimizer's log-variance group (no weight decay) with the s."""
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    u = state["weighting"]["log_vars"]
    assert u.shape == (LEVELS[detector],) and not torch.equal(u, torch.full_like(u, -math.log(2.0)))
    groups = {g["name"]: g for g in state["optimizer"]["param_groups"]}
    tasks = len(DETECTORS[detector].loss_tasks)  # the synthetic configs are Bayesian: s per task, then u
    assert len(groups["log_var"]["params"]) == tasks + 1 and groups["log_var"]["weight_decay"] == 0.0


# --- 2-process torchrun gloo DDP ---------------------------------------------------------------------------


@pytest.mark.parametrize("weighting", ["uw", "dwa"])
def test_torchrun_two_ranks_keep_identical_weights(weighting: str, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    overrides = tiny_overrides(data, _extra(weighting, "retinanet", **{"train.max_iter": 6, "train.batch_size": 1}))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), "-m", "robustdet.cli", "train",
        str(REPO / "configs" / "default.yaml"), *overrides, "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = _records(out / "log.jsonl"), _records(out / "log.rank1.jsonl")
    assert [r["iter"] for r in rank0] == [r["iter"] for r in rank1] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(rank0, rank1, strict=True):
        assert a["level_weights"] == b["level_weights"], a["iter"]
        assert _weighting_fields(a) == _weighting_fields(b), a["iter"]
    # the ranks trained on different images, so their local losses differ ...
    assert any(a["level_losses"] != b["level_losses"] for a, b in zip(rank0, rank1, strict=True))
    # ... yet the weights moved off 1, identically
    assert rank0[-1]["level_weights"] != [1.0] * 5
    if weighting == "uw":
        _check_uw_log(rank0, 5)
        _check_uw_checkpoint(out, "retinanet")
        assert main(["report", str(out)]) == 0
        assert (out / "report" / "weighting_sigma.png").stat().st_size > 0
    else:
        # windows of 2: weights 1 during windows 1 and 2 (iterations 1-4), DWA's from window 3 on
        assert [r["level_weights"] for r in rank0[:4]] == [[1.0] * 5] * 4
        assert all("weighting/loss_ratio" not in r for r in rank0[:3])
        ratios = rank0[3]["weighting/loss_ratio"]  # logged after iteration 4 closed window 2
        assert len(ratios) == 5 and rank0[4]["level_weights"] == rank0[5]["level_weights"]
        weights = torch.softmax(torch.tensor(ratios, dtype=torch.float64) / 2.0, dim=0) * 5
        assert rank0[4]["level_weights"] == pytest.approx(weights.tolist(), rel=1e-12)
    assert (out / "metrics.json").exists()


# --- the CLI on the other two detectors -------------------------------------------------------------------


@pytest.mark.parametrize("detector", ["fcos", "faster_rcnn"])
@pytest.mark.parametrize("weighting", ["uw", "dwa"])
def test_cli_trains_on_every_detector(weighting: str, detector: str, data: Path, tmp_path: Path, capsys) -> None:
    """(RetinaNet is the torchrun test's detector.) Two iterations, then eval; UW's σ is plotted."""
    config, _ = DETECTOR_CONFIGS[detector]
    run = tmp_path / f"{weighting}_{detector}"
    argv = ["train", str(REPO / "configs" / config), *tiny_overrides(data, _extra(weighting, detector,
            **{"train.max_iter": 2})), "--out", str(run)]  # fmt: skip
    assert main(argv) == 0
    records = _records(run / "log.jsonl")
    levels = LEVELS[detector]
    assert [r["iter"] for r in records] == [1, 2]
    assert all(len(r["level_weights"]) == len(r["level_losses"]) == levels for r in records)
    assert all(math.isfinite(r["loss"]) for r in records)
    assert "bbox" in json.loads((run / "metrics.json").read_text())
    if weighting == "uw":
        _check_uw_log(records, levels)
        _check_uw_checkpoint(run, detector)
        assert main(["report", str(run)]) == 0
        assert (run / "report" / "weighting_sigma.png").stat().st_size > 0
    else:
        # one window of 2 closed: the weights stay 1 until a second one closes
        assert all(r["level_weights"] == [1.0] * levels for r in records)
        state = load_checkpoint(run / "checkpoints" / "last.pt")["weighting"]["_extra_state"]
        assert state["windows_closed"] == 1 and len(state["means"]) == 1 and len(state["means"][0]) == levels
    capsys.readouterr()
    assert main(["compare", str(run)]) == 0
    assert run.name in capsys.readouterr().out
