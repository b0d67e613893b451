"""The one place DataLoaders are made: worker start-up, pinning, seeding and signals alike for all.

Every loader of the package (training on a folder, CIFAR or ``hf:`` data, tar shards, the kNN
monitor, ``eval``, ``embed``, ``BYOLTrainer``) comes from :func:`make_loader`, so its workers start
the same way: Python's and NumPy's generators seeded from the worker's torch seed (distinct per
worker, fixed by the loader's own seeded generator), SIGINT/SIGTERM left to the main process (it
finishes its step and stops the workers; a worker killed by Ctrl-C would crash the step in
flight), and page-locked batches when they go to a GPU.

Workers that ignore SIGTERM cannot be stopped by the interpreter's own exit, which terminates
its daemonic children with SIGTERM and then waits for them: a loop left by an exception (its
iterator alive in the traceback) would hang the process for ever. An exit hook, run before
multiprocessing's, kills the workers of these loaders that are still alive; a start-up that fails
half-way (too many open files) kills the workers it had started at once.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # noqa: F401  (registers its exit hook now, so that ours, later, runs first)
import os
import random
import signal
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, Sampler, default_collate

from .._modules import switch, whole_number

__all__ = ["collate_images", "ignore_signals_in_worker", "make_loader", "worker_init"]


def collate_images(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, int]:
    """Stack ``(image, skipped)`` samples into a batch and total their skip counts.

    Args:
        batch: ``(image (C, S, S) uint8, skipped)`` pairs, as ``ImageFolder`` hands them out.

    Returns:
        ``uint8`` tensor ``(B, C, S, S)`` and the number of broken files passed over.
    """
    images = torch.stack([image for image, _ in batch])  # (B, C, S, S)
    return images, sum(skipped for _, skipped in batch)


_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()  # multi-process iterators of our loaders


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_MANY_WORKERS_SAID: list[int] = []


def _warn_many_workers(workers: int) -> None:
    """One warning per process for more loader workers than CPUs this process may use (torch's own, three lines
    long, came again for every loader: twice per ``eval``)."""
    cpus = _usable_cpus()
    if workers > cpus and not _MANY_WORKERS_SAID:
        _MANY_WORKERS_SAID.append(workers)
        warnings.warn(
            f"{workers} loader workers for the {cpus} CPUs this process may use: loading may slow down or stall; "
            f"lower the worker count (more than the CPUs helps only slow remote reads)",
            UserWarning,
            stacklevel=3,
        )


class _Loader(DataLoader):
    """A ``DataLoader`` whose multi-process iterators are known to the exit hook."""

    def check_worker_number_rationality(self) -> None:
        """torch's three-line warning for more workers than CPUs, which came for every loader: ``make_loader`` says
        it in one line, once per process (no ``catch_warnings`` here: it would reset the user's once-only warnings)."""

    def _get_iterator(self) -> Any:
        if self.num_workers == 0:
            return super()._get_iterator()
        before = {child.pid for child in multiprocessing.active_children()}
        try:
            iterator = super()._get_iterator()
        except BaseException:  # a start-up cut short (too many open files, Ctrl-C): no iterator holds its workers
            _kill_started_since(before)
            raise
        if getattr(iterator, "_workers", None):
            _LIVE_ITERATORS.add(iterator)
        return iterator


def _kill_started_since(before: set[int | None]) -> None:
    """Kill the child processes started since ``before`` (their pids): the workers of a loader whose start-up failed,
    which ignore SIGTERM, so that the interpreter's exit (SIGTERM, then a wait) does not hang on them for ever."""
    started = [child for child in multiprocessing.active_children() if child.pid not in before]
    for child in started:
        child.kill()
    for child in started:
        child.join(timeout=5)


def _kill_our_workers_at_exit() -> None:
    """Stop the workers of our loaders' live iterators, SIGKILL what is left (they ignore the exit's SIGTERM)."""
    from torch.utils.data._utils import signal_handling

    for iterator in list(_LIVE_ITERATORS):
        workers = list(getattr(iterator, "_workers", []))
        if getattr(iterator, "_worker_pids_set", False):  # torch's SIGCHLD check would call the kill a failure
            signal_handling._remove_worker_pids(id(iterator))
            iterator._worker_pids_set = False
        for worker in workers:
            if worker.is_alive():
                worker.kill()
        for worker in workers:
            worker.join(timeout=5)


def ignore_signals_in_worker(worker_id: int = 0) -> None:
    """Leave SIGINT/SIGTERM to the main process (a DataLoader ``worker_init_fn``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def worker_init(worker_id: int) -> None:
    """Start a loader worker: seed ``random`` and NumPy from its torch seed, leave the signals to the main process.

    DataLoader seeds torch in each worker with ``base_seed + worker_id``; Python's and NumPy's
    generators get the same distinct seed, for user transforms that draw from them.
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    ignore_signals_in_worker(worker_id)


def make_loader(
    dataset: Dataset,
    batch_size: int | None,
    workers: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    sampler: Sampler | None = None,
    seed: int = 0,
    pin_memory: bool | None = None,
    collate_fn: Callable[[list], Any] | None = None,
    persistent: bool | None = None,
) -> DataLoader:
    """A ``DataLoader`` with the package's worker start-up, seeding and pinning rules.

    Args:
        dataset: a map-style dataset, or an ``IterableDataset`` (tar shards).
        batch_size: samples per batch; None for a dataset that yields whole batches itself.
        workers: worker processes; 0 loads in the calling process.
        shuffle: reshuffle every epoch (map-style datasets without a ``sampler`` only; an
            ``IterableDataset`` orders itself, as ``ShardDataset``'s shuffle buffer does, and ignores it).
        drop_last: drop the last incomplete batch.
        sampler: e.g. an ``EpochSampler`` (it orders and splits the data itself).
        seed: the shuffle order (the same whatever the workers) and the workers' base seed: starting an epoch
            never draws from torch's global generator, which the augmentations use.
        pin_memory: page-locked batches for faster host-to-GPU copies; None: when CUDA is available.
        collate_fn: how samples become a batch; None: ``collate_images`` for datasets whose
            items are ``(image, skipped)`` pairs (``ImageFolder`` and the like, which set
            ``collate = "images"``), else torch's default collate.
        persistent: keep the workers between epochs; None: when there are workers and the
            dataset is map-style (an ``IterableDataset`` that reads its epoch at start needs new ones).

    Returns:
        The loader.

    Raises:
        ValueError: a negative worker count, a batch size below 1, a batch size for a dataset that
            batches itself (``ShardDataset``), an empty dataset to shuffle, or ``drop_last`` leaving
            no batch at all.
        TypeError: an argument of the wrong type (``workers=1.5``, ``shuffle="no"``).

    Examples:
        >>> loader = make_loader(torch.arange(10.0), batch_size=4, shuffle=False)
        >>> [batch.tolist() for batch in loader]
        [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]]
    """
    workers, seed = whole_number("workers", workers, 0), whole_number("seed", seed, -(2**63))
    if batch_size is not None:
        batch_size = whole_number("batch_size", batch_size, 1, " (or None for a dataset that batches itself)")
    if seed >= 2**64:
        raise ValueError(f"seed must fit in 64 bits (as torch.manual_seed takes it), got {seed}")
    shuffle, drop_last = switch("shuffle", shuffle), switch("drop_last", drop_last)
    iterable = isinstance(dataset, IterableDataset)
    if batch_size is not None and getattr(dataset, "yields_batches", False):
        raise ValueError(
            f"{type(dataset).__name__} yields whole batches itself: pass batch_size=None (make_shard_loader does), "
            f"not batch_size={batch_size}, which would batch its batches"
        )
    if iterable:
        shuffle = False
    samples = _known_length(dataset, sampler, iterable) if batch_size is not None and (drop_last or shuffle) else None
    if samples is not None and batch_size is not None:
        if samples == 0 and shuffle and sampler is None:  # (torch's RandomSampler refuses it in its own words)
            raise ValueError("the dataset holds no samples to shuffle: add images")
        if drop_last and samples < batch_size:
            raise ValueError(
                f"{samples} images but a batch size of {batch_size}: every batch would be "
                "dropped; lower the batch size or add images"
            )
    if collate_fn is None and batch_size is not None:
        collate_fn = collate_images if getattr(dataset, "collate", None) == "images" else default_collate
    if shuffle and sampler is None:  # its own generator: the order of every epoch is the seed's, whatever
        # the workers (the loader's generator gives each new iterator its workers' base seed: a draw
        # per epoch without persistent workers, one only with them)
        sampler = RandomSampler(dataset, generator=_PicklableGenerator().manual_seed(seed))  # type: ignore[arg-type]
    _warn_many_workers(workers)
    return _Loader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last if batch_size is not None else False,
        persistent_workers=(workers > 0 and not iterable) if persistent is None else (persistent and workers > 0),
        worker_init_fn=worker_init if workers > 0 else None,
        generator=_PicklableGenerator().manual_seed(seed),
    )


