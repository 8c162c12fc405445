"""DDP normalisation (issue 9, ``models/base.py::foreground_normaliser``): 2 gloo processes on CPU.

Each rank computes a tiny RetinaNet's ``per_batch`` loss on its own batch, the two batches with different
foreground counts. The divisor is the foreground count summed over the ranks and divided by the world size
(detectron2's and MMDetection's ``reduce_mean(num_pos)``), so each rank's loss is its share of the loss over
the global batch: the mean over the ranks equals one process's loss on both batches, and DDP's averaged
gradients equal that process's gradients.

The backbone's BatchNorm layers run on their (initial) running statistics here: in training mode their
batch statistics would depend on which images share a rank, which no loss normalisation can undo.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import robustdet.models.base as base
from robustdet.models import DetectorLosses, PerLevelRetinaNet
from tests import test_models_retinanet as retina

WORLD_SIZE = 2
SIZE = 96  # every image 96 x 96: the padded batch, hence the anchors, is the same in every grouping
LOSS: dict[str, object] = {"normalization": "per_batch", "box_loss": "smooth_l1", "beta": 0.1}
CASES = {"plain": {}, "bayesian": {"bayesian": True}}


def _batches() -> list[tuple[list[Tensor], list[dict[str, Tensor]]]]:
    """Rank 0: two images with 0 and 1 boxes; rank 1: two images with 5 and 2 boxes."""
    g = torch.Generator().manual_seed(5)
    boxes = [
        [],
        [[4.0, 6.0, 60.0, 70.0]],
        [[2.0, 3.0, 9.0, 10.0], [22.0, 23.0, 42.0, 41.0], [44.0, 12.0, 84.0, 52.0], [32.0, 31.0, 94.0, 94.0],
         [50.0, 60.0, 58.0, 66.0]],
        [[10.0, 10.0, 40.0, 30.0], [60.0, 50.0, 90.0, 92.0]],
    ]  # fmt: skip
    images = [torch.rand(3, SIZE, SIZE, generator=g, dtype=torch.float64) for _ in boxes]
    targets = [
        {
            "boxes": torch.tensor(b, dtype=torch.float64).reshape(-1, 4),
            "labels": torch.arange(len(b), dtype=torch.int64) % retina.NUM_CLASSES,
        }
        for b in boxes
    ]
    return [(images[:2], targets[:2]), (images[2:], targets[2:])]


def _model(case: str) -> PerLevelRetinaNet:
    model = retina.build(retina.tiny_cfg(**LOSS, **CASES[case]))  # seeded: the same weights everywhere
    if model.log_variances is not None:  # s away from 0 and 1 so the Bayesian terms matter
        with torch.no_grad():
            model.log_variances.log_vars["cls"].fill_(-0.7)
            model.log_variances.log_vars["reg"].fill_(0.4)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def _run(model: nn.Module, data: tuple[list[Tensor], list[dict[str, Tensor]]]) -> dict[str, Any]:
    """One training forward and backward of Σ_i L_i; the loss, the levels and every gradient."""
    out = model(*data)
    assert isinstance(out, DetectorLosses)
    total = out.level_losses.sum() + out.extra_loss
    total.backward()
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {
        "loss": total.detach(),
        "levels": out.level_losses.detach(),
        "grads": {n: p.grad.detach().clone() for n, p in inner.named_parameters() if p.grad is not None},
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=120))
    # record what the per_batch divisor sees and gives on this rank
    seen: list[tuple[float, float]] = []
    original = base.foreground_normaliser

    def recording(num_foreground: Tensor, mode: str) -> Tensor:
        divisor = original(num_foreground, mode)
        seen.append((float(num_foreground.sum()), float(divisor)))
        return divisor

    base.foreground_normaliser = recording  # type: ignore[assignment]
    try:
        results = {}
        for case in CASES:
            seen.clear()
            ddp = nn.parallel.DistributedDataParallel(_model(case))
            results[case] = {**_run(ddp, _batches()[rank]), "normaliser": list(seen)}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        base.foreground_normaliser = original
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp_normalisation")
    mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD_SIZE, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


def _single(case: str) -> dict[str, Any]:
    """One process, no process group, both ranks' images in one batch."""
    (images0, targets0), (images1, targets1) = _batches()
    return _run(_model(case), (images0 + images1, targets0 + targets1))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
@pytest.mark.parametrize("case", list(CASES))
def test_per_batch_loss_and_gradients_under_ddp_equal_one_process(case: str, ranks: list[dict[str, Any]]) -> None:
    r0, r1 = ranks[0][case], ranks[1][case]
    # the divisor: each rank's own foreground count, then the mean over the ranks of those counts
    (n0, d0), (n1, d1) = r0["normaliser"][0], r1["normaliser"][0]
    assert n0 != n1 and n0 > 0 and n1 > 0, (n0, n1)  # the ranks really differ
    assert d0 == d1 == (n0 + n1) / WORLD_SIZE

    single = _single(case)
    # the mean over the ranks of the per-rank loss is the one-process loss on both batches, level by level
    mean_loss = (r0["loss"] + r1["loss"]) / WORLD_SIZE
    torch.testing.assert_close(mean_loss, single["loss"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close((r0["levels"] + r1["levels"]) / WORLD_SIZE, single["levels"], rtol=1e-6, atol=1e-9)
    # (a per-rank divisor, n_r instead of N̄, would have weighted the two batches' losses differently)
    local = (r0["loss"] * d0 / n0 + r1["loss"] * d1 / n1) / WORLD_SIZE
    assert not torch.allclose(local, single["loss"], rtol=1e-3)

    # DDP averaged the gradients: identical on the ranks, and those of the one process
    assert r0["grads"].keys() == r1["grads"].keys() == single["grads"].keys()
    assert len(single["grads"]) > 0
    if case == "bayesian":
        assert {"log_variances.log_vars.cls", "log_variances.log_vars.reg"} <= single["grads"].keys()
    for name, grad in single["grads"].items():
        torch.testing.assert_close(r0["grads"][name], r1["grads"][name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(r0["grads"][name], grad, rtol=1e-6, atol=1e-10, msg=name)
