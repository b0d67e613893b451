"""Every form ``--data`` takes, behind two functions: the one place that knows the data specs.

A data spec is one of:

* ``cifar10:ROOT`` / ``cifar100:ROOT``: the official CIFAR python batches (``cifar.py``);
* ``hf:PATH``: a local Hugging Face dataset (``hf.py``, extra ``datasets``);
* tar shards in webdataset's layout: a brace pattern, one ``.tar``, or a folder of ``.tar``
  files (``shards.py``, extra ``shards``); remote shards: ``http(s)://``, ``s3://``, ``gs://``
  URLs (brace patterns too) or ``pipe:CMD``, streamed (``remote_shards.py``, extra ``remote``);
* anything else: a folder of images, searched recursively (``folder.py``).

``open_unlabelled`` gives pretraining data (items ``(uint8 image, skipped)``, or a
``ShardDataset`` of whole batches for a training run's shards); ``open_labelled`` gives
evaluation data (items ``(uint8 image, label)``), and ``labelled_split`` the bank and the
held-out queries of a kNN evaluation. ``embedding_items`` turns any source into items
``(image, label, sample id, readable)`` for ``byol-pytorch embed``. Every command and
``BYOLTrainer`` opens data here and loads it with ``loader.make_loader``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Subset

from .._modules import whole_number
from .cifar import CifarDataset, is_cifar_spec, parse_cifar_spec
from .file_index import FileIndex, load_or_scan
from .folder import BrokenImageError, ImageFolder, LabelledImageFolder
from .hf import HFImageDataset, UnlabelledRowsError, dataset_splits, is_hf_spec, parse_hf_spec
from .remote import is_remote, redact
from .remote_shards import RemoteShardDataset, RemoteShardSamples
from .shards import ShardDataset, ShardSamples, is_shard_spec

__all__ = [
    "DATA_FORMS",
    "ShardReading",
    "UNREADABLE",
    "check_shard_index",
    "is_remote_shards",
    "data_kind",
    "embedding_items",
    "first_items",
    "readable_images",
    "held_out_split",
    "sample_images",
    "labelled_split",
    "local_path",
    "open_labelled",
    "open_unlabelled",
]

T = TypeVar("T")
DATA_FORMS = (
    "a folder of images; cifar10:ROOT / cifar100:ROOT; hf:PATH (a local Hugging Face dataset); "
    "tar shards ('train-{000000..000099}.tar', one .tar, or a folder of .tar files); remote tar shards "
    "('https://host/train-{000000..000099}.tar', s3://, gs://, pipe:CMD)"
)
_NEEDS_LABELS = (
    "labels are needed here (eval, embed --labels, train --val-data): a folder with one sub-folder per class, "
    "cifar10:ROOT, an hf: dataset with a label column, or shards whose samples hold a .cls file"
)


def as_spec(spec: str | os.PathLike) -> str:
    """A data spec as text: a ``pathlib.Path`` (any ``os.PathLike``) becomes its ``str``, a leading ``~`` expanded.

    Raises:
        ValueError: anything else that is not a non-empty str.
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a data spec must be a non-empty string or path ({DATA_FORMS}), got {spec!r}")
    return os.path.expanduser(spec)  # a local path's; cifar10:~/x and hf:~/x expand their own


def local_path(spec: str) -> str | None:
    """The local path in a data spec, ``~`` expanded: a folder's or shard pattern's, ``cifar10:ROOT``'s ROOT,
    ``hf:PATH``'s PATH; None for remote data.

    Examples:
        >>> local_path("cifar10:/data"), local_path("hf:pets"), local_path("s3://b/x.tar"), local_path("photos")
        ('/data', 'pets', None, 'photos')
    """
    if is_remote(spec):
        return None
    cifar = parse_cifar_spec(spec)
    return os.path.expanduser(cifar[1] if cifar else parse_hf_spec(spec) or spec)


