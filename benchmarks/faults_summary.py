"""Run the fault suite (tests/test_faults.py, app/test_run_folder.py, data/test_remote.py) and write docs/FAULTS.md.

Each test of the suite appends what it injected and what held to the file named by
``BYOL_FAULTS_REPORT``; this script runs pytest with that set, then groups the rows by
fault (fuzz rows are summed and their outcomes counted). The numbers come from the run.

    python -m benchmarks.faults_summary                       # 150 fuzz examples per property
    python -m benchmarks.faults_summary --examples 2000 --out docs/FAULTS.md
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO as ROOT
from benchmarks.common.runner import child_env, module_command

__all__ = ["main", "summarise"]

HEAD = """# The fault suite

`tests/test_faults.py`, `tests/app/test_run_folder.py` and `tests/data/test_remote.py` (shards over a real
HTTP server that the tests stop and start) inject the faults below into `byol-pytorch` and the Python API
and check what must hold: a run finishes bitwise equal to an uninterrupted one, or it ends
with one line `byol-pytorch: error: ...` (naming the problem and the fix), a non-zero exit,
no traceback (`--debug` or `BYOL_PYTORCH_DEBUG=1` shows it) and nothing saved lost. The
Python API's `BYOL(...)` and `learner(x)` raise only `TypeError`, `ValueError` or
`FloatingPointError`. CI runs the suite with every other test; this table is written by
`python -m benchmarks.faults_summary` from a real run of it (the numbers below are that run's).
"""


def summarise(rows: list[dict]) -> list[tuple[str, int, str, str]]:
    """``(fault, injected, what held, seconds)`` per fault, fuzz outcomes counted.

    Args:
        rows: the JSON rows the suite wrote.

    Returns:
        One tuple per fault, in the order the suite first reported it.
    """
    grouped: dict[str, list[dict]] = collections.defaultdict(list)
    for row in rows:
        grouped[row["fault"]].append(row)
    table = []
    for fault, items in grouped.items():
        injected = sum(int(r["injected"]) for r in items)
        if fault.startswith("fuzz:"):
            counts = collections.Counter(r["held"] for r in items)
            outcomes = ", ".join(f"{n} {what}" for what, n in counts.most_common())
            held = f"only TypeError/ValueError/FloatingPointError escaped ({outcomes})"
        else:
            held = "; ".join(dict.fromkeys(r["held"] for r in items))
        seconds = [r["seconds"] for r in items if r.get("seconds") is not None]
        table.append((fault, injected, held, f"{max(seconds):.1f}" if seconds else ""))
    return table


def main(argv: list[str] | None = None) -> int:
    """Run the suite, print and write the table; returns pytest's exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=150, help="fuzz examples per property")
    parser.add_argument("--out", default=str(ROOT / "docs" / "FAULTS.md"), help="Markdown file to write")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "faults.jsonl"
        env = dict(child_env(threads=None), BYOL_FAULTS_REPORT=str(report), BYOL_FAULTS_EXAMPLES=str(args.examples))
        cmd = module_command(
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_faults.py",
            "tests/app/test_run_folder.py",
            "tests/data/test_remote.py",
        )
        started = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        elapsed = time.time() - started
        rows = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    verdict = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "no output"
    lines = [HEAD, "| fault | injected | what held | seconds to exit |", "|---|---|---|---|"]
    lines += [f"| {f} | {n} | {held} | {sec} |" for f, n, held, sec in summarise(rows)]
    lines += [
        "",
        f"Run: `{' '.join(cmd[1:])}` with `BYOL_FAULTS_EXAMPLES={args.examples}`: {verdict} "
        f"({elapsed:.0f} s wall on {os.cpu_count()} CPUs, {platform.python_implementation()} "
        f"{platform.python_version()}, {platform.system()}; 'seconds to exit' is from the fault to the "
        "process's exit, the slowest of its injections).",
        "",
    ]
    text = "\n".join(lines)
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-2000:], file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
