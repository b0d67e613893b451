"""Projector and predictor heads.

BYOL (Grill et al. 2020, Sec. 3.3): both heads are ``Linear(d, 4096) -> BatchNorm1d ->
ReLU -> Linear(4096, 256)``. SimSiam (Chen & He 2020, Sec. 4.2 / Fig. 3): a three-layer
projector with BatchNorm on every layer including the output, and a bottleneck
predictor whose hidden width is a quarter of its output (2048 -> 512 -> 2048).
"""

from __future__ import annotations

import torch.nn as nn

__all__ = ["MLP", "byol_mlp", "simsiam_projector", "simsiam_predictor"]


def _norm(width: int, use_batchnorm: bool, affine: bool = True) -> nn.Module:
    # LayerNorm keeps the heads free of batch statistics (tiny batches, exact DDP tests).
    if use_batchnorm:
        return nn.BatchNorm1d(width, affine=affine)
    return nn.LayerNorm(width, elementwise_affine=affine)


class MLP(nn.Sequential):
    """A stack of ``Linear -> norm -> ReLU`` blocks ending in a Linear (and optional norm).

    Args:
        widths: layer widths from input to output, e.g. ``[512, 4096, 256]``.
        use_batchnorm: BatchNorm1d between layers; False uses LayerNorm instead.
        norm_last: add a norm (without ReLU) after the last Linear (SimSiam projector).
    """

    def __init__(self, widths: list[int], use_batchnorm: bool = True, norm_last: bool = False):
        if len(widths) < 2 or any(int(w) <= 0 for w in widths):
            raise ValueError(f"MLP widths must be >= 2 positive integers, got {widths}")
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
            last = i == len(widths) - 2
            # A Linear followed by a norm needs no bias of its own.
            layers.append(nn.Linear(d_in, d_out, bias=last and not norm_last))
            if not last:
                layers += [_norm(d_out, use_batchnorm), nn.ReLU(inplace=True)]
            elif norm_last:
                layers.append(_norm(d_out, use_batchnorm, affine=False))
        super().__init__(*layers)


def byol_mlp(dim: int, hidden_size: int = 4096, out_size: int = 256, use_batchnorm: bool = True) -> MLP:
    """BYOL projector or predictor: Linear(dim, 4096) -> BN -> ReLU -> Linear(4096, 256)."""
    return MLP([dim, hidden_size, out_size], use_batchnorm=use_batchnorm)


def simsiam_projector(dim: int, hidden_size: int, out_size: int, use_batchnorm: bool = True) -> MLP:
    """SimSiam projector: three Linear layers, a norm after each, ReLU between them."""
    return MLP([dim, hidden_size, hidden_size, out_size], use_batchnorm=use_batchnorm, norm_last=True)


def simsiam_predictor(out_size: int, use_batchnorm: bool = True) -> MLP:
    """SimSiam bottleneck predictor: out -> out/4 -> out (2048 -> 512 -> 2048 in the paper)."""
    return MLP([out_size, max(out_size // 4, 8), out_size], use_batchnorm=use_batchnorm)
