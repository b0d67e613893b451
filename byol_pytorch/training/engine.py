"""The one BYOL training engine: optimizer steps, the loop around them, and its hooks.

``byol-pytorch train``, the demo and ``BYOLTrainer`` differ only in their data and
their hooks; everything a loop must get right lives here once:

* ``OptimizerStep``: ``accumulate`` micro-batches -> one optimizer step, with autocast
  and GradScaler; the lr schedule and the target EMA advance only when the optimizer
  really stepped (a GradScaler-skipped fp16 step advances nothing).
* ``Engine.run``: the loop over ``StepBatch`` es (``sampling.py``). It keeps the loss on
  the device and reads it back only at sync points (every step on the CPU, every
  ``check_every`` steps on accelerators, and whenever a hook is due), in one read-back
  (one all-reduce under DDP) with the stop flag and the skipped-file count. A non-finite
  loss stops the run with ``DivergedError`` (one message, whatever the front-end).
* ``Periodic``: a hook the engine calls at the steps or epochs it asks for (logging,
  kNN monitor, checkpoints), with the ``TrainState``.
* ``StopSignals``: SIGTERM/SIGINT set a flag; the engine finishes its step, calls the
  hooks marked ``on_stop`` (a checkpoint) and returns with ``state.stop_signal`` set.
* ``prepare_model``: the target network copied before DDP / ``torch.compile`` wrap the
  learner, then the wrappers.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from ..byol import BYOL, NonFiniteInputError, nonfinite_error
from ..data.sampling import StepBatch
from .distributed import DistContext

__all__ = [
    "DivergedError",
    "Engine",
    "OptimizerStep",
    "Periodic",
    "StopSignals",
    "TrainState",
    "autocast_for",
    "default_precision",
    "prepare_model",
]


class DivergedError(FloatingPointError):
    """The training loss turned non-finite; ``step`` is the optimizer step where it was seen.

    ``bad_input``: the cause was NaN/Inf in a training batch (the data, not the learning rate).
    """

    def __init__(self, step: int, reason: str, bad_input: bool = False):
        super().__init__(f"training diverged at step {step}: {reason}")
        self.step, self.reason, self.bad_input = step, reason, bad_input


def default_precision(device: torch.device) -> str:
    """``"bf16"`` on GPUs with native bfloat16 (compute capability 8.0, Ampere, and newer), else ``"fp32"``.

    ``torch.cuda.is_bf16_supported()`` is also true on older GPUs (T4, V100), where bfloat16 is
    emulated and cuDNN has no bfloat16 convolutions: slower than fp32 there.
    """
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp32"


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``"bf16"``/``"fp16"``, a no-op context for ``"fp32"``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class OptimizerStep:
    """One optimizer step from ``accumulate`` micro-batches; schedules advance on real steps.

    Args:
        learner: the BYOL learner (``update_moving_average`` is called on it).
        model: what the forward runs through: the learner, or its DDP / compiled wrapper.
        optimizer: the optimizer.
        scheduler: an lr scheduler stepped once per real optimizer step, or None.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (with a GradScaler).
        device: the training device.
        scaler: the fp16 GradScaler; None for fp32/bf16.

    Attributes:
        steps: optimizer steps really taken; skipped: fp16 steps the scaler skipped.
    """

    def __init__(
        self,
        learner: BYOL,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        precision: str,
        device: torch.device,
        scaler: torch.amp.GradScaler | None = None,
    ):
        self.learner, self.model, self.optimizer, self.scheduler = learner, model, optimizer, scheduler
        self.precision, self.device, self.scaler = precision, device, scaler
        self.steps, self.skipped = 0, 0
        self._optimizer_stepped = False
        if scaler is not None:  # tells, without reading the scale back, whether scaler.step stepped
            optimizer.register_step_post_hook(self._mark_stepped)

    def __call__(self, micro_batches: Sequence[torch.Tensor]) -> tuple:
        """Forward/backward every micro-batch, then step.

        Args:
            micro_batches: the (b, C, H, W) batches of one step (same size each).

        Returns:
            ``(loss, stepped)``: the mean loss over the micro-batches (a detached device
            tensor, not read back), and whether the optimizer really stepped.
        """
        count = len(micro_batches)
        total = torch.zeros((), device=self.device)
        for i, images in enumerate(micro_batches):
            last = i == count - 1
            no_sync = getattr(self.model, "no_sync", None)
            context = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
            with context:
                with autocast_for(self.device, self.precision):
                    loss = self.model(images)
                scaled = loss / count
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total += loss.detach().float()
        stepped = True
        if self.scaler is not None:
            # The scaler reads its found-inf flags once (the step's one host sync) and calls
            # optimizer.step() only for finite gradients (a fused optimizer's always, with the
            # flag); the post-hook says whether it stepped.
            self._optimizer_stepped = False
            self.scaler.step(self.optimizer)
            self.scaler.update()
            stepped = self._optimizer_stepped
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if stepped:
            self.steps += 1
            if self.scheduler is not None:
                self.scheduler.step()
            if getattr(self.learner, "use_momentum", False):
                self.learner.update_moving_average()
        else:
            self.skipped += 1
        return total / count, stepped

    def _mark_stepped(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # A fused optimizer's step() is called whatever the gradients (GradScaler hands it
        # ``found_inf`` and it skips the update on the device): read that flag (the step's one sync).
        found_inf = getattr(optimizer, "found_inf", None)
        self._optimizer_stepped = found_inf is None or not bool(found_inf.item())


class StopSignals:
    """Context manager: SIGTERM and SIGINT set ``requested`` instead of killing the process.

    The loop reads ``requested`` after each step, saves a checkpoint and exits. A second
    SIGINT (Ctrl-C twice) raises ``KeyboardInterrupt`` at once. Outside the main thread
    (signals cannot be caught there) it does nothing. The previous handlers are restored
    on exit.

    Args:
        enabled: False leaves the signals' handlers alone (a loop that has nothing to
            save: Ctrl-C interrupts it at once, as usual).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.signum: int | None = None
        self.enabled = enabled
        self._previous: list[tuple] = []

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous.append((sig, signal.signal(sig, self._handle)))
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous:
            signal.signal(sig, handler)
        self._previous = []


