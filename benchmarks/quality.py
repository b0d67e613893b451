"""Quality at equal budget: kNN accuracy on Fashion-MNIST after the same BYOL training.

The budget of issue 6: Fashion-MNIST padded from 28 to 32 px (2 zero pixels per side),
repeated to three channels; timm ``resnet10t`` (``num_classes=0``: its output is the
pooled (B, 512) feature); all 60,000 training images, 3 epochs, batch 256 (the last,
smaller batch of each epoch included), Adam lr 1e-3; the same seed for the initial
weights and for the data order. Contenders:

* ``random init``: the same initial weights, untrained;
* ``ours``: ``byol_pytorch.BYOL(net, 32)`` with its defaults (tau 0.99, the paper's views),
  fed the uint8 batch;
* ``peer vanilla``: lucidrains/byol-pytorch 0.9.1, ``use_simplicial_embeddings=False``,
  its default augmentation, fed the batch as float in [0, 1].

Evaluation: the backbone in eval mode on images scaled to [0, 1] and normalised as the
views normalise them (ImageNet mean/std, which is also the peer's normalisation);
weighted kNN (k 20, T 0.07, cosine) with the first 10,000 training images as the bank
and the 10,000 test images as queries.

On a 2-core CPU one contender takes a long time; time it first with ``--estimate`` and
run it in the background. ``--max-steps`` cuts the budget, and the table then says so.

    python benchmarks/quality.py --estimate 3             # seconds per step, projected total
    nohup python benchmarks/quality.py --out benchmarks/results/quality.md > .bench/quality.log &
    python benchmarks/quality.py --long                   # GPU: 100 epochs, kNN curve every 10
    python benchmarks/quality.py --smoke                  # 128 images, 1 epoch: seconds

Several seeds: run each contender with ``--seed N --save-json FILE`` and pass all the files
to ``--load-json``; the table then has a row per seed, the mean, std and min/max, and the
goals are judged on the means.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peer  # noqa: E402  (benchmarks/ is not a package)
from _report import command_line as _command  # noqa: E402
from _report import machine as _machine
from _report import markdown_table, write_results

from byol_pytorch import BYOL, BYOLAugment  # noqa: E402
from byol_pytorch.app.fashion_mnist import load_fashion_mnist  # noqa: E402
from byol_pytorch.evaluate import extract_features, knn_accuracy  # noqa: E402

RANDOM_GOAL, PEER_GOAL = 8.0, 5.0  # issue 6: kNN points above random init / above the peer
CONTENDERS = ("random", "ours", "ours1b", "peer")  # "ours1b" (an extra, not in the default run): the opt-in
DEFAULT_CONTENDERS = ("random", "ours", "peer")
LABELS = {"random": "random init", "ours": "ours", "ours1b": "ours, views in one batch", "peer": "peer vanilla"}
SMOKE_TRAIN, SMOKE_TEST, SMOKE_BATCH = 128, 64, 32


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="Fashion-MNIST IDX files (default: byol_pytorch's search path)"
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help="passes over the 60,000 images (default 3; --long 100)"
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and data order of every contender")
    parser.add_argument("--bank", type=int, default=10_000, help="kNN bank: the first N training images")
    parser.add_argument(
        "--contenders",
        default=",".join(DEFAULT_CONTENDERS),
        help=f"comma list of {', '.join(CONTENDERS)} (default: %(default)s; ours1b is "
        "BYOL(..., views_in_one_batch=True))",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop each contender after this many steps (a reduced budget, labelled as such)",
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="also evaluate kNN every N epochs, for a curve (default: at the end; --long: 10)",
    )
    parser.add_argument(
        "--estimate",
        type=int,
        default=0,
        metavar="N",
        help="time N steps of each contender, print the projected total, and stop",
    )
    parser.add_argument("--long", action="store_true", help="the GPU long run: 100 epochs, kNN every 10 epochs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--log-every", type=int, default=20, help="print progress every N steps")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"{SMOKE_TRAIN} training images, {SMOKE_TEST} queries, batch {SMOKE_BATCH}, 1 epoch: seconds",
    )
    parser.add_argument(
        "--save-json",
        type=Path,
        default=None,
        help="also save the results as JSON (to run contenders in separate processes)",
    )
    parser.add_argument(
        "--load-json",
        type=Path,
        nargs="+",
        default=None,
        help="train nothing: build the table from results saved with --save-json",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the table, machine and command here")
    return parser


@dataclass
class Data:
    """Padded, three-channel uint8 images and their labels."""

    train_x: torch.Tensor  # (N, 3, 32, 32) uint8
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor  # (M, 3, 32, 32) uint8
    test_y: torch.Tensor  # (M,) int64
    source: str


@dataclass
class Result:
    """One contender's outcome."""

    name: str
    accuracy: float
    steps: int
    seconds: float
    loss: float | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, kNN accuracy)
    command: str = ""  # the command that produced it
    seed: int = 0  # initial weights, data order and augmentation draws


