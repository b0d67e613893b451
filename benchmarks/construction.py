"""What ``BYOL(net, image_size)`` costs to build, and the share of the training-mode check in it.

Construction deep-copies the net, runs it once in eval mode with autograd on (the probe that
finds the hidden layer and the unused parameters), once more to see whether it draws random
numbers in eval mode, and once in training mode without autograd (a part that runs only in
training, such as an auxiliary classifier, that fails at the image size is named at
construction rather than at the first step). Timed, alternating:

* ``BYOL(net, S)``: the whole construction, on a freshly built net (its building not timed);
* ``training-mode check``: what that last call does, timed alone: the net in training mode,
  no autograd, the probe's batch of 2 images of side S, the RNG stream forked and given back.

The table gives the medians, and the check's share of the construction.

    python -m benchmarks.construction --threads 1
    python -m benchmarks.construction --smoke
    python -m benchmarks.construction --threads 1 --out benchmarks/results/construction.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torchvision

from benchmarks.common.machine import machine
from benchmarks.common.report import markdown_table, write_results
from byol_pytorch import BYOL

NETS = {  # name -> (builder, image side)
    "resnet50 (torchvision)": (lambda: torchvision.models.resnet50(weights=None), 224),
    "vit_small_patch16_224 (timm)": (lambda: timm.create_model("vit_small_patch16_224", pretrained=False), 224),
    "mobilenetv3_large_100 (timm)": (lambda: timm.create_model("mobilenetv3_large_100", pretrained=False), 224),
    "resnet18 (torchvision), 32 px": (lambda: torchvision.models.resnet18(weights=None), 32),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed constructions per contender and net")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (1 is steadier)")
    parser.add_argument("--smoke", action="store_true", help="the 32 px resnet18 alone, 2 rounds: seconds")
    parser.add_argument("--out", type=Path, default=None, help="also write the table, machine and command here")
    return parser


def _construct(build: Callable[[], torch.nn.Module], side: int) -> float:
    """Seconds of one ``BYOL(net, side)`` on a freshly built net (its building not timed)."""
    net = build()
    start = time.perf_counter()
    BYOL(net, side)
    return time.perf_counter() - start


def _training_forward(build: Callable[[], torch.nn.Module], side: int) -> float:
    """Seconds of the training-mode check's work on a freshly built net: one no-autograd forward in training mode
    of a batch of 2 images, the RNG stream forked."""
    net = build()
    x = torch.rand(2, 3, side, side)
    start = time.perf_counter()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        net.train()
        net(x)
    return time.perf_counter() - start


def main(args: argparse.Namespace) -> str:
    if args.threads:
        torch.set_num_threads(args.threads)
    names = ["resnet18 (torchvision), 32 px"] if args.smoke else list(NETS)
    repeats = 2 if args.smoke else args.repeats
    rows = []
    for name in names:
        build, side = NETS[name]
        _construct(build, side)  # warm-up: first-call costs (allocator, lazy imports)
        times: dict[str, list[float]] = {"construct": [], "check": []}
        for round_ in range(repeats):
            for part in ("construct", "check") if round_ % 2 == 0 else ("check", "construct"):
                timed = _construct if part == "construct" else _training_forward
                times[part].append(timed(build, side))
        whole, check = statistics.median(times["construct"]), statistics.median(times["check"])
        rows.append([name, f"{whole:.3f}", f"{check:.3f}", f"{check / whole:.0%}"])
    header = ["net", "BYOL(net, S) s", "training-mode check s", "its share"]
    table = markdown_table(header, rows)
    print(table)
    if args.out is not None:
        line = machine(timm, torchvision, extra=f"torch threads {torch.get_num_threads()}")
        write_results(args.out, "Construction: what BYOL(net, image_size) costs", line, table)
    return table


if __name__ == "__main__":
    main(get_args_parser().parse_args())
