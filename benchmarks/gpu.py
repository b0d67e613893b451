"""The GPU check: the CUDA test suite, then the GPU rows of BENCHMARKS.md, in one command (under 10 minutes).

Whoever first has a CUDA device runs, from the repository root (the package installed with
``pip install --no-deps --no-build-isolation -e .`` where no registry is reachable)::

    python -m benchmarks.gpu --out benchmarks/results/gpu.md

and commits the file: it names the device and holds the figures. Parts, each with a time limit
so that one slow part cannot eat the others' time:

1. ``pytest tests/gpu`` (sync-free step, one sync per fp16 step, NaN within two updates, no
   false alarm on a slow stream, ``torch.compile`` without graph breaks, the README snippet and
   the CLI at 224 px on ResNet-50, bf16, channels_last);
2. ``benchmarks.train_step --device cuda``: images/s of a step of ours against the bare
   backbone's floor and the peer (ResNet-50, 224 px, batch 256, bf16, channels_last; eager and
   ``torch.compile``);
3. ``benchmarks.ema --devices cuda``: the EMA of a ResNet-50, ours against the peer's loop;
4. ``benchmarks.augment --device cuda``: the views' throughput against kornia and torchvision.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import REPO
from benchmarks.common.machine import machine
from benchmarks.common.report import command_line

__all__ = ["PARTS", "main"]

# (title, command after ``python``, seconds allowed)
PARTS: list[tuple[str, list[str], int]] = [
    ("CUDA test suite", ["-m", "pytest", "-q", "-rs", "tests/gpu"], 180),
    ("train step, ResNet-50, 224 px", ["-m", "benchmarks.train_step", "--device", "cuda", "--steps", "20"], 300),
    ("EMA of a ResNet-50", ["-m", "benchmarks.ema", "--devices", "cuda", "--repeats", "100"], 45),
    ("the two views", ["-m", "benchmarks.augment", "--device", "cuda", "--repeats", "5"], 60),
]


def _run(title: str, argv: list[str], seconds: int) -> str:
    start = time.perf_counter()
    # A session of its own: on a time-out the whole group goes (pytest and the `byol-pytorch train`
    # it started, with its loader workers), so nothing keeps the GPU busy during the next part.
    process = subprocess.Popen(
        [sys.executable, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=seconds)
        status = "ok" if process.returncode == 0 else f"exit {process.returncode}"
        output = stdout + ("\n" + stderr[-4000:] if process.returncode else "")
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, _ = process.communicate()
        status, output = f"stopped after {seconds} s", stdout or ""
    took = time.perf_counter() - start
    print(f"[{title}] {status} in {took:.0f} s", flush=True)
    return f"## {title}: {status} ({took:.0f} s)\n\n`python {' '.join(argv)}`\n\n```\n{output.strip()[-12000:]}\n```\n"


def main(args: argparse.Namespace) -> str:
    if not torch.cuda.is_available() and not args.dry_run:
        raise SystemExit("benchmarks.gpu: error: no CUDA device; this check is for a machine with a GPU")
    parts = PARTS if not args.only else [p for p in PARTS if any(word in p[0] for word in args.only)]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (dry run)"
    sections = [_run(title, argv, seconds) for title, argv, seconds in (parts if not args.dry_run else [])]
    text = (
        f"# The GPU check\n\nDevice: {device}\n\nMachine: {machine()}\n\nCommand: `{command_line()}`\n\n"
        + "\n".join(sections)
    )
    if args.out:
        args.out.write_text(text)
    return text


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="the results file to write")
    parser.add_argument("--only", nargs="+", default=None, help="run only the parts whose title has one of these words")
    parser.add_argument("--dry-run", action="store_true", help="no part runs: the report's frame only (tests)")
    return parser


if __name__ == "__main__":
    print(main(get_args_parser().parse_args()))
