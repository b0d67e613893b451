"""Hidden-layer discovery, capture and pooling across timm, torchvision and user backbones."""

import copy

import pytest
import timm
import torch
import torch.nn as nn
import torchvision
from conftest import small_cnn

from byol_pytorch import BYOL
from byol_pytorch.encoder import pool_hidden

SMALL = dict(projection_size=16, projection_hidden_size=32)


def _vit_tiny():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, dynamic_img_size=True)


# (builder, image size, expected hidden layer, expected width)
BACKBONES = {
    "tv_resnet18": (lambda: torchvision.models.resnet18(weights=None), 32, "fc", 512),
    "tv_mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(weights=None), 32, "classifier.3", 1024),
    "tv_vit_b_16": (lambda: torchvision.models.vit_b_16(weights=None, image_size=32), 32, "heads.head", 768),
    "timm_resnet10t": (lambda: timm.create_model("resnet10t", pretrained=False), 32, "fc", 512),
    "timm_efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", pretrained=False), 32, "classifier", 1280),
    "timm_convnext_atto": (lambda: timm.create_model("convnext_atto", pretrained=False), 32, "head.fc", 320),
    "timm_vit_tiny_dynamic": (_vit_tiny, 32, "head", 192),
    "timm_resnet10t_in_chans1": (lambda: timm.create_model("resnet10t", pretrained=False, in_chans=1), 32, "fc", 512),
    "timm_no_classifier": (
        lambda: timm.create_model("resnet10t", pretrained=False, num_classes=0),
        32,
        "<output>",
        512,
    ),
    # A 1x1 conv head after the pool, then an in-place activation: the representation is
    # the activated output (the conv is not a classifier; issue 12's collapsed mobile nets).
    "timm_mobilenetv3_no_classifier": (
        lambda: timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=0),
        32,
        "<output>",
        1024,
    ),
    "timm_ghostnet_no_classifier": (
        lambda: timm.create_model("ghostnet_050", pretrained=False, num_classes=0),
        32,
        "<output>",
        1280,
    ),
    "user_sequential_cnn": (small_cnn, 32, "8", 32),
    # DLA's classifier is a 1x1 convolution over the pooled 1x1 maps, flattened.
    "timm_dla46x_c_conv_classifier": (lambda: timm.create_model("dla46x_c", pretrained=False), 32, "fc", 256),
}


@pytest.mark.parametrize("name", list(BACKBONES))
def test_backbone_trains_and_every_parameter_gets_a_gradient(name):
    build, size, layer, width = BACKBONES[name]
    torch.manual_seed(0)
    net = build()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    learner = BYOL(net, image_size=size, **SMALL)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "construction touched the net"
    assert learner.hidden_layer == layer and learner.representation_size == width

    x = torch.rand(2, learner.channels, size + 8, size + 8)
    loss = learner(x)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    unused = set(learner.unused_parameter_names)
    for pname, p in learner.named_parameters():
        if not p.requires_grad:
            continue
        if pname in unused:
            assert p.grad is None, f"{pname} runs after the hidden layer and must get no gradient"
        else:
            assert p.grad is not None, f"{pname} got no gradient"
    heads = [p for m in (learner.online_encoder.projector, learner.online_predictor) for p in m.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads)

    learner.update_moving_average()
    learner.eval()
    projection, embedding = learner(x[..., :size, :size], return_embedding=True)
    assert embedding.shape == (2, width) and projection.shape == (2, 16)


def test_vit_dynamic_size_runs_at_another_resolution():
    learner = BYOL(_vit_tiny(), image_size=48, **SMALL)
    assert torch.isfinite(learner(torch.rand(2, 3, 64, 64)))


def test_named_layer_index_and_output_agree_on_resnet():
    net = torchvision.models.resnet18(weights=None).eval()
    x = torch.rand(2, 3, 32, 32)
    reference = nn.Sequential(*list(net.children())[:-1])(x).flatten(1)
    for hidden in ("avgpool", -2, "auto", "layer4"):
        learner = BYOL(net, image_size=32, hidden_layer=hidden, **SMALL).eval()
        emb = learner(x, return_embedding=True, return_projection=False)
        assert torch.allclose(emb, reference, atol=1e-5), hidden
    out = BYOL(net, image_size=32, hidden_layer=-1, **SMALL).eval()
    assert torch.allclose(out(x, return_embedding=True, return_projection=False), net(x), atol=1e-5)


def test_token_pooling_mean_and_cls():
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32).eval()
    x = torch.rand(2, 3, 32, 32)
    tokens = net.forward_features(x)  # (B, 1 + 4, 192) after the final norm
    mean = BYOL(net, 32, hidden_layer="norm", **SMALL).eval()
    cls = BYOL(net, 32, hidden_layer="norm", token_pool="cls", **SMALL).eval()
    assert torch.allclose(mean(x, return_embedding=True, return_projection=False), tokens.mean(1), atol=1e-5)
    assert torch.allclose(cls(x, return_embedding=True, return_projection=False), tokens[:, 0], atol=1e-5)


def test_pool_hidden_shapes_and_errors():
    assert pool_hidden(torch.ones(2, 5, 3, 3)).shape == (2, 5)
    assert pool_hidden(torch.ones(2, 7, 4)).shape == (2, 4)
    with pytest.raises(ValueError, match="shape"):
        pool_hidden(torch.ones(2, 3, 4, 5, 6))
    with pytest.raises(TypeError, match="not a tensor"):
        pool_hidden((torch.ones(2, 3),))


