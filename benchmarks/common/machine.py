"""The machine a benchmark ran on, in one line: CPU model, cores, GPU and library versions."""

from __future__ import annotations

import contextlib
import math
import os
import platform
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["cpu_model", "load_average", "machine"]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what ``platform`` knows)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def machine(*libraries: ModuleType, extra: str = "") -> str:
    """CPU model, core count, GPU and library versions (torch first), on one line.

    Args:
        libraries: modules whose ``__version__`` the line gives after torch's.
        extra: more words after the versions (e.g. a codec's version).
    """
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    versions = ", ".join(f"{m.__name__} {m.__version__}" for m in (torch, *libraries))
    more = f", {extra}" if extra else ""
    return f"{cpu_model()}, {os.cpu_count()} cores, {gpu}; {versions}{more}, Python {platform.python_version()}"


def load_average() -> float:
    """The 1-minute load average (NaN where the system does not tell): how shared the CPU was."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
