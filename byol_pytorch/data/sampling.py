"""The data order of a training run: reproducible, split between processes, resumable mid-epoch.

* ``EpochSampler``: a shuffled order that is a pure function of (seed, epoch), split
  between processes like ``DistributedSampler``, which starts mid-epoch on resume, so a
  resumed run sees exactly the batches an uninterrupted one would.
* ``step_batches``: the endless stream of ``StepBatch`` (the micro-batches of one
  optimizer step and where they leave the data position) that the engine consumes.
* ``ignore_signals_in_worker``: a DataLoader ``worker_init_fn`` leaving SIGTERM/SIGINT to
  the training process.
"""

from __future__ import annotations

import signal
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils.data import Sampler

from .._modules import whole_number

__all__ = ["DataOrder", "EpochSampler", "StepBatch", "step_batches", "ignore_signals_in_worker"]


def checked_epoch(epoch: object, start_batch: object, batches_per_epoch: int) -> tuple[int, int]:
    """``set_epoch``'s ``(epoch, start_batch)`` as whole numbers in range (``set_epoch(1.7)`` was epoch 1)."""
    epoch, start_batch = whole_number("epoch", epoch, 0), whole_number("start_batch", start_batch, 0)
    if start_batch > batches_per_epoch:
        raise ValueError(f"start_batch must be in [0, {batches_per_epoch}], got {start_batch}")
    return epoch, start_batch


class DataOrder(Protocol):
    """What ``step_batches`` needs of a data order: an ``EpochSampler``, or a ``ShardDataset`` (it orders itself)."""

    batches_per_epoch: int

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...


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
                f"{size} images are fewer than one optimizer step needs ({need} = {batch_size} images per process "
                f"and step x {world_size} process(es) x {multiple_of} accumulation step(s)); lower the batch size "
                "(--batch-size, batch_size=) or add images"
            )
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch and the first batch of it to hand out (0 unless resuming)."""
        self.epoch, self.start_batch = checked_epoch(epoch, start_batch, self.batches_per_epoch)

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


@dataclass
class StepBatch:
    """The micro-batches of one optimizer step, and where they leave the data position.

    Attributes:
        images: the (b, C, H, W) micro-batches (``accumulate`` of them).
        skipped: unreadable files the loader passed over while making them.
        epoch: the epoch they belong to.
        position: batches of that epoch consumed once they are (equal to
            ``batches_per_epoch`` at the epoch's last step).
        batches_per_epoch: batches in a whole epoch.
    """

    images: list[torch.Tensor]
    skipped: int
    epoch: int
    position: int
    batches_per_epoch: int


def _images_and_skipped(item: Any) -> tuple[torch.Tensor, int]:
    """A loader item as ``(images, skipped)``: a tensor, or the ``(images, skipped)`` of ``collate_images``."""
    if isinstance(item, torch.Tensor):
        return item, 0
    images, skipped = item[0], item[1] if len(item) > 1 else 0
    return images, int(skipped) if isinstance(skipped, int) else 0


def step_batches(
    loader: Iterable[Any], sampler: DataOrder, epoch: int, position: int, accumulate: int
) -> Generator[StepBatch, None, None]:
    """Endless ``StepBatch`` es from a data position on.

    Args:
        loader: a loader drawing from ``sampler``; it yields image tensors or
            ``(images, skipped)`` pairs (``collate_images``).
        sampler: its ``set_epoch`` is called at each epoch start (an ``EpochSampler``, or a
            ``ShardDataset``, which orders its own samples).
        epoch: the epoch to start in.
        position: batches of that epoch already consumed (0 unless resuming).
        accumulate: micro-batches per optimizer step.
    """
    per_epoch = sampler.batches_per_epoch
    while True:
        sampler.set_epoch(epoch, position)
        iterator = iter(loader)
        for _ in range((per_epoch - position) // accumulate):
            pairs = [_images_and_skipped(next(iterator)) for _ in range(accumulate)]
            position += accumulate
            yield StepBatch([x for x, _ in pairs], sum(s for _, s in pairs), epoch, position, per_epoch)
        epoch, position = epoch + 1, 0


def ignore_signals_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: leave SIGINT/SIGTERM to the training process.

    The training process catches them, finishes its step and stops its workers; a
    worker killed by the signal (Ctrl-C reaches the whole process group) would crash
    the step in flight instead.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
