"""Throughput of BYOL's two views: byol_pytorch vs kornia vs torchvision v2 applied image by image.

All three run the same operations with the paper's parameters (Grill et al. 2020, Table 6): random
resized crop (bicubic), flip 0.5, colour jitter 0.8 (0.4, 0.4, 0.2, 0.1), grayscale 0.2, Gaussian
blur 1.0 / 0.1 (kernel 10% of the side), solarize 0.0 / 0.2, ImageNet normalisation. The input is a
float batch in [0, 1] already on the device. Contenders are timed in alternation (A B C A B C ...) and
the medians reported; "images/s" counts input images, each turned into both views.

    python -m benchmarks.augment              # CPU rows (64 px from 72 px), GPU rows if CUDA is available
    python -m benchmarks.augment --smoke      # tiny sizes, a few seconds
"""

from __future__ import annotations

import argparse
import os

# On a shared, oversubscribed CPU, OpenMP's default spin-waiting makes every parallel op wait for
# descheduled threads; passive waiting (set before torch loads) cuts that noise for all contenders.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from benchmarks.common.machine import load_average, machine  # noqa: E402
from benchmarks.common.runner import device_sync, time_alternating  # noqa: E402
from byol_pytorch import BYOLAugment  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VIEWS = ((1.0, 0.0), (0.1, 0.2))  # (blur_p, solarize_p) of view 1 and view 2


def make_ours(size: int):
    views = [BYOLAugment(size, view=1), BYOLAugment(size, view=2)]
    return lambda x: [v(x) for v in views]


def make_kornia(size: int, kernel: int):
    import kornia.augmentation as K

    # kornia's ColorJitter has torchvision's semantics (ColorJiggle does not); it draws one random
    # order per call for the whole batch, where ours and torchvision draw one per image.
    views = [
        K.AugmentationSequential(
            K.RandomResizedCrop(
                (size, size), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), resample="BICUBIC", align_corners=False
            ),
            K.RandomHorizontalFlip(p=0.5),
            K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8),
            K.RandomGrayscale(p=0.2),
            K.RandomGaussianBlur((kernel, kernel), (0.1, 2.0), p=blur_p),
            K.RandomSolarize(thresholds=0.0, additions=0.0, p=solarize_p),  # threshold exactly 0.5
            K.Normalize(mean=torch.tensor(MEAN), std=torch.tensor(STD)),
        )
        for blur_p, solarize_p in VIEWS
    ]
    return lambda x: [v(x) for v in views]


def make_torchvision(size: int, kernel: int):
    import torchvision.transforms.v2 as T

    views = [
        T.Compose(
            [
                T.RandomResizedCrop(
                    size,
                    scale=(0.08, 1.0),
                    ratio=(3 / 4, 4 / 3),
                    interpolation=T.InterpolationMode.BICUBIC,
                    antialias=True,
                ),
                T.RandomHorizontalFlip(0.5),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                T.RandomGrayscale(0.2),
                T.RandomApply([T.GaussianBlur(kernel, (0.1, 2.0))], p=blur_p),
                T.RandomSolarize(0.5, p=solarize_p),
                T.Normalize(MEAN, STD),
            ]
        )
        for blur_p, solarize_p in VIEWS
    ]
    return lambda x: [torch.stack([v(image) for image in x]) for v in views]


def bench(device: str, batch: int, in_size: int, out_size: int, repeats: int) -> list:
    """One row per contender: setting, name, median / min / max ms, images/s, time / ours."""
    kernel = 2 * int(0.1 * out_size / 2) + 1  # 10% of the side, odd: 23 at 224
    x = torch.rand(batch, 3, in_size, in_size, device=device)
    contenders = {
        "ours": make_ours(out_size),
        "kornia": make_kornia(out_size, kernel),
        "torchvision": make_torchvision(out_size, kernel),
    }
    with torch.no_grad():  # one warm-up call each, then rounds of one call each
        calls = [lambda fn=fn: fn(x) for fn in contenders.values()]
        timings = time_alternating(calls, 1, repeats, device_sync(device))
    ours = timings[0].median()
    rows = []
    for name, t in zip(contenders, timings):
        med = t.median()
        setting = f"{device} {out_size}px from {in_size}px"
        rows.append((setting, name, med * 1e3, min(t.wall) * 1e3, max(t.wall) * 1e3, batch / med, med / ours))
    return rows


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and 2 repeats, to check the script runs")
    parser.add_argument("--batch", type=int, default=256, help="images per batch (each gets both views)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per contender, alternating")
    parser.add_argument(
        "--device",
        choices=("all", "cpu", "cuda"),
        default="all",
        help="'all' runs CPU rows, and GPU rows when CUDA is available",
    )
    return parser


def main(args: argparse.Namespace) -> str:
    """Print (and return) the machine, the table, row by row, and the load average around the run."""
    torch.manual_seed(0)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    sizes = {"cpu": (72, 64), "cuda": (256, 224)}
    batch, repeats = (8, 2) if args.smoke else (args.batch, args.repeats)
    printed: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        printed.append(text)

    say(f"machine: {machine()}; {torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    say(f"batch {batch}, both views, median of {repeats} alternating rounds\n")
    say("| setting | contender | median ms | min ms | max ms | images/s | time / ours |")
    say("|---|---|---:|---:|---:|---:|---:|")
    load = load_average()
    for device in devices:
        in_size, out_size = (20, 16) if args.smoke else sizes[device]
        for row in bench(device, batch, in_size, out_size, repeats):
            say("| {} | {} | {:.1f} | {:.1f} | {:.1f} | {:.0f} | {:.2f}x |".format(*row))
    say(f"\n1-minute load average {load:.1f} before, {load_average():.1f} after (other processes share the CPU)")
    return "\n".join(printed)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
