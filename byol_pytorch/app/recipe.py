"""The flags of ``byol-pytorch train`` and the run's recipe they resolve to.

The recipe (``training.recipe.Recipe``: model, sizes, optimiser, schedules, views, seed) is
fixed for the life of a run: a resumed run takes it from its checkpoint, and a flag that
contradicts it is an error. The ``argparse.Namespace`` stays here, at the command's edge.
The other flags (where, how fast, how often to report) may
change between a run and its resumption.

``--recipe`` picks the defaults of the flags not given: ``paper`` (Grill et al. 2020,
ImageNet) or ``cifar`` (solo-learn's BYOL CIFAR config, ``PRESETS["cifar"]``, each value
with its source). Without ``--recipe``, ``--data cifar10:ROOT`` / ``cifar100:ROOT`` gets
``cifar`` and any other data ``paper``. A flag given explicitly always wins.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from ..augment import INTERPOLATIONS, view_settings
from ..augment import PRESETS as PRESETS_OF_VIEWS
from ..byol import MAX_CHANNELS
from ..data.cifar import is_cifar_spec
from ..training.distributed import DistContext
from ..training.models import BACKBONE_BN
from ..training.optim import OPTIMIZERS, default_lr, default_weight_decay
from ..training.recipe import VIEW_DEFAULTS, Recipe
from .errors import UserError

__all__ = [
    "CHECKPOINT_EVERY",
    "CONVNEXT_LR_PER_256",
    "DEFAULT_EPOCHS",
    "FAMILY_OPTIMIZERS",
    "Family",
    "LOG_EVERY",
    "MOBILE_LR_PER_256",
    "PRESETS",
    "RECIPE_ADVICE",
    "RECIPE_DEFAULTS",
    "SHUFFLE_BUFFER",
    "add_train_arguments",
    "check_seed",
    "check_sizes",
    "family_lr",
    "family_of",
    "get_args_parser",
    "lr_help",
    "optimizer_for",
    "plain",
    "preset_name",
    "resolve_recipe",
    "run_length",
]

RECIPE_DEFAULTS: dict[str, Any] = Recipe().to_dict()  # the paper's: resnet50, 224 px, LARS, Table 6 views
DEFAULT_EPOCHS = 100
CHECKPOINT_EVERY = 1000  # train's --checkpoint-every for a new run (a resumed one keeps its own)
LOG_EVERY = 10  # and --log-every
MOBILE_LR_PER_256 = 0.3
"""SGD's peak lr per 256 images for the BatchNorm mobile nets in ``train``'s recipe (warm-up, then cosine).

Six times SimSiam's 0.05, measured in the robustness matrix's cli loop at 0.05, 0.2, 0.3 and 0.5
(benchmarks/results/robustness.md, "The CLI's learning rate for the mobile nets"): at 200 steps
0.3 lifts all four mobile nets measured over 0.05, and on seed 0 it is the one rate that puts
both MobileNets above their untouched net (0.2 leaves MobileNetV2 under, 0.5 MobileNetV3; on
seed 1 MobileNetV3 ends under its own). It narrows the projections: the collapse alarm fires on
MobileNetV3-small at this rate while its kNN rises."""

CONVNEXT_LR_PER_256 = 2.5e-4
"""AdamW's peak lr per 256 images for ConvNeXt in ``train``'s recipe: the ConvNeXt paper's own (Liu et al. 2022,
ImageNet-1k: 4e-3 at batch 4096), half DINO's 5e-4 that ``--optimizer adamw`` alone takes.

Chosen in the robustness matrix's cli loop (benchmarks/results/robustness.md, "ConvNeXt's rate"); the figures
are the ConvNeXt entry's evidence in ``FAMILY_OPTIMIZERS``, which the start line prints and the README quotes."""

RECIPE_ADVICE = (
    "What to try, by backbone (README, 'A recipe for the backbone'): BatchNorm convnets, mobile ones above all "
    "(MobileNet, EfficientNet, GhostNet): momentum SGD (with no --optimizer, train takes it for the mobile nets "
    f"at a peak --lr of {MOBILE_LR_PER_256:g} x batch/256; --optimizer sgd alone means "
    f"{OPTIMIZERS['sgd']['lr_per_256']:g}), a longer run, or where the projections collapse a lower --lr or a "
    f"longer --warmup-epochs; ConvNeXt: AdamW at ConvNeXt's own {CONVNEXT_LR_PER_256:g} x batch/256 (train "
    "takes it with no --optimizer) and a longer run; and check that --val-data holds the kind of images you "
    "train on"
)
SHUFFLE_BUFFER = 1000  # as webdataset's examples; held as header positions, so memory is no concern

