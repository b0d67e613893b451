"""Where a training process runs: its rank in a ``torchrun`` process group, and its device.

``setup_distributed`` joins the group of ``torchrun`` (``env://``; NCCL on CUDA, gloo on
the CPU) or reuses one that Lightning, accelerate or a test created; without one the
process runs alone. ``DistContext`` carries rank, world size and device to the engine.
``broadcast_from_main`` runs a piece of work (e.g. scanning the image folder) on rank 0
only and hands its result, or its error, to every rank.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["WAIT_TIMEOUT", "DistContext", "broadcast_from_main", "gather_objects", "local_gpu", "setup_distributed"]

T = TypeVar("T")
WAIT_TIMEOUT = timedelta(hours=4)
"""How long ranks wait for rank 0's lone work (``DistContext.wait_for_main``): a kNN evaluation."""
# Errors that reach the other ranks as themselves (their type and message); others as RuntimeError.
# The most specific first: an error is sent as the first of these it is an instance of.
_SENT_ERRORS = (FileNotFoundError, PermissionError, OSError, ValueError, TypeError, RuntimeError)


@dataclass
class DistContext:
    """Where this process runs: rank, world size, local rank and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this process created the group and destroys it
    wait_group: Any = None  # a gloo group with a long timeout: ranks waiting while rank 0 works

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def wait_for_main(self) -> None:
        """The other ranks wait here while rank 0 works alone (the kNN monitor), then all go on.

        A barrier on a gloo group whose timeout is ``WAIT_TIMEOUT``: under NCCL a plain barrier
        is a collective its watchdog kills after 10 minutes, which an ImageNet-sized validation
        set outlasts. Without such a group (one made by someone else), the plain barrier.
        """
        if not self.distributed:
            return
        if self.wait_group is not None:
            dist.barrier(group=self.wait_group)
        else:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if this process created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def local_gpu(local_rank: int, visible: int, local_world: int | None = None) -> torch.device:
    """This process's GPU: ``cuda:LOCAL_RANK``, or the one GPU a launcher left it.

    Launchers that bind a GPU to each process (SLURM's ``--gpus-per-task=1``, a
    ``CUDA_VISIBLE_DEVICES`` per rank) leave every process one visible GPU, ``cuda:0``,
    whatever its local rank. torchrun binds none: with ``local_world`` (its
    ``LOCAL_WORLD_SIZE``, used when ``CUDA_VISIBLE_DEVICES`` is not set, so that every
    process sees the machine's GPUs) processes on this machine, each needs a GPU of its own.

    Raises:
        ValueError: more processes on this machine than GPUs it sees.
    """
    fix = f"start at most one process per GPU (torchrun --nproc_per_node={visible})"
    if local_world is not None and local_world > visible:  # torchrun binds no GPU to a process
        raise ValueError(f"{local_world} processes on this machine share {visible} GPU(s); {fix}")
    if local_rank < visible:
        return torch.device("cuda", local_rank)
    if visible == 1:
        return torch.device("cuda", 0)
    raise ValueError(
        f"LOCAL_RANK is {local_rank} but this process sees {visible} GPU(s) (cuda:0 to cuda:{visible - 1}); {fix}"
    )


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
        ValueError: CUDA was asked for but is not available; more processes than GPUs (``local_gpu``).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ["LOCAL_WORLD_SIZE"]) if os.environ.get("LOCAL_WORLD_SIZE", "").isdigit() else None
    if "CUDA_VISIBLE_DEVICES" in os.environ:  # a process may see its own GPU(s) only: the machine's count is unknown
        local_world = None
    if device is None or device == "auto":
        gpus = torch.cuda.is_available()
        resolved = local_gpu(local_rank, torch.cuda.device_count(), local_world) if gpus else torch.device("cpu")
    else:
        try:
            resolved = torch.device(device)
        except (RuntimeError, TypeError):  # torch's message lists every device type it knows
            raise ValueError(
                f"device {device!r} is not a device; pass 'cpu', 'cuda', 'cuda:1', 'mps' or None"
            ) from None
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device} was given but CUDA is not available; use --device cpu")
        if resolved.type == "cuda" and resolved.index is None:
            resolved = local_gpu(local_rank, torch.cuda.device_count(), local_world)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    owns = False
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": resolved} if resolved.type == "cuda" else {}
        dist.init_process_group(backend=backend, init_method="env://", **kwargs)
        owns = True
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        wait_group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT) if owns and world > 1 else None
        return DistContext(dist.get_rank(), world, local_rank, resolved, owns, wait_group)
    return DistContext(0, 1, 0, resolved, False)


def gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (a collective: every rank must call it)."""
    if not ctx.distributed:
        return [obj]
    objects: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(objects, obj)
    return objects


def broadcast_from_main(ctx: DistContext, make: Callable[[], T]) -> T:
    """``make()`` run on rank 0 only, its result sent to every rank (a collective).

    The result travels pickled (``broadcast_object_list``; gloo or NCCL), so it must be
    picklable; numpy arrays travel as their bytes. When ``make`` raises, rank 0 raises the
    error and every other rank raises one of its type (the first of ``FileNotFoundError``,
    ``PermissionError``, ``OSError``, ``ValueError``, ``TypeError``, ``RuntimeError`` that it
    is an instance of; ``RuntimeError`` otherwise) with the same message, so that no rank
    waits for a result that never comes. The other ranks wait on the context's gloo group
    with the long timeout (``wait_for_main``'s) when it has one: rank 0's work (counting
    remote shards, scanning a large folder) may outlast NCCL's 10-minute watchdog.

    Args:
        ctx: this process's context; without a group ``make()`` is simply called.
        make: the work, e.g. ``lambda: load_or_scan(folder, cache)``.

    Returns:
        Rank 0's result, on every rank.

    Examples:
        >>> broadcast_from_main(DistContext(), lambda: 6 * 7)
        42
    """
    if not ctx.distributed:
        return make()
    payload: list[Any] = [None]
    failure: Exception | None = None
    if ctx.is_main:
        try:
            payload[0] = (True, make())
        except Exception as error:  # sent on, then raised here too
            failure = error
            kind = next((k for k in _SENT_ERRORS if isinstance(error, k)), RuntimeError)
            payload[0] = (False, (kind.__name__, str(error)))
    dist.broadcast_object_list(payload, src=0, group=ctx.wait_group)  # None: the default group
    if failure is not None:
        raise failure
    ok, value = payload[0]
    if not ok:
        name, message = value
        kind = next((k for k in _SENT_ERRORS if k.__name__ == name), RuntimeError)
        raise kind(message)
    return value
