"""Validation during and after training: kNN accuracy of a learner on labelled data of any form.

``KnnMonitor`` opens the bank and the held-out queries with ``data.labelled_split`` (a labelled
folder, CIFAR, an ``hf:`` dataset with labels, labelled tar shards), embeds both with the
learner's backbone and scores weighted kNN (``evaluate.knn_accuracy``). ``byol-pytorch train
--val-data`` runs it periodically, ``byol-pytorch eval`` once.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Dataset, Subset

from ..augment import BYOLAugment
from ..batchnorm import batchnorm_layers, clean_statistics
from ..data import UNREADABLE, labelled_split, make_loader, match_channels
from ..data.folder import NoReadableImagesError
from .evaluate import extract_features, knn_accuracy

__all__ = ["BelowReference", "KnnMonitor", "UnreadableKnnData", "clean_input", "knn_noise", "split_labelled"]


class UnreadableKnnData(NoReadableImagesError):
    """Not one bank image, or not one held-out image, of a kNN evaluation could be read; or the
    readable bank images are of one class only (every query would score right)."""


def clean_input(learner: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """What makes loaded uint8 images (1 or 3 channels) the net's input for its clean BatchNorm statistics.

    The channels the learner takes (``match_channels``: a 4-channel net gets the first channel repeated, as
    in training), then the views' normalisation (``BYOLAugment.normalize``; other views: ``[0, 1]`` floats).
    """
    augment = getattr(learner, "augment1", None)
    normalize = augment.normalize if isinstance(augment, BYOLAugment) else _unit_float
    channels = getattr(learner, "channels", 3)
    return lambda x: normalize(match_channels(x, channels))


def _unit_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255 if x.dtype == torch.uint8 else x


def split_labelled(root: str, load_size: int, channels: int) -> tuple[Any, Any]:
    """``(bank, queries)`` of labelled data: ``data.labelled_split`` (kept under its 1.1.0 name)."""
    return labelled_split(root, load_size, channels)


def _base(dataset: Any) -> Any:
    """The dataset under any ``Subset`` of it."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