_SOLO = "solo-learn scripts/pretrain/cifar/byol.yaml"
_SOLO_VIEWS = "solo-learn scripts/pretrain/cifar/augmentations/asymmetric.yaml"
# Each recipe: the defaults it changes, the lr per 256 images and weight decay of its
# optimiser, its length, and the source of each value (README "CIFAR-10" shows them).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"values": {}, "optimizer": {}, "epochs": DEFAULT_EPOCHS, "sources": {}},
    "cifar": {
        "values": {
            "model": "cifar_resnet18",
            "image_size": 32,
            "batch_size": 256,
            "optimizer": "lars",
            "tau_base": 0.99,
            "projection_size": 256,
            "projection_hidden_size": 4096,
            "crop_scale_min": 0.08,
            "blur_p1": 0.0,
            "blur_p2": 0.0,
            "solarize_p1": 0.0,
            "solarize_p2": 0.2,
            "lars_trust": 0.02,
            "lars_clip": True,
        },
        "optimizer": {"lars": {"lr_per_256": 1.0, "weight_decay": 1e-5}},
        "epochs": 1000,
        "sources": {
            "model": f"{_SOLO}: resnet18; CIFAR stem (3x3 conv stride 1, no max-pool) of solo-learn's backbones",
            "image_size": f"{_SOLO_VIEWS}: crop_size 32",
            "batch_size": f"{_SOLO}: optimizer.batch_size 256",
            "optimizer": f"{_SOLO}: lars, exclude_bias_n_norm",
            "lr": f"{_SOLO}: optimizer.lr 1.0 at batch 256 (here scaled by batch/256)",
            "weight_decay": f"{_SOLO}: optimizer.weight_decay 1e-5",
            "lars_trust": f"{_SOLO}: optimizer.kwargs.eta 0.02",
            "lars_clip": f"{_SOLO}: optimizer.kwargs.clip_lr True",
            "tau_base": f"{_SOLO}: momentum.base_tau 0.99, final_tau 1.0",
            "projection_size": f"{_SOLO}: proj_output_dim 256",
            "projection_hidden_size": f"{_SOLO}: proj_hidden_dim 4096, pred_hidden_dim 4096",
            "crop_scale_min": f"{_SOLO_VIEWS}: rrc.crop_min_scale 0.08 (max 1.0), both views",
            "blur_p1": f"{_SOLO_VIEWS}: gaussian_blur.prob 0.0, both views",
            "blur_p2": f"{_SOLO_VIEWS}: gaussian_blur.prob 0.0, both views",
            "solarize_p1": f"{_SOLO_VIEWS}: solarization.prob 0.0 (view 1)",
            "solarize_p2": f"{_SOLO_VIEWS}: solarization.prob 0.2 (view 2)",
            "epochs": f"{_SOLO}: max_epochs 1000",
        },
    },
}


def lr_help() -> str:
    """One line per optimiser naming its default lr and weight decay and their source."""
    return "; ".join(
        f"{name}: {spec['lr_per_256']:g} x batch/256, wd {spec['weight_decay']:g} ({spec['source']})"
        for name, spec in OPTIMIZERS.items()
    )


