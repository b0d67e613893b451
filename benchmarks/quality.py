"""Quality at equal budget: kNN accuracy on Fashion-MNIST after the same BYOL training.

The budget of issue 6: Fashion-MNIST padded from 28 to 32 px (2 zero pixels per side),
repeated to three channels; timm ``resnet10t`` (``num_classes=0``: its output is the
pooled (B, 512) feature); all 60,000 training images, 3 epochs, batch 256 (the last,
smaller batch of each epoch included), Adam lr 1e-3; the same seed for the initial
weights and for the data order. Contenders:

* ``random init``: the same initial weights, untrained;
* ``ours``: ``byol_pytorch.BYOL(net, 32, ...)`` as the README tells an Adam loop on a ResNet to
  build it (``readme_loop``: the constructor's EMA, tau 0.99 constant; the views ``BYOLAugment``
  resolves at 32 px), fed the uint8 batch. Results before issue 21 (the same EMA, the paper's
  224 px views) are kept in ``benchmarks/results/quality_before_21.md``;
* ``ours-ema996`` (an extra): the same with the paper's EMA, tau 0.996 rising to 1 on the cosine
  over the run (``moving_average_decay=0.996, moving_average_total_steps=STEPS``), what the
  README advised for every Adam loop before these measurements and still advises for the
  other families;
* ``ours-cos99`` (an extra): ``BYOL(net, 32, moving_average_total_steps=STEPS)``, tau 0.99 on the
  paper's cosine;
* ``peer vanilla``: lucidrains/byol-pytorch 0.9.1, ``use_simplicial_embeddings=False``,
  its default augmentation, fed the batch as float in [0, 1].

Evaluation: the backbone in eval mode on images scaled to [0, 1] and normalised as the
views normalise them (ImageNet mean/std, which is also the peer's normalisation);
weighted kNN (k 20, T 0.07, cosine) with the first 10,000 training images as the bank
and the 10,000 test images as queries.

On a 2-core CPU one contender takes a long time; time it first with ``--estimate`` and
run it in the background. ``--max-steps`` cuts the budget, and the table then says so.

    python -m benchmarks.quality --estimate 3             # seconds per step, projected total
    nohup python -m benchmarks.quality --out benchmarks/results/quality.md > .bench/quality.log &
    python -m benchmarks.quality --long                   # GPU: 100 epochs, kNN curve every 10
    python -m benchmarks.quality --smoke                  # 128 images, 1 epoch: seconds

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
import time
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch

from benchmarks.common import data as bench_data
from benchmarks.common.contenders import byol_step, make_learner, readme_loop, timm_backbone
from benchmarks.common.data import Data, knn
from benchmarks.common.machine import machine
from benchmarks.common.peer import load_peer_or_skip
from benchmarks.common.report import command_line, markdown_table, verdict, write_results

RANDOM_GOAL, PEER_GOAL = 8.0, 5.0  # issue 6: kNN points above random init / above the peer
# Extras, not in the default run: "ours1b", the opt-in views_in_one_batch; "ours-ema996", the paper's EMA (tau 0.996
# rising to 1 on the cosine over the run); "ours-cos99", tau 0.99 on that cosine.
EXTRA_EMA = {"ours-ema996": {"moving_average_decay": 0.996}, "ours-cos99": {}}  # + moving_average_total_steps
CONTENDERS = ("random", "ours", "ours-ema996", "ours-cos99", "ours1b", "peer")
DEFAULT_CONTENDERS = ("random", "ours", "peer")
LABELS = {
    "random": "random init",
    "ours": "ours",
    "ours-ema996": "ours, tau 0.996 on the cosine",
    "ours-cos99": "ours, tau 0.99 on the cosine",
    "ours1b": "ours, views in one batch",
    "peer": "peer vanilla",
}
GOALS = ((("ours", "random init"), RANDOM_GOAL, "random init"), (("ours", "peer vanilla"), PEER_GOAL, "the peer"))
GAPS = (
    ("ours", "random init"),
    ("ours", "peer vanilla"),
    ("peer vanilla", "random init"),
    (LABELS["ours-ema996"], "ours"),
    (LABELS["ours-cos99"], "ours"),
    (LABELS["ours1b"], "ours"),
)


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
        "ours with views_in_one_batch=True; ours-ema996 and ours-cos99 are ours with tau 0.996 / 0.99 rising to 1 "
        "on the cosine over the run)",
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
        help=f"{bench_data.SMOKE_TRAIN} training images, {bench_data.SMOKE_TEST} queries, "
        f"batch {bench_data.SMOKE_BATCH}, 1 epoch: seconds",
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


@dataclass
class Budget:
    """What every trained contender runs: the epochs, the steps they make, and the device."""

    epochs: int
    steps: int  # the budget: every batch of every epoch
    device: torch.device
    max_steps: int | None = None
    eval_every: int | None = None

    @property
    def total(self) -> int:
        return self.steps if self.max_steps is None else min(self.max_steps, self.steps)


def _learner(name: str, args: argparse.Namespace, budget: Budget, peer):
    """The seeded resnet10t on the device, the learner around it, how it is fed, and its Adam."""
    device = budget.device
    net = timm_backbone("resnet10t", args.seed).to(device)
    kwargs = readme_loop("adam", budget.total, "resnet10t") if name in ("ours", "ours1b") else {}
    if name in EXTRA_EMA:
        kwargs = {"moving_average_total_steps": budget.total, **EXTRA_EMA[name]}
    learner, feed = make_learner("ours" if name in EXTRA_EMA else name, net, 32, peer, **kwargs)
    learner.to(device)
    opt = torch.optim.Adam([p for p in learner.parameters() if p.requires_grad], lr=args.lr)
    return net, learner, feed, opt


def _log_step(result: Result, total: int, epoch: int, elapsed: float) -> None:
    print(
        f"[{result.name}] step {result.steps}/{total} epoch {epoch} loss {result.loss:.4f} "
        f"{elapsed / result.steps:.2f} s/step, "
        f"ETA {(total - result.steps) * elapsed / result.steps / 60:.1f} min",
        flush=True,
    )


def train(name: str, data: Data, args: argparse.Namespace, budget: Budget, peer) -> Result:
    """BYOL-train one contender on the whole training set; returns its kNN accuracy."""
    net, learner, feed, opt = _learner(name, args, budget, peer)
    images = data.train_x.to(budget.device)
    order = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # the augmentations' draws
    total = budget.total
    result = Result(LABELS[name], math.nan, 0, 0.0)
    start = time.perf_counter()
    for epoch in range(1, budget.epochs + 1):
        perm = torch.randperm(len(images), generator=order).to(budget.device)
        for first in range(0, len(images), args.batch_size):
            if result.steps >= total:
                break
            batch = images[perm[first : first + args.batch_size]]
            if len(batch) < 2:
                continue  # BatchNorm needs two images
            loss = byol_step(learner, feed, opt, batch)
            result.steps += 1
            if result.steps % args.log_every == 0 or result.steps == total:
                result.loss = float(loss.detach())
                _log_step(result, total, epoch, time.perf_counter() - start)
        if budget.eval_every and epoch % budget.eval_every == 0 and result.steps <= total:
            result.curve.append((epoch, knn(net, data, args.bank, budget.device)))
            print(f"[{result.name}] epoch {epoch}: kNN {result.curve[-1][1]:.2f}%", flush=True)
        if result.steps >= total:
            break
    result.seconds = time.perf_counter() - start
    result.loss = float(loss.detach())
    ended_on_curve = result.curve and result.curve[-1][0] == epoch
    result.accuracy = result.curve[-1][1] if ended_on_curve else knn(net, data, args.bank, budget.device)
    return result


def estimate(names: list[str], data: Data, args: argparse.Namespace, budget: Budget, peer) -> str:
    """Time a few steps of each trained contender and project the full budget."""
    rows, total = [], 0.0
    for name in names:
        if name == "random":
            continue
        _, learner, feed, opt = _learner(name, args, budget, peer)
        if getattr(learner, "moving_average_total_steps", None) is not None:  # ours: more steps than a tiny budget
            learner.moving_average_total_steps = max(budget.total, args.estimate + 1)  # (its tau: no cost)
        batch = data.train_x[: args.batch_size].to(budget.device)
        times = []
        for i in range(args.estimate + 1):  # the first step is a warm-up
            start = time.perf_counter()
            byol_step(learner, feed, opt, batch)
            if budget.device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - start)
        per_step = statistics.median(times)
        total += per_step * budget.steps
        rows.append([LABELS[name], f"{per_step:.2f}", budget.steps, f"{per_step * budget.steps / 60:.1f}"])
    return "\n".join(
        [
            f"### Projected training time ({budget.epochs} epochs, batch {args.batch_size}, {budget.device.type}, "
            f"{torch.get_num_threads()} threads, median of {args.estimate} steps)",
            "",
            markdown_table(["contender", "s/step", "steps", "minutes"], rows),
            "",
            f"Total: {total / 60:.1f} minutes of training (plus a few minutes of feature extraction).",
        ]
    )


def _title(data: Data, args: argparse.Namespace, budget: Budget) -> str:
    """The table's heading up to the seed and device: evaluation and training budget."""
    return (
        f"### kNN accuracy (k 20, T 0.07; bank {min(args.bank, len(data.train_x))} training images, "
        f"{len(data.test_x)} test queries) after {budget.epochs} epochs of {len(data.train_x)} {data.source} "
        f"images, batch {args.batch_size}, Adam {args.lr:g}"
    )


