"""Hugging Face ``transformers`` vision models behind ``BYOL(model, image_size)``, from tiny configs.

Every model is built from a small config (random weights, nothing downloaded); the
expected width D is computed from the config, independently of the package's code.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

from byol_pytorch import BYOL  # noqa: E402

SMALL = dict(projection_size=16, projection_hidden_size=32)
VIT = dict(
    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
)
DINO = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=32, patch_size=8)
SWIN = dict(embed_dim=16, depths=[1, 1], num_heads=[1, 2], image_size=32, patch_size=4, window_size=4)
CONVNEXT = dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
RESNET = dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
REGNET = dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8)
MOBILEVIT = dict(image_size=32, patch_size=2, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 16, 24, 40])
FOUR_STAGES = dict(hidden_sizes=[8, 16, 16, 24], depths=[1, 1, 1, 1])
LEVIT = dict(
    image_size=32, hidden_sizes=[16, 32, 48], num_attention_heads=[1, 2, 3], depth=[1, 1, 1], key_dim=[8, 8, 8]
)


def _last(sizes: list[int]) -> int:
    return sizes[-1]


# class name -> (config class, config kwargs, expected pooled width from the config, hidden layer)
MODELS = {
    "ViTModel": ("ViTConfig", VIT, lambda c: c.hidden_size, "<output>.pooler_output"),
    "ViTForImageClassification": ("ViTConfig", VIT, lambda c: c.hidden_size, "classifier"),
    "DeiTModel": ("DeiTConfig", VIT, lambda c: c.hidden_size, "<output>.pooler_output"),
    "DeiTForImageClassificationWithTeacher": ("DeiTConfig", VIT, lambda c: c.hidden_size, "deit.layernorm"),
    "Dinov2Model": ("Dinov2Config", DINO, lambda c: c.hidden_size, "<output>.pooler_output"),
    # Dinov2's classifier reads [class token, mean of the patch tokens]: twice the width.
    "Dinov2ForImageClassification": ("Dinov2Config", DINO, lambda c: 2 * c.hidden_size, "classifier"),
    "Dinov2WithRegistersModel": ("Dinov2WithRegistersConfig", DINO, lambda c: c.hidden_size, None),
    "SwinModel": ("SwinConfig", SWIN, lambda c: c.embed_dim * 2 ** (len(c.depths) - 1), "<output>.pooler_output"),
    "SwinForImageClassification": ("SwinConfig", SWIN, lambda c: c.embed_dim * 2 ** (len(c.depths) - 1), "classifier"),
    "ConvNextModel": ("ConvNextConfig", CONVNEXT, lambda c: _last(c.hidden_sizes), "<output>.pooler_output"),
    "ConvNextForImageClassification": ("ConvNextConfig", CONVNEXT, lambda c: _last(c.hidden_sizes), "classifier"),
    "ConvNextV2Model": ("ConvNextV2Config", CONVNEXT, lambda c: _last(c.hidden_sizes), "<output>.pooler_output"),
    "ResNetModel": ("ResNetConfig", RESNET, lambda c: _last(c.hidden_sizes), "<output>.pooler_output"),
    "ResNetForImageClassification": ("ResNetConfig", RESNET, lambda c: _last(c.hidden_sizes), "classifier.1"),
    "RegNetModel": ("RegNetConfig", REGNET, lambda c: _last(c.hidden_sizes), "<output>.pooler_output"),
    "RegNetForImageClassification": ("RegNetConfig", REGNET, lambda c: _last(c.hidden_sizes), "classifier.1"),
    "CLIPVisionModel": ("CLIPVisionConfig", VIT, lambda c: c.hidden_size, "<output>.pooler_output"),
    "BeitModel": ("BeitConfig", VIT, lambda c: c.hidden_size, "<output>.pooler_output"),
    "Data2VecVisionModel": ("Data2VecVisionConfig", VIT, lambda c: c.hidden_size, "<output>.last_hidden_state"),
    "MobileViTModel": ("MobileViTConfig", MOBILEVIT, lambda c: _last(c.neck_hidden_sizes), "<output>.pooler_output"),
    "PoolFormerForImageClassification": ("PoolFormerConfig", FOUR_STAGES, lambda c: _last(c.hidden_sizes), None),
    "SegformerModel": (
        "SegformerConfig",
        dict(FOUR_STAGES, num_attention_heads=[1, 1, 1, 1]),
        lambda c: _last(c.hidden_sizes),
        "<output>.last_hidden_state",
    ),
    "PvtV2ForImageClassification": (
        "PvtV2Config",
        dict(FOUR_STAGES, num_attention_heads=[1, 1, 1, 1]),
        lambda c: _last(c.hidden_sizes),
        "classifier",
    ),
    "LevitForImageClassificationWithTeacher": ("LevitConfig", LEVIT, lambda c: _last(c.hidden_sizes), None),
    "FocalNetModel": (
        "FocalNetConfig",
        dict(embed_dim=8, depths=[1, 1], image_size=32, patch_size=4),
        lambda c: c.embed_dim * 2 ** (len(c.depths) - 1),
        "<output>.pooler_output",
    ),
}


def _build(name: str) -> tuple[nn.Module, object]:
    config_name, kwargs, _, _ = MODELS[name]
    if not hasattr(transformers, name):
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**kwargs)
    return getattr(transformers, name)(config), config


def _first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("name", list(MODELS))
def test_transformers_model_trains_by_default(name):
    model, config = _build(name)
    width, layer = MODELS[name][2](config), MODELS[name][3]
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    learner = BYOL(model, image_size=32, **SMALL)

    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()), "construction changed the weights"
    assert all(torch.equal(buffers[k], v) for k, v in model.named_buffers()), "construction changed a buffer"
    assert all(m.training for m in model.modules()), "construction left a module in eval mode"
    assert learner.representation_size == width
    if layer is not None:
        assert learner.hidden_layer == layer

    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    x = torch.rand(4, 3, 32, 32)
    loss = learner(x)
    loss.backward()
    stem = _first_conv(model)
    assert stem.weight.grad is not None and stem.weight.grad.abs().sum() > 0, "no gradient reached the stem"
    unused = set(learner.unused_parameter_names)
    for pname, p in learner.online_encoder.named_parameters():
        full = f"online_encoder.{pname}"
        assert (p.grad is None) == (full in unused), f"{pname}: gradient {p.grad is not None}, unused {full in unused}"

    optimizer.step()
    target_before = learner.target_encoder.net.state_dict()[_stem_key(model)].clone()
    learner.update_moving_average()
    expected = 0.99 * target_before + 0.01 * stem.weight.detach()
    assert torch.allclose(learner.target_encoder.net.state_dict()[_stem_key(model)], expected, atol=1e-6)

    learner.eval()
    projection, embedding = learner(x, return_embedding=True)
    assert projection.shape == (4, 16) and embedding.shape == (4, width)
    assert torch.isfinite(embedding).all()


def _stem_key(model: nn.Module) -> str:
    stem = _first_conv(model)
    return next(f"{n}.weight" for n, m in model.named_modules() if m is stem)


def _base_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=x)
    pooled = out.pooler_output
    return pooled.flatten(1) if pooled.ndim == 4 else pooled


# Embeddings against what transformers itself returns, computed without the package.
REFERENCES = {
    "ViTModel": _base_reference,
    "CLIPVisionModel": _base_reference,
    "ResNetModel": _base_reference,  # pooler_output (B, C, 1, 1) -> (B, C)
    "ConvNextModel": _base_reference,
    "ViTForImageClassification": lambda m, x: m.vit(pixel_values=x).last_hidden_state[:, 0],
    "ResNetForImageClassification": lambda m, x: m.resnet(pixel_values=x).pooler_output.flatten(1),
    "Dinov2ForImageClassification": lambda m, x: torch.cat(
        [m.dinov2(pixel_values=x).last_hidden_state[:, 0], m.dinov2(pixel_values=x).last_hidden_state[:, 1:].mean(1)],
        dim=1,
    ),
    "DeiTForImageClassificationWithTeacher": lambda m, x: m.deit(pixel_values=x).last_hidden_state.mean(1),
    "Data2VecVisionModel": lambda m, x: m(pixel_values=x).last_hidden_state.mean(1),
}


@pytest.mark.parametrize("name", list(REFERENCES))
def test_transformers_embedding_is_the_models_own_representation(name):
    model, _ = _build(name)
    learner = BYOL(model, image_size=32, **SMALL).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        embedding = learner(x, return_embedding=True, return_projection=False)
        reference = REFERENCES[name](model.eval(), x)
    assert embedding.shape == reference.shape
    assert torch.allclose(embedding, reference, atol=1e-5)


def test_classifier_is_unused_and_pooler_used():
    model, _ = _build("ViTForImageClassification")
    learner = BYOL(model, image_size=32, **SMALL)
    assert learner.hidden_layer_is_input
    assert {"online_encoder.net.classifier.weight", "online_encoder.net.classifier.bias"} <= set(
        learner.unused_parameter_names
    )
    base, _ = _build("ViTModel")
    learner = BYOL(base, image_size=32, **SMALL)
    assert not any("pooler" in n for n in learner.unused_parameter_names)
    dino, _ = _build("Dinov2Model")
    learner = BYOL(dino, image_size=32, **SMALL)
    assert "online_encoder.net.embeddings.mask_token" in learner.unused_parameter_names  # only for masked inputs


def test_named_layer_leaves_the_pooler_unused():
    model, _ = _build("ViTModel")
    learner = BYOL(model, image_size=32, hidden_layer="layernorm", token_pool="cls", **SMALL)
    assert {"online_encoder.net.pooler.dense.weight", "online_encoder.net.pooler.dense.bias"} <= set(
        learner.unused_parameter_names
    )
    learner(torch.rand(2, 3, 32, 32)).backward()
    assert model.pooler.dense.weight.grad is None
    assert model.layernorm.weight.grad is not None
    ddp_ignored = set(learner._ddp_params_and_buffers_to_ignore)
    assert "online_encoder.net.pooler.dense.weight" in ddp_ignored
    learner.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values=x).last_hidden_state[:, 0]
        assert torch.allclose(learner(x, return_embedding=True, return_projection=False), expected, atol=1e-5)


def test_copy_state_dict_and_pickle_round_trip():
    model, config = _build("ViTForImageClassification")
    learner = BYOL(model, image_size=32, **SMALL)
    learner(torch.rand(4, 3, 32, 32)).backward()
    learner.update_moving_average()
    learner.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = learner(x, return_embedding=True, return_projection=False)
        for other in (copy.deepcopy(learner), pickle.loads(pickle.dumps(learner))):
            assert torch.equal(other(x, return_embedding=True, return_projection=False), expected)
        fresh = BYOL(transformers.ViTForImageClassification(config), image_size=32, **SMALL)
        fresh.load_state_dict(learner.state_dict())
        fresh.eval()
        assert torch.equal(fresh(x, return_embedding=True, return_projection=False), expected)
        # The target's copy captures through its own hook, not the online one's.
        target = learner.target_encoder
        assert torch.equal(target(x, return_projection=False), target(x, return_projection=False))


def test_trained_model_saves_and_reloads_with_transformers(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, _ = _build("ViTModel")
    learner = BYOL(model, image_size=32, **SMALL)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(2):
        learner(torch.rand(4, 3, 32, 32)).backward()
        optimizer.step()
        optimizer.zero_grad()
        learner.update_moving_average()
    assert not torch.equal(
        before["embeddings.patch_embeddings.projection.weight"],
        model.state_dict()["embeddings.patch_embeddings.projection.weight"],
    )
    model.save_pretrained(tmp_path)
    reloaded = transformers.ViTModel.from_pretrained(tmp_path)
    trained, loaded = model.state_dict(), reloaded.state_dict()
    assert trained.keys() == loaded.keys()
    for key, value in trained.items():
        assert torch.equal(value, loaded[key]), key


def test_input_name_is_detected_and_can_be_forced():
    model, _ = _build("ViTModel")
    learner = BYOL(model, image_size=32, **SMALL)
    assert learner.online_encoder.input_name == "pixel_values"
    forced = BYOL(model, image_size=32, input_name="pixel_values", **SMALL)
    assert forced.online_encoder.input_name == "pixel_values"
    with pytest.raises(ValueError, match="keyword name"):
        BYOL(model, image_size=32, input_name="pixel values", **SMALL)
    with pytest.raises(ValueError, match=r"as net\(images=x\)"):
        BYOL(model, image_size=32, input_name="images", **SMALL)


@pytest.mark.parametrize(
    "name, config",
    [
        ("ResNetBackbone", transformers.ResNetConfig(**RESNET, out_features=["stage1", "stage2"])),
        ("ConvNextBackbone", transformers.ConvNextConfig(**CONVNEXT, out_features=["stage1", "stage2"])),
        ("Dinov2Backbone", transformers.Dinov2Config(**DINO, out_features=["stage1"])),
    ],
)
def test_a_backbone_classs_deepest_feature_map_is_the_representation(name, config):
    """Backbone probe: AutoBackbone models return BackboneOutput(feature_maps=(...)), which 'auto' did not open
    ('produced a BackboneOutput, not a tensor')."""
    torch.manual_seed(0)
    net = getattr(transformers, name)(config)
    learner = BYOL(net, image_size=32, **SMALL)
    images = torch.rand(4, 3, 32, 32)
    learner(images).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    learner.update_moving_average()
    learner.eval()
    with torch.no_grad():
        embedding = learner(images, return_embedding=True, return_projection=False)
        deepest = net(images).feature_maps[-1]  # (B, C, h, w): its spatial mean, computed here
    n = len(net(images).feature_maps) - 1
    assert learner.hidden_layer == f"<output>.feature_maps[{n}]"
    torch.testing.assert_close(embedding, deepest.mean((2, 3)), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not hasattr(transformers, "PPLCNetConfig"), reason="this transformers has no PP-LCNet")
def test_class_scores_named_last_hidden_state_are_not_taken_for_features():
    """Backbone probe: PPLCNetForImageClassification returns its logits as last_hidden_state (no 'logits'), and
    'auto' trained the 7 class scores; the input of the Linear that makes them is the representation."""
    torch.manual_seed(0)
    net = transformers.PPLCNetForImageClassification(transformers.PPLCNetConfig(num_labels=7))
    learner = BYOL(net, image_size=32, **SMALL)
    scores = [m for m in net.modules() if isinstance(m, nn.Linear) and m.out_features == 7]
    assert len(scores) == 1 and learner.representation_size == scores[0].in_features != 7
    learner(torch.rand(4, 3, 32, 32)).backward()
    assert scores[0].weight.grad is None  # the classifier is left out


def test_a_net_random_in_eval_mode_is_named_and_a_shuffle_alone_is_not():
    """Backbone probe: ViTMAEModel masks 75% of the patches at random even in eval mode, so its embeddings (and a
    kNN of them) were random without a word; with mask_ratio=0 it only shuffles the patches, which pooling undoes."""
    import warnings

    for ratio, named in ((0.75, True), (0.0, False)):
        net = transformers.ViTMAEModel(transformers.ViTMAEConfig(**VIT, mask_ratio=ratio))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            BYOL(net, image_size=32, **SMALL)
        said = [str(w.message) for w in caught if "on a second call in eval mode" in str(w.message)]
        assert bool(said) == named, said
        assert not said or "configure it not to (ViTMAE: mask_ratio=0.0)" in said[0]


def test_a_fixed_size_transformer_at_another_size_names_its_size_and_the_fix():
    """A probe: a ViT built for 32 px wrapped at 64 relayed the model's own words and told the user to check
    the channel count; the message names the size the net is built for and what to pass."""
    import timm

    vit = transformers.ViTModel(transformers.ViTConfig(**VIT))
    for size, views in ((64, "64x64"), ((32, 48), "32x48")):
        with pytest.raises(ValueError) as caught:
            BYOL(vit, size, **SMALL)
        message = str(caught.value)
        assert f"ViTModel is built for 32x32 images and the views are {views}: pass image_size=32 to BYOL" in message
        assert "its config's image_size" in message and "channel" not in message and ".." not in message
    tvit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    with pytest.raises(ValueError, match=r"built for 32x32 images .*\(timm.create_model\(\.\.\., img_size=\)\)"):
        BYOL(tvit, 64, **SMALL)
    # a net that takes any size keeps the general advice, also when its config names a size (the review: a
    # ConvNeXt config's image_size 224 is a default, and its failure here is the channel count)
    with pytest.raises(ValueError, match="Check image_size and the channel count"):
        BYOL(nn.Sequential(nn.Flatten(), nn.Linear(10, 4)), image_size=32)
    convnext = transformers.ConvNextModel(transformers.ConvNextConfig(**CONVNEXT))
    assert convnext.config.image_size == 224
    with pytest.raises(ValueError, match="Check image_size and the channel count") as caught:
        BYOL(convnext, 32, channels=1, **SMALL)
    assert "built for" not in str(caught.value)