def _add_run_flags(a: Any) -> None:
    """Where the run reads and writes: data, run folder, resumption."""
    a(
        "--data",
        help="folder of images, searched recursively (unreadable files are skipped and counted); "
        "cifar10:ROOT / cifar100:ROOT for the official CIFAR python batches (ROOT holds cifar-10-batches-py "
        "or is it; never downloaded); tar shards in webdataset's layout: a brace pattern "
        "'shards/train-{000000..000099}.tar', one .tar, or a folder holding only .tar files (pip install "
        "'byol-pytorch[shards]'); remote tar shards: http(s)://, s3://, gs:// URLs with the same brace "
        "patterns, or pipe:CMD, streamed (pip install 'byol-pytorch[remote]'); hf:PATH for a local Hugging Face "
        "dataset: a save_to_disk folder, parquet file(s) or an imagefolder folder (pip install "
        "'byol-pytorch[datasets]'; never the Hub); with --resume, defaults to the run's data",
    )
    a(
        "--shuffle-buffer",
        type=int,
        help="tar shards: samples in each shard's shuffle buffer, which holds tar header positions, not images "
        f"(default: {SHUFFLE_BUFFER}, or the resumed run's; 0: tar order; the shard order is shuffled every epoch)",
    )
    a(
        "--shard-index",
        metavar="INDEX",
        help="remote tar shards: a shard index with each shard's sample count (webdataset's wids JSON, written by "
        "byol-pytorch shards index; a path or URL), so start-up reads no shard; without it the shards are read "
        "once to count them and the counts cached (default: the resumed run's)",
    )
    a(
        "--image-column",
        help="hf: data: the image column (default: the resumed run's, else the one column whose feature is "
        "datasets.Image, else the one of image bytes)",
    )
    a(
        "--hf-split",
        help="hf: data with splits (a DatasetDict, an imagefolder with train/test folders): the split to train on "
        "(default: the resumed run's, else train, or the only split)",
    )
    a("--out", default="runs/byol", help="run folder: last.pt, metrics.jsonl, curves.png (default: %(default)s)")
    a(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue the run in --out from OUT/last.pt (or from CHECKPOINT): model, optimiser, schedules, "
        "data position and random generators; --max-steps/--epochs set a new total",
    )


def _add_recipe_flags(a: Any) -> None:
    """The recipe: model, sizes, optimiser, schedules, heads, seed."""
    a(
        "--recipe",
        choices=sorted(PRESETS),
        help="defaults of the flags below that are not given: paper (Grill et al. 2020) or cifar (solo-learn's "
        "BYOL CIFAR config: cifar_resnet18, 32 px, LARS lr 1.0, wd 1e-5, tau 0.99, no blur, 1000 epochs); "
        "default: cifar for --data cifar10:/cifar100:, else paper",
    )
    a(
        "--model",
        help="timm model name, torchvision:NAME or cifar_resnet18 (CIFAR stem), built with random weights "
        "(default: resnet50, the paper's backbone; cifar_resnet18 with --recipe cifar)",
    )
    a(
        "--in-chans",
        type=int,
        help="input channels of the model (default: the model's, 3); images are converted to them",
    )
    a("--image-size", type=int, help="side of the augmented views (default: 224, the paper's)")
    a(
        "--batch-size",
        type=int,
        help="images per optimizer step over all processes and accumulation steps (default: 256; the paper uses 4096)",
    )
    a("--max-steps", type=int, help="total optimizer steps; overrides --epochs")
    a(
        "--epochs",
        type=int,
        help=f"epochs to train (default: {DEFAULT_EPOCHS}, 1000 with --recipe cifar; the paper's longest run is 1000)",
    )
    a(
        "--optimizer",
        choices=["lars", "adamw", "sgd"],
        help="default: chosen for the --model's family from the robustness matrix (README, 'A recipe for the "
        "backbone'): sgd (momentum 0.9) for ResNets and mobile BatchNorm nets, adamw for ConvNeXt, lars for RegNets "
        "and families not measured (the paper's: momentum 0.9, trust coefficient 1e-3, biases and norms excluded)",
    )
    a(
        "--lr",
        type=float,
        help=f"peak learning rate; default per optimizer: {lr_help()}; with no --optimizer, the mobile BatchNorm "
        f"nets take sgd at {MOBILE_LR_PER_256:g} x batch/256 and ConvNeXt adamw at {CONVNEXT_LR_PER_256:g} x "
        "batch/256 (README, 'A recipe for the backbone')",
    )
    a("--weight-decay", type=float, help="default per optimizer, see --lr (the paper: 1.5e-6 with LARS)")
    a(
        "--warmup-epochs",
        type=float,
        help="linear warm-up before the cosine decay (default: 10 epochs as in the paper, at most 10%% of the run)",
    )
    a(
        "--tau-base",
        type=float,
        help="EMA decay of the target at step 0, raised to 1 by a cosine schedule "
        "(default: 0.996, the paper's; its 100-epoch config uses 0.99)",
    )
    a("--projection-size", type=int, help="projector output (default: 256, the paper's)")
    a("--projection-hidden-size", type=int, help="hidden width of projector and predictor (default: 4096)")
    a(
        "--accumulate",
        type=int,
        help="micro-batches per optimizer step (default: 1); --batch-size is split "
        "over them (BatchNorm sees the micro-batch)",
    )
    a("--seed", type=int, help="seed of the model, the data order and the augmentations (default: 0)")
    _add_batchnorm_flags(a)
    _add_view_flags(a)