def data_kind(spec: str | os.PathLike) -> str:
    """``"cifar"``, ``"hf"``, ``"shards"`` or ``"folder"``: the form of a data spec (module doc).

    Examples:
        >>> data_kind("cifar10:data"), data_kind("hf:pets"), data_kind("s/{0..3}.tar"), data_kind("photos")
        ('cifar', 'hf', 'shards', 'folder')
    """
    spec = as_spec(spec)
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", spec)
    if scheme and not is_remote(spec):  # a probe: ftp://host/x.tar was looked for as the local file 'ftp:/host/x.tar'
        raise ValueError(
            f"{redact(spec)!r}: {scheme.group(1)}:// is not a scheme byol-pytorch reads; give http(s)://, s3://, "
            "gs:// or a local path, or read it through a command: 'pipe:curl -s URL' (webdataset's form)"
        )
    if is_cifar_spec(spec):
        return "cifar"
    if is_hf_spec(spec):
        return "hf"
    if is_remote(spec) or is_shard_spec(spec):
        return "shards"
    return "folder"


@dataclass(frozen=True)
class ShardReading:
    """How a training run reads tar shards: its batches, processes, loader workers and order.

    See ``ShardDataset`` for the meaning of each field.
    """

    batch_size: int
    rank: int = 0
    world_size: int = 1
    workers: int = 0
    seed: int = 0
    shuffle_buffer: int = 1000
    multiple_of: int = 1
    index: str | None = None  # remote shards: a wids shard index with the sample counts
    counts: tuple[int, ...] | None = None  # remote shards: the sample counts, already known (sent by rank 0)


def _check_options(spec: str, kind: str, image_column: str | None, split: str | None) -> None:
    """A ``ValueError`` for an image column or a split given for a form that has none (ignored before, a probe)."""
    misplaced = [
        flag
        for flag, value, kinds in (("--image-column", image_column, ("hf",)), ("--hf-split", split, ("hf", "cifar")))
        if value not in (None, "") and kind not in kinds
    ]
    if misplaced:
        forms = "hf: data" if len(misplaced) > 1 or misplaced[0] == "--image-column" else "hf: and CIFAR data"
        raise ValueError(
            f"{' and '.join(misplaced)} {'apply' if len(misplaced) > 1 else 'applies'} to {forms} only, not to "
            f"{redact(spec)!r}; drop {'them' if len(misplaced) > 1 else 'it'}"
        )


def open_unlabelled(
    spec: str | os.PathLike,
    load_size: int | None,
    channels: int = 3,
    *,
    image_column: str | None = None,
    split: str | None = None,
    index: FileIndex | None = None,
    index_cache: str | Path | None = None,
    shards: ShardReading | None = None,
    shard_index: str | None = None,
) -> Dataset:
    """Pretraining data of any form, without labels.

    Args:
        spec: the data spec (module doc).
        load_size: side ``S`` of the square images; None: CIFAR as stored (32 px), which the
            views resize anyway (the other forms need a size).
        channels: 1 or 3.
        image_column: ``hf:`` data: the image column (default: see ``hf.image_column``).
        split: CIFAR (default ``train``) or ``hf:`` data with splits (default ``train``).
        index: an image folder's ``FileIndex`` when already known (sent by another rank).
        index_cache: an image folder's index cache file (see ``file_index.load_or_scan``).
        shards: tar shards for training: a ``ShardDataset`` read this way (whole batches, an
            order per epoch); None: every sample once, in order (``ShardSamples``).
        shard_index: remote shards read once in order: a ``wids`` shard index with their sample
            counts (see ``remote_shards.load_index``), so that ``len()`` reads no shard.

    Returns:
        A dataset whose items are ``(uint8 (C, S, S), skipped)`` (``make_loader`` batches them
        with ``collate_images``), the ``ShardDataset`` of ``shards``, or ``ShardSamples``.

    Raises:
        ValueError: the data is missing, empty or unreadable (the message names the spec).
        ImportError: the form needs an extra that is not installed (the message names it).
    """
    spec = as_spec(spec)
    kind = check_shard_index(spec, shard_index)
    _check_options(spec, kind, image_column, split)
    if kind == "cifar":
        name, root = parse_cifar_spec(spec) or ("", "")
        return CifarDataset(name, root, split or "train", size=load_size, channels=channels)
    size = _size(load_size, spec)
    if kind == "hf":
        return HFImageDataset(parse_hf_spec(spec) or "", size, channels, image_column, split)
    if kind == "shards" and is_remote(spec):
        if shards is None:
            return RemoteShardSamples(spec, size, channels, index=shard_index)
        r = shards
        return RemoteShardDataset(
            spec,
            size,
            r.batch_size,
            channels,
            r.rank,
            r.world_size,
            r.workers,
            r.seed,
            r.shuffle_buffer,
            r.multiple_of,
            index=r.index,
            counts=r.counts,
        )
    if kind == "shards":
        if shards is None:
            return ShardSamples(spec, size, channels)
        r = shards
        return ShardDataset(
            spec, size, r.batch_size, channels, r.rank, r.world_size, r.workers, r.seed, r.shuffle_buffer, r.multiple_of
        )
    if index is None:
        index = load_or_scan(spec, index_cache)
    return ImageFolder(spec, size, channels, index=index)


