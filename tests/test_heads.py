"""heads.py: the projector and predictor MLPs of BYOL and SimSiam."""

import pytest
import torch.nn as nn

from byol_pytorch.heads import byol_mlp, simsiam_predictor, simsiam_projector


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
