"""Optimisation as in BYOL: LARS, no decay on biases and norms, warm-up then cosine lr.

Grill et al. 2020 (arXiv 2006.07733), Appendix C: LARS (You et al. 2017) with momentum
0.9 and trust coefficient 1e-3; biases and batch-norm parameters are excluded from the
weight decay and from the LARS adaptation; the learning rate is ``0.2 x batch / 256``,
warmed up linearly over 10 epochs, then decayed with a cosine schedule.

Everything here is a pure function or a plain ``torch.optim.Optimizer``: the training
command composes them, and they are tested alone against hand-computed values.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR

from .recipe import Recipe

__all__ = [
    "LARS",
    "OPTIMIZERS",
    "add_optimizer_flags",
    "build_optimizer",
    "build_recipe_optimizer",
    "default_lr",
    "default_weight_decay",
    "optimizer_settings",
    "param_groups",
    "resync_lr",
    "warmup_cosine",
    "warmup_cosine_scheduler",
]

# The recipes behind the per-optimiser defaults: lr per 256 images and weight decay.
OPTIMIZERS: dict[str, dict[str, Any]] = {
    # Grill et al. 2020, Appendix C: lr 0.2 x batch/256, weight decay 1.5e-6 (1000 epochs).
    "lars": {"lr_per_256": 0.2, "weight_decay": 1.5e-6, "source": "BYOL paper, App. C"},
    # Caron et al. 2021 (DINO), ViT recipe: lr 5e-4 x batch/256, weight decay 0.04.
    "adamw": {"lr_per_256": 5e-4, "weight_decay": 0.04, "source": "DINO's ViT recipe"},
    # Chen & He 2021 (SimSiam), Sec. 4: SGD momentum 0.9, lr 0.05 x batch/256, wd 1e-4.
    "sgd": {"lr_per_256": 0.05, "weight_decay": 1e-4, "source": "SimSiam paper, Sec. 4"},
}


def _trust_ratios(params: list[torch.Tensor], grads: list[torch.Tensor], group: dict[str, Any]) -> list[torch.Tensor]:
    """Every layer's trust ratio ``eta ||p|| / ||g||`` (1 where a norm is 0), computed for all layers at once.

    The norms of all tensors are stacked into one vector per device and dtype, so the ratio,
    its clip and the zero-norm guard are a few kernels for the whole group instead of several
    per weight (a ResNet-50 has 160); the results are 0-dim views, one per parameter.
    """
    eta, clip = group["trust_coefficient"], group.get("clip_lr", False)
    if clip:  # min(eta ||p|| / ||g|| / lr, 1); at lr 0, 1
        eta = eta / group["lr"] if group["lr"] > 0 else math.inf
    ratios: list[torch.Tensor] = [torch.empty(0)] * len(params)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype), []).append(i)
    for indices in groups.values():
        param_norms = torch.stack(torch._foreach_norm([params[i] for i in indices]))  # (n,)
        grad_norms = torch.stack(torch._foreach_norm([grads[i] for i in indices]))
        ratio = eta * param_norms / grad_norms
        if clip:
            ratio = ratio.clamp(max=1.0)
        trust = torch.where((param_norms > 0) & (grad_norms > 0), ratio, torch.ones_like(ratio))
        for i, value in zip(indices, trust.unbind(0)):
            ratios[i] = value
    return ratios


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017).

    For each parameter ``p`` with gradient ``g`` in a group that is not excluded::

        g <- g + weight_decay * p
        g <- g * trust_coefficient * ||p|| / ||g||      (only when both norms are > 0)
        v <- momentum * v + g
        p <- p - lr * v

    A group with ``lars_exclude=True`` (biases and norm parameters, see ``param_groups``)
    skips the first two lines: plain SGD with momentum and no weight decay, as in the
    paper. The multi-tensor ``torch._foreach_*`` ops and one vector of trust ratios per group
    keep a ResNet-50 step to a few dozen kernel launches, and nothing is read back to the host.

    Args:
        params: parameters or parameter groups (dicts; ``lars_exclude`` is a group key).
        lr: learning rate.
        momentum: momentum (paper: 0.9).
        weight_decay: L2 weight decay added to the gradient before the adaptation.
        trust_coefficient: eta of the trust ratio (paper: 1e-3).
        clip_lr: cap the trust ratio at 1 / lr, so that a layer's step is
            ``min(trust_coefficient * ||p|| / ||g||, lr) * v`` per unit of gradient
            (LARC's clipping, solo-learn's ``clip_lars_lr``; default off, as the paper).

    Raises:
        ValueError: a negative lr, momentum, weight decay or trust coefficient.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3,
        clip_lr: bool = False,
    ):
        for name, value in (
            ("lr", lr),
            ("momentum", momentum),
            ("weight_decay", weight_decay),
            ("trust_coefficient", trust_coefficient),
        ):
            if not value >= 0.0:
                raise ValueError(f"LARS {name} must be >= 0, got {value}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            clip_lr=bool(clip_lr),
            lars_exclude=False,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - documented in the class
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads: Any = [p.grad for p in params]
            if not group["lars_exclude"]:
                if group["weight_decay"] != 0:
                    grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                grads = torch._foreach_mul(grads, _trust_ratios(params, grads, group))
            buffers = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buffers.append(state["momentum_buffer"])
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, grads)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed group and an excluded one.

    Biases and normalisation parameters - every parameter with fewer than two
    dimensions - get no weight decay and no LARS adaptation (paper, App. C). Frozen
    parameters (``requires_grad=False``, e.g. BYOL's target network) are left out.

    Args:
        model: the module to optimise (e.g. the BYOL learner).
        weight_decay: the decay of the first group.

    Returns:
        ``[{"params": weights, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": biases_and_norms, "weight_decay": 0.0, "lars_exclude": True}]``, in
        ``named_parameters()`` order (empty groups are kept, so a state_dict always has
        two groups).
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": float(weight_decay), "lars_exclude": False},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]


def warmup_cosine(step: int, total: int, warmup: int, base_lr: float) -> float:
    """Learning rate for an optimizer step: linear warm-up, then cosine decay to zero.

    Args:
        step: 0-based index of the step about to be taken.
        total: total number of optimizer steps.
        warmup: warm-up steps (paper: 10 epochs' worth); 0 for none.
        base_lr: the peak learning rate.

    Returns:
        ``base_lr * (step + 1) / warmup`` during the warm-up (so no step is wasted at
        lr 0), then ``base_lr * (1 + cos(pi * (step - warmup) / (total - warmup))) / 2``;
        0 from ``total`` on.
    """
    if step >= total:
        return 0.0
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, total: int, warmup: int) -> LambdaLR:
    """A ``LambdaLR`` whose factor is ``warmup_cosine(step, total, warmup, 1.0)``.

    The factor is a plain function, so ``state_dict()`` stores only the step and base
    learning rates: a scheduler rebuilt with a new ``total`` and loaded from an old state
    follows the new total from the current step (call ``resync_lr`` after loading).

    Args:
        optimizer: its groups' current ``lr`` become the peak learning rates.
        total: total optimizer steps.
        warmup: warm-up steps.

    Returns:
        The scheduler; call ``scheduler.step()`` once after each real optimizer step.
    """

    def factor(step: int) -> float:
        return warmup_cosine(step, total, warmup, 1.0)

    return LambdaLR(optimizer, factor)


def resync_lr(scheduler: LambdaLR) -> None:
    """Set every group's lr from the scheduler's current step (after ``load_state_dict``)."""
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def build_optimizer(
    name: str,
    model: nn.Module,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    trust_coefficient: float = 1e-3,
    clip_lr: bool = False,
) -> torch.optim.Optimizer:
    """The optimiser of ``byol-pytorch train --optimizer``, on ``param_groups(model, ...)``.

    Args:
        name: ``"lars"``, ``"adamw"`` or ``"sgd"``.
        model: the module to optimise.
        lr: peak learning rate.
        weight_decay: decay of weights (never of biases and norms).
        momentum: LARS and SGD momentum (paper: 0.9).
        trust_coefficient, clip_lr: LARS only, see ``LARS``.

    Returns:
        The optimiser.

    Raises:
        ValueError: an unknown name.
    """
    groups = param_groups(model, weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, trust_coefficient=trust_coefficient, clip_lr=clip_lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def default_lr(name: str, batch_size: int) -> float:
    """The recipe's learning rate for a global batch: ``lr_per_256 * batch_size / 256``."""
    return OPTIMIZERS[name]["lr_per_256"] * batch_size / 256


def default_weight_decay(name: str) -> float:
    """The recipe's weight decay for an optimiser name (see ``OPTIMIZERS``)."""
    return OPTIMIZERS[name]["weight_decay"]


def add_optimizer_flags(
    parser: argparse.ArgumentParser, default: str = "sgd", per: str = "the images per optimizer step"
) -> None:
    """``--optimizer``, ``--lr`` and ``--weight-decay`` on an ``argparse`` parser (the examples' flags).

    ``--lr`` and ``--weight-decay`` default to None: ``optimizer_settings`` resolves them from
    ``OPTIMIZERS``, the lr scaled by ``per`` (named in the help) / 256.
    """
    parser.add_argument(
        "--optimizer",
        default=default,
        choices=sorted(OPTIMIZERS),
        help="sgd and lars: momentum 0.9 (lars: the paper's)",
    )
    rates = ", ".join(f"{name} {spec['lr_per_256']:g}" for name, spec in OPTIMIZERS.items())
    decays = ", ".join(f"{name} {spec['weight_decay']:g}" for name, spec in OPTIMIZERS.items())
    parser.add_argument(
        "--lr", type=float, default=None, help=f"default per optimizer, per 256 images ({rates}), scaled by {per}"
    )
    parser.add_argument("--weight-decay", type=float, default=None, help=f"default per optimizer ({decays})")


def optimizer_settings(args: Any, images_per_step: int) -> tuple[float, float]:
    """``(lr, weight_decay)`` of ``add_optimizer_flags``' flags: as given, else the optimiser's defaults.

    >>> from types import SimpleNamespace
    >>> optimizer_settings(SimpleNamespace(optimizer="sgd", lr=None, weight_decay=None), 64)
    (0.0125, 0.0001)
    """
    lr = args.lr if args.lr is not None else default_lr(args.optimizer, images_per_step)
    decay = args.weight_decay if args.weight_decay is not None else default_weight_decay(args.optimizer)
    return lr, decay


def build_recipe_optimizer(recipe: Recipe, learner: nn.Module) -> torch.optim.Optimizer:
    """The optimiser a run's recipe names, with its lr, weight decay and LARS settings.

    Args:
        recipe: the run's recipe (``lr`` and ``weight_decay`` resolved).
        learner: the BYOL learner whose parameters it trains.
    """
    if recipe.lr is None or recipe.weight_decay is None:
        raise ValueError("the recipe's lr and weight_decay must be resolved before the optimiser is built")
    return build_optimizer(
        recipe.optimizer,
        learner,
        recipe.lr,
        recipe.weight_decay,
        trust_coefficient=float(recipe.lars_trust),
        clip_lr=bool(recipe.lars_clip),
    )
