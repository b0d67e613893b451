"""Robustness matrix: does BYOL, run the way users run it, beat the backbone's random init?

Issue 12. Fashion-MNIST as in ``quality.py`` (32 px, three channels, batch 256, the same kNN
evaluation), a set of timm backbones across families, and two user loops with a constant
learning rate (``adam``: Adam 1e-3; ``sgd``: SGD 0.05, momentum 0.9), each calling
``update_moving_average()`` (or its equivalent) after every step, and ``cli``: the recipe
``byol-pytorch train`` runs by default (``build_learner`` of its recipe, LARS 0.2 x batch/256
with weight decay 1.5e-6, a warm-up over the first tenth of the run then cosine decay, the
EMA decay from 0.996 to 1 on the paper's cosine over the run; ours only). Contenders:

* ``random``: the same initial weights, untrained (the bar to clear);
* ``random-bn``: the same untrained weights with the BatchNorm statistics of 20 batches of views;
* ``ours``: ``byol_pytorch.BYOL(net, 32, ...)`` as the README tells a loop to build it
  (``readme_loop``): ``moving_average_total_steps=STEPS`` (tau rises to 1 on the paper's cosine
  over the run) and, with Adam, ``moving_average_decay=0.996`` (the paper's base; with SGD the
  constructor's 0.99); a ResNet under Adam keeps the constructor's EMA (tau 0.99 constant).
  Cells from before issue 21's EMA measurements used the constructor's defaults (tau 0.99
  constant) and are kept in ``robustness/before_ema/``. ``ours:KEY=VALUE,...``
  passes keyword arguments over those (a candidate default, measured before it becomes one;
  ``views=PRESET`` makes both views ``BYOLAugment(SIZE, view, preset=PRESET)``, ``views=peer``
  gives both the peer's default pipeline, ``views=lightly`` feeds lightly's PIL views: which part
  of a contender's lead is its views and which its learner; ``draw=batch`` draws ours' views once
  per batch as the peer's pipeline does, ``draw=crop`` only their crop and flip; ``loss_scale=S``
  multiplies the loss, lightly's being a quarter of the paper's); ``bn=frozen`` (ours or the peer,
  any loop) keeps every BatchNorm of the backbone in eval mode while it trains: it normalises with
  the statistics it came with (an untrained net's mean 0, variance 1) and never updates them, its
  affine weights still learn (does BYOL gain on the untouched net when it keeps its BatchNorm?
  the library's ``freeze_batchnorm_statistics``, what ``train --backbone-bn frozen`` does);
* ``peer``: lucidrains/byol-pytorch 0.9.1, vanilla (``use_simplicial_embeddings=False``);
* ``lightly``: lightly's BYOL as its documentation runs it: ``BYOLProjectionHead`` /
  ``BYOLPredictionHead`` (4096 hidden, 256 out), ``update_momentum`` with
  ``cosine_schedule`` from 0.996 to 1 (per step over the run), ``BYOLTransform`` views
  made on the CPU in a DataLoader (blur off at 32 px, as its CIFAR examples do), the
  symmetric negative-cosine loss.

Every cell (backbone x loop x contender x seed) is one process writing one JSON file under
``benchmarks/results/robustness/``; cells already there are not run again, so the matrix
can be filled across sessions and machines. On a 2-core CPU run two 1-thread cells at a time:

    python -m benchmarks.robustness --plan                 # the missing cells' commands
    python -m benchmarks.robustness --run --jobs 2         # run the missing cells
    python -m benchmarks.robustness --cell resnet10t adam ours --seed 0   # one cell
    python -m benchmarks.robustness --table                # the main table, printed
    python -m benchmarks.robustness --document             # rewrite benchmarks/results/robustness.md
    python -m benchmarks.robustness --document --check     # exit 1 if it is out of date

``--document`` rebuilds the whole results file from the cells: the main table (with the cells of
ours before issue 21's views and EMA beside it), then each of ``SECTIONS`` (the 64 px column and
the held-out nets, each from its own folder and backbones), keeping what is written by hand: the
file's head (everything before its first heading) and every section whose heading says
"(written by hand", each in its place after the generated section it follows.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import shlex
import statistics
import subprocess
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn

from benchmarks.common import REPO
from benchmarks.common import data as bench_data
from benchmarks.common.contenders import (
    LightlyBYOL,
    byol_step,
    kept_modes,
    lightly_step,
    lightly_views,
    make_learner,
    readme_loop,
    timm_backbone,
)
from benchmarks.common.data import Data, knn, scale_data
from benchmarks.common.machine import machine
from benchmarks.common.peer import load_peer
from benchmarks.common.report import markdown_table, write_or_check
from benchmarks.common.runner import module_command, spawn_module
from byol_pytorch import BYOLAugment
from byol_pytorch.augment import AugmentParams
from byol_pytorch.batchnorm import batchnorm_layers, freeze_batchnorm_statistics, recalibrate_batchnorm
from byol_pytorch.collapse import effective_rank

MODULE = "benchmarks.robustness"
RESULTS = REPO / "benchmarks" / "results" / "robustness"
BANK = 10_000  # kNN bank: the first N training images (quality.py's)
CLEAN_IMAGES = 512  # un-augmented training images whose BatchNorm statistics replace the views'
RANK_ROWS = 512  # clean test images whose eval-mode features give the representation's effective rank
MONITOR_EVERY = 10  # steps between reads of ours' collapse-alarm figures (a host read: on the CPU, free)
BACKBONES = (
    "resnet10t",
    "regnetx_002",
    "efficientnet_b0",
    "mobilenetv2_050",
    "mobilenetv3_small_100",
    "ghostnet_100",
    "convnext_atto",
)
BACKBONE_KWARGS: dict[str, dict[str, Any]] = {}
LOOPS = {"adam": ("Adam", 1e-3), "sgd": ("SGD", 0.05), "cli": ("the CLI's recipe", None)}
CONTENDERS = ("random", "random-bn", "ours", "peer", "lightly")
PLAN_CONTENDERS = {
    "adam": CONTENDERS,
    "sgd": ("random", "random-bn", "ours", "peer"),
    "cli": ("random", "random-bn", "ours"),
}
BASELINES = ("random", "random-bn")  # untrained: one cell per backbone and seed, no loop
CPU = torch.device("cpu")
DOCUMENT = RESULTS.parent / "robustness.md"
HELD_OUT = RESULTS / "held_out"  # nets a family's recipe was checked on, not chosen on
BEFORE = (RESULTS / "before_views", RESULTS / "before_ema")  # ours before issue 21's views, then its EMA
HAND = "(written by hand"  # in a heading: a section --document keeps as it is


@dataclass(frozen=True)
class Section:
    """A table of the document after the main one, from its own cells.

    Its first heading is led by ``title``, the later ones (probes, longer runs) by ``short``; the
    collapse alarm's and the clean-statistics tables are the main table's alone.
    """

    title: str
    short: str
    backbones: tuple[str, ...]
    results: Path = RESULTS
    image_size: int = 32


SECTIONS = (
    Section(
        "The 64 px column", "The 64 px column", ("resnet10t", "mobilenetv3_small_100", "convnext_atto"), image_size=64
    ),
    Section(
        "A held-out RegNet (RegNetY-200MF, the family's recipe checked on a net it was not chosen on)",
        "RegNetY-200MF",
        ("regnety_002",),
        HELD_OUT,
    ),
    Section(
        "A held-out mobile net (MnasNet-100, the mobile family's lr in the CLI checked on a net it was not chosen on)",
        "MnasNet-100",
        ("mnasnet_100",),
        HELD_OUT,
    ),
    Section(
        "A held-out ConvNeXt (ConvNeXt-femto, the ConvNeXt family's AdamW in the CLI checked on a net it was not "
        "chosen on)",
        "ConvNeXt-femto",
        ("convnext_femto",),
        HELD_OUT,
    ),
    Section(
        "A held-out MobileNetV3 (MobileNetV3-large-100, frozen BatchNorm statistics at SGD 0.1 and 0.05, found on "
        "MobileNetV3-small, checked on a net they were not found on; 200 and 1,000 steps)",
        "MobileNetV3-large-100",
        ("mobilenetv3_large_100",),
        HELD_OUT,
    ),
    Section(
        "A held-out MobileNetV2 (MobileNetV2-1.0, the MobileNetV2s' SGD 0.5 of rule (j1) and 0.4 of rule (k) checked "
        "on a net they were not chosen on)",
        "MobileNetV2-1.0",
        ("mobilenetv2_100",),
        HELD_OUT,
    ),
)


def load_data(args: argparse.Namespace) -> Data:
    """Fashion-MNIST as quality.py reads it (its smoke images with --smoke), upscaled to --image-size."""
    return scale_data(bench_data.load_data(None, args.smoke), args.image_size)


def calibrate_batchnorm(net: nn.Module, data: Data, batches: int, batch_size: int) -> None:
    """Set the BatchNorm running statistics to the average over ``batches`` batches of BYOL views.

    The weights are untouched: this is the random-init net with the statistics that
    training in train mode would give it (running statistics start at mean 0, variance 1,
    which makes every BatchNorm of an untrained net in eval mode nearly the identity).
    """
    norms = batchnorm_layers(net)
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    views = BYOLAugment(data.train_x.shape[-1])
    generator_state = torch.get_rng_state()
    torch.manual_seed(0)
    with torch.no_grad(), kept_modes(net):
        net.train()
        for i in range(batches):
            net(views(data.train_x[i * batch_size : (i + 1) * batch_size]))
    torch.set_rng_state(generator_state)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def make_net(name: str, seed: int) -> nn.Module:
    """The timm backbone without classifier (pooled features), initialised from `seed`."""
    return timm_backbone(name, seed, **BACKBONE_KWARGS.get(name, {}))


def make_optimizer(loop: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    kind, lr = LOOPS[loop]
    if kind == "Adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def parse_contender(spec: str) -> tuple[str, dict[str, Any]]:
    """``ours:key=value,key=value`` -> ("ours", {key: value}) with values read as JSON when they parse.

    >>> parse_contender("ours:view.blur_sigma=[1,2],view.blur_p=0.2")
    ('ours', {'view.blur_sigma': [1, 2], 'view.blur_p': 0.2})
    """
    name, _, rest = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, re.split(r",(?![^\[]*\])", rest)):  # no split inside [low,high]
        key, _, value = item.partition("=")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    if name not in CONTENDERS:
        raise SystemExit(f"robustness.py: error: contender {name!r} is not one of {', '.join(CONTENDERS)}")
    return name, kwargs


def train_lightly(net: nn.Module, data: Data, args: argparse.Namespace) -> dict[str, Any]:
    from lightly.loss import NegativeCosineSimilarity
    from lightly.utils.scheduler import cosine_schedule

    size = data.train_x.shape[-1]
    dim = net(torch.zeros(2, 3, size, size)).flatten(1).shape[1]
    model = LightlyBYOL(net, dim)
    criterion = NegativeCosineSimilarity()
    opt = make_optimizer(args.loop, [p for p in model.parameters() if p.requires_grad])
    steps, losses, start = 0, [], time.perf_counter()
    while steps < args.steps:
        for x0, x1 in lightly_views(data, args.batch_size, args.seed + steps):
            if len(x0) < 2:
                continue
            loss = lightly_step(model, criterion, opt, x0, x1, m=cosine_schedule(steps, args.steps, 0.996, 1))
            steps += 1
            losses.append(float(loss.detach()))
            _progress(args, steps, start, losses)
            if steps >= args.steps:
                break
    return {"seconds": time.perf_counter() - start, "losses": losses, "_target": model.backbone_momentum}


def _progress(args: argparse.Namespace, steps: int, start: float, losses: list[float]) -> None:
    if steps % 50 == 0 or steps == args.steps:
        per = (time.perf_counter() - start) / steps
        print(
            f"[{args.backbone} {args.loop} {args.contender}] step {steps}/{args.steps} loss {losses[-1]:.4f} "
            f"{per:.2f} s/step",
            flush=True,
        )


def cli_recipe(
    net: nn.Module, steps: int, kwargs: dict[str, Any], images: int = 60_000, size: int = 32, model: str = "resnet50"
):
    """``(learner, optimizer, scheduler)`` as ``byol-pytorch train --model MODEL --image-size 32 --batch-size 256``.

    The recipe, optimiser and warm-up come from the CLI's own parser, resolver and builders,
    so the cell follows the CLI's defaults; ``kwargs`` are further flags
    (``ours:optimizer=adamw,tau_base=0.99``); ``images`` makes the epoch of the warm-up rule
    (Fashion-MNIST's 60,000 by default); ``model`` names the backbone, whose family picks the
    optimiser when ``kwargs`` names none (``app.recipe.optimizer_for``).
    """
    from byol_pytorch.app.recipe import get_args_parser as cli_parser
    from byol_pytorch.app.recipe import resolve_recipe, run_length
    from byol_pytorch.training.models import build_learner
    from byol_pytorch.training.optim import build_recipe_optimizer, warmup_cosine_scheduler

    kwargs = dict(kwargs)
    predictor_scale = kwargs.pop("predictor_lr_scale", None)  # a probe: the predictor's lr times this
    flags = ["--data", "unused", "--model", model, "--image-size", str(size), "--batch-size", "256"]
    flags += ["--max-steps", str(steps)]
    for key, value in kwargs.items():
        flag = f"--{key.replace('_', '-')}"
        flags += [flag] if value is True else [flag, str(value)]  # a switch (``views_in_one_batch=true``) alone
    args = cli_parser().parse_args(flags)
    recipe = resolve_recipe(args, None)
    total, warmup = run_length(args, recipe, math.ceil(images / recipe.batch_size), None)
    learner = build_learner(recipe, net)
    learner.moving_average_total_steps = total  # the CLI's cosine EMA decay over the run
    optimizer = build_recipe_optimizer(recipe, learner)
    if predictor_scale is not None:
        scale_predictor_lr(optimizer, learner, float(predictor_scale))
    return learner, optimizer, warmup_cosine_scheduler(optimizer, total, warmup)


def scale_predictor_lr(optimizer: torch.optim.Optimizer, learner: nn.Module, scale: float) -> None:
    """Move the predictor's parameters into groups of their own at ``scale`` times their group's lr.

    The probe ``ours:predictor_lr_scale=S`` (SimSiam's and DirectPred's observation that the predictor
    wants to learn faster than the encoder); each new group keeps its old group's other settings, so
    the scheduler built next scales it as it scales the rest.

    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    >>> from byol_pytorch import BYOL
    >>> learner = BYOL(net, 32, hidden_layer=-1, projection_size=8, projection_hidden_size=16)
    >>> _ = learner(torch.rand(2, 3, 32, 32))
    >>> opt = torch.optim.SGD([{"params": [p for p in learner.parameters() if p.requires_grad]}], lr=0.1)
    >>> scale_predictor_lr(opt, learner, 10.0)
    >>> [round(g["lr"], 6) for g in opt.param_groups]
    [0.1, 1.0]
    >>> {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in learner.online_predictor.parameters()}
    True
    """
    mine = {id(p) for p in learner.online_predictor.parameters()}
    moved = []
    for group in list(optimizer.param_groups):
        kept = [p for p in group["params"] if id(p) not in mine]
        theirs = [p for p in group["params"] if id(p) in mine]
        group["params"] = kept
        if theirs:
            options = {key: value for key, value in group.items() if key != "params"}
            moved.append({**options, "params": theirs, "lr": group["lr"] * scale})
    for group in moved:
        optimizer.add_param_group(group)


def _byol_learner(name: str, kwargs: dict[str, Any], net: nn.Module, data: Data, args: argparse.Namespace):
    """``(learner, feed, optimizer, scheduler)`` of ours or the peer in the cell's loop.

    ``kwargs`` are the learner's arguments as ``run_cell`` made them (for ours in a user loop:
    ``readme_loop``'s, then the probe's); in the cli loop, the CLI's flags.
    """
    if args.loop == "cli":
        if name != "ours":
            raise SystemExit("robustness.py: error: the cli loop is ours only (the CLI's recipe)")
        learner, opt, scheduler = cli_recipe(
            net, args.steps, kwargs, len(data.train_x), args.image_size, model=args.backbone
        )
        return learner, (lambda x: x), opt, scheduler
    kwargs = dict(probe_views(kwargs, args.image_size))  # a copy: run_cell records the dict it passed
    scale = kwargs.pop("loss_scale", None)  # a probe: lightly's loss is a quarter of the paper's (Adam's eps sees it)
    learner, feed = make_learner(name, net, args.image_size, load_peer() if name == "peer" else None, **kwargs)
    if scale is not None:
        forward = learner.forward
        learner.forward = lambda x: forward(x) * scale  # the training call only; byol_step passes the batch alone
    return learner, feed, make_optimizer(args.loop, [p for p in learner.parameters() if p.requires_grad]), None


class GivenView:
    """An ``augment_fn`` returning the view the loop made for this batch elsewhere (``views=lightly``)."""

    def __init__(self) -> None:
        self.view: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.view is None or len(self.view) != len(x):
            raise RuntimeError("GivenView: the loop sets .view to this batch's view before the forward")
        return self.view


def peer_views(size: int) -> nn.Module:
    """The peer's default view pipeline at this size, taken from a peer learner built around a tiny net."""
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    return make_learner("peer", tiny, size, load_peer())[0].augment1