def _full_budget(results: list[Result], budget: Budget) -> bool:
    return all(r.steps == budget.steps for r in results if r.name != "random init")


def _goal(goal: float, what: str, full: bool, gain: float, detail: str) -> str:
    """A goal's line: ours at least `goal` points above `what`."""
    reduced = "" if full else " (at the REDUCED budget above, not the issue's)"
    return f"- Ours at least {goal:g} points above {what}{reduced}: {verdict(gain >= goal)} ({detail})."


def _notes(peer_note: str, commands: list[str]) -> list[str]:
    """The peer's note and the commands that trained the results, as lines after a table."""
    lines = ["", peer_note] if peer_note else []
    if commands:
        lines += ["", "Results trained by: " + "; ".join(f"`{c}`" for c in commands)]
    return lines


def _seed_columns(results: list[Result], names: list[str], gaps: list[tuple[str, str]], seeds: list[int]):
    """One row per seed (accuracies, then the gaps) and each column's values over the seeds."""
    by = {(r.seed, r.name): r for r in results}
    header = [*names, *(f"{a} - {b}" for a, b in gaps)]
    rows, columns = [], {h: [] for h in header}
    for seed in seeds:
        cells = [by[(seed, n)].accuracy if (seed, n) in by else None for n in names]
        for a, b in gaps:
            both = (seed, a) in by and (seed, b) in by
            cells.append(by[(seed, a)].accuracy - by[(seed, b)].accuracy if both else None)
        for h, v in zip(header, cells):
            if v is not None:
                columns[h].append(v)
        rows.append(
            [str(seed)]
            + ["" if v is None else (f"{v:+.2f}" if i >= len(names) else f"{v:.2f}") for i, v in enumerate(cells)]
        )
    return header, rows, columns


