import random
import resource
import signal

import numpy as np
import pytest
import torch

from robustdet.config import ScheduleConfig
from robustdet.engine.best import save_best
from robustdet.engine.checkpoint import (
    CheckpointError,
    find_resumable,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from robustdet.engine.schedule import lr_factor


def test_step_schedule_with_warmup():
    cfg = ScheduleConfig(name="step", warmup_iters=10, warmup_factor=0.1, steps=[50, 80], gamma=0.1)
    assert lr_factor(0, cfg, 100) == pytest.approx(0.1)
    assert lr_factor(5, cfg, 100) == pytest.approx(0.1 * 0.5 + 0.5)  # linear from 0.1 to 1
    assert lr_factor(10, cfg, 100) == pytest.approx(1.0)
    assert lr_factor(49, cfg, 100) == pytest.approx(1.0)
    assert lr_factor(50, cfg, 100) == pytest.approx(0.1)
    assert lr_factor(80, cfg, 100) == pytest.approx(0.01)


def test_cosine_schedule_ends_at_min():
    cfg = ScheduleConfig(name="cosine", warmup_iters=0, min_lr_factor=0.05)
    assert lr_factor(0, cfg, 101) == pytest.approx(1.0)
    assert lr_factor(50, cfg, 101) == pytest.approx(0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * 50 / 101)))
    assert lr_factor(101, cfg, 101) == pytest.approx(0.05)


def _state(i: int) -> dict:
    return {"model": {"w": torch.full((3,), float(i))}, "iteration": i}


def test_save_keeps_previous_and_falls_back_on_corruption(tmp_path):
    save_checkpoint(_state(1), tmp_path)
    save_checkpoint(_state(2), tmp_path)
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 2
    assert load_checkpoint(tmp_path / "prev.pt")["iteration"] == 1
    # truncate last.pt as a kill mid-copy would
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"last\.pt: corrupt or truncated"):
        load_checkpoint(tmp_path / "last.pt")
    path, state = find_resumable(tmp_path)
    assert path.name == "prev.pt" and state["iteration"] == 1
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"


def test_a_full_disk_is_one_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    """A write past the file-size limit fails inside torch.save as a full disk does (CI once hit
    "[enforce fail at inline_container.cc] unexpected pos A vs B"): one error naming the file and the space
    left, no temporary file, and the previous checkpoint still the one a resume finds."""
    save_checkpoint(_state(1), tmp_path)
    big = {"model": {"w": torch.zeros(1_000_000)}, "iteration": 2}  # 4 MB against a 1 MB limit
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limits[1]))
    try:
        expected = r"cannot write the checkpoint \(.+; \d+ MB free there\); earlier checkpoints are untouched"
        with pytest.raises(CheckpointError, match=r"last\.pt: " + expected):
            save_checkpoint(big, tmp_path)
        with pytest.raises(CheckpointError, match=r"best\.pt: " + expected):
            save_best(big, tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 1
    assert find_resumable(tmp_path)[1]["iteration"] == 1
    assert not (tmp_path / "best.pt").exists() and not list(tmp_path.glob(".*tmp*"))


def test_empty_and_missing_checkpoints(tmp_path):
    assert find_resumable(tmp_path) is None
    (tmp_path / "last.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"last\.pt: the checkpoint file is empty"):
        find_resumable(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")


class _Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_checkpoint_needing_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": _Payload()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused"):
        load_checkpoint(path)


def test_rng_state_round_trip_through_weights_only(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_checkpoint({"model": {}, "rng": rng_state()}, tmp_path)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(load_checkpoint(tmp_path / "last.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_log_variances_get_their_own_group_without_weight_decay():
    from robustdet.config import config_from_dict
    from robustdet.engine.trainer import build_optimizer
    from robustdet.models import build_model
    from robustdet.weighting import build_weighting

    cfg = config_from_dict({
        "model": {"backbone": "resnet18", "fpn_channels": 16, "head_norm": "group_norm", "group_norm_groups": 4,
                  "min_size": 64, "max_size": 64},
        "loss": {"bayesian": True},
        "train": {"optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05, "log_var_lr": 1e-2}},
    })
    model = build_model(cfg, 3)
    groups = {g["name"]: g for g in build_optimizer(model, build_weighting(cfg.weighting, 5, 0), cfg).param_groups}
    assert set(groups) == {"model", "log_var"}
    assert groups["model"]["weight_decay"] == 0.05
    assert groups["log_var"]["weight_decay"] == 0.0 and groups["log_var"]["lr"] == 1e-2
    log_vars = {id(p) for p in model.log_variances.parameters()}
    assert {id(p) for p in groups["log_var"]["params"]} == log_vars and len(log_vars) == 2
    assert not log_vars & {id(p) for p in groups["model"]["params"]}
