"""How the benchmarks run their contenders: alternated timing, medians, and child processes.

Contenders are timed in rounds (A B C ... A B C ...) after untimed warm-up calls, so that a
machine whose load changes during the run slows every contender alike; each call records the
wall clock and this process's CPU time (which other jobs on a shared CPU barely move).
Measurements that need a fresh process run ``python -m benchmarks.NAME ...`` from the
repository root, single-threaded unless told otherwise.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.common import REPO

__all__ = [
    "Timings",
    "child_env",
    "device_sync",
    "module_command",
    "run_module",
    "spawn_module",
    "time_alternating",
]


@dataclass
class Timings:
    """Seconds of each timed call of one contender: the wall clock and this process's CPU time."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def median(self, clock: str = "wall") -> float:
        """The median call, on the ``"wall"`` or the ``"cpu"`` clock."""
        return statistics.median(self.cpu if clock == "cpu" else self.wall)


def device_sync(device: torch.device | str) -> Callable[[], None]:
    """What waits for the device's queued work: ``torch.cuda.synchronize`` on a GPU, nothing on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_alternating(
    calls: Sequence[Callable[[], Any]],
    warmup: int,
    repeats: int,
    sync: Callable[[], None] | None = None,
    reverse_odd_rounds: bool = False,
) -> list[Timings]:
    """Warm up each call, then time `repeats` rounds of one call each: A B C ... A B C ...

    Args:
        calls: the contenders, each a call doing one unit of work.
        warmup: untimed calls of each contender first (compilation, caches, workers).
        repeats: timed rounds.
        sync: waits for the device before and after each timed call (see :func:`device_sync`).
        reverse_odd_rounds: every other round runs the contenders backwards (A B, B A, ...).

    Returns:
        One :class:`Timings` per call, in the order of `calls`.
    """
    sync = sync or (lambda: None)
    for call in calls:
        for _ in range(warmup):
            call()
        sync()
    timings = [Timings() for _ in calls]
    order = list(range(len(calls)))
    for round_ in range(repeats):
        for i in order[::-1] if reverse_odd_rounds and round_ % 2 else order:
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            calls[i]()
            sync()
            timings[i].wall.append(time.perf_counter() - start)
            timings[i].cpu.append(time.process_time() - cpu_start)
    return timings


def child_env(threads: int | str | None = 1) -> dict[str, str]:
    """This process's environment for a child: `threads` OpenMP / MKL threads (None: unchanged), the repo importable."""
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def module_command(module: str, *args: str) -> list[str]:
    """``python -m module args...`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def run_module(module: str, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m module args...`` single-threaded from the repository root; its output captured."""
    command = module_command(module, *args)
    return subprocess.run(command, cwd=REPO, env=child_env(1), capture_output=True, text=True, timeout=timeout)


def spawn_module(module: str, *args: str, threads: int | str | None = 1, **popen: Any) -> subprocess.Popen:
    """Start ``python -m module args...`` from the repository root (`threads` as in :func:`child_env`)."""
    return subprocess.Popen(module_command(module, *args), cwd=REPO, env=child_env(threads), **popen)