class _SharedPool(nn.Module):
    """One pooling module run twice: for the features, then for a gate."""

    def __init__(self):
        super().__init__()
        self.body, self.aux = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)

    def forward(self, x):
        features = self.pool(torch.relu(self.body(x))).flatten(1)
        gate = torch.sigmoid(self.pool(self.aux(x)).flatten(1))
        return self.fc(features * gate)


def test_a_named_layer_run_twice_per_forward_is_named_in_a_warning_at_construction():
    with pytest.warns(UserWarning, match=r"hidden layer 'pool' runs 2 times in one forward of _SharedPool") as shown:
        learner = BYOL(_SharedPool(), 32, hidden_layer="pool", **SMALL)
    assert shown[0].filename == __file__  # the line that built the learner
    learner.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        last = learner.net.pool(learner.net.aux(x)).flatten(1)
    torch.testing.assert_close(learner(x, return_embedding=True, return_projection=False), last)  # as it says


def test_a_hooked_layer_replaced_after_wrapping_is_named_at_the_next_step():
    net = small_cnn()
    learner = BYOL(net, 32, **SMALL)  # auto: the input of the classifier, net[-1]
    net[-1] = nn.Identity()
    with pytest.raises(RuntimeError, match=r"did not run in this forward of Sequential: .* replaced"):
        learner(torch.rand(4, 3, 32, 32))


def test_a_part_that_fails_only_in_training_is_named_at_construction():
    """Before: torchvision's Inception v3 below 299 px (128 here; its auxiliary classifier runs only in training)
    was built, then failed at the first training step with a bare convolution error; the probe's eval mode hid it."""
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, init_weights=False, aux_logits=True)
    state, rng = copy.deepcopy(net.state_dict()), torch.get_rng_state()
    with pytest.raises(ValueError) as err:
        BYOL(net, 128, **SMALL)
    message = str(err.value)
    assert message.startswith("Inception3 runs in eval mode but fails in training mode, as BYOL trains it, on a probe")
    assert "in 'AuxLogits.conv1.conv' (Conv2d): " in message and "aux_logits=False" in message
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())  # the user's net: not run
    assert torch.equal(torch.get_rng_state(), rng) and net.training
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, init_weights=False, aux_logits=False)
    learner = BYOL(net, 128, **SMALL)
    loss = learner(torch.rand(2, 3, 128, 128))
    loss.backward()
    assert torch.isfinite(loss) and net.Mixed_5b.branch1x1.conv.weight.grad is not None


