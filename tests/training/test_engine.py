"""engine.py: optimizer steps (accumulation, skipped fp16 steps), the loop, its hooks, signals, divergence."""

import math
import os
import signal

import pytest
import torch
import torch.nn as nn
from conftest import stats_free_learner
from torch.utils.data import DataLoader

from byol_pytorch import BYOL
from byol_pytorch.data.sampling import EpochSampler, step_batches
from byol_pytorch.training.distributed import DistContext
from byol_pytorch.training.engine import DivergedError, Engine, OptimizerStep, Periodic, TrainState, prepare_model
from byol_pytorch.training.optim import warmup_cosine_scheduler


# ---------------------------------------------------------------- accumulation and skipped steps
def test_accumulation_steps_once_and_matches_the_full_batch_gradient():
    images = torch.rand(8, 3, 16, 16)
    grads = []
    for chunks in (1, 2):
        learner = stats_free_learner()
        opt = torch.optim.SGD(learner.parameters(), lr=0.0)  # lr 0: keep the weights, read gradients
        sched = warmup_cosine_scheduler(opt, total=10, warmup=0)
        seen = {}
        opt.register_step_pre_hook(
            lambda *_, seen=seen, learner=learner: seen.update(
                {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}
            )
        )
        step = OptimizerStep(learner, learner, opt, sched, "fp32", torch.device("cpu"))
        _, stepped = step(list(images.chunk(chunks)))
        assert stepped and step.steps == 1 and int(learner.ema_step) == 1 and sched.last_epoch == 1
        grads.append(seen)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_a_scaler_skipped_step_advances_neither_ema_nor_lr_schedule(fused):
    """fused=True: the scaler calls a fused optimizer's step() on inf too (it skips on the device); before, the
    engine counted that step as taken and moved the EMA and the schedule on."""
    learner = stats_free_learner()
    opt = torch.optim.SGD(learner.parameters(), lr=0.1, momentum=0.9, fused=fused)
    sched = warmup_cosine_scheduler(opt, total=10, warmup=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # the scaled loss overflows to inf
    step = OptimizerStep(learner, learner, opt, sched, "fp32", torch.device("cpu"), scaler)
    before = [p.detach().clone() for p in learner.parameters()]
    lr_before = opt.param_groups[0]["lr"]
    _, stepped = step([torch.rand(4, 3, 16, 16)])
    assert not stepped and step.skipped == 1 and step.steps == 0
    assert int(learner.ema_step) == 0 and sched.last_epoch == 0 and opt.param_groups[0]["lr"] == lr_before
    assert all(torch.equal(a, b) for a, b in zip(before, learner.parameters()))
    scaler.update(2.0**8)  # a sane scale: the next step is real
    _, stepped = step([torch.rand(4, 3, 16, 16)])
    assert stepped and step.steps == 1 and int(learner.ema_step) == 1 and sched.last_epoch == 1


def test_optimizer_step_returns_the_mean_loss_of_its_micro_batches():
    learner = stats_free_learner()
    images = torch.rand(8, 3, 16, 16)
    with torch.no_grad():
        expected = (learner(images[:4]) + learner(images[4:])) / 2  # weights unchanged: lr 0
    opt = torch.optim.SGD(learner.parameters(), lr=0.0)
    loss, _ = OptimizerStep(learner, learner, opt, None, "fp32", torch.device("cpu"))(list(images.chunk(2)))
    assert not loss.requires_grad
    torch.testing.assert_close(loss, expected)


# ---------------------------------------------------------------- Periodic
def _state(**kwargs):
    return TrainState(**{"total": 10, "stepped": True, **kwargs})


def test_periodic_due_every_steps_only_on_real_steps():
    hook = Periodic(lambda s: None, every=3)
    assert [step for step in range(1, 11) if hook.due(_state(step=step))] == [3, 6, 9]
    assert not hook.due(_state(step=6, stepped=False))  # a skipped fp16 step repeats step 6


def test_periodic_due_at_end_every_epochs_on_stop_and_when():
    at_end = Periodic(lambda s: None, at_end=True)
    assert [step for step in range(1, 11) if at_end.due(_state(step=step))] == [10]
    assert not at_end.due(_state(step=10, stepped=False))

    epochs = Periodic(lambda s: None, every_epochs=2)
    assert not epochs.due(_state(step=4, epoch=2))  # mid-epoch: the epoch did not just end
    assert not epochs.due(_state(step=4, epoch=1, epoch_done=True))
    assert epochs.due(_state(step=4, epoch=2, epoch_done=True))
    assert epochs.due(_state(step=4, epoch=2, epoch_done=True, stepped=False))  # epochs need no real step

    on_stop = Periodic(lambda s: None, on_stop=True)
    assert not on_stop.due(_state(step=3))
    assert on_stop.due(_state(step=3, stop_signal=int(signal.SIGTERM), stepped=False))

    when = Periodic(lambda s: None, when=lambda s: s.loss < 1.0)
    assert when.due(_state(step=1, loss=0.5)) and not when.due(_state(step=1, loss=2.0))
    assert not Periodic(lambda s: None).due(_state(step=10))  # asks for nothing: never due


# ---------------------------------------------------------------- Engine
class _Recorder(nn.Module):
    """The forward the engine runs through: the learner, its losses recorded, NaN from call ``nan_from`` on."""

    def __init__(self, learner, nan_from=None):
        super().__init__()
        self.learner, self.nan_from, self.losses = learner, nan_from, []

    def forward(self, x):
        loss = self.learner(x)
        if self.nan_from is not None and len(self.losses) + 1 >= self.nan_from:
            loss = loss * float("nan")
        self.losses.append(loss.item())
        return loss


def _engine(total, nan_from=None, images=24, lr=0.05):
    """An engine over ``images`` random images (batch 4: 6 batches per epoch) for ``total`` steps."""
    learner = stats_free_learner()
    model = _Recorder(prepare_model(learner, DistContext()), nan_from)
    opt = torch.optim.SGD(learner.parameters(), lr=lr)
    ctx = DistContext()
    engine = Engine(OptimizerStep(learner, model, opt, None, "fp32", ctx.device), ctx, progress=False)
    data = torch.rand(images, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    sampler = EpochSampler(images, 4, seed=0)
    loader = DataLoader(data, batch_size=4, sampler=sampler)
    return engine, step_batches(loader, sampler, 0, 0, 1), TrainState(total=total), learner, model


def test_engine_runs_total_steps_and_calls_hooks_at_their_steps_in_order():
    engine, batches, state, learner, model = _engine(total=10)
    calls = []
    hooks = [
        Periodic(lambda s: calls.append(("every3", s.step)), every=3),
        Periodic(lambda s: calls.append(("epoch", s.step, s.epoch, s.position)), every_epochs=1),
        Periodic(lambda s: calls.append(("end", s.step)), at_end=True),
    ]
    before = [p.detach().clone() for p in learner.parameters()]
    result = engine.run(batches, state, hooks)
    assert result is state and state.step == 10 and len(model.losses) == 10
    assert engine.step_fn.steps == 10 and learner._ema_count == 10  # one EMA update per step
    assert (state.epoch, state.position, state.batches_per_epoch) == (1, 4, 6)
    assert calls == [
        ("every3", 3),
        ("every3", 6),
        ("epoch", 6, 1, 0),  # the end of epoch 0: epoch 1 starts at position 0
        ("every3", 9),
        ("end", 10),
    ]
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.parameters()))
    assert state.tau == pytest.approx(learner.moving_average_decay) and state.lr == pytest.approx(0.05)


