"""The target network's exponential moving average and its tau schedules.

Grill et al. 2020, Sec. 3.1: after each optimiser step the target parameters become
``tau * target + (1 - tau) * online``; tau follows
``1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2`` over the K training steps (Sec. 3.2,
tau_base = 0.996). Only parameters are averaged: the target keeps the BatchNorm
statistics of its own forward passes, as in the official implementation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["ema_update_", "cosine_tau"]


def cosine_tau(base: float, step: int, total_steps: int | None) -> float:
    """The decay tau to use at a given update.

    Args:
        base: tau at step 0 (``moving_average_decay``), in [0, 1].
        step: number of updates already done (0 for the first update).
        total_steps: K, the number of updates over which tau rises to 1; ``None``
            keeps tau constant at ``base``.

    Returns:
        ``base`` when ``total_steps`` is None, else
        ``1 - (1 - base) * (cos(pi * min(step, K) / K) + 1) / 2``.
    """
    if total_steps is None:
        return float(base)
    progress = min(max(step, 0), total_steps) / max(total_steps, 1)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


@torch.no_grad()
def ema_update_(target: Sequence[torch.Tensor], online: Sequence[torch.Tensor], tau: float) -> None:
    """In place: ``target <- tau * target + (1 - tau) * online``, for every pair.

    One fused multi-tensor call (``torch._foreach_lerp_``) instead of a Python loop
    over the tensors: on a GPU a resnet50 is a handful of kernel launches instead of
    hundreds.

    Args:
        target: tensors updated in place (the target network's parameters).
        online: tensors of the same shapes, dtypes and devices (the online network's).
        tau: decay in [0, 1]; 1 leaves the target unchanged, 0 copies the online.

    Raises:
        ValueError: when the two lists differ in length or tau is outside [0, 1].
    """
    if len(target) != len(online):
        raise ValueError(
            f"target has {len(target)} tensors but online has {len(online)}; "
            "they must be the parameters of two copies of the same network"
        )
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    if not target or tau == 1.0:
        return
    torch._foreach_lerp_(list(target), list(online), 1.0 - tau)
