"""``byol-pytorch train``: BYOL pretraining on a folder of images, one process or many (torchrun).

Read ``main`` from top to bottom: run folder and resume, recipe, data, learner and
optimiser, the loop (progress, metrics, checkpoints, kNN monitor, signals), the end.

Reproducibility: the model is initialised from ``--seed``; the augmentations draw from
the global torch generator seeded with ``seed + rank``; the data order of an epoch is
a pure function of (seed, epoch) (``EpochSampler``). A checkpoint stores the
generators of every rank and the position in the epoch, so a run stopped at step k and
resumed ends with the same weights as an uninterrupted one (tested bitwise on the CPU).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from .checkpoint import get_rng_state, load_checkpoint, save_checkpoint, set_rng_state
from .cli import UserError
from .data import ImageFolder, collate_images
from .encoder import infer_channels
from .loop import (
    DistContext,
    EpochSampler,
    OptimizerStep,
    StopSignals,
    ignore_signals_in_worker,
    match_channels,
    setup_distributed,
    step_batches,
)
from .models import build_backbone, build_learner
from .monitor import KnnMonitor, MetricsLog, plot_curves_or_warn, warn
from .optim import build_optimizer, default_lr, default_weight_decay, lr_help, resync_lr, warmup_cosine_scheduler

__all__ = ["get_args_parser", "add_train_arguments", "main", "train", "RECIPE_DEFAULTS"]

# The recipe: fixed for the life of a run (a resumed run takes them from its checkpoint).
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
LOAD_RATIO = 256 / 224  # images are stored at 8/7 of the crop side, as in ImageNet's 256 -> 224


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the flags of ``byol-pytorch train`` to ``parser`` and return it."""
    a = parser.add_argument
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
    return parser


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The argument parser of ``byol-pytorch train``."""
    parser = argparse.ArgumentParser(
        "byol-pytorch train", add_help=add_help, description="BYOL pretraining on a folder of images."
    )
    return add_train_arguments(parser)


# ---------------------------------------------------------------------- setup helpers
def _plain(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _resolve_recipe(args: argparse.Namespace, saved: dict[str, Any] | None) -> dict[str, Any]:
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


def _check_sizes(recipe: dict[str, Any], ctx: DistContext) -> int:
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


def _resume_path(args: argparse.Namespace, out: Path) -> Path | None:
    if args.resume is None or args.resume is False:
        if (out / "last.pt").exists():
            raise UserError(
                f"{out / 'last.pt'} already exists; pass --resume to continue that run, or choose another --out"
            )
        return None
    path = out / "last.pt" if args.resume is True else Path(args.resume)
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at {path}; train without --resume to start a new run")
    return path


def _open_folder(data: str | None, load_size: int, channels: int) -> ImageFolder:
    if not data:
        raise UserError("--data is required: the folder of training images")
    try:
        dataset = ImageFolder(data, load_size, 1 if channels == 1 else 3)
        dataset[0]  # fails now, not in a worker, when no file at all can be read
    except (ValueError, RuntimeError) as error:
        raise UserError(f"--data: {error}") from None
    return dataset


def _gather_rng(ctx: DistContext) -> list[dict[str, Any]]:
    state = get_rng_state()
    if not ctx.distributed:
        return [state]
    states: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(states, state)
    return states


# ---------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train; returns a summary (``step``, ``checkpoint``, ``exit_code``, ...).

    Raises:
        UserError: bad input (missing data, unknown model, batch size, resume without a
            checkpoint, a file that is not our checkpoint) or a non-finite loss.
    """
    try:
        ctx = setup_distributed(args.device)
    except ValueError as error:
        raise UserError(str(error)) from None
    try:
        return train(args, ctx)
    finally:
        ctx.close()


