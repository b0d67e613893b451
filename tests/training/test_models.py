"""models.py: backbones by name, their classifier removed, the learner of a recipe, and the export."""

import json

import pytest
import torch
import torch.nn as nn

from byol_pytorch import BYOL
from byol_pytorch.training.checkpoint import save_checkpoint
from byol_pytorch.training.models import build_backbone, build_learner, export_backbone, strip_classifier

RECIPE = dict(
    model="resnet10t", in_chans=3, image_size=32, projection_size=16, projection_hidden_size=32, tau_base=0.99
)


def _trained_checkpoint(tmp_path, recipe):
    torch.manual_seed(0)
    learner = build_learner(recipe)
    opt = torch.optim.SGD(learner.parameters(), lr=0.1)
    loss = learner(torch.randint(0, 256, (4, 3, 36, 36), dtype=torch.uint8))
    loss.backward()
    opt.step()
    learner.update_moving_average()
    path = save_checkpoint(tmp_path / "last.pt", {"step": 1, "learner": learner.state_dict(), "args": dict(recipe)})
    return path, learner


def test_export_timm_loads_strictly_and_via_pretrained_cfg_overlay(tmp_path, monkeypatch):
    import timm
    from safetensors.torch import load_file

    path, learner = _trained_checkpoint(tmp_path, RECIPE)
    out = export_backbone(path, tmp_path / "backbone.safetensors", bn_stats="trained")
    tensors = load_file(out)
    assert not any(k.startswith("fc.") for k in tensors)
    model = timm.create_model("resnet10t", num_classes=0)
    model.load_state_dict(tensors, strict=True)
    torch.testing.assert_close(model.conv1[0].weight, learner.net.conv1[0].weight)  # the trained weights

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a download attempt would fail loudly
    via_cfg = timm.create_model("resnet10t", pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(out)))
    for name, value in via_cfg.state_dict().items():
        torch.testing.assert_close(value, tensors[name])
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    learner.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), learner.net.forward_head(learner.net.forward_features(x), pre_logits=True))


def test_export_to_pt_is_a_torch_state_dict_and_over_its_checkpoint_is_refused(tmp_path):
    """Before: --out x.pt held safetensors (torch.load failed on it), and --out the checkpoint itself replaced
    the run's checkpoint with the bare backbone, so the run could not be resumed."""
    from safetensors.torch import load_file

    path, _ = _trained_checkpoint(tmp_path, RECIPE)
    reference = load_file(export_backbone(path, tmp_path / "b.safetensors", bn_stats="trained"))
    for name in ("b.pt", "b.pth", "b.bin"):
        tensors = torch.load(export_backbone(path, tmp_path / name, bn_stats="trained"), weights_only=True)
        assert tensors.keys() == reference.keys() and all(torch.equal(tensors[k], reference[k]) for k in reference)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="is the checkpoint being exported: .*choose another --out"):
        export_backbone(path, path)
    (tmp_path / "link.pt").symlink_to(path)
    with pytest.raises(ValueError, match="is the checkpoint being exported"):
        export_backbone(path, tmp_path / "link.pt")  # the same file by another name
    assert path.read_bytes() == before


def test_export_to_a_full_disk_is_an_os_error_naming_the_file(tmp_path, monkeypatch):
    """Before: safetensors' own SafetensorError (no OSError), a traceback on the command line."""
    import errno

    path, _ = _trained_checkpoint(tmp_path, RECIPE)
    real_open = open

    def full(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if "w" in mode and str(file).endswith(".tmp"):
            handle.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return handle

    monkeypatch.setattr("builtins.open", full)
    with pytest.raises(OSError) as caught:
        export_backbone(path, tmp_path / "b.safetensors")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "b.safetensors")
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "b.safetensors").exists()