def prepare(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, 28, 28) uint8 -> (N, 3, 32, 32) uint8: 2 black pixels per side, grey repeated to RGB."""
    return F.pad(images, (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()


def load_data(args: argparse.Namespace) -> Data:
    """Fashion-MNIST (or, for --smoke without the files, random images, said in `source`)."""
    try:
        train_x, train_y = load_fashion_mnist(args.data_dir, split="train")
        test_x, test_y = load_fashion_mnist(args.data_dir, split="test")
        source = "Fashion-MNIST"
    except (FileNotFoundError, ValueError) as error:
        if not args.smoke:
            raise
        print(f"Fashion-MNIST not found ({error}); the smoke run uses random images", file=sys.stderr)
        g = torch.Generator().manual_seed(0)
        train_x = torch.randint(0, 256, (SMOKE_TRAIN, 1, 28, 28), dtype=torch.uint8, generator=g)
        test_x = torch.randint(0, 256, (SMOKE_TEST, 1, 28, 28), dtype=torch.uint8, generator=g)
        train_y, test_y = torch.arange(SMOKE_TRAIN) % 10, torch.arange(SMOKE_TEST) % 10
        source = "random images (smoke)"
    if args.smoke:
        train_x, train_y, test_x, test_y = (
            train_x[:SMOKE_TRAIN],
            train_y[:SMOKE_TRAIN],
            test_x[:SMOKE_TEST],
            test_y[:SMOKE_TEST],
        )
    return Data(prepare(train_x), train_y.long(), prepare(test_x), test_y.long(), source)


def make_net(seed: int) -> nn.Module:
    """timm resnet10t without classifier, initialised from `seed` (identical for every contender)."""
    torch.manual_seed(seed)
    return timm.create_model("resnet10t", num_classes=0)


def make_learner(name: str, net: nn.Module, peer) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """The learner around `net` and how it takes a uint8 batch."""
    if name in ("ours", "ours1b"):
        return BYOL(net, 32, views_in_one_batch=name == "ours1b"), lambda x: x
    return _peer.make_peer(peer, net, 32, "vanilla"), lambda x: x.float().div_(255)


def knn(net: nn.Module, data: Data, bank: int, device: torch.device) -> float:
    """Weighted kNN accuracy (k 20, T 0.07) of the net's pooled features, as a percentage."""
    normalize = BYOLAugment(32).normalize  # uint8 -> [0, 1] -> ImageNet mean/std
    bank_f = extract_features(net, data.train_x[:bank], batch_size=512, device=device, transform=normalize)
    test_f = extract_features(net, data.test_x, batch_size=512, device=device, transform=normalize)
    return 100.0 * knn_accuracy(
        bank_f, data.train_y[:bank], test_f, data.test_y, num_classes=10, k=20, temperature=0.07
    )


