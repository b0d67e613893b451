"""Hugging Face ``datasets`` on local disk as pretraining data; never the Hub.

``hf:PATH`` names one of:

* a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``
  (``datasets.load_from_disk``);
* a ``.parquet`` file, or a folder of ``.parquet`` files and no image, at any depth (the Hub's
  ``data/train-00000-of-00001.parquet``), split by their names as ``datasets`` splits them
  (``load_dataset("parquet", data_files={split: files})``);
* any other folder: an image folder read by ``load_dataset("imagefolder", data_dir=...)``.

Of a ``DatasetDict`` the split ``"train"`` (or its only split) is used unless another is named. Loading sets
``HF_DATASETS_OFFLINE=1`` and ``HF_HUB_OFFLINE=1`` in the process, and a PATH that does
not exist is an error: nothing is ever downloaded.

``HFImageDataset`` is a map-style dataset like ``ImageFolder``: ``dataset[i]`` is
``(uint8 (C, S, S), skipped)``. The image column (the one whose feature is
``datasets.Image``, else the one of image bytes or ``{bytes, path}`` structs, or the one
named, file paths too) is read as raw bytes (``Image(decode=False)``) and
decoded by ``data.decode_image`` (or ``load_image`` for a row that holds only a path),
so images come out exactly as from a folder, and a broken row is replaced by the next
readable one and counted, as a broken file in a folder is. With ``EpochSampler`` a run
resumes bitwise like a folder run.

Python use (``pip install "byol-pytorch[datasets]"``)::

    from byol_pytorch.hf_data import HFImageDataset

    data = HFImageDataset("my_saved_dataset", load_size=256)  # or a datasets.Dataset
    image, skipped = data[0]  # uint8 (3, 256, 256)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .._modules import PathLike, user_path
from .file_index import IMAGE_EXTENSIONS
from .folder import BrokenImageError, apply_pixel_limit, check_load_size, decode_image, load_image, read_or_next

__all__ = [
    "HF_MISSING",
    "HFImageDataset",
    "UnlabelledRowsError",
    "dataset_splits",
    "image_column",
    "is_hf_spec",
    "label_column",
    "load_local_dataset",
    "parse_hf_spec",
]

HF_MISSING = 'hf: data needs the datasets package: pip install "byol-pytorch[datasets]"'


class UnlabelledRowsError(ValueError):
    """Rows of a label column without a label (None, or -1: the convention of an unlabelled test split)."""

    def __init__(self, message: str, missing: int, rows: int) -> None:
        super().__init__(message)
        self.missing, self.rows = missing, rows


_LOCAL_ONLY = (
    "only local paths are supported (a folder written by save_to_disk, an image folder, or parquet files); "
    "nothing is downloaded from the Hugging Face Hub"
)


def parse_hf_spec(spec: str | None) -> str | None:
    """The PATH of ``hf:PATH`` (None for anything else).

    Examples:
        >>> parse_hf_spec("hf:data/pets"), parse_hf_spec("data/pets")
        ('data/pets', None)
    """
    if spec and spec.startswith("hf:"):
        return spec[3:]
    return None


def is_hf_spec(spec: str | None) -> bool:
    """Whether a data argument is ``hf:PATH``."""
    return parse_hf_spec(spec) is not None


def _datasets() -> Any:
    """The ``datasets`` module, offline: the Hub is never asked."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import datasets
    except ImportError as error:
        raise ImportError(HF_MISSING) from error
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # read at import time: an earlier import missed them
        if hasattr(datasets.config, name):
            setattr(datasets.config, name, True)
    return datasets