def test_the_training_mode_check_calls_train_with_its_mode():
    """Review: the check called net.train(), so a root whose train(mode) has no default was refused, though BYOL's
    learner.train() passes the mode down."""

    class ModeWithoutDefault(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = small_cnn()

        def train(self, mode):  # noqa: FBT001 (a user's signature)
            return super().train(mode)

        def forward(self, x):
            return self.body(x)

    learner = BYOL(ModeWithoutDefault(), 32, **SMALL)
    loss = learner(torch.rand(4, 3, 32, 32))
    loss.backward()
    assert torch.isfinite(loss)


def test_the_cli_builds_inception_v3_without_its_auxiliary_classifier_below_299_px():
    from byol_pytorch.training.models import build_backbone

    assert build_backbone("torchvision:inception_v3", image_size=128).AuxLogits is None
    assert build_backbone("torchvision:inception_v3", image_size=299).AuxLogits is not None  # as runs made there


def test_a_sync_batchnorm_net_under_a_process_group_is_built_on_the_cpu(tmp_path):
    """The training-mode check leaves SyncBatchNorm nets alone: their training forward needs a GPU and collectives
    (BYOLTrainer and train --sync-bn-backbone convert on the CPU under torchrun; the check refused every start)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(torchvision.models.resnet18(weights=None))
        learner = BYOL(net, 32, **SMALL)
    finally:
        dist.destroy_process_group()
    assert learner.representation_size == 512


def test_a_module_object_stands_for_its_name():
    net = torchvision.models.resnet18(weights=None).eval()
    x = torch.rand(2, 3, 32, 32)
    by_name = BYOL(net, 32, hidden_layer="layer4.1", **SMALL).eval()
    by_module = BYOL(net, 32, hidden_layer=net.layer4[1], **SMALL).eval()
    assert by_module.hidden_layer == "layer4.1"
    reference = by_name(x, return_embedding=True, return_projection=False)
    assert torch.equal(by_module(x, return_embedding=True, return_projection=False), reference)
    whole = BYOL(net, 32, hidden_layer=net, **SMALL).eval()  # the net itself: its output, as -1
    assert torch.allclose(whole(x, return_embedding=True, return_projection=False), net(x), atol=1e-5)


def test_a_module_as_the_layer_survives_the_sync_batchnorm_conversion_by_name():
    """A review: BYOLTrainer converts BatchNorm to SyncBatchNorm under CUDA DDP before BYOL sees the net, which
    replaced a BatchNorm given as the layer; its name (``layer_by_name``, taken first) still finds it."""
    from byol_pytorch._discovery import layer_by_name
    from byol_pytorch.batchnorm import convert_sync_batchnorm

    net = torchvision.models.resnet18(weights=None)
    layer = net.layer4[1].bn2
    name = layer_by_name(net, layer)
    assert name == "layer4.1.bn2" and layer_by_name(net, net) == -1 and layer_by_name(net, "avgpool") == "avgpool"
    converted = convert_sync_batchnorm(net)
    with pytest.raises(ValueError, match="not a submodule"):
        BYOL(converted, 32, hidden_layer=layer, **SMALL)
    learner = BYOL(converted, 32, hidden_layer=name, **SMALL)
    assert learner.hidden_layer == "layer4.1.bn2" and learner.representation_size == 512


def test_a_module_of_another_net_is_refused_with_the_fix():
    net = torchvision.models.resnet18(weights=None)
    other = torchvision.models.resnet18(weights=None)
    with pytest.raises(ValueError, match="BasicBlock given as hidden_layer is not a submodule of the ResNet"):
        BYOL(net, 32, hidden_layer=other.layer4[1], **SMALL)
    with pytest.raises(TypeError, match="a submodule of the net"):
        BYOL(net, 32, hidden_layer=4.0, **SMALL)


def test_layer_not_found_lists_close_names():
    with pytest.raises(ValueError) as err:
        BYOL(torchvision.models.resnet18(weights=None), 32, hidden_layer="layer5")
    message = str(err.value)
    assert "'layer5' not found" in message and "'layer4'" in message and "named_modules" in message


class WithSpare(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = small_cnn()
        self.spare = nn.Linear(3, 3)

    def forward(self, x):
        return self.body(x)


def test_layer_that_never_runs_is_an_error():
    with pytest.raises(ValueError, match="never ran"):
        BYOL(WithSpare(), 32, hidden_layer="spare", **SMALL)


def test_a_stage_that_timm_checkpointing_skips_is_named_with_the_cause():
    """timm's gradient checkpointing runs a stage's blocks without calling the stage: the message said only that
    'layer4' never ran. It now names checkpointing and the way round it; a block of the stage trains."""
    net = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    net.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match=r"never ran .*gradient checkpointing is on.*hook a block"):
        BYOL(net, 32, hidden_layer="layer4", **SMALL)
    loss = BYOL(net, 32, hidden_layer="layer4.0", **SMALL)(torch.rand(4, 3, 32, 32))
    loss.backward()
    assert net.layer4[0].conv1.weight.grad is not None

    other = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    learner = BYOL(other, 32, hidden_layer="layer4", **SMALL)
    other.set_grad_checkpointing(True)  # after wrapping: caught at the step
    with pytest.raises(RuntimeError, match=r"did not run in this forward of ResNet \(gradient checkpointing is on"):
        learner(torch.rand(4, 3, 32, 32))
    with pytest.raises(ValueError, match=r"never ran during the forward pass of WithSpare; pick"):
        BYOL(WithSpare(), 32, hidden_layer="spare", **SMALL)  # no checkpointing: no clause


# ----------------------------------------------------------------------------- structured outputs, keywords, heads
class _Body(nn.Module):
    """A small conv body: (B, 3, H, W) -> maps (B, 16, H/2, W/2), pooled (B, 16)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.bn(self.stem(x))))


class DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _Body()
        self.pool_proj = nn.Linear(16, 24)  # the net's own pooler, as pooler_output

    def forward(self, x):
        maps = self.body(x)
        return {"last_hidden_state": maps, "pooler_output": self.pool_proj(maps.mean((2, 3)))}


class DictNoPooler(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _Body()

    def forward(self, x):
        return {"hidden_states": [x], "last_hidden_state": self.body(x)}


class DictClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _Body()
        self.pooler = nn.Linear(16, 20)  # runs, but the classifier does not read it
        self.classifier = nn.Linear(16, 5)

    def forward(self, x):
        feats = self.body(x).mean((2, 3))
        return {"pooler_output": self.pooler(feats), "logits": self.classifier(feats)}


class TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _Body()

    def forward(self, x):
        maps = self.body(x)
        return "not a tensor", maps, maps.mean((2, 3))


class KeywordNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _Body()
        self.fc = nn.Linear(16, 7)

    def forward(self, *, pixel_values):
        return self.fc(self.body(pixel_values).mean((2, 3)))


class DistilledHeads(nn.Module):
    """Distillation heads averaged at inference, as timm's efficientformer does."""

    def __init__(self):
        super().__init__()
        self.body = _Body()
        self.head = nn.Linear(16, 10)
        self.head_dist = nn.Linear(16, 10)

    def forward(self, x):
        x = self.body(x).mean((2, 3))
        return (self.head(x) + self.head_dist(x)) / 2


class TokenAuxHeads(nn.Module):
    """VOLO's inference head: the class token's logits plus half the max of per-token logits."""

    def __init__(self):
        super().__init__()
        self.body = _Body()
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 10)
        self.aux_head = nn.Linear(16, 10)

    def forward(self, x):
        tokens = self.norm(self.body(x).flatten(2).transpose(1, 2))  # (B, N, 16)
        return self.head(tokens[:, 0]) + 0.5 * self.aux_head(tokens[:, 1:]).max(1)[0]


