"""BatchNorm running statistics of clean images for a net that leaves BYOL training.

BYOL trains the backbone in train mode on augmented views, so every BatchNorm layer's running
mean and variance describe the views (crops, colour jitter, solarised pixels), not the images the
features will be computed on. `recalibrate_batchnorm` replaces them with the mean and variance of
each layer's inputs over a few hundred un-augmented images: a forward pass in train mode without
gradients, nothing else changed. Where it helps is measured per backbone in benchmarks/results/robustness.md.

`freeze_batchnorm_statistics` is the other way out: the backbone's BatchNorm layers stay in eval
mode through training, normalising with the statistics they have (a freshly built net's: mean 0,
variance 1), so nothing is learned from the views' statistics and there is nothing to re-estimate.
`byol-pytorch train --backbone-bn frozen` does it to the backbone; where that gains and where it
loses is measured in the README ("A recipe for the backbone").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, SupportsIndex

import torch
import torch.nn as nn
from torch import Tensor

from ._discovery import infer_channels
from ._modules import deepcopy_module, module_device_dtype, saved_modes, whole_number

__all__ = [
    "FrozenStatistics",
    "batchnorm_layers",
    "batchnorm_state",
    "clean_statistics",
    "convert_sync_batchnorm",
    "freeze_batchnorm_statistics",
    "load_batchnorm_state",
    "recalibrate_batchnorm",
]


class FrozenStatistics(nn.Module):
    """Marks a BatchNorm layer frozen by ``freeze_batchnorm_statistics``: ``train()`` always sets eval mode.

    Mixed in before the layer's own class (``FrozenStatisticsBatchNorm2d``), so the layer keeps its
    class's forward, state-dict keys and ``isinstance`` checks.
    """

    def train(self, mode: bool = True) -> FrozenStatistics:
        return super().train(False)

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        """Pickled as its own class rebuilt from the layer's class (``torch.save(model)``, spawned processes)."""
        reduced = super().__reduce_ex__(protocol)
        assert isinstance(reduced, tuple)  # object's reduction of an instance: (constructor, args, state, ...)
        rest = reduced[2:]
        own = next(c for c in type(self).__mro__[1:] if not issubclass(c, FrozenStatistics))
        return (_new_frozen, (own,), *rest)


_FROZEN_CLASSES: dict[type, type] = {}


def _new_frozen(cls: type) -> nn.Module:
    """An empty frozen layer of class ``cls`` for unpickling (its state is set after)."""
    return object.__new__(_frozen_class(cls))


def _frozen_class(cls: type) -> type:
    """``FrozenStatistics`` + ``cls``, made once per class.

    It reports ``cls``'s module as its own, so that tools which treat ``torch.nn`` layers as leaves
    (``torch.fx``, torchvision's ``create_feature_extractor``) still do; pickling goes through
    ``__reduce_ex__``, which names ``cls`` itself.
    """
    if cls not in _FROZEN_CLASSES:
        name = f"FrozenStatistics{cls.__name__}"
        _FROZEN_CLASSES[cls] = type(name, (FrozenStatistics, cls), {"__module__": cls.__module__})
    return _FROZEN_CLASSES[cls]


def _freeze(m: nn.Module) -> None:
    """Make one BatchNorm layer frozen (its class swapped once) and put it in eval mode."""
    if not isinstance(m, FrozenStatistics):
        m.__class__ = _frozen_class(type(m))
    m.eval()


def batchnorm_layers(net: nn.Module, frozen: bool = True) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of `net` (1d, 2d, 3d, SyncBatchNorm, lazy ones) that keep running statistics.

    ``frozen=False`` leaves out those ``freeze_batchnorm_statistics`` froze (their statistics never change).
    A ``net`` that is not an ``nn.Module`` is a ``TypeError`` (this module's functions all start here).
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"expected the net as a torch.nn.Module, got {type(net).__name__}")
    return [
        m
        for m in net.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.track_running_stats
        and m.running_mean is not None
        and (frozen or not isinstance(m, FrozenStatistics))
    ]


