"""Where a benchmark ran: recorded beside every result."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any

import torch

import cgfac


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo``, else ``platform.processor()``."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info(device: str | torch.device, threads: int | None = None) -> dict[str, Any]:
    """Platform, Python/torch/cgfac versions, CPU model and count, threads, device (and GPU name)."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "cgfac": cgfac.__version__, "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads() if threads is None else threads, "device": str(device),
    }
    if device.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
