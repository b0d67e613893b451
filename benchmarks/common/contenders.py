"""The learners the benchmarks compare, built the way their users build them, and one training step.

* ``ours``: ``byol_pytorch.BYOL(net, image_size)``, fed the uint8 batch as it is; ``ours1b`` is
  the opt-in ``views_in_one_batch=True``;
* ``peer``: lucidrains/byol-pytorch, vanilla (see :mod:`benchmarks.common.peer`), fed the batch
  as float in [0, 1];
* ``lightly``: lightly's BYOL as its documentation writes it (:class:`LightlyBYOL`, its views
  made on the CPU by :func:`lightly_views`, one training step by :func:`lightly_step`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import timm
import torch
import torch.nn as nn

from benchmarks.common.data import Data
from benchmarks.common.peer import make_peer
from byol_pytorch import BYOL
from byol_pytorch.app.recipe import family_of

__all__ = [
    "LightlyBYOL",
    "byol_step",
    "kept_modes",
    "lightly_step",
    "lightly_views",
    "make_learner",
    "readme_loop",
    "timm_backbone",
    "unit_float",
]

Feed = Callable[[torch.Tensor], torch.Tensor]


def timm_backbone(name: str, seed: int, **kwargs: Any) -> nn.Module:
    """The timm model without classifier (its pooled features), initialised from `seed` (alike for every contender)."""
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images as float in [0, 1]: what the peer's augmentation takes."""
    return x.float().div_(255)


def make_learner(
    name: str, net: nn.Module, image_size: int, peer: ModuleType | None = None, **kwargs: Any
) -> tuple[nn.Module, Feed]:
    """The learner around `net` and how it takes a uint8 batch.

    Args:
        name: ``ours``, ``ours1b`` (ours with ``views_in_one_batch=True``) or ``peer`` (vanilla).
        net: the backbone.
        image_size: the side of the views.
        peer: the peer's module (:func:`benchmarks.common.peer.load_peer`), for ``peer``.
        **kwargs: passed on to the learner's constructor.
    """
    if name == "ours1b":
        name, kwargs = "ours", {"views_in_one_batch": True, **kwargs}
    if name == "ours":
        return BYOL(net, image_size, **kwargs), (lambda x: x)
    if name == "peer":
        return make_peer(peer, net, image_size, "vanilla", **kwargs), unit_float
    raise ValueError(f"unknown learner {name!r}: ours, ours1b or peer")


def readme_loop(optimizer: str, steps: int, backbone: str) -> dict[str, Any]:
    """``BYOL``'s keyword arguments in a loop built the README's way ("The target's moving average
    in your own loop"): the EMA told the run's length (``moving_average_total_steps``: tau rises to
    1 on the paper's cosine) and, with Adam, the paper's tau base 0.996 (with SGD the constructor's
    0.99); a ResNet under Adam keeps the constructor's EMA (tau 0.99 constant). Measured:
    benchmarks/results/robustness.md ("Where issue 21's bar stands") and quality.md.

    >>> readme_loop("adam", 200, "regnetx_002")
    {'moving_average_total_steps': 200, 'moving_average_decay': 0.996}
    >>> readme_loop("adam", 705, "resnet10t")
    {}
    >>> readme_loop("sgd", 200, "resnet10t")
    {'moving_average_total_steps': 200}
    """
    if optimizer != "adam":
        return {"moving_average_total_steps": steps}
    family = family_of(backbone)
    if family is not None and family[0] == "ResNets":
        return {}
    return {"moving_average_total_steps": steps, "moving_average_decay": 0.996}


def byol_step(
    learner: nn.Module, feed: Feed, optimizer: torch.optim.Optimizer, batch: torch.Tensor, scheduler: Any = None
) -> torch.Tensor:
    """The README's step: forward, backward, the optimizer's (and scheduler's) step, then the EMA update."""
    loss = learner(feed(batch))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    learner.update_moving_average()
    return loss


@contextlib.contextmanager
def kept_modes(module: nn.Module) -> Iterator[None]:
    """Give every submodule its train/eval flag back on exit, whatever the body set (parents first)."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            if m.training != training:
                m.train(training)


class LightlyBYOL(nn.Module):
    """lightly's BYOL model as its documentation writes it, around our backbone."""

    def __init__(self, backbone: nn.Module, dim: int) -> None:
        super().__init__()
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(dim, 4096, 256)
        self.prediction_head = BYOLPredictionHead(256, 4096, 256)
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()


def lightly_step(
    model: LightlyBYOL,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    x0: torch.Tensor,
    x1: torch.Tensor,
    m: float,
) -> torch.Tensor:
    """lightly's documented step: move both target modules to momentum ``m``, then the symmetric loss's step.

    ``criterion`` is lightly's ``NegativeCosineSimilarity``; the loss is the mean of its two directions.
    """
    from lightly.models.utils import update_momentum

    update_momentum(model.backbone, model.backbone_momentum, m=m)
    update_momentum(model.projection_head, model.projection_head_momentum, m=m)
    p0, p1 = model(x0), model(x1)
    z0, z1 = model.forward_momentum(x0), model.forward_momentum(x1)
    loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def lightly_views(data: Data, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    """Batches of two BYOLTransform views from PIL images, the way lightly's examples feed them (blur off at 32 px)."""
    from lightly.transforms.byol_transform import BYOLTransform, BYOLView1Transform, BYOLView2Transform
    from PIL import Image

    size = data.train_x.shape[-1]
    transform = BYOLTransform(
        view_1_transform=BYOLView1Transform(input_size=size, gaussian_blur=0.0),
        view_2_transform=BYOLView2Transform(input_size=size, gaussian_blur=0.0),
    )

    class Views(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(data.train_x)

        def __getitem__(self, i: int):
            image = Image.fromarray(data.train_x[i].permute(1, 2, 0).numpy())
            return transform(image)

    return torch.utils.data.DataLoader(
        Views(), batch_size=batch_size, shuffle=True, drop_last=False, generator=torch.Generator().manual_seed(seed)
    )
