"""Where a training process runs: its rank in a ``torchrun`` process group, and its device.

``setup_distributed`` joins the group of ``torchrun`` (``env://``; NCCL on CUDA, gloo on
the CPU) or reuses one that Lightning, accelerate or a test created; without one the
process runs alone. ``DistContext`` carries rank, world size and device to the engine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistContext", "gather_objects", "setup_distributed"]


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
        kwargs: dict[str, Any] = {"device_id": resolved} if resolved.type == "cuda" else {}
        dist.init_process_group(backend=backend, init_method="env://", **kwargs)
        owns = True
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, resolved, owns)
    return DistContext(0, 1, 0, resolved, False)


def gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (a collective: every rank must call it)."""
    if not ctx.distributed:
        return [obj]
    objects: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(objects, obj)
    return objects