def freeze_batchnorm_statistics(net: nn.Module) -> int:
    """Keep every BatchNorm layer of ``net`` in eval mode from now on, whatever ``train()`` asks.

    Each layer then normalises with the running statistics it holds (a freshly built net's: mean 0
    and variance 1, so the layer is its affine transform alone) and never updates them; its weight
    and bias still train. The layer's class becomes a subclass of its own (``FrozenStatistics``
    first), so a learner's ``train()``, ``copy.deepcopy`` (BYOL's target network) and a state dict
    round trip keep it, and ``recalibrate_batchnorm`` leaves it alone. Call it on the backbone
    before BYOL wraps it: the heads' BatchNorm is not the backbone's and keeps training. PyTorch's
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` rebuilds the layers without it: convert first, or
    with ``convert_sync_batchnorm`` here (``BYOLTrainer`` and ``byol-pytorch train`` do).

    Args:
        net: the backbone (any module).

    Returns:
        The number of BatchNorm layers frozen (0 for a net without BatchNorm; a second call
        freezes nothing new and returns the same count).

    Raises:
        ValueError: a lazy BatchNorm layer not initialised yet (run one forward pass first).

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        >>> freeze_batchnorm_statistics(net), net.train().training, net[1].training
        (1, True, False)
        >>> isinstance(net[1], nn.BatchNorm2d), sorted(net[1].state_dict())
        (True, ['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight'])
    """
    layers = batchnorm_layers(net)
    _refuse_lazy(layers, "freeze_batchnorm_statistics", " (their first forward would replace the frozen class)")
    for m in layers:
        _freeze(m)
    return len(layers)


def _refuse_lazy(layers: list[nn.modules.batchnorm._BatchNorm], caller: str, why: str = "") -> None:
    lazy = [m for m in layers if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()]
    if lazy:
        raise ValueError(
            f"{len(lazy)} lazy BatchNorm layer(s) are not initialised yet{why}: run one forward pass through "
            f"the net before {caller}"
        )


def convert_sync_batchnorm(net: nn.Module) -> nn.Module:
    """``nn.SyncBatchNorm.convert_sync_batchnorm(net)`` that keeps frozen layers frozen (it rebuilds every layer).

    A frozen layer never uses batch statistics, so it has nothing to synchronise; it comes back a
    frozen ``SyncBatchNorm`` (eval mode, its running statistics) where PyTorch's conversion alone
    would give a training one.
    """
    frozen = {name for name, m in net.named_modules() if isinstance(m, FrozenStatistics)}
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    for name, m in converted.named_modules():
        if name in frozen:
            _freeze(m)
    return converted


def _stats(m: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor, Tensor]:
    """Copies of one layer's running mean, variance and batch count, in their own dtype and device.

    No float64: MPS has none, and a copy restores the values bit for bit in any dtype.
    """
    assert m.running_mean is not None and m.running_var is not None and m.num_batches_tracked is not None
    return m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()


def _restore_stats(m: nn.modules.batchnorm._BatchNorm, saved: tuple[Tensor, Tensor, Tensor]) -> None:
    assert m.running_mean is not None and m.running_var is not None and m.num_batches_tracked is not None
    mean, var, count = saved
    m.running_mean.copy_(mean)
    m.running_var.copy_(var)
    m.num_batches_tracked.copy_(count)


def _batches(images: Tensor | Iterable, batch_size: int, max_images: int | None) -> Iterable:
    """A tensor's batches (cut to ``max_images``; a one-image remainder joins the batch before it), or the iterable."""
    if type(images).__module__ == "numpy":  # its rows would be taken for batches
        raise TypeError(
            "recalibrate_batchnorm takes torch tensors: convert a numpy array with torch.from_numpy(images)"
        )
    if not isinstance(images, Tensor):
        return images
    images = images if max_images is None else images[:max_images]
    full, rest = divmod(len(images), batch_size)
    sizes = [batch_size] * full + ([rest] if rest else [])
    if rest == 1 and full:
        sizes[-2:] = [batch_size + 1]
    return images.split(sizes) if sizes else [images]


def _images_of(batch: Any) -> Tensor:
    """The images of one batch of ``recalibrate_batchnorm`` (a tensor, or the first entry of a tuple / list)."""
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if not isinstance(x, Tensor):
        raise TypeError(
            f"recalibrate_batchnorm takes batches of images as tensors or (images, ...) tuples, got a "
            f"{type(x).__name__}; pass the images alone, e.g. (batch['pixel_values'] for batch in loader)"
        )
    return x


