"""What every benchmark prints around its table: the command line, Markdown tables, the results file."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from benchmarks.common import REPO

__all__ = ["command_line", "emit_report", "markdown_table", "ms", "verdict", "write_or_check", "write_results"]


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table from a header and rows of printable values."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows])


def command_line() -> str:
    """This process's command line as typed from the repository root: ``python -m benchmarks.NAME ...``."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else REPO
    try:
        relative = script.relative_to(REPO)
    except ValueError:
        relative = None
    if relative is not None and relative.parts[:1] == ("benchmarks",) and relative.suffix == ".py":
        head = ["-m", ".".join(relative.with_suffix("").parts)]
    else:
        head = [os.path.relpath(sys.argv[0], REPO)]
    return "python " + " ".join(shlex.quote(a) for a in [*head, *sys.argv[1:]])


def write_results(path: Path, title: str, machine_line: str, table: str, append: bool = False) -> None:
    """Write ``# title``, the machine, the command and the table to `path` (or add them after a rule)."""
    section = f"Machine: {machine_line}\n\nCommand: `{command_line()}`\n\n{table}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    if append and path.exists():
        path.write_text(path.read_text() + "\n---\n\n" + section)
    else:
        path.write_text(f"# {title}\n\n" + section)


def verdict(ok: bool) -> str:
    """A goal's verdict as the tables write it."""
    return "**met**" if ok else "**not met**"


def ms(seconds: float) -> str:
    """Seconds as milliseconds with one decimal."""
    return f"{seconds * 1e3:.1f}"


def emit_report(report: str, output: Path | None) -> str:
    """Print a benchmark's Markdown report and, with ``output``, write it there; returns the report."""
    print("\n" + report)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(report + "\n", encoding="utf-8")
        print(f"\nwrote {output}")
    return report


def write_or_check(path: Path, text: str, check: bool, stale: str) -> int:
    """Write ``text`` to a generated file, or with ``check`` only say whether the file already holds it.

    Returns the exit status: 1 where ``check`` finds the file different (``stale``, the message naming
    the command that rebuilds it, goes to stderr), else 0.
    """
    name = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    if check:
        if path.read_text(encoding="utf-8") != text:
            print(stale, file=sys.stderr)
            return 1
        print(f"{name} is up to date")
        return 0
    path.write_text(text, encoding="utf-8", newline="\n")
    print(f"wrote {name}")
    return 0
