"""batchnorm.py: BatchNorm statistics of clean images, for what leaves training.

Re-estimation changes the running statistics and nothing else (weights, other buffers, every
module's mode, the momenta), equals the plain average of the batch statistics computed here
another way, is a no-op on nets without BatchNorm, and ``clean_statistics`` gives the trained
statistics back. Frozen statistics (``freeze_batchnorm_statistics``) normalise as computed here by
hand, survive ``train()``, a deep copy and SyncBatchNorm, and are left alone by re-estimation.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
from conftest import small_cnn

from byol_pytorch import recalibrate_batchnorm
from byol_pytorch.batchnorm import (
    batchnorm_layers,
    batchnorm_state,
    clean_statistics,
    convert_sync_batchnorm,
    freeze_batchnorm_statistics,
    load_batchnorm_state,
)


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


@pytest.mark.parametrize("batch_size", [10, 7, 256])
def test_the_statistics_are_those_of_the_clean_images_whatever_their_batches(batch_size):
    """Before: the plain average of per-batch statistics (momentum=None): 30 images in batches of 7 (7, 7, 7, 9)
    weighed the last ones less, and the spread between batch means was missing from the variance; images in class
    order (a labelled loader that does not shuffle) gave a variance a tenth of the true one."""
    net = _trained_net()
    images = torch.cat([torch.rand(20, 3, 16, 16) * 0.2, torch.rand(10, 3, 16, 16) * 0.2 + 0.8])  # two "classes"
    recalibrate_batchnorm(net, images, batch_size=batch_size)
    with torch.no_grad():  # the reference: the first BatchNorm's input over all the images at once
        h = net[0](images)
    torch.testing.assert_close(net[1].running_mean, h.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net[1].running_var, h.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6)
    assert int(net[1].num_batches_tracked) == -(-30 // batch_size) - (30 % batch_size == 1)


def test_a_layer_the_pass_never_runs_keeps_its_statistics():
    """Before: every layer was reset first, so a BatchNorm the eval-mode forward never reaches (an auxiliary head
    used in training only, as Inception's) came back with mean 0, variance 1 and no batch counted."""

    class WithAux(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
            self.aux = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

        def forward(self, x):
            h = self.body(x)
            return (h, self.aux(h)) if self.training else h

    torch.manual_seed(0)
    net = WithAux().train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(8, 3, 8, 8) * 5 + 3)
    aux = {k: v.clone() for k, v in net.aux[1].state_dict().items()}
    body = net.body[1].running_mean.clone()
    assert recalibrate_batchnorm(net, torch.rand(16, 3, 8, 8)) == 16
    assert all(torch.equal(aux[k], v) for k, v in net.aux[1].state_dict().items())
    assert not torch.allclose(net.body[1].running_mean, body)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_images_are_refused_and_leave_the_statistics(bad):
    """Before: one NaN pixel gave NaN running statistics in every layer, and the image count as if it had worked."""
    net = _trained_net()
    before = batchnorm_state(net)
    images = torch.rand(16, 3, 16, 16)
    images[11, 0, 3, 3] = bad
    with pytest.raises(ValueError, match=r"NaN or infinite values \(in the batch from image 8\)"):
        recalibrate_batchnorm(net, images, batch_size=8)
    assert all(torch.equal(before[k], v) for k, v in batchnorm_state(net).items())


def test_single_images_and_uninitialised_lazy_layers_are_errors_naming_the_fix():
    """Before: torch's 'expected 4D input (got 3D input)' for a list of (C, H, W) images, and 'Attempted to use an
    uninitialized parameter in clone' for a lazy BatchNorm that never ran."""
    with pytest.raises(ValueError, match=r"batch of shape \(3, 16, 16\).*stack single images first, torch\.stack"):
        recalibrate_batchnorm(_trained_net(), [torch.rand(3, 16, 16), torch.rand(3, 16, 16)])
    lazy = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="run one forward pass through the net before recalibrate_batchnorm"):
        recalibrate_batchnorm(lazy, torch.rand(4, 3, 8, 8))


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