def is_remote_shards(spec: str) -> bool:
    """Whether ``spec`` names tar shards on a server (what a shard index counts)."""
    return data_kind(spec) == "shards" and is_remote(spec)


def check_shard_index(spec: str, shard_index: str | None) -> str:
    """``data_kind(spec)``; a ``ValueError`` for a shard index given with data other than remote shards."""
    kind = data_kind(spec)
    if shard_index is not None and not is_remote_shards(spec):
        raise ValueError(
            f"--shard-index gives the sample counts of remote tar shards (http(s)://, s3://, gs://, pipe:), "
            f"not of {spec!r}, whose samples are counted as it is opened; leave --shard-index out"
        )
    return kind


def _size(load_size: int | None, spec: str) -> int:
    if load_size is None:
        raise ValueError(f"{spec!r} needs a load size (images are decoded and resized to it)")
    return load_size


def open_labelled(
    spec: str | os.PathLike,
    load_size: int,
    channels: int = 3,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    split: str | None = None,
    shard_index: str | None = None,
    labels_optional: bool = False,
) -> Dataset:
    """Evaluation data of any form: items ``(uint8 (C, S, S), label)``.

    A folder: one sub-folder per class. CIFAR: the split's labels. ``hf:``: the label column
    (a ``ClassLabel`` feature, or integers named ``label``/``labels``). Shards: each sample's
    ``.cls`` file (items from ``ShardSamples``: ``(image, label, key, readable)``); a sample
    without one is left out as unreadable, or with ``labels_optional`` read with label -1.

    Raises:
        ValueError: the source has no labels (one line naming the spec and what would work), or
            see ``open_unlabelled``.
        ImportError: see ``open_unlabelled``.
    """
    spec = as_spec(spec)
    kind = check_shard_index(spec, shard_index)
    _check_options(spec, kind, image_column, split)
    if kind == "cifar":
        name, root = parse_cifar_spec(spec) or ("", "")
        return CifarDataset(name, root, split or "train", labelled=True, size=load_size, channels=channels)
    if kind == "hf":
        path = parse_hf_spec(spec) or ""
        return HFImageDataset(path, load_size, channels, image_column, split, labelled=True, labels=label_column)
    if kind == "shards":
        if is_remote(spec):
            return RemoteShardSamples(
                spec, load_size, channels, labelled=True, index=shard_index, labels_optional=labels_optional
            )
        return ShardSamples(spec, load_size, channels, labelled=True, labels_optional=labels_optional)
    try:
        return LabelledImageFolder(spec, load_size, channels)
    except ValueError as error:
        raise ValueError(f"{error}; {_NEEDS_LABELS}") from None