def test_export_as_a_torch_file_to_a_disk_that_fills_is_an_os_error_naming_the_file(tmp_path, monkeypatch):
    """Before: torch's own "[enforce fail at inline_container.cc] unexpected pos" RuntimeError, a traceback."""
    import errno
    import io

    path, _ = _trained_checkpoint(tmp_path, RECIPE)
    real_open = open

    class Filling(io.FileIO):
        def write(self, data):
            if self.tell() + len(data) > 2000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    def filling(file, mode="r", *args, **kwargs):
        if "w" in mode and str(file).endswith(".tmp"):
            return Filling(file, "w")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", filling)
    with pytest.raises(OSError) as caught:
        export_backbone(path, tmp_path / "b.pt")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "b.pt")
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "b.pt").exists()


def test_export_carries_the_clean_batchnorm_statistics_of_the_checkpoint(tmp_path):
    from safetensors.torch import load_file, safe_open

    from byol_pytorch.batchnorm import batchnorm_state
    from byol_pytorch.training.checkpoint import load_checkpoint

    path, learner = _trained_checkpoint(tmp_path, RECIPE)
    with pytest.warns(UserWarning, match="no clean BatchNorm statistics"):
        trained = load_file(export_backbone(path, tmp_path / "old.safetensors"))  # a checkpoint without them
    clean = {k: v + 1 for k, v in batchnorm_state(learner.net).items() if "num_batches" not in k}
    clean.update({k: v for k, v in batchnorm_state(learner.net).items() if "num_batches" in k})
    checkpoint = load_checkpoint(path)
    save_checkpoint(path, {**checkpoint, "clean_bn": {"online": clean}})
    out = export_backbone(path, tmp_path / "clean.safetensors")
    tensors = load_file(out)
    assert torch.equal(tensors["bn1.running_mean"], clean["bn1.running_mean"])
    assert torch.equal(tensors["bn1.running_mean"], trained["bn1.running_mean"] + 1)
    assert torch.equal(tensors["conv1.0.weight"], trained["conv1.0.weight"])  # only the statistics differ
    with safe_open(str(out), "pt") as handle:
        assert handle.metadata()["bn_stats"] == "clean"
    as_trained = load_file(export_backbone(path, tmp_path / "t.safetensors", bn_stats="trained"))
    assert torch.equal(as_trained["bn1.running_mean"], trained["bn1.running_mean"])


def test_export_target_differs_from_online(tmp_path):
    from safetensors.torch import load_file

    path, _ = _trained_checkpoint(tmp_path, RECIPE)
    online = load_file(export_backbone(path, tmp_path / "online.safetensors", bn_stats="trained"))
    target = load_file(export_backbone(path, tmp_path / "target.safetensors", which="target", bn_stats="trained"))
    assert online.keys() == target.keys()
    assert not torch.equal(online["conv1.0.weight"], target["conv1.0.weight"])


def test_export_torchvision_replaces_classifier_with_identity(tmp_path):
    import torchvision
    from safetensors.torch import load_file

    recipe = dict(RECIPE, model="torchvision:resnet18")
    path, _ = _trained_checkpoint(tmp_path, recipe)
    tensors = load_file(export_backbone(path, tmp_path / "r18.safetensors", bn_stats="trained"))
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    model.load_state_dict(tensors, strict=True)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_export_rejects_checkpoint_without_network(tmp_path):
    path = save_checkpoint(tmp_path / "last.pt", {"step": 0})
    with pytest.raises(ValueError, match="no trained network"):
        export_backbone(path, tmp_path / "x.safetensors")


# ---------------------------------------------------------------- build_backbone, strip_classifier
def test_build_backbone_timm_with_random_weights_and_channels():
    import timm

    net = build_backbone("resnet10t", in_chans=1, image_size=32)
    assert isinstance(net, timm.models.ResNet) and net.training
    assert net.conv1[0].in_channels == 1 and net.fc.out_features == 1000
    assert net(torch.rand(2, 1, 32, 32)).shape == (2, 1000)
    torch.manual_seed(0)
    a = build_backbone("resnet10t")
    torch.manual_seed(1)
    b = build_backbone("resnet10t")
    assert not torch.equal(a.conv1[0].weight, b.conv1[0].weight)  # random, not pretrained weights