def _known_length(dataset: Dataset, sampler: Sampler | None, iterable: bool) -> int | None:
    """The samples an epoch holds: the sampler's or the dataset's length; None where it is not known cheaply: an
    ``IterableDataset`` without ``__len__`` (one with it, a user's stream of known length, is checked as a map-style
    one), or one that says its length reads the data (``counts_lazily``: remote shards without an index)."""
    if sampler is not None:
        return len(sampler) if hasattr(sampler, "__len__") else None
    if iterable:
        if getattr(dataset, "yields_batches", False) or getattr(dataset, "counts_lazily", False):
            return None  # batches already; or a length that reads the data (remote shards): not the loader's to pay
        try:
            return len(dataset)  # type: ignore[arg-type]
        except TypeError:  # no __len__
            return None
    return len(dataset)  # type: ignore[arg-type]


def _generator_from_state(state: bytes) -> _PicklableGenerator:
    generator = _PicklableGenerator()
    generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    return generator


class _PicklableGenerator(torch.Generator):
    """The loader's CPU generator, pickled as its state's bytes: a plain ``torch.Generator`` sent to processes
    started by spawn (Lightning's ``ddp_spawn``, ``mp.spawn`` of a loader) fails in torch's shared-memory
    reduction ('unable to resize file ... Invalid argument')."""

    def __reduce__(self) -> Any:  # (rebuild, (state bytes,)): no tensor to share
        return _generator_from_state, (self.get_state().numpy().tobytes(),)


atexit.register(_kill_our_workers_at_exit)  # after multiprocessing.util's (imported above): runs before it