class TokenHeadsSharedDropout(nn.Module):
    """PiT's distilled head: one dropout module applied to the class token, then to the distillation token."""

    def __init__(self):
        super().__init__()
        self.body = _Body()
        self.norm = nn.LayerNorm(16)
        self.head_drop = nn.Dropout(0.0)
        self.head = nn.Linear(16, 10)
        self.head_dist = nn.Linear(16, 10)

    def forward(self, x):
        tokens = self.norm(self.body(x).flatten(2).transpose(1, 2)[:, :2])  # (B, 2, 16): class, distillation
        first, second = self.head_drop(tokens[:, 0]), self.head_drop(tokens[:, 1])
        return (self.head(first) + self.head_dist(second)) / 2


class SharedBlockTokenHeads(nn.Module):
    """One block run three times (ALBERT's weight sharing), class and distillation heads on their own tokens."""

    def __init__(self):
        super().__init__()
        self.body = _Body()
        self.block = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10)
        self.head_dist = nn.Linear(16, 10)

    def tokens(self, x, runs=3):
        tokens = self.body(x).flatten(2).transpose(1, 2)
        for _ in range(runs):
            tokens = tokens + torch.tanh(self.block(tokens))
        return tokens

    def forward(self, x):
        tokens = self.tokens(x)
        return (self.head(tokens[:, 0]) + self.head_dist(tokens[:, 1])) / 2


class OpaqueOutput(nn.Module):
    """Returns an object auto cannot read a representation from."""

    def __init__(self):
        super().__init__()
        self.body = _Body()
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return {"summary": "done", "size": self.norm(self.body(x).mean((2, 3))).shape}


def _body_maps(net, x):
    return net.body(x)


# (net class, expected hidden layer, reference embedding from the net's own parts, unused parameter names)
PLAIN = {
    "dict_pooler": (DictNet, "<output>.pooler_output", lambda n, x: n.pool_proj(n.body(x).mean((2, 3))), []),
    "dict_tokens": (DictNoPooler, "<output>.last_hidden_state", lambda n, x: n.body(x).mean((2, 3)), []),
    "dict_classifier": (
        DictClassifier,
        "classifier",
        lambda n, x: n.body(x).mean((2, 3)),
        ["pooler.weight", "pooler.bias", "classifier.weight", "classifier.bias"],
    ),
    "tuple": (TupleNet, "<output>[1]", lambda n, x: n.body(x).mean((2, 3)), []),
    "keyword_only": (KeywordNet, "fc", lambda n, x: n.body(x).mean((2, 3)), ["fc.weight", "fc.bias"]),
    "distilled_heads": (
        DistilledHeads,
        "head",
        lambda n, x: n.body(x).mean((2, 3)),
        ["head.weight", "head.bias", "head_dist.weight", "head_dist.bias"],
    ),
    "token_aux_heads": (
        TokenAuxHeads,
        "norm",  # the heads read different tokens: the tokens before them, mean-pooled
        lambda n, x: n.norm(n.body(x).flatten(2).transpose(1, 2)).mean(1),
        ["head.weight", "head.bias", "aux_head.weight", "aux_head.bias"],
    ),
    "shared_block_token_heads": (
        SharedBlockTokenHeads,
        "block",  # its last call is the tokens the heads read (a module run more than once is not passed over)
        lambda n, x: n.block(n.tokens(x, runs=2)).mean(1),  # the block's third (last) call
        ["head.weight", "head.bias", "head_dist.weight", "head_dist.bias"],
    ),
    "token_heads_shared_dropout": (
        TokenHeadsSharedDropout,
        "norm",  # not head_drop, whose hook sees only its last call (the distillation token)
        lambda n, x: n.norm(n.body(x).flatten(2).transpose(1, 2)[:, :2]).mean(1),
        ["head.weight", "head.bias", "head_dist.weight", "head_dist.bias"],
    ),
}


@pytest.mark.parametrize("kind", list(PLAIN))
def test_structured_outputs_keywords_and_heads(kind):
    cls, layer, reference, unused = PLAIN[kind]
    torch.manual_seed(0)
    net = cls()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    learner = BYOL(net, image_size=16, **SMALL)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert all(m.training for m in net.modules())
    assert learner.hidden_layer == layer
    assert sorted(learner.unused_parameter_names) == sorted(f"online_encoder.net.{n}" for n in unused)

    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    learner(torch.rand(4, 3, 16, 16)).backward()
    assert net.body.stem.weight.grad is not None and net.body.stem.weight.grad.abs().sum() > 0
    for name, p in net.named_parameters():
        assert (p.grad is None) == (name in unused), name
    optimizer.step()
    learner.update_moving_average()

    learner.eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        projection, embedding = learner(x, return_embedding=True)
        expected = reference(net.eval(), x)
    assert projection.shape == (2, 16)
    assert torch.allclose(embedding, expected, atol=1e-5)
    copied = copy.deepcopy(learner)
    assert torch.equal(copied(x, return_embedding=True, return_projection=False), embedding)


def test_keyword_only_net_detected_and_forced():
    from byol_pytorch.encoder import detect_input_name

    assert detect_input_name(KeywordNet()) == "pixel_values"
    assert detect_input_name(DictNet()) is None
    learner = BYOL(KeywordNet(), image_size=16, input_name="pixel_values", **SMALL)
    assert learner.online_encoder.input_name == "pixel_values"
    # Before: "could not run DictNet as net(pixel_values=x) ... Check image_size and the channel count".
    with pytest.raises(
        ValueError,
        match=r"input_name='pixel_values': DictNet.forward takes no argument of that name "
        r"\(it takes: x\); pass the name of the argument that takes the images, or leave input_name",
    ):
        BYOL(DictNet(), image_size=16, input_name="pixel_values", **SMALL)