def _parquet_files(path: Path) -> list[str] | dict[str, list[str]]:
    """A ``.parquet`` file, or a folder's parquet files by split ([] where it is no parquet dataset).

    A folder is a parquet dataset when it holds ``.parquet`` files (at any depth: the Hub's
    ``data/train-00000-of-00001.parquet`` layout) and no image (an image folder may keep its
    metadata in parquet). The splits come from the file names as ``datasets`` infers them
    (``train-*``, ``test-*``, ``data/validation-*``...; every file in ``train`` when none says).
    """
    if path.is_file():
        return [str(path)] if path.suffix == ".parquet" else []
    parquet = []
    for root, folders, files in os.walk(path):
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                return []
            if name.endswith(".parquet") and not name.startswith("."):
                parquet.append(os.path.join(root, name))
    if not parquet:
        return []
    try:
        from datasets.data_files import DataFilesDict, get_data_patterns

        found = DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path))
        splits = {str(k): sorted(f for f in v if f.endswith(".parquet")) for k, v in found.items()}
        splits = {k: v for k, v in splits.items() if v}
    except Exception:  # datasets' inference moved or failed: every file in one split
        return {"train": parquet}
    placed = {os.path.realpath(f) for files in splits.values() for f in files}
    unplaced = [f for f in parquet if os.path.realpath(f) not in placed]
    if unplaced:  # some files name a split and these name none: training on all of them would mix the splits
        shown = ", ".join(os.path.relpath(f, path) for f in unplaced[:3]) + (", ..." if len(unplaced) > 3 else "")
        raise ValueError(
            f"hf:{path}: {len(unplaced)} parquet file(s) name no split ({shown}) beside files of the splits "
            f"{', '.join(splits)}: rename them (train-*, validation-*, test-*) or move them out, or pass one "
            "file as hf:FILE"
        )
    return splits


def load_local_dataset(path: PathLike, split: str | None = None) -> Any:
    """One split of a local dataset (see the module doc) as a ``datasets.Dataset``.

    Args:
        path: a save_to_disk folder, parquet file(s) or an image folder.
        split: the split of a dataset with splits (default ``"train"``, or its only split).

    Raises:
        ImportError: ``datasets`` is not installed.
        ValueError: the path does not exist, is not a dataset, or lacks the split.
    """
    return _load_split(path, split)[0]


def _load_split(path: PathLike, split: str | None) -> tuple[Any, str]:
    """``load_local_dataset``'s dataset and the name of the split it is (``train`` for a single dataset)."""
    datasets = _datasets()
    data = _load(_local_path(path))
    if isinstance(data, datasets.DatasetDict):
        name = _split_name(list(data), split)
        if name in _declared_splits(_local_path(path)) and name not in data:  # left out by _load_splits_apart
            raise ValueError(f"hf:{path} split {name!r} holds no rows; its splits with rows: {', '.join(data)}")
        if name not in data:
            raise ValueError(
                f"hf:{path} has no split {name!r}; its splits: {', '.join(data)} (choose one with --hf-split NAME)"
            )
        return data[name], name
    if split is not None:
        raise ValueError(f"hf:{path} is a single dataset without splits; drop the split {split!r}")
    return data, "train"


def _local_path(path: PathLike) -> Path:
    """``hf:``'s PATH as a path (``~`` expanded, as for ``cifar10:``); an empty one is an error, not the cwd."""
    if not str(path).strip():
        raise ValueError(f"hf: needs a path after the colon (hf:PATH); {_LOCAL_ONLY}")
    return user_path(path)


def _load(path: Path) -> Any:
    """The dataset or dataset dict at a local path (see the module doc)."""
    datasets = _datasets()
    if not path.exists():
        raise ValueError(f"hf:{path}: no such file or folder; {_LOCAL_ONLY}")
    parquet = _parquet_files(path)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        try:
            data = datasets.load_from_disk(str(path))
        except IndexError:  # datasets cannot load an empty split it saved itself
            data = _load_splits_apart(path)
    elif parquet:
        data = datasets.load_dataset("parquet", data_files=parquet)
    elif path.is_dir():
        data = datasets.load_dataset("imagefolder", data_dir=str(path))
    else:
        raise ValueError(f"hf:{path} is a file but not a .parquet file; {_LOCAL_ONLY}")
    return data


