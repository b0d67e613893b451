"""BYOL: Bootstrap Your Own Latent (Grill et al. 2020, arXiv 2006.07733) around any backbone."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ._discovery import infer_channels, probe_backbone
from ._hidden import HiddenLayer
from ._host_read import DeferredRead
from ._modules import deepcopy_module, kept_through_apply, module_device_dtype, switch
from .augment import BYOLAugment, _as_int, _image_size
from .collapse import CollapseMonitor
from .ema import cosine_tau, ema_update_
from .encoder import BackboneEncoder
from .heads import byol_mlp, simsiam_predictor, simsiam_projector
from .losses import byol_loss

__all__ = ["BYOL", "NonFiniteInputError", "nonfinite_error"]

Augment = Callable[[torch.Tensor], torch.Tensor]

# Sane bounds, checked before anything is allocated: beyond them a size is a mistake
# (e.g. 2**31) that would otherwise end in an allocation or overflow RuntimeError.
MAX_IMAGE_SIDE = 16384
MAX_CHANNELS = 4096
MAX_PROBE_ELEMENTS = 2**28  # channels * height * width of the one probe image (1 GiB in fp32)
MAX_HEAD_WIDTH = 2**20
MAX_HEAD_PARAMETERS = 2**31  # projector + predictor weights (8 GiB in fp32)


def _check_int(arg: str, value: object, limit: int) -> int:
    number = _as_int(value)
    if number is None:
        raise TypeError(f"{arg} must be an int, got {type(value).__name__} {value!r}")
    value = number
    if not 0 < value <= limit:
        raise ValueError(f"{arg} must be in [1, {limit}], got {value}; pass a sensible size")
    return value


def _pair(image_size: int | Sequence[int]) -> tuple[int, int]:
    size = _image_size(image_size)
    if max(size) > MAX_IMAGE_SIDE:
        raise ValueError(
            f"image_size must be at most {MAX_IMAGE_SIDE} per side, got {image_size!r}; pass a smaller size"
        )
    return size


def _check_arguments(
    projection_size: object,
    projection_hidden_size: object,
    moving_average_decay: object,
    moving_average_total_steps: object,
    token_pool: object,
    views_in_one_batch: object,
    sync_batchnorm: object,
    augments: dict[str, object],
    image_size: tuple[int, int],
) -> None:
    """The constructor's argument checks that need no network (see ``BYOL`` for the errors)."""
    _check_int("projection_size", projection_size, MAX_HEAD_WIDTH)
    _check_int("projection_hidden_size", projection_hidden_size, MAX_HEAD_WIDTH)
    try:
        decay = float(moving_average_decay)  # type: ignore[arg-type]  # anything float() takes
    except (TypeError, ValueError, RuntimeError):
        decay = None
    if decay is None or isinstance(moving_average_decay, (bool, str)):
        raise TypeError(f"moving_average_decay must be a float, got {type(moving_average_decay).__name__}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"moving_average_decay must be in [0, 1] (paper: 0.99-0.996), got {moving_average_decay}")
    if moving_average_total_steps is not None:
        _check_int("moving_average_total_steps", moving_average_total_steps, 2**62)
    if not isinstance(token_pool, str) or token_pool not in ("mean", "cls"):
        raise ValueError(f"token_pool must be 'mean' or 'cls', got {token_pool!r}")
    switch("views_in_one_batch", views_in_one_batch)
    if not (sync_batchnorm is None or isinstance(sync_batchnorm, bool)):  # (1 == True: not a membership test)
        raise TypeError(f"sync_batchnorm must be None, True or False, got {sync_batchnorm!r}")
    for arg, fn in augments.items():
        if fn is not None and not callable(fn):
            raise TypeError(f"{arg} must be callable (e.g. an nn.Module), got {type(fn).__name__}")
        if isinstance(fn, BYOLAugment) and tuple(fn.size) != tuple(image_size):
            raise ValueError(
                f"{arg} makes {fn.size[0]}x{fn.size[1]} views but image_size is {image_size[0]}x{image_size[1]}, the "
                f"size the net is probed at and trained on: build BYOLAugment({image_size[0]}, ...), or pass "
                f"image_size={fn.size[0] if fn.size[0] == fn.size[1] else tuple(fn.size)}"
            )


def _check_net(net: object, **switches: object) -> None:
    """``net`` is a module whose layers all exist, and the switches are booleans (TypeError / ValueError)."""
    if not isinstance(net, nn.Module):
        raise TypeError(f"net must be a torch.nn.Module (the backbone to train), got {type(net).__name__}")
    if isinstance(getattr(net, "_orig_mod", None), nn.Module):  # torch.compile(net): an OptimizedModule
        raise TypeError(
            f"net is torch.compile()'d ({type(net).__name__}), and BYOL hooks a layer inside it, which the compiled "
            "wrapper cannot trace: pass the net itself (net._orig_mod) and compile the learner, "
            "torch.compile(learner) after learner.init_target(), or compile the net in place with net.compile()"
        )
    if isinstance(net, torch.jit.ScriptModule):
        raise TypeError(
            f"net is a TorchScript module ({type(net).__name__}), and BYOL hooks a layer inside it, which TorchScript "
            "does not allow: pass the eager nn.Module (before torch.jit.script) and script it after training"
        )
    for flag, value in switches.items():
        switch(flag, value)
    lazy = [name for name, p in net.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise ValueError(
            f"the net has lazy layers not yet built ({', '.join(lazy[:3])}): run one forward pass first, "
            "net(torch.zeros(2, C, H, W)), so that their weights exist before BYOL copies and trains them"
        )


def _save_waiting_target(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """A state-dict post hook: a checkpoint's target that waits for the first step is saved again, last, where
    the target network's tensors would be."""
    saved = getattr(module, "_saved_target", None)
    if getattr(module, "target_encoder", None) is None and saved is not None:
        for name, value in saved.items():
            state_dict[prefix + "target_encoder." + name] = value


def _storage_marks(tensors: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """Each tensor's storage address and in-place version: they change when anything but our copy writes it."""
    return [(t.data_ptr(), t._version) for t in tensors]


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class NonFiniteInputError(FloatingPointError):
    """The non-finite step's cause was NaN/Inf in its input batch (the data, not the training)."""


def nonfinite_error(loss_finite: bool, input_finite: bool = True) -> FloatingPointError:
    """The error for a training step whose loss (or input) was not finite: the one wording for every loop.

    Args:
        loss_finite: the step's loss was finite.
        input_finite: its input batch was finite.
    """
    if not input_finite:
        return NonFiniteInputError(
            "a training batch contained NaN or Inf values (the loss turned non-finite); check the data pipeline"
        )
    if loss_finite:
        raise ValueError("nonfinite_error needs a non-finite loss or input")
    return FloatingPointError(
        "the BYOL loss turned non-finite (NaN/Inf) although the input was finite: training "
        "diverged; lower the learning rate, add warm-up, or use bf16 instead of fp16"
    )


# A bicubic resize of [0, 1] images overshoots by up to ~0.15; 0-255 floats and normalised
# images (ImageNet's: about -2.1 to 2.6) lie far outside.
_RANGE_SLACK = 0.25


def _copy_outside_compiled_graphs() -> None:
    """``BYOL.init_target`` under ``torch.compiler.disable`` (the deep copy is no graph), applied when the first
    learner is made or unpickled rather than at import: the decorator imports ``torch._dynamo``, about 2 s
    that ``import byol_pytorch`` and every ``byol-pytorch`` command (``--help`` too) paid before."""
    if not getattr(BYOL.init_target, "_torchdynamo_disable", False):
        BYOL.init_target = torch.compiler.disable(BYOL.init_target)  # type: ignore[method-assign]


class BYOL(nn.Module):
    """Wrap a backbone into a BYOL learner; ``learner(images)`` returns the loss.

    The user's ``net`` is trained in place: after training, save ``net.state_dict()``.

    Args:
        net: any image backbone (timm, torchvision, or a plain ``nn.Module``).
        image_size: side (or (height, width)) of the augmented views fed to the net.
        hidden_layer: the representation: a module name (``"avgpool"``) or the module
            itself (``net.avgpool``), an index into the net's direct children (``-2``),
            ``-1`` for the net's output, or
            ``"auto"``: the input of the final classifier Linear(s), else the net's output
            (of a mapping / ``transformers`` output: ``pooler_output``, else
            ``last_hidden_state``, else its first tensor); see ``byol_pytorch.encoder``.
        projection_size: projector output width (paper: 256).
        projection_hidden_size: hidden width of projector and predictor (paper: 4096).
        augment_fn: view 1 augmentation, (B, C, H, W) -> (B, C, h, w); default
            ``BYOLAugment(image_size, view=1)`` (paper Table 6).
        augment_fn2: view 2 augmentation; default ``BYOLAugment(image_size, view=2)``
            when ``augment_fn`` is not given, else ``augment_fn`` again.
        moving_average_decay: tau of the target EMA (tau_base with a schedule).
        use_momentum: False gives SimSiam (Chen & He 2020): no target network, the
            stop-gradient projections of the online network are the targets, a
            three-layer projector and a bottleneck predictor (``projection_size // 4``
            wide, at least 8). The loss stays BYOL's (``2 - 2 cos``, both directions
            summed), four times SimSiam's ``-cos / 2`` pair: SimSiam's SGD recipe is a
            quarter of its rate with four times its weight decay.
        sync_batchnorm: BatchNorm of the heads synchronised across processes. None:
            automatically, at the first training step, when a process group of more
            than one CUDA process is initialised (also when Lightning or accelerate
            create it after the learner was built). True: always; False: never.
        moving_average_total_steps: K of the cosine schedule that raises tau from
            ``moving_average_decay`` to 1 over K calls of ``update_moving_average()``
            (paper Sec. 3.2); None keeps tau constant.
        token_pool: pooling of a (B, N, D) token output: ``"mean"`` or ``"cls"``.
        use_batchnorm: BatchNorm1d in the heads (paper); False uses LayerNorm, with no
            batch statistics.
        channels: input channels; by default those of the first convolution.
        views_in_one_batch: forward both views as one batch of 2B (one pass of the
            online network and one of the target, instead of one per view). Faster
            where per-call overhead dominates (CPU threads, small batches); BatchNorm
            statistics are then taken over both views together (as lucidrains/byol-pytorch
            does) instead of per view (the paper's official code). Off by default.
        input_name: call the net as ``net(**{input_name: images})``. None: detected
            from ``net.forward``'s signature (``pixel_values`` for Hugging Face models, or
            the first keyword of a keyword-only forward), else ``net(images)``.
        collapse_alarm: measure the spread of the online projections every training
            step (on the device, no host sync) and warn with a ``CollapseWarning`` when
            they collapse to one vector (``byol_pytorch.collapse``); the figures are in
            ``learner.collapse_monitor.status()``. False: no monitor (``None``).

    Raises:
        TypeError: ``net`` is not an ``nn.Module``, or an argument has the wrong type.
        ValueError: a bad size or decay, a size above its sane bound (``MAX_IMAGE_SIDE``,
            ``MAX_CHANNELS``, ``MAX_PROBE_ELEMENTS``, ``MAX_HEAD_WIDTH``,
            ``MAX_HEAD_PARAMETERS``), a hidden layer that cannot be found, or a
            ``BYOLAugment`` given as ``augment_fn`` / ``augment_fn2`` whose size is not
            ``image_size``.
    """

    target_encoder: BackboneEncoder | None
    collapse_monitor: CollapseMonitor | None
    ema_step: torch.Tensor
    _finite: torch.Tensor

    def __init__(
        self,
        net: nn.Module,
        image_size: int | tuple[int, int],
        hidden_layer: HiddenLayer = "auto",
        projection_size: int = 256,
        projection_hidden_size: int = 4096,
        augment_fn: Augment | None = None,
        augment_fn2: Augment | None = None,
        moving_average_decay: float = 0.99,
        use_momentum: bool = True,
        sync_batchnorm: bool | None = None,
        *,
        moving_average_total_steps: int | None = None,
        token_pool: str = "mean",
        use_batchnorm: bool = True,
        channels: int | None = None,
        views_in_one_batch: bool = False,
        input_name: str | None = None,
        collapse_alarm: bool = True,
    ):
        super().__init__()
        _copy_outside_compiled_graphs()
        _check_net(net, use_momentum=use_momentum, use_batchnorm=use_batchnorm, collapse_alarm=collapse_alarm)
        self.image_size = _pair(image_size)
        _check_arguments(
            projection_size,
            projection_hidden_size,
            moving_average_decay,
            moving_average_total_steps,
            token_pool,
            views_in_one_batch,
            sync_batchnorm,
            {"augment_fn": augment_fn, "augment_fn2": augment_fn2},
            self.image_size,
        )
        self.channels = _check_int("channels", channels, MAX_CHANNELS) if channels is not None else infer_channels(net)
        if self.channels * self.image_size[0] * self.image_size[1] > MAX_PROBE_ELEMENTS:
            raise ValueError(
                f"channels x height x width = {self.channels} x {self.image_size[0]} x {self.image_size[1]} is above "
                f"{MAX_PROBE_ELEMENTS} values per image; pass a smaller image_size or fewer channels"
            )

        probe = probe_backbone(
            net, self.image_size, self.channels, hidden_layer, token_pool, input_name, need_copy=use_momentum
        )
        dim = probe.dim
        head_parameters = projection_hidden_size * (dim + 3 * projection_size)
        if head_parameters > MAX_HEAD_PARAMETERS:
            raise ValueError(
                f"projector and predictor would hold about {head_parameters} weights (representation {dim}, "
                f"projection_hidden_size {projection_hidden_size}, projection_size {projection_size}), above "
                f"{MAX_HEAD_PARAMETERS}; pass smaller head sizes (paper: 4096 and 256)"
            )
        if use_momentum:
            projector = byol_mlp(dim, projection_hidden_size, projection_size, use_batchnorm)
            predictor = byol_mlp(projection_size, projection_hidden_size, projection_size, use_batchnorm)
        else:
            projector = simsiam_projector(dim, projection_hidden_size, projection_size, use_batchnorm)
            predictor = simsiam_predictor(projection_size, use_batchnorm)
        if sync_batchnorm:
            projector = nn.SyncBatchNorm.convert_sync_batchnorm(projector)
            predictor = nn.SyncBatchNorm.convert_sync_batchnorm(predictor)
        device, dtype = module_device_dtype(net)  # heads in the net's dtype: a bfloat16 or float64 net
        self.online_encoder = BackboneEncoder.from_probe(net, probe, projector.to(device, dtype), token_pool)
        self.online_predictor = predictor.to(device, dtype)
        self.register_module("target_encoder", None)
        self._saved_target: dict[str, torch.Tensor] | None = None  # a checkpoint's, for init_target() to copy in
        self.register_state_dict_post_hook(_save_waiting_target)

        if augment_fn is None:
            colour: dict[str, Any] = (
                {} if self.channels in (1, 3) else {"saturation": 0.0, "hue": 0.0, "grayscale_p": 0.0}
            )
            augment_fn = BYOLAugment(self.image_size, view=1, **colour)
            augment_fn2 = augment_fn2 if augment_fn2 is not None else BYOLAugment(self.image_size, view=2, **colour)
        self.augment1, self.augment2 = augment_fn, (augment_fn2 if augment_fn2 is not None else augment_fn)

        self.use_momentum = bool(use_momentum)
        self.moving_average_decay = float(moving_average_decay)
        self.moving_average_total_steps = moving_average_total_steps
        self.sync_batchnorm = sync_batchnorm
        self.views_in_one_batch = views_in_one_batch
        self.hidden_layer = probe.name  # with hidden_layer_is_input: the input of that layer
        self.hidden_layer_is_input = probe.use_input
        self.representation_size = dim
        self.unused_parameter_names: list[str] = [f"online_encoder.net.{n}" for n in probe.unused]
        self._extra_ddp_ignore: list[str] = []
        # Buffers on the net's device from the start: BYOL(net.to(device)) needs no learner.to(device).
        self.register_buffer("ema_step", torch.zeros((), dtype=torch.long, device=device))
        self._ema_count, self._trained_since_update = 0, False  # ema_step on the host (no sync); _warn_repeated_update
        # Deferred non-finite detection: [loss finite, input finite] of the last step, read without blocking.
        self.register_buffer("_finite", torch.ones(2, dtype=torch.bool, device=device), persistent=False)
        self._ema_master: list[torch.Tensor] | None = None  # float32 copy of a low-precision target
        self._layout_probe = tuple([p for p in net.parameters() if p.dim() == 4][:1])  # a conv weight: channels_last?
        self._finite_reader = DeferredRead()
        self._range_checked, self._range_warned = False, False  # input range: once on accelerators, each CPU step
        self._mode_warned = False  # a net left in eval mode while the learner trains: said once
        self.finite_check = True  # update_moving_average() raises on an earlier non-finite step
        monitor = CollapseMonitor(projection_size).to(device) if collapse_alarm else None
        self.register_module("collapse_monitor", monitor)

    # ------------------------------------------------------------------ properties
    @property
    def net(self) -> nn.Module:
        """The user's backbone (trained in place)."""
        return self.online_encoder.net

    def remove_hooks(self) -> None:
        """Take BYOL's hidden-layer hook off the net (and off its copy, the target), once training is done.

        The hook stays on the net otherwise: ``torch.save(net)`` then needs byol_pytorch to load, and
        wrapping the same net again (a notebook cell run twice) adds a second one. Save the net's
        ``state_dict()`` and nothing of this matters; this is for keeping the module itself. The
        learner cannot train or embed afterwards (a ``RuntimeError`` says so).
        """
        for encoder in (self.online_encoder, self.target_encoder):
            if encoder is not None:
                encoder.remove_hook()

    @property
    def current_decay(self) -> float:
        """The tau the next ``update_moving_average()`` call will use."""
        return cosine_tau(self.moving_average_decay, self._ema_count, self.moving_average_total_steps)

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        # Read by DistributedDataParallel when it wraps this module: the classifier
        # after the hidden layer gets no gradient, and the target network is averaged
        # (identically on every rank) rather than reduced; its BatchNorm statistics
        # stay per rank, as in the paper.
        names = list(self.unused_parameter_names) + list(self._extra_ddp_ignore) + ["_finite"]
        if self.collapse_monitor is not None:
            names += [f"collapse_monitor.{n}" for n, _ in self.collapse_monitor.named_buffers()]
        if self.target_encoder is not None:
            names += [f"target_encoder.{n}" for n, _ in self.target_encoder.named_parameters()]
            names += [f"target_encoder.{n}" for n, _ in self.target_encoder.named_buffers()]
        return names

    @_ddp_params_and_buffers_to_ignore.setter
    def _ddp_params_and_buffers_to_ignore(self, names: Sequence[str]) -> None:
        self._extra_ddp_ignore = list(names)

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        """The online network's parameters (backbone, projector, predictor), never the target's.

        The target network is created at the first training step (after ``load_state_dict``
        of a checkpoint that holds one, too: the checkpoint's target waits for that step), and
        it is trained by ``update_moving_average``, not by an optimiser: leaving it out keeps
        ``learner.parameters()`` the same list before and after it exists, so an optimiser
        state saved before it existed loads into an optimiser built after a resume. A module
        that holds the learner (a ``LightningModule``) lists the target's parameters once it
        exists, which is after its optimiser was built in a run and in its resume alike. The
        target's tensors are in ``state_dict()`` and move with ``.to()``;
        ``learner.target_encoder.parameters()`` lists them.
        """
        skip = prefix + ("." if prefix else "") + "target_encoder."
        for name, param in super().named_parameters(prefix, recurse, remove_duplicate):
            if not name.startswith(skip):
                yield name, param

    def ddp_ignored_names(self, prefix: str = "") -> list[str]:
        """Names DDP should ignore, for a wrapper that holds this learner as a child.

        Args:
            prefix: the learner's attribute path in the wrapped module, e.g. ``"learner."``.

        Returns:
            The parameter and buffer names of the classifier after the hidden layer and
            of the target network, with ``prefix`` in front; assign them to the wrapper's
            ``_ddp_params_and_buffers_to_ignore`` before DDP wraps it.
        """
        return [prefix + name for name in self._ddp_params_and_buffers_to_ignore]

    # ------------------------------------------------------------------ target
    def init_target(self) -> BackboneEncoder | None:
        """Create the target network now (a deep copy of the online encoder) if absent.

        The first training forward does this by itself; call it first when you wrap the
        learner in DDP or ``torch.compile`` so that the copy happens outside both. Under DDP,
        call ``broadcast_target()`` on every rank once DDP has wrapped the learner: DDP gives
        every rank rank 0's online network but leaves the target alone, so targets copied
        from nets initialised with other seeds stay different. After ``load_state_dict`` of a
        checkpoint that holds a target, the copy takes that target's weights.

        Returns:
            The target encoder (no gradients, the learner's training mode); None with
            ``use_momentum=False`` (SimSiam has no target, and no copy is made).
        """
        if self.target_encoder is None and self.use_momentum:
            # Outside inference mode: a copy made inside it (a validation loss under torch.inference_mode()
            # before the first step) holds inference tensors, which the EMA and BatchNorm cannot update later.
            with torch.inference_mode(False), torch.no_grad():
                target = deepcopy_module(self.online_encoder)
                saved = getattr(self, "_saved_target", None)  # absent in a learner pickled by 1.1
                if saved is not None:
                    target.load_state_dict(saved)  # checked and completed when it was loaded
            for p in target.parameters():
                p.requires_grad_(False)
                p.grad = None
            self.target_encoder, self._saved_target = target, None
        return self.target_encoder

    @property
    def has_target(self) -> bool:
        """A target network exists, or a loaded checkpoint's target waits for the first step (``init_target``)."""
        return self.target_encoder is not None or getattr(self, "_saved_target", None) is not None

    def _get_target_encoder(self) -> BackboneEncoder:
        # The attribute check keeps compiled graphs free of the (disabled) copy after step 1.
        target = self.target_encoder
        if target is None:
            target = self.init_target()
            assert target is not None, "SimSiam (use_momentum=False) has no target network"
        return target

    def reset_moving_average(self) -> None:
        """Drop the target network; the next training step copies it from the online one.

        The schedule's step count is kept: it measures training progress.
        """
        self.target_encoder = None
        self._saved_target = None
        self._ema_master = None

    @torch.no_grad()
    def update_moving_average(self) -> None:
        """One EMA step of the target: ``target <- tau * target + (1 - tau) * online``.

        Call it after each optimiser step. Only parameters are averaged; the target's
        BatchNorm buffers come from its own forward passes (paper). Before the first
        training step there is no target yet and the call does nothing.

        Raises:
            ValueError: with ``use_momentum=False`` (SimSiam has no target network).
            FloatingPointError: when an earlier training step on an accelerator produced
                a non-finite loss (detected without a per-step host sync). The optimiser
                step before this call has applied that step's gradients; a loop that wants
                to skip a bad step with its weights intact checks ``torch.isfinite(loss)``
                before ``optimizer.step()`` (a host sync on accelerators; a GradScaler
                already skips fp16's overflowing steps).
        """
        if not self.use_momentum:
            raise ValueError(
                "update_moving_average() was called but use_momentum=False (SimSiam) has no "
                "target network: remove the call, or build BYOL(..., use_momentum=True)"
            )
        self._check_finite_deferred()
        if self.collapse_monitor is not None:
            self.collapse_monitor.poll()  # non-blocking, like the finite check
        if self.target_encoder is None:
            return
        self._warn_repeated_update()
        self._warn_past_total()
        tau = self.current_decay
        target, online = list(self.target_encoder.parameters()), list(self.online_encoder.parameters())
        if any(p.dtype in (torch.float16, torch.bfloat16) for p in target):
            self._ema_low_precision(target, online, tau)
        else:
            ema_update_(target, online, tau)
        self._ema_count += 1
        self.ema_step.fill_(self._ema_count)

    def _warn_net_in_eval(self, compiling: bool) -> None:
        """Once: the learner trains while its net is in eval mode (its BatchNorm statistics would not train)."""
        if not self.training or self.net.training or getattr(self, "_mode_warned", False) or compiling:
            return
        self._mode_warned = True
        warnings.warn(
            "the learner trains but its net is in eval mode (net.eval() was called, or it came from "
            "from_pretrained(), which returns models in eval mode): its BatchNorm statistics and dropout do "
            "not train; call learner.train() before training",
            UserWarning,
            stacklevel=5,  # this, forward, Module._call_impl, Module._wrapped_call_impl, the caller
        )

    def _warn_repeated_update(self) -> None:
        """An EMA step with no training forward since the last one (called twice per step) gets one warning.

        ``_trained_since_update`` is set by each training forward and cleared here.
        """
        if not getattr(self, "_trained_since_update", True) and not getattr(self, "_update_warned", False):
            self._update_warned = True
            warnings.warn(
                "update_moving_average() was called again with no training forward since the last call: the "
                f"target moves again and the EMA schedule counts another step (now {self._ema_count + 1}); call it "
                "once per optimiser step",
                UserWarning,
                stacklevel=4,  # this, update_moving_average, torch.no_grad's wrapper, the caller
            )
        self._trained_since_update = False

    def _warn_past_total(self) -> None:
        """One warning per schedule: an update past ``moving_average_total_steps`` has tau 1, the target stays."""
        total = self.moving_average_total_steps
        if total is None or self._ema_count < total or getattr(self, "_past_total_warned", None) == total:
            return
        self._past_total_warned = total
        warnings.warn(
            f"update_moving_average() call {self._ema_count + 1} is past moving_average_total_steps={total}: tau "
            "is 1, so the target network no longer moves and BYOL trains against a fixed target; set the "
            "learner's moving_average_total_steps to the updates of the whole run (training on, or a second fit: "
            f"the {self._ema_count} done plus those to come)",
            UserWarning,
            stacklevel=4,  # this, update_moving_average, torch.no_grad's wrapper, the caller
        )

    def _ema_low_precision(self, target: Sequence[torch.Tensor], online: Sequence[torch.Tensor], tau: float) -> None:
        """The EMA of a bfloat16/float16 target in float32: a 0.004 step is below bfloat16's resolution.

        A float32 master copy of the target (not in the state dict: rebuilt from the target after
        a load or a move) takes the update; the target gets its rounded value.
        """
        master = self._ema_master
        if master is None or getattr(self, "_ema_master_of", None) != _storage_marks(target):
            master = self._ema_master = [p.detach().float() for p in target]  # the target changed outside it
        ema_update_(master, [p.detach().float() for p in online], tau)
        torch._foreach_copy_(list(target), master)
        self._ema_master_of = _storage_marks(target)  # what the target holds now: the master's rounding

    @torch.no_grad()
    def broadcast_target(self, src: int = 0) -> None:
        """Give every process rank ``src``'s target parameters (a collective; nothing without a process group).

        DDP broadcasts the online network when it wraps the learner but ignores the target
        (its parameters are averaged, not reduced): a target copied before DDP wrapped the
        learner on ranks seeded differently would differ. ``engine.prepare_model`` calls this
        right after wrapping; call it yourself when you wrap a learner whose target exists.
        """
        import torch.distributed as dist

        if self.target_encoder is None or not (dist.is_available() and dist.is_initialized()):
            return
        for p in self.target_encoder.parameters():
            dist.broadcast(p.data, src)
        self._ema_master = None

    # ------------------------------------------------------------------ checks
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"BYOL expects a tensor of images (B, C, H, W), got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(
                f"BYOL expects a 4D batch (B, C, H, W), got shape {tuple(x.shape)}; "
                "add a batch dimension with x.unsqueeze(0) or stack your images"
            )
        if x.shape[0] == 0:
            pairs = self._batch_statistics()  # BatchNorm takes batch statistics: a training batch needs 2 images
            raise ValueError(
                "BYOL got an empty batch (B = 0); pass "
                + (
                    "at least 2 images to train on (BatchNorm takes batch statistics), or at least 1 to embed "
                    "(return_embedding=True)"
                    if pairs
                    else "at least 1 image"
                )
            )
        device = next(self.online_predictor.parameters()).device
        if device.type == "meta":  # .to() cannot copy out of meta, and the heads would have no values
            raise ValueError(
                "the learner's parameters are on the meta device (shapes without values; .to() cannot copy them "
                f"out): give them memory and values with learner.to_empty(device={str(x.device)!r}) and "
                "learner.load_state_dict(a saved learner's state), or build the net on a real device"
            )
        if x.device != device:
            raise ValueError(
                f"the images are on {x.device} but the learner is on {device}: move them with "
                f"images.to({str(device)!r}), or the learner with learner.to({str(x.device)!r}) (or build it from a "
                "net already there: BYOL(net.to(device), ...))"
            )
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"BYOL got empty images (H x W = {x.shape[2]} x {x.shape[3]}); pass images with pixels")
        if x.shape[1] != self.channels:
            if self.channels == 3 and x.shape[1] == 1:
                fix = "x.expand(-1, 3, -1, -1) turns grayscale into the 3 channels the net takes"
            elif self.channels == 1 and x.shape[1] == 3:
                fix = "byol_pytorch.data.match_channels(x, 1) turns colour into the luma channel the net takes"
            elif x.ndim == 4 and x.shape[3] == self.channels:
                fix = "a batch with its channels last (B, H, W, C) needs them first: x.permute(0, 3, 1, 2)"
            else:
                fix = f"convert the images to {self.channels} channels"
            raise ValueError(
                f"BYOL expects {self.channels} channels (the net's input), got {x.shape[1]} "
                f"in a batch of shape {tuple(x.shape)}: {fix}"
            )
        if not x.is_floating_point() and x.dtype != torch.uint8:
            raise TypeError(
                f"BYOL expects float images or uint8 images, got dtype {x.dtype}; use x.float() or x.to(torch.uint8)"
            )

    def _check_finite_now(self, x: torch.Tensor) -> None:
        # On the CPU a value check costs no device sync: fail at once, with the cause.
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError(
                "the input batch contains NaN or Inf values; check the data pipeline "
                "(e.g. a division by zero in a normalisation) before training on it"
            )

    def _check_range(self, x: torch.Tensor) -> None:
        """Warn (once) when float images for the default views are outside [0, 1].

        The views clip to [0, 1]: 0-255 floats turn white and normalised ones lose their dark
        half. A warning, not an error: random test tensors (``torch.randn``, as in the incumbent's
        README) keep running. Read at every step on the CPU (free), at the first on an accelerator
        (one host read).
        """
        views = (self.augment1, self.augment2)
        if not x.is_floating_point() or not any(isinstance(a, BYOLAugment) for a in views):
            return
        self._range_checked = True
        low, high = (float(v) for v in torch.aminmax(x.detach()))
        if low < -_RANGE_SLACK or high > 1 + _RANGE_SLACK:
            self._range_warned = True
            warnings.warn(
                f"the default views take float images in [0, 1] (or uint8) and clip to [0, 1], got values in "
                f"[{low:.3g}, {high:.3g}]: divide 0-255 floats by 255, and leave out any normalisation (the views "
                "normalise after augmenting); or pass augment_fn= views of your own for another range",
                UserWarning,
                stacklevel=5,  # _check_range, forward, Module._call_impl, Module.__call__, the caller
            )

    def _check_finite_deferred(self) -> None:
        """Raise if an earlier step's flags were non-finite, without blocking on the device (``_host_read``)."""
        if not self.finite_check:
            return
        flags = self._finite_reader.poll(self._finite)
        if flags is not None and not all(flags):
            # Reported once: a loop that catches the error and skips the step goes on checking
            # the steps after it, not the same bad one again.
            self._finite.fill_(True)
            self._finite_reader.clear()
            raise nonfinite_error(*flags)

    def take_finite_flags(self) -> torch.Tensor:
        """``[loss finite, input finite]`` over the steps since the last call (a device tensor, no read), reset.

        For a training loop that checks them itself with ``finite_check=False`` (``engine.Engine``
        reads them with its loss, in one all-reduce across processes, so that every rank stops
        together); turn them into the error with ``nonfinite_error``.
        """
        flags = self._finite.clone()
        self._finite.fill_(True)
        return flags

    def resolve_sync_batchnorm(self, device: torch.device | str) -> bool:
        """With ``sync_batchnorm=None``: switch the heads to SyncBatchNorm now if a CUDA process group exists.

        The first training forward does this by itself; call it before ``torch.compile``
        (which skips it inside compiled graphs), as ``engine.prepare_model`` does.

        Args:
            device: where the learner trains.

        Returns:
            Whether the heads' BatchNorm is synchronised across processes.
        """
        if self.sync_batchnorm is not None or torch.device(device).type != "cuda" or not _is_distributed():
            return bool(self.sync_batchnorm)
        self.online_encoder.projector = nn.SyncBatchNorm.convert_sync_batchnorm(self.online_encoder.projector)
        self.online_predictor = nn.SyncBatchNorm.convert_sync_batchnorm(self.online_predictor)
        if self.target_encoder is not None:
            self.target_encoder.projector = nn.SyncBatchNorm.convert_sync_batchnorm(self.target_encoder.projector)
        self.sync_batchnorm = True
        return True

    # ------------------------------------------------------------------ forward
    def _to_float(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.is_floating_point() else x.float().div_(255)

    def _in_net_dtype(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the dtype of a net cast to float64, float16 or bfloat16; under autocast, left to autocast,
        except for a float64 net, whose weights autocast leaves alone (a float32 input would meet them in bf16)."""
        dtype = next(self.online_predictor.parameters()).dtype
        if x.dtype == dtype or (torch.is_autocast_enabled(x.device.type) and dtype != torch.float64):
            return x
        return x.to(dtype)

    def _view(self, augment: Augment, x: torch.Tensor) -> torch.Tensor:
        # Our own augmentation reads uint8 directly (cheaper: crop before converting).
        view = augment(x) if isinstance(augment, BYOLAugment) else augment(self._to_float(x))
        self._check_view(augment, view, x)
        view = self._in_net_dtype(view)  # views come out in float32
        if self._net_is_channels_last():
            view = view.contiguous(
                memory_format=torch.channels_last
            )  # the net's layout: its first conv converts nothing
        return view

    def _net_is_channels_last(self) -> bool:
        """Whether the net's first conv weight is channels_last (``learner.to(memory_format=torch.channels_last)``)."""
        weight = self._layout_probe[0] if self._layout_probe else None
        return (
            weight is not None
            and weight.is_contiguous(memory_format=torch.channels_last)
            and not weight.is_contiguous()
        )

    def _check_view(self, augment: Augment, view: object, x: torch.Tensor) -> None:
        name = "augment_fn2" if augment is self.augment2 and augment is not self.augment1 else "augment_fn"
        if not isinstance(view, torch.Tensor):
            raise TypeError(f"{name} must return a tensor (B, C, h, w), it returned {type(view).__name__}")
        if view.ndim != 4 or view.shape[0] != x.shape[0] or view.shape[1] != self.channels:
            raise ValueError(
                f"{name} must return a batch (B, C, h, w) with B = {x.shape[0]} (the input's) and C = "
                f"{self.channels} (the net's channels), it returned shape {tuple(view.shape)}"
            )
        if not view.is_floating_point() or min(view.shape[2:]) == 0:
            raise ValueError(f"{name} must return non-empty float images, it returned {view.dtype} {tuple(view.shape)}")

    def _batch_statistics(self) -> bool:
        """Whether a training pass takes BatchNorm statistics over the batch (the heads' or the net's)."""
        return any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
            for part in (self.net, self.online_encoder.projector, self.online_predictor)
            for m in part.modules()
        )

    def _embed(self, x: torch.Tensor, return_projection: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``forward``'s embedding path: no augmentation; uint8 scaled and normalised like the views."""
        if self.training and return_projection and x.shape[0] < 2 and self._batch_statistics():
            raise ValueError(
                "the projection of a single image in train mode has no BatchNorm statistics: call "
                "learner.eval() first, pass 2 or more images, or return_projection=False for the embedding"
            )
        if not x.is_floating_point():
            x = self._to_float(x)
            if isinstance(self.augment1, BYOLAugment):
                x = self.augment1.normalize(x)
        x = self._in_net_dtype(x)
        try:
            return self.online_encoder(x, return_projection=return_projection)
        except ValueError as error:
            if self.training and x.shape[0] == 1 and "Expected more than 1 value per channel" in str(error):
                raise ValueError(
                    "the embedding of a single image in train mode: a BatchNorm layer of the net has one value "
                    "per channel to take statistics over; call learner.eval() first (features are read in eval "
                    "mode), or pass 2 or more images"
                ) from error
            raise

    def forward(
        self, x: torch.Tensor, return_embedding: bool = False, return_projection: bool = True
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Training loss, or the embedding of ``x``.

        Args:
            x: (B, C, H, W) images, float in [0, 1] (any float dtype; any range with
                views of your own, ``augment_fn``, and on the embedding path) or uint8
                (scaled to [0, 1]).
            return_embedding: return ``(projection, embedding)`` of the online network
                instead of the loss, without augmentation. Float input goes to the net
                as it is (cast to the net's dtype); uint8 input is scaled to [0, 1] and
                normalised like the views.
            return_projection: with ``return_embedding``, False returns the (B, D)
                embedding alone.

        Returns:
            The scalar float32 loss (two directions summed, mean over the batch), or
            the embedding output described above.

        Warns:
            UserWarning: once, when float training input for the default views lies
                outside [0, 1] (they clip to it): read at every step on the CPU, at the
                first on an accelerator.

        Raises:
            TypeError: not a tensor, an integer dtype other than uint8, or an
                ``augment_fn`` that returns no tensor.
            ValueError: not 4D, empty (B, H or W = 0), wrong channel count, a training
                batch of one image for a net or heads that take batch statistics
                (BatchNorm), (on the CPU) NaN/Inf in the input, or an
                ``augment_fn`` result that is not (B, C, h, w) float with the input's B and
                the net's C.
        """
        self._check_input(x)
        if return_embedding:
            return self._embed(x, return_projection)

        if self.training and x.shape[0] < 2 and self._batch_statistics():
            raise ValueError(
                f"a training batch needs at least 2 images (the BatchNorm layers of the heads or the net take "
                f"their statistics over the batch), got {x.shape[0]}; increase the batch size, or, for "
                "micro-batches of one image, use_batchnorm=False and a net without BatchNorm"
            )
        compiling = torch.compiler.is_compiling()
        self._warn_net_in_eval(compiling)
        if getattr(self, "_is_replica", False):
            raise TypeError(
                "BYOL does not run under nn.DataParallel (its replicas share the hidden-layer hook and the "
                "target network); use DistributedDataParallel: torchrun --nproc_per_node=N your_script.py"
            )
        checked_now = x.device.type == "cpu" and not compiling and self.finite_check
        if checked_now:
            self._check_finite_now(x)
        if not compiling and not self._range_warned and (x.device.type == "cpu" or not self._range_checked):
            self._check_range(x)
        if not compiling:
            self.resolve_sync_batchnorm(x.device)

        if self.training:  # read by the next EMA step; written, never read here (a compiled graph guards on reads)
            self._trained_since_update = True
        # The lazy copy is made before the online net runs: the target starts from the online net's state as it was,
        # BatchNorm running statistics included, as the paper's target is initialised (not after the first updates).
        target = self._get_target_encoder() if self.use_momentum else None
        view_one = self._view(self.augment1, x)  # (B, C, h, w)
        view_two = self._view(self.augment2, x)
        if self.views_in_one_batch:
            if view_one.shape != view_two.shape:
                raise ValueError(
                    f"views_in_one_batch=True forwards both views as one batch, so they need one size; the views "
                    f"are {tuple(view_one.shape)} and {tuple(view_two.shape)}: give augment_fn and augment_fn2 one "
                    "image size, or views_in_one_batch=False"
                )
            views = torch.cat([view_one, view_two])  # (2B, C, h, w): one pass per network
            projections, _ = self.online_encoder(views)
            prediction_one, prediction_two = self.online_predictor(projections).chunk(2)
            projection_one, projection_two = projections.chunk(2)
        else:  # the paper's: each view alone, BatchNorm statistics per view
            projection_one, _ = self.online_encoder(view_one)
            projection_two, _ = self.online_encoder(view_two)
            prediction_one = self.online_predictor(projection_one)
            prediction_two = self.online_predictor(projection_two)
        if self.collapse_monitor is not None and self.training and x.shape[0] > 1:  # one image has no spread
            self.collapse_monitor.observe(projection_one, projection_two)  # device-side
            if not self.use_momentum and not compiling:
                self.collapse_monitor.poll()  # SimSiam: no update_moving_average() to read it

        if target is not None:
            with torch.no_grad():
                if self.views_in_one_batch:
                    target_one, target_two = target(views)[0].chunk(2)
                else:
                    target_one, _ = target(view_one)
                    target_two, _ = target(view_two)
        else:
            # SimSiam: the stop-gradient targets are the online projections themselves.
            target_one, target_two = projection_one.detach(), projection_two.detach()

        loss = byol_loss(prediction_one, prediction_two, target_one, target_two)
        # Recorded on the device, read back by update_moving_average() without a sync. The
        # input was already checked above when that was free (CPU, eager): no second pass.
        if checked_now or not x.is_floating_point():
            finite_input = torch.ones((), dtype=torch.bool, device=x.device)
        else:
            finite_input = torch.isfinite(x).all()
        # Sticky until read by a loop that checks them itself (``finite_check=False``): a bad step stays seen.
        self._finite.logical_and_(torch.stack([torch.isfinite(loss.detach()), finite_input]))
        return loss

    # ------------------------------------------------------------------ state
    def _check_saved_target(
        self,
        saved: dict[str, torch.Tensor],
        key: str,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> dict[str, torch.Tensor]:
        """A checkpoint's target checked now, as loading it into a copy of the online encoder would check it.

        Returns the whole target's state as a copy of the online encoder would hold it after that load,
        copied now (in the online encoder's dtype and on its device): what fits from ``saved``, the online
        encoder's own tensors for the rest (a non-strict load).
        """
        expected = self.online_encoder.state_dict()
        missing_keys += [key + name for name in expected if name not in saved]
        unexpected_keys += [key + name for name in saved if name not in expected]
        target = {}
        for name, mine in expected.items():
            value = saved.get(name, mine)
            if not isinstance(value, torch.Tensor) or value.shape != mine.shape:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                error_msgs.append(
                    f"size mismatch for {key}{name}: copying a param with shape {shape} from checkpoint, "
                    f"the shape in current model is {tuple(mine.shape)}."
                )
                value = mine
            target[name] = value.detach().to(device=mine.device, dtype=mine.dtype, copy=True)
        return target

    def __setstate__(self, state: dict) -> None:
        _copy_outside_compiled_graphs()  # a learner unpickled in a process that made none
        super().__setstate__(state)

    def _apply(self, fn, recurse=True):
        saved = getattr(self, "_saved_target", None)
        if saved is not None:  # a waiting target moves and casts with the learner (.to, .half, .cuda)
            self._saved_target = {name: fn(value) for name, value in saved.items()}
        finite = self._finite
        super()._apply(fn, recurse)
        self._finite = kept_through_apply(finite, self._finite, True)  # to_empty leaves no stale False
        return self

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A checkpoint taken after the first step holds a target network. With no target of ours
        # yet, its tensors wait for the first step (init_target) instead of making one now: a
        # module holding the learner then lists the same parameters after a resume as before the
        # first step, so its optimiser state loads (Lightning restores the weights first).
        key = prefix + "target_encoder."
        saved = {k[len(key) :]: v for k, v in state_dict.items() if k.startswith(key)}
        waits = bool(saved) and self.target_encoder is None and self.use_momentum
        if not saved:
            self.target_encoder = None  # the checkpoint predates the target: copy it again
            self._saved_target = None
        self._ema_master = None  # rebuilt from the loaded target at the next update
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if waits:
            unexpected_keys[:] = [k for k in unexpected_keys if not k.startswith(key)]
            self._saved_target = self._check_saved_target(saved, key, missing_keys, unexpected_keys, error_msgs)
        step = state_dict.get(prefix + "ema_step")
        if step is not None:
            self._ema_count = int(step)
