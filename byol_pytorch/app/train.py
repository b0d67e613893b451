"""``byol-pytorch train``: BYOL pretraining on a folder of images, one process or many (torchrun).

The data may also be CIFAR batches, a local Hugging Face dataset (``hf:PATH``) or tar
shards: ``data.open_unlabelled`` opens each ``--data`` form.

Read ``train`` from top to bottom: ``prepare_run`` (run folder and resume, recipe, data,
learner and optimiser, state restored from the checkpoint), ``run`` (the engine with
this command's hooks: skipped-file warning, kNN monitor, metrics, checkpoints) and
``finish`` (curves, a summary).

Reproducibility: the model is initialised from ``--seed``; the augmentations draw from
the global torch generator seeded with ``seed + rank``; the data order of an epoch is
a pure function of (seed, epoch) (``EpochSampler``; tar shards order themselves,
``ShardDataset``). A checkpoint stores the
generators of every rank and the position in the epoch, so a run stopped at step k and
resumed ends with the same weights as an uninterrupted one (tested bitwise on the CPU).
It also records the digest of the image folder's file list: a resumed run whose folder
holds other names (even as many) is warned that its data order differs.

The folder's index is scanned by rank 0 only, cached in the run folder
(``file_index.npz``, see ``file_index.load_or_scan``) and sent to the other ranks.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .._discovery import infer_channels
from ..batchnorm import (
    batchnorm_layers,
    batchnorm_state,
    clean_statistics,
    convert_sync_batchnorm,
    load_batchnorm_state,
)
from ..byol import BYOL
from ..data import (
    DATA_FORMS,
    ShardReading,
    load_size_for,
    make_loader,
    match_channels,
    open_unlabelled,
    sample_images,
)
from ..data.file_index import INDEX_CACHE_NAME, scan_with_cache
from ..data.folder import ImageFolder, NoReadableImagesError
from ..data.remote import RemoteReadError, ShardReadWarning, is_remote, redact
from ..data.remote_shards import SHARD_COUNTS_NAME, counts_with_cache, expand_remote, shard_file_name
from ..data.sampling import DataOrder, EpochSampler, step_batches
from ..data.shards import ShardDataset, epoch_batches, expand_shards, make_shard_loader, shard_workers
from ..data.sources import check_shard_index, is_remote_shards, local_path
from ..training.checkpoint import (
    TRAINING_KEYS,
    get_rng_state,
    load_checkpoint,
    load_state,
    require_entries,
    save_checkpoint,
    set_rng_state,
)
from ..training.distributed import DistContext, broadcast_from_main, gather_objects, setup_distributed
from ..training.engine import (
    DivergedError,
    Engine,
    OptimizerStep,
    Periodic,
    StopSignals,
    TrainState,
    default_precision,
    prepare_model,
)
from ..training.models import build_backbone, build_learner
from ..training.optim import build_recipe_optimizer, resync_lr, warmup_cosine_scheduler
from ..training.recipe import Recipe
from ..training.validation import BelowReference, KnnMonitor, UnreadableKnnData, clean_input
from .devices import resolve_device
from .errors import PROG, UserError, before_the_group, is_out_of_memory, last_line, one_line, signals_raise, warn
from .metrics import MetricsLog, draw_views_or_warn, plot_curves_or_warn, wandb_options
from .recipe import (
    CHECKPOINT_EVERY,
    LOG_EVERY,
    RECIPE_ADVICE,
    SHUFFLE_BUFFER,
    add_train_arguments,
    check_sizes,
    family_lr,
    family_of,
    get_args_parser,
    plain,
    resolve_recipe,
    run_length,
)
from .runlock import RunFolderLock

CLEAN_IMAGES = 512
"""Un-augmented training images whose BatchNorm statistics go with what leaves training (--bn-stats clean)."""

__all__ = [
    "CLEAN_IMAGES",
    "Run",
    "clean_batchnorm",
    "add_train_arguments",
    "finish",
    "get_args_parser",
    "main",
    "prepare_run",
    "run",
    "train",
]


@dataclass
class Run:
    """A prepared training run: what ``run`` and ``finish`` work with."""

    args: argparse.Namespace
    ctx: DistContext
    out: Path
    recipe: Recipe
    run_args: dict[str, Any]  # saved in every checkpoint
    dataset: Any  # ImageFolder, CifarDataset, HFImageDataset or ShardDataset (data.open_unlabelled)
    sampler: DataOrder  # the EpochSampler, or the ShardDataset itself
    loader: DataLoader
    learner: BYOL
    model: nn.Module  # the learner, maybe wrapped in DDP / torch.compile
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    precision: str
    state: TrainState
    warmup: int  # optimizer steps of warm-up, kept in checkpoints (a resumed run keeps it)
    workers: int
    resumed_from: Path | None
    saved_step: int = -1  # step of the last checkpoint written or resumed from; -1: none yet
    skip_warned: bool = False  # the skipped-files warning was given
    metrics: MetricsLog | None = None  # open from the lock until ``finish`` (W&B gets the pictures there)
    dataset_digest: str | None = None  # an image folder's file list (``FileIndex.digest``), in checkpoints
    clean_images: torch.Tensor | None = None  # rank 0, --bn-stats clean: 512 un-augmented training images
    knn_reference: float | None = None  # the untouched net's kNN accuracy (step 0), kept in checkpoints
    untouched: dict[str, torch.Tensor] | None = None  # a resume's untouched net, for a --val-data new to the run
    below: BelowReference | None = None  # rank 0: says when the kNN falls below the reference
    started: float = 0.0  # time.perf_counter() when this invocation started
    start_step: int = 0  # the step this invocation started at
    last_knn: float | None = None
    last_knn_step: int | None = None  # the step last_knn was measured at
    deferred: list[Callable[[], None]] = field(default_factory=list)  # writes made once the run folder is locked
    monitor: KnnMonitor | None = None  # rank 0, --val-data: opened before the first write (a bad spec refuses)
    val_data_saved: bool = False  # --val-data came from the checkpoint (a resume that did not give it)


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train; returns a summary (``step``, ``checkpoint``, ``exit_code``, ...).

    Raises:
        UserError: bad input (missing data, unknown model, batch size, resume without a
            checkpoint, a file that is not our checkpoint) or a non-finite loss.
    """
    if args.device not in (None, "auto"):
        try:
            resolve_device(args.device)  # a name this machine has, or one error line (per node under torchrun)
        except UserError as error:
            raise before_the_group(error) from None
    try:
        ctx = setup_distributed(args.device)
    except ValueError as error:  # this process's GPU: ranks differ, each says its own
        raise UserError(str(error)) from None
    try:
        try:
            return train(args, ctx)
        except RuntimeError as error:
            if not (ctx.distributed and _is_peer_failure(error)):
                raise
            out = getattr(args, "out", None)
            kept = out is not None and (Path(out) / "last.pt").is_file()
            then = "continue with --resume (the last checkpoint is kept)"
            if not kept:
                then = "start it again (no checkpoint was written yet)"
            raise UserError(
                f"lost the connection to another process of this run ({type(error).__name__}): it failed or "
                f"was killed, and its own error says why; fix that, then {then}"
            ) from error
    except Exception as error:
        if ctx.distributed and not _claim_error_line(ctx):
            error.byol_pytorch_quiet = True  # type: ignore[attr-defined]  # cli.main exits 1 without a line
        raise
    finally:
        ctx.close()


ERROR_CLAIM_KEY = "byol_pytorch/error_line"