def _forward(net: nn.Module, x: Tensor, transform: Callable[[Tensor], Tensor] | None) -> None:
    """One batch through the net; integer images that the net cannot take get a TypeError naming ``transform=``."""
    try:
        net(x)
    except (RuntimeError, ValueError) as error:  # torch's BatchNorm says a wrong rank in a ValueError
        first = str(error).splitlines()[0]
        if x.dim() == 3:  # one (C, H, W) image, or a list of them taken for a list of batches
            raise ValueError(
                f"recalibrate_batchnorm got a batch of shape {tuple(x.shape)}, which the net did not take ({first}): "
                "images come as (N, C, H, W) batches; stack single images first, torch.stack(images), or batch a "
                "dataset, make_loader(dataset, batch_size=64, shuffle=False)"
            ) from error
        if transform is None and not x.is_floating_point() and isinstance(error, RuntimeError):
            raise TypeError(
                f"the net did not take {x.dtype} images ({first}); pass transform=: "
                "BYOLAugment(image_size).normalize scales uint8 to [0, 1] and normalises them as the views were"
            ) from error
        channels = infer_channels(net)  # a convolution's complaint about the channels: the count it takes
        if transform is None and x.dim() == 4 and x.shape[1] != channels and "channels" in first:
            raise ValueError(
                f"the images have {x.shape[1]} channels and the net takes {channels} ({first}); pass "
                f"transform=lambda x: byol_pytorch.data.match_channels(x, {channels}) (normalised as the views were)"
            ) from error
        raise


