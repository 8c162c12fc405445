"""The one set of distributed helpers: process-group setup for ``torchrun`` (NCCL on GPU, gloo on CPU) and
the few collectives the engine, the weightings and the detectors use. A plain run is world size 1 and every
helper is then a no-op (no process group is needed)."""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device_kind: str, timeout_s: float = 300.0) -> bool:
    """Join the process group that torchrun describes in the environment; no-op without it.

    Returns True when this call created the group (the caller then destroys it at the end).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return False
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if device_kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def barrier() -> None:
    if is_distributed():
        dist.barrier()



def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ over the ranks (a copy); ``t`` itself without a process group."""
    if not is_distributed():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The mean over the ranks in float64 (a copy); ``values`` in float64 without a process group.

    Float64 so that the mean every rank receives is the one a single process fed the mean would compute;
    ``ReduceOp.AVG`` is NCCL-only, hence SUM and a division.
    """
    reduced = values.to(torch.float64, copy=True)
    if not is_distributed():
        return reduced
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    reduced /= dist.get_world_size()
    return reduced


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of parameters that DDP does not own (a weighting's) over the ranks, in place."""
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def is_peer_failure(exc: BaseException) -> bool:
    """An error of a collective: another rank died, or stopped answering for ``train.dist_timeout_s``."""
    return isinstance(exc, dist.DistError) or (
        isinstance(exc, RuntimeError)
        and any(
            k in str(exc)
            for k in ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "gloo")
        )
    )



def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (on every rank)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    DDP copies them from rank 0 at the start of each training forward, so after the last forward each rank
    holds its own update of them: without this, rank r > 0 would evaluate its share of the validation set
    with statistics that differ from the checkpoint's (rank 0's).
    """
    if not is_distributed():
        return
    for buf in module.buffers():
        dist.broadcast(buf, src=0)
