"""SIGTERM and SIGINT during training: a request to stop, honoured at the next step boundary (after a
checkpoint), or at once after the final checkpoint, when there is nothing left to save."""

from __future__ import annotations

import signal
from typing import Any

from robustdet.errors import Interrupted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """The stop signal received (``signum``), while installed as the handler of SIGTERM and SIGINT."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.at_once = False  # raise in the handler itself instead of waiting for the loop
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum
        if self.at_once:
            raise Interrupted(signum)
