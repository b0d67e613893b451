"""Peak memory of ``byol-pytorch embed`` against the size of the dataset: does it stay flat?

``embed`` streams each batch's vectors to disk, so its memory should not grow with the number
of images. This makes folders of N tiny PNG images (16 px, two levels of sub-folders), trains a
2-step checkpoint of timm's ``resnet10t`` (heads 32/16), then runs ``byol-pytorch embed`` on
each folder in a fresh process and reads that process's peak resident memory
(``ru_maxrss`` of the child). The table gives the peak RSS per N and the ratio to the smallest N.

    python -m benchmarks.embed --sizes 10000 100000 --out benchmarks/results/embed.md
    python -m benchmarks.embed --smoke          # 200 and 2,000 images: seconds
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
from PIL import Image

from benchmarks.common import REPO
from benchmarks.common.machine import load_average, machine
from benchmarks.common.report import markdown_table, write_results
from benchmarks.common.runner import child_env

__all__ = ["main", "make_folder"]

FLAGS = ["--model", "resnet10t", "--image-size", "16", "--batch-size", "8", "--projection-size", "16"]
FLAGS += ["--projection-hidden-size", "32", "--workers", "0", "--max-steps", "2"]


def make_folder(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` 16 px PNG images under ``root/dNN/eNN/`` (a few hundred per folder)."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    for i in range(count):
        folder = root / f"d{i // 10_000:02d}" / f"e{i // 250 % 40:02d}"
        if i % 250 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(palette[i % 64]).save(folder / f"{i:07d}.png", compress_level=1)
    return root


def _peak_rss_mb(argv: list[str], threads: int) -> tuple[float, float]:
    """Peak RSS (MB) and wall seconds of ``python -m byol_pytorch ARGV`` run in a fresh child."""
    probe = (
        "import resource, subprocess, sys, time; start = time.perf_counter(); "
        "code = subprocess.run([sys.executable, '-m', 'byol_pytorch', *sys.argv[1:]]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - start, code)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, *argv], capture_output=True, text=True, env=child_env(threads), cwd=REPO
    )
    kilobytes, seconds, code = result.stdout.split()[-3:]
    if int(code) != 0:
        raise SystemExit(f"embed failed: {result.stderr[-2000:]}")
    return int(kilobytes) / 1024, float(seconds)


def main(args: argparse.Namespace) -> str:
    sizes = [200, 2000] if args.smoke else sorted(args.sizes)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train = make_folder(work / "train", 64)
        run = work / "run"
        subprocess.run(
            [sys.executable, "-m", "byol_pytorch", "train", "--data", str(train), "--out", str(run), *FLAGS],
            check=True,
            capture_output=True,
            env=child_env(args.threads),
            cwd=REPO,
        )
        for size in sizes:
            images = make_folder(work / f"images_{size}", size)
            out = work / f"emb_{size}"
            argv = ["embed", "--data", str(images), "--checkpoint", str(run / "last.pt"), "--out", str(out)]
            argv += ["--batch-size", "256", "--workers", str(args.workers)]
            peak, seconds = _peak_rss_mb(argv, args.threads)
            written = json.loads((out / "embed.json").read_text())
            rows.append((size, written["rows"], peak, seconds))
            print(f"{size} images: peak RSS {peak:.0f} MB, {seconds:.0f} s", flush=True)
    base = rows[0][2]
    table = markdown_table(
        ["images", "rows written", "peak RSS (MB)", "ratio to the smallest", "wall (s)"],
        [[f"{n:,}", f"{r:,}", f"{p:.0f}", f"{p / base:.2f}", f"{s:.0f}"] for n, r, p, s in rows],
    )
    text = (
        f"Peak resident memory of `byol-pytorch embed` (resnet10t, 16 px, batch 256, {args.workers} loader "
        f"workers, float16 vectors of 512), one fresh process per size; load average {load_average():.1f}.\n\n" + table
    )
    if args.out:
        write_results(args.out, "embed: memory against the dataset's size", machine(timm), text)
    print(text)
    return text


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="images per folder")
    parser.add_argument("--workers", type=int, default=0, help="embed's loader workers (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the children (default: 1)")
    parser.add_argument("--smoke", action="store_true", help="200 and 2,000 images: seconds")
    parser.add_argument("--out", type=Path, default=None, help="also write the table, machine and command here")
    return parser


if __name__ == "__main__":
    start = time.perf_counter()
    main(get_args_parser().parse_args())
    print(f"total {time.perf_counter() - start:.0f} s; peak of this process {resource.getrusage(0).ru_maxrss} KB")
