"""CIFAR-10 / CIFAR-100 from the official "python version" batches, read without torchvision.

The layout is the one of the official tarballs (and of torchvision's
``CIFAR10(root, download=True)``, which unpacks the same files)::

    ROOT/cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch, batches.meta
    ROOT/cifar-100-python/train, test, meta

Each file is a pickled dict (written by Python 2) with ``b"data"``, a (N, 3072) uint8 numpy
array (1024 red, 1024 green, 1024 blue values per image, rows first), and ``b"labels"``
(CIFAR-10) or ``b"fine_labels"`` (CIFAR-100). Nothing is ever downloaded.

Pickles can run code when loaded, so they are read by ``load_pickle``: an unpickler that
resolves exactly the globals a pickled numpy array needs (numpy's ``_reconstruct``,
``ndarray`` and ``dtype``) and refuses every other one.

A data argument names a CIFAR set as ``cifar10:ROOT`` or ``cifar100:ROOT``
(``parse_cifar_spec``); ROOT may be the folder holding ``cifar-10-batches-py`` or that
folder itself.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .._modules import PathLike

__all__ = [
    "CIFAR_LAYOUTS",
    "CifarDataset",
    "RestrictedUnpickler",
    "find_cifar_folder",
    "is_cifar_spec",
    "load_cifar",
    "load_pickle",
    "parse_cifar_spec",
]

_TORONTO = "https://www.cs.toronto.edu/~kriz"
CIFAR_LAYOUTS: dict[str, dict[str, Any]] = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "labels": b"labels",
        "names": b"label_names",
        "classes": 10,
        "url": f"{_TORONTO}/cifar-10-python.tar.gz",
        "torchvision": "CIFAR10",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "labels": b"fine_labels",
        "names": b"fine_label_names",
        "classes": 100,
        "url": f"{_TORONTO}/cifar-100-python.tar.gz",
        "torchvision": "CIFAR100",
    },
}

# (module, name) pairs a pickled numpy array or scalar refers to: numpy < 2 writes numpy.core, numpy 2
# numpy._core; _frombuffer is how protocol 5 writes an array, scalar how any protocol writes a numpy int.
_ALLOWED = {
    *((f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


def _numpy_global(module: str, name: str) -> Any:
    import importlib

    import numpy as np

    if module == "numpy":
        return np.ndarray if name == "ndarray" else np.dtype
    try:  # numpy >= 2 (no deprecation warning), then numpy < 2
        return getattr(importlib.import_module(module.replace("numpy.core.", "numpy._core.")), name)
    except ImportError:
        return getattr(importlib.import_module(module.replace("numpy._core.", "numpy.core.")), name)


class _Refused(pickle.UnpicklingError):
    """A pickle named something outside the allowed globals."""


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles written by Python 3 use it for bytes: latin-1 only."""
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise _Refused(f"refused to load the global _codecs.encode with the encoding {encoding!r}")
    return text.encode("latin-1")


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for the CIFAR batches: dicts, lists, bytes, str, numbers and numpy arrays only.

    Every global a pickle names goes through ``find_class`` (also the extension-registry
    opcodes); only numpy's array reconstruction, ``numpy.ndarray`` and ``numpy.dtype``
    are resolved (and ``_codecs.encode``, latin-1 only: how Python 3 writes bytes at pickle
    protocol 2), so a pickle that would call anything else (``os.system``, ``eval``...)
    is refused before it runs.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _numpy_global(module, name)
        if (module, name) == ("_codecs", "encode"):  # bytes in a protocol-2 pickle written by Python 3
            return _latin1_encode
        raise _Refused(
            f"refused to load the global {module}.{name}: a CIFAR batch holds only dicts, lists and numpy arrays"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("refused a persistent id: not a CIFAR batch")


def load_pickle(path: PathLike) -> Any:
    """Unpickle ``path`` with ``RestrictedUnpickler`` (Python 2 strings kept as bytes).

    Raises:
        ValueError: the file is not such a pickle, or names a global outside the allowed set.
    """
    data = Path(path).read_bytes()
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _Refused as error:
        raise ValueError(f"{str(path)!r}: {error}") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        AttributeError,
        ImportError,
        IndexError,
        KeyError,
        TypeError,
        ValueError,
    ) as error:
        raise ValueError(f"{str(path)!r} is not a CIFAR batch ({type(error).__name__}: {error})") from None


def parse_cifar_spec(spec: str | None) -> tuple[str, str] | None:
    """``("cifar10", ROOT)`` for ``"cifar10:ROOT"`` (likewise cifar100); None for anything else.

    Examples:
        >>> parse_cifar_spec("cifar10:/data"), parse_cifar_spec("/data/images")
        (('cifar10', '/data'), None)
    """
    if not spec:
        return None
    kind, sep, root = str(spec).partition(":")
    if not sep or kind.lower() not in CIFAR_LAYOUTS:
        return None
    return kind.lower(), root or "."


def is_cifar_spec(spec: str | None) -> bool:
    """Whether ``spec`` names a CIFAR set (``cifar10:ROOT`` or ``cifar100:ROOT``)."""
    return parse_cifar_spec(spec) is not None


def _missing_message(kind: str, root: Path) -> str:
    layout = CIFAR_LAYOUTS[kind]
    files = ", ".join(layout["train"][:1] + layout["test"] + [layout["meta"]])
    return (
        f"no {kind} python batches in {str(root)!r} (looked for {layout['folder']}/ with {files}...); "
        f"nothing is downloaded at run time: get {layout['url']} (the 'python version' on "
        f"{_TORONTO}/cifar.html) and unpack it in {str(root)!r}, or run "
        f"torchvision.datasets.{layout['torchvision']}({str(root)!r}, download=True), which writes the same layout"
    )


