"""Checkpoints: atomic save, weights_only load, errors for foreign files, RNG state, export."""

import os
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from byol_pytorch.checkpoint import (
    FORMAT,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from byol_pytorch.models import build_learner, export_backbone

RECIPE = dict(
    model="resnet10t", in_chans=3, image_size=32, projection_size=16, projection_hidden_size=32, tau_base=0.99
)


def test_save_and_load_round_trip(tmp_path):
    path = save_checkpoint(tmp_path / "run" / "last.pt", {"step": 3, "learner": {"w": torch.arange(4.0)}})
    loaded = load_checkpoint(path)
    assert loaded["format"] == FORMAT and loaded["version"] == 1 and loaded["step"] == 3
    torch.testing.assert_close(loaded["learner"]["w"], torch.arange(4.0))
    assert torch.load(path, weights_only=True)["step"] == 3
    assert sorted(os.listdir(path.parent)) == ["last.pt"]  # no temporary file left behind


def test_failed_save_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pt", {"step": 1})
    before = path.read_bytes()

    def broken_save(obj, f):
        with open(f, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]


class _NotAllowed:
    pass


@pytest.mark.parametrize("kind", ["text", "empty", "foreign_dict", "pickled_class", "tensor"])
def test_foreign_files_are_rejected_clearly(tmp_path, kind):
    path = tmp_path / "x.pt"
    if kind == "text":
        path.write_text("not a checkpoint")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign_dict":
        torch.save({"state_dict": {}}, path)
    elif kind == "pickled_class":
        torch.save({"format": FORMAT, "obj": _NotAllowed()}, path)
    else:
        torch.save(torch.zeros(2), path)
    with pytest.raises(ValueError, match="is not a byol_pytorch checkpoint"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # sets numpy's cached gaussian
    save_checkpoint(tmp_path / "rng.pt", {"rng": get_rng_state()})
    first = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.standard_normal())
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    second = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.standard_normal())
    torch.testing.assert_close(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert first[2] == second[2] and first[3] == second[3]


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
    out = export_backbone(path, tmp_path / "backbone.safetensors")
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


def test_export_target_differs_from_online(tmp_path):
    from safetensors.torch import load_file

    path, _ = _trained_checkpoint(tmp_path, RECIPE)
    online = load_file(export_backbone(path, tmp_path / "online.safetensors"))
    target = load_file(export_backbone(path, tmp_path / "target.safetensors", which="target"))
    assert online.keys() == target.keys()
    assert not torch.equal(online["conv1.0.weight"], target["conv1.0.weight"])


def test_export_torchvision_replaces_classifier_with_identity(tmp_path):
    import torchvision
    from safetensors.torch import load_file

    recipe = dict(RECIPE, model="torchvision:resnet18")
    path, _ = _trained_checkpoint(tmp_path, recipe)
    tensors = load_file(export_backbone(path, tmp_path / "r18.safetensors"))
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    model.load_state_dict(tensors, strict=True)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_export_rejects_checkpoint_without_network(tmp_path):
    path = save_checkpoint(tmp_path / "last.pt", {"step": 0})
    with pytest.raises(ValueError, match="no trained network"):
        export_backbone(path, tmp_path / "x.safetensors")
