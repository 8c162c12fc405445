"""``robustdet train`` as torchrun starts it, with one rank that crashes at a chosen iteration
(tests/test_robustness.py, tests/test_multinode.py).

Run as ``torchrun ... -m tests.rank_crash train CONFIG ...`` with ``ROBUSTDET_TEST_DIE_AT_ITER=RANK:ITER``:
that rank exits at once (``os._exit(1)``, like a crash) when it starts iteration ITER (1-based), so a test
sees how the other ranks and torchrun react. The crash wraps ``Trainer._next_batch`` from here; the
trainer itself holds no test code.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from robustdet.cli import main
from robustdet.engine.trainer import Trainer

DIE_ENV = "ROBUSTDET_TEST_DIE_AT_ITER"


def install_crash(value: str | None) -> None:
    """Make rank RANK exit at the start of iteration ITER, for ``value`` "RANK:ITER" (nothing when empty)."""
    if not value:
        return
    rank_text, _, iter_text = value.partition(":")
    target = (int(rank_text), int(iter_text))
    real = Trainer._next_batch

    def next_batch(self: Trainer, it: int, loader: Any) -> Any:
        if (self.rank, it + 1) == target:
            print(f"{DIE_ENV}: rank {self.rank} exits at iteration {it + 1}", file=sys.stderr, flush=True)
            os._exit(1)
        return real(self, it, loader)

    Trainer._next_batch = next_batch  # type: ignore[method-assign]


if __name__ == "__main__":
    install_crash(os.environ.get(DIE_ENV))
    sys.exit(main(sys.argv[1:]))