def test_a_keyword_net_called_positionally_gets_the_input_name_advice():
    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 3, 1), nn.Linear(3, 2)

        def forward(self, **inputs):  # no signature to read the keyword from
            return self.fc(self.conv(inputs["images"]).mean((2, 3)))

    with pytest.raises(ValueError, match="input_name="):
        BYOL(Kw(), image_size=8, channels=3, **SMALL)
    learner = BYOL(Kw(), image_size=8, channels=3, input_name="images", **SMALL)
    assert learner.hidden_layer == "fc" and learner.representation_size == 3


@pytest.mark.parametrize(
    "name, size, width",
    [
        ("efficientformer_l1", 224, 448),
        ("deit_tiny_distilled_patch16_224", 32, 192),
        ("pit_ti_distilled_224", 224, 256),
    ],
)
def test_timm_distilled_heads_give_the_pooled_features(name, size, width):
    kwargs = {"img_size": size} if name.startswith("deit") else {}
    net = timm.create_model(name, pretrained=False, **kwargs)
    assert net.num_features == width  # timm's own pooled width
    learner = BYOL(net, image_size=size, **SMALL)
    assert learner.representation_size == width
    assert {"online_encoder.net.head.weight", "online_encoder.net.head_dist.weight"} <= set(
        learner.unused_parameter_names
    )
    x = torch.rand(2, 3, size, size)
    learner(x).backward()
    assert net.head.weight.grad is None and net.head_dist.weight.grad is None
    learner.eval()
    with torch.no_grad():
        embedding = learner(x, return_embedding=True, return_projection=False)
        net.eval()
        pooled = net.forward_head(net.forward_features(x), pre_logits=True)
    assert embedding.shape == (2, width)
    if not name.startswith("deit"):  # the heads read the pooled features (PiT: its two tokens' mean) themselves
        assert torch.allclose(embedding, pooled, atol=1e-5)


def test_auto_that_cannot_decide_names_a_layer_that_works():
    net = OpaqueOutput()
    with pytest.raises(TypeError) as err:
        BYOL(net, image_size=16, **SMALL)
    message = str(err.value)
    assert "produced a dict, not a tensor" in message
    assert "'norm' (D=16)" in message and "'body' (D=16)" in message
    suggestion = message.split("e.g. ", 1)[1]
    assert suggestion == 'BYOL(net, image_size=16, hidden_layer="norm")'
    learner = eval(suggestion, {"BYOL": BYOL, "net": net})  # the suggested call works as written
    assert learner.hidden_layer == "norm" and learner.representation_size == 16
    assert torch.isfinite(learner(torch.rand(2, 3, 16, 16)))


def test_named_layer_with_a_non_tensor_output_lists_candidates():
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = DictNet()

        def forward(self, x):
            return self.inner(x)["pooler_output"]

    with pytest.raises(TypeError, match=r"hidden layer 'inner' produced a dict.*'inner.pool_proj' \(D=24\)"):
        BYOL(Wrapped(), image_size=16, hidden_layer="inner", **SMALL)

    class Score(nn.Module):
        def forward(self, x):
            return x.mean((1, 2, 3))  # (B,): nothing to pool

    net = nn.Sequential(_Body(), Score())
    with pytest.raises(ValueError) as err:
        BYOL(net, image_size=16, hidden_layer="1", **SMALL)
    message = str(err.value)
    assert "hidden layer '1' produced a tensor of shape (2,)" in message
    assert message.endswith('e.g. BYOL(net, image_size=16, hidden_layer="0")')
    assert BYOL(net, image_size=16, hidden_layer="0", **SMALL).representation_size == 16


def test_probe_returns_a_frozen_dataclass():
    import dataclasses

    from byol_pytorch.encoder import BackboneProbe, probe_backbone

    net = torchvision.models.resnet18(weights=None)
    probe = probe_backbone(net, (32, 32), 3, "auto")
    assert isinstance(probe, BackboneProbe)
    assert (probe.name, probe.module, probe.use_input, probe.dim) == ("fc", net.fc, True, 512)
    assert probe.unused == ("fc.weight", "fc.bias") and probe.output_key is None and probe.input_name is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        probe.dim = 3  # type: ignore[misc]


def test_output_index_minus_one_reads_the_representation_entry():
    net = DictClassifier()
    learner = BYOL(net, image_size=16, hidden_layer=-1, **SMALL)  # no logits rule for an explicit -1
    assert learner.hidden_layer == "<output>.pooler_output" and learner.representation_size == 20
    assert learner.unused_parameter_names == [
        "online_encoder.net.classifier.weight",
        "online_encoder.net.classifier.bias",
    ]
    x = torch.rand(2, 3, 16, 16)
    learner.eval()
    with torch.no_grad():
        assert torch.allclose(learner(x, return_embedding=True)[1], net(x)["pooler_output"], atol=1e-6)


