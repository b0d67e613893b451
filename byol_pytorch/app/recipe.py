"""The flags of ``byol-pytorch train`` and the run's recipe they resolve to.

The recipe (``RECIPE_DEFAULTS``: model, sizes, optimiser, schedules, seed) is fixed for
the life of a run: a resumed run takes it from its checkpoint, and a flag that
contradicts it is an error. The other flags (where, how fast, how often to report) may
change between a run and its resumption.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..distributed import DistContext
from ..optim import OPTIMIZERS, default_lr, default_weight_decay
from .errors import UserError

__all__ = [
    "DEFAULT_EPOCHS",
    "RECIPE_DEFAULTS",
    "add_train_arguments",
    "check_sizes",
    "get_args_parser",
    "lr_help",
    "plain",
    "resolve_recipe",
    "run_length",
]

RECIPE_DEFAULTS: dict[str, Any] = {
    "model": "resnet50",
    "in_chans": None,
    "image_size": 224,
    "batch_size": 256,
    "optimizer": "lars",
    "lr": None,
    "weight_decay": None,
    "warmup_epochs": None,
    "tau_base": 0.996,
    "accumulate": 1,
    "seed": 0,
    "projection_size": 256,
    "projection_hidden_size": 4096,
    "views_in_one_batch": False,
}
DEFAULT_EPOCHS = 100


def lr_help() -> str:
    """One line per optimiser naming its default lr and weight decay and their source."""
    return "; ".join(
        f"{name}: {spec['lr_per_256']:g} x batch/256, wd {spec['weight_decay']:g} ({spec['source']})"
        for name, spec in OPTIMIZERS.items()
    )


def _add_run_flags(a: Any) -> None:
    """Where the run reads and writes: data, run folder, resumption."""
    a(
        "--data",
        help="folder of images, searched recursively (unreadable files are skipped and counted); "
        "with --resume, defaults to the run's folder",
    )
    a("--out", default="runs/byol", help="run folder: last.pt, metrics.jsonl, curves.png (default: %(default)s)")
    a(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue the run in --out from OUT/last.pt (or from CHECKPOINT): model, optimiser, schedules, "
        "data position and random generators; --max-steps/--epochs set a new total",
    )


def _add_recipe_flags(a: Any) -> None:
    """The recipe: model, sizes, optimiser, schedules, heads, seed."""
    a(
        "--model",
        help="timm model name or torchvision:NAME, built with random weights (default: resnet50, the paper's backbone)",
    )
    a(
        "--in-chans",
        type=int,
        help="input channels of the model (default: the model's, 3); images are converted to them",
    )
    a("--image-size", type=int, help="side of the augmented views (default: 224, the paper's)")
    a(
        "--batch-size",
        type=int,
        help="images per optimizer step over all processes and accumulation steps (default: 256; the paper uses 4096)",
    )
    a("--epochs", type=int, help=f"epochs to train (default: {DEFAULT_EPOCHS}; the paper's longest run is 1000)")
    a("--max-steps", type=int, help="total optimizer steps; overrides --epochs")
    a(
        "--optimizer",
        choices=["lars", "adamw", "sgd"],
        help="default: lars (the paper's, momentum 0.9, "
        "trust coefficient 1e-3, biases and norms excluded from decay and adaptation)",
    )
    a("--lr", type=float, help=f"peak learning rate; default per optimizer: {lr_help()}")
    a("--weight-decay", type=float, help="default per optimizer, see --lr (the paper: 1.5e-6 with LARS)")
    a(
        "--warmup-epochs",
        type=float,
        help="linear warm-up before the cosine decay (default: 10 epochs as in the paper, at most 10%% of the run)",
    )
    a(
        "--tau-base",
        type=float,
        help="EMA decay of the target at step 0, raised to 1 by a cosine schedule "
        "(default: 0.996, the paper's; its 100-epoch config uses 0.99)",
    )
    a("--projection-size", type=int, help="projector output (default: 256, the paper's)")
    a("--projection-hidden-size", type=int, help="hidden width of projector and predictor (default: 4096)")
    a(
        "--views-in-one-batch",
        action="store_const",
        const=True,
        default=None,
        help="forward both views as one batch of 2B: fewer, larger passes (faster on CPUs and small "
        "batches), BatchNorm statistics over both views instead of the paper's per view",
    )
    a(
        "--accumulate",
        type=int,
        help="micro-batches per optimizer step (default: 1); --batch-size is split "
        "over them (BatchNorm sees the micro-batch)",
    )
    a("--seed", type=int, help="seed of the model, the data order and the augmentations (default: 0)")


def _add_runtime_flags(a: Any) -> None:
    """How the run executes and reports: precision, devices, checkpoints, metrics, monitor."""
    a(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        help="autocast precision (default: bf16 on GPUs that support it, fp32 otherwise; fp16 uses a GradScaler)",
    )
    a("--workers", type=int, help="data loading processes per training process (default: min(8, CPUs))")
    a("--device", help="cpu, cuda, cuda:1, mps (default: this process's GPU when there is one, else cpu)")
    a(
        "--checkpoint-every",
        type=int,
        default=1000,
        help="save OUT/last.pt every N steps (default: %(default)s; also at the end and on SIGTERM/SIGINT)",
    )
    a("--log-every", type=int, default=10, help="write metrics every N steps (default: %(default)s)")
    a("--val-data", help="labelled folder (one sub-folder per class) for a kNN accuracy monitor")
    a(
        "--val-every",
        type=int,
        default=5,
        help="run the kNN monitor every N epochs and at the end (default: %(default)s)",
    )
    a("--tensorboard", action="store_true", help="also log to OUT/tensorboard")
    a("--channels-last", action="store_true", help="channels_last memory format (faster convnets on GPUs)")
    a("--compile", action="store_true", help="torch.compile the learner (slow first steps, faster after)")
    a(
        "--sync-bn-backbone",
        action="store_true",
        help="SyncBatchNorm in the backbone too, on several GPUs (the heads always use it there)",
    )


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the flags of ``byol-pytorch train`` to ``parser`` and return it."""
    for add in (_add_run_flags, _add_recipe_flags, _add_runtime_flags):
        add(parser.add_argument)
    return parser


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The argument parser of ``byol-pytorch train``."""
    parser = argparse.ArgumentParser(
        "byol-pytorch train", add_help=add_help, description="BYOL pretraining on a folder of images."
    )
    return add_train_arguments(parser)


def plain(value: Any) -> Any:
    """A flag's value as a plain number/str/bool/None (what a weights-only checkpoint can hold)."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def resolve_recipe(args: argparse.Namespace, saved: dict[str, Any] | None) -> dict[str, Any]:
    """The run's recipe: the flags with defaults filled in, or the checkpoint's when resuming."""
    recipe: dict[str, Any] = {}
    for key, default in RECIPE_DEFAULTS.items():
        given = getattr(args, key, None)
        if saved is not None and key in saved:
            if given is not None and given != saved[key]:
                flag = "--" + key.replace("_", "-")
                raise UserError(
                    f"{flag} {given} differs from the checkpoint's {saved[key]}: a resumed run keeps its "
                    f"recipe; drop {flag}, or start a new run with another --out"
                )
            recipe[key] = saved[key]
        else:
            recipe[key] = given if given is not None else default
    if recipe["lr"] is None:
        recipe["lr"] = default_lr(recipe["optimizer"], recipe["batch_size"])
    if recipe["weight_decay"] is None:
        recipe["weight_decay"] = default_weight_decay(recipe["optimizer"])
    return recipe