def _declared_splits(path: Path) -> list[str]:
    """The split names a saved dataset dict's ``dataset_dict.json`` lists ([] where there is none)."""
    try:
        names = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        return [str(name) for name in names]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _load_splits_apart(path: Path) -> Any:
    """A saved dataset dict without its empty splits (``load_from_disk`` fails on one: an IndexError)."""
    datasets = _datasets()
    loaded = {}
    for name in _declared_splits(path):
        try:
            loaded[str(name)] = datasets.load_from_disk(str(path / str(name)))
        except IndexError:
            continue  # an empty split: nothing to train on or evaluate
    if not loaded:
        raise ValueError(f"hf:{path} holds no rows (its splits, or the dataset, are empty)")
    return datasets.DatasetDict(loaded)


def _encoded_images(feature: Any, paths: bool) -> bool:
    """Whether a column holds images in a form ``datasets.Image`` casts from: ``{bytes, path}`` structs
    (a parquet file written without the dataset's metadata), raw bytes, or (``paths``) file paths."""
    datasets = _datasets()
    if isinstance(feature, dict):
        return {"bytes", "path"} <= set(feature)
    kinds = ("binary", "large_binary") + (("string", "large_string") if paths else ())
    return isinstance(feature, datasets.Value) and feature.dtype in kinds


def _holds_images(data: Any, name: str) -> bool:
    """Whether a string column's first value names an existing file (file paths, relative to the current
    folder, as ``datasets`` reads them), not text; bytes and struct columns are taken as images."""
    if getattr(data.features[name], "dtype", None) not in ("string", "large_string"):
        return True
    first = _first_value(data, name)
    return first is not None and os.path.isfile(os.path.expanduser(str(first)))


def _first_value(data: Any, name: str) -> Any:
    """The first of the first 20 values of column ``name`` that is set (None: none is)."""
    return next((v for v in data[name][:20] if v), None) if len(data) else None


def image_column(data: Any, name: str | None = None) -> str:
    """The image column of a ``datasets.Dataset``: ``name``, else the one ``datasets.Image`` column, else the
    one column of encoded images (``{bytes, path}`` structs or raw bytes; see ``_encoded_images``).

    Raises:
        ValueError: ``name`` is not an image column, or there is no image column, or
            there are several and none is named (each message lists the columns).
    """
    datasets = _datasets()
    features = data.features
    images = [k for k, feature in features.items() if isinstance(feature, datasets.Image)]
    if name is not None:
        if name not in features:
            raise ValueError(f"no column {name!r}; the columns: {', '.join(features)}")
        if name not in images and not (_encoded_images(features[name], paths=True) and _holds_images(data, name)):
            first = _first_value(data, name)
            if first is not None and Path(str(first)).suffix.lower() in IMAGE_EXTENSIONS:  # a path, not text
                raise ValueError(
                    f"column {name!r} holds strings, and its first, {str(first)!r}, is no file from here (paths "
                    f"are read relative to the current folder, {os.getcwd()}): run from the folder they are "
                    "relative to, or store absolute paths"
                )
            raise ValueError(
                f"column {name!r} is not an image column (its feature: {features[name]}); image columns: "
                f"{', '.join(images) or 'none'} (datasets.Image, or image bytes, {{bytes, path}} or file paths)"
            )
        return name
    images = images or [k for k, feature in features.items() if _encoded_images(feature, paths=False)]
    if not images:
        raise ValueError(
            f"no image column (a datasets.Image feature, image bytes or {{bytes, path}} structs) among the columns: "
            f"{', '.join(features)}; a column of file paths works when named (--image-column NAME)"
        )
    if len(images) > 1:
        raise ValueError(f"several image columns: {', '.join(images)}; choose one (--image-column NAME)")
    return images[0]