class _EveryFifth:
    """``keep(shard, position)`` of a shard split: every fifth sample, counted across the shards in order, is a
    query (so shards of fewer than five samples hold some out too; picklable)."""

    def __init__(self, queries: bool, counts: Sequence[int]) -> None:
        self.queries = queries
        self.starts = [sum(counts[:k]) for k in range(len(counts))]

    def __call__(self, shard: int, position: int) -> bool:
        return ((self.starts[shard] + position) % 5 == 4) == self.queries


class _Readable(IterableDataset):
    """The readable ``(image, label)`` pairs of ``ShardSamples``' ``(image, label, key, readable)`` items."""

    def __init__(self, samples: ShardSamples) -> None:
        self.samples = samples
        self.classes = samples.classes  # classes.json beside the shards: the names of labels 0, 1, ...

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        for image, label, _, readable in self.samples:
            if readable:
                yield image, label


def _every_fifth(labels: list[int]) -> tuple[list[int], list[int]]:
    """Per class, every fifth item (in order) is a query, the others the bank."""
    seen: dict[int, int] = {}
    bank: list[int] = []
    queries: list[int] = []
    for index, label in enumerate(labels):
        seen[label] = seen.get(label, 0) + 1
        (queries if seen[label] % 5 == 0 else bank).append(index)
    return bank, queries


_HF_FLAGS = {"split": "--hf-split", "image_column": "--image-column", "label_column": "--label-column"}
"""``labelled_split``'s options (for ``hf:`` data) and the CLI flags that set them."""