class BatchDrawn(BYOLAugment):
    """Ours' views drawn once per batch, as the peer's pipeline draws (``draw=batch``): one crop, flip, jitter."""

    shared: tuple[str, ...] | None = None  # the fields drawn once per batch (None: all of them)

    def sample_params(self, batch: int, height: int, width: int, device=None, generator=None) -> AugmentParams:
        drawn = super().sample_params(batch, height, width, device, generator)
        names = self.shared or [f.name for f in fields(drawn)]
        return replace(drawn, **{name: getattr(drawn, name)[:1].expand_as(getattr(drawn, name)) for name in names})


class CropDrawn(BatchDrawn):
    """Ours' views with only the crop and flip drawn once per batch (``draw=crop``), colour per image."""

    shared = ("boxes", "flip")


def probe_views(kwargs: dict[str, Any], size: int) -> dict[str, Any]:
    """A probe's view keys made into both views: ``views=PRESET|peer|lightly`` and ``view.SETTING=VALUE``.

    >>> made = probe_views({"view.blur_p": 0.0, "moving_average_decay": 0.996}, 64)
    >>> made["augment_fn"].blur_p, made["augment_fn2"].blur_p, made["moving_average_decay"]
    (0.0, 0.0, 0.996)
    >>> probe_views({"views": "paper"}, 32)["augment_fn"].blur_p
    1.0
    >>> type(probe_views({"views": "lightly"}, 32)["augment_fn2"]).__name__
    'GivenView'
    """
    preset = kwargs.get("views", "auto")
    overrides = {key.removeprefix("view."): value for key, value in kwargs.items() if key.startswith("view.")}
    if "views" not in kwargs and "draw" not in kwargs and not overrides:
        return kwargs
    kept = {key: value for key, value in kwargs.items() if key not in ("views", "draw") and not key.startswith("view.")}
    if preset in ("peer", "lightly") and (overrides or "draw" in kwargs):
        raise SystemExit(
            f"robustness.py: error: views={preset} takes no view.SETTING nor draw (its views are the contender's own)"
        )
    draws = {"image": BYOLAugment, "batch": BatchDrawn, "crop": CropDrawn}
    if kwargs.get("draw", "image") not in draws:
        raise SystemExit(
            f"robustness.py: error: draw={kwargs['draw']!r}: image (ours), batch (the peer's way)"
            " or crop (its crop only)"
        )
    if preset == "peer":
        kept["augment_fn"] = kept["augment_fn2"] = peer_views(size)  # the peer: one pipeline for both views
    elif preset == "lightly":
        kept["augment_fn"], kept["augment_fn2"] = GivenView(), GivenView()
    else:
        augment = draws[kwargs.get("draw", "image")]
        kept["augment_fn"], kept["augment_fn2"] = (augment(size, v, preset=preset, **overrides) for v in (1, 2))
    return kept


