"""Backbones by name (timm or torchvision), the BYOL learner around them, and their export.

``byol-pytorch`` names a backbone the way users already do: any timm model name
(``resnet50``, ``convnext_tiny``, ``vit_small_patch16_224``) or ``torchvision:NAME``
(``torchvision:resnet18``). Models are always built with random weights
(``pretrained=False`` / ``weights=None``): nothing is ever downloaded.
"""

from __future__ import annotations

import difflib
import json
import os
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .._atomic import atomic_write
from .._discovery import infer_channels, probe_backbone
from .._modules import PathLike
from ..augment import BYOLAugment
from ..batchnorm import batchnorm_layers, freeze_batchnorm_statistics, load_batchnorm_state
from ..byol import BYOL
from .checkpoint import _torch_save, load_checkpoint
from .recipe import Recipe

__all__ = [
    "BACKBONE_BN",
    "CIFAR_MODELS",
    "TORCHVISION_PREFIX",
    "build_backbone",
    "build_learner",
    "classifier_name",
    "close_model_names",
    "export_backbone",
    "learner_from_checkpoint",
    "load_clean_statistics",
    "strip_classifier",
]

TORCH_SUFFIXES = (".pt", ".pth", ".bin")  # export writes these with torch.save, others as safetensors

TORCHVISION_PREFIX = "torchvision:"
BACKBONE_BN = ("batch", "frozen")  # Recipe.backbone_bn: the paper's batch statistics, or frozen ones
CIFAR_MODELS = {"cifar_resnet18": "resnet18", "cifar_resnet34": "resnet34", "cifar_resnet50": "resnet50"}


def close_model_names(name: str, limit: int = 5) -> list[str]:
    """Known model names that look like ``name`` (timm's and ``torchvision:`` ones)."""
    import timm
    import torchvision

    if name.startswith(TORCHVISION_PREFIX):
        names = [TORCHVISION_PREFIX + n for n in torchvision.models.list_models(module=torchvision.models)]
    else:
        names = list(timm.list_models()) + list(CIFAR_MODELS)
    return difflib.get_close_matches(name, names, n=limit, cutoff=0.6)


def _unknown_model(name: str) -> ValueError:
    close = close_model_names(name)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return ValueError(
        f"unknown model {name!r}; {hint}use a timm name (see timm.list_models()) or "
        "torchvision:NAME (see torchvision.models.list_models())"
    )