def _summary_rows(columns: dict[str, list[float]], names: list[str], seeds: int) -> list[list[str]]:
    """The mean (with how many seeds when fewer than all), std and min / max of each column."""

    def mean_cell(i: int, values: list[float]) -> str:
        if not values:
            return ""
        mean = statistics.mean(values)
        text = f"{mean:+.2f}" if i >= len(names) else f"{mean:.2f}"
        n = len(values)
        return text if n == seeds else f"{text} ({n} seed{'' if n == 1 else 's'})"

    values = list(columns.values())
    return [
        ["**mean**"] + [mean_cell(i, v) for i, v in enumerate(values)],
        ["std"] + [f"{statistics.stdev(v):.2f}" if len(v) > 1 else "" for v in values],
        ["min / max"] + [f"{min(v):.2f} / {max(v):.2f}" if v else "" for v in values],
    ]


def report_seeds(results: list[Result], data: Data, args: argparse.Namespace, budget: Budget, peer_note: str) -> str:
    """Results of several seeds: one row per seed, the mean, and the goals judged on the means."""
    seeds = sorted({r.seed for r in results})
    names = [LABELS[n] for n in CONTENDERS if any(r.name == LABELS[n] for r in results)]
    full = _full_budget(results, budget)
    lines = [
        f"{_title(data, args, budget)}, {budget.device.type}; seeds {', '.join(map(str, seeds))}",
        "",
        "Each seed fixes the initial weights (the same for every contender), the data order and the "
        "augmentation draws; kNN top-1 %.",
        "",
    ]
    if not full:
        lines += [f"**REDUCED BUDGET**: the issue's budget is {budget.steps} steps per contender.", ""]
    gaps = [g for g in GAPS if g[0] in names and g[1] in names]
    header, rows, columns = _seed_columns(results, names, gaps, seeds)
    lines.append(markdown_table(["seed", *header], rows + _summary_rows(columns, names, len(seeds))))
    lines += _notes(peer_note, sorted({r.command for r in results if r.command}))
    lines += ["", "### Goals (on the mean over seeds)", ""]
    for (a, b), goal, what in GOALS:
        column = columns.get(f"{a} - {b}")
        if column:
            mean, n = statistics.mean(column), len(column)
            reached = sum(v >= goal for v in column)
            detail = f"mean {mean:+.2f} points over {n} seeds; {reached} of {n} seeds at or above {goal:g}"
            lines.append(_goal(goal, what, full, mean, detail))
    return "\n".join(lines)


def _curve_table(curves: list[Result]) -> list[str]:
    epochs_seen = sorted({e for r in curves for e, _ in r.curve})
    rows = [[e] + [next((f"{a:.2f}" for ep, a in r.curve if ep == e), "") for r in curves] for e in epochs_seen]
    return ["", "### kNN curve (%)", "", markdown_table(["epoch", *(r.name for r in curves)], rows)]


