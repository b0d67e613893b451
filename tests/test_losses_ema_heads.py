"""The pure math: regression loss, EMA update, tau schedule, heads."""

import math

import pytest
import torch
import torch.nn as nn

from byol_pytorch.ema import cosine_tau, ema_update_
from byol_pytorch.heads import byol_mlp, simsiam_predictor, simsiam_projector
from byol_pytorch.losses import byol_loss, regression_loss


def test_regression_loss_matches_mse_of_unit_vectors():
    p, z = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)
    # Reference: squared distance between unit vectors, written with explicit norms.
    ref = ((p / p.norm(dim=1, keepdim=True) - z / z.norm(dim=1, keepdim=True)) ** 2).sum(dim=1)
    assert torch.allclose(regression_loss(p, z).double(), ref, atol=1e-6)


def test_regression_loss_bounds_and_fp32_under_half_inputs():
    v = torch.randn(4, 8)
    assert torch.allclose(regression_loss(v, v), torch.zeros(4), atol=1e-6)
    assert torch.allclose(regression_loss(v, -v), torch.full((4,), 4.0), atol=1e-6)
    assert regression_loss(v.bfloat16(), v.half()).dtype == torch.float32


def test_byol_loss_is_symmetric_sum_mean_over_batch():
    p1, p2, z1, z2 = (torch.randn(5, 6) for _ in range(4))
    cos = torch.nn.functional.cosine_similarity
    expected = ((2 - 2 * cos(p1, z2)) + (2 - 2 * cos(p2, z1))).mean()
    assert torch.allclose(byol_loss(p1, p2, z1, z2), expected, atol=1e-6)
    assert torch.allclose(byol_loss(p1, p2, z1, z2), byol_loss(p2, p1, z2, z1), atol=1e-6)


def test_byol_loss_stops_gradient_on_targets():
    p1, p2 = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    z1, z2 = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    byol_loss(p1, p2, z1, z2).backward()
    assert p1.grad is not None and p1.grad.abs().sum() > 0
    assert z1.grad is None and z2.grad is None


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


def test_heads_follow_the_papers():
    proj = byol_mlp(512, 4096, 256)
    kinds = [type(m) for m in proj]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (proj[0].in_features, proj[0].out_features, proj[3].out_features) == (512, 4096, 256)
    sim = simsiam_projector(512, 2048, 2048)
    assert sum(isinstance(m, nn.Linear) for m in sim) == 3
    assert isinstance(sim[-1], nn.BatchNorm1d)
    pred = simsiam_predictor(2048)
    assert (pred[0].out_features, pred[-1].out_features) == (512, 2048)
    ln = byol_mlp(8, 16, 4, use_batchnorm=False)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in ln)
    with pytest.raises(ValueError, match="widths"):
        byol_mlp(0, 16, 4)