def _cifar_resnet(name: str, in_chans: int | None) -> nn.Module:
    """torchvision's ResNet with the CIFAR stem: conv 3x3 stride 1 (padding 2, as solo-learn), no max-pool."""
    import torchvision

    net = torchvision.models.get_model(CIFAR_MODELS[name], weights=None)
    net.conv1 = nn.Conv2d(in_chans or 3, 64, kernel_size=3, stride=1, padding=2, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
    net.maxpool = nn.Identity()
    return net


INCEPTION_AUX_SIDE = 299  # the smallest side torchvision's Inception v3 auxiliary classifier runs at


def build_backbone(name: str, in_chans: int | None = None, image_size: int | None = None) -> nn.Module:
    """A randomly initialised backbone, with its classifier (BYOL ignores it).

    Args:
        name: a timm model name, ``torchvision:NAME`` for a torchvision classifier, or
            ``cifar_resnet18`` / ``cifar_resnet34`` / ``cifar_resnet50`` (CIFAR stem).
        in_chans: input channels (timm and cifar_ models; torchvision models take 3).
            None: the model's default.
        image_size: passed to timm models that take ``img_size`` (ViTs), so that their
            position embeddings match the training views.

    Returns:
        The model, in train mode, on the CPU.

    Raises:
        ValueError: an unknown name (with close names), or channels a torchvision model
            cannot take.
    """
    net, call = _build(name, in_chans, image_size)
    _BUILT_WITH[net] = call
    return net


# How each net build_backbone made was made: the call that builds it again, for an export's load line.
_BUILT_WITH: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def _build(name: str, in_chans: int | None, image_size: int | None) -> tuple[nn.Module, str]:
    """``build_backbone``'s net and the Python call that builds it again (timm: without ``num_classes``)."""
    if name in CIFAR_MODELS:
        chans = "" if in_chans is None else f", in_chans={in_chans}"
        return _cifar_resnet(name, in_chans), f"byol_pytorch.training.models.build_backbone({name!r}{chans})"
    if name.startswith(TORCHVISION_PREFIX):
        import torchvision

        arch = name[len(TORCHVISION_PREFIX) :]
        if arch not in torchvision.models.list_models(module=torchvision.models):
            raise _unknown_model(name)
        if in_chans not in (None, 3):
            raise ValueError(
                f"torchvision models take 3 input channels, got in_chans={in_chans}; "
                "use a timm model (they take any in_chans) or 3 channels"
            )
        # Inception v3's auxiliary classifier runs only in training, where it fails under 299 px; BYOL never reads it
        # (at 299 px and up it is kept, as in the checkpoints of runs made there).
        small = arch == "inception_v3" and image_size is not None and image_size < INCEPTION_AUX_SIDE
        net = torchvision.models.get_model(arch, weights=None, **({"aux_logits": False} if small else {}))
        return net, f"torchvision.models.get_model({arch!r}, weights=None{', aux_logits=False' if small else ''})"

    import timm

    if not timm.is_model(name):
        raise _unknown_model(name)
    kwargs: dict[str, Any] = {"pretrained": False}
    chans = ""
    if in_chans is not None:
        kwargs["in_chans"], chans = in_chans, f", in_chans={in_chans}"
    if image_size is not None:
        try:
            net = timm.create_model(name, img_size=image_size, **kwargs)
            return net, f"timm.create_model({name!r}{chans}, img_size={image_size})"
        except TypeError:
            pass  # a model without an img_size argument (convnets): any size works
    return timm.create_model(name, **kwargs), f"timm.create_model({name!r}{chans})"


def classifier_name(net: nn.Module, image_size: int, channels: int | None = None) -> str | None:
    """Name of the final classifier ``nn.Linear`` (the module after BYOL's hidden layer).

    Args:
        net: the backbone.
        image_size: a size the net accepts (one probe forward on zeros, in eval mode).
        channels: input channels; default: those of the first convolution.

    Returns:
        The module name (``"fc"`` for a ResNet), or None when the net has no classifier.
    """
    channels = channels if channels is not None else infer_channels(net)
    probe = probe_backbone(net, (image_size, image_size), channels, "auto")
    return probe.name if probe.use_input else None


def strip_classifier(net: nn.Module, name: str, image_size: int) -> nn.Module:
    """Remove the classifier in place, the way users load a headless backbone.

    timm models: ``reset_classifier(0)`` (the keys of ``timm.create_model(NAME,
    num_classes=0)``). Others: the final classifier Linear becomes ``nn.Identity()``
    (for a torchvision ResNet, ``net.fc = nn.Identity()``).

    Args:
        net: the backbone, weights loaded.
        name: the model name it was built from.
        image_size: a size the net accepts (to find the classifier of non-timm nets).

    Returns:
        ``net``, without classifier.
    """
    _strip(net, name, image_size)
    return net


def _strip(net: nn.Module, name: str, image_size: int) -> str | None:
    """``strip_classifier``'s work; what it did: ``"num_classes=0"`` (timm), the layer replaced, or None."""
    if not name.startswith(TORCHVISION_PREFIX) and hasattr(net, "reset_classifier"):
        net.reset_classifier(0)  # type: ignore[operator]
        return "num_classes=0"
    layer = classifier_name(net, image_size)
    if layer is not None:
        parent_name, _, child = layer.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, child, nn.Identity())
    return layer


