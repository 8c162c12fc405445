"""Two torchrun "nodes" on this machine (two torchrun processes, --nnodes 2, one process each, c10d
rendezvous): both ranks end with bitwise identical weights, and a run that loses a node and is resumed
with the same launch ends bitwise equal to an uninterrupted one. See docs/distributed.md."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from robustdet.engine.checkpoint import load_checkpoint
from tests.conftest import REPO, tiny_overrides
from tests.multinode_rank import state_digest
from tests.rank_crash import DIE_ENV
from tests.test_robustness import CONFIG, RESUME, _records, assert_same_run

MAX_ITER = 4  # checkpoints at 2 and 4 (checkpoint.period=2 in RESUME)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(
    data: Path, out: Path, *flags: str, env: dict[str, str] | None = None, timeout: float = 120.0
) -> list[tuple[int, str]]:
    """Start node 0 and node 1 as two torchrun processes that meet at one c10d rendezvous; (exit code, stderr)."""
    overrides = tiny_overrides(
        data, {**RESUME, "train.max_iter": MAX_ITER, "train.batch_size": 1, "train.dist_timeout_s": 30}
    )
    endpoint = f"127.0.0.1:{_free_port()}"
    out.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    for node in (0, 1):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
            "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", out.name,
            "-m", "tests.multinode_rank", "train", CONFIG, *overrides, "--out", str(out), *flags,
        ]  # fmt: skip
        log = out.parent / f"{out.name}.node{node}.{time.monotonic_ns()}.stderr"
        logs.append(log)
        with open(log, "w") as stderr:
            procs.append(
                subprocess.Popen(
                    cmd, stdout=subprocess.DEVNULL, stderr=stderr, cwd=REPO, start_new_session=True,
                    env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                )
            )  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:  # a hung node must not outlive the test
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [(code, log.read_text()) for code, log in zip(codes, logs, strict=True)]


def _digests(out: Path) -> list[str]:
    return [(out / f"weights.rank{r}.sha256").read_text().strip() for r in (0, 1)]


def _checkpoint_digest(out: Path) -> str:
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    return state_digest({"model": state["model"], "weighting": state["weighting"]})


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An uninterrupted two-node run; its data folder (the synthetic cache) is shared with the resume test."""
    data = tmp_path_factory.mktemp("multinode")
    ref = data / "reference"
    for code, err in _two_nodes(data, ref):
        assert code == 0, err[-3000:]
    # only last.pt is compared against: its predecessor would hold 136 MB (ResNet-18 + AdamW) for the module
    (ref / "checkpoints" / "prev.pt").unlink()
    return data, ref


def test_two_nodes_end_with_identical_weights(reference: tuple[Path, Path]) -> None:
    _, ref = reference
    # rank 0 checkpointed its copy; each rank hashed its own at the end: all three are the same bits
    assert _digests(ref) == [_checkpoint_digest(ref)] * 2
    assert load_checkpoint(ref / "checkpoints" / "last.pt")["iteration"] == MAX_ITER
    rank0, rank1 = _records(ref / "log.jsonl"), _records(ref / "log.rank1.jsonl")
    assert [r["iter"] for r in rank0] == [r["iter"] for r in rank1] == list(range(1, MAX_ITER + 1))
    # the ranks saw different images (local losses differ), yet the all-reduced gradient is the same
    assert any(a["level_losses"] != b["level_losses"] for a, b in zip(rank0, rank1, strict=True))
    assert [r["grad_norm"] for r in rank0] == [r["grad_norm"] for r in rank1]
    # RLO's weights, action and window statistics are the same on both ranks, and moved once a window closed
    for a, b in zip(rank0, rank1, strict=True):
        assert a["level_weights"] == b["level_weights"] and a["weighting/action"] == b["weighting/action"]
        assert {k: v for k, v in a.items() if k.startswith("weighting/")} == {
            k: v for k, v in b.items() if k.startswith("weighting/")
        }
    assert (ref / "metrics.json").exists()


def test_a_lost_node_then_resume_with_the_same_launch_is_bitwise_exact(reference: tuple[Path, Path]) -> None:
    data, ref = reference
    run = data / "interrupted"
    # rank 1 dies at iteration 3, after the checkpoint at 2: its node is lost
    started = time.monotonic()
    results = _two_nodes(data, run, env={DIE_ENV: f"1:{MAX_ITER // 2 + 1}"})
    assert all(code != 0 for code, _ in results), [err[-2000:] for _, err in results]
    assert time.monotonic() - started < 120  # the survivor stops instead of hanging
    errors = "".join(err for _, err in results)
    assert f"rank 1 exits at iteration {MAX_ITER // 2 + 1}" in errors
    # the survivor says what happened and where to resume from
    assert f"rank 0: lost another rank at iteration {MAX_ITER // 2 + 1}" in errors
    last = run / "checkpoints" / "last.pt"
    assert f"{last} (iteration {MAX_ITER // 2}); continue with --resume" in errors
    assert load_checkpoint(run / "checkpoints" / "last.pt")["iteration"] == MAX_ITER // 2

    for code, err in _two_nodes(data, run, "--resume"):
        assert code == 0, err[-3000:]
    assert_same_run(run, ref)  # rank 0's final checkpoint, logs, evaluation: bitwise / exactly equal
    assert _records(run / "log.rank1.jsonl") == _records(ref / "log.rank1.jsonl")
    assert _digests(run) == _digests(ref)