def _add_batchnorm_flags(a: Any) -> None:
    """What BatchNorm sees in training: both views at once, the backbone's statistics frozen."""
    a(
        "--views-in-one-batch",
        action="store_const",
        const=True,
        default=None,
        help="forward both views as one batch of 2B: fewer, larger passes (faster on CPUs and small "
        "batches), BatchNorm statistics over both views instead of the paper's per view",
    )
    a(
        "--backbone-bn",
        choices=list(BACKBONE_BN),
        default=None,
        help="the backbone's BatchNorm in training: batch = the paper's batch statistics (default); frozen = "
        "eval mode throughout, normalising with the statistics the net was built with, its affine weights still "
        "training, nothing to re-estimate after (README, 'A recipe for the backbone': with --optimizer sgd, against "
        "the default at 200 steps it gained on MobileNetV2, both MobileNetV3s and GhostNet and lost 20 points on "
        "EfficientNet-B0; over 1,000 steps it ended 5.7 and 4.8 points under the default on MobileNetV2 and "
        "MobileNetV3-large)",
    )


def _add_view_flags(a: Any) -> None:
    """The views' preset, crop scale, resize, blur and solarize, LARS' trust ratio."""
    a(
        "--views",
        choices=list(PRESETS_OF_VIEWS),
        help="defaults of the view flags below that are not given: auto (fitted to --image-size: the paper's "
        "Table 6 at 224 px and above; below it the blur's sigma scales with the side, off below 56 px, and "
        "crops are resized bilinearly) or paper (Table 6 at any size) (default: auto)",
    )
    a("--crop-scale-min", type=float, help="smallest crop area, as a fraction of the image (default: 0.08, both)")
    a(
        "--interpolation",
        choices=list(INTERPOLATIONS),
        help="resize of the crops (default: --views': bicubic at 224 px and above, bilinear below)",
    )
    a(
        "--blur-sigma",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="range of the blur's sigma in pixels (default: --views': 0.1 2.0 at 224 px, scaled with the side below)",
    )
    for name, what, paper, cifar in (
        ("blur", "Gaussian blur", "1.0/0.1 at 224 px, off below 56 px", "0/0"),
        ("solarize", "solarize", "0/0.2", "0/0.2"),
    ):
        for view in (1, 2):
            a(
                f"--{name}-p{view}",
                type=float,
                help=f"{what} probability of view {view} (default: paper {paper}, cifar {cifar} for views 1/2)",
            )
    a("--lars-trust", type=float, help="LARS trust coefficient eta (default: paper 1e-3, cifar 0.02)")
    a(
        "--lars-clip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="cap LARS' trust ratio at 1/lr, solo-learn's clip_lr (default: off; on with --recipe cifar)",
    )