def prepare_model(learner: nn.Module, ctx: DistContext, compile: bool = False) -> nn.Module:
    """What the forward runs through: the learner, wrapped in DDP and/or ``torch.compile``.

    The target network is copied first (``init_target``), not inside the first wrapped,
    maybe compiled forward: identical weights on every rank, and neither DDP nor
    ``torch.compile`` sees it appear.

    Args:
        learner: the BYOL learner, on ``ctx.device``.
        ctx: the process context (DDP when distributed).
        compile: wrap the result in ``torch.compile``.

    Returns:
        The module to call with image batches.
    """
    if getattr(learner, "use_momentum", False) and getattr(learner, "target_encoder", None) is None:
        learner.init_target()  # type: ignore[operator]
    resolve = getattr(learner, "resolve_sync_batchnorm", None)
    if resolve is not None:  # before the wrappers: a compiled forward skips it
        resolve(ctx.device)
    model: nn.Module = learner
    if ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = DistributedDataParallel(learner, device_ids=device_ids)  # broadcasts rank 0's online net
        broadcast = getattr(learner, "broadcast_target", None)
        if broadcast is not None:
            broadcast(0)  # and the target, which DDP ignores: every rank regresses onto rank 0's
    if compile:
        model = torch.compile(model)  # type: ignore[assignment]
    return model


@dataclass
class TrainState:
    """Where a run stands; the engine updates it and hands it to every hook.

    Attributes:
        step: optimizer steps taken. total: steps the run is to take.
        epoch, position: the data position (batches of ``epoch`` consumed).
        batches_per_epoch: batches in one epoch of this process.
        stepped: the last step group really stepped the optimizer (fp16 may skip).
        epoch_done: the last step ended an epoch (``epoch`` is the next one, ``position`` 0).
        lr, tau: the learning rate and EMA decay the last step used.
        loss: mean loss over the ranks since the last ``take_interval()`` (read at sync points).
        skipped_files: unreadable files passed over so far, summed over ranks (at sync points).
        stop_signal: the signal that asked the run to stop, else None.
        pending: values for the next log row that a hook measured (e.g. ``knn_acc``).
        shown: what the progress bar shows beside it (a hook's choice; default the loss).
    """

    step: int = 0
    total: int = 0
    epoch: int = 0
    position: int = 0
    batches_per_epoch: int = 0
    stepped: bool = False
    epoch_done: bool = False
    lr: float = math.nan
    tau: float = math.nan
    loss: float = math.nan
    skipped_files: int = 0
    stop_signal: int | None = None
    pending: dict[str, float] = field(default_factory=dict)
    shown: dict[str, str] = field(default_factory=dict)  # beside the progress bar (default: the loss)
    interval_groups: int = 0  # step groups since the last take_interval()
    interval_images: int = 0  # images (all ranks) since then
    interval_start: float = field(default_factory=time.perf_counter)
    start: float = field(default_factory=time.perf_counter)

    def take_interval(self) -> dict[str, float]:
        """``loss``, ``img_per_s`` and ``time_s`` of the interval since the last call, which starts a new one."""
        now = time.perf_counter()
        row = {
            "loss": self.loss,
            "img_per_s": self.interval_images / max(now - self.interval_start, 1e-9),
            "time_s": now - self.start,
        }
        self.interval_groups, self.interval_images, self.interval_start = 0, 0, now
        return row


