"""batchnorm.py: BatchNorm statistics of clean images, for what leaves training.

Re-estimation changes the running statistics and nothing else (weights, other buffers, every
module's mode, the momenta), equals the plain average of the batch statistics computed here
another way, is a no-op on nets without BatchNorm, and ``clean_statistics`` gives the trained
statistics back.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import small_cnn

from byol_pytorch import recalibrate_batchnorm
from byol_pytorch.batchnorm import batchnorm_state, clean_statistics, load_batchnorm_state


def _trained_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = small_cnn()
    net.train()
    with torch.no_grad():
        for _ in range(3):  # statistics of "views": shifted, scaled noise
            net(torch.randn(8, 3, 16, 16) * 3 + 2)
    return net


def test_only_running_statistics_change_and_modes_and_momenta_come_back():
    net = _trained_net()
    net[2].eval()  # a user's mixed modes: kept as they are
    net[4].momentum = 0.3
    before = {k: v.clone() for k, v in net.state_dict().items()}
    modes = [m.training for m in net.modules()]
    images = torch.rand(40, 3, 16, 16)
    assert recalibrate_batchnorm(net, images, batch_size=10) == 40  # 4 batches (3 before)
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{i}.{s}" for i in (1, 4) for s in ("running_mean", "running_var", "num_batches_tracked")}
    assert [m.training for m in net.modules()] == modes and net[4].momentum == 0.3 and net[1].momentum == 0.1


def test_the_statistics_are_the_average_over_the_batches_of_the_clean_images():
    net = _trained_net()
    images = torch.rand(30, 3, 16, 16)
    recalibrate_batchnorm(net, images, batch_size=10)
    conv = net[0]
    with torch.no_grad():  # the reference: the first BatchNorm's input, batch by batch
        means, variances = [], []
        for batch in images.split(10):
            h = conv(batch)  # (10, 16, 16, 16)
            means.append(h.mean((0, 2, 3)))
            variances.append(h.var((0, 2, 3), unbiased=True))
    torch.testing.assert_close(net[1].running_mean, torch.stack(means).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net[1].running_var, torch.stack(variances).mean(0), rtol=1e-5, atol=1e-6)
    assert int(net[1].num_batches_tracked) == 3


def test_a_net_without_batchnorm_is_not_run():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert recalibrate_batchnorm(net, torch.rand(8, 3, 8, 8)) == 0
    assert calls == [] and all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_max_images_transform_and_loaders_of_pairs():
    net = _trained_net()
    seen = []

    def transform(x):
        seen.append(len(x))
        return x.float() / 255

    loader = [(torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8), torch.zeros(6)) for _ in range(4)]
    assert recalibrate_batchnorm(net, loader, transform=transform, max_images=15) == 15
    assert seen == [6, 6, 3]


@pytest.mark.parametrize(
    "images, kwargs, message",
    [
        (torch.rand(0, 3, 16, 16), {}, "got no images"),
        (torch.rand(5, 3, 16, 16), {"batch_size": 4}, "a batch of one image has no variance"),
        (torch.rand(4, 3, 16, 16), {"max_images": 0}, "max_images must be at least 1"),
    ],
)
def test_bad_input_is_an_error_and_leaves_the_statistics(images, kwargs, message):
    net = _trained_net()
    before = batchnorm_state(net)
    with pytest.raises(ValueError, match=message):
        recalibrate_batchnorm(net, images, **kwargs)
    after = batchnorm_state(net)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_clean_statistics_gives_the_trained_ones_back():
    net = _trained_net()
    trained = batchnorm_state(net)
    with clean_statistics(net, torch.rand(20, 3, 16, 16), batch_size=10) as clean:
        inside = batchnorm_state(clean)
        assert not torch.equal(inside["1.running_mean"], trained["1.running_mean"])
    after = batchnorm_state(net)
    assert all(torch.equal(trained[k], after[k]) for k in trained)
    load_batchnorm_state(net, inside)
    assert torch.equal(batchnorm_state(net)["4.running_var"], inside["4.running_var"])
    with pytest.raises(ValueError, match="do not fit this net"):
        load_batchnorm_state(nn.Sequential(nn.BatchNorm1d(3)), inside)


def test_syncbatchnorm_nets_are_recalibrated_on_a_plain_copy():
    net = nn.SyncBatchNorm.convert_sync_batchnorm(_trained_net())
    trained = batchnorm_state(net)
    with clean_statistics(net, torch.rand(12, 3, 16, 16), batch_size=6) as clean:  # no process group needed
        assert clean is net and isinstance(net[1], nn.SyncBatchNorm)
        assert not torch.equal(batchnorm_state(clean)["1.running_mean"], trained["1.running_mean"])
    assert all(torch.equal(trained[k], v) for k, v in batchnorm_state(net).items())