def test_a_one_image_remainder_joins_the_batch_before_it_or_is_left_out():
    # 9 images in batches of 4: 4 + 5, not 4 + 4 + 1 (a batch of one has no variance).
    net = _trained_net()
    images = torch.rand(9, 3, 16, 16)
    assert recalibrate_batchnorm(net, images, batch_size=4) == 9
    with torch.no_grad():
        mean = net[0](images).mean((0, 2, 3))
    torch.testing.assert_close(net[1].running_mean, mean, rtol=1e-5, atol=1e-6)
    assert int(net[1].num_batches_tracked) == 2
    # max_images cuts first: 17 of 20 images in batches of 8 are 8 + 9.
    assert recalibrate_batchnorm(net, torch.rand(20, 3, 16, 16), batch_size=8, max_images=17) == 17
    assert int(net[1].num_batches_tracked) == 2
    # A loader's one-image last batch is left out.
    loader = [torch.rand(4, 3, 16, 16), torch.rand(1, 3, 16, 16)]
    assert recalibrate_batchnorm(net, loader) == 4
    with torch.no_grad():
        torch.testing.assert_close(net[1].running_mean, net[0](loader[0]).mean((0, 2, 3)), rtol=1e-5, atol=1e-6)


def test_max_images_one_past_whole_batches_stops_instead_of_reading_the_rest():
    """Before: with 511 images seen, every later batch was cut to one image and skipped, and the whole
    iterable was read (512 = 73 x 7 + 1)."""
    net = _trained_net()
    drawn = []

    def batches():
        for _ in range(1000):
            drawn.append(1)
            yield torch.rand(7, 3, 16, 16)

    assert recalibrate_batchnorm(net, batches()) == 511
    assert len(drawn) == 74  # 73 whole batches and the one that was cut to one image
    assert recalibrate_batchnorm(net, [torch.rand(1, 3, 16, 16), torch.rand(4, 3, 16, 16)]) == 4  # no cap: go on


def test_integer_images_without_a_transform_and_dict_batches_are_type_errors():
    net = _trained_net()
    before = batchnorm_state(net)
    with pytest.raises(TypeError, match="did not take torch.uint8 images .*BYOLAugment\\(image_size\\).normalize"):
        recalibrate_batchnorm(net, torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8))
    with pytest.raises(TypeError, match="got a dict; pass the images alone"):
        recalibrate_batchnorm(net, [{"pixel_values": torch.rand(4, 3, 16, 16)}])
    assert all(torch.equal(before[k], v) for k, v in batchnorm_state(net).items())


class _Scaled(nn.Module):
    def forward(self, x):
        return x.float() / 255