@dataclass
class Periodic:
    """A hook: ``fn(state)`` at the steps, epochs or events it names (any one suffices).

    Args:
        fn: called with the ``TrainState``.
        every: every this many optimizer steps.
        every_epochs: at the end of every this many epochs.
        at_end: at the run's last step.
        on_stop: when a stop signal ends the run.
        when: any other condition on the state.
    """

    fn: Callable[[TrainState], Any]
    every: int | None = None
    every_epochs: int | None = None
    at_end: bool = False
    on_stop: bool = False
    when: Callable[[TrainState], bool] | None = None

    def due(self, s: TrainState) -> bool:
        """Whether the hook runs after the last step."""
        by_step = s.stepped and (
            (self.every is not None and s.step % self.every == 0) or (self.at_end and s.step >= s.total)
        )
        by_epoch = self.every_epochs is not None and s.epoch_done and s.epoch % self.every_epochs == 0
        other = self.when is not None and self.when(s)
        return by_step or by_epoch or other or (self.on_stop and s.stop_signal is not None)


class Engine:
    """The training loop: one ``OptimizerStep`` per ``StepBatch``, hooks at their steps.

    Args:
        step: the optimizer step (learner, wrapped model, optimizer, schedules, precision).
        ctx: the process context.
        prepare: applied to each micro-batch once on the device (e.g. channel matching).
        check_every: read the loss back every this many steps (default: 1 on the CPU,
            where the read costs nothing, 10 on accelerators).
        progress: show a progress bar on rank 0 (stderr).
        catch_signals: SIGTERM/SIGINT end the run after the current step, with the
            ``on_stop`` hooks (a checkpoint); False leaves them to the caller (Ctrl-C
            raises ``KeyboardInterrupt`` at once).
        stop_note: what a stop does, said on rank 0 (stderr, above the bar) as soon as the signal
            is seen after a step: ``"SIGINT: stopping after this step{stop_note}"`` (within ``check_every``
            steps where the loss is read back less often).
    """

    def __init__(
        self,
        step: OptimizerStep,
        ctx: DistContext,
        prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
        check_every: int | None = None,
        progress: bool = True,
        catch_signals: bool = True,
        stop_note: str = "",
    ):
        self.step_fn, self.ctx, self.prepare, self.catch_signals = step, ctx, prepare, catch_signals
        self.stop_note = stop_note
        self.check_every = check_every or (1 if ctx.device.type == "cpu" else 10)
        self.progress = progress and ctx.is_main
        self._copy_stream: Any = None  # CUDA: the stream batches are copied on

    def run(self, batches: Iterable[StepBatch], state: TrainState, hooks: Sequence[Periodic] = ()) -> TrainState:
        """Train from ``state`` until ``state.total`` steps or a stop signal; returns the state.

        Raises:
            DivergedError: the loss turned non-finite (nothing after the last good hook ran).
        """
        from tqdm import tqdm

        bar = tqdm(
            total=state.total,
            initial=state.step,
            disable=not self.progress,
            dynamic_ncols=True,
            desc="byol",
            unit="step",
            file=sys.stderr,
        )
        loss_sum = torch.zeros((), device=self.ctx.device)
        skipped = 0
        state.interval_start = state.start = time.perf_counter()
        learner = self.step_fn.learner
        net = getattr(learner, "net", None)
        if isinstance(net, nn.Module) and not net.training:  # handed over in eval mode (from_pretrained() does)
            self.step_fn.model.train()  # all of it, the target's copy too (a net in train mode keeps its choices)
        own_check = getattr(learner, "finite_check", None)
        if own_check is not None:
            learner.finite_check = False  # the engine reads the flags itself, with the loss, on every rank
            learner.take_finite_flags()  # forget what happened before this run
        said = False  # the stop announced
        try:
            with StopSignals(self.catch_signals) as signals:
                for batch in batches:
                    skipped += batch.skipped
                    loss_sum += self._step(batch, state)
                    bar.update(int(state.stepped))
                    if signals.requested and not said:  # said once, here: not in the signal handler
                        self._announce(signals.signum)
                        said = True
                    if not self._sync_due(state, hooks):
                        continue
                    self._sync(state, loss_sum, signals, skipped)
                    for hook in hooks:
                        if hook.due(state):
                            hook.fn(state)
                    bar.set_postfix(state.shown or {"loss": f"{state.loss:.4f}"}, refresh=False)
                    if state.interval_groups == 0:  # a hook took the interval: the loss starts anew
                        loss_sum.zero_()
                    if state.stop_signal is not None or state.step >= state.total:
                        break
        finally:
            bar.close()
            if own_check is not None:
                learner.finite_check = own_check
        return state

    def _announce(self, signum: int | None) -> None:
        """Say on rank 0, above the bar, that a signal stops the run after this step (and what it keeps)."""
        if self.ctx.is_main and signum is not None:
            from tqdm import tqdm

            again = " (Ctrl-C again quits at once, without that)" if signum == signal.SIGINT else ""
            when = "after this step" if self.check_every == 1 else f"within {self.check_every} steps (at a loss check)"
            line = f"byol-pytorch: {signal.Signals(signum).name}: stopping {when}{self.stop_note}{again}"
            tqdm.write(line, file=sys.stderr)

    def _step(self, batch: StepBatch, state: TrainState) -> torch.Tensor:
        """One optimizer step on ``batch``; the state advances. Returns the detached loss."""
        state.lr = float(self.step_fn.optimizer.param_groups[0]["lr"])
        state.tau = float(getattr(self.step_fn.learner, "current_decay", math.nan))
        images = self._to_device(batch.images)
        if self.prepare is not None:
            images = [self.prepare(x) for x in images]
        try:
            loss, stepped = self.step_fn(images)
        except FloatingPointError as error:  # the learner's deferred non-finite check
            raise DivergedError(state.step + 1, str(error), isinstance(error, NonFiniteInputError)) from None
        state.stepped, state.step = stepped, state.step + int(stepped)
        state.epoch_done = batch.position == batch.batches_per_epoch
        state.epoch, state.position = (batch.epoch + 1, 0) if state.epoch_done else (batch.epoch, batch.position)
        state.batches_per_epoch = batch.batches_per_epoch
        state.interval_groups += 1
        state.interval_images += sum(x.shape[0] for x in images) * self.ctx.world_size
        return loss

    def _to_device(self, batch: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The micro-batches on the device; on CUDA copied on a side stream.

        On the compute stream a copy would queue behind the previous step's kernels (the host
        runs ahead of the device); on its own stream it overlaps them, and the compute stream
        waits for it only where the batch is used.
        """
        device = self.ctx.device
        if device.type != "cuda":
            return [x.to(device, non_blocking=True) for x in batch]
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device)
        compute = torch.cuda.current_stream(device)
        with torch.cuda.stream(self._copy_stream):
            moved = [x.to(device, non_blocking=True) for x in batch]
        compute.wait_stream(self._copy_stream)
        for x in moved:
            x.record_stream(compute)  # its memory is not reused before the compute stream is done with it
        return moved

    def _sync_due(self, state: TrainState, hooks: Sequence[Periodic]) -> bool:
        if state.epoch_done or (state.stepped and (state.step % self.check_every == 0 or state.step >= state.total)):
            return True
        return any(hook.due(state) for hook in hooks)

    def _sync(self, state: TrainState, loss_sum: torch.Tensor, signals: StopSignals, skipped: int) -> None:
        """One read-back (and one all-reduce) of the loss, the learner's finite flags, a stop request, skipped files.

        Every rank reads the same reduced figures, so a non-finite step on any rank stops all of
        them at the same step with the same error (no rank is left waiting in a collective).
        """
        device = self.ctx.device
        flags = torch.tensor([float(signals.requested), float(skipped)], device=device)
        take = getattr(self.step_fn.learner, "take_finite_flags", None)
        finite = take().to(device) if take is not None else torch.ones(2, dtype=torch.bool, device=device)
        status = torch.cat(
            [loss_sum.reshape(1), flags, (~finite).float()]
        )  # [loss, stop, skipped, bad loss, bad input]
        if self.ctx.distributed:
            dist.all_reduce(status)
        loss_total, stop_votes, skipped_all, bad_loss, bad_input = status.tolist()
        state.loss = loss_total / (max(state.interval_groups, 1) * self.ctx.world_size)
        state.skipped_files = int(skipped_all)
        if bad_input:
            raise DivergedError(state.step, str(nonfinite_error(False, input_finite=False)), bad_input=True)
        if bad_loss or not math.isfinite(state.loss):
            shown = state.loss if not math.isfinite(state.loss) else math.nan  # another rank's loss was the bad one
            raise DivergedError(state.step, f"the loss is {shown}")
        if stop_votes > 0:
            state.stop_signal = signals.signum if signals.signum is not None else int(signal.SIGTERM)
