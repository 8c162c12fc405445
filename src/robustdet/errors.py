"""Every exception robustdet raises on purpose, in one place (the bottom layer: it imports nothing of ours).

The CLI turns each of these into one line on stderr and exit status 2 (``Interrupted``: 128 + the signal);
the message always names the file, key, image or option at fault.
"""

from __future__ import annotations

import signal


class ConfigError(ValueError):
    """A configuration that cannot be run; the message names the file and the key."""


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file and the entry (key, line, image)."""


class CheckpointError(RuntimeError):
    """A checkpoint or weights file that cannot be used; the message names the file."""


class ExportError(RuntimeError):
    """An export that cannot be done as asked; the message names the option, file or model."""


class SweepFailed(RuntimeError):
    """A process of ``sweep --jobs`` ended with an error; its log says which."""


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the message says where and what went bad."""


class DistributedFailure(RuntimeError):
    """Another rank died or stopped answering; the message names the last checkpoint to resume from."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT stopped the run (after saving a checkpoint when the step allowed it)."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message or signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "DistributedFailure",
    "ExportError",
    "Interrupted",
    "SweepFailed",
    "TrainingDiverged",
]
