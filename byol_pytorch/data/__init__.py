"""The data layer: every form of image data the commands read, and the loaders that read it.

* ``sources``: ``open_unlabelled`` / ``open_labelled`` / ``labelled_split`` for every data spec
  (a folder, ``cifar10:``/``cifar100:``, ``hf:``, tar shards);
* ``loader``: ``make_loader``, the one way DataLoaders are built (workers, seeding, pinning);
* ``folder`` (image folders, decoding, broken files), ``file_index`` (their compact cached
  index), ``shards``, ``hf``, ``cifar``: the forms themselves; ``remote`` and ``remote_shards``:
  tar shards streamed from ``http(s)://``, ``s3://``, ``gs://`` or ``pipe:`` (fsspec, imported only
  when used); ``shard_writer``: ``byol-pytorch shards make`` / ``shards index``;
* ``sampling``: the resumable order of a training run.

The data layer imports nothing of the training runtime or of the application.
"""

from __future__ import annotations

import warnings
from typing import Any

from .file_index import IMAGE_EXTENSIONS, FileIndex, index_images, load_or_scan
from .folder import (
    PIXEL_LIMIT_ENV,
    BrokenImageError,
    ImageFolder,
    LabelledImageFolder,
    LargeImageWarning,
    NoReadableImagesError,
    decode_image,
    load_image,
    load_size_for,
    match_channels,
    read_or_next,
)
from .loader import collate_images, make_loader
from .sources import (
    DATA_FORMS,
    UNREADABLE,
    ShardReading,
    data_kind,
    embedding_items,
    first_items,
    labelled_split,
    open_labelled,
    open_unlabelled,
    readable_images,
    sample_images,
)

__all__ = [
    "UNREADABLE",
    "DATA_FORMS",
    "IMAGE_EXTENSIONS",
    "PIXEL_LIMIT_ENV",
    "BrokenImageError",
    "FileIndex",
    "ImageFolder",
    "LabelledImageFolder",
    "LargeImageWarning",
    "NoReadableImagesError",
    "ShardReading",
    "collate_images",
    "data_kind",
    "decode_image",
    "embedding_items",
    "first_items",
    "index_images",
    "labelled_split",
    "load_image",
    "load_or_scan",
    "load_size_for",
    "make_loader",
    "match_channels",
    "open_labelled",
    "open_unlabelled",
    "readable_images",
    "read_or_next",
    "sample_images",
]


def __getattr__(name: str) -> Any:
    if name == "scan_images":  # 1.1.0: a list of paths; now the one file-list type, FileIndex
        warnings.warn(
            "byol_pytorch.data.scan_images is deprecated and will be removed in 1.3.0; use "
            "byol_pytorch.data.index_images (a FileIndex: len(), [i] -> Path, iteration, .passed_over)",
            DeprecationWarning,
            stacklevel=2,
        )
        return index_images
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
