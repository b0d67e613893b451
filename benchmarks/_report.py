"""What every benchmark prints around its table: machine line, command line, Markdown table, results file."""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import sys
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parents[1]


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


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table from a header and rows of printable values."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows])


def command_line() -> str:
    """This process's command line as typed from the repository root."""
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


def write_results(path: Path, title: str, machine_line: str, table: str, append: bool = False) -> None:
    """Write ``# title``, the machine, the command and the table to `path` (or add them after a rule)."""
    section = f"Machine: {machine_line}\n\nCommand: `{command_line()}`\n\n{table}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    if append and path.exists():
        path.write_text(path.read_text() + "\n---\n\n" + section)
    else:
        path.write_text(f"# {title}\n\n" + section)
