"""Two CPU processes under torchrun (gloo): both ranks see the same all-reduced losses and weights."""

import json
import os
import socket
import subprocess
import sys

from tests.conftest import REPO, tiny_overrides


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_log_identical_weights(tmp_path):
    out = tmp_path / "ddp"
    overrides = tiny_overrides(
        tmp_path,
        # ResNet-18: several DDP gradient buckets (the tiny body's gradients fit one)
        {"model.backbone": "resnet18", "train.max_iter": 6, "weighting.name": "rlo", "weighting.interval": 2,
         "train.batch_size": 1},
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), "-m", "robustdet.cli", "train",
        str(REPO / "configs" / "default.yaml"), *overrides, "--out", str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    rank1 = [json.loads(x) for x in (out / "log.rank1.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rank0] == [r["iter"] for r in rank1] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(rank0, rank1, strict=True):
        assert a["level_weights"] == b["level_weights"]
        assert {k: v for k, v in a.items() if k.startswith("weighting/")} == {
            k: v for k, v in b.items() if k.startswith("weighting/")
        }
        assert a["weighting/action"] == b["weighting/action"]
    # the ranks trained on different images, so their local losses differ ...
    assert any(a["level_losses"] != b["level_losses"] for a, b in zip(rank0, rank1, strict=True))
    # ... yet the weights moved off 1 identically once a window closed
    assert (out / "metrics.json").exists()