class _Pooled:
    """A forward pre-hook pooling one BatchNorm layer's input statistics over every batch.

    Per channel: the count, the mean and the sum of squared deviations, merged batch by batch
    (Chan, Golub and LeVeque's pairwise update) in float32 or wider, so that batches of unequal
    size weigh by their size and the spread between batch means counts in the variance.
    """

    def __init__(self) -> None:
        self.count, self.batches = 0, 0
        self.mean: Tensor | None = None
        self.squares: Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, Tensor) or x.dim() < 2 or x.numel() == 0:
            return  # the layer's own check says what is wrong with it
        x = x.detach()
        x = x if x.dtype in (torch.float32, torch.float64) else x.float()
        dims = [0, *range(2, x.dim())]
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        count = x.numel() // max(1, x.shape[1])
        if self.mean is None or self.squares is None:
            self.mean, self.squares = mean, var * count
        else:
            total = self.count + count
            delta = mean - self.mean
            self.mean = self.mean + delta * (count / total)
            self.squares = self.squares + var * count + delta.square() * (self.count * count / total)
        self.count += count
        self.batches += 1

    def store(self, m: nn.modules.batchnorm._BatchNorm) -> None:
        """The pooled mean and unbiased variance (as BatchNorm keeps it) into ``m``'s running statistics."""
        assert m.running_mean is not None and m.running_var is not None and m.num_batches_tracked is not None
        assert self.mean is not None and self.squares is not None
        var = self.squares / max(1, self.count - 1)
        most = torch.finfo(m.running_var.dtype).max  # a float16 buffer holds no variance above 65504
        if not (torch.isfinite(self.mean).all() and torch.isfinite(var).all() and var.max() <= most):
            raise ValueError(
                "the images gave non-finite BatchNorm statistics (the net's activations overflow in "
                f"{m.running_mean.dtype}): recalibrate in float32"
            )
        m.running_mean.copy_(self.mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.fill_(self.batches)


def _forward_batches(
    net: nn.Module, batches: Iterable, transform: Callable[[Tensor], Tensor] | None, max_images: int | None
) -> tuple[int, bool]:
    """``recalibrate_batchnorm``'s pass: ``(images forwarded, whether a one-image batch was left out)``."""
    device, dtype = module_device_dtype(net)
    seen, single = 0, False
    for batch in batches:
        x = _images_of(batch)
        cut = max_images is not None and len(x) > max_images - seen
        if cut:
            x = x[: max_images - seen]  # type: ignore[operator]
        if len(x) == 0:
            continue
        if len(x) == 1:  # no variance to estimate: left out (a DataLoader's last batch, a cut)
            single = True
            if cut:
                break  # a cut to one image: every later batch would be cut to one too
            continue
        x = x.to(device)
        x = transform(x) if transform is not None else x
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError(
                f"recalibrate_batchnorm got images holding NaN or infinite values (in the batch from image {seen}): "
                "the statistics would all be NaN; pass finite images"
            )
        _forward(net, x.to(dtype) if x.is_floating_point() else x, transform)
        seen += len(x)
        if max_images is not None and seen >= max_images:
            break
    return seen, single


def _refuse_learner(net: nn.Module) -> None:
    """A BYOL learner (or a DDP wrapping one) is a TypeError: its forward is a training step on augmented views."""
    inner = getattr(net, "module", net)  # DistributedDataParallel's wrapped module
    if callable(getattr(inner, "update_moving_average", None)) and isinstance(getattr(inner, "net", None), nn.Module):
        raise TypeError(
            "recalibrate_batchnorm was given the BYOL learner, whose forward is a training step on augmented "
            "views (and whose heads hold BatchNorm layers too): pass the backbone, learner.net"
        )


def _check_counts(max_images: object, batch_size: object) -> None:
    if max_images is not None:
        whole_number("max_images", max_images, 1, " or None")
    whole_number("batch_size", batch_size, 2, " (a batch of one image has no variance)")


def recalibrate_batchnorm(
    net: nn.Module,
    images: Tensor | Iterable,
    *,
    transform: Callable[[Tensor], Tensor] | None = None,
    max_images: int | None = 512,
    batch_size: int = 256,
) -> int:
    """Set every BatchNorm layer's running statistics to those of its inputs over clean `images`.

    The images are forwarded under ``torch.no_grad()`` with the BatchNorm layers in train mode and
    every other module in eval mode (the forward the features will come from: no dropout, no random
    draw). Each layer's running mean and variance become the mean and (unbiased) variance of its
    inputs over all the images, pooled per channel: batches weigh by their size, and the spread
    between batch means counts, so the order and the batching of the images do not bias them.
    ``num_batches_tracked`` becomes the number of batches. A layer the pass never runs (an
    auxiliary head used in training only) keeps its statistics. Each process pools its own
    images: under DDP, give every rank the same images (or broadcast rank 0's statistics
    after). Weights, biases, other buffers, momenta and every submodule's train/eval flag are
    left as they were. A net without BatchNorm is not run at all.

    Args:
        net: the trained backbone (or any module holding BatchNorm layers).
        images: a (N, C, H, W) tensor, or an iterable of such batches, or of ``(batch, ...)``
            tuples / lists whose first entry is the batch (a DataLoader of a labelled dataset).
            uint8 or float, on any device: batches are moved to the net's device (and float ones to
            its dtype); uint8 goes to the net as it is unless a ``transform`` makes it the input.
        transform: applied to each batch before the net (for example ``BYOLAugment.normalize``,
            which scales uint8 to [0, 1] and normalises as the views were); None: the batch as is.
        max_images: stop after this many images (the last batch is cut); None: all of them.
        batch_size: batches cut from a tensor `images` (an iterable keeps its own); a
            one-image remainder of a tensor joins the batch before it.

    Returns:
        The number of images the statistics were computed over (0 for a net without BatchNorm, or
        whose BatchNorm layers are all frozen).

    Raises:
        ValueError: `images` holds no image, or only batches of one image (no variance to
            estimate; a one-image batch among larger ones is left out), a NaN or infinite pixel,
            a batch of one (C, H, W) image that the net does not take, an uninitialised lazy
            BatchNorm layer, or `max_images` below 1 or `batch_size` below 2.
        TypeError: a batch that is no tensor (nor a tuple / list starting with one), integer
            images that the net cannot take without a ``transform``, `max_images` or
            `batch_size` not a whole number, or a BYOL learner given as `net` (pass
            ``learner.net``).

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        >>> recalibrate_batchnorm(net, torch.rand(20, 3, 8, 8), batch_size=8)
        20
        >>> net[1].num_batches_tracked.item(), net.training
        (3, True)
    """
    _check_counts(max_images, batch_size)
    layers = batchnorm_layers(net, frozen=False)
    _refuse_learner(net)
    if not layers:
        return 0
    _refuse_lazy(layers, "recalibrate_batchnorm")
    saved = [_stats(m) for m in layers]
    pooled = [_Pooled() for _ in layers]
    hooks = [m.register_forward_pre_hook(p, with_kwargs=True) for m, p in zip(layers, pooled)]
    try:
        with torch.no_grad(), saved_modes(net):  # eval mode: no dropout, no drop-path, no random draw
            for m in layers:
                m.train()  # only the BatchNorm layers normalise with their batch's statistics
            seen, single = _forward_batches(net, _batches(images, batch_size, max_images), transform, max_images)
        if seen == 0 and single:
            raise ValueError("a batch of one image has no variance: use batches of two or more images")
        if seen == 0:
            raise ValueError("recalibrate_batchnorm got no images: pass a non-empty tensor or iterable of batches")
        with torch.no_grad():
            for m, p, before in zip(layers, pooled, saved):
                _restore_stats(m, before)  # the pass's own updates undone; a layer it never ran keeps its own
                if p.batches:
                    p.store(m)
    except BaseException:
        for m, before in zip(layers, saved):  # a failed pass leaves the statistics as they were
            _restore_stats(m, before)
        raise
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def batchnorm_state(net: nn.Module) -> dict[str, Tensor]:
    """The running statistics of every BatchNorm layer of ``net`` (copies), by state-dict name.

    Examples:
        >>> sorted(batchnorm_state(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))))
        ['1.num_batches_tracked', '1.running_mean', '1.running_var']
    """
    names = {id(m): name for name, m in net.named_modules()}
    out: dict[str, Tensor] = {}
    for m in batchnorm_layers(net):
        prefix = names[id(m)] + "." if names[id(m)] else ""
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            value = getattr(m, key)
            if value is not None:
                out[prefix + key] = value.detach().clone()
    return out


def load_batchnorm_state(net: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy running statistics saved by ``batchnorm_state`` back into ``net`` (in place).

    Raises:
        ValueError: ``state`` does not fit the net's BatchNorm layers (other names or shapes).
    """
    current = batchnorm_state(net)
    if current.keys() != state.keys() or any(current[k].shape != state[k].shape for k in state):
        raise ValueError(
            f"the BatchNorm statistics do not fit this net ({len(state)} saved tensors, {len(current)} in the net); "
            "they were saved from another model"
        )
    buffers = dict(net.named_buffers())
    with torch.no_grad():
        for key, value in state.items():
            buffers[key].copy_(value)


class _AnyBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over inputs of any rank, as SyncBatchNorm takes them."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")


def _plain_copy(net: nn.Module) -> nn.Module:
    """A deep copy whose SyncBatchNorm layers are plain BatchNorm: recalibrating them on one rank needs no peers."""
    clone = deepcopy_module(net)
    for name, module in list(clone.named_modules()):
        if isinstance(module, nn.SyncBatchNorm) and not isinstance(module, FrozenStatistics):
            like = module.running_mean if module.running_mean is not None else module.weight
            plain = _AnyBatchNorm(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                device=None if like is None else like.device,
                dtype=None if like is None else like.dtype,
            )
            plain.load_state_dict(module.state_dict())
            plain.train(module.training)
            parent = clone.get_submodule(name.rpartition(".")[0]) if "." in name else clone
            setattr(parent, name.rpartition(".")[2], plain)
    return clone


@contextlib.contextmanager
def clean_statistics(net: nn.Module, images: Tensor | Iterable, **options: object) -> Iterator[nn.Module]:
    """Inside the block, ``net``'s BatchNorm statistics are those of clean ``images``; after it, as before.

    For what leaves training without changing the training itself: a kNN evaluation during a run,
    the statistics saved beside a checkpoint. The trained statistics are put back on exit (also
    when the block raises); weights and modes are never touched. SyncBatchNorm layers are
    re-estimated on a copy with plain BatchNorm (no collective from one rank alone) and the
    result loaded into ``net``.

    Args:
        net: the trained net.
        images, options: as ``recalibrate_batchnorm``.

    Yields:
        ``net``, with clean statistics.
    """
    saved = batchnorm_state(net)
    try:
        if any(isinstance(m, nn.SyncBatchNorm) for m in net.modules()):
            clone = _plain_copy(net)
            recalibrate_batchnorm(clone, images, **options)  # type: ignore[arg-type]
            load_batchnorm_state(net, batchnorm_state(clone))
        else:
            recalibrate_batchnorm(net, images, **options)  # type: ignore[arg-type]
        yield net
    finally:
        if saved:
            load_batchnorm_state(net, saved)