def _batches(learner: nn.Module, data: Data, args: argparse.Namespace, order: torch.Generator, steps: int):
    """One epoch of training batches: uint8 images, or with ``views=lightly`` its first views (the second set aside)."""
    given = getattr(learner, "augment1", None)
    if isinstance(given, GivenView):
        second = learner.augment2
        for x0, x1 in lightly_views(data, args.batch_size, args.seed + steps):
            given.view, second.view = x0, x1
            yield x0
        return
    perm = torch.randperm(len(data.train_x), generator=order)
    for first in range(0, len(perm), args.batch_size):
        yield data.train_x[perm[first : first + args.batch_size]]


def train_byol(name: str, kwargs: dict[str, Any], net: nn.Module, data: Data, args: argparse.Namespace):
    """Ours or the peer in the README's loop: forward, backward, step, update_moving_average."""
    learner, feed, opt, scheduler = _byol_learner(name, kwargs, net, data, args)
    order = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    steps, losses, start, warnings_seen, curve = 0, [], time.perf_counter(), [], []
    monitor: list[list[float]] = []

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        while steps < args.steps:
            for batch in _batches(learner, data, args, order, steps):
                if len(batch) < 2:
                    continue
                loss = byol_step(learner, feed, opt, batch, scheduler)
                steps += 1
                losses.append(float(loss.detach()))
                _monitor(learner, steps, monitor)
                _progress(args, steps, start, losses)
                _curve(args, steps, net, data, curve)
                if steps >= args.steps:
                    break
        warnings_seen = [f"{w.category.__name__}: {w.message}" for w in caught if "Collapse" in w.category.__name__]
    seconds = time.perf_counter() - start - sum(c[2] for c in curve)
    result = {"seconds": seconds, "losses": losses, "warnings": warnings_seen, "curve": [c[:2] for c in curve]}
    if monitor:
        result["monitor"] = monitor  # [step, std * sqrt(D), effective rank of the projections' sample]
    result["curve_rank"] = [c[3] for c in curve]
    result["_target"] = learner.target_encoder.net if getattr(learner, "target_encoder", None) is not None else None
    return result