def _add_runtime_flags(a: Any) -> None:
    """How the run executes and reports: precision, devices, checkpoints, metrics, monitor."""
    a(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        help="autocast precision (default: bf16 on GPUs that support it, fp32 otherwise; fp16 uses a GradScaler)",
    )
    a(
        "--workers",
        type=int,
        help="data loading processes per training process (default: min(8, CPUs); for tar shards, at most the "
        "shards per process)",
    )
    a("--device", help="cpu, cuda, cuda:1, mps (default: this process's GPU when there is one, else cpu)")
    a(
        "--checkpoint-every",
        type=int,
        default=None,
        help=f"save OUT/last.pt every N steps (default: the run's on --resume, else {CHECKPOINT_EVERY}; also at "
        "the end and on SIGTERM/SIGINT)",
    )
    a(
        "--log-every",
        type=int,
        default=None,
        help=f"write metrics every N steps (default: the run's on --resume, else {LOG_EVERY})",
    )
    a(
        "--val-data",
        help="labelled data (a folder of class sub-folders, cifar10:ROOT / cifar100:ROOT, hf:, shards) for a kNN "
        "accuracy monitor; it measures the untouched net first, as the run's reference (--resume keeps the run's)",
    )
    a(
        "--label-column",
        help="hf: --val-data: the column of class indices (default: the one ClassLabel column, else integers "
        "named label/labels; the run's on --resume)",
    )
    a(
        "--val-every",
        type=int,
        default=None,
        help="run the kNN monitor every N epochs and at the end (default: the run's on --resume, else 5)",
    )
    a(
        "--bn-stats",
        choices=["clean", "trained"],
        default="clean",
        help="BatchNorm statistics of what leaves training (the kNN monitor, and the clean_bn entry of each "
        "checkpoint, which export/eval/embed use): clean = re-estimated on 512 un-augmented training images; "
        "trained = the running statistics of the augmented views (default: %(default)s)",
    )
    a(
        "--tensorboard",
        action=argparse.BooleanOptionalAction,
        help="also log to OUT/tensorboard (a resumed run keeps the run's choice; --no-tensorboard stops it)",
    )
    a(
        "--wandb",
        action=argparse.BooleanOptionalAction,
        help="also log to Weights & Biases (pip install 'byol-pytorch[wandb]'): the metrics, the recipe, curves "
        "and views at the end; a resumed run continues its W&B run (--no-wandb stops it); WANDB_MODE=offline "
        "works without network",
    )
    a("--wandb-project", help="W&B project (default: byol-pytorch; a resumed run keeps its own)")
    a("--channels-last", action="store_true", help="channels_last memory format (faster convnets on GPUs)")
    a("--compile", action="store_true", help="torch.compile the learner (slow first steps, faster after)")
    a(
        "--sync-bn-backbone",
        action="store_true",
        help="SyncBatchNorm in the backbone too, on several GPUs (the heads always use it there)",
    )


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the flags of ``byol-pytorch train`` to ``parser`` and return it."""
    for add in (_add_run_flags, _add_recipe_flags, _add_runtime_flags):
        add(parser.add_argument)
    return parser


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The argument parser of ``byol-pytorch train``."""
    parser = argparse.ArgumentParser(
        "byol-pytorch train", add_help=add_help, description="BYOL pretraining on a folder of images."
    )
    return add_train_arguments(parser)