def _load_line(call: str | None, stripped: str | None) -> str | None:
    """The Python that builds the headless backbone an export loads into, from ``build_backbone``'s call."""
    if call is None:
        return None
    if stripped == "num_classes=0":  # timm: the headless model's own keys
        return call[:-1] + ", num_classes=0)"
    if stripped is None:
        return call
    where = "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in stripped.split("."))  # classifier[3]
    return f"model = {call}; model{where} = torch.nn.Identity()"


def build_learner(recipe: Recipe | Mapping[str, Any], net: nn.Module | None = None) -> BYOL:
    """The BYOL learner of a training recipe.

    Args:
        recipe: a ``Recipe``, or a mapping holding one (a checkpoint's ``args``; keys it lacks
            take the values older versions ran with, see ``Recipe.from_dict``).
        net: the backbone when already built; default ``build_backbone(recipe.model, ...)``.

    Returns:
        ``BYOL(net, image_size, hidden_layer="auto", ...)`` with ``sync_batchnorm=None``
        (SyncBatchNorm in the heads when a multi-GPU process group exists); with
        ``recipe.backbone_bn == "frozen"`` the backbone's BatchNorm statistics frozen first.

    Raises:
        ValueError: ``recipe.backbone_bn`` is neither ``batch`` nor ``frozen``.
    """
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_dict(recipe)
    if recipe.backbone_bn not in BACKBONE_BN:
        raise ValueError(f"backbone_bn must be one of {', '.join(BACKBONE_BN)}, got {recipe.backbone_bn!r}")
    if net is None:
        net = build_backbone(recipe.model, recipe.in_chans, recipe.image_size)
    if recipe.backbone_bn == "frozen":
        freeze_batchnorm_statistics(net)  # before BYOL wraps it: the heads' BatchNorm keeps training
    view_one, view_two = _recipe_views(recipe, net)
    return BYOL(
        net,
        image_size=int(recipe.image_size),
        hidden_layer="auto",
        projection_size=int(recipe.projection_size),
        projection_hidden_size=int(recipe.projection_hidden_size),
        moving_average_decay=float(recipe.tau_base),
        views_in_one_batch=bool(recipe.views_in_one_batch),
        use_batchnorm=bool(recipe.use_batchnorm),
        augment_fn=view_one,
        augment_fn2=view_two,
    )


def _recipe_views(recipe: Recipe, net: nn.Module) -> tuple[BYOLAugment, BYOLAugment]:
    """The two views of a recipe: Table 6 with the recipe's view fields over it (``Recipe.view_overrides``).

    A checkpoint written before a view field existed holds the paper's value for it, so older
    runs get exactly the views they trained with.
    """
    channels = infer_channels(net)
    colour: dict[str, Any] = {} if channels in (1, 3) else {"saturation": 0.0, "hue": 0.0, "grayscale_p": 0.0}
    size = int(recipe.image_size)
    one, two = (BYOLAugment(size, view=v, preset="paper", **recipe.view_overrides(v), **colour) for v in (1, 2))
    return one, two


def load_clean_statistics(net: nn.Module, checkpoint: dict[str, Any], which: str) -> str:
    """Load the checkpoint's clean BatchNorm statistics of ``which`` into ``net``; what it holds now.

    Returns ``"clean"``, ``"trained"`` (no clean statistics in the checkpoint: warned), ``"frozen"``
    (a run with ``backbone_bn="frozen"``: its statistics never changed, nothing to re-estimate) or
    ``"none"`` (a net without BatchNorm).
    """
    if not batchnorm_layers(net):
        return "none"
    if (checkpoint.get("args") or {}).get("backbone_bn") == "frozen":
        return "frozen"
    clean = (checkpoint.get("clean_bn") or {}).get(which)
    if not clean:
        warnings.warn(
            "the checkpoint holds no clean BatchNorm statistics (written before 1.2.0, or with --bn-stats trained, "
            "or before its first step): the trained ones are used",
            UserWarning,
            stacklevel=3,
        )
        return "trained"
    load_batchnorm_state(net, clean)
    return "clean"