def test_uint8_images_go_to_a_net_that_scales_them_itself():
    """A review caught the error above refusing uint8 before the net was tried: a net that scales its own input
    was recalibrated before and is again."""
    net = nn.Sequential(_Scaled(), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    assert recalibrate_batchnorm(net, images) == 8
    with torch.no_grad():
        reference = net[1](images.float() / 255).mean((0, 2, 3))
    torch.testing.assert_close(net[2].running_mean, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "images, kwargs, message",
    [
        (torch.rand(0, 3, 16, 16), {}, "got no images"),
        (torch.rand(1, 3, 16, 16), {}, "a batch of one image has no variance"),
        ([torch.rand(1, 3, 16, 16)] * 3, {}, "a batch of one image has no variance"),
        (torch.rand(4, 3, 16, 16), {"max_images": 0}, "max_images must be at least 1"),
        (torch.rand(4, 3, 16, 16), {"batch_size": 1}, r"batch_size must be at least 2 \(a batch of one image"),
    ],
)
def test_bad_input_is_an_error_and_leaves_the_statistics(images, kwargs, message):
    net = _trained_net()
    before = batchnorm_state(net)
    with pytest.raises(ValueError, match=message):
        recalibrate_batchnorm(net, images, **kwargs)
    after = batchnorm_state(net)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kwargs", [{"max_images": 100.0}, {"batch_size": 8.0}, {"batch_size": True}])
def test_counts_that_are_not_whole_numbers_are_a_type_error_naming_them(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(TypeError, match=f"{name} must be a whole number"):
        recalibrate_batchnorm(_trained_net(), torch.rand(8, 3, 16, 16), **kwargs)


def test_numpy_integer_counts_are_taken():
    import numpy as np

    assert (
        recalibrate_batchnorm(_trained_net(), torch.rand(8, 3, 16, 16), max_images=np.int64(6), batch_size=np.int32(3))
        == 6
    )


def test_the_byol_learner_is_refused_with_its_backbone_named_and_nothing_changes():
    from byol_pytorch import BYOL

    learner = BYOL(_trained_net(), image_size=16, projection_size=8, projection_hidden_size=16)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    with pytest.raises(TypeError, match=r"given the BYOL learner.*pass the backbone, learner\.net"):
        recalibrate_batchnorm(learner, torch.rand(8, 3, 16, 16))
    assert learner.target_encoder is None  # no training forward ran
    assert all(torch.equal(before[k], v) for k, v in learner.state_dict().items())
    assert recalibrate_batchnorm(learner.net, torch.rand(8, 3, 16, 16)) == 8


class _NoFloat64(torch.utils._python_dispatch.TorchDispatchMode):
    """Refuses every op that makes a float64 tensor, as an MPS device does (it has no float64)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in torch.utils._pytree.tree_leaves(out):
            if isinstance(value, torch.Tensor) and value.dtype == torch.float64:
                raise TypeError(f"{func} made a float64 tensor (MPS has none)")
        return out


@pytest.mark.parametrize("images", [torch.rand(8, 3, 16, 16), [torch.rand(1, 3, 16, 16)] * 2])
def test_recalibration_makes_no_float64_tensor_and_restores_half_statistics_exactly(images):
    """Before: the statistics were saved as one float64 vector, so every recalibration (--bn-stats clean at each
    checkpoint, kNN, embed, eval) stopped on an MPS device."""
    net = _trained_net().half()
    before = batchnorm_state(net)
    with _NoFloat64():
        if isinstance(images, list):  # a failed pass: the saved statistics come back
            with pytest.raises(ValueError, match="a batch of one image"):
                recalibrate_batchnorm(net, images, transform=lambda x: x.half())
        else:
            assert recalibrate_batchnorm(net, images, transform=lambda x: x.half()) == 8
    after = batchnorm_state(net)
    assert all(after[k].dtype == before[k].dtype for k in before)
    assert all(torch.equal(before[k], after[k]) for k in before) == isinstance(images, list)


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


def test_the_plain_copy_of_a_syncbatchnorm_net_keeps_its_dtype_and_device():
    # The copy's BatchNorm layers are made where the net's live (a CUDA net's on its GPU; here a
    # float64 net's in float64), so the recalibration forward mixes no devices or dtypes.
    net = nn.SyncBatchNorm.convert_sync_batchnorm(_trained_net()).double()
    images = torch.rand(12, 3, 16, 16, dtype=torch.float64)
    with clean_statistics(net, images, batch_size=6) as clean:
        assert clean[1].running_mean.dtype == torch.float64
        assert torch.isfinite(clean(images)).all()
    untracked = nn.SyncBatchNorm.convert_sync_batchnorm(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4, track_running_stats=False))
    )
    with clean_statistics(untracked, torch.rand(6, 3, 8, 8), batch_size=6) as clean:
        assert clean[2].running_mean is None


def test_frozen_statistics_normalise_with_the_running_ones_and_train_the_affine_weights():
    """A frozen layer, in the net and in its deep copy (BYOL's target), stays in eval mode under ``train()``:
    it normalises with its running statistics (the reference computed by hand), never updates them, and its
    weight and bias still get gradients."""
    import copy

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    net[1].running_mean.fill_(0.5)
    net[1].running_var.fill_(4.0)
    assert freeze_batchnorm_statistics(net) == 1
    assert freeze_batchnorm_statistics(net) == 1 and type(net[1]).__mro__[2] is nn.BatchNorm2d  # not frozen twice
    target = copy.deepcopy(net)
    for model in (net, target):
        model.train()
        assert model.training and not model[1].training and isinstance(model[1], nn.BatchNorm2d)
    x = torch.randn(8, 3, 8, 8)
    conv = net[0](x).detach()
    expected = torch.relu((conv - 0.5) / torch.sqrt(torch.tensor(4.0 + net[1].eps)))  # weight 1, bias 0
    out = net(x)
    torch.testing.assert_close(out, expected)
    out.pow(2).sum().backward()
    assert net[1].weight.grad.abs().sum() > 0 and net[1].bias.grad.abs().sum() > 0
    assert torch.equal(net[1].running_mean, torch.full((4,), 0.5)) and int(net[1].num_batches_tracked) == 0
    buffer = io.BytesIO()
    torch.save(net, buffer)  # a whole-module pickle (spawned processes do the same): the class is rebuilt
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert type(loaded[1]) is type(net[1]) and not loaded.train()[1].training
    torch.testing.assert_close(loaded(x), net(x))
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    fresh.load_state_dict(net.state_dict())  # the same keys as a plain net: export loads it anywhere
    torch.testing.assert_close(fresh.eval()(x), net(x))


def test_timm_batchnorm_act_layers_freeze_and_keep_their_activation():
    import timm

    net = timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=0)
    count = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = net.eval()(x)  # eval mode: the running statistics, what frozen layers use in train mode
    assert freeze_batchnorm_statistics(net) == count > 10
    assert all(type(m).__name__ == "FrozenStatisticsBatchNormAct2d" for m in batchnorm_layers(net))
    with torch.no_grad():
        torch.testing.assert_close(net.train()(x), reference)  # no dropout in mobilenetv3 with num_classes=0
    assert batchnorm_layers(net, frozen=False) == []


def test_recalibration_and_clean_statistics_leave_frozen_layers_alone():
    net = _trained_net()
    freeze_batchnorm_statistics(nn.Sequential(net[1]))  # the first layer frozen, the second not
    before = batchnorm_state(net)
    assert recalibrate_batchnorm(net, torch.rand(20, 3, 16, 16), batch_size=10) == 20
    after = batchnorm_state(net)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("1."))
    assert not torch.equal(before["4.running_mean"], after["4.running_mean"])
    frozen = _trained_net()
    assert freeze_batchnorm_statistics(frozen) == 2
    assert recalibrate_batchnorm(frozen, torch.rand(20, 3, 16, 16)) == 0  # nothing to re-estimate: not run
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(_trained_net())
    freeze_batchnorm_statistics(synced)  # frozen SyncBatchNorm: eval mode, no collective, no re-estimation
    trained = batchnorm_state(synced)
    with clean_statistics(synced, torch.rand(12, 3, 16, 16), batch_size=6) as clean:
        assert all(torch.equal(trained[k], v) for k, v in batchnorm_state(clean).items())
    assert not synced.train()[1].training


def test_sync_conversion_keeps_frozen_layers_and_lazy_layers_are_refused():
    """PyTorch's SyncBatchNorm conversion rebuilds every layer; ours gives frozen ones back frozen, others as PyTorch
    does. A lazy layer not yet initialised would drop the frozen class at its first forward: refused, with the fix."""
    net = _trained_net()
    freeze_batchnorm_statistics(nn.Sequential(net[1]))  # layer 1 frozen, layer 4 not
    plain = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net))
    assert plain.train()[1].training  # what the conversion alone does: the freezing is lost
    synced = convert_sync_batchnorm(net).train()
    assert isinstance(synced[1], nn.SyncBatchNorm) and not synced[1].training
    assert isinstance(synced[4], nn.SyncBatchNorm) and synced[4].training
    assert batchnorm_layers(synced, frozen=False) == [synced[4]]
    x = torch.randn(4, 3, 16, 16)
    expected = torch.relu(
        nn.functional.batch_norm(
            synced[0](x),
            synced[1].running_mean,
            synced[1].running_var,
            synced[1].weight,
            synced[1].bias,
            False,
            0.0,
            synced[1].eps,
        )
    )
    torch.testing.assert_close(synced[2](synced[1](synced[0](x))), expected)  # eval-mode SyncBatchNorm: no peers
    lazy = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="run one forward pass through the net before freeze_batchnorm_statistics"):
        freeze_batchnorm_statistics(lazy)
    lazy(torch.randn(2, 3, 8, 8))
    assert freeze_batchnorm_statistics(lazy) == 1 and not lazy.train()[1].training


def test_what_is_not_a_module_is_a_type_error_naming_it():
    """Docs probe: recalibrate_batchnorm("x", ...) and freeze_batchnorm_statistics("x") were AttributeErrors."""
    from byol_pytorch import freeze_batchnorm_statistics

    for call in (lambda: recalibrate_batchnorm("x", torch.rand(4, 3, 8, 8)), lambda: freeze_batchnorm_statistics("x")):
        with pytest.raises(TypeError, match="expected the net as a torch.nn.Module, got str"):
            call()


def test_frozen_layers_stay_leaves_for_fx_and_feature_extraction():
    """Before: the frozen class named byol_pytorch.batchnorm as its module, so torch.fx traced into it
    ('symbolically traced variables cannot be used as inputs to control flow') and torchvision's
    create_feature_extractor failed on a frozen net."""
    from torchvision.models import resnet18
    from torchvision.models.feature_extraction import create_feature_extractor

    net = _trained_net()
    freeze_batchnorm_statistics(net)
    traced = torch.fx.symbolic_trace(net)
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"][:2] == ["0", "1"]
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(traced(x), net(x))
    backbone = resnet18(weights=None)
    freeze_batchnorm_statistics(backbone)
    features = create_feature_extractor(backbone, {"layer4": "out"})(torch.rand(2, 3, 64, 64))["out"]
    assert features.shape == (2, 512, 2, 2)


def test_a_half_net_whose_variance_overflows_and_a_layer_called_by_keyword():
    """A review: a variance above float16's 65504 was stored as inf with no error (the check ran on the float32
    value), and a BatchNorm called as bn(input=x) failed in the pooling hook (args[0])."""
    net = nn.Sequential(nn.BatchNorm2d(2)).half()
    before = batchnorm_state(net)
    with pytest.raises(ValueError, match=r"overflow in torch\.float16\): recalibrate in float32"):
        recalibrate_batchnorm(net, torch.rand(4, 2, 3, 3).half() * 1000)
    assert all(torch.equal(before[k], v) for k, v in batchnorm_state(net).items())

    class ByKeyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x):
            return self.bn(input=x)

    keyword = ByKeyword()
    images = torch.rand(6, 2, 3, 3)
    assert recalibrate_batchnorm(keyword, images) == 6
    torch.testing.assert_close(keyword.bn.running_mean, images.mean((0, 2, 3)))


def test_numpy_images_and_a_wrong_channel_count_are_named_and_nothing_changes():
    import numpy as np

    net = small_cnn()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(TypeError, match=r"takes torch tensors: convert a numpy array with torch.from_numpy"):
        recalibrate_batchnorm(net, np.random.rand(4, 3, 16, 16).astype("float32"))  # was pixel_values advice
    with pytest.raises(ValueError, match=r"the images have 1 channels and the net takes 3 .*match_channels\(x, 3\)"):
        recalibrate_batchnorm(net, torch.rand(4, 1, 16, 16))  # was the convolution's bare RuntimeError
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_a_net_without_convolutions_keeps_the_dtype_advice():
    """The review: a Linear net given uint8 images was told about channels (infer_channels' default of 3)."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.BatchNorm1d(8))
    with pytest.raises(TypeError, match=r"did not take torch.uint8 images .*pass transform="):
        recalibrate_batchnorm(net, torch.zeros(8, 1, 28, 28, dtype=torch.uint8))
