"""``robustdet train`` as torchrun starts it, plus a record of this rank's final weights (tests/test_multinode.py).

Run as ``torchrun ... -m tests.multinode_rank train CONFIG ...``: it calls the real CLI, and once the
trainer returns it writes ``weights.rank<R>.sha256`` into the run directory, the SHA-256 of this rank's
model state (every parameter and buffer, the log-variances included) and weighting state. Rank 0's
checkpoint holds only rank 0's copy, so this is how the test sees that every rank ended with the same
weights, without a hook in the trainer. ``ROBUSTDET_TEST_DIE_AT_ITER`` crashes a rank (tests/rank_crash.py).
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch

from robustdet.cli import main
from robustdet.engine import trainer as trainer_mod
from tests.rank_crash import DIE_ENV, install_crash


def state_digest(state: Any) -> str:
    """SHA-256 over every tensor's raw bytes (with dtype and shape) and every plain value, through nested
    dicts and lists: equal digests mean bitwise equal states."""
    h = hashlib.sha256()

    def feed(name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, Mapping):
            for key in sorted(value):
                feed(f"{name}.{key}", value[key])
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                feed(f"{name}[{i}]", item)
        else:  # float repr round-trips, so this is exact too
            h.update(f"{name}={value!r}".encode())

    feed("", state)
    return h.hexdigest()


def _train_and_record(self: trainer_mod.Trainer) -> Any:
    metrics = _original_train(self)
    state = self.state
    digest = state_digest({"model": state.model.state_dict(), "weighting": state.weighting.state_dict()})
    (self.out_dir / f"weights.rank{self.rank}.sha256").write_text(digest + "\n")
    return metrics


_original_train = trainer_mod.Trainer.train

if __name__ == "__main__":
    trainer_mod.Trainer.train = _train_and_record  # type: ignore[method-assign]
    install_crash(os.environ.get(DIE_ENV))
    sys.exit(main(sys.argv[1:]))
