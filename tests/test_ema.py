"""ema.py: the EMA update of the target and the cosine tau schedule."""

import math

import pytest
import torch
import torch.nn as nn

from byol_pytorch import BYOL
from byol_pytorch.ema import cosine_tau, ema_update_


def test_ema_update_equals_formula():
    torch.manual_seed(0)
    target = [torch.randn(7, 3), torch.randn(11)]
    online = [torch.randn(7, 3), torch.randn(11)]
    tau = 0.996
    expected = [tau * t.double() + (1 - tau) * o.double() for t, o in zip(target, online)]
    ema_update_(target, online, tau)
    for t, e in zip(target, expected):
        assert torch.allclose(t.double(), e, rtol=1e-6, atol=1e-7)


def test_ema_update_extremes_and_errors():
    t, o = [torch.zeros(3)], [torch.ones(3)]
    ema_update_(t, o, 1.0)
    assert torch.equal(t[0], torch.zeros(3))
    ema_update_(t, o, 0.0)
    assert torch.equal(t[0], torch.ones(3))
    with pytest.raises(ValueError, match="tau must be in"):
        ema_update_(t, o, 1.5)
    with pytest.raises(ValueError, match="same network"):
        ema_update_(t, o + o, 0.5)


@pytest.mark.parametrize("step", [0, 50, 100])
def test_cosine_tau_first_middle_last(step):
    base, total = 0.996, 100
    # Written differently from the module: tau rises by half a cosine from base to 1.
    expected = base + (1 - base) * (1 - math.cos(math.pi * step / total)) / 2
    assert cosine_tau(base, step, total) == pytest.approx(expected, abs=1e-12)
    assert cosine_tau(base, step, None) == base


def test_cosine_tau_endpoints_and_clamp():
    assert cosine_tau(0.99, 0, 10) == pytest.approx(0.99)
    assert cosine_tau(0.99, 5, 10) == pytest.approx(0.995)
    assert cosine_tau(0.99, 10, 10) == pytest.approx(1.0)
    assert cosine_tau(0.99, 25, 10) == pytest.approx(1.0)


@pytest.mark.filterwarnings("ignore:update_moving_average\\(\\) was called again")  # EMA steps alone, on purpose
def test_a_low_precision_target_changed_outside_the_ema_is_read_again():
    """Before: after bfloat16 -> float32 -> bfloat16 (or any write to the target) the float32 master copy kept
    the old target, and the next update reverted to it (0.10 off where bfloat16 rounding is 0.008)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    learner = BYOL(net.to(torch.bfloat16), 16, moving_average_decay=0.5, projection_size=8, projection_hidden_size=16)
    opt = torch.optim.SGD(learner.parameters(), lr=0.5)
    x = torch.rand(4, 3, 16, 16)

    def step():
        learner(x).backward()
        opt.step()
        opt.zero_grad()
        learner.update_moving_average()

    step()
    step()  # the float32 master exists
    learner.float()
    step()
    step()  # a float32 phase: the target moves without the master
    target = [p.detach().clone() for p in learner.target_encoder.parameters()]
    online = [p.detach().clone() for p in learner.online_encoder.parameters()]
    learner.to(torch.bfloat16)
    learner.update_moving_average()  # tau 0.5: the average of the two, rounded to bfloat16
    for p, t, o in zip(learner.target_encoder.parameters(), target, online):
        expected = ((t + o) / 2).bfloat16().float()
        torch.testing.assert_close(p.float(), expected, rtol=0, atol=float(expected.abs().max()) * 2**-7)
    with torch.no_grad():
        first = next(learner.target_encoder.parameters())
        first.add_(1.0)  # an in-place write to the target: read again too
        written = first.detach().float().clone()
    learner.update_moving_average()
    assert torch.allclose(first.float(), ((written + next(learner.online_encoder.parameters()).float()) / 2), atol=0.05)
