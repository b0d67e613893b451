"""The live collapse alarm: figures, firing, silence, no host sync, state."""

import copy
import math
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import small_cnn, train_steps
from torch.overrides import TorchFunctionMode

import byol_pytorch
from byol_pytorch import BYOL, CollapseWarning
from byol_pytorch.collapse import WINDOW, CollapseMonitor, effective_rank, embedding_std

SMALL = dict(projection_size=16, projection_hidden_size=32)


def learner_for(**kwargs):
    torch.manual_seed(0)
    return BYOL(small_cnn(), image_size=16, **SMALL, **kwargs)


def force_constant_projections(learner):
    """The projector's last Linear outputs its bias alone: every projection is the same."""
    last = [m for m in learner.online_encoder.projector.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
    last.weight.requires_grad_(False)


def train(learner, steps):
    torch.manual_seed(1)
    train_steps(learner, torch.rand(8, 3, 16, 16), steps)


def test_exported_and_a_user_warning():
    assert byol_pytorch.CollapseWarning is CollapseWarning
    assert issubclass(CollapseWarning, UserWarning)


# ---------------------------------------------------------------- figures
def reference(z):
    z = np.asarray(z, dtype=np.float64)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    std = z.std(axis=0, ddof=0).mean()
    s = np.linalg.svd(z, compute_uv=False)
    s = s[s > s.max() * 1e-6]
    p = s / s.sum()
    return std, math.exp(-(p * np.log(p)).sum())


def test_figures_match_a_numpy_reference():
    g = torch.Generator().manual_seed(0)
    one, two = torch.randn(12, 16, generator=g), torch.randn(12, 16, generator=g) * 3 + 1
    monitor = CollapseMonitor(16)
    monitor.observe(one, two)
    (std_one, rank_one), (std_two, _) = reference(one.numpy()), reference(two.numpy())
    status = monitor.status()
    assert status["std"] == pytest.approx((std_one + std_two) / 2, rel=1e-5)
    assert status["effective_rank"] == pytest.approx(rank_one, rel=1e-6)  # the sample: view one
    assert status["healthy_std"] == pytest.approx(0.25) and status["bound"] == pytest.approx(0.1 / 4)
    assert status["steps"] == 1 and status["low_steps"] == 0
    f64 = dict(generator=g, dtype=torch.float64)
    low_rank = torch.randn(40, 3, **f64) @ torch.randn(3, 20, **f64)
    for z in (low_rank, torch.randn(30, 50, generator=g, dtype=torch.float64)):  # N > D and N < D
        std, rank = reference(z.numpy())
        assert embedding_std(z).item() == pytest.approx(std, rel=1e-9)
        assert effective_rank(z).item() == pytest.approx(rank, rel=1e-6)
    assert effective_rank(torch.zeros(5, 4, dtype=torch.float64)).item() == 0.0
    assert effective_rank(torch.ones(5, 4, dtype=torch.float64)).item() == pytest.approx(1.0)


def test_monitor_warns_once_then_again_only_after_recovery():
    monitor = CollapseMonitor(16, window=3)
    constant, spread = torch.ones(8, 16), torch.randn(8, 16)

    def steps(z, n):
        for _ in range(n):
            monitor.observe(z, z)
            monitor.poll()

    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        steps(constant, 2)  # below the bound, but not for a whole window yet
    with pytest.warns(CollapseWarning) as record:
        steps(constant, 10)
    assert len(record) == 1
    message = str(record[0].message)
    assert "per-dimension std" in message and "1/sqrt(16)" in message and "0.2500" in message
    assert "lower learning rate" in message and "moving_average_decay" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        steps(spread, 1)  # recovered: re-armed
    with pytest.warns(CollapseWarning):
        steps(constant, 3)


# ---------------------------------------------------------------- in training
def test_alarm_fires_on_a_collapsing_byol_run():
    learner = learner_for()
    force_constant_projections(learner)
    with pytest.warns(CollapseWarning, match=r"std has stayed at or below 0 for the last 50 training steps"):
        train(learner, WINDOW)
    assert learner.collapse_monitor.last["low_steps"] == WINDOW


def test_alarm_fires_on_a_collapsing_simsiam_run_from_the_forward():
    learner = learner_for(use_momentum=False)
    learner.collapse_monitor.window = 5
    force_constant_projections(learner)
    with pytest.warns(CollapseWarning, match="collapsing"):
        train(learner, 6)


def test_alarm_is_silent_on_a_healthy_run():
    learner = learner_for()
    learner.collapse_monitor.window = 5
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        train(learner, 20)
    status = learner.collapse_monitor.status()
    assert status["std"] > 5 * status["bound"] and status["steps"] == 20 and status["low_steps"] == 0
    assert status["effective_rank"] > 2


def test_collapse_alarm_false_disables_it():
    learner = learner_for(collapse_alarm=False)
    assert learner.collapse_monitor is None
    force_constant_projections(learner)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        train(learner, WINDOW + 2)
    with pytest.raises(TypeError, match="collapse_alarm"):
        learner_for(collapse_alarm=1)


def test_eval_mode_and_embeddings_are_not_counted():
    learner = learner_for()
    x = torch.rand(4, 3, 16, 16)
    learner(x, return_embedding=True)
    learner.eval()(x)
    assert learner.collapse_monitor.status()["steps"] == 0


# ---------------------------------------------------------------- no host sync
HOST_READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__array__"}


class CountHostReads(TorchFunctionMode):
    """Counts every tensor -> Python value read (each one a device sync on an accelerator)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def host_reads_of_a_step(learner):
    x = torch.rand(8, 3, 16, 16)
    with CountHostReads() as counter:
        learner(x).backward()
    return counter.reads


def test_the_counter_sees_a_host_read():
    with CountHostReads() as counter:
        torch.ones(2).sum().item()
        bool(torch.ones(()) > 0)
    assert counter.reads == ["item", "__bool__"]


@pytest.mark.parametrize("use_momentum", [True, False])
def test_the_alarm_adds_no_host_read_to_the_training_step(use_momentum, monkeypatch):
    if not use_momentum:  # SimSiam polls in the forward, free on the CPU only: keep it out
        monkeypatch.setattr(CollapseMonitor, "poll", lambda self: None)
    on, off = learner_for(use_momentum=use_momentum), learner_for(use_momentum=use_momentum, collapse_alarm=False)
    assert host_reads_of_a_step(on) == host_reads_of_a_step(off)  # the CPU's own input check
    with CountHostReads() as counter:
        CollapseMonitor(16).observe(torch.randn(8, 16), torch.randn(8, 16))
    assert counter.reads == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_cuda_sync_in_the_step_or_the_poll():
    learner = learner_for().cuda()
    x = torch.rand(8, 3, 16, 16, device="cuda")
    learner(x).backward()  # the first step creates the target
    learner.update_moving_average()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a host sync in the step or the read-back raises
    try:
        for _ in range(3):
            learner(x).backward()
            learner.update_moving_average()  # BYOL's own non-blocking read-back
            learner.collapse_monitor.poll()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert learner.collapse_monitor.status()["steps"] == 4  # every step was observed


# ---------------------------------------------------------------- state
def test_state_dict_deepcopy_pickle():
    learner, off = learner_for(), learner_for(collapse_alarm=False)
    assert set(learner.state_dict()) == set(off.state_dict())  # nothing new in checkpoints
    train(learner, 2)
    off.load_state_dict(learner.state_dict())  # strict, both ways
    learner.load_state_dict(learner_for(collapse_alarm=False).state_dict())
    names = learner.ddp_ignored_names()
    assert "collapse_monitor.stats" in names and "collapse_monitor.sample" in names
    for clone in (copy.deepcopy(learner), pickle.loads(pickle.dumps(learner))):
        assert clone.collapse_monitor.status()["steps"] == 2
        train(clone, 1)
        assert clone.collapse_monitor.status()["steps"] == 3


def test_the_figures_stay_float32_when_the_learner_is_cast():
    learner = BYOL(small_cnn(), image_size=16, projection_size=8, projection_hidden_size=16).to(torch.bfloat16)
    monitor = learner.collapse_monitor
    assert monitor.stats.dtype == torch.float32 and monitor.sample.dtype == torch.float32
    for _ in range(300):  # a bfloat16 counter would stop at 256
        monitor.stats[3] += 1
    assert monitor.status()["steps"] == 300
