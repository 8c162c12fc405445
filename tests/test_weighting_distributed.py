"""AVW and RLO under torch.distributed: 2 gloo processes on CPU feeding different local losses.

Both ranks must end up with identical weights, actions and probabilities, equal to a single process fed
the mean of the two ranks' losses (the all-reduce of ``WindowedWeighting.step``).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from robustdet.weighting import AdaptiveVarianceWeighting, ReinforcementLearningOptimization

WORLD_SIZE = 2
LEVELS = 5
INTERVAL = 4
WINDOWS = 12


def _weightings() -> tuple[AdaptiveVarianceWeighting, ReinforcementLearningOptimization]:
    return (
        AdaptiveVarianceWeighting(LEVELS, interval=INTERVAL),
        ReinforcementLearningOptimization(LEVELS, interval=INTERVAL, rl_step=0.1, seed=3),
    )


def _local_losses(rank: int) -> torch.Tensor:
    # float32 like a detector's losses, and a different scale per rank so the local windows disagree
    g = torch.Generator().manual_seed(100 + rank)
    return torch.rand(WINDOWS * INTERVAL, LEVELS, generator=g) * (1.0 + 3.0 * rank)


def _trace(losses: torch.Tensor) -> dict[str, list[object]]:
    avw, rlo = _weightings()
    trace: dict[str, list[object]] = {"avw": [], "rlo": [], "p": [], "action": []}
    for row in losses:
        trace["avw"].append(avw.step(row).tolist())
        trace["rlo"].append(rlo.step(row).tolist())
        trace["p"].append(rlo.probabilities.tolist())
        trace["action"].append(rlo.action)
    return trace


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    try:
        torch.save(_trace(_local_losses(rank)), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_ranks_agree_and_match_a_single_process_fed_the_mean(tmp_path: Path) -> None:
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, start_method="spawn")
    traces = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    assert traces[0] == traces[1]
    # the mean the all-reduce computes: float64 sum of the two ranks, divided by 2
    mean = (_local_losses(0).double() + _local_losses(1).double()) / WORLD_SIZE
    assert traces[0] == _trace(mean)
    # the run is long enough that the draws and the probabilities actually moved
    assert len(set(traces[0]["action"][INTERVAL:])) > 1
    assert traces[0]["p"][-1] != [0.25] * 4