def test_build_backbone_passes_the_image_size_to_vits():
    vit = build_backbone("vit_tiny_patch16_224", image_size=32)
    assert vit.patch_embed.img_size == (32, 32)
    assert vit.pos_embed.shape[1] == 1 + (32 // 16) ** 2  # class token + a 2x2 grid of patches


def test_build_backbone_torchvision():
    import torchvision

    net = build_backbone("torchvision:resnet18", in_chans=3)
    assert type(net) is torchvision.models.ResNet and net.fc.out_features == 1000
    assert isinstance(net.layer1[0], torchvision.models.resnet.BasicBlock)  # resnet18, not another depth


@pytest.mark.parametrize(
    "name, suggestion", [("resnet5O", "resnet50"), ("torchvision:resnt18", "torchvision:resnet18")]
)
def test_build_backbone_unknown_name_lists_close_names(name, suggestion):
    with pytest.raises(ValueError) as info:
        build_backbone(name)
    message = str(info.value)
    assert message.startswith(f"unknown model {name!r}; did you mean ")
    assert suggestion in message.split("did you mean ")[1].split("?")[0].split(", ")


def test_build_backbone_torchvision_takes_three_channels_only():
    with pytest.raises(ValueError, match="torchvision models take 3 input channels, got in_chans=1"):
        build_backbone("torchvision:resnet18", in_chans=1)


def test_strip_classifier_timm_gives_the_pooled_features():
    net = build_backbone("resnet10t").eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        pooled = net.forward_features(x).mean(dim=(2, 3))  # global average pooling, written out
        assert strip_classifier(net, "resnet10t", 32) is net
        out = net(x)
    assert out.shape == (2, net.num_features) == (2, 512)
    torch.testing.assert_close(out, pooled)


def test_strip_classifier_torchvision_replaces_the_last_linear():
    net = build_backbone("torchvision:resnet18").eval()
    seen = {}
    net.avgpool.register_forward_hook(lambda module, args, output: seen.update(pooled=output.flatten(1)))
    strip_classifier(net, "torchvision:resnet18", 32)
    assert isinstance(net.fc, nn.Identity)
    with torch.no_grad():
        out = net(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 512)
    torch.testing.assert_close(out, seen["pooled"])


def test_build_learner_follows_the_recipe():
    learner = build_learner(dict(RECIPE, views_in_one_batch=True))
    assert isinstance(learner, BYOL)
    assert learner.image_size == (32, 32) and learner.moving_average_decay == 0.99
    assert learner.views_in_one_batch is True and learner.channels == 3
    linears = [m for m in learner.online_encoder.projector.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 32), (32, 16)]
    predictor = [m for m in learner.online_predictor.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in predictor] == [(16, 32), (32, 16)]
    projection, embedding = learner(torch.rand(2, 3, 32, 32), return_embedding=True)
    assert projection.shape == (2, 16) and embedding.shape == (2, 512)

    gray = build_learner(dict(RECIPE, in_chans=1, use_batchnorm=False))
    assert gray.channels == 1 and gray.views_in_one_batch is False
    assert not any(isinstance(m, nn.BatchNorm1d) for m in gray.online_encoder.projector.modules())
    own = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    assert build_learner(RECIPE, own).net is own  # a backbone given is used as it is


def test_cifar_resnet18_has_the_cifar_stem_and_exports_without_classifier(tmp_path):
    import torchvision
    from safetensors.torch import load_file

    net = build_backbone("cifar_resnet18")
    assert (net.conv1.kernel_size, net.conv1.stride, net.conv1.padding) == ((3, 3), (1, 1), (2, 2))
    assert isinstance(net.maxpool, nn.Identity) and net.conv1.bias is None
    assert build_backbone("cifar_resnet18", in_chans=1).conv1.in_channels == 1
    recipe = dict(RECIPE, model="cifar_resnet18", image_size=16)
    path, learner = _trained_checkpoint(tmp_path, recipe)
    tensors = load_file(export_backbone(path, tmp_path / "backbone.safetensors", bn_stats="trained"))
    assert not any(k.startswith("fc.") for k in tensors)
    # The file loads strictly into torchvision's resnet18 with the same stem and no classifier.
    model = torchvision.models.resnet18(weights=None)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 2, bias=False)
    model.maxpool, model.fc = nn.Identity(), nn.Identity()
    model.load_state_dict(tensors, strict=True)
    model.eval()
    learner.eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), learner(x, return_embedding=True, return_projection=False))