class _SpaceToDepthNet(nn.Module):
    """A stem that rearranges the image before its first convolution (as TResNet's), declaring in_chans."""

    def __init__(self, in_chans: int = 3):
        super().__init__()
        self.in_chans = in_chans
        self.conv = nn.Conv2d(in_chans * 16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.nn.functional.pixel_unshuffle(x, 4)  # (B, 16C, H/4, W/4)
        return self.fc(self.conv(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("in_chans", [1, 3])
def test_declared_input_channels_win_over_the_first_convolution(in_chans):
    from byol_pytorch.encoder import infer_channels

    net = _SpaceToDepthNet(in_chans)
    assert infer_channels(net) == in_chans  # the first convolution alone would say 16 * in_chans
    learner = BYOL(net, image_size=16, projection_size=8, projection_hidden_size=16)
    assert learner.channels == in_chans and learner.representation_size == 8
    assert learner(torch.rand(2, in_chans, 20, 20)).ndim == 0


@pytest.mark.parametrize("inplace", [True, False])
def test_conv_head_with_an_activation_after_the_pool_is_part_of_the_representation(inplace):
    # The 1x1 conv runs on pooled 1x1 maps like a conv classifier would; an activation
    # after it (in place or not) makes the net's output the features, not logits.
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Conv2d(8, 16, 1),
        nn.Hardswish(inplace=inplace),
        nn.Flatten(),
    )
    learner = BYOL(net, 16, **SMALL)
    x = torch.randn(4, 3, 16, 16)
    net.eval()
    with torch.no_grad():
        expected = net(x.clone())
        got = learner.online_encoder.embed(x)
    assert learner.online_encoder.layer_name == "<output>"
    torch.testing.assert_close(got, expected)


def _swin(**kwargs):
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=2, **kwargs)


def test_channels_last_maps_are_pooled_over_their_grid():
    # timm's Swin returns (B, H, W, C) maps: the embedding is their mean over H and W, computed here by hand.
    net = _swin(num_classes=10).eval()
    x = torch.rand(3, 3, 64, 64)
    learner = BYOL(net, 64, hidden_layer="norm", **SMALL).eval()
    assert learner.online_encoder.channels_last and learner.representation_size == 768
    reference = net.norm(net.layers(net.patch_embed(x))).mean(dim=(1, 2))  # (B, 2, 2, 768) -> (B, 768)
    torch.testing.assert_close(learner(x, return_embedding=True, return_projection=False), reference)
    # (B, C, H, W) maps keep their pooling, whatever the channel count (here C = H = W is possible).
    cnn = BYOL(torchvision.models.resnet18(weights=None), 32, hidden_layer="layer4", **SMALL)
    assert not cnn.online_encoder.channels_last and cnn.representation_size == 512


def test_features_only_nets_give_their_deepest_map():
    for net, width, channels_last in (
        (timm.create_model("resnet18", pretrained=False, features_only=True), 512, False),
        (_swin(features_only=True), 768, True),
    ):
        learner = BYOL(net, 64, **SMALL)
        last = len(net.feature_info.channels()) - 1
        assert learner.hidden_layer == f"<output>[{last}]" and learner.representation_size == width
        assert learner.online_encoder.channels_last is channels_last
        assert learner.unused_parameter_names == []  # the deepest map uses every stage


def test_a_dict_of_stages_maps_gives_its_deepest_map_and_trains_every_stage():
    """A probe: a dict of shrinking maps gave its first, shallowest map, so 45 of resnet18's 60 parameters (57 of
    timm's dict features) never trained, without a word; a tuple of the same maps gave the deepest."""
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.feature_extraction import create_feature_extractor

    layers = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
    getter = IntermediateLayerGetter(torchvision.models.resnet18(weights=None), return_layers=layers)
    timm_dict = timm.create_model("resnet18", pretrained=False, features_only=True, feature_cls="dict")
    extractor = create_feature_extractor(torchvision.models.resnet18(weights=None), {"layer2": "mid", "layer4": "out"})
    images = torch.rand(4, 3, 32, 32)
    for net, key in ((getter, "3"), (timm_dict, "4"), (extractor, "out")):
        learner = BYOL(net, 32, **SMALL)
        assert learner.hidden_layer == f"<output>.{key}" and learner.representation_size == 512
        learner.eval()
        deepest = net(images)[key].mean(dim=(2, 3))  # the spatial mean of the deepest map, computed here
        torch.testing.assert_close(learner(images, return_embedding=True, return_projection=False), deepest)
        learner.train()(images).backward()
        assert [name for name, p in net.named_parameters() if p.grad is None] == []

    class TwoOnOneGrid(nn.Module):  # a dict of maps on one grid is no pyramid: its first tensor, as before
        def __init__(self):
            super().__init__()
            self.conv, self.mask = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 1, 1)

        def forward(self, x):
            features = torch.relu(self.conv(x))
            return {"features": features, "mask": self.mask(features)}

    assert BYOL(TwoOnOneGrid(), 32, **SMALL).hidden_layer == "<output>.features"
    # An FPN's levels shrink to a parameter-free 'pool' (a max-pool of P5): the level most parameters reach, P2.
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    fpn = BYOL(resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5), 64, **SMALL)
    assert fpn.hidden_layer == "<output>.0" and fpn.representation_size == 256
    assert not any(".body." in name or "inner_blocks" in name for name in fpn.unused_parameter_names)