def _monitor(learner: nn.Module, steps: int, monitor: list[list[float]]) -> None:
    """Ours: the collapse alarm's own figures every MONITOR_EVERY steps (what thresholds are set from)."""
    watch = getattr(learner, "collapse_monitor", None)
    if watch is not None and steps % MONITOR_EVERY == 0:
        status = watch.status()
        monitor.append([steps, status["std"] / status["healthy_std"], status["effective_rank"]])


def representation_rank(net: nn.Module, data: Data) -> float:
    """Effective rank of the eval-mode features of the first RANK_ROWS clean test images."""
    with torch.no_grad(), kept_modes(net):
        net.eval()
        features = net(BYOLAugment(32).normalize(data.test_x[:RANK_ROWS])).flatten(1)
    return float(effective_rank(features.double()))


def _curve(args: argparse.Namespace, steps: int, net: nn.Module, data: Data, curve: list) -> None:
    """kNN at the `--curve-every` steps before the last (the last is the cell's result)."""
    if args.curve_every and steps % args.curve_every == 0 and steps < args.steps:
        start = time.perf_counter()
        acc = knn(net, data, BANK, CPU)
        rank = representation_rank(net, data)
        curve.append((steps, acc, time.perf_counter() - start, rank))
        print(f"[{args.backbone} {args.loop} {args.contender}] step {steps}: kNN {acc:.2f}%", flush=True)


def cell_path(results: Path, backbone: str, loop: str, contender: str, seed: int, steps: int, size: int = 32) -> Path:
    """The cell's JSON file in the folder `results`."""
    safe = contender.replace(":", "--").replace("=", "-").replace(",", "_").replace("/", "_")
    safe = safe.replace("[", "").replace("]", "")
    pixels = "" if size == 32 else f"__p{size}"
    return results / f"{backbone}__{loop}__{safe}__s{seed}__n{steps}{pixels}.json"


def clean_statistics(net: nn.Module, data: Data) -> nn.Module | None:
    """A copy of `net` with BatchNorm statistics of CLEAN_IMAGES un-augmented training images; None without BN."""
    if not batchnorm_layers(net):
        return None
    clean = copy.deepcopy(net)
    normalize = BYOLAugment(data.train_x.shape[-1]).normalize
    recalibrate_batchnorm(clean, data.train_x[:CLEAN_IMAGES], transform=normalize, max_images=CLEAN_IMAGES)
    return clean


def what_leaves_training(net: nn.Module, target: nn.Module | None, data: Data) -> dict[str, float]:
    """kNN of the online net with clean BatchNorm statistics, and of the target (EMA) net as trained and clean."""
    out: dict[str, float] = {}
    nets = {"knn_clean_bn": clean_statistics(net, data)}
    if target is not None:
        nets["knn_target"] = target
        nets["knn_target_clean_bn"] = clean_statistics(target, data)
    for key, model in nets.items():
        if model is not None:
            out[key] = knn(model, data, BANK, CPU)
            print(f"  {key}: {out[key]:.2f}%", flush=True)
    return out


