"""losses.py: the normalised regression loss and the symmetric BYOL loss."""

import torch

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
