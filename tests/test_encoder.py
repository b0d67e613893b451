"""Hidden-layer discovery, capture and pooling across timm, torchvision and user backbones."""

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
    "user_sequential_cnn": (small_cnn, 32, "8", 32),
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


def test_layer_not_found_lists_close_names():
    with pytest.raises(ValueError) as err:
        BYOL(torchvision.models.resnet18(weights=None), 32, hidden_layer="layer5")
    message = str(err.value)
    assert "'layer5' not found" in message and "'layer4'" in message and "named_modules" in message


def test_layer_that_never_runs_is_an_error():
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = small_cnn()
            self.spare = nn.Linear(3, 3)

        def forward(self, x):
            return self.body(x)

    with pytest.raises(ValueError, match="never ran"):
        BYOL(WithSpare(), 32, hidden_layer="spare", **SMALL)