def find_cifar_folder(kind: str, root: PathLike) -> Path:
    """The folder holding the batches: ``ROOT/<official folder>`` or ``ROOT`` itself.

    Raises:
        ValueError: an unknown kind, or no batches there (the message says where to get them).
    """
    if kind not in CIFAR_LAYOUTS:
        raise ValueError(f"unknown CIFAR set {kind!r}; use one of {', '.join(CIFAR_LAYOUTS)}")
    layout, base = CIFAR_LAYOUTS[kind], Path(root).expanduser()
    names = layout["train"] + layout["test"]
    for folder in (base / layout["folder"], base):
        missing = [name for name in names if not (folder / name).is_file()]
        if not missing:
            return folder
        if len(missing) < len(names):  # the set is there, but not whole
            raise ValueError(
                f"{str(folder)!r} holds {kind} batches but not {', '.join(missing)}: the download or the unpacking "
                f"was cut short; unpack {layout['url']} there again"
            )
    raise ValueError(_missing_message(kind, base))


def _read_batch(path: Path, label_key: bytes) -> tuple[torch.Tensor, list[int]]:
    import numpy as np

    batch = load_pickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise ValueError(f"{str(path)!r} is not a CIFAR batch: expected a dict with b'data' and {label_key!r}")
    data = np.asarray(batch[b"data"])
    given = batch[label_key]
    found = np.asarray(given) if isinstance(given, (list, tuple, np.ndarray)) else None
    if found is None or found.ndim != 1 or not (found.dtype.kind in "iu" or found.size == 0):
        what = type(given).__name__ if found is None else f"{found.dtype} {tuple(found.shape)}"
        raise ValueError(
            f"{str(path)!r}: {label_key!r} must be N whole-number labels (a list or 1-D array), got {what}"
        )
    labels = [int(v) for v in found]
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise ValueError(
            f"{str(path)!r}: expected b'data' as (N, 3072) uint8 and N labels, "
            f"got {data.dtype} {tuple(data.shape)} and {len(labels)} labels"
        )
    return torch.from_numpy(data.copy()).view(-1, 3, 32, 32), labels


def load_cifar(kind: str, root: PathLike, split: str = "train") -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(images uint8 (N, 3, 32, 32), labels int64 (N,), class names)`` of one split.

    Args:
        kind: ``"cifar10"`` or ``"cifar100"``.
        root: the folder holding the official folder, or that folder.
        split: ``"train"`` (50000 images) or ``"test"`` (10000).

    Raises:
        ValueError: missing files (with where to get them), a file that is not a CIFAR
            batch, or a pickle that names anything but numpy's array globals.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = find_cifar_folder(kind, root)
    layout = CIFAR_LAYOUTS[kind]
    parts = [_read_batch(folder / name, layout["labels"]) for name in layout[split]]
    for name, (_, batch_labels) in zip(layout[split], parts):
        wrong = [label for label in batch_labels if not 0 <= label < layout["classes"]]
        if wrong:
            raise ValueError(
                f"{str(folder / name)!r}: label {wrong[0]} is outside {kind}'s classes 0..{layout['classes'] - 1} "
                f"(a {'cifar100:' if kind == 'cifar10' else 'cifar10:'} set, or a damaged file?)"
            )
    images = torch.cat([p[0] for p in parts])
    labels = torch.tensor([label for p in parts for label in p[1]], dtype=torch.int64)
    classes = [str(i) for i in range(layout["classes"])]
    if (folder / layout["meta"]).is_file():
        meta = load_pickle(folder / layout["meta"])
        names = meta.get(layout["names"]) if isinstance(meta, dict) else None
        if isinstance(names, list) and names:
            classes = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]
    return images, labels, classes


class CifarDataset(Dataset):
    """A CIFAR split in memory (uint8, about 150 MB for the 50000 training images).

    Args:
        kind: ``"cifar10"`` or ``"cifar100"``.
        root: the folder holding the official folder, or that folder.
        split: ``"train"`` or ``"test"``.
        labelled: items are ``(image, label)``; else ``(image, 0)``, as ``ImageFolder``
            hands out ``(image, skipped files)`` for ``collate_images``.
        size: side of the images handed out (bilinear, antialiased); None or 32: as stored.
        channels: 3, or 1 for luma.

    Attributes:
        images: uint8 (N, 3, 32, 32); targets: list of int labels; classes: class names.

    Raises:
        ValueError: see ``load_cifar``.
    """

    def __init__(
        self,
        kind: str,
        root: PathLike,
        split: str = "train",
        labelled: bool = False,
        size: int | None = None,
        channels: int = 3,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.images, labels, self.classes = load_cifar(kind, root, split)
        self.targets: list[int] = labels.tolist()
        self.kind, self.split, self.labelled = kind, split, labelled
        self.size, self.channels = size, channels
        self.collate = None if labelled else "images"  # items (image, 0): make_loader's collate_images

    def __len__(self) -> int:
        return len(self.images)

    def _image(self, index: int) -> torch.Tensor:
        image = self.images[index]
        if self.channels == 1:
            weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
            image = (image.float() * weights).sum(0, keepdim=True).round().to(torch.uint8)
        if self.size is not None and self.size != image.shape[-1]:
            resized = F.interpolate(image[None].float(), size=(self.size, self.size), mode="bilinear", antialias=True)
            image = resized[0].round().clamp(0, 255).to(torch.uint8)
        return image

    def sample_id(self, index: int) -> str:
        """``SPLIT:INDEX`` (the position in the official batches)."""
        return f"{self.split}:{index}"

    def read(self, index: int) -> torch.Tensor:
        """Image ``index`` (CIFAR images are never broken)."""
        return self._image(index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._image(index), self.targets[index] if self.labelled else 0
