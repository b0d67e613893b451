"""ema.py: the EMA update of the target and the cosine tau schedule."""

import math

import pytest
import torch

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
