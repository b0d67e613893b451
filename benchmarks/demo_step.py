"""The demo's training step under two settings, alternated: what a change to the demo costs.

A change to ``byol-pytorch demo`` (a wider net, another pooling, bigger heads) must not make
the demo run more than 10% longer (issue 21). This times the demo's step as built from its
settings (its learner, views and AdamW, one ``update_moving_average`` per step; no scheduler,
no engine) for settings A and B in one process, alternating A B A B ... after untimed
warm-up, on the same batches, and prints the median step time of each and their ratio. CPU
time by default (``--clock cpu``), which other jobs on a shared machine hardly change;
``--clock wall`` for an idle one.

    python -m benchmarks.demo_step --a pool=1 --b pool=2 --threads 1 --steps 40
    python -m benchmarks.demo_step --smoke
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common.contenders import byol_step
from benchmarks.common.machine import machine
from benchmarks.common.report import markdown_table, write_results
from byol_pytorch.app import demo
from byol_pytorch.app.errors import UserError
from byol_pytorch.training.optim import build_optimizer


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--a",
        nargs="*",
        default=["pool=1"],
        metavar="KEY=VALUE",
        help="setting A: demo settings changed (default: pool=1, the global pool)",
    )
    parser.add_argument(
        "--b", nargs="*", default=[], metavar="KEY=VALUE", help="setting B (default: the demo's defaults)"
    )
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each setting")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--smoke", action="store_true", help="2 timed steps of batch 16: seconds")
    parser.add_argument("--out", default=None, help="also write the table, machine and command here")
    return parser


def _settings(changes: list[str], smoke: bool) -> dict[str, Any]:
    """The demo's settings with ``KEY=VALUE`` changes, checked as ``byol-pytorch demo`` checks its flags."""
    flags: dict[str, Any] = {"batch_size": 16} if smoke else {}
    for change in changes:
        key, _, value = change.partition("=")
        if key not in demo.DEMO_DEFAULTS:
            raise SystemExit(f"demo_step.py: error: {key!r} is not a demo setting ({', '.join(demo.DEMO_DEFAULTS)})")
        flags[key] = type(demo.DEMO_DEFAULTS[key])(value)
    try:
        return demo._settings(argparse.Namespace(**flags, device="cpu"))
    except UserError as exc:
        raise SystemExit(f"demo_step.py: error: {exc}") from None


def _batches(batch_size: int, count: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randint(0, 256, (batch_size, 1, 28, 28), dtype=torch.uint8, generator=generator) for _ in range(count)
    ]


def _stepper(settings: dict[str, Any]):
    """One demo step of a fresh learner (seeded like the demo) as a closure over a batch."""
    torch.manual_seed(settings["seed"])
    learner, *_ = demo._demo_learner(settings)
    optimizer = build_optimizer("adamw", learner, settings["lr"], settings["weight_decay"])

    return lambda batch: byol_step(learner, lambda x: x, optimizer, batch)


def main(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    steps, warmup = (2, 1) if args.smoke else (args.steps, args.warmup)
    settings = {"A": _settings(args.a, args.smoke), "B": _settings(args.b, args.smoke)}
    if settings["A"] == settings["B"]:  # a docs probe: the defaults once timed the demo against itself
        raise SystemExit("demo_step.py: error: settings A and B are the same; change one with --a or --b KEY=VALUE")
    steppers = {name: _stepper(s) for name, s in settings.items()}
    batches = {name: _batches(s["batch_size"]) for name, s in settings.items()}  # the same images where sizes agree
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {"A": [], "B": []}
    for i in range(warmup + steps):
        for name, step in steppers.items():
            start = clock()
            step(batches[name][i % 4])
            if i >= warmup:
                times[name].append(clock() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    rows = [
        [
            name,
            " ".join(getattr(args, name.lower())) or "the demo's defaults",
            settings[name]["batch_size"],
            f"{median[name] * 1000:.2f}",
        ]
        for name in ("A", "B")
    ]
    table = "\n".join(
        [
            f"### The demo's step: median of {steps} alternated steps after {warmup} warm-up, "
            f"{args.threads} thread(s), {args.clock} clock",
            "",
            markdown_table(["setting", "changes", "batch", "ms / step"], rows),
            "",
            f"B / A: {median['B'] / median['A']:.3f}x",
        ]
    )
    print(table)
    if args.out:
        write_results(Path(args.out), "The demo's step under two settings", machine(), table)
    return table


if __name__ == "__main__":
    main(get_args_parser().parse_args())
