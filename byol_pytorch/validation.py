"""Validation during and after training: kNN accuracy of a learner on a labelled folder.

``split_labelled`` turns a labelled folder into a bank and held-out queries;
``KnnMonitor`` embeds both with the learner's backbone and scores weighted kNN
(``evaluate.knn_accuracy``). ``byol-pytorch train --val-data`` runs it periodically,
``byol-pytorch eval`` once.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from .cifar import CifarDataset, parse_cifar_spec
from .data import LabelledImageFolder, match_channels
from .evaluate import extract_features, knn_accuracy

__all__ = ["KnnMonitor", "split_labelled"]


def split_labelled(root: str, load_size: int, channels: int) -> tuple[Any, Any]:
    """A labelled folder as (bank, queries) for the kNN monitor.

    ``ROOT/train`` + ``ROOT/val`` (or ``ROOT/test``), each with class sub-folders, are
    used as they are. Otherwise ``ROOT/CLASS/...`` is split per class: every fifth image
    (in file order) is a query, the others form the bank - the same split every time.
    ``cifar10:ROOT`` / ``cifar100:ROOT``: the training batches are the bank, the test
    batch the queries.

    Args:
        root: the labelled folder.
        load_size: side of the images handed out.
        channels: 1 or 3.

    Returns:
        ``(bank, queries)`` datasets yielding ``(uint8 (C, S, S), label)``.

    Raises:
        ValueError: no class sub-folders, or a class with too few images to split.
    """
    cifar = parse_cifar_spec(root)
    if cifar is not None:
        kind, folder = cifar
        return (
            CifarDataset(kind, folder, "train", labelled=True, size=load_size, channels=channels),
            CifarDataset(kind, folder, "test", labelled=True, size=load_size, channels=channels),
        )
    base = Path(root)
    names = {p.name for p in base.iterdir() if p.is_dir()} if base.is_dir() else set()
    held_out = "val" if "val" in names else ("test" if "test" in names else None)
    if "train" in names and held_out is not None:
        return (
            LabelledImageFolder(base / "train", load_size, channels),
            LabelledImageFolder(base / held_out, load_size, channels),
        )
    full = LabelledImageFolder(root, load_size, channels)
    seen: dict[int, int] = {}
    bank: list[int] = []
    queries: list[int] = []
    for index, label in enumerate(full.targets):
        seen[label] = seen.get(label, 0) + 1
        (queries if seen[label] % 5 == 0 else bank).append(index)
    if not queries:
        raise ValueError(f"{root!r} has too few images per class for a kNN check (at least 5 per class)")
    return Subset(full, bank), Subset(full, queries)


def _labels(dataset: Dataset) -> torch.Tensor:
    if isinstance(dataset, Subset):
        targets = dataset.dataset.targets  # type: ignore[attr-defined]  # read once: it may build a list
        return torch.tensor([targets[i] for i in dataset.indices])
    return torch.tensor(dataset.targets)  # type: ignore[attr-defined]


class KnnMonitor:
    """Weighted kNN accuracy of the online backbone on a labelled folder (``--val-data``).

    Features are the learner's embeddings (``learner(x, return_embedding=True,
    return_projection=False)``) of uint8 images, normalised like the training views,
    extracted in eval mode; modes are restored after.

    Args:
        root: the labelled folder (see ``split_labelled``).
        load_size: side of the images: the training crop size.
        channels: images' channels (the backbone's).
        device: where features are computed.
        batch_size: images per forward.
        workers: loader processes.
    """

    def __init__(
        self, root: str, load_size: int, channels: int, device: torch.device, batch_size: int = 256, workers: int = 0
    ):
        self.bank, self.queries = split_labelled(root, load_size, channels)
        self.bank_labels, self.query_labels = _labels(self.bank), _labels(self.queries)
        self.num_classes = int(max(self.bank_labels.max(), self.query_labels.max())) + 1
        self.device, self.batch_size, self.workers = device, batch_size, workers

    def _features(self, learner: nn.Module, dataset: Dataset) -> torch.Tensor:
        loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.workers)
        to_channels = functools.partial(match_channels, channels=getattr(learner, "channels", 3))
        embed = functools.partial(learner, return_embedding=True, return_projection=False)
        return extract_features(embed, loader, device=self.device, transform=to_channels)  # (N, D)

    def features(self, learner: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(bank_features, bank_labels, query_features, query_labels)`` of the learner's backbone."""
        return (
            self._features(learner, self.bank),
            self.bank_labels,
            self._features(learner, self.queries),
            self.query_labels,
        )

    def __call__(self, learner: nn.Module) -> float:
        """The kNN top-1 accuracy in [0, 1] of the queries against the bank."""
        bank, bank_labels, queries, query_labels = self.features(learner)
        return float(knn_accuracy(bank, bank_labels, queries, query_labels, self.num_classes))