def learner_from_checkpoint(
    path: PathLike, device: torch.device | str = "cpu", which: str = "online", bn_stats: str = "clean"
) -> tuple[BYOL, dict[str, Any], str]:
    """The learner a ``byol-pytorch train`` checkpoint holds, ready to embed images (eval mode).

    Args:
        path: the checkpoint.
        device: where the learner goes.
        which: ``"online"`` or ``"target"``: the network whose weights the learner's online
            encoder (what ``learner(x, return_embedding=True)`` runs) gets.
        bn_stats: ``"clean"`` loads the checkpoint's clean BatchNorm statistics (``clean_bn``)
            where it holds them; ``"trained"`` keeps the running statistics of the views.

    Returns:
        ``(learner, checkpoint, statistics)``: statistics is ``"clean"``, ``"trained"``,
        ``"frozen"`` (a run that froze the backbone's BatchNorm statistics: they are the ones it
        trained with, whatever ``bn_stats`` asks), ``"none"`` (no BatchNorm) or ``"missing"`` (clean
        ones asked for but not in the checkpoint: the caller may re-estimate them on its data,
        ``batchnorm.recalibrate_batchnorm``).

    Raises:
        FileNotFoundError, ValueError, TypeError: not a checkpoint of a trained network, or a target
            asked for before the first step.
    """
    from .checkpoint import load_checkpoint, load_state

    checkpoint = load_checkpoint(path)
    saved = checkpoint.get("args")
    if not isinstance(saved, dict) or "learner" not in checkpoint or not saved.get("model"):
        raise ValueError(f"{path} holds no trained network")
    learner = build_learner(Recipe.from_dict(saved)).to(device)
    load_state(learner, checkpoint, "learner", path)
    if which == "target":
        target = learner.init_target() if learner.has_target else None
        if target is None:
            raise ValueError(f"{path} has no target network yet (no step was taken)")
        learner.online_encoder.load_state_dict(target.state_dict())
    elif which != "online":
        raise ValueError(f"which must be 'online' or 'target', got {which!r}")
    statistics = "trained"
    if not batchnorm_layers(learner.net):
        statistics = "none"
    elif not batchnorm_layers(learner.net, frozen=False):
        statistics = "frozen"
    elif bn_stats == "clean":
        clean = (checkpoint.get("clean_bn") or {}).get(which)
        if clean:
            load_batchnorm_state(learner.net, clean)
            statistics = "clean"
        else:
            statistics = "missing"
    return learner.eval(), checkpoint, statistics