def plain(value: Any) -> Any:
    """A flag's value as a plain number/str/bool/None (what a weights-only checkpoint can hold)."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def preset_name(args: argparse.Namespace, saved: Recipe | None) -> str:
    """The run's ``--recipe``: the checkpoint's, the flag, or ``cifar`` for CIFAR data, else ``paper``."""
    if saved is not None:
        return saved.recipe
    given = getattr(args, "recipe", None)
    if given is not None:
        return str(given)
    return "cifar" if is_cifar_spec(getattr(args, "data", None)) else "paper"


class Family(NamedTuple):
    """One row of ``FAMILY_OPTIMIZERS``: what ``train`` takes for a backbone family without ``--optimizer``."""

    name: str
    fragments: tuple[str, ...]  # a --model containing any of these (case-insensitive) is of the family
    optimizer: str
    lr_per_256: float | None  # the peak lr per 256 images; None: the optimiser's default (``OPTIMIZERS``)
    evidence: str  # the matrix's figures, printed on the start line and quoted in the README's table


FAMILY_OPTIMIZERS: tuple[Family, ...] = (
    # evidence: kNN % on Fashion-MNIST, 32 px, 200 steps, batch 256; BENCHMARKS.md "Robustness matrix";
    # "the CLI": this recipe with that optimiser; "own loop": constant lr, SGD 0.05 momentum 0.9 or Adam 1e-3
    Family(
        "RegNet",
        ("regnet",),
        "lars",
        None,
        "RegNetX-200MF, the CLI: LARS 52.7, AdamW 45.9; own loop: Adam 56.9, SGD 49.4; RegNetY-200MF: LARS 59.6, "
        "own loop Adam 60.1, SGD 54.9",
    ),
    Family(
        "mobile BatchNorm nets",
        ("mobilenet", "ghostnet", "efficientnet", "mnasnet", "fbnet", "lcnet", "mixnet", "tinynet", "hardcorenas"),
        "sgd",
        MOBILE_LR_PER_256,
        "the CLI, SGD at lr 0.3 against 0.05 (seed 0): MobileNetV3-small 66.9 / 60.4, MobileNetV2-0.5 50.5 / 25.4, "
        "GhostNet 72.5 / 47.5, EfficientNet-B0 56.0 / 54.6; own loop, SGD 0.05 against Adam (2 or 5 seeds each): "
        "MobileNetV3-small 63.0 / 37.8, MobileNetV2-0.5 27.3 / 22.6, GhostNet 60.8 / 46.3",
    ),
    Family(
        "ResNets",
        ("resnet", "resnext", "wide_resnet", "seresnet"),
        "sgd",
        None,
        "ResNet-10t, the CLI: SGD 73.9, LARS (before the size-fitted views) 71.5; own loop: SGD 76.1, Adam 73.8",
    ),
    Family(
        "ConvNeXt",
        ("convnext",),
        "adamw",
        CONVNEXT_LR_PER_256,
        "ConvNeXt-atto, the CLI (seeds 0 / 1 / 2): AdamW at 2.5e-4 79.5 / 79.7 / 80.2, at 5e-4 78.5 / 78.4 / 79.1, "
        "SGD 77.1 / 74.9 (untouched net 78.8 / 79.0 / 79.9); at 1,000 steps AdamW 2.5e-4 80.7, 5e-4 80.0, SGD 80.5; "
        "held-out ConvNeXt-femto: AdamW 2.5e-4 79.4, 5e-4 78.6, SGD 77.2; own loop: SGD 77.7, Adam 74.0",
    ),
)
"""The optimiser ``train`` takes per backbone family when ``--optimizer`` is not given (first match wins)."""


def _family_entry(model: str) -> Family | None:
    """The first ``FAMILY_OPTIMIZERS`` entry with a name fragment in ``model`` (case-insensitive), else None."""
    name = model.lower()
    return next((family for family in FAMILY_OPTIMIZERS if any(part in name for part in family.fragments)), None)


def family_of(model: str) -> tuple[str, str, str] | None:
    """``(family, optimizer, evidence)`` of the first ``FAMILY_OPTIMIZERS`` entry naming ``model``, else None."""
    family = _family_entry(model)
    return None if family is None else (family.name, family.optimizer, family.evidence)


def family_lr(model: str) -> float | None:
    """The peak lr per 256 images ``train`` takes with the family's optimiser (None: that optimiser's default).

    Examples:
        >>> family_lr("mobilenetv2_100") == MOBILE_LR_PER_256, family_lr("resnet50"), family_lr("vit_small")
        (True, None, None)
    """
    family = _family_entry(model)
    return None if family is None else family.lr_per_256


def optimizer_for(model: str) -> tuple[str, str]:
    """``(optimizer, why)`` for a model name: the family's measured choice, else the paper's LARS.

    Examples:
        >>> optimizer_for("mobilenetv3_large_100")[0], optimizer_for("regnety_016")[0], optimizer_for("vit_small")[0]
        ('sgd', 'lars', 'lars')
    """
    found = family_of(model)
    if found is None:
        return "lars", "not measured for this family: the paper's LARS"
    family, optimizer, evidence = found
    return optimizer, f"{family}: {evidence}"


def _same_setting(given: object, kept: object) -> bool:
    """A flag given on ``--resume`` agrees with the checkpoint's value: a float to the 6 digits the start-up line
    prints it with (``--lr 0.0015625`` and ``0.00156250001`` are one rate), anything else exactly."""
    if isinstance(given, float) and isinstance(kept, (int, float)) and not isinstance(kept, bool):
        return math.isclose(given, float(kept), rel_tol=1e-5, abs_tol=0.0)  # (an int flag, a seed, stays exact)
    return given == kept


def resolve_recipe(args: argparse.Namespace, saved: Recipe | Mapping[str, Any] | None) -> Recipe:
    """The run's recipe: the flags, else the ``--recipe`` preset's, else the defaults; the checkpoint's when resuming.

    Args:
        args: the flags of ``byol-pytorch train``.
        saved: the resumed checkpoint's recipe, or its ``args`` (read by ``Recipe.from_dict``:
            keys it lacks are the values that version ran with), or None.

    Raises:
        UserError: an unknown preset, or a flag that contradicts the resumed run's recipe.
    """
    if saved is not None and not isinstance(saved, Recipe):
        saved = Recipe.from_dict(saved)
    name = preset_name(args, saved)
    if name not in PRESETS:
        raise UserError(f"unknown recipe {name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    if saved is not None:
        sigma = getattr(args, "blur_sigma", None)
        for key, value in saved.to_dict().items():
            given = getattr(args, key, None)
            if sigma is not None and key in ("blur_sigma_min", "blur_sigma_max"):
                given = float(sigma[0] if key == "blur_sigma_min" else sigma[1])
            if given is not None and not _same_setting(given, value):
                flag = "--" + key.replace("_", "-")
                kept = "default (the flag was not given)" if value is None else value
                raise UserError(
                    f"{flag} {given} differs from the checkpoint's {kept}: a resumed run keeps its "
                    f"recipe; drop {flag}, or start a new run with another --out"
                )
        return saved
    values = {**RECIPE_DEFAULTS, **preset["values"], "recipe": name}
    for key in values:
        given = getattr(args, key, None)
        if given is not None:
            values[key] = given
    family_rate = None  # the family's lr, taken with the optimiser the family chose
    if getattr(args, "optimizer", None) is None and "optimizer" not in preset["values"]:
        values["optimizer"] = optimizer_for(str(values["model"]))[0]
        family_rate = family_lr(str(values["model"]))
    _resolve_views(values, args, set(preset["values"]))
    own = preset["optimizer"].get(values["optimizer"])  # the recipe's lr and decay for its own optimiser
    if values["lr"] is None:
        per_256 = own["lr_per_256"] if own else family_rate
        lr = per_256 * values["batch_size"] / 256 if per_256 is not None else None
        values["lr"] = lr if lr is not None else default_lr(values["optimizer"], values["batch_size"])
    if values["weight_decay"] is None:
        values["weight_decay"] = own["weight_decay"] if own else default_weight_decay(values["optimizer"])
    return Recipe(**values)


def _resolve_views(values: dict[str, Any], args: argparse.Namespace, from_preset: set[str]) -> None:
    """The view fields neither a flag nor the ``--recipe`` preset set: from ``--views`` at the run's image size."""
    values["views"] = getattr(args, "views", None) or "auto"
    sigma = getattr(args, "blur_sigma", None)
    if sigma is not None:
        values["blur_sigma_min"], values["blur_sigma_max"] = float(sigma[0]), float(sigma[1])
    given = {key for key in VIEW_DEFAULTS if getattr(args, key, None) is not None} | from_preset
    if sigma is not None:
        given |= {"blur_sigma_min", "blur_sigma_max"}
    fitted = [view_settings(int(values["image_size"]), v, values["views"]) for v in (1, 2)]
    derived = {
        "crop_scale_min": fitted[0]["crop_scale"][0],
        "blur_p1": fitted[0]["blur_p"],
        "blur_p2": fitted[1]["blur_p"],
        "blur_sigma_min": fitted[0]["blur_sigma"][0],
        "blur_sigma_max": fitted[0]["blur_sigma"][1],
        "solarize_p1": fitted[0]["solarize_p"],
        "solarize_p2": fitted[1]["solarize_p"],
        "interpolation": fitted[0]["interpolation"],
    }
    values.update({key: value for key, value in derived.items() if key not in given})