def test_heads_of_different_widths_averaged_are_refused_naming_the_ways_that_work():
    """A sweep of timm's families: CrossViT (heads of 96 and 192) and EfficientViM (a head per stage) took the
    first branch's layer, so 94% of EfficientViM got no gradient, without a word."""

    class TwoBranches(nn.Module):
        def __init__(self, heads=True):
            super().__init__()
            self.small, self.large = nn.Conv2d(3, 8, 3, stride=2), nn.Conv2d(3, 16, 3, stride=4)
            self.head = nn.ModuleList([nn.Linear(8, 10), nn.Linear(16, 10)] if heads else [nn.Identity()] * 2)

        def forward(self, x):
            features = [branch(x).mean(dim=(2, 3)) for branch in (self.small, self.large)]
            if isinstance(self.head[0], nn.Identity):
                return torch.cat(features, dim=1)  # headless: both branches, as timm's num_classes=0 gives them
            return torch.stack([head(f) for head, f in zip(self.head, features)]).mean(dim=0)

    with pytest.raises(
        ValueError,
        match=r"combines 2 classifier heads \('head.0', 'head.1'\) whose inputs differ in "
        r"width \(8, 16\).*without its classifiers \(timm: num_classes=0\)",
    ):
        BYOL(TwoBranches(), 32, **SMALL)
    headless = BYOL(TwoBranches(heads=False), 32, **SMALL)
    assert headless.hidden_layer == "<output>" and headless.representation_size == 24


def test_pairs_of_outputs_on_one_grid_are_not_a_pyramid():
    # (features, mask logits) on one grid and (tokens, attention weights) keep the first entry.
    class Segmenter(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.mask = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 1, 1)

        def forward(self, x):
            features = torch.relu(self.conv(x))
            return features, self.mask(features)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.attention = nn.Conv2d(3, 8, 8, 8), nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            tokens = self.embed(x).flatten(2).transpose(1, 2)
            return self.attention(tokens, tokens, tokens)

    assert BYOL(Segmenter(), 32, **SMALL).representation_size == 16
    assert BYOL(Attention(), 32, **SMALL).hidden_layer == "<output>[0]"
    # Entries of one shape throughout (a ViT's blocks as features_only gives them): the last, deepest.
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, features_only=True, out_indices=(0, 11)
    )
    assert BYOL(vit, 32, **SMALL).hidden_layer == "<output>[1]"


def test_a_softmax_at_any_temperature_is_read_before_its_classifier():
    class Tempered(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 10)

        def forward(self, x):
            return nn.functional.softmax(self.fc(self.conv(x).mean((2, 3))) / 0.1, dim=1)

    class Sigmoid(Tempered):
        def forward(self, x):
            return torch.sigmoid(self.fc(self.conv(x).mean((2, 3))))

    assert BYOL(Tempered(), 16, **SMALL).hidden_layer == "fc"
    assert BYOL(Sigmoid(), 16, **SMALL).hidden_layer == "<output>"  # no classes declared: maybe features
    declared = Sigmoid()
    declared.num_classes = 10  # a multi-label classifier (timm, torchvision and HF nets declare theirs)
    assert BYOL(declared, 16, **SMALL).hidden_layer == "fc"


class _Scored(nn.Module):
    num_classes = 10  # declared, as timm's, torchvision's and transformers' classifiers do

    def __init__(self, head):
        super().__init__()
        self.conv, self.fc, self.head = nn.Conv2d(3, 8, 3), nn.Linear(8, 10), head
        self.mlp = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
        self.temperature = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        return self.head(self, h)


@pytest.mark.parametrize(
    "head, layer, width",
    [
        (lambda net, h: net.fc(h) / 0.07, "fc", 8),  # a temperature
        (lambda net, h: net.fc(h) * net.temperature, "fc", 8),  # a learnt one
        (lambda net, h: net.fc(h) + 1.0, "fc", 8),
        (lambda net, h: nn.functional.normalize(net.fc(h), dim=1), "fc", 8),
        (lambda net, h: h + net.mlp(h), "<output>", 8),  # a residual block's output: features, not scores
        (lambda net, h: torch.cat([net.fc(h), h], 1), "<output>", 18),  # not of the scores alone
    ],
)
def test_an_output_made_of_the_last_linears_scores_alone_is_read_before_it(head, layer, width):
    """Before: sigmoid(fc(x)), fc(x) / T and the like trained the 10 class scores as the representation."""
    learner = BYOL(_Scored(head), 16, **SMALL)
    assert (learner.hidden_layer, learner.representation_size) == (layer, width)
    undeclared = _Scored(head)
    undeclared.num_classes = None  # a headless net's Linear -> activation is its features: the output stays
    assert BYOL(undeclared, 16, **SMALL).hidden_layer == "<output>"


def test_headless_nets_ending_in_a_linear_and_an_activation_keep_their_output():
    """A review caught the first version of the rule above taking tanh(fc(x)) of a headless net for scores."""
    import timm

    net = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 64), nn.Tanh()
    )
    assert (BYOL(net, 32, **SMALL).hidden_layer, BYOL(net, 32, **SMALL).representation_size) == ("<output>", 64)
    convnext = timm.create_model("convnext_atto", pretrained=False, num_classes=0, head_hidden_size=64)
    assert BYOL(convnext, 32, **SMALL).hidden_layer == "<output>"  # its pre-logits Linear + tanh: features


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_log_softmax_outputs_are_read_before_their_classifier_in_any_dtype(dtype):
    class Scores(nn.Module):
        def __init__(self, classes):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, classes)

        def forward(self, x):
            return nn.functional.log_softmax(self.fc(self.conv(x).mean((2, 3))), dim=1)

    for classes in (10, 1000):
        learner = BYOL(Scores(classes).to(dtype), 16, **SMALL)
        assert learner.hidden_layer == "fc" and learner.representation_size == 8, (dtype, classes)