def export_backbone(
    checkpoint_path: PathLike,
    out_path: PathLike,
    which: str = "online",
    bn_stats: str = "clean",
    details: dict[str, str] | None = None,
) -> Path:
    """Write the trained backbone, without its classifier, as a safetensors file (or ``torch.save``'s, for ``.pt``).

    The file loads with ``strict=True`` into ``timm.create_model(NAME, num_classes=0)``
    (with ``in_chans=`` if you trained with other channels, ``img_size=`` for a model that
    takes the image size, a ViT), or with ``pretrained=True,
    pretrained_cfg_overlay=dict(file=PATH), num_classes=0``. For ``torchvision:NAME`` the final
    classifier Linear is replaced by ``nn.Identity()`` (``model.fc = nn.Identity()`` for a
    ResNet). The safetensors metadata holds the exact Python call as ``load`` (for example
    ``timm.create_model('vit_tiny_patch16_224', in_chans=3, img_size=32, num_classes=0)``, or
    ``model = torchvision.models.get_model('mobilenet_v3_small', weights=None);
    model.classifier[3] = torch.nn.Identity()``), beside ``image_size``, ``in_chans``, and
    the ``mean`` and ``std`` (JSON lists) the images were normalised with in training.

    Args:
        checkpoint_path: a checkpoint written by ``byol-pytorch train``.
        out_path: the file to write (atomically): safetensors, with the metadata below, unless its
            suffix is ``.pt``, ``.pth`` or ``.bin``: then a ``torch.save`` state dict, which
            ``torch.load(path, weights_only=True)`` reads.
        which: ``"online"`` (the paper keeps the online encoder) or ``"target"``.
        bn_stats: ``"clean"``: the BatchNorm statistics re-estimated on clean training images that
            ``byol-pytorch train`` saves in each checkpoint (``clean_bn``), where it holds them (else
            the trained ones, with a warning); ``"trained"``: the running statistics of the views.
        details: a dict to receive the metadata described above, whichever format is written (a ``.pt``
            file holds none): ``details["load"]``, the call that builds the backbone the file loads into.

    Returns:
        The path written.

    Raises:
        FileNotFoundError, ValueError: see ``load_checkpoint``; a checkpoint without
            the network, ``which="target"`` before the first step, or ``out_path`` naming the
            checkpoint itself.
    """
    from safetensors.torch import save

    if Path(out_path).exists() and Path(checkpoint_path).exists() and os.path.samefile(out_path, checkpoint_path):
        raise ValueError(
            f"--out {str(out_path)!r} is the checkpoint being exported: writing there would replace the run's "
            "checkpoint with the bare backbone; choose another --out"
        )
    checkpoint = load_checkpoint(checkpoint_path)
    args, learner_state = checkpoint.get("args"), checkpoint.get("learner")
    if not isinstance(args, dict) or not isinstance(learner_state, dict) or "model" not in args:
        raise ValueError(f"{str(checkpoint_path)!r} holds no trained network ('learner' and 'args' are missing)")
    try:
        recipe = Recipe.from_dict(args)  # the values the backbone is built from, checked
    except (TypeError, ValueError) as error:
        raise ValueError(f"{str(checkpoint_path)!r}: {error}") from None
    if which not in ("online", "target"):
        raise ValueError(f"which must be 'online' or 'target', got {which!r}")
    if bn_stats not in ("clean", "trained"):
        raise ValueError(f"bn_stats must be 'clean' or 'trained', got {bn_stats!r}")
    prefix = f"{which}_encoder.net."
    state = {k[len(prefix) :]: v for k, v in learner_state.items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{str(checkpoint_path)!r} has no {which} network yet (no training step was taken)")
    net = build_backbone(args["model"], args.get("in_chans"), args.get("image_size"))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"{str(checkpoint_path)!r}: its {which} network does not fit the {args['model']!r} its recipe builds "
            f"({' '.join(str(error).split())[:300]}); the file was edited or written by another version"
        ) from None
    frozen = args.get("backbone_bn") == "frozen"  # the statistics it trained with, whichever bn_stats asked for
    used = load_clean_statistics(net, checkpoint, which) if bn_stats == "clean" or frozen else "trained"
    step = checkpoint.get("step")
    # The checkpoint (both networks, the heads, the optimiser's state) is freed before the copies below are made.
    del checkpoint, learner_state, state
    net.eval()
    view, _ = _recipe_views(recipe, net)
    mean, std = view.resolve_mean_std(infer_channels(net))  # the input normalisation the backbone trained with
    load = _load_line(_BUILT_WITH.get(net), _strip(net, args["model"], int(args["image_size"])))
    tensors = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
    del net
    metadata = {
        "format": "pt",
        "byol_pytorch_model": str(args["model"]),
        "step": str(step),
        "in_chans": str(args.get("in_chans")),
        "image_size": str(args["image_size"]),
        "mean": json.dumps([round(m, 6) for m in mean]),
        "std": json.dumps([round(v, 6) for v in std]),
        "which": which,
        "bn_stats": used,
        **({"load": load} if load else {}),
    }
    if details is not None:
        details.update(metadata)
    if Path(out_path).suffix.lower() in TORCH_SUFFIXES:  # torch.load(path, weights_only=True) reads it
        return atomic_write(out_path, lambda temp: _torch_save(tensors, temp))  # a full disk: an OSError
    data = save(tensors, metadata=metadata)  # bytes: a full disk is an OSError naming the file, as for torch.save

    def write(temp: str) -> None:
        with open(temp, "wb") as handle:
            handle.write(data)

    return atomic_write(out_path, write)
