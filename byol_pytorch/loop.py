"""The pieces of a BYOL training loop: data order, processes, one optimizer step, signals.

``byol-pytorch train`` (``train.py``) and the drop-in ``BYOLTrainer`` (``trainer.py``)
compose these; each is small enough to test alone.

* ``EpochSampler``: a shuffled order that is a pure function of (seed, epoch), split
  between processes like ``DistributedSampler``, which starts mid-epoch on resume, so a
  resumed run sees exactly the batches an uninterrupted one would.
* ``setup_distributed``: the process group of ``torchrun`` (``env://``; NCCL on CUDA,
  gloo on the CPU), or a single process.
* ``OptimizerStep``: ``accumulate`` micro-batches -> one optimizer step, with autocast
  and GradScaler; the lr schedule and the target EMA advance only when the optimizer
  really stepped (a GradScaler-skipped fp16 step advances nothing).
* ``StopSignals``: SIGTERM/SIGINT set a flag; the loop finishes its step and saves.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler

__all__ = [
    "EpochSampler",
    "DistContext",
    "setup_distributed",
    "OptimizerStep",
    "StopSignals",
    "autocast_for",
    "step_batches",
    "match_channels",
    "ignore_signals_in_worker",
]


class EpochSampler(Sampler[int]):
    """Indices of one process's share of an epoch, in a reproducible shuffled order.

    The permutation of epoch ``e`` comes from a generator seeded with (seed, e) alone;
    it is cut to a multiple of ``world_size * batch_size * multiple_of`` (like
    ``drop_last``), and process ``rank`` takes every ``world_size``-th index. After
    ``set_epoch(e, start_batch=k)`` iteration starts at the k-th batch of the epoch.

    Args:
        size: number of samples in the dataset.
        batch_size: samples per batch of one process.
        rank: this process's rank.
        world_size: number of processes.
        seed: the run's seed (the same on every rank).
        multiple_of: batches per epoch are rounded down to a multiple of this
            (the gradient accumulation count, so no optimizer step spans two epochs).

    Raises:
        ValueError: fewer samples than one step needs.
    """

    def __init__(
        self, size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, multiple_of: int = 1
    ):
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.seed, self.multiple_of = int(seed), multiple_of
        per_rank = size // world_size
        self.batches_per_epoch = (per_rank // batch_size) // multiple_of * multiple_of
        if self.batches_per_epoch == 0:
            need = batch_size * world_size * multiple_of
            raise ValueError(
                f"{size} images are fewer than one optimizer step needs ({need} = batch {batch_size} "
                f"x {world_size} process(es) x {multiple_of} accumulation step(s)); lower --batch-size "
                "or add images"
            )
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch and the first batch of it to hand out (0 unless resuming)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch must be in [0, {self.batches_per_epoch}], got {start_batch}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The whole dataset's order in ``epoch`` (identical on every rank)."""
        generator = torch.Generator()
        generator.manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
        return torch.randperm(self.size, generator=generator)

    def __iter__(self) -> Iterator[int]:
        used = self.batches_per_epoch * self.batch_size * self.world_size
        mine = self.permutation(self.epoch)[:used][self.rank :: self.world_size]  # (batches * batch,)
        return iter(mine[self.start_batch * self.batch_size :].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


def step_batches(
    loader: DataLoader, sampler: EpochSampler, epoch: int, position: int, accumulate: int
) -> Iterator[tuple[list, int, int]]:
    """Endless ``(micro_batches, epoch, batches_done_in_epoch)`` from a data position on.

    Args:
        loader: a loader drawing from ``sampler``.
        sampler: its ``set_epoch`` is called at each epoch start.
        epoch: the epoch to start in.
        position: batches of that epoch already consumed (0 unless resuming).
        accumulate: micro-batches per optimizer step.
    """
    while True:
        sampler.set_epoch(epoch, position)
        iterator = iter(loader)
        for _ in range((sampler.batches_per_epoch - position) // accumulate):
            micro = [next(iterator) for _ in range(accumulate)]
            position += accumulate
            yield micro, epoch, position
        epoch, position = epoch + 1, 0


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, C, H, W) images with ``channels`` channels: gray (the first) replicated when C differs."""
    if images.shape[1] == channels:
        return images
    return images[:, :1].expand(-1, channels, -1, -1)


def ignore_signals_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: leave SIGINT/SIGTERM to the training process.

    The training process catches them, finishes its step and stops its workers; a
    worker killed by the signal (Ctrl-C reaches the whole process group) would crash
    the step in flight instead.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@dataclass
class DistContext:
    """Where this process runs: rank, world size, local rank and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this process created the group and destroys it

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if this process created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def setup_distributed(device: str | None = None) -> DistContext:
    """Join the ``torchrun`` process group, or run as a single process.

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the group is initialised
    from ``env://`` with NCCL when the device is CUDA and gloo otherwise; an existing
    group (Lightning, accelerate, a test) is reused.

    Args:
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"``, ``"mps"``; None: this process's
            GPU (``cuda:LOCAL_RANK``) when CUDA is available, else the CPU.

    Returns:
        The context.

    Raises:
        ValueError: CUDA was asked for but is not available.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None or device == "auto":
        resolved = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        resolved = torch.device(device)
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device} was given but CUDA is not available; use --device cpu")
        if resolved.type == "cuda" and resolved.index is None:
            resolved = torch.device("cuda", local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    owns = False
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        kwargs = {"device_id": resolved} if resolved.type == "cuda" else {}
        dist.init_process_group(backend=backend, init_method="env://", **kwargs)
        owns = True
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, resolved, owns)
    return DistContext(0, 1, 0, resolved, False)


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``"bf16"``/``"fp16"``, a no-op context for ``"fp32"``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class OptimizerStep:
    """One optimizer step from ``accumulate`` micro-batches; schedules advance on real steps.

    Args:
        learner: the BYOL learner (``update_moving_average`` is called on it).
        model: what the forward runs through: the learner, or its DDP / compiled wrapper.
        optimizer: the optimizer.
        scheduler: an lr scheduler stepped once per real optimizer step, or None.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (with a GradScaler).
        device: the training device.
        scaler: the fp16 GradScaler; None for fp32/bf16.

    Attributes:
        steps: optimizer steps really taken; skipped: fp16 steps the scaler skipped.
    """

    def __init__(
        self,
        learner: nn.Module,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        precision: str,
        device: torch.device,
        scaler: torch.amp.GradScaler | None = None,
    ):
        self.learner, self.model, self.optimizer, self.scheduler = learner, model, optimizer, scheduler
        self.precision, self.device, self.scaler = precision, device, scaler
        self.steps, self.skipped = 0, 0

    def __call__(self, micro_batches: Sequence[torch.Tensor]) -> tuple:
        """Forward/backward every micro-batch, then step.

        Args:
            micro_batches: the (b, C, H, W) batches of one step (same size each).

        Returns:
            ``(loss, stepped)``: the mean loss over the micro-batches (a detached device
            tensor, not read back), and whether the optimizer really stepped.
        """
        count = len(micro_batches)
        total = torch.zeros((), device=self.device)
        for i, images in enumerate(micro_batches):
            last = i == count - 1
            no_sync = getattr(self.model, "no_sync", None)
            context = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
            with context:
                with autocast_for(self.device, self.precision):
                    loss = self.model(images)
                scaled = loss / count
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total += loss.detach().float()
        stepped = True
        if self.scaler is not None:
            scale_before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            stepped = self.scaler.get_scale() >= scale_before  # a backoff means the step was skipped
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if stepped:
            self.steps += 1
            if self.scheduler is not None:
                self.scheduler.step()
            if getattr(self.learner, "use_momentum", False):
                self.learner.update_moving_average()
        else:
            self.skipped += 1
        return total / count, stepped


class StopSignals:
    """Context manager: SIGTERM and SIGINT set ``requested`` instead of killing the process.

    The loop reads ``requested`` after each step, saves a checkpoint and exits. A second
    SIGINT (Ctrl-C twice) raises ``KeyboardInterrupt`` at once. Outside the main thread
    (signals cannot be caught there) it does nothing. The previous handlers are restored
    on exit.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: list[tuple] = []

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous.append((sig, signal.signal(sig, self._handle)))
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous:
            signal.signal(sig, handler)
        self._previous = []