def test_build_learner_views_from_the_recipe_keys():
    paper = build_learner(RECIPE)  # no view keys, as an older checkpoint: the paper's views
    assert (paper.augment1.blur_p, paper.augment2.blur_p, paper.augment2.solarize_p) == (1.0, 0.1, 0.2)
    same = build_learner(dict(RECIPE, crop_scale_min=0.08, blur_p1=1.0, blur_p2=0.1, solarize_p1=0.0, solarize_p2=0.2))
    assert same.augment1.crop_scale == (0.08, 1.0) and same.augment2.blur_p == 0.1
    cifar = build_learner(dict(RECIPE, crop_scale_min=0.2, blur_p1=0.0, blur_p2=0.0, solarize_p2=0.3))
    one, two = cifar.augment1, cifar.augment2
    assert (one.blur_p, two.blur_p, one.solarize_p, two.solarize_p) == (0.0, 0.0, 0.0, 0.3)
    assert one.crop_scale == two.crop_scale == (0.2, 1.0) and one.size == (32, 32)


@pytest.mark.parametrize(
    "model, in_chans, load",
    [
        (
            "vit_tiny_patch16_224",
            3,
            "timm.create_model('vit_tiny_patch16_224', in_chans=3, img_size=32, num_classes=0)",
        ),
        ("resnet10t", 1, "timm.create_model('resnet10t', in_chans=1, num_classes=0)"),
        (
            "torchvision:mobilenet_v3_small",
            None,
            "model = torchvision.models.get_model('mobilenet_v3_small', weights=None); "
            "model.classifier[3] = torch.nn.Identity()",
        ),
    ],
)
def test_the_export_metadata_holds_the_call_that_loads_it(tmp_path, model, in_chans, load):
    """Probe: a ViT trained at 32 px did not load into timm.create_model(NAME, num_classes=0) as the help said
    (pos_embed 5 against 197 tokens; img_size was nowhere), and the docstring said the metadata named a torchvision
    net's replaced classifier, which it did not (mobilenet_v3_small: classifier.3, to be guessed)."""
    import timm
    import torchvision
    from safetensors import safe_open
    from safetensors.torch import load_file

    recipe = dict(RECIPE, model=model, in_chans=in_chans)
    torch.manual_seed(0)
    learner = build_learner(recipe)
    learner(torch.randint(0, 256, (4, in_chans or 3, 36, 36), dtype=torch.uint8)).backward()
    learner.update_moving_average()
    path = save_checkpoint(tmp_path / "last.pt", {"step": 1, "learner": learner.state_dict(), "args": recipe})
    out = export_backbone(path, tmp_path / "b.safetensors", bn_stats="trained")
    with safe_open(str(out), "pt") as written:
        metadata = written.metadata()
    assert metadata["load"] == load and metadata["image_size"] == "32"
    mean, std = ([0.5], [0.5]) if in_chans == 1 else ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert json.loads(metadata["mean"]) == mean and json.loads(metadata["std"]) == std  # ImageNet's; one channel 0.5
    scope = {"torch": torch, "timm": timm, "torchvision": torchvision}
    exec(load if load.startswith("model = ") else f"model = {load}", scope)
    net = scope["model"].eval()
    net.load_state_dict(load_file(out), strict=True)
    x = torch.rand(2, in_chans or 3, 32, 32)
    learner.eval()
    with torch.no_grad():  # the representation BYOL trained
        torch.testing.assert_close(net(x), learner(x, return_embedding=True, return_projection=False))