def _claim_error_line(ctx: DistContext) -> bool:
    """Whether this process prints the run's error line: the first to fail claims it in the c10d store.

    Under torchrun every process of a failed run would print its own line (and the others' lines
    say only that a peer went away); the first process to get here wins an atomic ``add`` on the
    process group's store and prints, the others exit with the same status quietly. Without a
    reachable store, rank 0 prints.
    """
    try:
        store = torch.distributed.distributed_c10d._get_default_store()
        return int(store.add(ERROR_CLAIM_KEY, 1)) == 1
    except Exception:  # the store went away with its host: fall back to rank 0
        return ctx.is_main


def _is_peer_failure(error: RuntimeError) -> bool:
    """A collective failed because another rank died (gloo/NCCL connection closed, timeout)."""
    if isinstance(error, torch.distributed.DistError):
        return True
    text = str(error).lower()
    return any(k in text for k in ("connection closed by peer", "connection reset by peer", "broken pipe", "gloo"))


def train(args: argparse.Namespace, ctx: DistContext) -> dict[str, Any]:
    """The training run of ``main`` in an existing process context (see ``main``).

    The run folder is locked (``runlock``; rank 0 holds it) before anything is written into it,
    and every check that can refuse the run runs before that first write: a refused start
    leaves the folder as it was.
    """
    out = Path(args.out)
    lock = RunFolderLock(out) if ctx.is_main else None
    try:
        _lock(ctx, lock, create=False)  # a folder in use is refused at once (the lock file exists)
        prepared = prepare_run(args, ctx)
        state = prepared.state
        if state.step >= state.total:
            if ctx.is_main:
                print(
                    f"byol-pytorch: the checkpoint is at step {state.step}, the run's total is {state.total}: nothing "
                    "to do (pass a larger --max-steps or --epochs to train further)"
                )
            return {
                "step": state.step,
                "total": state.total,
                "checkpoint": str(prepared.resumed_from),
                "exit_code": 0,
                "stopped_by": None,
            }

        def recheck() -> None:  # rank 0, lock held, nothing written yet: a refusal here reaches every rank
            _resume_path(args, out)
            prepared.metrics = _open_metrics(prepared)  # W&B and TensorBoard can refuse

        try:
            _lock(ctx, lock, create=True, recheck=recheck)
            if prepared.metrics is None:  # the other ranks: a log that writes nothing
                prepared.metrics = _open_metrics(prepared)
            for write in prepared.deferred:  # the first writes into the run folder (rank 0's)
                write()
            state = run(prepared)
        except BaseException:
            if prepared.metrics is not None:
                prepared.metrics.close()  # a W&B run is finished, TensorBoard flushed (closing twice is harmless)
            raise
        return finish(prepared, state)
    finally:
        if lock is not None:
            lock.release()


def _lock(ctx: DistContext, lock: RunFolderLock | None, create: bool, recheck: Callable[[], Any] | None = None) -> None:
    """Rank 0 takes the run folder's lock; every rank raises the same ``UserError`` when it cannot.

    ``recheck`` runs on rank 0 once the lock is held, before the holder's line is written: what
    the folder held before the lock (a run that ended meanwhile leaves its ``last.pt``).
    """

    def take() -> str | None:
        assert lock is not None
        try:
            lock.acquire(create, check=recheck)
        except UserError as error:
            return str(error)
        return None

    refused = broadcast_from_main(ctx, take)
    if refused:
        raise UserError(refused)


# ---------------------------------------------------------------------- prepare
def _checkpoint_path(args: argparse.Namespace, out: Path) -> Path:
    """Where a resumed run reads its checkpoint: ``--resume PATH``, else ``OUT/last.pt``."""
    return out / "last.pt" if args.resume is None or isinstance(args.resume, bool) else Path(args.resume)


def _resume_path(args: argparse.Namespace, out: Path) -> Path | None:
    if not str(args.out).strip():
        raise UserError("--out is empty; name the run folder to write to (the default: runs/byol)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose another --out (the run folder to write to)")
    path = _checkpoint_path(args, out)
    if path.exists() and not path.is_file() and not path.is_dir():
        other = "--out" if path == out / "last.pt" else "--resume checkpoint"
        raise UserError(
            f"{path} is not a checkpoint file but a special file (a FIFO, a socket, a device); remove it, or choose "
            f"another {other}"
        )
    if args.resume is None or args.resume is False:
        if (out / "last.pt").exists():
            raise UserError(
                f"{out / 'last.pt'} already exists; pass --resume to continue that run, or choose another --out"
            )
        return None
    if path.is_dir():
        inside = f" (it holds last.pt: pass {path / 'last.pt'}, or --out {path} --resume to go on there)"
        raise UserError(
            f"--resume: checkpoint {str(path)!r} is a folder{inside if (path / 'last.pt').is_file() else ''}; "
            "pass RUNDIR/last.pt written by 'byol-pytorch train'"
        )
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at {path}; train without --resume to start a new run")
    _refuse_overwrite(path, out)
    return path


def _refuse_overwrite(path: Path, out: Path) -> None:
    """``--resume PATH`` from outside ``OUT`` must not write over ``OUT/last.pt``: another run's, as far as we can tell.

    A copy kept in the run folder itself (``OUT/backup.pt``) rolls the run back. (The saved ``--out``
    cannot tell runs apart: it is a relative path, ``runs/byol`` by default.)
    """
    own = out / "last.pt"
    if not own.exists() or own.samefile(path) or path.resolve().parent == out.resolve():
        return
    raise UserError(
        f"--resume {path}: --out {out} already holds a checkpoint ({own}), which this run would overwrite; "
        f"choose an empty --out to continue {path} there, resume that run with --resume alone, or copy {path.name} "
        f"into {out} to roll that run back to it"
    )