def labelled_split(
    spec: str | os.PathLike, load_size: int, channels: int = 3, **options: Any
) -> tuple[Dataset, Dataset]:
    """The bank and the held-out queries of a kNN evaluation on labelled data of any form.

    * a folder with ``train`` and ``val`` (or ``test``) sub-folders, each with class sub-folders:
      those two, the held-out labels numbered by the training split's class names (a class
      only ``val`` has is an error); else one folder of class sub-folders, every fifth image of
      each class held out;
    * CIFAR: the training batches and the test batch;
    * ``hf:`` data with splits ``train`` and ``validation`` (or ``test``): those (the held-out
      labels numbered by the training split's class names when both are ``ClassLabel``), unless the
      held-out split has no labels at all (-1, a benchmark's hidden test labels); else every
      fifth row of each class held out;
    * shards: every fifth sample held out (counted across the shards in order).

    Args:
        spec: the labelled data (module doc).
        load_size: side of the images handed out.
        channels: 1 or 3.
        options: ``image_column`` / ``label_column`` / ``split`` for ``hf:`` data (a ``split``
            is evaluated within itself, every fifth row of each class held out).

    Returns:
        ``(bank, queries)``, datasets whose items are ``(uint8 (C, S, S), label)``; an unreadable
        image is never replaced by another: it is left out of a stream (shards), and in map-style
        data it is a blank image labelled ``UNREADABLE`` (-2), for the kNN to leave out.

    Raises:
        ValueError: no labels (see ``open_labelled``), one class only, a ``train`` folder without a
            held-out one beside it, or too few images per class to hold some out.
        TypeError: an option other than those above.
    """
    spec = as_spec(spec)
    kind = data_kind(spec)
    unknown = sorted(set(options) - set(_HF_FLAGS))
    if unknown:
        raise TypeError(
            f"labelled_split got the unknown option(s) {', '.join(unknown)}; it takes image_column, label_column and "
            "split (for hf: data)"
        )
    options = {k: v for k, v in options.items() if v not in (None, "")}
    if options and kind != "hf":
        named = ", ".join(_HF_FLAGS[k] for k in sorted(options))
        raise ValueError(f"{named} {'applies' if len(options) == 1 else 'apply'} to hf: data only, not to {spec!r}")
    if kind == "cifar":
        return tuple(open_labelled(spec, load_size, channels, split=s) for s in ("train", "test"))  # type: ignore[return-value]
    if kind == "shards" and is_remote(spec):
        raise ValueError(
            "remote shards cannot be split into the training and held-out images that eval (kNN and --linear) "
            "and train --val-data measure on; give local labelled data (the shards downloaded, say)"
        )
    if kind == "shards":
        samples = ShardSamples(spec, load_size, channels, labelled=True)  # the headers, read once
        if sum(samples.counts) < 5:
            raise ValueError(f"{spec!r} has too few samples for a kNN check (at least 5)")
        return tuple(_Readable(samples.with_keep(_EveryFifth(q, samples.counts))) for q in (False, True))  # type: ignore[return-value]
    held_out = None if options.get("split") else held_out_split(spec, kind)  # a split named: within it
    if held_out is not None and kind != "hf":
        base = Path(spec)
        train = LabelledImageFolder(base / "train", load_size, channels)
        _check_two_classes(spec, train.targets)
        held_folder = LabelledImageFolder(base / held_out, load_size, channels, classes=train.classes)
        return _Unsubstituted(train), _Unsubstituted(held_folder)
    if held_out is not None:
        full = open_labelled(spec, load_size, channels, split="train", **options)
        try:
            held = open_labelled(spec, load_size, channels, split=held_out, **options)
            if full.classes is not None:  # type: ignore[attr-defined]
                held.number_by(full.classes)  # type: ignore[attr-defined]  # splits encoded apart: same names
            _check_held_out_classes(spec, held_out, full.targets, held.targets, full.classes)  # type: ignore[attr-defined]
            _check_two_classes(spec, full.targets)  # type: ignore[attr-defined]
            return _Unsubstituted(full), _Unsubstituted(held)
        except UnlabelledRowsError as error:
            if error.missing < error.rows:
                raise
            # an unlabelled held-out split (labels -1, a benchmark's test split): a fifth of train instead
    else:
        full = open_labelled(spec, load_size, channels, **options)
    targets = full.targets  # type: ignore[attr-defined]  # read once: a folder's builds a new list
    if kind == "folder" and getattr(full, "classes", None) == ["train"]:  # its held-out split is missing
        raise ValueError(
            f"{spec!r} holds a train/ folder and no val/ or test/ beside it to hold out: add one (with the same class "
            f"sub-folders), or give {str(Path(spec) / 'train')!r} itself (every fifth image of each class held out)"
        )
    _check_two_classes(spec, targets)
    bank, queries = _every_fifth(targets)
    if not queries:
        raise ValueError(f"{spec!r} has too few images per class for a kNN check (at least 5 per class)")
    items = _Unsubstituted(full)
    return Subset(items, bank), Subset(items, queries)


def _check_two_classes(spec: str, targets: Sequence[int]) -> None:
    """A kNN over one class scores every query right whatever the features: refused."""
    if len(set(targets)) < 2:
        folder = data_kind(spec) == "folder"
        layout = " (a labelled folder holds ROOT/CLASS_NAME/image.jpg, one sub-folder per class)" if folder else ""
        raise ValueError(f"{spec!r} holds images of one class only; a kNN check needs two classes or more{layout}")


def _check_held_out_classes(
    spec: str, split: str, train: Sequence[int], held: Sequence[int], names: Sequence[str] | None
) -> None:
    """A held-out class without one training row can never be scored right: refused, as a folder's is."""
    missing = sorted(set(held) - set(train))
    if missing:
        shown = [names[i] if names is not None and 0 <= i < len(names) else str(i) for i in missing[:5]]
        raise ValueError(
            f"{spec!r}: its {split} split has classes its train split has no rows of ({', '.join(map(repr, shown))}); "
            "a kNN needs the held-out classes among the training ones"
        )


