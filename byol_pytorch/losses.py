"""The BYOL regression loss.

Grill et al. 2020 (arXiv 2006.07733), Eq. 2: the mean squared error between the
L2-normalised online prediction and the L2-normalised target projection, which equals
``2 - 2 cos(p, z)``. The loss is symmetrised by swapping the two views (Eq. 4) and
averaged over the batch. Everything is computed in float32 so that bf16/fp16 autocast
never rounds the cosine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["regression_loss", "byol_loss"]


def regression_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample ``2 - 2 cos(prediction, target)``, computed in float32.

    Args:
        prediction: online prediction, (B, D).
        target: target projection, (B, D). Treated as a constant (detached).

    Returns:
        (B,) float32 loss per sample, each in [0, 4].
    """
    p = F.normalize(prediction.float(), dim=-1, eps=1e-6)
    z = F.normalize(target.detach().float(), dim=-1, eps=1e-6)
    return 2 - 2 * (p * z).sum(dim=-1)  # (B,)


def byol_loss(
    prediction_one: torch.Tensor,
    prediction_two: torch.Tensor,
    target_one: torch.Tensor,
    target_two: torch.Tensor,
) -> torch.Tensor:
    """Symmetric BYOL loss: view 1 predicts view 2's target and vice versa.

    Args:
        prediction_one: online prediction of view 1, (B, D).
        prediction_two: online prediction of view 2, (B, D).
        target_one: target projection of view 1, (B, D).
        target_two: target projection of view 2, (B, D).

    Returns:
        Scalar float32: the two directions summed (paper Eq. 4), mean over the batch.
        It lies in [0, 8]; 0 means every prediction points exactly at its target.
    """
    loss = regression_loss(prediction_one, target_two) + regression_loss(prediction_two, target_one)
    return loss.mean()
