"""BatchNorm running statistics of clean images for a net that leaves BYOL training.

BYOL trains the backbone in train mode on augmented views, so every BatchNorm layer's running
mean and variance describe the views (crops, colour jitter, solarised pixels), not the images the
features will be computed on. `recalibrate_batchnorm` replaces them with their average over a few
hundred un-augmented images: a forward pass in train mode without gradients, nothing else
changed. Where it helps is measured per backbone in benchmarks/results/robustness.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
from torch import Tensor

from ._modules import module_device_dtype, saved_modes

__all__ = ["batchnorm_layers", "recalibrate_batchnorm"]


def batchnorm_layers(net: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of `net` (1d, 2d, 3d, SyncBatchNorm, lazy ones) that keep running statistics."""
    return [
        m
        for m in net.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


def _stats(m: nn.modules.batchnorm._BatchNorm) -> Tensor:
    """Running mean, variance and batch count of one layer, as one float64 vector (a copy to restore)."""
    assert m.running_mean is not None and m.running_var is not None and m.num_batches_tracked is not None
    return torch.cat([m.running_mean.double(), m.running_var.double(), m.num_batches_tracked.double().reshape(1)])


def _restore_stats(m: nn.modules.batchnorm._BatchNorm, saved: Tensor) -> None:
    assert m.running_mean is not None and m.running_var is not None and m.num_batches_tracked is not None
    n = m.running_mean.numel()
    m.running_mean.copy_(saved[:n])
    m.running_var.copy_(saved[n : 2 * n])
    m.num_batches_tracked.fill_(int(saved[-1]))


def _batches(images: Tensor | Iterable, batch_size: int) -> Iterable:
    if isinstance(images, Tensor):
        return images.split(batch_size)
    return images


def recalibrate_batchnorm(
    net: nn.Module,
    images: Tensor | Iterable,
    *,
    transform: Callable[[Tensor], Tensor] | None = None,
    max_images: int | None = 512,
    batch_size: int = 256,
) -> int:
    """Set every BatchNorm layer's running statistics to their average over clean `images`.

    Each BatchNorm's running mean and variance are reset and re-estimated as the plain average
    (``momentum=None``) of its batch statistics over the images, forwarded in train mode under
    ``torch.no_grad()``. Weights, biases, other buffers and every submodule's train/eval flag are
    left as they were; the momenta come back too. A net without BatchNorm is not run at all.

    Args:
        net: the trained backbone (or any module holding BatchNorm layers).
        images: a (N, C, H, W) tensor, or an iterable of such batches, or of ``(batch, ...)``
            tuples / lists whose first entry is the batch (a DataLoader of a labelled dataset).
            uint8 or float, on any device: batches are moved to the net's device and dtype.
        transform: applied to each batch before the net (for example ``BYOLAugment.normalize``,
            which scales uint8 to [0, 1] and normalises as the views were); None: the batch as is.
        max_images: stop after this many images (the last batch is cut); None: all of them.
        batch_size: batches cut from a tensor `images` (an iterable keeps its own).

    Returns:
        The number of images the statistics were averaged over (0 for a net without BatchNorm).

    Raises:
        ValueError: `images` holds no image, or a batch of one image (no variance to estimate),
            or `max_images` / `batch_size` below 1.

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        >>> recalibrate_batchnorm(net, torch.rand(20, 3, 8, 8), batch_size=8)
        20
        >>> net[1].num_batches_tracked.item(), net.training
        (3, True)
    """
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be at least 1 or None, got {max_images!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
    layers = batchnorm_layers(net)
    if not layers:
        return 0
    momenta = [m.momentum for m in layers]
    saved = [_stats(m).clone() for m in layers]
    device, dtype = module_device_dtype(net)
    seen = 0
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
        with torch.no_grad(), saved_modes(net, eval_mode=False):
            for m in layers:
                m.train()  # only the BatchNorm layers: dropout and the like stay as they were
            for batch in _batches(images, batch_size):
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                if max_images is not None:
                    x = x[: max_images - seen]
                if len(x) == 1:
                    raise ValueError("a batch of one image has no variance: use batches of two or more images")
                x = x.to(device)
                x = transform(x) if transform is not None else x
                net(x.to(dtype) if x.is_floating_point() else x)
                seen += len(x)
                if max_images is not None and seen >= max_images:
                    break
        if seen == 0:
            raise ValueError("recalibrate_batchnorm got no images: pass a non-empty tensor or iterable of batches")
    except BaseException:
        for m, before in zip(layers, saved):  # a failed pass leaves the statistics as they were
            _restore_stats(m, before)
        raise
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
    return seen