def report(results: list[Result], data: Data, args: argparse.Namespace, budget: Budget, peer_note: str) -> str:
    """The Markdown table, the curve (if any) and where the goals stand."""
    if len({r.seed for r in results}) > 1:
        return report_seeds(results, data, args, budget, peer_note)
    by = {r.name: r for r in results}
    full = _full_budget(results, budget)
    seed = results[0].seed if results else args.seed  # loaded results carry their own
    lines = [f"{_title(data, args, budget)}, seed {seed}, {budget.device.type}", ""]
    if not full:
        lines += [
            f"**REDUCED BUDGET**: the issue's budget is {budget.steps} steps per contender; the trained "
            "contenders ran the steps in the table (see `--max-steps`).",
            "",
        ]
    rand, peer = by.get("random init"), by.get("peer vanilla")
    rows = []
    for r in results:
        loss = "" if r.loss is None else f"{r.loss:.3f}"
        vs_rand = f"{r.accuracy - rand.accuracy:+.2f}" if rand and r is not rand else ""
        vs_peer = f"{r.accuracy - peer.accuracy:+.2f}" if peer and r is not peer and r is not rand else ""
        rows.append([r.name, r.steps, f"{r.seconds / 60:.1f}", loss, f"{r.accuracy:.2f}", vs_rand, vs_peer])
    header = ["contender", "steps", "train minutes", "final loss", "kNN top-1 %", "vs random init", "vs peer"]
    lines.append(markdown_table(header, rows))
    curves = [r for r in results if r.curve]
    if curves:
        lines += _curve_table(curves)
    commands = sorted({r.command for r in results if r.command})
    lines += _notes(peer_note, commands if len(commands) > 1 or commands[:1] != [command_line()] else [])
    lines += ["", "### Goals", ""]
    for (a, b), goal, what in GOALS:
        ours, other = by.get(a), by.get(b)
        if ours and other:
            gain = ours.accuracy - other.accuracy
            detail = f"{gain:+.2f} points: {ours.accuracy:.2f}% vs {other.accuracy:.2f}%"
            lines.append(_goal(goal, what, full, gain, detail))
    return "\n".join(lines)


def load_results(paths: list[Path]) -> list[Result]:
    """Results saved with --save-json, in the contenders' order; one per (seed, contender) at most."""
    saved = [Result(**r) for path in paths for r in json.loads(path.read_text())]
    keys = [(r.seed, r.name) for r in saved]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(
            f"--load-json: more than one result for (seed, contender) {twice}; "
            "pass each contender's run of each seed once"
        )
    order = [LABELS[n] for n in CONTENDERS]
    return sorted(saved, key=lambda r: order.index(r.name))


def run_contenders(names: list[str], data: Data, args: argparse.Namespace, budget: Budget, peer) -> list[Result]:
    """Evaluate random init and train the others, one after the other."""
    results = []
    for name in names:
        if name == "random":
            net = timm_backbone("resnet10t", args.seed).to(budget.device)
            results.append(Result(LABELS[name], knn(net, data, args.bank, budget.device), 0, 0.0))
        else:
            results.append(train(name, data, args, budget, peer))
        r = results[-1]
        r.command, r.seed = command_line(), args.seed
        print(f"[{r.name}] done: {r.steps} steps, {r.seconds / 60:.1f} min, kNN {r.accuracy:.2f}%", flush=True)
    return results


def main(args: argparse.Namespace) -> str:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.batch_size, args.bank, args.log_every = bench_data.SMOKE_BATCH, bench_data.SMOKE_TRAIN, 1_000_000
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise ValueError(f"unknown contenders {unknown}; choose from {', '.join(CONTENDERS)}")
    data = bench_data.load_data(args.data_dir, args.smoke)
    epochs = args.epochs or (100 if args.long else 1 if args.smoke else 3)
    budget = Budget(
        epochs,
        epochs * math.ceil(len(data.train_x) / args.batch_size),
        torch.device(args.device),
        args.max_steps,
        args.eval_every or (10 if args.long else None),
    )
    peer, peer_note = None, ""
    if "peer" in names:
        peer, peer_note = load_peer_or_skip("(vanilla)")
        if peer is None:
            names.remove("peer")
    if args.estimate:
        text = estimate(names, data, args, budget, peer)
        print(text)
        return text
    results = load_results(args.load_json) if args.load_json else run_contenders(names, data, args, budget, peer)
    if args.save_json is not None:
        args.save_json.parent.mkdir(parents=True, exist_ok=True)
        args.save_json.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    table = report(results, data, args, budget, peer_note)
    print(table)
    if args.out is not None:
        write_results(args.out, "Quality benchmark", machine(timm), table)
    return table


if __name__ == "__main__":
    main(get_args_parser().parse_args())