def train(args: argparse.Namespace, ctx: DistContext) -> dict[str, Any]:  # noqa: C901 - read top to bottom
    """The training run of ``main`` in an existing process context (see ``main``)."""
    # 1. Run folder; the checkpoint to resume from, and the recipe.
    out = Path(args.out)
    resume_from = _resume_path(args, out)
    checkpoint = None
    if resume_from is not None:
        try:
            checkpoint = load_checkpoint(resume_from)
        except (FileNotFoundError, ValueError) as error:
            raise UserError(f"--resume: {error}") from None
    saved_args = checkpoint["args"] if checkpoint else None
    recipe = _resolve_recipe(args, saved_args)
    micro_batch = _check_sizes(recipe, ctx)
    data = args.data or (saved_args or {}).get("data")
    precision = args.precision or ("bf16" if ctx.device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32")
    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    if workers < 0:
        raise UserError(f"--workers must be 0 or more, got {workers}")
    for flag in ("checkpoint_every", "log_every", "val_every"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")

    # 2. The backbone (seeded, identical on every rank), and data in its channel count.
    torch.manual_seed(recipe["seed"])
    try:
        net = build_backbone(recipe["model"], recipe["in_chans"], recipe["image_size"])
    except ValueError as error:
        raise UserError(f"--model: {error}") from None
    recipe["in_chans"] = channels = infer_channels(net)
    if args.sync_bn_backbone:
        if ctx.distributed and ctx.device.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        elif ctx.is_main:
            warn("--sync-bn-backbone needs several CUDA processes; ignored")
    load_size = max(recipe["image_size"], round(recipe["image_size"] * LOAD_RATIO))
    dataset = _open_folder(data, load_size, channels)
    try:
        sampler = EpochSampler(
            len(dataset), micro_batch, ctx.rank, ctx.world_size, recipe["seed"], multiple_of=recipe["accumulate"]
        )
    except ValueError as error:
        raise UserError(f"--data: {error}") from None
    loader = DataLoader(
        dataset,
        batch_size=micro_batch,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        collate_fn=collate_images,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=workers > 0,
        worker_init_fn=ignore_signals_in_worker if workers > 0 else None,
        generator=torch.Generator().manual_seed(recipe["seed"] * 1000 + ctx.rank),
    )
    steps_per_epoch = sampler.batches_per_epoch // recipe["accumulate"]

    # 3. Length of the run (a new total when --max-steps/--epochs come with --resume).
    if args.max_steps is not None:
        total = args.max_steps
    elif args.epochs is not None:
        total = args.epochs * steps_per_epoch
    elif checkpoint is not None:
        total = int(checkpoint["total_steps"])
    else:
        total = DEFAULT_EPOCHS * steps_per_epoch
    if total < 1:
        raise UserError(f"the run would have {total} steps; pass --max-steps or --epochs of at least 1")
    warmup_epochs = recipe["warmup_epochs"] if recipe["warmup_epochs"] is not None else 10.0
    warmup = round(warmup_epochs * steps_per_epoch)
    warmup = min(warmup, total // 10) if recipe["warmup_epochs"] is None else min(warmup, total)

    # 4. Learner, optimiser, schedules; state restored from the checkpoint.
    try:
        learner = build_learner(recipe, net).to(ctx.device)
        optimizer = build_optimizer(recipe["optimizer"], learner, recipe["lr"], recipe["weight_decay"])
    except ValueError as error:  # a tau, head size or lr out of range; a net that cannot take the views
        raise UserError(str(error)) from None
    learner.moving_average_total_steps = total  # cosine tau over the run (paper Sec. 3.2)
    if args.channels_last:
        learner = learner.to(memory_format=torch.channels_last)
    scheduler = warmup_cosine_scheduler(optimizer, total, warmup)
    scaler = torch.amp.GradScaler(ctx.device.type) if precision == "fp16" else None
    step, epoch, position = 0, 0, 0
    if checkpoint is not None:
        learner.load_state_dict(checkpoint["learner"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        resync_lr(scheduler)  # the lr of the current step under the (possibly new) total
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        step, epoch, position = int(checkpoint["step"]), int(checkpoint["epoch"]), int(checkpoint["batch_in_epoch"])
        if checkpoint.get("dataset_size") != len(dataset) or checkpoint.get("world_size") != ctx.world_size:
            if ctx.is_main:
                warn(
                    f"the data ({len(dataset)} images) or process count ({ctx.world_size}) changed since the "
                    "checkpoint; training goes on, with a data order unlike an uninterrupted run's"
                )
            position = min(position, sampler.batches_per_epoch) // recipe["accumulate"] * recipe["accumulate"]
        rng = checkpoint["rng"]
        set_rng_state(rng[ctx.rank] if len(rng) == ctx.world_size else rng[0])
        if len(rng) != ctx.world_size:
            torch.manual_seed(recipe["seed"] + ctx.rank + step)
    else:
        torch.manual_seed(recipe["seed"] + ctx.rank)  # the augmentations' generator, per rank
    if step >= total:
        if ctx.is_main:
            print(
                f"byol-pytorch: the checkpoint is at step {step}, the run's total is {total}: nothing to do "
                "(pass a larger --max-steps or --epochs to train further)"
            )
        return {"step": step, "total": total, "checkpoint": str(resume_from), "exit_code": 0, "stopped_by": None}
    if learner.use_momentum and learner.target_encoder is None:
        # Copy the target now rather than inside the first (DDP-wrapped, maybe compiled)
        # forward: identical weights, and neither DDP nor torch.compile sees it appear.
        learner.init_target()
    model: nn.Module = learner
    if ctx.distributed:
        model = DistributedDataParallel(learner, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    run_step = OptimizerStep(learner, model, optimizer, scheduler, precision, ctx.device, scaler)

    # 5. Reporting: metrics.jsonl (rank 0), the progress bar, the kNN monitor.
    out.mkdir(parents=True, exist_ok=True)
    try:
        metrics = MetricsLog(out, step if checkpoint else None, args.tensorboard, enabled=ctx.is_main)
        monitor = (
            KnnMonitor(
                args.val_data, recipe["image_size"], 1 if channels == 1 else 3, ctx.device, workers=min(workers, 4)
            )
            if args.val_data and ctx.is_main
            else None
        )
    except ValueError as error:
        raise UserError(str(error)) from None
    run_args = {k: _plain(v) for k, v in vars(args).items()}
    run_args.update(recipe, data=str(data), precision=precision)
    if ctx.is_main:
        print(
            f"byol-pytorch: {recipe['model']} on {len(dataset)} images ({channels} channels) in {data}, "
            f"{ctx.world_size} process(es) on {ctx.device.type}, batch {recipe['batch_size']}, "
            f"{recipe['optimizer']} lr {recipe['lr']:.4g}, warm-up {warmup} steps, "
            f"{steps_per_epoch} steps/epoch, steps {step} -> {total}, {precision}, run folder {out}",
            flush=True,
        )

    def save(path: Path = out / "last.pt") -> Path:
        rng_states = _gather_rng(ctx)  # a collective: every rank calls save()
        if ctx.is_main:
            save_checkpoint(
                path,
                {
                    "step": step,
                    "epoch": epoch,
                    "batch_in_epoch": position,
                    "total_steps": total,
                    "dataset_size": len(dataset),
                    "world_size": ctx.world_size,
                    "learner": learner.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler else {},
                    "rng": rng_states,
                    "args": run_args,
                },
            )
        ctx.barrier()
        return path

    # 6. The loop.
    from tqdm import tqdm

    progress = tqdm(
        total=total,
        initial=step,
        disable=not ctx.is_main,
        dynamic_ncols=True,
        desc="byol",
        unit="step",
        file=sys.stderr,
    )
    check_every = 1 if ctx.device.type == "cpu" else min(10, args.log_every)
    images_per_step = micro_batch * ctx.world_size * recipe["accumulate"]
    loss_sum = torch.zeros((), device=ctx.device)
    interval_steps, skipped_files, saved_step, last_knn = 0, 0, step if checkpoint else -1, None
    skip_warned = False
    start = tick = time.perf_counter()
    stopped_by: int | None = None
    with StopSignals() as signals:
        for micro, batch_epoch, batch_position in step_batches(loader, sampler, epoch, position, recipe["accumulate"]):
            lr, tau = optimizer.param_groups[0]["lr"], learner.current_decay
            images = [match_channels(x.to(ctx.device, non_blocking=True), channels) for x, _ in micro]
            skipped_files += sum(int(s) for _, s in micro)
            try:
                loss, stepped = run_step(images)
            except FloatingPointError as error:  # BYOL's deferred check on accelerators
                progress.close()
                raise UserError(_diverged_message(str(error), step + 1, saved_step, out)) from None
            epoch, position = (
                (batch_epoch + 1, 0) if batch_position == sampler.batches_per_epoch else (batch_epoch, batch_position)
            )
            loss_sum += loss
            interval_steps += 1
            if stepped:
                step += 1
                progress.update(1)
            epoch_done = position == 0
            log_now = stepped and (step % args.log_every == 0 or step == total)
            save_now = stepped and (step % args.checkpoint_every == 0 or step == total)
            val_now = bool(args.val_data) and (
                (epoch_done and epoch % args.val_every == 0) or (stepped and step == total)
            )
            if not (log_now or save_now or val_now or epoch_done or (stepped and step % check_every == 0)):
                continue
            # One read-back (and one all-reduce) for the loss, a stop signal and skipped files.
            status = torch.stack(
                [
                    loss_sum,
                    torch.tensor(float(signals.requested), device=ctx.device),
                    torch.tensor(float(skipped_files), device=ctx.device),
                ]
            )
            if ctx.distributed:
                dist.all_reduce(status)
            loss_total, stop_votes, skipped_all = status.tolist()
            mean_loss = loss_total / (interval_steps * ctx.world_size)
            if not math.isfinite(mean_loss):
                progress.close()
                raise UserError(_diverged_message(f"the loss is {mean_loss}", step, saved_step, out))
            if epoch_done and skipped_all and not skip_warned and ctx.is_main:
                warn(
                    f"{int(skipped_all)} unreadable, empty or corrupt image files were passed over so far; "
                    "training goes on (metrics.jsonl counts them in skipped_files)"
                )
                skip_warned = True
            if val_now:
                if monitor is not None:
                    last_knn = monitor(learner)
                ctx.barrier()
            if log_now or stop_votes > 0 or (epoch_done and last_knn is not None):
                now = time.perf_counter()
                row = {
                    "step": step,
                    "epoch": epoch + position / sampler.batches_per_epoch,
                    "loss": mean_loss,
                    "lr": lr,
                    "tau": tau,
                    "img_per_s": interval_steps * images_per_step / max(now - tick, 1e-9),
                    "time_s": now - start,
                    "skipped_files": int(skipped_all),
                }
                if last_knn is not None:
                    row["knn_acc"] = last_knn
                metrics.write(row)
                progress.set_postfix(
                    {
                        k: (f"{row[k]:.4f}" if k != "img_per_s" else f"{row[k]:.1f}")
                        for k in ("loss", "img_per_s", "knn_acc")
                        if k in row
                    },
                    refresh=False,
                )
                last_knn, tick = None, now
                loss_sum.zero_()
                interval_steps = 0
            if save_now or stop_votes > 0:
                save()
                saved_step = step
            if stop_votes > 0:
                stopped_by = signals.signum if signals.signum is not None else signal.SIGTERM
                break
            if step >= total:
                break
    progress.close()
    metrics.close()

    # 7. The end: curves, a summary.
    if ctx.is_main and stopped_by is None:
        plot_curves_or_warn(metrics.path, out / "curves.png")
        if skipped_files and not skip_warned:
            warn(f"{skipped_files} unreadable, empty or corrupt image files were passed over so far; training went on")
    if stopped_by is not None and ctx.is_main:
        name = signal.Signals(stopped_by).name
        print(
            f"byol-pytorch: stopped by {name} at step {step}; checkpoint saved to {out / 'last.pt'}; "
            "continue with --resume",
            file=sys.stderr,
            flush=True,
        )
    return {
        "step": step,
        "total": total,
        "epoch": epoch,
        "checkpoint": str(out / "last.pt"),
        "stopped_by": None if stopped_by is None else signal.Signals(stopped_by).name,
        "exit_code": 0 if stopped_by is None else 128 + int(stopped_by),
    }


def _diverged_message(reason: str, step: int, saved_step: int, out: Path) -> str:
    kept = (
        f"the last good checkpoint {out / 'last.pt'} (step {saved_step}) is left as it was"
        if saved_step >= 0
        else "no checkpoint had been written yet"
    )
    return (
        f"training diverged at step {step}: {reason}; {kept}. Lower --lr, lengthen --warmup-epochs, "
        "or use --precision fp32/bf16 instead of fp16"
    )