def test_take_interval_gives_the_mean_loss_since_the_last_call():
    engine, batches, state, _, model = _engine(total=6)
    rows = []
    engine.run(batches, state, [Periodic(lambda s: rows.append(s.take_interval()), every=3)])
    assert len(rows) == 2 and len(model.losses) == 6
    for row, losses in zip(rows, (model.losses[:3], model.losses[3:])):
        assert row["loss"] == pytest.approx(sum(losses) / 3, rel=1e-5)
        assert row["img_per_s"] > 0 and row["time_s"] > 0
    assert rows[0]["loss"] != pytest.approx(rows[1]["loss"])  # the second interval starts anew
    assert state.interval_groups == 0 and state.interval_images == 0


def test_a_non_finite_loss_raises_diverged_and_no_later_hook_runs():
    engine, batches, state, _, model = _engine(total=10, nan_from=4)
    seen = []
    with pytest.raises(DivergedError) as info:
        engine.run(batches, state, [Periodic(lambda s: seen.append(s.step), every=1)])
    assert str(info.value).startswith("training diverged at step 4: the loss is nan")
    assert info.value.step == 4 and isinstance(info.value, FloatingPointError)
    assert seen == [1, 2, 3] and len(model.losses) == 4
    assert math.isnan(model.losses[-1])


def test_a_stop_signal_ends_the_run_after_the_step_and_calls_on_stop_hooks():
    engine, batches, state, _, model = _engine(total=10)
    handler_before = signal.getsignal(signal.SIGTERM)
    seen, stopped = [], []

    def signal_at_two(s):
        seen.append(s.step)
        if s.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the engine: the process lives on

    hooks = [
        Periodic(signal_at_two, every=1),
        Periodic(lambda s: stopped.append((s.step, s.stop_signal)), on_stop=True),
    ]
    engine.run(batches, state, hooks)
    assert state.stop_signal == signal.SIGTERM and state.step == 3 < state.total
    assert seen == [1, 2, 3] and stopped == [(3, signal.SIGTERM)] and len(model.losses) == 3
    assert signal.getsignal(signal.SIGTERM) == handler_before  # the previous handler is back


def test_prepare_model_creates_the_target_before_wrapping():
    learner = stats_free_learner()
    assert learner.target_encoder is None
    model = prepare_model(learner, DistContext())
    assert model is learner  # one process, no compile: nothing to wrap
    assert learner.target_encoder is not None
    online = dict(learner.online_encoder.named_parameters())
    for name, value in learner.target_encoder.named_parameters():
        assert torch.equal(value, online[name]) and not value.requires_grad, name

    simsiam = stats_free_learner(use_momentum=False)
    assert prepare_model(simsiam, DistContext()) is simsiam and simsiam.target_encoder is None


def test_prepare_model_resolves_sync_batchnorm_before_wrapping():
    learner = BYOL(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        image_size=8,
        projection_size=4,
        projection_hidden_size=8,
    )
    calls = []
    learner.resolve_sync_batchnorm = lambda device: calls.append(device) or False
    model = prepare_model(learner, DistContext(device=torch.device("cpu")))
    assert model is learner and calls == [torch.device("cpu")] and learner.target_encoder is not None
    assert BYOL.resolve_sync_batchnorm(learner, "cpu") is False  # no CUDA process group: nothing to do
