"""What every benchmark prints around its table: the machine line and a Markdown table."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from types import ModuleType
from typing import List

import torch


def machine(*libraries: ModuleType) -> str:
    """CPU model, core count, GPU and library versions (torch first), on one line."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    versions = ", ".join(f"{m.__name__} {m.__version__}" for m in (torch, *libraries))
    return f"{cpu}, {os.cpu_count()} cores, {gpu}; {versions}, Python {platform.python_version()}"


def markdown_table(header: List[str], rows: List[List[object]]) -> str:
    """A Markdown table from a header and rows of printable values."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows])