def _load_resumed(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        checkpoint = load_checkpoint(path)
        require_entries(checkpoint, TRAINING_KEYS, path)
    except (FileNotFoundError, ValueError) as error:
        raise UserError(f"--resume: {error}") from None
    if not isinstance(checkpoint["args"], dict) or "model" not in checkpoint["args"]:
        raise UserError(f"--resume: {path} holds no recipe ('args' without 'model'); start a new run without --resume")
    return checkpoint


def _same_checkpoint_everywhere(
    args: argparse.Namespace, out: Path, ctx: DistContext, checkpoint: dict[str, Any] | None
) -> None:
    """Every process must find the same checkpoint (or none): one error on all of them otherwise.

    A collective. Processes on several machines see one ``--out`` only on a shared file
    system; without one, the nodes other than rank 0's find no checkpoint (or an older one)
    and would fail alone, with advice that does not fit, or resume from another step.
    """
    if not ctx.distributed:
        return
    path = _checkpoint_path(args, out)
    if checkpoint is not None:
        seen = f"step {int(checkpoint['step'])}"
    else:
        seen = "a checkpoint" if path.is_file() else "no checkpoint"
    views = gather_objects(ctx, seen)
    if len(set(views)) > 1:
        found = ", ".join(f"process {rank} sees {view}" for rank, view in enumerate(views))
        raise UserError(
            f"the processes of this run do not find the same checkpoint at {path} ({found}): on several machines, "
            "--out (and a --resume path) must be on a file system they all share"
        )


def _runtime_options(args: argparse.Namespace, ctx: DistContext) -> tuple[str, int]:
    """``(precision, workers)``; the reporting intervals checked."""
    precision = args.precision or default_precision(ctx.device)
    if precision == "fp16" and ctx.device.type == "cpu" and ctx.is_main:  # a probe: 4 s a step against 0.2 s
        warn(
            "--precision fp16 on the CPU: float16 arithmetic is slow there (20 times slower than fp32 in a probe "
            "on resnet10t at 32 px); use fp32, or bf16 on a CPU with bfloat16 instructions"
        )
    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    if workers < 0:
        raise UserError(f"--workers must be 0 or more, got {workers}")
    for flag in ("checkpoint_every", "log_every", "val_every"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    return precision, workers


def _build_net(recipe: Recipe, args: argparse.Namespace, ctx: DistContext) -> tuple[nn.Module, Recipe]:
    """The backbone, seeded (identical on every rank), and the recipe with the net's input channels."""
    torch.manual_seed(recipe.seed)
    try:
        net = build_backbone(recipe.model, recipe.in_chans, recipe.image_size)
    except ValueError as error:
        raise UserError(f"--model: {error}") from None
    recipe = recipe.replace(in_chans=infer_channels(net))
    if args.sync_bn_backbone:
        if ctx.distributed and ctx.device.type == "cuda":
            net = convert_sync_batchnorm(net)
        elif ctx.is_main:
            warn("--sync-bn-backbone needs several CUDA processes; ignored")
    return net, recipe


def _remote_counts(
    data: str, index: str | None, ctx: DistContext, out: Path, deferred: list[Callable[[], None]]
) -> tuple[int, ...] | None:
    """Remote shards' sample counts, read or counted by rank 0 alone and sent to the others.

    From ``--shard-index``, else the run folder's copy (``OUT/shard_counts.json``, what a
    resumed run reads), else the user cache or a count; a new copy is saved by the writer
    appended to ``deferred``, once the run is sure to start.
    """
    if not is_remote(data):
        return None

    def count() -> list[int]:
        counts, save = counts_with_cache(expand_remote(data), index, out / SHARD_COUNTS_NAME)
        if save is not None:
            deferred.append(save)
        return counts

    return tuple(broadcast_from_main(ctx, count))


def _default_shard_workers(dataset: ShardDataset, most: int, ctx: DistContext, resumed: Any) -> ShardDataset:
    """The loader workers of a run that did not give ``--workers``: a resumed run's, else ``shard_workers``'.

    Chosen on rank 0 (the ranks' CPU counts may differ) among ``most // 2`` to ``most`` workers, so
    that a shard count that does not divide evenly costs at most half the decoding processes; a
    count under ``most`` is said in one line.
    """
    total = len(dataset.paths)
    fits = isinstance(resumed, int) and 1 <= resumed and total >= ctx.world_size * resumed
    batch, accumulate = dataset.batch_size, dataset.multiple_of
    if fits and epoch_batches(dataset.counts, ctx.world_size, resumed, batch, accumulate) > 0:
        return dataset.with_workers(resumed)  # the checkpoint's readers: the epoch continues exactly

    chosen = broadcast_from_main(
        ctx, lambda: shard_workers(dataset.counts, ctx.world_size, most, batch, accumulate, least=max(1, most // 2))
    )
    if chosen < most and ctx.is_main:
        print(
            f"byol-pytorch: {chosen} loader worker(s) per process read the {total} shards (of up to {most}: "
            f"{ctx.world_size * chosen} readers divide them more evenly); --workers to choose",
            flush=True,
        )
    return dataset.with_workers(chosen)


def _warn_unread_shard_samples(dataset: ShardDataset) -> None:
    """One warning when an epoch of shards leaves more than a tenth of its whole batches unread."""
    total, step = sum(dataset.counts), dataset.batch_size * dataset.world_size * dataset.multiple_of
    used, whole = dataset.epoch_samples(), total // step * step
    if used >= 0.9 * whole:
        return
    warn(
        f"an epoch reads {used} of the {total} samples ({used / total:.0%}): each of the {dataset.readers} readers "
        f"({dataset.world_size} process(es) x {dataset.per_rank} loader worker(s)) reads whole shards and yields as "
        f"many whole batches of {dataset.batch_size} as the smallest share of the {len(dataset.paths)} shards holds; "
        f"to read them all, make the shard count a multiple of {dataset.readers} and each reader's share a multiple "
        f"of {dataset.batch_size} samples (byol-pytorch shards make --shard-size)"
        + ("; or lower --workers" if dataset.per_rank > 1 else "")
    )


def _check_same_data(ctx: DistContext, dataset: Any) -> None:
    """Every rank counts the same samples (per shard, for local shards), or every rank stops with one line.

    An image folder's index is rank 0's, sent to all, but local shards, ``hf:`` and CIFAR data are
    opened by each rank: node-local copies that differ would give the ranks epochs of different
    lengths, and the run would hang at the first epoch's end.
    """
    if not ctx.distributed:
        return
    mine = tuple(dataset.counts) if isinstance(dataset, ShardDataset) else len(dataset)
    seen = gather_objects(ctx, mine)
    differs = next((rank for rank, theirs in enumerate(seen) if theirs != seen[0]), None)
    if differs is not None:
        what = "samples per shard" if isinstance(mine, tuple) else "samples"
        raise ValueError(
            f"the processes do not see the same data: rank {differs} counts {seen[differs]} {what} where rank 0 counts "
            f"{seen[0]}; every process must read the same data (copy it whole to every machine)"
        )


def _build_data(
    data: str | None,
    recipe: Recipe,
    micro_batch: int,
    workers: int,
    ctx: DistContext,
    args: argparse.Namespace,
    out: Path,
    deferred: list[Callable[[], None]],
    resumed_readers: Any = None,
) -> tuple[Any, DataOrder, DataLoader]:
    """The data in the net's channel count (``data.open_unlabelled``), its resumable order, the loader.

    An image folder is scanned by rank 0 alone, or its index reused from the run folder
    (``OUT/file_index.npz``) while the folder is unchanged, and sent to the other ranks; a new
    index is saved by the writer appended to ``deferred``, once the run is sure to start.
    """
    if not data:
        raise UserError(f"--data is required: {DATA_FORMS}")

    def scan() -> Any:
        index, save = scan_with_cache(data, out / INDEX_CACHE_NAME)
        if save is not None:
            deferred.append(save)
        return index

    try:
        kind = check_shard_index(data, getattr(args, "shard_index", None))
    except ValueError as error:
        raise UserError(str(error)) from None
    try:
        index = None
        if kind == "folder":
            index = broadcast_from_main(ctx, scan)
        shard_index = getattr(args, "shard_index", None)
        buffer = SHUFFLE_BUFFER if getattr(args, "shuffle_buffer", None) is None else args.shuffle_buffer
        if buffer < 0:
            raise ValueError(f"--shuffle-buffer must be 0 or more, got {buffer}")
        counts = _remote_counts(data, shard_index, ctx, out, deferred) if kind == "shards" else None
        most = workers
        if kind == "shards" and args.workers is None:  # the default: chosen below, from the shards' counts
            shards = len(counts) if counts is not None else len(expand_shards(data))
            most, workers = min(workers, max(1, shards // ctx.world_size)), 1
        reading = ShardReading(
            micro_batch, ctx.rank, ctx.world_size, workers, recipe.seed, buffer, recipe.accumulate, shard_index, counts
        )
        dataset = open_unlabelled(
            data,
            None if kind == "cifar" else load_size_for(recipe.image_size),  # CIFAR as stored: the views resize
            recipe.channels,
            image_column=getattr(args, "image_column", None),
            split=getattr(args, "hf_split", None),
            index=index,
            shards=reading,
        )
        _check_same_data(ctx, dataset)
        if isinstance(dataset, ShardDataset):  # it orders and batches itself, in its workers
            if args.workers is None:
                dataset = _default_shard_workers(dataset, most, ctx, resumed_readers)
            if ctx.is_main:
                _warn_unread_shard_samples(dataset)
            return dataset, dataset, make_shard_loader(dataset, pin_memory=ctx.device.type == "cuda")
        dataset[0]  # fails now, not in a worker, when no file at all can be read
        sampler = EpochSampler(
            len(dataset),  # type: ignore[arg-type]
            micro_batch,
            ctx.rank,
            ctx.world_size,
            recipe.seed,
            multiple_of=recipe.accumulate,
        )
    except ImportError as error:  # an optional extra (webdataset, datasets) is missing
        raise UserError(f"--data {redact(data)}: {error}") from None
    except (ValueError, RuntimeError) as error:
        if getattr(args, "data", None) is None:  # a resume: the spec came from the checkpoint
            where = "" if "://" in data or Path(data).is_absolute() else ", relative to where the run started"
            raise UserError(
                f"--data (the run's, from its checkpoint: {redact(data)}{where}): {error}; "
                "pass --data to say where the data is now"
            ) from None
        raise UserError(f"--data: {error}") from None
    loader = make_loader(
        dataset,
        micro_batch,
        workers,
        sampler=sampler,
        drop_last=True,
        seed=(recipe.seed * 1000 + ctx.rank) % 2**64,  # as torch takes it (a negative one too); a large one fits
        pin_memory=ctx.device.type == "cuda",
    )
    return dataset, sampler, loader


def _build_learner(
    recipe: Recipe,
    net: nn.Module,
    total: int,
    warmup: int,
    precision: str,
    args: argparse.Namespace,
    ctx: DistContext,
) -> tuple[BYOL, Any, Any, Any]:
    """``(learner, optimizer, scheduler, scaler)`` of the recipe; tau follows the paper's cosine over the run."""
    try:
        learner = build_learner(recipe, net).to(ctx.device)
        optimizer = build_recipe_optimizer(recipe, learner)
    except ValueError as error:  # a tau, head size or lr out of range; a net that cannot take the views
        raise UserError(str(error)) from None
    learner.moving_average_total_steps = total  # cosine tau over the run (paper Sec. 3.2)
    if args.channels_last:
        learner = learner.to(memory_format=torch.channels_last)
    scheduler = warmup_cosine_scheduler(optimizer, total, warmup)
    scaler = torch.amp.GradScaler(ctx.device.type) if precision == "fp16" else None
    return learner, optimizer, scheduler, scaler


def _restore(checkpoint: dict[str, Any] | None, run: Run) -> None:
    """Model, optimiser, schedules, data position and generators from the checkpoint (or a fresh start)."""
    ctx, state = run.ctx, run.state
    if checkpoint is None:
        torch.manual_seed(run.recipe.seed + ctx.rank)  # the augmentations' generator, per rank
        return
    path = run.resumed_from or run.out / "last.pt"
    try:
        load_state(run.learner, checkpoint, "learner", path)
        load_state(run.optimizer, checkpoint, "optimizer", path)
        load_state(run.scheduler, checkpoint, "scheduler", path)
        if run.scaler is not None and checkpoint.get("scaler"):
            load_state(run.scaler, checkpoint, "scaler", path)
        state.step, state.epoch = int(checkpoint["step"]), int(checkpoint["epoch"])
        state.position = int(checkpoint["batch_in_epoch"])
    except (ValueError, TypeError) as error:
        raise UserError(f"--resume: {error}") from None
    resync_lr(run.scheduler)  # the lr of the current step under the (possibly new) total
    shards = isinstance(run.dataset, ShardDataset)
    changes = [
        f"{name} {before} -> {now}"
        for name, before, now in (
            ("images", checkpoint.get("dataset_size"), len(run.dataset)),
            ("processes", checkpoint.get("world_size"), ctx.world_size),
            (
                "readers per process (--workers)",
                checkpoint["args"].get("shard_readers"),
                getattr(run.dataset, "per_rank", None),
            ),
            (
                "--shuffle-buffer",
                checkpoint["args"].get("shuffle_buffer"),
                getattr(run.dataset, "shuffle_buffer", None),
            ),
        )[: 4 if shards else 2]
        if before != now
    ]
    other = checkpoint.get("dataset_digest") not in (None, run.dataset_digest)
    if changes or (other and shards):  # other shards, even as many samples: the saved position is in the old ones
        _data_changed(run, shards, changes or ["the shards (other names or sample counts)"])
    elif other and ctx.is_main:
        warn(
            f"the file list of the data changed since the checkpoint (still {len(run.dataset)} images, but other "
            "names); training goes on, with a data order unlike an uninterrupted run's"
        )
    rng = checkpoint["rng"]
    set_rng_state(rng[ctx.rank] if len(rng) == ctx.world_size else rng[0])
    if len(rng) != ctx.world_size:
        torch.manual_seed(run.recipe.seed + ctx.rank + state.step)
    run.saved_step = state.step


def _data_digest(dataset: Any) -> str | None:
    """What a checkpoint records of the data to tell other data on a resume: an image folder's file list
    (``FileIndex.digest``), or the shards' file names and sample counts (the shards may move); None otherwise.

    The shards' names are their last path or URL parts: a set copied to another disk or bucket is the same data.
    """
    if isinstance(dataset, ImageFolder):
        return dataset.paths.digest()
    if isinstance(dataset, ShardDataset):
        names = [_shard_name(str(path)) for path in dataset.paths]
        listing = "\n".join(f"{name}\t{count}" for name, count in zip(names, dataset.counts))
        return "shards:" + hashlib.sha256(listing.encode("utf-8", "surrogateescape")).hexdigest()
    return None


def _shard_name(location: str) -> str:
    """A shard's file name, wherever it lies (``remote_shards.shard_file_name``: a URL's without its query, a
    signed URL's token rotates), of a ``pipe:`` command its last URL or path.

    Examples:
        >>> [_shard_name(s) for s in ("https://h/d/a-01.tar?sig=x", "pipe:aws s3 cp s3://b/a-01.tar -", "/d/a-01.tar")]
        ['a-01.tar', 'a-01.tar', 'a-01.tar']
    """
    if location.startswith("pipe:"):
        words = [word for word in location[5:].split() if ".tar" in word]
        location = words[-1] if words else location
    return shard_file_name(location)


def _data_changed(run: Run, shards: bool, changes: list[str]) -> None:
    """The data, the process count or (shards) the workers changed since the checkpoint (``changes``, each ``what
    before -> now``): go on, warn."""
    state, accumulate = run.state, run.recipe.accumulate
    if shards and state.position:  # the readers' shards differ now: finish no shard twice, skip the epoch's rest
        state.epoch, state.position = state.epoch + 1, 0
        what = f"the rest of epoch {state.epoch - 1} is skipped (no shard is read twice); epoch {state.epoch} starts"
    else:
        state.position = min(state.position, run.sampler.batches_per_epoch) // accumulate * accumulate
        what = "training goes on, with a data order unlike an uninterrupted run's"
    if run.ctx.is_main:
        warn(f"since the checkpoint: {', '.join(changes)}; {what}")


def _saved_settings(args: argparse.Namespace, saved: dict[str, Any] | None, path: Path | None) -> Recipe | None:
    """A resumed run's recipe, checked, and its own settings put into ``args`` where this start gives none."""
    if not saved:
        _reporting_defaults(args)
        return None
    try:
        recipe = Recipe.from_dict(saved)
    except (TypeError, ValueError) as error:
        raise UserError(f"--resume: {path}: {error}") from None
    held = [  # saved without their secrets (redact): a probe gave --data again and met the index's 403
        (flag, value)
        for flag, value, given in (
            ("--data", str(saved.get("data") or ""), args.data),
            ("--shard-index", str(saved.get("shard_index") or ""), getattr(args, "shard_index", None)),
        )
        if not given and ("://***@" in value or "=***" in value)
    ]
    if held:
        raise UserError(
            f"the run's {' and '.join(f'{flag} {value}' for flag, value in held)} held credentials, which "
            f"checkpoints do not keep: pass {' and '.join(flag for flag, _ in held)} again, with them, to resume it"
        )
    index_given = getattr(args, "shard_index", None) is not None
    new_val_data = getattr(args, "val_data", None) is not None and getattr(args, "label_column", None) is None
    keys = ("shuffle_buffer", "image_column", "hf_split", "shard_index", "val_data", "label_column", "workers")
    for key in (*keys, *_REPORTING):
        if getattr(args, key, None) is None:
            setattr(args, key, saved.get(key))
    if not index_given and args.data and not is_remote_shards(args.data):
        args.shard_index = None  # the run's remote shards moved to other data: their index no longer applies
    if new_val_data:
        args.label_column = None  # the run's --label-column named a column of its old --val-data
    _reporting_defaults(args)
    return recipe


# What a run reports and where; a resumed run keeps its own unless this start gives another.
_REPORTING: dict[str, object] = {
    "val_every": 5,
    "checkpoint_every": CHECKPOINT_EVERY,
    "log_every": LOG_EVERY,
    "tensorboard": False,
    "wandb": False,
    "wandb_project": "byol-pytorch",
}


def _reporting_defaults(args: argparse.Namespace) -> None:
    """The intervals neither this start nor the resumed run gave: the defaults of a new run."""
    for key, default in _REPORTING.items():
        if getattr(args, key, None) is None:
            setattr(args, key, default)


def prepare_run(args: argparse.Namespace, ctx: DistContext) -> Run:
    """Everything before the first step: folder, recipe, data, learner, state (restored on resume)."""
    started = time.perf_counter()
    out = Path(args.out)
    try:
        resumed_from = _resume_path(args, out)
        checkpoint = _load_resumed(resumed_from)
    except UserError:
        _same_checkpoint_everywhere(args, out, ctx, None)
        raise
    _same_checkpoint_everywhere(args, out, ctx, checkpoint)
    saved_args = checkpoint["args"] if checkpoint else None
    given_val_data = getattr(args, "val_data", None)
    recipe = resolve_recipe(args, _saved_settings(args, saved_args, resumed_from))
    micro_batch = check_sizes(recipe, ctx, resumed=saved_args is not None)
    data = args.data or (saved_args or {}).get("data")
    precision, workers = _runtime_options(args, ctx)
    net, recipe = _build_net(recipe, args, ctx)
    deferred: list[Callable[[], None]] = []  # writes into the run folder, made once the run is sure to start
    readers = ((checkpoint or {}).get("args") or {}).get("shard_readers")  # a default --workers kept
    dataset, sampler, loader = _build_data(data, recipe, micro_batch, workers, ctx, args, out, deferred, readers)
    steps_per_epoch = sampler.batches_per_epoch // recipe.accumulate
    saved = (int(checkpoint["total_steps"]), checkpoint.get("warmup_steps")) if checkpoint else (None, None)
    total, warmup = run_length(args, recipe, steps_per_epoch, *saved)
    learner, optimizer, scheduler, scaler = _build_learner(recipe, net, total, warmup, precision, args, ctx)
    run_args = {k: plain(v) for k, v in vars(args).items()}
    run_args.update(recipe.to_dict(), data=str(data), precision=precision)
    run_args = {k: redact(v) if isinstance(v, str) else v for k, v in run_args.items()}  # no credentials saved
    if isinstance(dataset, ShardDataset):
        # readers per process and the buffer: a resumed epoch continues exactly only with the same
        run_args.update(shard_readers=dataset.per_rank, shuffle_buffer=dataset.shuffle_buffer)
    prepared = Run(
        args=args,
        ctx=ctx,
        out=out,
        recipe=recipe,
        run_args=run_args,
        dataset=dataset,
        sampler=sampler,
        loader=loader,
        learner=learner,
        model=learner,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        precision=precision,
        state=TrainState(total=total),
        warmup=warmup,
        workers=workers,
        resumed_from=resumed_from,
        deferred=deferred,
    )
    prepared.dataset_digest = _data_digest(dataset)
    prepared.started = started
    _keep_reference(prepared, checkpoint, given_val_data)
    prepared.val_data_saved = given_val_data is None and bool(args.val_data)
    if getattr(args, "bn_stats", "trained") == "clean" and batchnorm_layers(learner.net, frozen=False):
        _sample_clean_images(prepared, str(data), dataset)
    _restore(checkpoint, prepared)
    prepared.start_step = prepared.state.step
    if prepared.state.step < total:
        _open_monitor(prepared)  # before the first write: a bad --val-data refuses the start
        prepared.model = prepare_model(learner, ctx, compile=args.compile)
        if ctx.is_main:
            print(
                f"byol-pytorch: {recipe.model} on {len(dataset)} images ({recipe.in_chans} channels) in "
                f"{redact(data)}, {ctx.world_size} process(es) on {ctx.device.type}, batch {recipe.batch_size}, "
                f"{recipe.optimizer}{_chosen(args, recipe, checkpoint)} lr {recipe.lr:.6g}, warm-up {warmup} steps, "
                f"{steps_per_epoch} steps/epoch, steps {prepared.state.step} -> {total}, {precision}, run folder {out}"
                f" (recipe {recipe.recipe})",
                flush=True,
            )
    passed_over = getattr(dataset, "passed_over", 0)  # an image folder's special files (CIFAR has none)
    if ctx.is_main and passed_over:
        warn(
            f"{passed_over} entries under {data} with an image suffix are not regular files (FIFOs, "
            "sockets, devices, broken links) and were passed over"
        )
    return prepared


def _open_monitor(prepared: Run) -> None:
    """Open ``--val-data``'s kNN monitor into ``prepared.monitor`` on rank 0 (its figure is sent to the others).

    Raises:
        UserError: on every rank, when rank 0 cannot open the data (one line naming the flag).
    """

    label = getattr(prepared.args, "label_column", None)

    def open_on_main() -> str | None:
        try:
            prepared.monitor = KnnMonitor(
                prepared.args.val_data,
                prepared.recipe.image_size,
                1 if prepared.recipe.in_chans == 1 else 3,
                prepared.ctx.device,
                workers=min(prepared.workers, 4),
                clean_images=prepared.clean_images,
                data_options={"label_column": label} if label else None,
            )
        except (ValueError, OSError) as error:
            spec = prepared.args.val_data
            if not prepared.val_data_saved:
                return f"--val-data: {error}"
            path = local_path(spec)
            where = "" if path is None or os.path.isabs(path) else ", relative to where the run started"
            gone = path is not None and not os.path.exists(path.split("{")[0] or ".")
            return f"--val-data (the run's, from its checkpoint: {redact(spec)}{where}): {error}" + (
                "; pass --val-data to say where the labelled images are now" if gone else ""
            )
        return None

    refused = broadcast_from_main(prepared.ctx, open_on_main) if prepared.args.val_data else None
    if refused:
        raise UserError(refused)


def _chosen(args: argparse.Namespace, recipe: Recipe, checkpoint: dict[str, Any] | None) -> str:
    """`` (chosen for FAMILY)`` when the optimiser came from the model's family (no --optimizer, a new run)."""
    if checkpoint is not None or getattr(args, "optimizer", None) is not None or recipe.recipe != "paper":
        return ""
    found = family_of(recipe.model)
    why = "the paper's, family not measured" if found is None else f"chosen for {found[0]}"
    rate = family_lr(recipe.model)
    if rate is not None and getattr(args, "lr", None) is None:
        why += f", at their lr {rate:g} x batch/256"
    return f" ({why}; --optimizer or --lr to change)"


def _sample_clean_images(prepared: Run, data: str, dataset: Any) -> None:
    """``prepared.clean_images`` on rank 0, the others waiting on the long group; a refusal on every rank."""
    index = dataset.paths if isinstance(dataset, ImageFolder) else None  # no second scan of a folder

    def sample() -> str | None:
        try:
            prepared.clean_images = _clean_images(data, prepared.recipe, prepared.args, index)
        except UserError as error:
            return str(error)
        return None

    refused = broadcast_from_main(prepared.ctx, sample)
    if refused:  # one UserError on every rank, whichever prints the line
        raise UserError(refused)


def _clean_images(data: str, recipe: Recipe, args: argparse.Namespace, index: Any = None) -> torch.Tensor:
    """512 un-augmented training images at the views' size, spread over the data (``data.sample_images``)."""
    try:
        source = open_unlabelled(
            data, recipe.image_size, recipe.channels, image_column=args.image_column, split=args.hf_split, index=index
        )
        return sample_images(source, CLEAN_IMAGES)
    except RemoteReadError as error:  # the data's fault, not the option's
        raise UserError(f"--data: {last_line(error)}") from None
    except (ValueError, RuntimeError) as error:
        raise UserError(f"--bn-stats clean: {error}") from None


def clean_batchnorm(learner: BYOL, images: torch.Tensor | None) -> dict[str, dict[str, torch.Tensor]]:
    """The BatchNorm statistics of the online and the target backbones on clean ``images`` (none: ``{}``).

    Computed on the live networks and given back at once (``batchnorm.clean_statistics``): the
    training itself is not changed. Checkpoints keep them as ``clean_bn``; export, eval and embed
    load them into what they hand out.
    """
    if images is None:
        return {}
    normalize = clean_input(learner)  # the net's channels, normalised as the views are
    device = next(learner.parameters()).device
    out: dict[str, dict[str, torch.Tensor]] = {}
    nets = {"online": learner.net, "target": learner.target_encoder.net if learner.target_encoder else None}
    for name, net in nets.items():
        if net is not None:
            with clean_statistics(net, images.to(device), transform=normalize) as clean:
                out[name] = {k: v.cpu() for k, v in batchnorm_state(clean).items()}
    return out


# ---------------------------------------------------------------------- run
class Checkpointer:
    """Writes ``OUT/last.pt`` (rank 0, atomically) with every rank's generators; a collective."""

    def __init__(self, run: Run):
        self.run = run

    def __call__(self, state: TrainState) -> None:
        run = self.run
        rng_states = gather_objects(run.ctx, get_rng_state())  # every rank calls the hook
        if run.ctx.is_main:
            save_checkpoint(
                run.out / "last.pt",
                {
                    "step": state.step,
                    "epoch": state.epoch,
                    "batch_in_epoch": state.position,
                    "total_steps": state.total,
                    "warmup_steps": run.warmup,
                    "dataset_size": len(run.dataset),
                    "dataset_digest": run.dataset_digest,
                    "world_size": run.ctx.world_size,
                    "learner": run.learner.state_dict(),
                    "optimizer": run.optimizer.state_dict(),
                    "scheduler": run.scheduler.state_dict(),
                    "scaler": run.scaler.state_dict() if run.scaler else {},
                    "rng": rng_states,
                    "args": run.run_args,
                    "clean_bn": clean_batchnorm(run.learner, run.clean_images),
                    "knn_reference": run.knn_reference,
                },
            )
        run.ctx.barrier()
        run.saved_step = state.step


def _hooks(prepared: Run, metrics: MetricsLog, monitor: KnnMonitor | None) -> list[Periodic]:
    """This command's hooks, in the order they run after a step: warn, validate, log, save."""
    args, ctx = prepared.args, prepared.ctx

    def warn_skipped(s: TrainState) -> None:
        if s.skipped_files and not prepared.skip_warned and ctx.is_main:
            warn(
                f"{s.skipped_files} unreadable, empty or corrupt image files were passed over so far; "
                "training goes on (metrics.jsonl counts them in skipped_files)"
            )
            prepared.skip_warned = True

    def validate(s: TrainState) -> None:
        # A stop during the evaluation (a large --val-data takes minutes; a scheduler's grace period is
        # shorter) gives it up at once, and the log and checkpoint hooks after this one run on the stop.
        # Before, it was noted for a next step that never came at the end, and a kill after the grace
        # period lost every step since the last periodic checkpoint.
        stopped = None
        if monitor is not None and s.stop_signal is None:  # a stop already seen (all-reduced): no evaluation
            measured: list[float] = []
            stopped = _given_up_on_stop(prepared, lambda: measured.append(monitor(prepared.learner)))
            if stopped is None:
                s.pending["knn_acc"] = prepared.last_knn = measured[0]
                prepared.last_knn_step = s.step
                _warn_missing_classes(prepared, monitor)
                _warn_below_reference(prepared, s, monitor)
        ctx.wait_for_main()  # the other ranks wait on a gloo group with a long timeout, not under NCCL's watchdog
        stops = [signum for signum in gather_objects(ctx, stopped) if signum is not None]
        if stops and s.stop_signal is None:
            s.stop_signal = stops[0]  # every rank alike: the on_stop hooks after this one are collectives

    def log(s: TrainState) -> None:
        row = {
            "step": s.step,
            "epoch": s.epoch + s.position / s.batches_per_epoch,
            "loss": s.loss,
            "lr": s.lr,
            "tau": s.tau,
        }
        row.update(s.take_interval(), skipped_files=s.skipped_files, **s.pending)
        collapse = prepared.learner.collapse_monitor
        if collapse is not None and ctx.is_main:  # the collapse alarm's figures (a read, like the loss's)
            figures = collapse.status()
            row.update(proj_std=figures["std"], proj_rank=figures["effective_rank"])
        metrics.write(row)
        s.shown = {
            k: f"{row[k]:.1f}" if k == "img_per_s" else f"{row[k]:.4f}"
            for k in ("loss", "img_per_s", "knn_acc")
            if k in row
        }
        s.pending.clear()

    def validation_epoch(s: TrainState) -> bool:
        return bool(args.val_data) and s.epoch_done and s.epoch % args.val_every == 0

    hooks = [Periodic(warn_skipped, when=lambda s: s.epoch_done)]
    if args.val_data:
        hooks.append(Periodic(validate, every_epochs=args.val_every, at_end=True))
    hooks.append(
        # also at each validation epoch, on every rank alike (the kNN figure itself exists on rank 0 only)
        Periodic(log, every=args.log_every, at_end=True, on_stop=True, when=validation_epoch)
    )
    hooks.append(Periodic(Checkpointer(prepared), every=args.checkpoint_every, at_end=True, on_stop=True))
    return hooks


def run(prepared: Run) -> TrainState:
    """The loop: the engine with this command's hooks, until the total or a stop signal.

    Raises:
        UserError: the loss turned non-finite (the last good checkpoint is kept).
    """
    args, ctx, state, recipe = prepared.args, prepared.ctx, prepared.state, prepared.recipe
    metrics = prepared.metrics  # opened by ``train`` in the lock's recheck
    assert metrics is not None
    monitor = prepared.monitor
    step = OptimizerStep(
        prepared.learner,
        prepared.model,
        prepared.optimizer,
        prepared.scheduler,
        prepared.precision,
        ctx.device,
        prepared.scaler,
    )
    channels = recipe.in_chans or 3  # resolved from the net in _build_net
    engine = Engine(
        step,
        ctx,
        prepare=lambda x: match_channels(x, channels),
        check_every=None if ctx.device.type == "cpu" else min(10, args.log_every),
        stop_note=f" and saving {prepared.out / 'last.pt'} for --resume",
    )
    batches = None
    completed = False
    try:
        if _stopped_while_measuring(prepared, monitor, metrics):
            completed = True
            prepared.metrics = metrics
            return state
        batches = step_batches(prepared.loader, prepared.sampler, state.epoch, state.position, recipe.accumulate)
        with _shard_warnings_as_lines():
            engine.run(batches, state, _hooks(prepared, metrics, monitor))
        completed = True
    except RemoteReadError as error:  # past the retries and the fault budget, or an error no retry heals
        raise UserError(f"--data: {last_line(error)}") from error
    except NoReadableImagesError as error:
        flag = "--val-data" if isinstance(error, UnreadableKnnData) else "--data"
        if prepared.saved_step < 0 and state.step == 0:  # at the start: nothing was moved, nothing to resume
            fix = "" if "of one class only" in str(error) else "; give images that can be read"
            raise UserError(f"{flag}: {last_line(error)}{fix}") from error
        raise UserError(
            f"{flag}: {last_line(error)} (was the folder moved or removed during the run?); restore it and continue "
            f"with --resume: {'the last checkpoint is kept' if prepared.saved_step >= 0 else 'no checkpoint yet'}"
        ) from error
    except (torch.OutOfMemoryError, RuntimeError, MemoryError) as error:
        if not is_out_of_memory(error):
            raise
        raise UserError(_out_of_memory_advice(prepared, state)) from error
    except DivergedError as error:
        _closing_line(prepared, state, f"diverged at step {error.step}")
        if prepared.ctx.is_main:  # the curves up to the divergence: where they help most
            plot_curves_or_warn(prepared.out / "metrics.jsonl", prepared.out / "curves.png")
        kept = (
            f"the last good checkpoint {prepared.out / 'last.pt'} (step {prepared.saved_step}) is left as it was"
            if prepared.saved_step >= 0
            else "no checkpoint had been written yet"
        )
        advice = (
            "Find the images with NaN/Inf values (a custom decoder or dataset?)"
            if error.bad_input
            else "Lower --lr, lengthen --warmup-epochs, or use --precision fp32/bf16 instead of fp16"
        )
        raise UserError(f"{error}; {kept}. {advice}") from None
    finally:
        if batches is not None:
            batches.close()
        _release_workers(prepared.loader)
        if not completed:
            metrics.close()
    prepared.metrics = metrics  # closed by ``finish``, after W&B gets the pictures
    return state


def _open_metrics(prepared: Run) -> MetricsLog:
    """The run's metrics.jsonl with TensorBoard and W&B when asked for; a sink that cannot start refuses the run."""
    prepared.out.mkdir(parents=True, exist_ok=True)
    try:
        log = MetricsLog(
            prepared.out,
            prepared.state.step if prepared.saved_step >= 0 else None,
            prepared.args.tensorboard,
            enabled=prepared.ctx.is_main,
            wandb=wandb_options(prepared.args, prepared.run_args),
        )
    except ValueError as error:
        raise UserError(str(error)) from None
    came, own = prepared.resumed_from, prepared.out / "last.pt"
    elsewhere = came is not None and came.parent.resolve() != prepared.out.resolve() and not own.exists()
    if elsewhere and prepared.ctx.is_main and log.path.stat().st_size > 0:  # rows of a run this folder held
        warn(
            f"{log.path} holds rows from before this run, which resumes {came}: they are kept as its history; if they "
            "are another run's (one stopped before its first checkpoint), remove them (or use an empty --out)"
        )
    return log


def _out_of_memory_advice(prepared: Run, state: TrainState) -> str:
    """One line for an out-of-memory error in the step: the sizes, what is kept, and the fixes."""
    recipe, ctx = prepared.recipe, prepared.ctx
    micro = recipe.batch_size // (ctx.world_size * recipe.accumulate)
    where = f"{ctx.device}" + (
        f" ({torch.cuda.get_device_name(ctx.device)})"
        if ctx.device.type == "cuda" and torch.cuda.is_available()
        else ""
    )
    kept = (
        f"the last checkpoint {prepared.out / 'last.pt'} (step {prepared.saved_step}) is kept"
        if prepared.saved_step >= 0
        else "no checkpoint had been written yet"
    )
    same_run = [
        flag
        for flag, use in (
            ("--precision bf16", prepared.precision == "fp32"),
            ("--channels-last", not prepared.args.channels_last),
        )
        if use
    ]
    new_run = (
        f"--accumulate {recipe.accumulate * 2} (the same batch in smaller passes), "
        f"--batch-size {max(2, recipe.batch_size // 2)}"
    )
    return (
        f"out of memory on {where} at step {state.step + 1}: batch size {recipe.batch_size} ({micro} images per "
        f"process and pass, two views each), image size {recipe.image_size}, {prepared.precision}; {kept}. "
        + (f"Continue with --resume {' '.join(same_run)}, or start" if same_run else "Start")
        + f" a new run (another --out) with {new_run} or a smaller --image-size"
    )


class _Stopped(Exception):
    """SIGTERM or SIGINT during the untouched net's evaluation (``errors.signals_raise``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _given_up_on_stop(prepared: Run, evaluation: Callable[[], object]) -> int | None:
    """Run ``evaluation`` (rank 0's kNN), given up at once on SIGTERM/SIGINT with the net's BatchNorm statistics
    put back (an evaluation cut short may leave them half-restored); returns that signal, or None."""
    untouched = batchnorm_state(prepared.learner.net)
    try:
        with signals_raise((signal.SIGTERM, signal.SIGINT), _Stopped):
            evaluation()
    except _Stopped as stopped:
        load_batchnorm_state(prepared.learner.net, untouched)
        return stopped.signum
    return None


def _stopped_while_measuring(prepared: Run, monitor: KnnMonitor | None, metrics: MetricsLog) -> bool:
    """``_measure_reference``, abandoned on SIGTERM/SIGINT; a stop then saves a checkpoint at this step.

    A stop in the first evaluation (a large --val-data takes minutes) used to kill the process
    with nothing saved, so a requeued ``--resume`` found no checkpoint. The evaluation is given
    up at once (the resumed run measures it again); every rank stops when one was signalled.
    """
    with StopSignals() as held:  # a signal while the ranks wait for each other: noted, not fatal
        first = _given_up_on_stop(prepared, lambda: _measure_reference(prepared, monitor, metrics))
        if first is not None:  # the checkpoint holds the untouched net
            prepared.knn_reference = None  # measured again by the resumed run (its row may not be written)
        prepared.ctx.wait_for_main()
        stops = [signum for signum in gather_objects(prepared.ctx, first or held.signum) if signum is not None]
    if not stops:
        return False
    prepared.state.stop_signal = stops[0]
    Checkpointer(prepared)(prepared.state)
    return True


def _keep_reference(prepared: Run, checkpoint: dict[str, Any] | None, given_val_data: str | None) -> None:
    """A resumed run's untouched-net figure, or, for a ``--val-data`` new to the run, the untouched net to measure.

    The saved figure is the untouched net's on the run's old ``--val-data``: on another, or when a
    checkpoint after step 0 has none (its measurement was stopped, or the run had no ``--val-data``),
    the net as ``prepare_run`` built it (seeded, before the checkpoint is loaded) is kept for
    ``_measure_reference``. At step 0 the checkpoint's net is the untouched one.
    """
    reference = (checkpoint or {}).get("knn_reference")
    saved_args = (checkpoint or {}).get("args") or {}
    if given_val_data is not None and given_val_data != saved_args.get("val_data"):
        reference = None
    if checkpoint is not None and prepared.args.val_data and int(checkpoint.get("step") or 0) > 0 and reference is None:
        prepared.untouched = {k: v.detach().clone() for k, v in prepared.learner.net.state_dict().items()}
    prepared.knn_reference = float(reference) if isinstance(reference, (int, float)) else None


def _measure_reference(prepared: Run, monitor: KnnMonitor | None, metrics: MetricsLog) -> None:
    """The untouched net's kNN accuracy, once, before the first step: the run's reference (a row at step 0).

    A resumed run keeps the figure of its checkpoint (the net is no longer untouched), unless its
    ``--val-data`` is new to the run: the untouched net kept by ``prepare_run`` is measured on it
    then, and the trained weights put back (a row at the resumed step). The other ranks wait for
    rank 0's evaluation (the caller's ``wait_for_main``).
    """
    args = prepared.args
    untouched, prepared.untouched = prepared.untouched, None
    if not args.val_data or prepared.knn_reference is not None or monitor is None:
        return
    if untouched is None:
        if prepared.state.step == 0:
            reference = prepared.knn_reference = monitor(prepared.learner)
            _warn_missing_classes(prepared, monitor)
            metrics.write({"step": 0, "epoch": 0.0, "knn_acc": reference, "knn_reference": reference})
        return
    net = prepared.learner.net
    trained = {k: v.detach().clone() for k, v in net.state_dict().items()}
    try:  # a stop even inside the first load puts the trained weights back
        net.load_state_dict(untouched)
        reference = prepared.knn_reference = monitor(prepared.learner)
    finally:
        net.load_state_dict(trained)
    _warn_missing_classes(prepared, monitor)
    metrics.write({"step": prepared.state.step, "knn_reference": reference})


def _warn_missing_classes(prepared: Run, monitor: KnnMonitor) -> None:
    """Once a run: --val-data's classes that had no readable image (the accuracy is over the others), and those
    with no held-out image (the accuracy says nothing of them), as ``eval`` says."""
    for line in (monitor.missing_warning(prepared.args.val_data, once=True), monitor.held_out_warning(once=True)):
        if line:
            warn(line)


def _warn_below_reference(prepared: Run, s: TrainState, monitor: KnnMonitor) -> None:
    """One warning when the kNN has fallen below the untouched net's by more than the noise (after epoch 1)."""
    reference, accuracy = prepared.knn_reference, prepared.last_knn
    if reference is None or accuracy is None or s.epoch < 1:
        return
    if prepared.below is None:
        prepared.below = BelowReference(reference, monitor.queries_scored)
    gap = prepared.below.check(accuracy)
    if gap is not None:
        warn(
            f"the kNN accuracy {accuracy:.4f} at step {s.step} (epoch {s.epoch}) is {gap:.4f} below the untouched "
            f"net's {reference:.4f}, more than the evaluations' noise ({prepared.below.noise(accuracy):.4f} over "
            f"{monitor.queries_scored} held-out images): training is losing what the net had. {RECIPE_ADVICE}"
        )


def _closing_line(prepared: Run, state: TrainState, outcome: str) -> None:
    """The line on stdout that ends a run: steps, time, speed, kNN against the reference, checkpoint, what next."""
    if not prepared.ctx.is_main:
        return
    now = time.perf_counter()
    seconds, steps = now - prepared.started, state.step - prepared.start_step
    training = now - state.start if state.start else seconds  # the loop's own time, evaluations included
    speed = steps * prepared.recipe.batch_size / training if training > 0 else 0.0
    knn = ""
    if prepared.last_knn is not None:
        knn = f"; kNN {prepared.last_knn:.4f}"
        if prepared.knn_reference is not None:
            knn += f" (untouched net {prepared.knn_reference:.4f}, {prepared.last_knn - prepared.knn_reference:+.4f})"
    checkpoint = prepared.out / "last.pt"
    saved = "no checkpoint written"
    if checkpoint.exists():
        saved = f"checkpoint {checkpoint}" + (f" (step {prepared.saved_step})" if prepared.saved_step >= 0 else "")
    after = f". Next: {_next_commands(prepared, checkpoint)}" if checkpoint.exists() else ""
    print(
        f"byol-pytorch: {outcome}: {steps} step{'' if steps == 1 else 's'} ({prepared.start_step} -> {state.step}) "
        f"in {seconds / 60:.1f} min, "
        f"{speed:.1f} img/s{knn}; {saved}{after}",
        flush=True,
    )


def _next_commands(prepared: Run, checkpoint: Path) -> str:
    """export, eval and embed of the run's checkpoint, each quoted for a POSIX shell (a brace pattern, a space)."""
    args, q = prepared.args, shlex.quote
    source = " ".join(
        f"{flag} {q(str(value))}"
        for flag, value in (
            ("--data", prepared.run_args.get("data")),
            ("--image-column", getattr(args, "image_column", None)),
            ("--hf-split", getattr(args, "hf_split", None)),
        )
        if value
    )
    return (
        f"byol-pytorch export {q(str(checkpoint))} --out backbone.safetensors | byol-pytorch eval --data LABELLED "
        f"--checkpoint {q(str(checkpoint))} | byol-pytorch embed {source} --checkpoint {q(str(checkpoint))} "
        "--out embeddings/"
    )


@contextmanager
def _shard_warnings_as_lines() -> Iterator[None]:
    """A remote shard skipped after its retries is one ``byol-pytorch: warning:`` line (loader workers inherit it)."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            if issubclass(category, ShardReadWarning):  # above the progress bar, not in it
                tqdm.write(f"{PROG}: warning: {one_line(message)}", file=sys.stderr)
            else:
                shown(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield


def _release_workers(loader: DataLoader) -> None:
    """Stop the loader's worker processes now.

    Persistent workers outlive the loop (the loader keeps its iterator), and ours ignore
    SIGTERM (``ignore_signals_in_worker``): an interpreter that exits with them alive would
    wait for them forever (a test process, or a script calling ``main`` twice).
    """
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None


# ---------------------------------------------------------------------- finish
def finish(prepared: Run, state: TrainState) -> dict[str, Any]:
    """Curves and warnings on rank 0, a line for a stopped run; returns the summary."""
    out, ctx = prepared.out, prepared.ctx
    stopped = state.stop_signal
    if ctx.is_main and stopped is None:
        plot_curves_or_warn(out / "metrics.jsonl", out / "curves.png")
        if state.skipped_files and not prepared.skip_warned:
            warn(
                f"{state.skipped_files} unreadable, empty or corrupt image files were passed over so far; "
                "training went on"
            )
    if prepared.metrics is not None:
        pictures = [out / "curves.png"]
        shown = prepared.metrics.wandb_run is not None or prepared.metrics.writer is not None  # W&B, TensorBoard
        if ctx.is_main and stopped is None and shown:
            pictures.append(draw_views_or_warn(prepared.dataset, prepared.learner, out / "views.png"))
        prepared.metrics.close(pictures)
    if stopped is not None and ctx.is_main:
        name, saved = signal.Signals(stopped).name, out / "last.pt"
        skipped = ["curves.png"]
        if prepared.args.val_data and prepared.last_knn_step != state.step:
            skipped.insert(0, "the last kNN evaluation")
        print(
            f"byol-pytorch: stopped by {name} after the run's last step ({state.step}); checkpoint saved to {saved}: "
            f"the training is complete; not made: {' and '.join(skipped)}"
            if state.step >= state.total
            else f"byol-pytorch: stopped by {name} at step {state.step}; checkpoint saved to {saved}; continue with "
            "--resume",
            file=sys.stderr,
            flush=True,
        )
    _closing_line(prepared, state, "done" if stopped is None else f"stopped by {signal.Signals(stopped).name}")
    return {
        "step": state.step,
        "total": state.total,
        "epoch": state.epoch,
        "checkpoint": str(out / "last.pt"),
        "stopped_by": None if stopped is None else signal.Signals(stopped).name,
        "exit_code": 0 if stopped is None else 128 + int(stopped),
    }