def train(
    name: str,
    data: Data,
    args: argparse.Namespace,
    device: torch.device,
    peer,
    epochs: int,
    max_steps: int | None,
    eval_every: int | None,
) -> Result:
    """BYOL-train one contender on the whole training set; returns its kNN accuracy."""
    net = make_net(args.seed).to(device)
    learner, feed = make_learner(name, net, peer)
    learner.to(device)
    opt = torch.optim.Adam([p for p in learner.parameters() if p.requires_grad], lr=args.lr)
    images = data.train_x.to(device)
    order = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # the augmentations' draws
    steps_per_epoch = math.ceil(len(images) / args.batch_size)
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    result = Result(LABELS[name], math.nan, 0, 0.0)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(images), generator=order).to(device)
        for first in range(0, len(images), args.batch_size):
            if result.steps >= total:
                break
            batch = images[perm[first : first + args.batch_size]]
            if len(batch) < 2:
                continue  # BatchNorm needs two images
            loss = learner(feed(batch))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            learner.update_moving_average()
            result.steps += 1
            if result.steps % args.log_every == 0 or result.steps == total:
                elapsed = time.perf_counter() - start
                result.loss = float(loss.detach())
                print(
                    f"[{result.name}] step {result.steps}/{total} epoch {epoch} loss {result.loss:.4f} "
                    f"{elapsed / result.steps:.2f} s/step, "
                    f"ETA {(total - result.steps) * elapsed / result.steps / 60:.1f} min",
                    flush=True,
                )
        if eval_every and epoch % eval_every == 0 and result.steps <= total:
            result.curve.append((epoch, knn(net, data, args.bank, device)))
            print(f"[{result.name}] epoch {epoch}: kNN {result.curve[-1][1]:.2f}%", flush=True)
        if result.steps >= total:
            break
    result.seconds = time.perf_counter() - start
    result.loss = float(loss.detach())
    result.accuracy = (
        result.curve[-1][1] if result.curve and result.curve[-1][0] == epoch else knn(net, data, args.bank, device)
    )
    return result


def estimate(names: list[str], data: Data, args: argparse.Namespace, device: torch.device, peer, epochs: int) -> str:
    """Time a few steps of each trained contender and project the full budget."""
    steps_total = epochs * math.ceil(len(data.train_x) / args.batch_size)
    rows, total = [], 0.0
    for name in names:
        if name == "random":
            continue
        net = make_net(args.seed).to(device)
        learner, feed = make_learner(name, net, peer)
        opt = torch.optim.Adam([p for p in learner.parameters() if p.requires_grad], lr=args.lr)
        batch = data.train_x[: args.batch_size].to(device)
        times = []
        for i in range(args.estimate + 1):  # the first step is a warm-up
            start = time.perf_counter()
            loss = learner(feed(batch))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            learner.update_moving_average()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - start)
        per_step = statistics.median(times)
        total += per_step * steps_total
        rows.append(f"| {LABELS[name]} | {per_step:.2f} | {steps_total} | {per_step * steps_total / 60:.1f} |")
    return "\n".join(
        [
            f"### Projected training time ({epochs} epochs, batch {args.batch_size}, {device.type}, "
            f"{torch.get_num_threads()} threads, median of {args.estimate} steps)",
            "",
            "| contender | s/step | steps | minutes |",
            "|---|---|---|---|",
            *rows,
            "",
            f"Total: {total / 60:.1f} minutes of training (plus a few minutes of feature extraction).",
        ]
    )


def _title(data: Data, args: argparse.Namespace, epochs: int) -> str:
    """The table's heading up to the seed and device: evaluation and training budget."""
    return (
        f"### kNN accuracy (k 20, T 0.07; bank {min(args.bank, len(data.train_x))} training images, "
        f"{len(data.test_x)} test queries) after {epochs} epochs of {len(data.train_x)} {data.source} "
        f"images, batch {args.batch_size}, Adam {args.lr:g}"
    )


def _verdict(gain: float, goal: float) -> str:
    return "**met**" if gain >= goal else "**not met**"


