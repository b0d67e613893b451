"""``byol-pytorch demo``: BYOL learning Fashion-MNIST on a laptop CPU in a few minutes.

The demo answers a newcomer's first question, "does it learn?", on real data and
without a GPU. It

1. reads Fashion-MNIST (Xiao et al. 2017) from the four IDX files found locally
   (Debian package ``dataset-fashion-mnist``, or ``--data-dir``);
2. measures weighted kNN accuracy (k=20, T=0.07; Wu et al. 2018) of a randomly
   initialised backbone on the 10,000 test images, with a 10,000-image bank drawn from
   the training split, and of the raw pixels for reference;
3. pretrains the backbone with :class:`~byol_pytorch.BYOL` on the training images (no
   labels), kept in memory as uint8 and augmented in batches inside the learner;
4. measures the kNN accuracy again, writes ``OUT/curves.png`` (loss, kNN, lr, tau per
   step), ``OUT/views.png`` (a few images beside their two views) and
   ``OUT/metrics.jsonl``, and ends with the line
   ``kNN accuracy: random init 0.XXXX -> BYOL 0.YYYY``.

The backbone, its size and the recipe (crop scale for 28 px images, brightness and
contrast as the only colour ops, blur and solarize, AdamW, tau, batch size, steps, head
widths) were chosen by measurement on a 2-core CPU: ``benchmarks/results/demo.md`` has the
measurements and the figures the command prints there.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..augment import BYOLAugment
from ..byol import BYOL
from ..data.sampling import StepBatch
from ..training.distributed import DistContext
from ..training.engine import DivergedError, Engine, OptimizerStep, Periodic, TrainState
from ..training.evaluate import extract_features, knn_accuracy
from ..training.optim import build_optimizer, warmup_cosine_scheduler
from .devices import resolve_device
from .errors import UserError, one_line
from .fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from .recipe import check_seed

__all__ = ["DEMO_DEFAULTS", "QUICK_SETTINGS", "demo_cnn", "add_demo_arguments", "run_demo", "main"]

# The recipe, chosen by measurement on a 2-core CPU (see benchmarks/results/demo.md).
DEMO_DEFAULTS: dict[str, Any] = {
    "out": "runs/demo",
    "model": "cnn",  # gained more kNN per CPU second than width 32, resnet10t or a 6-layer CNN
    "width": 16,
    "pool": 2,  # a 2x2 grid (512-d): kNN +4.1/+4.9/+4.4 over raw pixels (global: +1.3/+2.3/+2.1), 1.05x the step
    "steps": 2000,  # +5 points by step 500; 2000 steps: 124-200 s on a 2-core AMD EPYC
    "batch_size": 128,  # 64 and 128 equal per CPU second
    "image_size": 28,
    "train_images": 60000,
    "bank_images": 10000,
    "test_images": 10000,
    "lr": 5e-3,  # beat 2e-3 and 1e-2
    "weight_decay": 1e-6,  # the paper's LARS decay (1.5e-6) rounded; small nets barely need any
    "warmup_steps": 0,
    "tau": 0.96,  # as good as 0.9; 0.99 (constant or the paper's cosine) learnt slower
    "tau_schedule": "constant",
    "crop_scale": 0.3,  # beat 0.2 and 0.5 (the paper's 0.08 is for 224 px)
    "projection_size": 128,  # the paper's 4096 / 256 heads: 1.8x the CPU per step, lower kNN
    "projection_hidden_size": 512,
    "knn_points": 3,
    "seed": 0,
    "threads": 2,
}
# --quick: the reduced demo of the test suite (half a minute, not minutes): the shortest
# setting measured where BYOL beats its own random-init kNN on every seed tried (seeds 0-3:
# +6.3 / +5.5 / +1.5 / +3.2 points; see benchmarks/results/demo.md).
QUICK_SETTINGS: dict[str, Any] = {
    "pool": 1,  # the global pool these seeds were measured with
    "steps": 400,
    "batch_size": 64,
    "width": 8,
    "train_images": 2000,
    "bank_images": 2000,
    "test_images": 1000,
    "projection_size": 32,
    "projection_hidden_size": 64,
    "knn_points": 1,
}
KNN_K, KNN_TEMPERATURE = 20, 0.07  # Wu et al. 2018, as in the DINO and solo-learn monitors
_VIEWS_SHOWN = 8
_LOG_LINES = 10  # progress lines printed during training


def demo_cnn(width: int = 16, in_chans: int = 1, num_classes: int = 10, pool: int = 1) -> nn.Sequential:
    """The demo's backbone: four 3x3 conv-BN-ReLU blocks, an average pool, a classifier.

    Widths ``w, 2w, 4w, 8w`` at strides ``1, 2, 2, 2`` (28 -> 28 -> 14 -> 7 -> 4 px); the
    last map is average-pooled to a ``pool x pool`` grid and flattened: the representation is
    that ``8w * pool**2`` vector (the classifier's input, which BYOL's ``hidden_layer="auto"``
    finds). With ``width=16`` it has 99k parameters (103k with ``pool=2``, the demo's 512-d
    representation) and costs 3.1 M multiply-adds per 28 px image. Its random initialisation gives a real kNN baseline
    (features vary with the image; see benchmarks/results/demo.md).

    Args:
        width: channels of the first block.
        in_chans: input channels (1 for Fashion-MNIST).
        num_classes: outputs of the classifier (unused by BYOL, kept so the net is a
            complete classifier for fine-tuning).
        pool: side of the grid the last map is pooled to (1: global average pooling).

    Returns:
        The network, in train mode.
    """
    layers: list[nn.Module] = []
    channels = in_chans
    for out, stride in ((width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)):
        # No conv bias: the BatchNorm after it has one.
        layers += [nn.Conv2d(channels, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        channels = out
    layers += [nn.AdaptiveAvgPool2d(pool), nn.Flatten(), nn.Linear(channels * pool * pool, num_classes)]
    return nn.Sequential(*layers)


def _last_map_side(image_size: int) -> int:
    """Side of ``demo_cnn``'s last map: each stride-2 block (3x3, padding 1) makes a side ``s`` into ``ceil(s / 2)``."""
    for _ in range(3):
        image_size = -(-image_size // 2)
    return image_size


# The integer flags that set one of DEMO_DEFAULTS, with their help ("{}": the default).
_COUNT_FLAGS: tuple[tuple[str, str], ...] = (
    ("steps", "optimizer steps (default: {}; fewer is faster, more is better)"),
    ("batch_size", "images per step (default: {})"),
    ("image_size", "side of the views; the 28 px images are resized to it (default: {})"),
    ("train_images", "training images used for pretraining (default: {}, all)"),
    ("bank_images", "training images in the kNN bank (default: {})"),
    ("test_images", "test images classified by kNN (default: {}, all)"),
    ("width", "channels of the first block of the 'cnn' model (default: {})"),
    ("pool", "the 'cnn' model's last map is average-pooled to a grid of this side (default: {})"),
    ("projection_size", "projector output (default: {})"),
    ("projection_hidden_size", "hidden width of the heads (default: {})"),
    ("knn_points", "kNN evaluations during training, besides the start and the end (default: {})"),
    ("seed", "seed of the model, the data order and the views (default: {})"),
)


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the flags of ``byol-pytorch demo`` to ``parser`` and return it."""
    d = DEMO_DEFAULTS
    a = parser.add_argument
    a(
        "--data-dir",
        type=os.path.expanduser,  # python -m byol_pytorch.app.demo parses without the command's expansion
        help="folder with the four Fashion-MNIST IDX files (.gz or not); default: "
        "$BYOL_FASHION_MNIST_DIR, else /usr/share/datasets/fashion-mnist (apt-get install -y dataset-fashion-mnist)",
    )
    a(
        "--out",
        default=d["out"],
        type=os.path.expanduser,
        help="run folder for curves.png, views.png, metrics.jsonl (default: %(default)s)",
    )
    for name, text in _COUNT_FLAGS:
        a("--" + name.replace("_", "-"), type=int, help=text.format(d[name]))
    a(
        "--model",
        help=f"'cnn' (the demo's small CNN) or a timm model name, built with in_chans=1 (default: {d['model']})",
    )
    a("--lr", type=float, help=f"peak AdamW learning rate, cosine-decayed to 0 (default: {d['lr']:g})")
    a("--tau", type=float, help=f"EMA decay of the target network (default: {d['tau']:g})")
    a(
        "--crop-scale",
        type=float,
        help=f"smallest crop area of the views (default: {d['crop_scale']:g}; the paper's "
        "0.08 is meant for 224 px images)",
    )
    a(
        "--threads",
        type=int,
        help=f"CPU threads of torch (default: {d['threads']}, a 2-core laptop; on a machine busy "
        "with other jobs, 1 thread, or OMP_WAIT_POLICY=PASSIVE in the environment, avoids threads "
        "waiting for each other)",
    )
    a(
        "--tau-schedule",
        choices=["constant", "cosine"],
        help=f"keep tau, or raise it to 1 with the paper's cosine schedule (default: {d['tau_schedule']})",
    )
    a("--device", help="cpu, cuda, ... (default: cuda when available, else cpu)")
    quick = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK_SETTINGS.items())
    a(
        "--quick",
        action="store_true",
        help=f"a reduced demo (the test suite's; about half a minute on an idle 2-core machine, minutes on a busy "
        f"one): {quick}; explicit flags win",
    )
    return parser


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The demo's settings: explicit flags, else --quick's, else the defaults."""
    settings = dict(DEMO_DEFAULTS)
    if getattr(args, "quick", False):
        settings.update(QUICK_SETTINGS)
    for key in settings:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    settings["data_dir"] = getattr(args, "data_dir", None)
    settings["device"] = str(resolve_device(getattr(args, "device", None)))
    for key in (
        "steps",
        "batch_size",
        "image_size",
        "train_images",
        "bank_images",
        "test_images",
        "width",
        "pool",
        "projection_size",
        "projection_hidden_size",
        "threads",
    ):
        if settings[key] <= 0:
            raise UserError(f"--{key.replace('_', '-')} must be positive, got {settings[key]}")
    for key in ("batch_size", "train_images"):
        if settings[key] < 2:
            raise UserError(
                f"--{key.replace('_', '-')} must be at least 2 (BatchNorm and the loss need a "
                f"batch), got {settings[key]}"
            )
    check_seed(settings["seed"])
    side = _last_map_side(settings["image_size"])
    if settings["model"] == "cnn" and settings["pool"] > side:
        raise UserError(
            f"--pool {settings['pool']} is larger than the cnn's last map ({side}x{side} at --image-size "
            f"{settings['image_size']}): the grid would repeat its cells; use --pool {side} or less"
        )
    if settings["knn_points"] < 0:
        raise UserError(f"--knn-points must be 0 or more, got {settings['knn_points']}")
    if not 0.0 <= settings["tau"] <= 1.0:
        raise UserError(f"--tau must be in [0, 1] (the paper: 0.99-0.996), got {settings['tau']}")
    if not 0.0 < settings["crop_scale"] <= 1.0:
        raise UserError(f"--crop-scale must be in (0, 1], got {settings['crop_scale']}")
    if not 0 < settings["lr"] < float("inf"):
        raise UserError(f"--lr must be a positive finite number, got {settings['lr']}")
    out = Path(settings["out"])
    blocker = next((p for p in (out, *out.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():  # found now, not after minutes of training
        raise UserError(f"--out {out}: {blocker} is a file, not a folder; choose another --out")
    return settings


def _check_writable(out: Path) -> None:
    """``out`` made and written to once (a file created and removed): an ``OSError`` naming it otherwise."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise OSError(error.errno, error.strerror or str(error), str(out)) from error


def _load(data_dir: str | None, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        return load_fashion_mnist(data_dir, split)
    except (FileNotFoundError, ValueError) as error:  # missing, or a corrupt or truncated file
        raise UserError(str(error)) from None


def _subset(n_total: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``min(n, n_total)`` distinct indices, drawn once with ``generator``."""
    return torch.randperm(n_total, generator=generator)[: min(n, n_total)]


def _build_backbone(settings: dict[str, Any]) -> nn.Module:
    if settings["model"] == "cnn":
        return demo_cnn(settings["width"], pool=settings["pool"])
    from ..training.models import build_backbone

    try:
        return build_backbone(settings["model"], in_chans=1, image_size=settings["image_size"])  # a ViT's grid
    except ValueError as error:
        raise UserError(str(error)) from None


def _views(settings: dict[str, Any]) -> tuple[BYOLAugment, BYOLAugment]:
    """The two views for 28 px grayscale clothes (``BYOLAugment`` with a few overrides).

    The paper's Table 6 (flip 0.5, jitter 0.8 with brightness and contrast 0.4, blur
    1.0 / 0.1 with a 3 px kernel at 28 px, solarize 0.0 / 0.2), except: crops of at least
    ``crop_scale`` of the area (0.08 leaves a few pixels of a 28 px image), and no
    saturation, hue or grayscale (no-ops on one channel). benchmarks/results/demo.md has the
    measurements that chose each value.
    """
    common: dict[str, Any] = dict(crop_scale=(settings["crop_scale"], 1.0), saturation=0.0, hue=0.0, grayscale_p=0.0)
    size = settings["image_size"]
    return BYOLAugment(size, view=1, preset="paper", **common), BYOLAugment(size, view=2, preset="paper", **common)


def _knn_of_features(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor
) -> float:
    """Weighted kNN accuracy (k=20, T=0.07) of query features against bank features."""
    return knn_accuracy(
        bank,
        bank_labels,
        queries,
        query_labels,
        num_classes=len(FASHION_MNIST_CLASSES),
        k=KNN_K,
        temperature=KNN_TEMPERATURE,
    )


def _knn(
    learner: BYOL,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    device: str,
) -> float:
    """Weighted kNN accuracy of the learner's representation (the backbone's pooled features)."""
    embed = functools.partial(learner, return_embedding=True, return_projection=False)
    bank_features = extract_features(embed, bank, batch_size=500, device=device, transform=prepare)
    query_features = extract_features(embed, queries, batch_size=500, device=device, transform=prepare)
    return _knn_of_features(bank_features, bank_labels, query_features, query_labels)


def _knn_steps(steps: int, points: int) -> list[int]:
    """Steps after which the kNN monitor runs during training (evenly spaced, the end excluded)."""
    return sorted({round(steps * i / (points + 1)) for i in range(1, points + 1)} - {0, steps})


def _in_memory_batches(images: torch.Tensor, batch: int) -> Iterator[StepBatch]:
    """Endless shuffled batches of in-memory images: a new ``randperm`` each epoch (global generator)."""
    per_epoch, epoch = len(images) // batch, 0
    while True:
        order = torch.randperm(len(images), device=images.device)
        for position in range(1, per_epoch + 1):
            chosen = order[(position - 1) * batch : position * batch]
            yield StepBatch([images[chosen]], 0, epoch, position, per_epoch)  # (B, 1, 28, 28) uint8
        epoch += 1


def _pretrain(
    learner: BYOL, images: torch.Tensor, settings: dict[str, Any], evaluate: Callable[[], float]
) -> tuple[list[dict[str, Any]], float, float]:
    """BYOL training on the engine: AdamW, cosine lr, one target update per step, shuffled epochs.

    Args:
        learner: the BYOL learner (trained in place).
        images: uint8 (N, 1, 28, 28) training images, on the learner's device.
        settings: the demo's settings (steps, batch_size, lr, weight_decay, warmup_steps,
            knn_points).
        evaluate: the kNN monitor, run ``knn_points`` times at evenly spaced steps.

    Returns:
        One record per step (``step``, ``loss``, ``lr``, ``tau``, and ``knn_acc`` where the
        monitor ran), the training seconds and the monitor's seconds.

    Raises:
        UserError: the loss turned non-finite (a too-high --lr).
    """
    steps = settings["steps"]
    optimizer = build_optimizer("adamw", learner, settings["lr"], settings["weight_decay"])
    scheduler = warmup_cosine_scheduler(optimizer, steps, settings["warmup_steps"])
    monitor_at = set(_knn_steps(steps, settings["knn_points"]))
    log_every = max(1, steps // _LOG_LINES)
    metrics: list[dict[str, Any]] = []
    monitor_time = [0.0]

    def record(s: TrainState) -> None:  # every step: the step's own loss
        metrics.append({"step": s.step, "lr": s.lr, "tau": s.tau, "loss": s.take_interval()["loss"]})

    def monitor(s: TrainState) -> None:
        tick = time.perf_counter()
        metrics[-1]["knn_acc"] = evaluate()
        monitor_time[0] += time.perf_counter() - tick

    def show(s: TrainState) -> None:
        row = metrics[-1]
        knn_text = f"  kNN {row['knn_acc']:.4f}" if "knn_acc" in row else ""
        print(
            f"step {s.step:>5}/{steps}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
            f"tau {row['tau']:.4f}  {time.perf_counter() - s.start - monitor_time[0]:6.1f} s{knn_text}",
            flush=True,
        )

    device = images.device
    ctx = DistContext(device=device)  # the demo runs in one process
    engine = Engine(
        OptimizerStep(learner, learner, optimizer, scheduler, "fp32", device),
        ctx,
        check_every=1,
        progress=False,
        catch_signals=False,
    )
    hooks = [
        Periodic(record, every=1),
        Periodic(monitor, when=lambda s: s.stepped and s.step in monitor_at),
        Periodic(show, every=log_every, at_end=True, when=lambda s: s.stepped and s.step in monitor_at),
    ]
    learner.train()
    state = TrainState(total=steps)
    try:
        engine.run(_in_memory_batches(images, min(settings["batch_size"], len(images))), state, hooks)
    except DivergedError as error:
        raise UserError(f"{error}; lower --lr (now {settings['lr']:g})") from None
    return metrics, time.perf_counter() - state.start - monitor_time[0], monitor_time[0]


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Run the demo; prints progress and ends with ``kNN accuracy: random init A -> BYOL B``.

    Args:
        args: the parsed flags of :func:`add_demo_arguments` (missing ones take their
            defaults, so ``argparse.Namespace(quick=True)`` works).

    Returns:
        ``knn_random_init``, ``knn_byol``, ``knn_raw_pixels`` (accuracies in [0, 1]),
        ``knn_curve`` (``[(step, accuracy), ...]``), ``seconds`` (wall time per phase:
        ``load``, ``eval_init``, ``train``, ``eval_final``, ``plots``, ``total``),
        ``steps_per_second``, ``curves`` and ``views`` (paths of the figures, or None
        without matplotlib), ``metrics`` (path of metrics.jsonl) and ``settings``.

    Raises:
        UserError: missing or corrupt dataset files, a bad flag, or a loss that turned
            non-finite (the command prints it as one line).
    """
    start = time.perf_counter()
    settings = _settings(args)
    seconds: dict[str, float] = {}
    threads_before = torch.get_num_threads()
    torch.set_num_threads(settings["threads"])
    try:
        pretrain, bank, bank_labels, queries, query_labels = _demo_data(settings)
        _check_writable(Path(settings["out"]))  # now, not after minutes of training
        seconds["load"] = time.perf_counter() - start

        phase = time.perf_counter()
        raw = _knn_of_features(bank.flatten(1).float(), bank_labels, queries.flatten(1).float(), query_labels)
        learner, view1, view2, prepare = _demo_learner(settings)
        evaluate = functools.partial(
            _knn, learner, prepare, bank, bank_labels, queries, query_labels, settings["device"]
        )
        init = evaluate()
        seconds["eval_init"] = time.perf_counter() - phase
        print(f"kNN on raw pixels {raw:.4f}; random init {init:.4f} ({seconds['eval_init']:.1f} s)", flush=True)

        metrics, seconds["train"], seconds["monitor"] = _pretrain(learner, pretrain, settings, evaluate)
        metrics.insert(0, {"step": 0, "knn_acc": init})

        phase = time.perf_counter()
        final = metrics[-1]["knn_acc"] = evaluate()
        seconds["eval_final"] = time.perf_counter() - phase

        phase = time.perf_counter()
        out = Path(settings["out"])
        out.mkdir(parents=True, exist_ok=True)
        metrics_path = out / "metrics.jsonl"
        metrics_path.write_text("".join(json.dumps(m) + "\n" for m in metrics), encoding="utf-8")
        curves_path, views_path = _plots(out, metrics, view1, view2, bank, bank_labels, settings, init, final)
        seconds["plots"] = time.perf_counter() - phase
    finally:
        torch.set_num_threads(threads_before)
    seconds["total"] = time.perf_counter() - start
    _print_summary(settings["steps"], seconds, [curves_path, views_path, metrics_path], raw, init, final)
    train_time = seconds["train"]
    return {
        "knn_random_init": init,
        "knn_byol": final,
        "knn_raw_pixels": raw,
        "knn_curve": [(m["step"], m["knn_acc"]) for m in metrics if "knn_acc" in m],
        "seconds": seconds,
        "steps_per_second": settings["steps"] / train_time if train_time > 0 else float("nan"),
        "curves": curves_path,
        "views": views_path,
        "metrics": metrics_path,
        "settings": settings,
    }


def _demo_data(settings: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """``(pretrain, bank, bank_labels, queries, query_labels)``: uint8 (N, 1, 28, 28) images and labels.

    The pretraining images (on the demo's device) and the kNN bank are drawn from the
    training split with a generator seeded by ``--seed``; the queries are the first test images.
    """
    train_images, train_labels = _load(settings["data_dir"], "train")
    test_images, test_labels = _load(settings["data_dir"], "test")
    torch.manual_seed(settings["seed"])
    picker = torch.Generator().manual_seed(settings["seed"])
    pretrain = train_images[_subset(len(train_images), settings["train_images"], picker)].to(settings["device"])
    bank_index = _subset(len(train_images), settings["bank_images"], picker)
    bank, bank_labels = train_images[bank_index], train_labels[bank_index]  # (N, 1, 28, 28), (N,)
    queries, query_labels = test_images[: settings["test_images"]], test_labels[: settings["test_images"]]
    print(
        f"Fashion-MNIST: {len(pretrain)} images for BYOL, kNN bank {len(bank)} train images, "
        f"{len(queries)} test queries; device {settings['device']}, {settings['threads']} threads",
        flush=True,
    )
    return pretrain, bank, bank_labels, queries, query_labels


def _demo_learner(settings: dict[str, Any]) -> tuple[BYOL, BYOLAugment, BYOLAugment, Callable[..., torch.Tensor]]:
    """The learner around the demo's backbone, its two views, and the evaluation transform."""
    net = _build_backbone(settings).to(settings["device"])
    view1, view2 = _views(settings)
    size = settings["image_size"]

    def prepare(x: torch.Tensor) -> torch.Tensor:  # uint8 (B, 1, 28, 28) -> normalised (B, 1, size, size)
        x = x.float() / 255
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp_(0, 1)
        return view1.normalize(x)

    try:
        learner = BYOL(
            net,
            size,
            projection_size=settings["projection_size"],
            projection_hidden_size=settings["projection_hidden_size"],
            augment_fn=view1,
            augment_fn2=view2,
            moving_average_decay=settings["tau"],
            moving_average_total_steps=settings["steps"] if settings["tau_schedule"] == "cosine" else None,
        ).to(settings["device"])
    except (ValueError, TypeError) as error:  # a net that cannot take the demo's images (a ConvNeXt at 28 px)
        raise UserError(f"--model {settings['model']}: {error}") from None
    return learner, view1, view2, prepare


def _print_summary(
    steps: int, seconds: dict[str, float], written: list[Path | None], raw: float, init: float, final: float
) -> None:
    train_time = seconds["train"]
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items() if k != "total")
    print(
        f"BYOL: {steps} steps in {train_time:.1f} s ({steps / train_time:.2f} steps/s); total "
        f"{seconds['total']:.1f} s ({phases})",
        flush=True,
    )
    print(f"wrote {', '.join(str(p) for p in written if p is not None)}", flush=True)
    print(f"kNN on raw pixels {raw:.4f} (reference)", flush=True)
    print(f"kNN accuracy: random init {init:.4f} -> BYOL {final:.4f}", flush=True)


def _plots(
    out: Path,
    metrics: list[dict[str, Any]],
    view1: BYOLAugment,
    view2: BYOLAugment,
    images: torch.Tensor,
    labels: torch.Tensor,
    settings: dict[str, Any],
    init: float,
    final: float,
) -> tuple[Path | None, Path | None]:
    """Write curves.png and views.png; (None, None) with a note when matplotlib is missing.

    views.png shows the first image of each of up to 8 classes beside its two views.
    """
    from .plots import plot_curves, plot_views

    title = f"BYOL on Fashion-MNIST: kNN {init:.4f} (random init) -> {final:.4f} after {settings['steps']} steps"
    first_of_class = [int((labels == c).nonzero()[0]) for c in labels.unique().tolist()[:_VIEWS_SHOWN]]
    originals = images[first_of_class].cpu()  # (8, 1, 28, 28) uint8
    generator = torch.Generator().manual_seed(settings["seed"])
    with torch.no_grad():
        first, second = view1(originals, generator=generator), view2(originals, generator=generator)
    mean, std = view1.resolve_mean_std(originals.shape[1])
    try:
        curves = plot_curves(metrics, out / "curves.png", title=title)
        views = plot_views(originals, first, second, out / "views.png", mean=mean, std=std)
    except ImportError as error:
        print(f"no figures: {error}", flush=True)
        return None, None
    return curves, views


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m byol_pytorch.app.demo [flags]``: run the demo; returns the exit status.

    Bad input (a missing dataset, a bad flag) prints one line and returns 1.
    """
    parser = argparse.ArgumentParser(prog="python -m byol_pytorch.app.demo", description=__doc__.splitlines()[0])
    add_demo_arguments(parser)
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        run_demo(args)
    except UserError as error:
        sys.stderr.write(f"byol-pytorch demo: error: {one_line(error)}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
