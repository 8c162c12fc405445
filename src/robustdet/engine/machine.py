"""What a run trained on: CPU model, threads, torch version, accelerator (``machine.json`` in the run folder).

Training is bitwise reproducible on one kind of machine but not across kinds (the same cell gave AP 28.43 on
an Intel Xeon and 32.68 on an AMD EPYC, issue 17), so every start of a run appends one record, and the
sweep's ``summary.csv`` carries it as the ``machine`` column (``runs.reader.read_machine``).
"""

from __future__ import annotations

import json
import platform
import re
import time
from pathlib import Path
from typing import Any

import torch

from robustdet.files import write_json_atomic

__all__ = ["MACHINE_FILE", "cpu_model", "machine_record", "record_machine"]

MACHINE_FILE = "machine.json"  # runs/reader.py reads it by this name


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s "model name", else ``platform.processor()``)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return (found.group(1).strip() if found else platform.processor()) or "unknown CPU"


def machine_record(device: torch.device) -> dict[str, Any]:
    """This process's machine: CPU model, torch threads, torch version, device (with the GPU's name)."""
    rec: dict[str, Any] = {
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        rec["gpu"] = torch.cuda.get_device_name(device)
    return rec


def record_machine(out_dir: Path, device: torch.device, start_iter: int) -> None:
    """Append this start's record (with the iteration it starts from) to ``out_dir/machine.json``."""
    path = out_dir / MACHINE_FILE
    starts: list[dict[str, Any]] = []
    if path.exists():
        try:
            starts = list(json.loads(path.read_text()).get("starts", []))
        except (ValueError, AttributeError):
            starts = []  # a file cut by a kill: the history before is lost, this start is still recorded
    rec = {**machine_record(device), "start_iter": start_iter, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json_atomic(path, {"starts": [*starts, rec]})