def check_sizes(recipe: dict[str, Any], ctx: DistContext) -> int:
    """Validate sizes, tau and the batch split; returns the per-process micro-batch."""
    batch, accumulate = recipe["batch_size"], recipe["accumulate"]
    if recipe["image_size"] < 8:
        raise UserError(f"--image-size must be at least 8 pixels, got {recipe['image_size']}")
    if accumulate < 1:
        raise UserError(f"--accumulate must be at least 1, got {accumulate}")
    if not 0.0 <= recipe["tau_base"] <= 1.0:
        raise UserError(f"--tau-base must be in [0, 1] (the paper: 0.996), got {recipe['tau_base']}")
    parts = ctx.world_size * accumulate
    if batch < 2 or batch % parts or batch // parts < 2:
        raise UserError(
            f"--batch-size {batch} cannot be split into {ctx.world_size} process(es) x {accumulate} "
            "accumulation step(s) of at least 2 images each (BatchNorm and the BYOL loss need 2 or more); "
            f"use a multiple of {parts} that is at least {2 * parts}"
        )
    return batch // parts


def run_length(
    args: argparse.Namespace, recipe: dict[str, Any], steps_per_epoch: int, saved_total: int | None
) -> tuple[int, int]:
    """``(total, warmup)`` optimizer steps: a new total when --max-steps/--epochs come with --resume.

    The warm-up is ``--warmup-epochs`` (default 10, the paper's, but at most 10% of the run).
    """
    if args.max_steps is not None:
        total = args.max_steps
    elif args.epochs is not None:
        total = args.epochs * steps_per_epoch
    elif saved_total is not None:
        total = saved_total
    else:
        total = DEFAULT_EPOCHS * steps_per_epoch
    if total < 1:
        raise UserError(f"the run would have {total} steps; pass --max-steps or --epochs of at least 1")
    warmup_epochs = recipe["warmup_epochs"] if recipe["warmup_epochs"] is not None else 10.0
    warmup = round(warmup_epochs * steps_per_epoch)
    warmup = min(warmup, total // 10) if recipe["warmup_epochs"] is None else min(warmup, total)
    return total, warmup
