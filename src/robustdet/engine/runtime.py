"""The process a run or a command executes in: its device, random seeds, threads and autocast.

Shared by training and by using a checkpoint (``engine/inference.py``: eval, predict, export), so that
loading a model never imports the training loop.
"""

from __future__ import annotations

import random
import re

import numpy as np
import torch
from torch import nn

from robustdet.errors import ConfigError, DistributedFailure
from robustdet.models import Detector


def resolve_device(name: str) -> torch.device:
    """``train.device``: ``auto`` takes CUDA when there is one; ``cuda`` without one is a config error."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(num_threads: int | None) -> None:
    """``train.num_threads``: torch's intra-op threads; None leaves torch's default (OMP_NUM_THREADS)."""
    if num_threads:
        torch.set_num_threads(num_threads)


def autocast_dtype(amp: bool, device: torch.device) -> torch.dtype | None:
    """bf16 autocast with ``train.amp`` on CUDA; None (full float32) otherwise."""
    return torch.bfloat16 if (amp and device.type == "cuda") else None


def unwrap(model: nn.Module) -> Detector:
    """The detector inside a DistributedDataParallel wrapper (or the model itself)."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    assert isinstance(inner, Detector)
    return inner


def lost_rank(exc: BaseException, rank: int, iteration: int, resume_text: str) -> DistributedFailure:
    """The one line for a collective that failed because another rank died or stopped answering."""
    return DistributedFailure(
        f"rank {rank}: lost another rank at iteration {iteration} ({short_dist_message(exc)}); {resume_text}"
    )


def short_dist_message(exc: BaseException) -> str:
    """gloo's first sentence, without its source location: e.g. 'Connection closed by peer [host]:port'."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". ", 1)[0]