class KnnMonitor:
    """Weighted kNN accuracy of the online backbone on labelled data (``--val-data``, ``eval``).

    Features are the learner's embeddings (``learner(x, return_embedding=True,
    return_projection=False)``) of uint8 images, normalised like the training views,
    extracted in eval mode; modes are restored after.

    Args:
        root: the labelled data spec (see ``data.labelled_split``).
        load_size: side of the images: the training crop size.
        channels: images' channels (the backbone's).
        device: where features are computed.
        batch_size: images per forward.
        workers: loader processes.
        clean_images: un-augmented training images (uint8); given, each evaluation runs with the
            backbone's BatchNorm statistics re-estimated on them (``batchnorm.clean_statistics``:
            the trained statistics are given back after), as what leaves training carries them.
        data_options: ``split`` / ``image_column`` / ``label_column`` of ``hf:`` data (see
            ``data.labelled_split``).

    Raises:
        ValueError: data without labels, or too little of it (one line naming the spec).
    """

    def __init__(
        self,
        root: str,
        load_size: int,
        channels: int,
        device: torch.device,
        batch_size: int = 256,
        workers: int = 0,
        clean_images: torch.Tensor | None = None,
        data_options: dict[str, Any] | None = None,
    ):
        self.bank, self.queries = labelled_split(root, load_size, channels, **(data_options or {}))
        self.device, self.batch_size, self.workers = device, batch_size, workers
        self.clean_images = clean_images
        self.num_classes: int | None = None
        self.classes_present = 0
        self.scored: list[int] = []  # the bank's classes with held-out images, and its others (``features``)
        self.unscored: list[int] = []
        self.unbanked: list[int] = []  # classes with held-out images and none in the bank: never matched
        self.queries_scored = 0  # held-out images of the last evaluation
        self.unreadable = 0  # images of the last evaluation that could not be read (left out)
        self.missing: list[str] = []  # declared classes with no readable image in the last evaluation
        self._missing_named = False  # missing_warning(once=True) has given its line
        self._held_out_named = False  # held_out_warning(once=True) has

    def _features(self, learner: nn.Module, dataset: Dataset, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The readable images' features and labels (``UNREADABLE`` ones left out and counted)."""
        pin = torch.device(self.device).type == "cuda"  # no CUDA context for a CPU run on a GPU machine
        loader = make_loader(
            dataset, self.batch_size, self.workers, shuffle=False, drop_last=False, persistent=False, pin_memory=pin
        )
        to_channels = functools.partial(match_channels, channels=getattr(learner, "channels", 3))
        embed = functools.partial(learner, return_embedding=True, return_projection=False)
        features, labels = extract_features(
            embed, loader, device=self.device, transform=to_channels, return_labels=True
        )
        readable = labels != UNREADABLE
        self.unreadable += int((~readable).sum())
        if not readable.any():
            raise UnreadableKnnData(f"none of the {len(labels)} {what} images of the kNN data could be read")
        return features[readable], labels[readable]

    def features(self, learner: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(bank_features, bank_labels, query_features, query_labels)`` of the learner's backbone.

        Unreadable images are left out (``unreadable`` counts them), never replaced by others.
        """
        self.unreadable = 0
        with self._statistics(learner):
            bank, bank_labels = self._features(learner, self.bank, "bank")
            queries, query_labels = self._features(learner, self.queries, "held-out")
        if len(torch.unique(bank_labels)) < 2:  # shards: their labels are known once read
            raise UnreadableKnnData(
                "the readable images of the kNN data are of one class only (of the labels read, or the others' "
                "images could not be read); a kNN check needs two classes or more"
            )
        self.num_classes = int(max(bank_labels.max(), query_labels.max())) + 1  # the scores' width: labels 0..max
        self.classes_present = len(torch.unique(torch.cat([bank_labels, query_labels])))  # of them, with an image
        self.missing = self.missing_classes(torch.cat([bank_labels, query_labels]))
        banked = set(bank_labels.tolist())
        queried = set(query_labels.tolist())
        self.scored = sorted(queried & banked)
        self.unscored = sorted(banked - queried)
        self.unbanked = sorted(queried - banked)
        return bank, bank_labels, queries, query_labels

    def held_out_warning(self, once: bool = False) -> str | None:
        """The warning line when classes of the bank have no held-out image, or held-out images have no class in the
        bank (None: every class is scored and can be matched), from the last ``features`` call: the accuracy says
        nothing of the first (one class held out: nothing at all), and the second's queries are never right. With
        ``once``, also None after it has been given once (a run's periodic evaluations name them once)."""
        if not (self.unscored or self.unbanked) or (once and self._held_out_named):
            return None
        self._held_out_named = self._held_out_named or once
        classes = getattr(_base(self.bank), "classes", None)

        def shown(indices: list[int]) -> str:
            named = [
                str(classes[c]) if isinstance(classes, (list, tuple)) and c < len(classes) else str(c) for c in indices
            ]
            return ", ".join(named[:5]) + (", ..." if len(named) > 5 else "")

        every = len(self.unscored) + len(self.scored) + len(self.unbanked)
        held = _base(self.queries)
        root, split = getattr(held, "root", None), getattr(held, "split", None)  # a folder's, an hf: dataset's
        where = root if isinstance(root, Path) else f"split {split!r}" if isinstance(split, str) else None
        if held is not _base(self.bank) and where is not None:  # a split of its own
            fixes = [f"add images of {shown(self.unscored)} to the held-out split ({where})"] if self.unscored else []
            fixes += [f"add images of {shown(self.unbanked)} to the training split"] if self.unbanked else []
            fix = "; ".join(fixes)
        else:
            fix = (
                "give those classes more images (every fifth image of a class sub-folder is held out, every fifth "
                "sample of shards), or a val/ folder with images of every class"
            )
        parts = []
        if self.unscored:
            parts.append(
                f"the held-out images are of {len(self.scored) + len(self.unbanked)} of the {every} classes "
                f"({shown(self.unscored)}: none held out), so the accuracy says nothing of those"
            )
        if self.unbanked:  # a probe: a one-sample class of shards went to the held-out images, named nowhere
            parts.append(
                f"{len(self.unbanked)} of the {every} classes {'has' if len(self.unbanked) == 1 else 'have'} "
                f"held-out images and none to fit ({shown(self.unbanked)}), so those are never matched"
            )
        return f"{'; '.join(parts)}; {fix}"

    def missing_warning(self, spec: str, once: bool = False) -> str | None:
        """The warning line for the classes of the last evaluation that had no readable image (None: none;
        with ``once``, also None after it has been given once: a run's periodic evaluations name them once)."""
        if not self.missing or (once and self._missing_named):
            return None
        self._missing_named = self._missing_named or once
        rowless = self._rowless(self.missing)
        unreadable = [name for name in self.missing if name not in rowless]
        parts = []
        if unreadable:
            shown = ", ".join(unreadable[:5]) + (", ..." if len(unreadable) > 5 else "")
            parts.append(
                f"{len(unreadable)} class(es) of {spec} have no readable image ({shown}): their files were passed over"
            )
        if rowless:
            shown = ", ".join(rowless[:5]) + (", ..." if len(rowless) > 5 else "")
            parts.append(
                f"{len(rowless)} class(es) of {spec} have no image at all ({shown}): the data names them among its "
                "classes but holds none of them (a filtered dataset, a subset of the classes)"
            )
        return "; ".join(parts) + ", and the accuracy is over the other classes"

    def _rowless(self, names: list[str]) -> list[str]:
        """Of the classes ``names``, those no item of the data carries (where the data lists its items' labels)."""
        declared: set[int] = set()
        for part in (self.bank, self.queries):
            targets = getattr(_base(part), "targets", None)
            if targets is None:
                return []
            declared.update(int(t) for t in targets)
        classes = list(getattr(_base(self.bank), "classes", None) or [])
        return [name for name in names if name in classes and classes.index(name) not in declared]

    def missing_classes(self, labels: torch.Tensor) -> list[str]:
        """The declared classes (a folder's class sub-folders) that no image of ``labels`` carries.

        A class whose every file is unreadable drops out of the evaluation (unreadable images
        are left out, not replaced).
        """
        classes = getattr(_base(self.bank), "classes", None)
        if not isinstance(classes, (list, tuple)) or getattr(_base(self.bank), "targets", None) is None:
            return []  # names without the items' labels (shards' classes.json): a class may just be elsewhere
        seen = set(labels.tolist())
        return [str(name) for index, name in enumerate(classes) if index not in seen]

    def _statistics(self, learner: nn.Module) -> contextlib.AbstractContextManager:
        """The clean BatchNorm statistics for the evaluation, when clean images were given."""
        net = getattr(learner, "net", None)
        if self.clean_images is None or net is None or not batchnorm_layers(net, frozen=False):
            return contextlib.nullcontext()
        device = next(learner.parameters()).device
        return clean_statistics(net, self.clean_images.to(device), transform=clean_input(learner))

    def __call__(self, learner: nn.Module) -> float:
        """The kNN top-1 accuracy in [0, 1] of the queries against the bank."""
        bank, bank_labels, queries, query_labels = self.features(learner)
        self.queries_scored = len(queries)
        return float(knn_accuracy(bank, bank_labels, queries, query_labels, self.num_classes))


def knn_noise(accuracy: float, queries: int) -> float:
    """The binomial standard error of a kNN accuracy over ``queries`` held-out images."""
    p = min(max(accuracy, 0.0), 1.0)
    return math.sqrt(p * (1 - p) / max(queries, 1))


class BelowReference:
    """Says when a kNN evaluation falls below the untouched net's by more than the evaluations' noise.

    The noise of the difference of two accuracies over the same ``queries`` held-out images is
    estimated as binomial: ``sqrt(se_ref^2 + se_now^2)`` with ``se = sqrt(p (1 - p) / queries)``;
    a gap counts when it exceeds twice that (about a 95% interval), and at least
    ``1 / queries`` (one image). A gap is reported once; again only when it has widened by
    more than the noise since the last report, never at every evaluation.

    Args:
        reference: the untouched net's kNN accuracy (step 0).
        queries: the number of held-out images each evaluation scores.

    Examples:
        >>> watch = BelowReference(0.80, queries=1000)
        >>> watch.check(0.79) is None, round(watch.check(0.70), 3), watch.check(0.69), round(watch.check(0.60), 3)
        (True, 0.1, None, 0.2)
    """

    def __init__(self, reference: float, queries: int) -> None:
        self.reference, self.queries = float(reference), int(queries)
        self.reported: float | None = None  # the gap last reported

    def noise(self, accuracy: float) -> float:
        """Twice the standard error of ``reference - accuracy`` (at least one image's worth)."""
        spread = math.hypot(knn_noise(self.reference, self.queries), knn_noise(accuracy, self.queries))
        return max(2 * spread, 1 / max(self.queries, 1))

    def check(self, accuracy: float) -> float | None:
        """The gap ``reference - accuracy`` when it is to be reported now, else None."""
        gap, noise = self.reference - accuracy, self.noise(accuracy)
        if gap <= noise or (self.reported is not None and gap <= self.reported + noise):
            return None
        self.reported = gap
        return gap