def label_column(data: Any, name: str | None = None) -> str | None:
    """The label column of a ``datasets.Dataset``: ``name``, the one ``ClassLabel`` column, else an integer
    column named ``label`` or ``labels``; None when there is none.

    Raises:
        ValueError: ``name`` is not a column of integers; or, without ``name``, several ``ClassLabel`` columns
            (the message lists them), or no such column but a ``label`` or ``labels`` column of class names
            (the message names ``class_encode_column``).
    """
    datasets = _datasets()
    features = data.features

    def integer(feature: Any) -> bool:
        return isinstance(feature, datasets.ClassLabel) or (
            isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
        )

    if name is not None:
        if name in features and not integer(features[name]):  # class names, say: the fix is one call
            raise ValueError(
                f"label column {name!r} holds {features[name]}, not class indices; encode it first "
                f"(datasets: data = data.class_encode_column({name!r}), then save_to_disk)"
            )
        if name not in features:
            raise ValueError(
                f"no integer label column {name!r}; the columns: "
                + ", ".join(f"{k} ({v})" for k, v in features.items())
            )
        return name
    classes = [k for k, feature in features.items() if isinstance(feature, datasets.ClassLabel)]
    if len(classes) == 1:
        return classes[0]
    named = [k for k in ("label", "labels") if k in classes]
    if len(classes) > 1 and named:  # a label column among others, by its name
        return named[0]
    if len(classes) > 1:  # CIFAR-100's fine_label and coarse_label
        raise ValueError(f"several label columns (ClassLabel): {', '.join(classes)}; choose one (--label-column NAME)")
    candidates = [k for k in ("label", "labels") if k in features]
    found = next((k for k in candidates if integer(features[k])), None)
    names = [k for k in candidates if getattr(features[k], "dtype", None) in ("string", "large_string")]
    if found is None and names:  # class names: the fix is one call
        return label_column(data, names[0])  # raises, naming it
    return found


def _split_name(names: list[str], split: str | None) -> str:
    """The split used of a dataset whose splits are ``names``: ``split``, else ``train``, else its only split."""
    return split or ("train" if "train" in names or len(names) != 1 else names[0])


def dataset_splits(path: PathLike) -> list[str]:
    """The split names of a local dataset with splits (a ``DatasetDict``); [] for a single dataset.

    Raises:
        ImportError, ValueError: see ``load_local_dataset``.
    """
    data = _load(_local_path(path))
    return list(data) if isinstance(data, _datasets().DatasetDict) else []