def run_cell(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    name, kwargs = parse_contender(args.contender)
    bn = kwargs.pop("bn", None)  # a probe of the harness, not a learner argument or CLI flag
    if bn is not None and (bn != "frozen" or name not in ("ours", "peer")):  # refused before the data is read
        raise SystemExit(f"robustness.py: error: the probe bn= takes 'frozen' (ours or peer), got {bn!r}")
    data = load_data(args)
    net = make_net(args.backbone, args.seed)
    result: dict[str, Any] = {
        "backbone": args.backbone,
        "loop": args.loop if name not in BASELINES else "-",
        "contender": args.contender,
        "seed": args.seed,
        "steps": args.steps if name not in BASELINES else 0,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "machine": machine(timm),
        "threads": args.threads,
    }
    if bn is not None:
        result["frozen_batchnorm_layers"] = freeze_batchnorm_statistics(net)
    if name == "ours" and args.loop != "cli":  # the README's loop, recorded: readme_loop changes with the README
        kwargs = {**readme_loop(args.loop, args.steps, args.backbone), **kwargs}
        result["byol_kwargs"] = kwargs
    if name == "random-bn":
        calibrate_batchnorm(net, data, batches=20 if not args.smoke else 2, batch_size=args.batch_size)
    elif name == "lightly":
        result.update(train_lightly(net, data, args))
    elif name in ("ours", "peer"):
        result.update(train_byol(name, kwargs, net, data, args))
    if name not in BASELINES:
        result["images_per_s"] = args.steps * args.batch_size / result["seconds"]
    target = result.pop("_target", None)
    result["knn"] = knn(net, data, BANK, CPU)
    result["representation_rank"] = representation_rank(net, data)
    print(f"[{args.backbone} {args.loop} {args.contender}] kNN {result['knn']:.2f}%", flush=True)
    if name not in BASELINES or name == "random":
        result.update(what_leaves_training(net, target, data))
    return result


def fill_ranks(args: argparse.Namespace) -> None:
    """Random-init cells from before the rank was recorded: the same net (seeded), its feature rank added."""
    torch.set_num_threads(args.threads)
    data = load_data(args)
    for path in sorted(args.results.glob("*__random__*.json")):
        cell = json.loads(path.read_text())
        if "representation_rank" not in cell:
            cell["representation_rank"] = representation_rank(make_net(cell["backbone"], cell["seed"]), data)
            path.write_text(json.dumps(cell, indent=1))
            print(path.name, f"feature rank {cell['representation_rank']:.1f}", flush=True)


def planned(args: argparse.Namespace) -> list[list[str]]:
    """Argument lists of the cells not yet in the folder ``--results``.

    A cli cell of ``ours`` that a probe of the family's default recipe fills (``cli_defaults``: the one the
    table shows) is not planned again.
    """
    cells = []
    found = [
        c
        for c in load_cells(args.results)
        if c.get("image_size", 32) == args.image_size and c["steps"] == args.steps and ":" in c["contender"]
    ]
    by_probe = {(c["backbone"], c["seed"]) for c in cli_defaults(found, [])}
    wanted = args.contenders or CONTENDERS
    for seed in args.seeds:
        for backbone in args.backbones:
            for baseline in BASELINES:
                done = cell_path(args.results, backbone, "-", baseline, seed, 0, args.image_size).exists()
                if baseline in wanted and not done:
                    cells.append([backbone, "adam", baseline, str(seed)])
            for loop in args.loops:
                for contender in args.contenders or PLAN_CONTENDERS[loop]:
                    if contender in BASELINES or (contender == "lightly" and loop != "adam" and not args.contenders):
                        continue
                    if (loop, contender) == ("cli", "ours") and (backbone, seed) in by_probe:
                        continue
                    if not cell_path(
                        args.results, backbone, loop, contender, seed, args.steps, args.image_size
                    ).exists():
                        cells.append([backbone, loop, contender, str(seed)])
    return cells


def _cell_args(cell: list[str], args: argparse.Namespace) -> list[str]:
    """The command-line arguments of one cell's process."""
    backbone, loop, contender, seed = cell
    size = ["--image-size", str(args.image_size)] if args.image_size != 32 else []
    steps, results = str(args.steps), str(args.results.resolve())
    return ["--cell", backbone, loop, contender, "--seed", seed, "--steps", steps, "--results", results, *size]


def run_missing(args: argparse.Namespace) -> None:
    """Run the missing cells `--jobs` at a time, each a 1-thread ``python -m benchmarks.robustness``, its own log."""
    todo = planned(args)
    running: list[subprocess.Popen] = []
    log_dir = REPO / ".bench" / "robustness_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    while todo or running:
        running = [p for p in running if p.poll() is None]
        while todo and len(running) < args.jobs:
            cell = todo.pop(0)
            log = (log_dir / ("_".join(cell).replace(":", "-") + ".log")).open("w")
            print("start", " ".join(cell), flush=True)
            running.append(spawn_module(MODULE, *_cell_args(cell, args), stdout=log, stderr=subprocess.STDOUT))
        time.sleep(5)


def load_cells(results: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} (n {len(values)})"


def paired_gain(got: list[dict[str, Any]], baseline: dict[int, float]) -> float:
    """Mean over ``got``'s cells of kNN minus the baseline of the same seed, the weights that cell started from
    (``make_net`` seeds the init); a seed the baseline did not run on takes the mean of the seeds it did. NaN
    without a baseline.

    >>> paired_gain([{"seed": 0, "knn": 50.0}, {"seed": 1, "knn": 44.0}], {0: 42.0, 1: 42.0, 3: 58.0})
    5.0
    >>> paired_gain([{"seed": 2, "knn": 50.0}], {0: 40.0, 1: 44.0})
    8.0
    """
    if not baseline:
        return math.nan
    fallback = statistics.mean(baseline.values())
    return statistics.mean(c["knn"] - baseline.get(c["seed"], fallback) for c in got)


def table(args: argparse.Namespace, section: bool = False) -> str:
    """One row per backbone x loop: both baselines, each contender's kNN, its gains, images/s; collapses named.

    ``section``: a table of the document after the main one (a held-out net's): no row for a loop
    no contender ran in, and no collapse alarm's or clean-statistics tables.
    """
    every = [
        c
        for c in load_cells(args.results)
        if c.get("image_size", 32) == args.image_size and c["backbone"] in args.backbones
    ]  # every table below holds the --backbones alone (a held-out net's folder may hold two)
    cells = [c for c in every if c["steps"] in (0, args.steps)]
    # Variants (``ours:key=value``) are probes, tabled on their own below, not contenders.
    variants = [c for c in cells if ":" in c["contender"]]
    cells = [c for c in cells if ":" not in c["contender"]]
    cells += cli_defaults(variants, cells)
    contenders = sorted({c["contender"] for c in cells if c["contender"] not in BASELINES}, key=_contender_order)
    header = ["backbone", "loop", "random init", "random init, BN statistics of the views", *contenders]
    rows, collapsed, below_bn = [], [], []
    for backbone in args.backbones:  # BACKBONES unless --backbones names others (a held-out net's folder)
        by_seed = {
            b: {c["seed"]: c["knn"] for c in cells if (c["backbone"], c["contender"]) == (backbone, b)}
            for b in BASELINES
        }
        base = {b: list(v.values()) for b, v in by_seed.items()}
        for loop in LOOPS:
            row: list[object] = [backbone, loop, _fmt(base["random"]), _fmt(base["random-bn"])]
            for contender in contenders:
                got = [c for c in cells if (c["backbone"], c["loop"], c["contender"]) == (backbone, loop, contender)]
                if not got:
                    row.append("-")
                    continue
                gain, gain_bn = (paired_gain(got, by_seed[b]) for b in ("random", "random-bn"))
                speed = statistics.median(c["images_per_s"] for c in got)
                where = f"{backbone} / {loop} / {contender}"
                if gain < 0:
                    collapsed.append(f"{where} ({gain:+.1f})")
                if gain_bn < 0:
                    below_bn.append(f"{where} ({gain_bn:+.1f})")
                mark = " **below random init**" if gain < 0 else ""
                row.append(
                    f"{_fmt([c['knn'] for c in got])} ({gain:+.1f}; {gain_bn:+.1f} vs BN-calibrated){mark}; "
                    f"{speed:.0f} img/s"
                )
            if not section or any(value != "-" for value in row[4:]):
                rows.append(row)
    machines = sorted({c["machine"] for c in cells})
    lines = [
        f"### kNN top-1 % after {args.steps} steps (batch 256; adam, sgd: constant lr; cli: the CLI's recipe); "
        "gain over random init and over the BN-calibrated random net, each of the same seeds (the weights the run "
        "started from; a seed a baseline did not run on takes its mean); images/s",
        "",
        markdown_table(header, rows),
        "",
        *cli_note(cells),
        "Below random init: " + ("; ".join(collapsed) if collapsed else "none"),
        "",
        "Below the BN-calibrated random net: " + ("; ".join(below_bn) if below_bn else "none"),
        "",
        "Machines: " + "; ".join(machines),
    ]
    if not section:
        lines += ["", alarm_table(cells)]
        clean = clean_bn_table(cells)
        if clean:
            lines += ["", clean]
    befores = getattr(args, "before", None) or []
    if befores:
        stages = [
            (folder.name, [c for c in load_cells(folder) if c.get("image_size", 32) == args.image_size])
            for folder in befores
        ]
        lines += ["", before_after_table(stages, cells)]
    if variants:
        lines += ["", variants_table(variants, cells)]
    longer = longer_runs_table(every, args.steps)
    return "\n".join(lines + (["", longer] if longer else []))


def section_table(section: Section, args: argparse.Namespace) -> str:
    """``section``'s tables: the cells of its folder, backbones and size, its headings led by its names."""
    args = argparse.Namespace(
        **{
            **vars(args),
            "results": section.results,
            "backbones": list(section.backbones),
            "image_size": section.image_size,
            "before": None,
        }
    )
    lines, first = [], True
    for line in table(args, section=True).splitlines():
        if line.startswith("### "):
            heading = line[len("### ") :]
            lead = section.title if first else section.short
            line = f"### {lead}: {heading if first else heading[:1].lower() + heading[1:]}"
            first = False
        lines.append(line)
    return "\n".join(lines)


def _blocks(text: str) -> tuple[str, list[str]]:
    """``text`` split into its head (before the first ``###`` heading) and its sections, each from its heading."""
    head, *blocks = re.split(r"^(?=### )", text, flags=re.M)
    return head, [b.rstrip("\n") + "\n" for b in blocks]


def _heading(block: str) -> str:
    return block.split("\n", 1)[0]


def document(current: str) -> str:
    """The text the results file should have: ``current``'s hand-written parts around tables made from the cells.

    The tables are the matrix's own settings (the parser's defaults: 200 steps, batch 256), the main one
    from ``RESULTS`` with ``BEFORE`` beside it, then each of ``SECTIONS``.
    """
    args = get_args_parser().parse_args([])
    main_args = argparse.Namespace(**{**vars(args), "results": RESULTS, "backbones": list(BACKBONES)})
    main_args.before = list(BEFORE)
    generated = "\n\n".join([table(main_args), *(section_table(s, args) for s in SECTIONS)])
    head, old = _blocks(current)
    if not head.strip():
        raise ValueError(f"{DOCUMENT.name} has no head before its first '###' heading; write one (what the matrix is)")
    _, new = _blocks(generated)
    headings = [_heading(b) for b in new]
    twice = sorted({h for h in headings if headings.count(h) > 1})
    if twice:
        raise ValueError(f"two generated sections share the heading {twice[0]!r}; give each of SECTIONS its own names")
    # each hand-written section goes back after the generated section it followed
    hand: dict[str, list[str]] = {}
    after = ""
    for block in old:
        if HAND in _heading(block):
            hand.setdefault(after, []).append(block)
        else:
            after = _heading(block)
    lost = [block for key, blocks in hand.items() if key and key not in headings for block in blocks]
    if lost:
        raise ValueError(
            f"the hand-written section {_heading(lost[0])!r} followed a section the cells no longer make; "
            "move it after another heading in the file and run --document again"
        )
    out = [head.rstrip("\n") + "\n", *hand.get("", [])]
    for block in new:
        out.append(block)
        out.extend(hand.get(_heading(block), []))
    return "\n".join(out)


def write_document(check: bool = False) -> int:
    """``--document``: rewrite the results file from the cells; ``check``: only say whether it differs (exit 1)."""
    text = document(DOCUMENT.read_text(encoding="utf-8"))
    stale = f"{DOCUMENT.relative_to(REPO)} differs from its cells; run python -m {MODULE} --document"
    return write_or_check(DOCUMENT, text, check, stale)


def cli_defaults(variants: list[dict[str, Any]], cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Probes that are the CLI's default cell: ``ours:optimizer=X`` (``ours:optimizer=X,lr=Y`` where the
    family has its own lr) in the cli loop, X and Y what ``train`` picks for the backbone's family at the cell's
    batch (``app.recipe.optimizer_for``, ``family_lr``), as ``ours`` cells, where no ``ours`` cell of that backbone
    and seed ran; ``"from_probe"`` names the probe. (Run before ``train`` chose them per family.)
    """
    from byol_pytorch.app.recipe import family_lr, optimizer_for

    ran = {(c["backbone"], c["seed"]) for c in cells if (c["loop"], c["contender"]) == ("cli", "ours")}
    found = []
    for c in variants:
        name, kwargs = parse_contender(c["contender"])
        default: dict[str, Any] = {"optimizer": optimizer_for(c["backbone"])[0]}
        per_256 = family_lr(c["backbone"])
        if per_256 is not None:
            default["lr"] = per_256 * c["batch_size"] / 256
        if (c["loop"], name, kwargs) == ("cli", "ours", default) and (c["backbone"], c["seed"]) not in ran:
            found.append({**c, "contender": "ours", "from_probe": c["contender"]})
    return found


def cli_note(cells: list[dict[str, Any]]) -> list[str]:
    """The line naming the cli cells of ours that are ``cli_defaults`` probes (none: no line)."""
    probes = sorted((c["backbone"], c["seed"], c["from_probe"]) for c in cells if "from_probe" in c)
    if not probes:
        return []
    named = "; ".join(f"{backbone} seed {seed}: `{probe}`" for backbone, seed, probe in probes)
    return [f"The cli row of ours, taken from the probe that sets what `train` picks for the family: {named}", ""]


def _index(cells: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str, int], dict[str, Any]]:
    """Cells by (backbone, loop, contender, seed); an untrained cell's loop is "-"."""
    return {(c["backbone"], c["loop"], c["contender"], c["seed"]): c for c in cells}


CELL_KEYS = ("backbone", "loop", "contender", "seed")


def clean_bn_table(cells: list[dict[str, Any]]) -> str:
    """Per trained cell that measured them: kNN with BatchNorm statistics as trained and re-estimated on clean
    images, and the target (EMA) network's, each against the online net as trained."""
    rows = []
    for c in sorted(cells, key=lambda c: (c["backbone"], c["loop"], _contender_order(c["contender"]), c["seed"])):
        if c.get("knn_clean_bn") is None and c.get("knn_target") is None:
            continue

        def vs(key: str, c: dict[str, Any] = c) -> str:
            value = c.get(key)
            return "-" if value is None else f"{value:.1f} ({value - c['knn']:+.1f})"

        rows.append(
            [
                c["backbone"],
                c["loop"],
                c["contender"],
                c["seed"],
                f"{c['knn']:.1f}",
                vs("knn_clean_bn"),
                vs("knn_target"),
                vs("knn_target_clean_bn"),
            ]
        )
    if not rows:
        return ""
    header = [*CELL_KEYS, "online, BN as trained", "online, clean BN", "target, BN as trained", "target, clean BN"]
    return (
        "### Clean BatchNorm statistics and the target network (kNN %, difference to the online net as trained)\n\n"
        "Clean BN: running statistics re-estimated on 512 un-augmented training images, nothing else changed "
        "(`batchnorm.clean_statistics`); a net without BatchNorm shows the same figure. Target: the EMA network.\n\n"
        + markdown_table(header, rows)
    )


def before_after_table(stages: list[tuple[str, list[dict[str, Any]]]], cells: list[dict[str, Any]]) -> str:
    """Ours per backbone x loop in earlier matrices (``--before``, named by folder, oldest first) and now,
    with the other contenders now; ``change``: now against the first."""

    def knn(found: list[dict[str, Any]], backbone: str, loop: str, contender: str) -> list[float]:
        return [c["knn"] for c in found if (c["backbone"], c["loop"], c["contender"]) == (backbone, loop, contender)]

    rows = []
    for backbone in BACKBONES:
        for loop in LOOPS:
            then = [knn(found, backbone, loop, "ours") for _, found in stages]
            now = knn(cells, backbone, loop, "ours")
            if not any(then) and not now:
                continue
            others = [_fmt(knn(cells, backbone, loop, contender)) for contender in ("peer", "lightly")]
            first = then[0]
            change = f"{statistics.mean(now) - statistics.mean(first):+.1f}" if first and now else "-"
            rows.append([backbone, loop, *[_fmt(t) for t in then], _fmt(now), change, *others])
    names = ["ours before"] if len(stages) == 1 else [f"ours in {name}" for name, _ in stages]
    header = ["backbone", "loop", *names, "ours now", "change", "peer", "lightly"]
    return "### Ours before and after (kNN %; before: the cells in --before)\n\n" + markdown_table(header, rows)


def variants_table(variants: list[dict[str, Any]], cells: list[dict[str, Any]]) -> str:
    """Probes of a default (``ours:key=value``) beside the same cell of plain ours and the same seed's random init.

    In the cli loop plain ours may itself be a probe (``cli_defaults``: the family's choice, run as one); that
    probe is not compared with itself, every other probe of the cell is compared with it.
    """
    found = _index(cells)
    rows = []
    for c in sorted(variants, key=lambda c: (c["backbone"], c["loop"], c["contender"], c["seed"])):
        default = found.get((c["backbone"], c["loop"], "ours", c["seed"]), {})
        ours = None if default.get("from_probe") == c["contender"] else default.get("knn")
        random = found.get((c["backbone"], "-", "random", c["seed"]), {}).get("knn")
        rows.append(
            [
                c["backbone"],
                c["loop"],
                c["contender"].partition(":")[2],
                c["seed"],
                f"{c['knn']:.1f}",
                "-" if ours is None else f"{ours:.1f} ({c['knn'] - ours:+.1f})",
                "-" if random is None else f"{random:.1f}",
                f"{c['images_per_s']:.0f}",
            ]
        )
    header = ["backbone", "loop", "ours with", "seed", "kNN", "ours, defaults (difference)", "random init", "img/s"]
    return "### Defaults probed: ours with one argument changed, same cell and seed\n\n" + markdown_table(header, rows)


def longer_runs_table(cells: list[dict[str, Any]], steps: int) -> str:
    """Cells trained past the matrix's budget: their kNN along the run against the same seed's random init."""
    randoms = _index(c for c in cells if c["contender"] == "random")  # one per backbone and seed
    rows = []
    for c in sorted(cells, key=lambda c: (c["backbone"], c["loop"], c["contender"], c["seed"], c["steps"])):
        if c["steps"] <= steps:
            continue
        points = [*c.get("curve", []), [c["steps"], c["knn"]]]
        bar = randoms.get((c["backbone"], "-", "random", c["seed"]), {}).get("knn")
        above = [s for s, acc in points if bar is not None and acc >= bar]
        first = "-" if bar is None else f"step {above[0]}" if above else "never"  # "-": no random cell
        rows.append(
            [
                c["backbone"],
                c["loop"],
                c["contender"],
                c["seed"],
                "; ".join(f"{s}: {acc:.1f}" for s, acc in points),
                "-" if bar is None else f"{bar:.1f}",
                first,
                f"{c['images_per_s']:.0f}",
            ]
        )
    if not rows:
        return ""
    header = ["backbone", "loop", "contender", "seed", "kNN at step", "random init", "first at or above it", "img/s"]
    return f"### Past the budget: kNN along longer runs (the matrix stops at {steps} steps)\n\n" + markdown_table(
        header, rows
    )


def alarm_table(cells: list[dict[str, Any]]) -> str:
    """The collapse alarm's figures in the cells of ours that recorded them, beside the kNN verdict.

    Per cell: the lowest and the last projection std over the run in units of 1/sqrt(D)
    (the alarm fires below 0.1 for 50 steps in a row), the effective rank of the last
    sample of projections, the effective rank of the eval-mode features of 512 test
    images (and the random net's), and the warnings raised.
    """
    found = _index(cells)
    rows = []
    for c in cells:
        if "monitor" not in c:
            continue
        stds = [m[1] for m in c["monitor"]]
        random = found.get((c["backbone"], "-", "random", c["seed"]), {})  # the same seed's random init
        before = random.get("representation_rank")
        bar = random.get("knn")
        verdict = "no random cell" if bar is None else "below random init" if c["knn"] < bar else "above random init"
        rows.append(
            [
                c["backbone"],
                c["loop"],
                c["contender"],
                c["seed"],
                f"{min(stds):.2f}",
                f"{stds[-1]:.2f}",
                f"{c['monitor'][-1][2]:.1f}",
                f"{c['representation_rank']:.1f}" + (f" (random {before:.1f})" if before is not None else ""),
                f"{c['knn']:.1f} ({verdict})",
                "; ".join(c.get("warnings", [])) or "none",
            ]
        )
    if not rows:
        return ""
    header = [
        "backbone",
        "loop",
        "contender",
        "seed",
        "min std x sqrt(D)",
        "last std x sqrt(D)",
        "projection rank (64 rows)",
        "feature rank (512 test images)",
        "kNN",
        "CollapseWarning",
    ]
    return "### The collapse alarm's figures (ours)\n\n" + markdown_table(header, rows)


def _contender_order(name: str) -> tuple[int, str]:
    base = name.split(":")[0]
    return (CONTENDERS.index(base) if base in CONTENDERS else 9, name)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cell", nargs=3, metavar=("BACKBONE", "LOOP", "CONTENDER"), help="run one cell")
    parser.add_argument("--plan", action="store_true", help="print the missing cells' commands")
    parser.add_argument("--run", action="store_true", help="run the missing cells")
    parser.add_argument("--table", action="store_true", help="print the table of the cells found")
    parser.add_argument(
        "--document",
        action="store_true",
        help=f"rewrite {DOCUMENT.relative_to(REPO)} from the cells, keeping its hand-written head and sections",
    )
    parser.add_argument("--check", action="store_true", help="with --document: exit 1 if it is out of date")
    parser.add_argument(
        "--before",
        type=Path,
        action="append",
        help="with --table: a folder of earlier cells of ours to compare with (repeat: oldest first)",
    )
    parser.add_argument(
        "--fill-ranks", action="store_true", help="add the feature rank to random-init cells written without it"
    )
    parser.add_argument("--steps", type=int, default=200, help="the budget (collapse shows by 100 steps)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32, help="side of the images and views (upscaled from 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--loops", nargs="+", default=list(LOOPS))
    parser.add_argument("--contenders", nargs="+", default=None, help="override the planned contenders")
    parser.add_argument("--curve-every", type=int, default=100, help="also kNN every N steps (0: only at the end)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=RESULTS, help="the folder of cell JSON files")
    parser.add_argument(
        "--smoke", action="store_true", help="quality.py's smoke data (128 images), batch 32: seconds, for the tests"
    )
    return parser


def main(args: argparse.Namespace) -> str | None:
    parser = get_args_parser()
    if args.check and not args.document:
        parser.error("--check goes with --document (python -m benchmarks.robustness --document --check)")
    if args.document:
        defaults = vars(parser.parse_args([]))
        given = [
            k for k, v in vars(args).items() if k not in ("document", "check", "jobs", "threads") and v != defaults[k]
        ]
        if given:
            parser.error(
                f"--document takes no --{given[0].replace('_', '-')}: it rebuilds the whole file at the matrix's "
                "own settings (use --table for a table of your choice)"
            )
    if args.smoke:
        args.batch_size = bench_data.SMOKE_BATCH
    if args.cell:
        args.backbone, args.loop, args.contender = args.cell
        result = run_cell(args)
        path = cell_path(
            args.results, args.backbone, result["loop"], args.contender, args.seed, result["steps"], args.image_size
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    elif args.fill_ranks:
        fill_ranks(args)
    elif args.plan:
        for cell in planned(args):
            print(shlex.join(["python", *module_command(MODULE, *_cell_args(cell, args))[1:]]))
    elif args.run:
        run_missing(args)
    elif args.document:
        raise SystemExit(write_document(args.check))
    elif args.table:
        text = table(args)
        print(text)
        return text
    return None


if __name__ == "__main__":
    main(get_args_parser().parse_args())
