"""Images per second: byol_pytorch's ImageFolder loader vs a plain torchvision one.

Both loaders read the same JPEG files with the same DataLoader settings (workers,
batch size, persistent workers, no shuffling) and hand out the same thing: uint8
(B, 3, S, S), shorter side resized to S, centre crop. The baseline is
torchvision.datasets.ImageFolder + PIL + Resize(S) / CenterCrop(S) / PILToTensor.

Test images (random smooth multi-scale texture, JPEG quality 90) are generated once into
a cache folder. Each loader runs one untimed warm-up epoch (worker start, page cache),
then timed epochs alternate between the contenders, and medians are reported.

    python -m benchmarks.data_loading                   # full run, prints a table
    python -m benchmarks.data_loading --smoke           # tiny sizes, seconds
    python -m benchmarks.data_loading --output benchmarks/results/data_loading.md
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import torchvision
from PIL import Image, features
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from benchmarks.common import REPO
from benchmarks.common.machine import load_average, machine
from benchmarks.common.report import command_line, emit_report, markdown_table
from benchmarks.common.runner import time_alternating
from byol_pytorch.data import ImageFolder, make_loader


@dataclass(frozen=True)
class Case:
    count: int
    width: int
    height: int
    load_size: int
    batch_size: int

    @property
    def folder(self) -> str:
        return f"{self.width}x{self.height}_q90_n{self.count}"


FULL = [Case(64, 4000, 3000, 224, 16), Case(512, 256, 256, 224, 64), Case(512, 256, 256, 72, 64)]
SMOKE = [Case(8, 800, 600, 64, 4), Case(32, 64, 64, 32, 8)]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="DataLoader workers for both contenders (default 2: this machine's cores)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per contender and case")
    parser.add_argument(
        "--cache",
        type=Path,
        default=REPO / ".bench" / "data_loading",
        help="where the generated JPEGs are kept between runs (git-ignored .bench/)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny images and counts; runs in seconds")
    parser.add_argument("--output", type=Path, default=None, help="also write the table as Markdown here")
    return parser


def _texture(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Smooth random colours with detail at a few scales, like a photo's spectrum."""
    total = np.zeros((height, width, 3), dtype=np.float32)
    # Amplitudes chosen so that a 4000x3000 file is ~2.4 MB at quality 90, like a photo.
    scales = ((3, 80.0), (24, 35.0), (160, 20.0), (max(2, width // 8), 20.0), (max(2, width // 3), 12.0))
    for cells, amplitude in scales:
        rows = max(2, round(cells * height / width))
        noise = rng.integers(0, 256, (rows, cells, 3), dtype=np.uint8)
        layer = Image.fromarray(noise).resize((width, height), Image.Resampling.BICUBIC)
        total += (np.asarray(layer, dtype=np.float32) - 128.0) * (amplitude / 128.0)
    return Image.fromarray(np.clip(total + 128.0, 0, 255).astype(np.uint8))


def ensure_images(cache: Path, case: Case) -> Path:
    """The case's JPEG folder, generated on first use (ROOT/images/NNNN.jpg)."""
    root = cache / case.folder
    done = root / ".complete"
    if not done.exists():
        images = root / "images"  # one "class" folder, which torchvision's ImageFolder needs
        images.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        print(f"generating {case.count} JPEGs of {case.width}x{case.height} in {root} ...", flush=True)
        for i in range(case.count):
            _texture(case.width, case.height, rng).save(images / f"{i:04d}.jpg", quality=90)
        done.touch()
    return root


def torchvision_loader(root: Path, case: Case, workers: int) -> DataLoader:
    transform = transforms.Compose(
        [
            transforms.Resize(case.load_size),
            transforms.CenterCrop(case.load_size),
            transforms.PILToTensor(),
        ]
    )
    return DataLoader(
        datasets.ImageFolder(str(root), transform=transform),
        batch_size=case.batch_size,
        shuffle=False,
        num_workers=workers,
        persistent_workers=workers > 0,
        drop_last=False,
    )


def ours_loader(root: Path, case: Case, workers: int) -> DataLoader:
    return make_loader(
        ImageFolder(root, case.load_size), case.batch_size, workers, shuffle=False, drop_last=False, pin_memory=False
    )


def epoch(loader: DataLoader, expected: int) -> None:
    """One pass over the loader; it must hand out `expected` images."""
    seen = 0
    for images, _ in loader:
        seen += len(images)
    if seen != expected:
        raise RuntimeError(f"loader gave {seen} images, expected {expected}")


def mean_abs_difference(loaders: dict[str, DataLoader], count: int = 8) -> float:
    """Mean |ours - torchvision| over the first images, on the 0..255 scale."""
    ours = next(iter(loaders["ours"]))[0][:count].float()
    theirs = next(iter(loaders["torchvision"]))[0][:count].float()
    return (ours - theirs).abs().mean().item()


def run_case(case: Case, args: argparse.Namespace) -> dict:
    root = ensure_images(args.cache, case)
    loaders = {
        "ours": ours_loader(root, case, args.workers),
        "torchvision": torchvision_loader(root, case, args.workers),
    }
    difference = mean_abs_difference(loaders)
    # One untimed warm-up epoch each, then timed epochs: ours, torchvision; torchvision, ours; ...
    calls = [lambda loader=loader: epoch(loader, case.count) for loader in loaders.values()]
    timed = time_alternating(calls, 1, args.repeats, reverse_odd_rounds=True)
    times = {name: t.wall for name, t in zip(loaders, timed)}
    rates = {name: case.count / statistics.median(t) for name, t in times.items()}
    spread = {name: (case.count / max(t), case.count / min(t)) for name, t in times.items()}
    kilobytes = statistics.mean(p.stat().st_size for p in (root / "images").iterdir()) / 1000
    return {"case": case, "rates": rates, "spread": spread, "difference": difference, "kilobytes": kilobytes}


def _rate(images_per_second: float) -> str:
    return f"{images_per_second:.1f}" if images_per_second < 100 else f"{images_per_second:.0f}"


def table(results: list[dict], workers: int) -> str:
    header = [
        "images",
        "load size",
        "batch",
        "workers",
        "ours img/s (min-max)",
        "torchvision img/s (min-max)",
        "ours / torchvision",
        "mean abs diff (0-255)",
    ]
    rows = []
    for result in results:
        case, rates, spread = result["case"], result["rates"], result["spread"]
        cells = [
            f"{case.count} x {case.width}x{case.height} JPEG q90, {result['kilobytes']:.0f} kB avg",
            str(case.load_size),
            str(case.batch_size),
            str(workers),
            *(
                f"{_rate(rates[name])} ({_rate(spread[name][0])}-{_rate(spread[name][1])})"
                for name in ("ours", "torchvision")
            ),
            f"{rates['ours'] / rates['torchvision']:.2f}x",
            f"{result['difference']:.2f}",
        ]
        rows.append(cells)
    return markdown_table(header, rows)


def main(args: argparse.Namespace) -> str:
    if args.smoke:
        args.repeats = min(args.repeats, 2)
    load_before = load_average()
    results = []
    for case in SMOKE if args.smoke else FULL:
        results.append(run_case(case, args))
        print(table(results[-1:], args.workers).splitlines()[-1], flush=True)
    command, jpeg = command_line(), f"libjpeg-turbo {features.version('jpg')}"
    report = "\n".join(
        [
            "# Data loading: byol_pytorch ImageFolder vs torchvision ImageFolder",
            "",
            f"Command (from the repository root): `{command}`",
            "",
            f"Machine: {machine(torchvision, PIL, extra=jpeg)}",
            "",
            f"Medians of {args.repeats} timed epochs per contender (alternating, after one untimed "
            "warm-up epoch each); min-max in brackets. 1-minute load average "
            f"{load_before:.1f} before and {load_average():.1f} after the run: the cores are "
            "shared, so expect noise of tens of percent between runs.",
            "",
            table(results, args.workers),
            "",
            "Both contenders hand out the same uint8 (B, 3, S, S) batches (shorter side resized to S "
            'with antialiased bilinear, centre crop). "mean abs diff" compares their first batch: '
            "ours decodes a JPEG at 1/2, 1/4 or 1/8 scale in libjpeg (`Image.draft`) when the shorter "
            "side stays >= S, so its pixels differ slightly from a full decode; 0 means no reduced "
            "decode was possible and the outputs are identical.",
        ]
    )
    return emit_report(report, args.output)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