def test_log_softmax_outputs_are_read_before_their_classifier():
    class TutorialNet(nn.Module):  # the pytorch/examples MNIST net's shape
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3)
            self.fc1 = nn.Linear(8 * 26 * 26, 32)
            self.fc2 = nn.Linear(32, 10)

        def forward(self, x):
            x = torch.relu(self.fc1(torch.flatten(torch.relu(self.conv(x)), 1)))
            return nn.functional.log_softmax(self.fc2(x), dim=1)

    learner = BYOL(TutorialNet(), 28, **SMALL)
    assert learner.hidden_layer == "fc2" and learner.representation_size == 32
    x = torch.rand(2, 1, 28, 28)
    net = learner.net
    reference = torch.relu(net.fc1(torch.flatten(torch.relu(net.conv(x)), 1)))
    learner.eval()
    torch.testing.assert_close(learner(x, return_embedding=True, return_projection=False), reference)


def test_a_sequence_first_layer_is_refused_with_the_layers_that_work():
    class SequenceFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 8, 8)
            self.mix = nn.Linear(16, 16)

        def forward(self, x):
            return self.mix(self.conv(x).flatten(2).permute(2, 0, 1))  # (N, B, D)

    with pytest.raises(ValueError, match=r"first dimension is not the batch.*'conv' \(D=16\)"):
        BYOL(SequenceFirst(), 32, hidden_layer="mix", **SMALL)


class ConvScores(nn.Module):
    """A classifier written as a convolution over the map, ReLU'd and averaged (SqueezeNet's, NiN's)."""

    def __init__(self, num_classes: int | None):
        super().__init__()
        if num_classes is not None:
            self.num_classes = num_classes
        self.features = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU())
        self.scores = nn.Conv2d(12, 10, 1)

    def forward(self, x):
        return torch.relu_(self.scores(self.features(x))).mean((2, 3))


@pytest.mark.parametrize(
    "make, layer, width",
    [
        (lambda: torchvision.models.squeezenet1_1(weights=None, num_classes=7), "classifier.1", 512),
        (lambda: ConvScores(num_classes=10), "scores", 12),
        (lambda: ConvScores(num_classes=None), "<output>", 10),  # no declared classes: the output is the features
        (lambda: ConvScores(num_classes=3), "<output>", 10),  # it declares other classes than it outputs
    ],
)
def test_a_classifier_written_as_an_averaged_convolution_gives_its_input(make, layer, width):
    """Before: SqueezeNet trained its class scores (D = num_classes) as the representation."""
    torch.manual_seed(0)
    net = make()
    learner = BYOL(net, image_size=32, **SMALL)
    assert learner.hidden_layer == layer and learner.representation_size == width
    x = torch.rand(4, 3, 32, 32)
    learner(x).backward()
    first = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
    learner.eval()
    net.eval()
    with torch.no_grad():
        embedding = learner(x, return_embedding=True, return_projection=False)
        expected = net(x) if layer == "<output>" else net.features(x).mean((2, 3))
    assert torch.allclose(embedding, expected, atol=1e-5)


def test_auto_takes_the_output_of_a_net_whose_classifier_is_its_first_layer():
    # the input of the only Linear is the images themselves: BYOL would train nothing of the net
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6))
    learner = BYOL(net, image_size=8, **SMALL)
    assert learner.representation_size == 6 and learner.unused_parameter_names == []
    learner(torch.rand(4, 3, 8, 8)).backward()
    assert net[1].weight.grad is not None and net[1].weight.grad.abs().sum() > 0


def test_a_hidden_layer_that_no_trainable_parameter_reaches_is_refused():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    net[0].requires_grad_(False)  # frozen before the classifier: "auto" (its input) would train nothing
    with pytest.raises(ValueError, match=r"the input of '3' of Sequential depends on none of its trainable .*unfreeze"):
        BYOL(net, image_size=8, **SMALL)
    with pytest.raises(ValueError, match=r"hidden layer '1' of Sequential depends on none of its trainable"):
        BYOL(nn.Sequential(nn.Flatten(), nn.Identity(), nn.Linear(3 * 8 * 8, 6)), image_size=8, hidden_layer=1, **SMALL)
    net.requires_grad_(False)  # a frozen net trains nothing by the user's choice: accepted
    assert BYOL(net, image_size=8, **SMALL).representation_size == 4


def test_a_hook_that_closes_over_the_users_net_still_counts_as_training_it():
    """The review: the probe runs a deep copy, whose copied hook still reaches the original's parameters."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    net.requires_grad_(False)
    net.A = nn.Parameter(torch.zeros(4, 4))  # trained through the hook alone (a low-rank adapter, say)
    net[3].register_forward_pre_hook(lambda m, args: (args[0] + args[0] @ net.A,))
    learner = BYOL(net, image_size=8, **SMALL)
    learner(torch.rand(4, 3, 8, 8)).backward()
    assert net.A.grad is not None


def test_a_keyword_net_whose_only_layer_is_its_classifier_takes_its_output():
    """The review: the keyword-net test above gained a conv; this one keeps a Linear as the first layer."""

    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, **inputs):
            return self.fc(inputs["images"].mean((2, 3)))

    learner = BYOL(Kw(), image_size=8, channels=3, input_name="images", **SMALL)
    assert learner.hidden_layer == "<output>" and learner.representation_size == 2  # the images' mean is no layer