def check_sizes(recipe: Recipe, ctx: DistContext, resumed: bool = False) -> int:
    """Validate sizes, tau and the batch split (``resumed``: the batch and accumulation are the checkpoint's, which
    a resumed run keeps); returns the per-process micro-batch."""
    batch, accumulate = recipe.batch_size, recipe.accumulate
    if recipe.image_size < 8:
        raise UserError(f"--image-size must be at least 8 pixels, got {recipe.image_size}")
    if recipe.in_chans is not None and not 1 <= recipe.in_chans <= MAX_CHANNELS:
        raise UserError(
            f"--in-chans must be between 1 and {MAX_CHANNELS} (1: grayscale, 3: RGB), got {recipe.in_chans}"
        )
    if accumulate < 1:
        raise UserError(f"--accumulate must be at least 1, got {accumulate}")
    parts = ctx.world_size * accumulate  # the batch first: a default lr is scaled by it (a batch of 0: an lr of 0)
    if resumed and (batch % parts or batch // parts < 2):
        fits = [n for n in range(1, batch // (2 * accumulate) + 1) if batch % (n * accumulate) == 0]
        below = [n for n in fits if n <= ctx.world_size][-1:]
        nearest = [*below, *[n for n in fits if n > ctx.world_size][:1]]
        where = f"resume it on {' or '.join(map(str, nearest))} process(es), or " if nearest else ""
        raise UserError(
            f"the resumed run's batch of {batch} images in {accumulate} accumulation step(s) (its checkpoint's, which "
            f"a resumed run keeps) cannot be split into {ctx.world_size} process(es) of at least 2 images per step; "
            f"{where}start a new run with another --out"
        )
    if batch < 2 or batch % parts or batch // parts < 2:
        raise UserError(
            f"--batch-size {batch} cannot be split into {ctx.world_size} process(es) x {accumulate} "
            "accumulation step(s) of at least 2 images each (BatchNorm and the BYOL loss need 2 or more); "
            f"use a multiple of {parts} that is at least {2 * parts}"
        )
    if not 0.0 <= recipe.tau_base <= 1.0:
        raise UserError(f"--tau-base must be in [0, 1] (the paper: 0.996), got {recipe.tau_base}")
    for key in ("blur_p1", "blur_p2", "solarize_p1", "solarize_p2"):
        if not 0.0 <= getattr(recipe, key) <= 1.0:
            raise UserError(f"--{key.replace('_', '-')} is a probability in [0, 1], got {getattr(recipe, key)}")
    if not 0.0 < recipe.blur_sigma_min <= recipe.blur_sigma_max:
        raise UserError(
            f"--blur-sigma must be two sigmas 0 < LOW <= HIGH (the paper: 0.1 2.0), got "
            f"{recipe.blur_sigma_min} {recipe.blur_sigma_max}"
        )
    if not 0.0 < recipe.crop_scale_min <= 1.0:
        raise UserError(f"--crop-scale-min must be in (0, 1] (the paper: 0.08), got {recipe.crop_scale_min}")
    if not 0.0 <= recipe.lars_trust < math.inf:
        raise UserError(f"--lars-trust must be a finite number >= 0 (the paper: 1e-3), got {recipe.lars_trust}")
    check_seed(recipe.seed)
    # NaN fails every comparison: each test is written so that NaN (and inf where it says so) is refused.
    # The optimisers hold these as float32: a larger one overflows inside torch.
    if recipe.lr is not None and not 0.0 < recipe.lr < FLOAT32_MAX:
        raise UserError(
            f"--lr must be a positive finite number below {FLOAT32_MAX:.3g} (or left out for the model's default), "
            f"got {recipe.lr}"
        )
    if recipe.weight_decay is not None and not 0.0 <= recipe.weight_decay < FLOAT32_MAX:
        raise UserError(
            f"--weight-decay must be a finite number >= 0 below {FLOAT32_MAX:.3g}, got {recipe.weight_decay}"
        )
    if recipe.warmup_epochs is not None and not 0.0 <= recipe.warmup_epochs < math.inf:
        raise UserError(f"--warmup-epochs must be a finite number >= 0 (0: no warm-up), got {recipe.warmup_epochs}")
    return batch // (ctx.world_size * accumulate)


FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max
SEED_LIMIT = 2**62  # the seed plus a rank or a worker's offset stays a signed 64-bit integer


def check_seed(seed: int, flag: str = "--seed") -> None:
    """A ``UserError`` for a seed that torch's and numpy's generators cannot take once offset per rank or worker."""
    if not -SEED_LIMIT < seed < SEED_LIMIT:
        raise UserError(f"{flag} must be a whole number between -2**62 and 2**62, got {seed}")


def run_length(
    args: argparse.Namespace,
    recipe: Recipe,
    steps_per_epoch: int,
    saved_total: int | None,
    saved_warmup: int | None = None,
) -> tuple[int, int]:
    """``(total, warmup)`` optimizer steps: a new total when --max-steps/--epochs come with --resume.

    The warm-up is ``--warmup-epochs`` (default 10, the paper's, but at most 10% of the run). A
    resumed run keeps the default warm-up it has (``saved_warmup``, the checkpoint's), however
    often its total is lengthened: a run past its warm-up is never put back inside a longer one;
    a shortened run's is at most a tenth of the new total. (A checkpoint without the figure: at
    most a tenth of its saved total.)
    """
    if args.max_steps is not None:
        total = args.max_steps
    elif args.epochs is not None:
        total = args.epochs * steps_per_epoch
    elif saved_total is not None:
        total = saved_total
    else:
        total = PRESETS.get(recipe.recipe, PRESETS["paper"])["epochs"] * steps_per_epoch
    if total < 1:
        raise UserError(f"the run would have {total} steps; pass --max-steps or --epochs of at least 1")
    warmup_epochs = recipe.warmup_epochs if recipe.warmup_epochs is not None else 10.0
    warmup = round(warmup_epochs * steps_per_epoch)
    if recipe.warmup_epochs is not None:
        return total, min(warmup, total)
    if saved_warmup is not None:
        shortened = saved_total is not None and total < saved_total
        return total, min(saved_warmup, total // 10) if shortened else min(saved_warmup, total)
    first = saved_total if saved_total is not None else total  # the length the warm-up was set for
    return total, min(warmup, first // 10, total // 10)
