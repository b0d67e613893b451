"""_modules.py: where a module's tensors live, and a context that restores every submodule's mode."""

import pytest
import torch
import torch.nn as nn

from byol_pytorch._modules import module_device, module_device_dtype, saved_modes


def test_module_device_of_parameters_buffers_and_nothing():
    assert module_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(nn.Linear(2, 2, device="meta")) == torch.device("meta")
    assert module_device(nn.BatchNorm1d(2, affine=False, device="meta")) == torch.device("meta")  # buffers only
    assert module_device(nn.ReLU()) is None
    assert module_device(None) is None


def test_module_device_dtype_takes_the_first_floating_tensor():
    assert module_device_dtype(nn.Linear(2, 2).double()) == (torch.device("cpu"), torch.float64)
    norm = nn.BatchNorm1d(2, affine=False).half()  # buffers: running stats (half), num_batches_tracked (long)
    assert module_device_dtype(norm) == (torch.device("cpu"), torch.float16)
    counter = nn.Module()
    counter.register_buffer("count", torch.zeros((), dtype=torch.long))
    assert module_device_dtype(counter) == (torch.device("cpu"), torch.float32)  # no floating tensor: default
    assert module_device_dtype(nn.Linear(2, 2, device="meta", dtype=torch.bfloat16)) == (
        torch.device("meta"),
        torch.bfloat16,
    )


def _mixed():
    net = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.BatchNorm1d(2), nn.Dropout()), nn.Linear(2, 2))
    net[1][0].eval()  # a frozen BatchNorm inside a training net
    net[2].eval()
    return net


def _flags(net):
    return [m.training for m in net.modules()]


def test_saved_modes_evaluates_inside_and_restores_mixed_flags():
    net = _mixed()
    before = _flags(net)
    assert before == [True, True, True, False, True, False]
    with saved_modes(net):
        assert _flags(net) == [False] * 6
    assert _flags(net) == before


def test_saved_modes_restores_when_the_body_raises_or_changes_modes():
    net = _mixed()
    before = _flags(net)
    with pytest.raises(RuntimeError, match="boom"), saved_modes(net):
        raise RuntimeError("boom")
    assert _flags(net) == before
    with saved_modes(net, eval_mode=False):
        assert _flags(net) == before  # left as they were
        net.train()
    assert _flags(net) == before
    with saved_modes(None):
        pass  # nothing to save or restore