def report_seeds(
    results: list[Result],
    data: Data,
    args: argparse.Namespace,
    epochs: int,
    budget_steps: int,
    device: torch.device,
    peer_note: str,
) -> str:
    """Results of several seeds: one row per seed, the mean, and the goals judged on the means."""
    seeds = sorted({r.seed for r in results})
    by = {(r.seed, r.name): r for r in results}
    names = [LABELS[n] for n in CONTENDERS if any(r.name == LABELS[n] for r in results)]
    full = all(r.steps == budget_steps for r in results if r.name != "random init")
    lines = [
        f"{_title(data, args, epochs)}, {device.type}; seeds {', '.join(map(str, seeds))}",
        "",
        "Each seed fixes the initial weights (the same for every contender), the data order and the "
        "augmentation draws; kNN top-1 %.",
        "",
    ]
    if not full:
        lines += [f"**REDUCED BUDGET**: the issue's budget is {budget_steps} steps per contender.", ""]
    gaps = [
        ("ours", "random init"),
        ("ours", "peer vanilla"),
        ("peer vanilla", "random init"),
        ("ours, views in one batch", "ours"),
    ]
    gaps = [g for g in gaps if g[0] in names and g[1] in names]
    header = ["seed", *names, *(f"{a} - {b}" for a, b in gaps)]
    rows, columns = [], {h: [] for h in header[1:]}
    for seed in seeds:
        cells = []
        for name in names:
            r = by.get((seed, name))
            cells.append(r.accuracy if r else None)
        for a, b in gaps:
            ra, rb = by.get((seed, a)), by.get((seed, b))
            cells.append(ra.accuracy - rb.accuracy if ra and rb else None)
        for h, v in zip(header[1:], cells):
            if v is not None:
                columns[h].append(v)
        rows.append(
            [str(seed)]
            + ["" if v is None else (f"{v:+.2f}" if i >= len(names) else f"{v:.2f}") for i, v in enumerate(cells)]
        )
    mean = {h: statistics.mean(v) for h, v in columns.items() if v}

    def mean_cell(i: int, h: str) -> str:
        if h not in mean:
            return ""
        text = f"{mean[h]:+.2f}" if i >= len(names) else f"{mean[h]:.2f}"
        n = len(columns[h])
        return text if n == len(seeds) else f"{text} ({n} seed{'' if n == 1 else 's'})"

    rows.append(["**mean**"] + [mean_cell(i, h) for i, h in enumerate(header[1:])])
    rows.append(["std"] + [f"{statistics.stdev(columns[h]):.2f}" if len(columns[h]) > 1 else "" for h in header[1:]])
    rows.append(
        ["min / max"] + [f"{min(columns[h]):.2f} / {max(columns[h]):.2f}" if columns[h] else "" for h in header[1:]]
    )
    lines.append(markdown_table(header, rows))
    if peer_note:
        lines += ["", peer_note]
    commands = sorted({r.command for r in results if r.command})
    if commands:
        lines += ["", "Results trained by: " + "; ".join(f"`{c}`" for c in commands)]
    lines += ["", "### Goals (on the mean over seeds)", ""]
    budget = "" if full else " (at the REDUCED budget above, not the issue's)"
    for (a, b), goal, what in (
        (("ours", "random init"), RANDOM_GOAL, "random init"),
        (("ours", "peer vanilla"), PEER_GOAL, "the peer"),
    ):
        column = columns.get(f"{a} - {b}")
        if column:
            reached = sum(v >= goal for v in column)
            lines.append(
                f"- Ours at least {goal:g} points above {what}{budget}: {_verdict(mean[f'{a} - {b}'], goal)} "
                f"(mean {mean[f'{a} - {b}']:+.2f} points over {len(column)} seeds; {reached} of "
                f"{len(column)} seeds at or above {goal:g})."
            )
    return "\n".join(lines)