class HFImageDataset(Dataset):
    """The images of a local Hugging Face dataset, for pretraining (see the module doc).

    Args:
        data: ``hf:``'s PATH, a ``datasets.Dataset``, or a ``DatasetDict`` (its ``split``).
        load_size: side ``S`` of the square images handed out.
        channels: 1 or 3.
        column: the image column (default: see ``image_column``).
        split: the split of a dataset with splits (default ``"train"``, or its only split).
        labelled: items are ``(image, label)`` from the label column (see ``label_column``).
        labels: the label column (default: found by ``label_column``).

    Raises:
        ImportError: ``datasets`` is not installed.
        ValueError: see ``load_local_dataset`` and ``image_column``; a DatasetDict without the split.
        TypeError: ``data`` is none of the above (a streaming ``IterableDataset``, say).

    ``dataset[i]`` returns ``(image, skipped)`` as ``ImageFolder`` does: row ``i``, or
    when it is broken, row ``i+1``, ``i+2``, ... wrapping around, and 1 when row ``i`` is
    broken, else 0 (``labelled``: ``(image, label)``, the substitute's label). ``NoReadableImagesError``
    when no row at all can be read.
    """

    def __init__(
        self,
        data: Any,
        load_size: int,
        channels: int = 3,
        column: str | None = None,
        split: str | None = None,
        labelled: bool = False,
        labels: str | None = None,
    ) -> None:
        check_load_size(load_size, channels)
        apply_pixel_limit()  # a bad BYOL_PYTORCH_MAX_IMAGE_PIXELS stops here, not as unreadable rows
        datasets = _datasets()
        self.source = str(data) if isinstance(data, (str, os.PathLike)) else "a datasets.Dataset"
        self.split = split or "train"
        if isinstance(data, (str, os.PathLike)):
            data, self.split = _load_split(data, split)  # a lone split names its rows, not "train"
        elif isinstance(data, datasets.DatasetDict):  # load_from_disk of a dataset with splits
            name = _split_name(list(data), split)
            if name not in data:
                raise ValueError(f"the DatasetDict has no split {name!r}; its splits: {', '.join(data)} (split=NAME)")
            data, self.split, self.source = data[name], name, "a datasets.DatasetDict"
        elif not isinstance(data, datasets.Dataset):
            raise TypeError(
                f"HFImageDataset takes hf:'s PATH, a datasets.Dataset or a DatasetDict, got {type(data).__name__}"
            )
        # set_format("pandas" / "arrow" / "torch") changes what a row is, set_format(columns=[...]) what it
        # holds: read every column's rows as the loader does
        shown = data.format.get("columns")
        hidden = (
            shown is not None and not data.format.get("output_all_columns") and set(shown) != set(data.column_names)
        )
        if data.format.get("type") is not None or hidden:
            data = data.with_format(None)
        self.column = image_column(data, column)
        self.labelled = labelled
        self.targets: list[int] = []
        self.classes: list[str] | None = None  # a ClassLabel column's names (label i is classes[i])
        if labelled:
            found = label_column(data, labels)
            if found is None:
                raise ValueError(
                    f"{self.source} has no label column (a ClassLabel feature, or integers named label/labels; "
                    f"its columns: {', '.join(data.features)}); labels are needed here (eval, embed --labels, "
                    "train --val-data): "
                    "name a column of class indices with --label-column NAME"
                )
            values = list(data[found])
            missing = sum(1 for v in values if v is None or int(v) < 0)
            if missing:
                what = (
                    f"none of its {len(values)} rows has a label"
                    if missing == len(values)
                    else f"{missing} of its {len(values)} rows have no label"
                )
                raise UnlabelledRowsError(
                    f"{self.source} split {self.split!r}: {what} in {found!r} (None or -1, as an unlabelled "
                    "test split has them); use a labelled split (--hf-split)",
                    missing,
                    len(values),
                )
            self.targets = [int(v) for v in values]
            names = getattr(data.features[found], "names", None)
            self.classes = [str(n) for n in names] if isinstance(names, (list, tuple)) else None
        self.rows = data.select_columns([self.column]).cast_column(self.column, datasets.Image(decode=False))
        if len(self.rows) == 0:
            raise ValueError(f"{self.source} has no rows; pass a dataset (or split: --hf-split) that holds images")
        self.load_size, self.channels = load_size, channels
        self._broken: set[int] = set()  # rows found broken in this process: passed over, still counted
        self.collate = None if labelled else "images"  # items (image, skipped): make_loader's collate_images

    def __len__(self) -> int:
        return len(self.rows)

    def number_by(self, classes: list[str]) -> None:
        """Renumber the labels by another split's class names (``classes[i]`` is label i), as that split's are;
        kept as they are when the two share no name.

        Raises:
            ValueError: a class of this split that ``classes`` does not hold.
        """
        if self.classes is None or self.classes == list(classes) or not set(self.classes) & set(classes):
            return  # no names in common (ClassLabel(num_classes=K) names them "0", "1", ...): the integers stand
        index = {name: i for i, name in enumerate(classes)}
        unknown = sorted({self.classes[t] for t in self.targets} - set(index))
        if unknown:
            raise ValueError(
                f"{self.source} split {self.split!r} has classes the training split has not: {', '.join(unknown[:5])}"
                "; a kNN needs the held-out classes among the training ones"
            )
        self.targets = [index[self.classes[t]] for t in self.targets]
        self.classes = list(classes)

    def sample_id(self, index: int) -> str:
        """``SPLIT:ROW`` of row ``index``."""
        return f"{self.split}:{index}"

    def read(self, index: int) -> torch.Tensor:
        """Row ``index``'s image, or ``BrokenImageError`` (no substitution)."""
        return self._read(index)

    def _read(self, index: int) -> torch.Tensor:
        cell = self.rows[index][self.column] or {}
        name = f"{self.source}[{index}]"
        if cell.get("bytes"):
            return decode_image(cell["bytes"], self.load_size, self.channels, name=name)
        if cell.get("path"):
            return load_image(cell["path"], self.load_size, self.channels)
        raise BrokenImageError(Path(name), "the row holds no image (no bytes, no path)")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, used, skipped = read_or_next(
            index, len(self.rows), self._read, self._broken, f"rows of {self.source} holds a readable image"
        )
        return (image, self.targets[used]) if self.labelled else (image, skipped)
