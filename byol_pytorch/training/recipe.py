"""The recipe of a training run: one frozen, typed dataclass, saved in checkpoints as plain values.

A recipe is what decides the weights a run produces (model, sizes, optimiser, schedules, views,
seed) and stays fixed for the run's life: a resumed run takes it from its checkpoint. The
command line builds it from its flags at its edge (``byol_pytorch.app.recipe``); the core
(``models.build_learner``, ``optim``) reads it as typed fields.

Checkpoints hold it as a plain dict (``Recipe.to_dict``, inside the checkpoint's ``args``, so
``torch.load(..., weights_only=True)`` reads it). ``Recipe.from_dict`` reads every checkpoint
written so far: a key that an older version did not write takes the field's default, which is
the value that version ran with (the paper's views, LARS' trust coefficient 1e-3, no clipping).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Recipe", "VIEW_DEFAULTS"]

# The views' recipe fields with the paper's values (Grill et al. 2020, Table 6): what a checkpoint
# without them ran with. A new run saves the values its views resolved to (``augment.view_settings``).
VIEW_DEFAULTS: dict[str, float | str] = {
    "crop_scale_min": 0.08,
    "blur_p1": 1.0,
    "blur_p2": 0.1,
    "blur_sigma_min": 0.1,
    "blur_sigma_max": 2.0,
    "solarize_p1": 0.0,
    "solarize_p2": 0.2,
    "interpolation": "bicubic",
}


def _of_kind(value: Any, annotation: str) -> bool:
    """Whether ``value`` fits a field annotated ``int``, ``float``, ``str`` or ``bool`` (``| None`` aside)."""
    kind = annotation.split(" |")[0]
    if kind == "bool" or isinstance(value, bool):
        return kind == "bool" and isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int)
    if kind == "float":
        return isinstance(value, (int, float))
    return kind != "str" or isinstance(value, str)


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a run's weights; defaults are the paper's (and older checkpoints').

    Attributes:
        model: timm name, ``torchvision:NAME`` or ``cifar_resnet18``/``34``/``50``.
        in_chans: the model's input channels (None: the model's own, resolved when it is built).
        image_size: side of the views.
        batch_size: images per optimiser step over all processes and accumulation steps.
        optimizer: ``lars``, ``sgd`` or ``adamw``.
        lr: peak learning rate (None: the optimiser's default for the batch size).
        weight_decay: (None: the optimiser's default).
        warmup_epochs: linear warm-up (None: 10 epochs, at most a tenth of the run).
        tau_base: EMA decay at step 0, raised to 1 on a cosine over the run.
        accumulate: micro-batches per optimiser step.
        seed: model, data order and augmentations.
        projection_size, projection_hidden_size: the heads.
        views_in_one_batch: both views as one batch of 2B.
        use_batchnorm: BatchNorm in the heads (the paper's); False: LayerNorm.
        backbone_bn: the backbone's BatchNorm layers in training: ``batch`` (the paper's: batch
            statistics, running statistics of the views) or ``frozen`` (eval mode throughout,
            the statistics the net was built with; ``batchnorm.freeze_batchnorm_statistics``).
        recipe: the preset the defaults came from (``paper``, ``cifar``).
        views: the views' preset the run resolved them from (``augment.view_settings``: ``auto``
            fits them to the size, ``paper`` is Table 6); informational, the fields below decide.
        crop_scale_min, blur_p1, blur_p2, blur_sigma_min, blur_sigma_max, solarize_p1, solarize_p2,
            interpolation: the views' resolved values (``VIEW_DEFAULTS``: the paper's).
        lars_trust, lars_clip: LARS' trust coefficient and solo-learn's ``clip_lr``.
    """

    model: str = "resnet50"
    in_chans: int | None = None
    image_size: int = 224
    batch_size: int = 256
    optimizer: str = "lars"
    lr: float | None = None
    weight_decay: float | None = None
    warmup_epochs: float | None = None
    tau_base: float = 0.996
    accumulate: int = 1
    seed: int = 0
    projection_size: int = 256
    projection_hidden_size: int = 4096
    views_in_one_batch: bool = False
    use_batchnorm: bool = True
    backbone_bn: str = "batch"
    recipe: str = "paper"
    views: str = "paper"
    crop_scale_min: float = 0.08
    blur_p1: float = 1.0
    blur_p2: float = 0.1
    blur_sigma_min: float = 0.1
    blur_sigma_max: float = 2.0
    solarize_p1: float = 0.0
    solarize_p2: float = 0.2
    interpolation: str = "bicubic"
    lars_trust: float = 1e-3
    lars_clip: bool = False

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The recipe's keys, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Recipe:
        """The recipe in a checkpoint's ``args`` (or any mapping): its keys, other keys ignored.

        A key the mapping lacks (a checkpoint written before it existed) takes the field's
        default: the value that version ran with. A key holding None where the field needs a
        value (an older checkpoint's ``recipe: None``) is treated as missing.

        Raises:
            TypeError: not a mapping.
            ValueError: ``model`` is missing (a mapping that holds no recipe).
        """
        if not isinstance(values, Mapping):
            raise TypeError(f"a recipe is read from a mapping (a checkpoint's args), got {type(values).__name__}")
        if not values.get("model"):
            raise ValueError("the mapping holds no recipe: 'model' is missing")
        optional = {f.name for f in dataclasses.fields(cls) if f.default is None}
        kept = {k: values[k] for k in cls.field_names() if k in values and (values[k] is not None or k in optional)}
        for f in dataclasses.fields(cls):
            value = kept.get(f.name)
            if f.name in kept and value is not None and not _of_kind(value, str(f.type)):
                raise ValueError(
                    f"the recipe's {f.name} is {value!r}, not of type {str(f.type).split(' |')[0]}: the checkpoint was "
                    "edited or written by another program"
                )
        return cls(**kept)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (str, int, float, bool, None) for a ``weights_only`` checkpoint."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Recipe:
        """A copy with some fields changed (the recipe itself is frozen)."""
        return dataclasses.replace(self, **changes)

    @property
    def channels(self) -> int:
        """Channels of the images fed to the net: 1 for a one-channel model, else 3 (converted if needed)."""
        return 1 if self.in_chans == 1 else 3

    def view_values(self) -> dict[str, float | str]:
        """The view fields (``VIEW_DEFAULTS``' keys) and their values."""
        return {key: getattr(self, key) for key in VIEW_DEFAULTS}

    def view_overrides(self, view: int) -> dict[str, Any]:
        """``BYOLAugment`` overrides of view 1 or 2 that give exactly the recipe's views."""
        return {
            "crop_scale": (float(self.crop_scale_min), 1.0),
            "blur_p": float(self.blur_p1 if view == 1 else self.blur_p2),
            "blur_sigma": (float(self.blur_sigma_min), float(self.blur_sigma_max)),
            "solarize_p": float(self.solarize_p1 if view == 1 else self.solarize_p2),
            "interpolation": str(self.interpolation),
        }