def report(
    results: list[Result],
    data: Data,
    args: argparse.Namespace,
    epochs: int,
    budget_steps: int,
    device: torch.device,
    peer_note: str,
) -> str:
    """The Markdown table, the curve (if any) and where the goals stand."""
    if len({r.seed for r in results}) > 1:
        return report_seeds(results, data, args, epochs, budget_steps, device, peer_note)
    by = {r.name: r for r in results}
    full = all(r.steps == budget_steps for r in results if r.name != "random init")
    seed = results[0].seed if results else args.seed  # loaded results carry their own
    lines = [f"{_title(data, args, epochs)}, seed {seed}, {device.type}", ""]
    if not full:
        lines += [
            f"**REDUCED BUDGET**: the issue's budget is {budget_steps} steps per contender; the trained "
            "contenders ran the steps in the table (see `--max-steps`).",
            "",
        ]
    lines += [
        "| contender | steps | train minutes | final loss | kNN top-1 % | vs random init | vs peer |",
        "|---|---|---|---|---|---|---|",
    ]
    rand, peer = by.get("random init"), by.get("peer vanilla")
    for r in results:
        loss = "" if r.loss is None else f"{r.loss:.3f}"
        vs_rand = f"{r.accuracy - rand.accuracy:+.2f}" if rand and r is not rand else ""
        vs_peer = f"{r.accuracy - peer.accuracy:+.2f}" if peer and r is not peer and r is not rand else ""
        lines.append(
            f"| {r.name} | {r.steps} | {r.seconds / 60:.1f} | {loss} | {r.accuracy:.2f} | {vs_rand} | {vs_peer} |"
        )
    curves = [r for r in results if r.curve]
    if curves:
        epochs_seen = sorted({e for r in curves for e, _ in r.curve})
        lines += [
            "",
            "### kNN curve (%)",
            "",
            "| epoch | " + " | ".join(r.name for r in curves) + " |",
            "|---|" + "---|" * len(curves),
        ]
        for e in epochs_seen:
            cells = [next((f"{a:.2f}" for ep, a in r.curve if ep == e), "") for r in curves]
            lines.append(f"| {e} | " + " | ".join(cells) + " |")
    if peer_note:
        lines += ["", peer_note]
    commands = sorted({r.command for r in results if r.command})
    if len(commands) > 1 or (commands and commands[0] != _command()):
        lines += ["", "Results trained by: " + "; ".join(f"`{c}`" for c in commands)]
    ours = by.get("ours")
    lines += ["", "### Goals", ""]
    budget = "" if full else " (at the REDUCED budget above, not the issue's)"
    if ours and rand:
        gain = ours.accuracy - rand.accuracy
        lines.append(
            f"- Ours at least {RANDOM_GOAL:g} points above random init{budget}: "
            f"{_verdict(gain, RANDOM_GOAL)} ({gain:+.2f} points: "
            f"{ours.accuracy:.2f}% vs {rand.accuracy:.2f}%)."
        )
    if ours and peer:
        gain = ours.accuracy - peer.accuracy
        lines.append(
            f"- Ours at least {PEER_GOAL:g} points above the peer{budget}: "
            f"{_verdict(gain, PEER_GOAL)} ({gain:+.2f} points: "
            f"{ours.accuracy:.2f}% vs {peer.accuracy:.2f}%)."
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> str:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.batch_size, args.bank, args.log_every = SMOKE_BATCH, SMOKE_TRAIN, 1_000_000
    device = torch.device(args.device)
    epochs = args.epochs or (100 if args.long else 1 if args.smoke else 3)
    eval_every = args.eval_every or (10 if args.long else None)
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise ValueError(f"unknown contenders {unknown}; choose from {', '.join(CONTENDERS)}")
    data = load_data(args)
    peer, peer_note = None, ""
    if "peer" in names:
        peer, peer_note = _peer.load_peer_or_skip("(vanilla)")
        if peer is None:
            names.remove("peer")
    if args.estimate:
        text = estimate(names, data, args, device, peer, epochs)
        print(text)
        return text
    budget_steps = epochs * math.ceil(len(data.train_x) / args.batch_size)
    results = []
    if args.load_json:
        saved = [Result(**r) for path in args.load_json for r in json.loads(path.read_text())]
        keys = [(r.seed, r.name) for r in saved]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise ValueError(
                f"--load-json: more than one result for (seed, contender) {twice}; "
                "pass each contender's run of each seed once"
            )
        order = [LABELS[n] for n in CONTENDERS]
        results = sorted(saved, key=lambda r: order.index(r.name))
        names = []
    for name in names:
        if name == "random":
            net = make_net(args.seed).to(device)
            results.append(Result(LABELS[name], knn(net, data, args.bank, device), 0, 0.0))
        else:
            results.append(train(name, data, args, device, peer, epochs, args.max_steps, eval_every))
        r = results[-1]
        r.command, r.seed = _command(), args.seed
        print(f"[{r.name}] done: {r.steps} steps, {r.seconds / 60:.1f} min, kNN {r.accuracy:.2f}%", flush=True)
    if args.save_json is not None:
        args.save_json.parent.mkdir(parents=True, exist_ok=True)
        args.save_json.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    table = report(results, data, args, epochs, budget_steps, device, peer_note)
    print(table)
    if args.out is not None:
        write_results(args.out, "Quality benchmark", _machine(timm), table)
    return table


if __name__ == "__main__":
    main(get_args_parser().parse_args())