def held_out_split(spec: str | os.PathLike, kind: str) -> str | None:
    """The held-out split's name when the data comes split in two (train + val/validation/test)."""
    spec = as_spec(spec)
    if kind == "hf":
        names = set(dataset_splits(parse_hf_spec(spec) or ""))
        candidates: tuple[str, ...] = ("validation", "val", "test")
    else:
        base = Path(spec)
        names = {p.name for p in base.iterdir() if p.is_dir()} if base.is_dir() else set()
        candidates = ("val", "test")
    if "train" not in names:
        return None
    return next((name for name in candidates if name in names), None)


class _EmbeddingItems(Dataset):
    """A map-style source's items as ``(image, label, sample id, readable)``, nothing substituted."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        labels = getattr(dataset, "_labels", None)
        if labels is None and (getattr(dataset, "labelled", False) or isinstance(dataset, LabelledImageFolder)):
            labels = np.asarray(dataset.targets, dtype=np.int64)
        self.labels = labels
        self.size = getattr(dataset, "load_size", None) or getattr(dataset, "size", None) or 32

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str, bool]:
        label = -1 if self.labels is None else int(self.labels[index])
        try:
            return self.dataset.read(index), label, self.dataset.sample_id(index), True
        except BrokenImageError:
            blank = torch.zeros(self.dataset.channels, self.size, self.size, dtype=torch.uint8)
            return blank, label, self.dataset.sample_id(index), False


UNREADABLE = -2  # the label of an unreadable image in a kNN's data (``labelled_split``; -1 is "no label")


class _Unsubstituted(_EmbeddingItems):
    """A map-style labelled source's ``(image, label)`` items for a kNN, nothing substituted.

    An unreadable image is a blank one labelled ``UNREADABLE``, which the kNN leaves out: the
    source's own substitute (the next readable item, with its label) would be a copy of another
    item, of a bank image where it stands for a query, and so scored right by construction.
    """

    def __getattr__(self, name: str) -> Any:  # the source's own attributes (root, paths, ...)
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:  # type: ignore[override]
        image, label, _, readable = super().__getitem__(index)
        return image, label if readable else UNREADABLE


def embedding_items(dataset: Dataset) -> Dataset:
    """Items ``(uint8 image, label or -1, sample id, readable)`` of a source, every sample once, in order.

    Sample ids: a folder's relative file paths, ``SPLIT:INDEX`` for CIFAR and ``hf:`` rows,
    ``SHARD:KEY`` for tar shards. A broken sample is not replaced: its item is a blank image
    with ``readable`` False.

    Args:
        dataset: what ``open_unlabelled`` (without ``shards``) or ``open_labelled`` returned.

    Raises:
        TypeError: a dataset these functions did not open.
    """
    if isinstance(dataset, (ShardSamples, RemoteShardSamples)):
        return dataset
    if not (hasattr(dataset, "read") and hasattr(dataset, "sample_id")):
        raise TypeError(
            f"embedding_items needs a dataset from open_unlabelled/open_labelled, got {type(dataset).__name__}"
        )
    return _EmbeddingItems(dataset)


def _item_readable(item: Any) -> bool:
    """Whether a map-style item holds a readable image: ``embedding_items``' readable flag, a kNN's label."""
    if isinstance(item, (tuple, list)) and len(item) >= 4:
        return bool(item[3])  # (image, label, sample id, readable)
    return not (isinstance(item, (tuple, list)) and len(item) == 2 and item[1] == UNREADABLE)


def sample_images(dataset: Dataset, count: int = 512) -> torch.Tensor:
    """Up to ``count`` readable images of a source, spread over it: ``uint8 (n, C, S, S)``.

    Map-style data (items that are images, or whose first entry is the image): ``count`` indices evenly spaced over
    the whole dataset (a folder sorted by class gives every class its share), broken ones
    replaced as the dataset replaces them (or left out, in a kNN's data: ``UNREADABLE``). A
    stream (tar shards, also the training reader's batches): its first ``count`` readable images.
    For the BatchNorm statistics of clean images (``recalibrate_batchnorm``).
    """
    count = whole_number("count", count, 1, " (how many images)")
    images: list[torch.Tensor] = []
    read = 0
    if isinstance(dataset, ShardDataset):  # training batches (remote ones too): (images, skipped)
        for batch, _ in dataset.with_workers(0):  # read here, whatever the loader workers it was built for
            read += len(batch)
            images.extend(batch.unbind(0)[: count - len(images)])  # unreadable ones are already replaced
            if len(images) >= count:
                break
    elif isinstance(dataset, IterableDataset):
        for item in dataset:
            read += 1
            if len(item) < 4 or item[3]:  # ShardSamples' (image, label, key, readable)
                images.append(item[0])
            if len(images) >= count:
                break
    else:
        n = len(dataset)  # type: ignore[arg-type]
        indices = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(np.int64))
        items = [dataset[int(i)] for i in indices]
        images = [item[0] if isinstance(item, (tuple, list)) else item for item in items if _item_readable(item)]
        read = len(items)
    if not images:
        raise ValueError(
            f"no readable image in {read} samples to estimate BatchNorm statistics from: the files do not decode as "
            "images (shards: no .jpg/.png/... member in a sample); check the data"
        )
    return torch.stack(images)


def readable_images(
    dataset: Dataset, count: int, order: Callable[[int], Iterable[int] | torch.Tensor] | None = None
) -> tuple[torch.Tensor, int]:
    """Up to ``count`` images that decode, each once, and how many unreadable ones were passed over on the way.

    A map-style source that can read one item without substituting another (``read(i)``: a folder, CIFAR,
    ``hf:``) is read in ``order(len)`` (indices, or a tensor of them such as ``torch.randperm(len)``, read a few
    at a time; default: from the start) until ``count`` decode; other map-style
    items are taken as they come. A stream (tar shards: ``(image, label, key, readable)``) gives its first
    ``count`` readable samples. For ``preview``: an unreadable file is neither shown (as its substitute, a
    second time) nor counted among the images.

    Returns:
        ``(uint8 (n, C, S, S), unreadable)``; ``n`` is 0 when nothing decodes.
    """
    count = whole_number("count", count, 1, " (how many images)")
    images: list[torch.Tensor] = []
    unreadable = 0
    if isinstance(dataset, IterableDataset):
        for item in dataset:
            if _item_readable(item):
                images.append(item[0] if isinstance(item, (tuple, list)) else item)
            else:
                unreadable += 1
            if len(images) >= count:
                break
    else:
        n = len(dataset)  # type: ignore[arg-type]
        read = getattr(dataset, "read", None)
        for i in _indices(order(n)) if order is not None else range(n):
            if read is None:
                item = dataset[i]
                images.append(item[0] if isinstance(item, (tuple, list)) else item)
            else:
                try:
                    images.append(read(i))
                except BrokenImageError:
                    unreadable += 1
            if len(images) >= count:
                break
    return (torch.stack(images) if images else torch.empty(0, dtype=torch.uint8)), unreadable


def _indices(order: Iterable[int] | torch.Tensor) -> Iterator[int]:
    """Python ints of ``order``; a tensor's converted 256 at a time (a permutation of millions is no list of ints)."""
    if not isinstance(order, torch.Tensor):
        yield from order
        return
    for start in range(0, len(order), 256):
        yield from order[start : start + 256].tolist()


def first_items(dataset: Dataset, count: int, pick: Callable[[int], list[int]] | None = None) -> list[Any]:
    """Up to ``count`` items of a dataset: ``pick(len)`` indices of a map-style one, the first of a stream."""
    count = whole_number("count", count, 1, " (how many images)")
    if isinstance(dataset, IterableDataset):
        items: list[Any] = []
        for item in dataset:
            items.append(item)
            if len(items) >= count:
                break
        return items
    indices = pick(len(dataset)) if pick is not None else list(range(min(count, len(dataset))))  # type: ignore[arg-type]
    return [dataset[i] for i in indices[:count]]
